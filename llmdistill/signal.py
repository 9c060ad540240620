"""The two contracts between teachers, the student's forward and the losses.

Teachers return a `TeacherSignal`; the trainer hands losses a `StudentOutput`. Neither side knows the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# `targets` in a batch are already shifted (targets[t] is the token to predict at t); IGNORE_INDEX marks
# the positions to skip.
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
    # Sparse teachers: the log-prob of the actual next token at each position [B, T] (NaN: not given), which
    # the top-k may not hold (alm reads it; vLLM always returns it).
    target_logprobs: torch.Tensor | None = None
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
    gather its partitioned weight, so a loss never needs the full [B, T, V] logits at once. The model's
    logits are `logits_of(hidden)`: the head, then `logit_softcap` where the model soft-caps after its head
    (Gemma-2/3's final_logit_softcapping); whoever applies the head applies the cap too.
    """

    hidden: torch.Tensor  # [B, T, H], after the final norm
    head: Callable[[torch.Tensor], torch.Tensor]
    hidden_states: tuple[torch.Tensor, ...] | None = None  # per layer, embeddings first
    logit_softcap: float | None = None
    _logits: torch.Tensor | None = None

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits for final hidden states `hidden` [..., H], differentiable."""
        return softcap(self.head(hidden), self.logit_softcap)

    def logits(self) -> torch.Tensor:
        """All logits at once: for losses and tests where [B, T, V] is affordable."""
        if self._logits is None:
            self._logits = self.logits_of(self.hidden)
        return self._logits


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap), in the order of operations HF's Gemma-2/3 forward uses (so the values are
    the model's own, to the bit); the logits themselves when cap is None."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def logit_softcap(model) -> float | None:
    """The soft-cap an HF causal LM applies to its logits after its head: the `final_logit_softcapping` its
    own forward reads (Gemma-2, Gemma-3 and their kind; None or absent elsewhere)."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return None if cap is None else float(cap)


def forward_to_head(model, batch: dict, hidden_states: bool = False) -> StudentOutput:
    """Run an HF causal LM's decoder on a packed batch and stop before its LM head.

    position_ids restart at each packed document and no attention_mask is passed: HF builds a block-causal
    mask. The head (and the model's logit soft-cap, if any) is applied later, chunk by chunk, by whoever reads
    the output (a loss, a held-out NLL).
    """
    out = model.get_decoder()(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        output_hidden_states=hidden_states,
        use_cache=False,
        **packed_attention_kwargs(model, batch["position_ids"]),
    )
    return StudentOutput(
        out.last_hidden_state, model.get_output_embeddings(), out.hidden_states, logit_softcap(model)
    )


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


@torch.no_grad()
def head_signal(
    model, input_ids, position_ids, output_hidden_states: bool = False, check: bool = True
) -> TeacherSignal:
    """The teacher signal of an HF causal LM (or of a DeepSpeed engine wrapping one) in the fused form: its
    final hidden states and LM head, so [B, T, V] logits never exist.

    The model's own forward runs, so ZeRO-3's hooks gather and release parameters as usual, with
    `logits_to_keep=1`; a forward hook on `get_decoder()` takes its `last_hidden_state` (after the final
    norm). With `check`, the one position of logits the forward still computes checks that the model's logits
    are its head applied to those states (no soft-capping or scaling after the head): a property of the model,
    so a caller checks its first batch only (the check waits for the device twice). A ZeRO-3-partitioned head
    is gathered and copied once per call.
    """
    import inspect

    import torch.nn.functional as F

    from llmdistill.config import ConfigError

    inner = getattr(model, "module", model)
    captured = []
    hook = inner.get_decoder().register_forward_hook(lambda module, args, out: captured.append(out[0]))
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(inner.forward).parameters else {}
    try:
        out = model(
            input_ids=input_ids,
            position_ids=position_ids,
            output_hidden_states=output_hidden_states,
            use_cache=False,
            **keep,
            **packed_attention_kwargs(inner, position_ids),
        )
    finally:
        hook.remove()
    head = inner.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if hasattr(weight, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for p in (weight, bias) if p is not None]):
            weight, bias = weight.clone(), None if bias is None else bias.clone()
    hidden = captured[-1]
    expected = out.logits[:, -1].float()
    tolerance = 1e-4 if weight.dtype == torch.float32 else 2e-2
    # Non-finite logits say nothing about the head; the objective's finite check names the broken input.
    if check and math.isfinite(scale := float(expected.abs().max())):
        if not torch.allclose(
            F.linear(hidden[:, -1], weight, bias).float(), expected, rtol=tolerance, atol=tolerance * scale
        ):
            raise ConfigError(
                f"teacher {type(inner).__name__}: its logits are not its LM head applied to its last hidden "
                "state (soft-capping or scaling after the head?), so the fused teacher form does not apply"
            )
    return TeacherSignal(
        final_hidden=hidden,
        head_weight=weight.detach(),
        head_bias=None if bias is None else bias.detach(),
        hidden_states=list(out.hidden_states) if output_hidden_states else None,
    )
