"""The teacher-source protocol and its registry.

A source turns the trainer's batches into (batch, TeacherSignal) pairs. It writes one method, `signal(batch)`;
`stream(batches, device)` is the same for every source: an optional `transform` of each batch (on-policy
replaces it by the student's own sample), scoring `prefetch` micro-batches ahead in a thread when the source
is remote, and delivery in the batches' order on `device`. A source whose capabilities say `can_fail` raises
`TeacherUnavailable` after its own retries; the trainer then checkpoints the last whole step and stops.

Sources register by name (`@register_source("vllm_server")` on the class) with their capabilities, so
preflight can refuse an objective a source cannot serve before anything loads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from llmdistill.config import LLMDistillError
from llmdistill.data import to_device
from llmdistill.signal import TeacherSignal
from llmdistill.teachers.streaming import prefetched, signal_to_device


class TeacherUnavailable(LLMDistillError):
    """The teacher did not answer after retries."""


@dataclass(frozen=True)
class Capabilities:
    """What a source's signal holds and how it behaves."""

    full_logits: bool = False  # [B, T, V] logits
    top_k: bool = False  # sparse top-k ids and log-probabilities (plus the actual token's log-prob)
    hidden_states: bool = False  # per-layer hidden states (hidden_* and curriculum losses)
    # Scores the teacher's own tokenization when batches carry one (alm, uld with another tokenizer).
    cross_tokenizer: bool = False
    # May stop answering mid-run (a server): the trainer agrees across ranks, checkpoints and stops.
    can_fail: bool = False


class TeacherSource:
    """Base of every source; a subclass sets `capabilities` and writes `signal` and a `build` classmethod."""

    capabilities: ClassVar[Capabilities] = Capabilities()
    # Micro-batches scored ahead in a thread (remote sources overlap the network with the student).
    prefetch: int = 0
    # Move each batch to the device before scoring it (an in-process model) rather than after.
    score_on_device: ClassVar[bool] = False
    # Called with each batch the trainer has finished with (see streaming.consumed_trace); None: nothing.
    on_consumed: Callable[[dict], None] | None = None

    @classmethod
    def preflight(cls, cfg) -> None:
        """Refuse a setting this source cannot run, before anything loads (cheap checks only)."""

    @classmethod
    def check_ready(cls, cfg, plan) -> None:
        """Before a training run loads weights: is what this source reads there and fit for the run (a built
        cache; a server of teacher.path's tokenizer, of the student of `plan`)? Not part of preflight, which
        the cache builder also runs before the cache exists; `plan` is preflight's."""

    @classmethod
    def build(cls, cfg, model, needs: frozenset[str], student) -> TeacherSource:
        raise NotImplementedError

    @property
    def can_fail(self) -> bool:
        return self.capabilities.can_fail

    def signal(self, batch: dict) -> TeacherSignal | None:
        raise NotImplementedError

    def transform(self, batch: dict) -> dict:
        """The batch to train on in place of `batch` (the identity, except for on-policy sources)."""
        return batch

    def after_optimizer_step(self, step: int) -> None:
        """Called by the trainer on every rank after optimizer step `step` (a source that samples from the
        student pushes its weights here)."""

    def save_state(self, path: Path, step: int) -> dict | None:
        """Called on every rank while the checkpoint of step `step` is written into `path`: write this rank's
        files there (the checkpoint's completeness marker fingerprints them with the others) and return what
        the marker records for `load_state` (rank 0's), or None when the source has no state."""
        return None

    def load_state(self, path: Path, state: dict | None) -> None:
        """Called on every rank once the checkpoint `path` is loaded, with what `save_state` returned for it
        (None for a checkpoint without)."""

    def stream(self, batches: Iterator[dict], device: str, start: int = 0):
        """(batch, signal) pairs on `device`; `start`: micro-batches this rank consumed before `batches`."""
        self._stop = threading.Event()
        self._pending = None

        def score(batch):
            if self.score_on_device:
                batch = to_device(batch, device)
            batch = self.transform(batch)
            return batch, self.signal(batch)

        pairs = self._pairs = prefetched(batches, score, self.prefetch, self._stop)
        while True:
            # The trainer asks for the next pair only after its step on the previous one: that one was used.
            self._consumed()
            try:
                batch, signal = next(pairs)
            except StopIteration:
                return
            self._pending = batch
            yield to_device(batch, device), signal_to_device(signal, device)

    def discard_pending(self) -> None:
        """The batch last handed out will not be trained (a teacher failed on another rank, and the run stops
        before this step): it is not consumed, at the next request or at close()."""
        self._pending = None

    def _consumed(self) -> None:
        pending, self._pending = getattr(self, "_pending", None), None
        if pending is not None and self.on_consumed is not None:
            self.on_consumed(pending)

    def close(self) -> None:
        if getattr(self, "_stop", None) is not None:
            self._stop.set()
            self._pairs.close()  # waits for a batch being scored ahead
        self._consumed()


def process_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


_SOURCES: dict[str, type[TeacherSource]] = {}


def register_source(name: str):
    """Register a TeacherSource subclass under `name` (the value of teacher.source)."""

    def wrap(cls):
        if name in _SOURCES:
            raise ValueError(f"teacher source {name!r} registered twice")
        cls.source_name = name
        _SOURCES[name] = cls
        return cls

    return wrap


def source_class(name: str) -> type[TeacherSource]:
    if name not in _SOURCES:
        raise LLMDistillError(f"teacher.source: {name!r} is not a known teacher source ({sorted(_SOURCES)})")
    return _SOURCES[name]
