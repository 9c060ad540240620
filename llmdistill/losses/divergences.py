"""Token-level losses over the vocabulary, fused with the LM head and computed chunk by chunk.

How the memory stays small (the Liger idea, kept compatible with ZeRO-3): the student's logits only ever
exist for `chunk_size` valid positions at a time, and so do the teacher's when the teacher comes as its final
hidden states and LM head (TeacherSignal.final_hidden / head_weight) instead of [B, T, V] logits. Every
divergence here has its gradient w.r.t. the student's logits in closed form, so a chunk's value and gradient
come out of one pass over a few [chunk, V] fp32 buffers, with no autograd graph over them (on a GPU, for fkl,
rkl, jsd against a full-vocabulary teacher and ce, a Triton kernel of kernels.py does that pass in the
logits' dtype, without the fp32 buffers; the code here stays its reference). Two paths
(fused_head_terms):
- eager, when the head is a plain nn.Linear with a full weight (no ZeRO, ZeRO-1/2): the gradients w.r.t. the
  hidden states and the head weight are computed inside the forward's chunk loop (2 matmuls per chunk, in the
  weight's dtype), the backward only hands them over: 3 head matmuls in all, nothing recomputed.
- recompute, for any other head (ZeRO-3-partitioned, PEFT-wrapped): each chunk runs `student.head(h)` as the
  module inside `torch.utils.checkpoint(..., use_reentrant=False)`, never through its `.weight`, so
  DeepSpeed's module hooks gather the partitioned weight both in the forward and in the recomputation during
  the backward (the same path as activation checkpointing in HF models). The non-reentrant checkpoint keeps
  one autograd graph, so the head weight's gradient is accumulated once per backward (ZeRO-2/3 reduce hooks
  fire once). Cost: one extra [chunk, H] x [H, V] matmul per chunk (4 head matmuls instead of 3).
Peak extra memory is therefore a few [chunk, V] fp32 buffers plus the head weight's gradient, never
[B*T, V]; the chunk size comes from a memory budget (CHUNK_BYTES) unless a loss's `chunk_size` sets it.
Several terms of an objective (`fkl` + `ce`, say) share one such pass (fused_head_terms): a chunk's gradient
w.r.t. the logits is linear in the terms, so each chunk's logits are computed once and the terms' weighted
gradients summed before the head matmuls, at the cost of one more [chunk, V] buffer (the sum) at the peak.
A student whose model soft-caps its logits after the head (Gemma-2/3, StudentOutput.logit_softcap) is capped
in the same pass, before the terms, and the summed gradient chained through the cap after them
(_softcapped), so every term sees the model's own logits whichever path or kernel runs.

Conventions (same for every divergence here):
- p is the teacher, q the student, both at temperature T: softmax(logits / T). Values are averaged over the
  valid positions (targets != -100) and multiplied by T^2 (Hinton et al.), so gradient sizes do not shrink
  with T.
- Sparse teachers (top-k ids and log-probabilities) are compared on a shared support, chosen by `tail`:
  `bucket`: the K teacher tokens plus one "rest of the vocabulary" bucket on both sides (the teacher's bucket
  holds 1 - sum(top-k probs), the student's its exact probability outside those K ids);
  `renormalize`: both distributions restricted to the teacher's K ids and renormalised there.
  The teacher's top-k log-probabilities are taken at temperature 1; for T != 1 they (and the bucket, as one
  pseudo-token) are re-tempered as logits, which is exact for the top-k block under `renormalize` and an
  approximation for the bucket (the tail's own shape is unknown).
- Padded vocabularies (student 151936 vs teacher 152064) are compared on the shared leading range; anything
  larger than padding to a multiple of 256 is taken to be a different tokenizer and rejected in favour of
  `alm`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable
from typing import Annotated, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.utils.checkpoint import checkpoint

from llmdistill.config import ConfigError
from llmdistill.losses import kernels
from llmdistill.losses.registry import register
from llmdistill.signal import IGNORE_INDEX, StudentOutput, TeacherSignal

log = logging.getLogger(__name__)

# Teacher log-probabilities are clamped here: exp() of it is exactly 0 in fp32, yet p * (log p - log q) stays
# finite (0) where a probability is zero, and a reverse KL against a zero teacher probability is large but not
# inf.
LOGP_FLOOR = -1e4
# A top-k teacher's bucket is 1 - sum(top-k probabilities) of fp32 log-probabilities (a vLLM server's; a
# cache's are coarser still), so a remainder below fp32's resolution is rounding noise, and exactly 0 wherever
# the teacher is sure (vLLM's log-prob is then 0.0). Taken at face value, log 0 would charge a reverse KL
# -LOGP_FLOOR per unit of the student's tail mass; the bucket is floored at that resolution instead.
TAIL_LOGP_FLOOR = math.log(torch.finfo(torch.float32).eps)
# Auto chunk size: the rows whose [rows, V] fp32 logits take this many bytes (a chunk's work holds about 3
# such buffers at its peak); with the Triton kernels (kernels.py) a chunk holds about 3 [rows, V] buffers in
# the logits' dtype instead, so bf16 gets twice the rows, and fewer, larger head matmuls (on an H200 at
# 8192 x 4096 x 128256, 512 rows ran fkl 1.3x faster than 261). The `chunk_size` parameter of each loss
# overrides it.
CHUNK_BYTES = 128 << 20
# The parameters' rules, stated once in the signatures: llmdistill.losses.registry.check_params checks every
# config value against them before any weights load (preflight, and the Objective), naming loss.N.<parameter>.
Temperature = Annotated[float, Field(gt=0)]  # softmax(logits / T)
Tail = Literal["bucket", "renormalize"]  # a top-k teacher's shared support (module docstring)
ChunkSize = Annotated[int, Field(gt=0)] | None  # None: from the memory budget (CHUNK_BYTES)
_logged: set[str] = set()


def log_once(key: str, message: str) -> None:
    if key not in _logged:
        _logged.add(key)
        log.warning(message)


def valid_positions(batch: dict) -> torch.Tensor:
    """Flat indices of the positions that have a target."""
    return (batch["targets"].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def shared_vocab(student_vocab: int, teacher_vocab: int) -> int:
    """The vocabulary range both sides share: padded vocabularies are sliced, other differences rejected."""
    if student_vocab == teacher_vocab:
        return student_vocab
    small, large = sorted((student_vocab, teacher_vocab))
    if large > _round_up(small, 256):
        raise ConfigError(
            f"student vocabulary ({student_vocab}) and teacher vocabulary ({teacher_vocab}) differ by more "
            "than padding, so they are different tokenizers; token-level losses cannot compare them. Use the "
            "cross-tokenizer loss `alm` (loss: [{name: alm}]) or give the student the teacher's tokenizer."
        )
    log_once(
        f"vocab:{student_vocab}:{teacher_vocab}",
        f"student vocabulary {student_vocab} and teacher vocabulary {teacher_vocab} differ by padding: "
        "comparing "
        f"distributions over the shared first {small} tokens",
    )
    return small


def _head_width(student: StudentOutput) -> int | None:
    width = getattr(student.head, "out_features", None)
    if width is None:
        weight = getattr(student.head, "weight", None)
        shape = getattr(weight, "ds_shape", None) or getattr(
            weight, "shape", None
        )  # ZeRO-3 keeps the real shape
        width = shape[0] if shape is not None and len(shape) == 2 else None
    return width


def auto_chunk_size(vocab: int | None, positions: int, logit_bytes: int = 4) -> int:
    """The rows whose [rows, V] logits of `logit_bytes` each take CHUNK_BYTES, at most 1/8 of the
    `positions` (so the chunked peak stays well under the full [N, V]), never under 16 rows."""
    return max(16, min(CHUNK_BYTES // (logit_bytes * (vocab or 32768)), -(-positions // 8)))


def head_vocab(student: StudentOutput, signal: TeacherSignal | None) -> int | None:
    """The vocabulary width the auto chunk size is computed for: the teacher's, else the student head's."""
    return (teacher_vocab(signal) if signal is not None else None) or _head_width(student)


def _plain_linear_weight(head) -> bool:
    """True when the head is an nn.Linear whose weight is an ordinary full tensor (not ZeRO-3 partitioned)."""
    if not isinstance(head, torch.nn.Linear):
        return False
    weight = head.weight
    return not hasattr(weight, "ds_id") and weight.shape == (head.out_features, head.in_features)


# A chunk's `value_and_grad(logits, rows, grad_scale)` returns (the sum of the chunk's values as an fp32
# scalar, grad_scale * d(sum)/d(logits) in the logits' dtype, or None when grad_scale is None). It never
# modifies `logits` and drops its reference as soon as it has read them, so in the eager path (which hands
# over its only reference) the chunk's logits are freed before the divergence's buffers are allocated.


class HeadTerm(NamedTuple):
    """A loss in the fused head form: factor * (sum over chunks of value_and_grad's values) / (valid
    positions). `chunk_size` bounds a chunk's rows (None: automatic, from the memory budget for `vocab`).
    `fp32_free`: where the kernels of kernels.py are enabled, a chunk of this term holds its [rows, V]
    buffers in the logits' dtype, none in fp32, so the automatic size is computed for that dtype."""

    value_and_grad: Callable
    factor: float = 1.0
    chunk_size: int | None = None
    vocab: int | None = None
    fp32_free: bool = False


