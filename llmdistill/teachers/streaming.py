"""Pieces of `TeacherSource.stream` that any source reuses: scoring ahead in a thread, moving a signal to the
device, and the consumed-batch trace the resume tests read."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator

import torch

from llmdistill.signal import TeacherSignal

log = logging.getLogger(__name__)

_END = object()


# How long closing the stream waits for the thread to finish the item it is computing.
JOIN_SECONDS = 300.0


def prefetched(items: Iterator, fetch: Callable, depth: int, stop: threading.Event):
    """fetch(item) for each item, in order, with up to `depth` computed ahead in a thread; an error is raised
    at the item it belongs to, so every result before it is still delivered.

    Closing the generator stops the thread and waits for the item it is computing: a thread left inside
    torch's kernels while the interpreter exits aborts the process ("terminate called without an active
    exception") after a run that finished."""
    if depth == 0:
        for item in items:
            yield fetch(item)
        return
    results: queue.Queue = queue.Queue(maxsize=depth)

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                results.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in items:
                if stop.is_set() or not put((fetch(item), None)):
                    return
            put(_END)
        except BaseException as err:  # handed to the consumer, which raises it in order
            put((None, err))

    worker = threading.Thread(target=work, name="teacher-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            entry = results.get()
            if entry is _END:
                return
            value, err = entry
            if err is not None:
                raise err
            yield value
    finally:
        stop.set()
        worker.join(JOIN_SECONDS)
        if worker.is_alive():
            log.warning(f"the teacher's prefetch thread is still busy after {JOIN_SECONDS:.0f} s; leaving it")


def signal_to_device(signal: TeacherSignal | None, device: str) -> TeacherSignal | None:
    """Every tensor of the signal (and of its lists of tensors) on `device`."""
    if signal is None:
        return None
    for f in dataclasses.fields(signal):
        value = getattr(signal, f.name)
        if isinstance(value, torch.Tensor):
            setattr(signal, f.name, value.to(device, non_blocking=True))
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            setattr(signal, f.name, [v.to(device, non_blocking=True) for v in value])
    return signal


def consumed_trace(path: str, rank: int) -> Callable[[dict], None]:
    """An `on_consumed` hook appending "rank hash" per batch the trainer trained on, so a test can check that
    a run stopped by a dead teacher and resumed used every batch exactly once. A batch fetched ahead, or one
    whose scoring failed, is never written: only a batch the trainer moved past (or held at close())."""

    def write(batch: dict) -> None:
        ids = batch["input_ids"].to("cpu", torch.int64).numpy()
        digest = hashlib.blake2b(ids.tobytes(), digest_size=8).hexdigest()
        with open(path, "a") as f:
            f.write(f"{rank} {digest}\n")

    return write
