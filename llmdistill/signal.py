"""The two contracts between teachers, the student's forward and the losses.

Teachers return a `TeacherSignal`; the trainer hands losses a `StudentOutput`. Neither side knows the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# `targets` in a batch are already shifted (targets[t] is the token to predict at t); IGNORE_INDEX marks
# the positions to skip.
IGNORE_INDEX = -100


@dataclass
class TeacherSignal:
    """What a teacher says about a batch, aligned with the batch's positions.

    Either full `logits` [B, T, V] or sparse `topk_ids` [B, T, K] (int32) with `topk_logprobs` [B, T, K], the
    teacher's log-probabilities (so 1 - exp(logsumexp(topk_logprobs)) is the tail mass outside the top K).
    """

    logits: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    # Sparse teachers: the log-prob of the actual next token at each position [B, T] (NaN: not given), which
    # the top-k may not hold (alm reads it; vLLM always returns it).
    target_logprobs: torch.Tensor | None = None
    hidden_states: list[torch.Tensor] | None = None  # per layer [B, T, H_t], embeddings first (HF convention)
    # Cross-tokenizer runs: the teacher's own tokenization of the same text, and byte offsets per token.
    input_ids: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.logits is None and (self.topk_ids is None or self.topk_logprobs is None):
            raise ValueError("TeacherSignal needs logits, or topk_ids with topk_logprobs")

    @property
    def is_sparse(self) -> bool:
        return self.logits is None


@dataclass
class StudentOutput:
    """The student's forward, stopped before the LM head so losses can apply the head chunk by chunk.

    `head` is the model's output-embedding module itself: calling it inside the engine's forward lets ZeRO-3
    gather its partitioned weight, so a loss never needs the full [B, T, V] logits at once.
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


def forward_to_head(model, batch: dict, hidden_states: bool = False) -> StudentOutput:
    """Run an HF causal LM's decoder on a packed batch and stop before its LM head.

    position_ids restart at each packed document and no attention_mask is passed: HF builds a block-causal
    mask. The head is called later, chunk by chunk, by whoever reads the output (a loss, a held-out NLL).
    """
    out = model.get_decoder()(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        output_hidden_states=hidden_states,
        use_cache=False,
        **packed_attention_kwargs(model, batch["position_ids"]),
    )
    return StudentOutput(out.last_hidden_state, model.get_output_embeddings(), out.hidden_states)


def packed_attention_kwargs(model, position_ids: torch.Tensor) -> dict:
    """What flash_attention_2/3 need to keep packed documents apart: their cumulative lengths over the
    flattened batch (transformers infers them from position_ids only for a batch of one row). Every other
    kernel gets a block-causal mask that transformers derives from position_ids, so nothing is added."""
    implementation = getattr(model.config, "_attn_implementation", None) or ""
    if not implementation.startswith("flash_attention"):
        return {}
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    # Every row starts a document at position 0, so the restarts of the flattened positions are the cuts.
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids)
    return {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k, "max_length_q": max_q, "max_length_k": max_k}