def head_loss(head_term):
    """A registrable loss from `head_term(student, signal, batch, **params) -> HeadTerm`: called as a loss it
    runs its own pass of the head; the objective reads `loss.head_term` to run several such terms in one pass
    (fused_head_terms)."""

    @functools.wraps(head_term)
    def loss(student, signal, batch, *args, **params):
        term = head_term(student, signal, batch, *args, **params)
        return fused_head_terms(student, batch, [term], [1.0])[0], {}

    loss.head_term = head_term
    return loss


def _chunk_terms(terms: list[HeadTerm], grad_scales: list[float]):
    """One chunk function for the terms that share a head pass: `chunk(logits, rows, want_grad)` returns
    (their chunk values as a [k] vector, the sum of their gradients w.r.t. the logits with term i's scaled by
    grad_scales[i], or None). A term's gradient w.r.t. the logits is linear in its scale, so this sum is the
    gradient of the weighted total, and the two backward matmuls run once for all the terms."""

    def chunk(logits, rows, want_grad):
        if rows.numel() == 0:  # a trailing chunk of a module head (fused_head_terms): nothing to score
            values = torch.zeros(len(terms), dtype=torch.float32, device=logits.device)
            return values, (torch.zeros_like(logits) if want_grad else None)
        held = [logits]
        del logits
        values, grad = [], None
        for i, term in enumerate(terms):
            scale = grad_scales[i] if want_grad else None
            if i < len(terms) - 1:
                value, g = term.value_and_grad(held[0], rows, scale)
            else:
                # The last term gets the only reference to the logits (no name here keeps one), so it frees
                # them before its own buffers (the convention above); the earlier ones only read them.
                value, g = term.value_and_grad(held.pop(), rows, scale)
            values.append(value)
            if g is not None:
                grad = g if grad is None else grad.add_(g)
            del g
        return torch.stack(values), grad

    return chunk


