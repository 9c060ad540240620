"""The two contracts between teachers, the student's forward and the losses.

Teachers return a `TeacherSignal`; the trainer hands losses a `StudentOutput`. Neither side knows the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# `targets` in a batch are already shifted (targets[t] is the token to predict at t); this marks positions to
# skip.
IGNORE_INDEX = -100


@dataclass
class TeacherSignal:
    """What a teacher says about a batch, aligned with the batch's positions.

    Either full `logits` [B, T, V]; or the same without ever holding them: `final_hidden` [B, T, H_t] (after
    the final norm) with the LM head's `head_weight` [V, H_t] and `head_bias`, from which losses compute the
    logits chunk by chunk (see `head_signal`); or sparse `topk_ids` [B, T, K] (int32) with `topk_logprobs`
    [B, T, K], the teacher's log-probabilities (so 1 - exp(logsumexp(topk_logprobs)) is the tail mass outside
    the top K).
    """

    logits: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    final_hidden: torch.Tensor | None = None
    head_weight: torch.Tensor | None = None
    head_bias: torch.Tensor | None = None
    hidden_states: list[torch.Tensor] | None = None  # per layer [B, T, H_t], embeddings first (HF convention)
    # Cross-tokenizer runs: the teacher's own tokenization of the same text, and byte offsets per token.
    input_ids: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.is_sparse and (self.topk_ids is None or self.topk_logprobs is None):
            raise ValueError(
                "TeacherSignal needs logits, final_hidden with head_weight, or topk_ids with topk_logprobs"
            )

    @property
    def is_sparse(self) -> bool:
        return self.logits is None and (self.final_hidden is None or self.head_weight is None)


@dataclass
class StudentOutput:
    """The student's forward, stopped before the LM head so losses can apply the head chunk by chunk.

    `head` is the model's output-embedding module itself: calling it inside the engine's forward lets ZeRO-3
    gather
    its partitioned weight, so a loss never needs the full [B, T, V] logits at once.
    """

    hidden: torch.Tensor  # [B, T, H], after the final norm
    head: Callable[[torch.Tensor], torch.Tensor]
    hidden_states: tuple[torch.Tensor, ...] | None = None  # per layer, embeddings first
    _logits: torch.Tensor | None = None

    def logits(self) -> torch.Tensor:
        """All logits at once: for losses and tests where [B, T, V] is affordable."""
        if self._logits is None:
            self._logits = self.head(self.hidden)
        return self._logits