def _softcapped(chunk, cap: float):
    """The chunk function for a head whose model soft-caps its logits (Gemma-2/3's final_logit_softcapping):
    it takes the head's raw logits z, hands the terms the model's own logits cap * tanh(z / cap), and chains
    their summed gradient back to z with d/dz = 1 - tanh(z / cap)^2 before the head matmuls. Every path
    (eager, recompute, no-grad) and the kernels of kernels.py see only logits and their gradient, so the cap
    lives here once for all the terms. It keeps tanh(z / cap) in the logits' dtype for the chain rule: one
    more [chunk, V] buffer at the peak, for soft-capped students only."""

    def chunk_of_capped(logits, rows, want_grad):
        with torch.no_grad():
            # A new buffer, never `logits` in place: the recompute path saves them for its backward.
            t = (logits / cap).tanh_()
            del logits
            # The terms get the only reference to the capped logits (the chunk functions' convention).
            values, grad = chunk(t * cap, rows, want_grad)
            if grad is None:
                return values, None
            # 1 - tanh^2 from the rounded tanh, as autograd through the model's own forward computes it.
            return values, grad.mul_(t.square_().neg_().add_(1.0))

    return chunk_of_capped


def _weighted(sums: torch.Tensor, scales: list[float], weights: list[float]):
    """(sum_i weights_i * values_i, values) with values_i = sums_i * scales_i; Python numbers stay on the host
    (a tensor built from them would be a copy to the device)."""
    values = [sums[i] * scale for i, scale in enumerate(scales)]
    total = values[0] * weights[0]
    for value, weight in zip(values[1:], weights[1:], strict=True):
        total = total + value * weight
    return total, torch.stack(values)


_backward_twice = False


@contextlib.contextmanager
def backpropagated_twice():
    """The fused losses built inside may be backpropagated more than once (retain_graph=True, e.g. a term's
    own gradient before the total's): their backward scales copies of the stored gradients, not the stored
    buffers themselves."""
    global _backward_twice
    previous, _backward_twice = _backward_twice, True
    try:
        yield
    finally:
        _backward_twice = previous


class _FusedLinearLoss(torch.autograd.Function):
    """(sum_i weight_i * loss_i, [loss_i]), loss_i = scale_i * sum_c value_i(h_c W^T + b), with the gradients
    computed during the forward, chunk by chunk; the second output (the terms' values) has no gradient.

    Forward, per chunk: logits (1 matmul), each term's value and gradient w.r.t. the logits in closed form
    (summed over the terms), then grad_h_c = g W and grad_W += g^T h_c (2 matmuls, in the weight's dtype:
    bf16 tensor cores on a GPU, no fp32 copy of W or of grad_W). Backward only hands over the stored [N, H]
    and [V, H] gradients, scaled in place by the upstream gradient: 3 head matmuls in all whatever the
    number of terms, nothing recomputed, no autograd graph over [chunk, V]. In bf16, grad_W is rounded to
    bf16 once per chunk (as in liger-kernel): larger chunks, fewer roundings.
    """

    @staticmethod
    def forward(ctx, hidden_rows, weight, bias, chunk, chunk_size, index, scales, weights):
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden_rows) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        grad_b = torch.zeros_like(bias) if want_b else None
        sums = torch.zeros(len(scales), dtype=torch.float32, device=hidden_rows.device)
        for start in range(0, hidden_rows.shape[0], chunk_size):
            h = hidden_rows[start : start + chunk_size]
            value, grad = chunk(F.linear(h, weight, bias), index[start : start + chunk_size], True)
            sums += value
            grad = grad.to(weight.dtype)
            if want_h:
                torch.mm(grad, weight, out=grad_h[start : start + chunk_size])
            if want_w:
                grad_w.addmm_(grad.t(), h)
            if want_b:
                grad_b += grad.sum(0)
            del grad
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.scale_in_place = not _backward_twice
        total, values = _weighted(sums, scales, weights)
        ctx.mark_non_differentiable(values)
        return total, values

    @staticmethod
    def backward(ctx, grad_out, _):
        # Scaled whatever the upstream gradient: testing it for 1 would make the host wait for the device.
        # In place when this is the only backward through the loss (the buffers are its own, and autograd has
        # released them from ctx by now, so the weight's .grad takes this buffer without another copy); a
        # second backward through the same graph then fails autograd's version check instead of reading
        # scaled buffers, unless the loss was built under backpropagated_twice().
        if ctx.scale_in_place:
            grads = [None if g is None else g.mul_(grad_out.to(g.dtype)) for g in ctx.saved_tensors]
        else:
            grads = [None if g is None else g * grad_out.to(g.dtype) for g in ctx.saved_tensors]
        return *grads, None, None, None, None, None


class _LogitsLoss(torch.autograd.Function):
    """(weighted total, values) of one chunk's logits for the recompute path: the forward computes only the
    values; the backward the closed-form gradient from the saved logits (which the surrounding checkpoint
    recomputes)."""

    @staticmethod
    def forward(ctx, logits, rows, chunk, scales, weights):
        ctx.save_for_backward(logits, rows)
        ctx.chunk = chunk
        sums, _ = chunk(logits, rows, False)
        total, values = _weighted(sums, scales, weights)
        ctx.mark_non_differentiable(values)
        return total, values

    @staticmethod
    def backward(ctx, grad_out, _):
        logits, rows = ctx.saved_tensors
        _, grad = ctx.chunk(logits, rows, True)
        return grad.mul_(grad_out).to(logits.dtype), None, None, None, None


def fused_head_terms(
    student: StudentOutput, batch: dict, terms: list[HeadTerm], weights: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i weights_i * loss_i, [loss_i] without gradient) for HeadTerms, loss_i = factor_i * (sum of term
    i's chunk values) / (number of valid positions), with the student's head applied chunk by chunk over the
    valid positions, so only [chunk, V] logits ever exist. All the terms share one pass: per chunk one logits
    matmul, and the sum of their gradients w.r.t. the logits through one pair of backward matmuls. The chunk
    size is the smallest the terms ask for.

    Two paths:
    - eager (head is a plain nn.Linear with a full weight: no ZeRO or ZeRO-1/2): _FusedLinearLoss, gradients
      in the forward, 3 head matmuls, nothing recomputed;
    - recompute (any other head, e.g. ZeRO-3-partitioned or PEFT-wrapped): each chunk runs `student.head(h)`
      as a module inside a non-reentrant checkpoint, so ZeRO-3's hooks gather the weight in the forward and
      again in the backward's recomputation, and the head weight's gradient is accumulated once per backward;
      the chunk's gradient w.r.t. its logits is still the closed form (_LogitsLoss).
    `rows` given to value_and_grad are flat indices into [B*T]; it indexes the teacher with them itself, so no
    gathered copy of the teacher outlives its chunk. A student whose model soft-caps its logits
    (`student.logit_softcap`) has every term see the capped logits, on every path (_softcapped).
    """
    index = valid_positions(batch)
    hidden = student.hidden.reshape(-1, student.hidden.shape[-1])
    count, positions = index.numel(), hidden.shape[0]
    head = student.head
    eager = torch.is_grad_enabled() and _plain_linear_weight(head)
    if count == 0 and eager:
        # Keep the graph connected so every rank's backward touches the same parameters.
        return student.hidden.sum() * 0.0, torch.zeros(len(terms), device=hidden.device)
    # A head called as a module may be ZeRO-3-partitioned: each call gathers its weight, a collective, so
    # every rank must call it as often. The chunks are therefore laid out over the batch's positions (the
    # same on every rank), not over this rank's valid ones (on-policy samples and chat answers differ in
    # number per rank): the last chunks may hold fewer rows or none.
    logit_bytes = hidden.element_size() if all(t.fp32_free for t in terms) and kernels.enabled(hidden) else 4
    chunk_size = min(t.chunk_size or auto_chunk_size(t.vocab, positions, logit_bytes) for t in terms)
    scales = [t.factor / max(count, 1) for t in terms]
    chunk = _chunk_terms(terms, [scale * weight for scale, weight in zip(scales, weights, strict=True)])
    if student.logit_softcap is not None:
        chunk = _softcapped(chunk, student.logit_softcap)
    if not torch.is_grad_enabled():
        sums = 0.0
        for start in range(0, positions, chunk_size):
            rows = index[start : start + chunk_size]
            sums = sums + chunk(head(hidden.index_select(0, rows)), rows, False)[0]
        return _weighted(sums, scales, weights)
    if eager:
        # All positions valid (packed data): the hidden states themselves, no gathered copy.
        rows_h = hidden if count == hidden.shape[0] else hidden.index_select(0, index)
        return _FusedLinearLoss.apply(
            rows_h, head.weight, head.bias, chunk, chunk_size, index, scales, weights
        )

    def run(h, rows):
        return _LogitsLoss.apply(head(h), rows, chunk, scales, weights)

    total = values = None
    for start in range(0, positions, chunk_size):
        rows = index[start : start + chunk_size]
        h = hidden.index_select(0, rows)
        chunk_total, chunk_values = checkpoint(run, h, rows, use_reentrant=False, preserve_rng_state=False)
        total = chunk_total if total is None else total + chunk_total
        values = chunk_values if values is None else values + chunk_values
    return total, values


def fused_head_loss(
    student: StudentOutput, batch: dict, chunk_size: int | None, value_and_grad, factor: float = 1.0
) -> torch.Tensor:
    """factor * (sum of value_and_grad's chunk values) / (number of valid positions): fused_head_terms for one
    term."""
    return fused_head_terms(student, batch, [HeadTerm(value_and_grad, factor, chunk_size)], [1.0])[0]


def autograd_value_and_grad(chunk_fn):
    """value_and_grad from a differentiable chunk_fn(logits, rows) -> scalar, by autograd over the chunk (for
    losses without a closed-form gradient, e.g. sinkhorn)."""

    def value_and_grad(logits, rows, grad_scale):
        if grad_scale is None:
            with torch.no_grad():
                return chunk_fn(logits, rows).float(), None
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_(True)
            value = chunk_fn(leaf, rows).float()
            (grad,) = torch.autograd.grad(value, leaf, torch.full_like(value, grad_scale))
        return value.detach(), grad

    return value_and_grad


# ----------------------------------------------------------------------------------------------------
# The teacher's side, one chunk at a time.


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near both ends."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def teacher_tail(logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(logprobs))) [rows, 1]: a top-k teacher's mass outside its K ids (the bucket), at least
    TAIL_LOGP_FLOOR."""
    rest = log1mexp(torch.logsumexp(logprobs.double(), dim=-1, keepdim=True))
    return rest.clamp_(min=TAIL_LOGP_FLOOR).to(logprobs.dtype)


def sparse_ids(signal: TeacherSignal, rows: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = signal.topk_ids.reshape(-1, signal.topk_ids.shape[-1]).index_select(0, rows).long()
    logprobs = signal.topk_logprobs.reshape(-1, signal.topk_logprobs.shape[-1]).index_select(0, rows).float()
    return ids, logprobs


def check_sparse_ids(signal: TeacherSignal, vocab: int) -> None:
    top = int(signal.topk_ids.max())
    if top >= vocab:
        raise ConfigError(
            f"teacher top-k id {top} is outside the student's vocabulary of {vocab}: different tokenizers? "
            "Use the cross-tokenizer loss `alm`."
        )


def teacher_vocab(signal: TeacherSignal) -> int | None:
    """The width of a full-vocabulary teacher's logits (None for a sparse one)."""
    if signal.logits is not None:
        return signal.logits.shape[-1]
    return signal.head_weight.shape[0] if signal.head_weight is not None else None


@torch.no_grad()
def teacher_logit_rows(signal: TeacherSignal, rows: torch.Tensor) -> torch.Tensor:
    """The teacher's logits at flat positions `rows`, [n, V_t], a fresh tensor (safe to modify in place):
    gathered from full logits, or its LM head applied to its final hidden states at those rows only."""
    if signal.logits is not None:
        return signal.logits.reshape(-1, signal.logits.shape[-1]).index_select(0, rows)
    hidden = signal.final_hidden.reshape(-1, signal.final_hidden.shape[-1]).index_select(0, rows)
    return F.linear(hidden, signal.head_weight, signal.head_bias)


# ----------------------------------------------------------------------------------------------------
# Divergences in closed form. Each takes (log_p teacher, log_q student) [n, M] in fp32 and want_grad, and
# returns (value per row [n], d(sum of values)/d(log_q) [n, M] or None). It may overwrite log_p (always the
# loss's own buffer), never log_q. Buffers are reused in place: each [n, M] temporary counts at the peak.


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) without an [n, M] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b)."""
    out = log_a + math.log(weight_a)
    return torch.logaddexp(out, log_b + math.log1p(-weight_a), out=out)


def fkl_grad(log_p, log_q, want_grad):
    """KL(p || q) = sum p (log p - log q); d/dlog q = -p."""
    p = log_p.exp()
    rows = _rowdot(p, log_p) - _rowdot(p, log_q)
    return rows, (p.neg_() if want_grad else None)


def rkl_grad(log_p, log_q, want_grad):
    """KL(q || p) = sum q (log q - log p); d/dlog q = q (log q - log p + 1)."""
    q = log_q.exp()
    diff = log_p.neg_().add_(log_q)
    rows = _rowdot(q, diff)
    return rows, (diff.add_(1.0).mul_(q) if want_grad else None)


def jsd_grad(beta: float):
    """TRL / GKD convention: beta = 0 is exactly forward KL(p||q), beta = 1 exactly reverse KL(q||p); in
    between beta * KL(p||m) + (1 - beta) * KL(q||m) with m = beta * p + (1 - beta) * q, whose gradient is
    d/dlog q = (1 - beta) q (log q - log m). (The interior tends to 0 at both ends, so the end points are
    special cases, as in TRL's generalized_jsd_loss.)"""
    if beta == 0.0:
        return fkl_grad
    if beta == 1.0:
        return rkl_grad

    def divergence(log_p, log_q, want_grad):
        log_m = log_mix(log_p, log_q, beta)
        p = log_p.exp()
        rows = beta * _rowdot(p, log_p.sub_(log_m))
        del p
        q = log_q.exp()
        q_over_m = log_m.neg_().add_(log_q)
        rows += (1.0 - beta) * _rowdot(q, q_over_m)
        return rows, (q_over_m.mul_(q).mul_(1.0 - beta) if want_grad else None)

    return divergence


def skew_fkl_grad(alpha: float):
    """DistiLLM's alpha-skew KL: KL(p || m), m = alpha p + (1 - alpha) q; d/dlog q = -(1 - alpha) p q / m.
    alpha = 0 is forward KL."""
    if alpha == 0.0:
        return fkl_grad

    def divergence(log_p, log_q, want_grad):
        log_m = log_mix(log_p, log_q, alpha)
        p = log_p.exp()
        rows = _rowdot(p, log_p.sub_(log_m))
        if not want_grad:
            return rows, None
        return rows, log_m.neg_().add_(log_q).exp_().mul_(p).mul_(alpha - 1.0)

    return divergence


def skew_rkl_grad(alpha: float):
    """DistiLLM's alpha-skew reverse KL: KL(q || m), m = alpha q + (1 - alpha) p;
    d/dlog q = q (log q - log m + 1 - alpha q / m). alpha = 0 is reverse KL."""
    if alpha == 0.0:
        return rkl_grad

    def divergence(log_p, log_q, want_grad):
        q = log_q.exp()
        q_over_m = log_mix(log_q, log_p, alpha).neg_().add_(log_q)
        rows = _rowdot(q, q_over_m)
        if not want_grad:
            return rows, None
        ratio = q_over_m.exp().mul_(-alpha)
        return rows, q_over_m.add_(1.0).add_(ratio).mul_(q)

    return divergence


def tvd_grad(log_p, log_q, want_grad):
    """0.5 sum |p - q|; d/dlog q = 0.5 q sign(q - p)."""
    q = log_q.exp()
    diff = log_p.exp_().neg_().add_(q)
    rows = 0.5 * diff.abs().sum(-1)
    return rows, (diff.sign_().mul_(q).mul_(0.5) if want_grad else None)


def jsd_rows(log_p, log_q, beta: float):
    """Generalized JSD per row (see jsd_grad)."""
    return jsd_grad(beta)(log_p.clone(), log_q, False)[0]


def softmax_backward(g: torch.Tensor, log_q: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """scale * (g - q * sum(g)), q = exp(log_q): the gradient w.r.t. z of a function of log_q = log_softmax(z)
    whose gradient w.r.t. log_q is g, written in `dtype` (the logits' own) in the same pass; overwrites
    log_q."""
    q = log_q.exp_().mul_(g.sum(-1, keepdim=True).mul_(-scale))
    if dtype == q.dtype:
        return q.add_(g, alpha=scale)
    return torch.add(q, g, alpha=scale, out=torch.empty(q.shape, dtype=dtype, device=q.device))


# ----------------------------------------------------------------------------------------------------
# value_and_grad of a divergence between the student's chunk and the teacher on a common support.


def dense_divergence(signal: TeacherSignal, temperature: float, divergence, kernel: tuple | None = None):
    """A full-vocabulary teacher (logits, or final hidden states + LM head): both sides' log-probabilities
    over the shared vocabulary, the teacher's clamped at LOGP_FLOOR. d/dz of log_softmax(z) maps a gradient g
    w.r.t. log q to g - q * sum(g). `kernel` (kind, beta) names the same divergence in kernels.py, which
    computes it on a GPU without fp32 [chunk, V] buffers."""

    def value_and_grad(logits, rows, grad_scale):
        width, dtype = logits.shape[-1], logits.dtype
        vocab = shared_vocab(width, teacher_vocab(signal))
        with torch.no_grad():
            if kernel is not None and kernels.enabled(logits):
                t = teacher_logit_rows(signal, rows)
                return kernels.divergence(logits, t, vocab, *kernel, temperature, LOGP_FLOOR, grad_scale)
            t = teacher_logit_rows(signal, rows)[:, :vocab].float()
            if temperature != 1.0:
                t.div_(temperature)
            log_p = F.log_softmax(t, dim=-1).clamp_(min=LOGP_FLOOR)
            del t
            z = logits[:, :vocab].float()
            del logits
            if temperature != 1.0:
                z = z / temperature
            log_q = F.log_softmax(z, dim=-1)
            del z
            rows_value, g = divergence(log_p, log_q, grad_scale is not None)
            del log_p
            if grad_scale is None:
                return rows_value.sum(), None
            grad = softmax_backward(g, log_q, grad_scale / temperature, dtype)
            return rows_value.sum(), F.pad(grad, (0, width - vocab)) if width > vocab else grad

    return value_and_grad


def sparse_divergence(signal: TeacherSignal, temperature: float, tail: str, divergence):
    """A top-k teacher, compared per `tail` (module docstring). Gradients w.r.t. the tempered logits z:
    bucket: the student's support is log q_k = z[id_k] - lse(z) and log q_rest = lse(z outside the ids) -
    lse(z) (clamped at LOGP_FLOOR, where it then passes no gradient), so with g = d/dlog q on that support,
    dz_v = g_rest * q_v / q_rest - q_v * sum(g) outside the ids and g_k - q_v * sum(g) at id_k;
    renormalize: log_softmax over z[ids], so dz = g - softmax(z[ids]) * sum(g) at the ids, 0 elsewhere."""

    def value_and_grad(logits, rows, grad_scale):
        width, dtype = logits.shape[-1], logits.dtype
        with torch.no_grad():
            ids, logprobs = sparse_ids(signal, rows, width)
            fused = tail == "bucket" and kernels.enabled(logits)
            if fused:
                # The log-sum-exps over all the vocabulary and outside the ids, in one kernel pass; the
                # gradient's [rows, V] part is one more (scaled_softmax below): no fp32 [rows, V] buffer.
                masked = logits.scatter(1, ids, float("-inf"))
                lse, lse_outside = kernels.log_sum_exps(logits, masked, temperature)
                del masked
                log_top = logits.gather(1, ids).float().div_(temperature).sub_(lse.unsqueeze(1))
                log_rest = (lse_outside - lse).unsqueeze(1).clamp_(min=LOGP_FLOOR)
            elif tail == "bucket":
                z = logits.float()
                del logits
                if temperature != 1.0:
                    z = z / temperature
                log_q_all = F.log_softmax(z, dim=-1)
                del z
                log_top = log_q_all.gather(1, ids)
                outside = log_q_all.scatter_(1, ids, float("-inf"))  # in place: the tail's log q_v
                log_rest = torch.logsumexp(outside, dim=-1, keepdim=True).clamp_(min=LOGP_FLOOR)
            else:
                # Only the ids' logits count: gathered before any [rows, V] copy.
                log_q = F.log_softmax(logits.gather(1, ids).float().div_(temperature), dim=-1)
                del logits
                log_p = F.log_softmax(logprobs / temperature, dim=-1)
            if tail == "bucket":
                log_q = torch.cat([log_top, log_rest], dim=-1)
                log_p = F.log_softmax(
                    torch.cat([logprobs, teacher_tail(logprobs)], dim=-1) / temperature, dim=-1
                )
            rows_value, g = divergence(log_p.clamp_(min=LOGP_FLOOR), log_q, grad_scale is not None)
            if grad_scale is None:
                return rows_value.sum(), None
            g_sum = g.sum(-1, keepdim=True)
            factor = grad_scale / temperature
            if tail == "bucket":
                g_rest = torch.where(log_rest > LOGP_FLOOR, g[:, -1:], 0.0)
                coef = (g_rest - log_rest.exp() * g_sum) * factor
                # q_v / q_rest outside the ids (the ids' columns are overwritten below), times coef.
                if fused:
                    shift = lse + log_rest[:, 0]  # the log normaliser of q_v / q_rest
                    grad = kernels.scaled_softmax(logits, shift, coef[:, 0], temperature)
                else:
                    grad = outside.sub_(log_rest).exp_().mul_(coef)
                top = g[:, :-1] - log_top.exp() * g_sum
            else:
                grad = torch.zeros(ids.shape[0], width, dtype=dtype, device=ids.device)
                top = g - log_q.exp() * g_sum
            return rows_value.sum(), grad.scatter_(1, ids, (top * factor).to(grad.dtype)).to(dtype)

    return value_and_grad


def _divergence_term(
    student, signal, temperature, tail, chunk_size, divergence, name, kernel=None
) -> HeadTerm:
    if signal is None:
        raise ConfigError(f"loss {name} needs a teacher signal")
    if signal.is_sparse:
        width = _head_width(student)
        if width is not None:
            check_sparse_ids(signal, width)
        value_and_grad = sparse_divergence(signal, temperature, tail, divergence)
    else:
        value_and_grad = dense_divergence(signal, temperature, divergence, kernel)
    # Every top-k form is free of fp32 [rows, V] buffers with the kernels on; a full teacher where its
    # divergence has a kernel.
    fp32_free = signal.is_sparse or kernel is not None
    return HeadTerm(value_and_grad, temperature**2, chunk_size, head_vocab(student, signal), fp32_free)


@register("fkl", needs={"teacher"})
@head_loss
def forward_kl(
    student,
    signal,
    batch,
    temperature: Temperature = 1.0,
    tail: Tail = "bucket",
    chunk_size: ChunkSize = None,
):
    """Forward KL(teacher || student): mode-covering; the classic distillation loss."""
    return _divergence_term(student, signal, temperature, tail, chunk_size, fkl_grad, "fkl", ("fkl", 0.0))


@register("rkl", needs={"teacher"})
@head_loss
def reverse_kl(
    student,
    signal,
    batch,
    temperature: Temperature = 1.0,
    tail: Tail = "bucket",
    chunk_size: ChunkSize = None,
):
    """Reverse KL(student || teacher): mode-seeking (MiniLLM)."""
    return _divergence_term(student, signal, temperature, tail, chunk_size, rkl_grad, "rkl", ("rkl", 1.0))


@register("jsd", needs={"teacher"})
@head_loss
def generalized_jsd(
    student,
    signal,
    batch,
    beta: Annotated[float, Field(ge=0, le=1)] = 0.5,
    temperature: Temperature = 1.0,
    tail: Tail = "bucket",
    chunk_size: ChunkSize = None,
):
    """Generalized JSD(beta) in the TRL/GKD convention: beta=0 -> forward KL, beta=1 -> reverse KL."""
    kernel = {0.0: ("fkl", 0.0), 1.0: ("rkl", 1.0)}.get(beta, ("jsd", beta))
    return _divergence_term(student, signal, temperature, tail, chunk_size, jsd_grad(beta), "jsd", kernel)


@register("skew_fkl", needs={"teacher"})
@head_loss
def skew_forward_kl(
    student,
    signal,
    batch,
    alpha: Annotated[float, Field(ge=0, lt=1)] = 0.1,
    temperature: Temperature = 1.0,
    tail: Tail = "bucket",
    chunk_size: ChunkSize = None,
):
    """DistiLLM skew KL: KL(p || alpha p + (1 - alpha) q)."""
    return _divergence_term(
        student,
        signal,
        temperature,
        tail,
        chunk_size,
        skew_fkl_grad(alpha),
        "skew_fkl",
    )


@register("skew_rkl", needs={"teacher"})
@head_loss
def skew_reverse_kl(
    student,
    signal,
    batch,
    alpha: Annotated[float, Field(ge=0, lt=1)] = 0.1,
    temperature: Temperature = 1.0,
    tail: Tail = "bucket",
    chunk_size: ChunkSize = None,
):
    """DistiLLM skew reverse KL: KL(q || alpha q + (1 - alpha) p)."""
    return _divergence_term(
        student,
        signal,
        temperature,
        tail,
        chunk_size,
        skew_rkl_grad(alpha),
        "skew_rkl",
    )


@register("tvd", needs={"teacher"})
@head_loss
def total_variation(
    student,
    signal,
    batch,
    temperature: Temperature = 1.0,
    tail: Tail = "bucket",
    chunk_size: ChunkSize = None,
):
    """Total variation distance 0.5 * sum |p - q|, in [0, 1] (times T^2)."""
    return _divergence_term(student, signal, temperature, tail, chunk_size, tvd_grad, "tvd")


@register("ce")
@head_loss
def cross_entropy(
    student: StudentOutput,
    signal: TeacherSignal | None,
    batch: dict,
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    chunk_size: ChunkSize = None,
):
    """Next-token cross-entropy on the data's targets (already shifted; -100 positions are skipped)."""
    # The mean over targets is folded into the gradients in the forward (factor 1): no rescaling after.
    value_and_grad = _nll_value_and_grad(batch, label_smoothing)
    return HeadTerm(value_and_grad, 1.0, chunk_size, _head_width(student), fp32_free=True)


def summed_nll(
    student: StudentOutput, batch: dict, label_smoothing: float = 0.0, chunk_size: int | None = None
) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood of the batch's targets and the number of target tokens.

    The one held-out NLL: the `ce` loss's value, the trainer's held-out evaluation (student and teacher) and
    derivation's calibration and candidate losses; the head runs chunk by chunk (fused_head_loss).
    """
    count = valid_positions(batch).numel()
    value_and_grad = _nll_value_and_grad(batch, label_smoothing)
    term = HeadTerm(value_and_grad, float(count), chunk_size, _head_width(student), fp32_free=True)
    return fused_head_terms(student, batch, [term], [1.0])[0], count


def _nll_value_and_grad(batch: dict, label_smoothing: float):
    targets = batch["targets"].reshape(-1)

    def value_and_grad(logits, rows, grad_scale):
        # The sum of (1 - e) * -log q[y] + e * mean_v(-log q_v), as F.cross_entropy with label smoothing e;
        # its gradient is d/dz = q - (1 - e) onehot(y) - e / V.
        with torch.no_grad():
            if kernels.enabled(logits):
                y = targets.index_select(0, rows)
                return kernels.cross_entropy(logits, y, label_smoothing, grad_scale)
            y = targets.index_select(0, rows).unsqueeze(1)
            dtype = logits.dtype
            log_q = F.log_softmax(logits.float(), dim=-1)
            del logits
            value = -log_q.gather(1, y).sum()
            if label_smoothing:
                value = (1.0 - label_smoothing) * value - label_smoothing * log_q.mean(-1).sum()
            if grad_scale is None:
                return value, None
            grad = log_q.exp_()
            grad.scatter_add_(1, y, torch.full(y.shape, label_smoothing - 1.0, device=y.device))
            if label_smoothing:
                grad.sub_(label_smoothing / grad.shape[-1])
            return value, (grad.mul_(grad_scale) if grad_scale != 1.0 else grad).to(dtype)

    return value_and_grad
