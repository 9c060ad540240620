"""Token-level losses over the vocabulary, fused with the LM head and computed chunk by chunk.

How the memory stays small (the Liger idea, kept compatible with ZeRO-3):
the student's logits only ever exist for `chunk_size` valid positions at a time. Each chunk runs
`student.head(hidden_chunk)` and the divergence inside `torch.utils.checkpoint(..., use_reentrant=False)`, so
the forward keeps nothing of the chunk but its [chunk, H] hidden rows, and the backward recomputes the chunk's
logits just before differentiating them. Peak extra memory is therefore a few [chunk, V] fp32 buffers (forward
or backward), never [B*T, V].

ZeRO-3: the head is always called as the module (`student.head(...)`), never through its `.weight`, so
DeepSpeed's module hooks gather the partitioned weight both in the forward and in the recomputation during the
backward (the same path as activation checkpointing in HF models). The non-reentrant checkpoint keeps one
autograd graph, so the head weight's gradient is accumulated once per backward (ZeRO-2/3 reduce hooks fire
once), unlike a per-chunk `torch.autograd.backward`. Cost: one extra [chunk, H] x [H, V] matmul per chunk (4
head matmuls instead of 3).

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

import logging
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llmdistill.config import ConfigError
from llmdistill.losses.registry import register
from llmdistill.signal import IGNORE_INDEX, StudentOutput, TeacherSignal

log = logging.getLogger(__name__)

# Teacher log-probabilities are clamped here: exp() of it is exactly 0 in fp32, yet p * (log p - log q) stays
# finite (0) where a probability is zero, and a reverse KL against a zero teacher probability is large but not
# inf.
LOGP_FLOOR = -1e4
# Auto chunk size: this many logits ([chunk, V] fp32 = 128 MiB) per chunk.
CHUNK_ELEMENTS = 1 << 25
TAIL_MODES = ("bucket", "renormalize")
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


def check_tail(tail: str) -> None:
    if tail not in TAIL_MODES:
        raise ConfigError(f"tail must be one of {TAIL_MODES}, got {tail!r}")


def _head_width(student: StudentOutput) -> int | None:
    width = getattr(student.head, "out_features", None)
    if width is None:
        weight = getattr(student.head, "weight", None)
        shape = getattr(weight, "ds_shape", None) or getattr(
            weight, "shape", None
        )  # ZeRO-3 keeps the real shape
        width = shape[0] if shape is not None and len(shape) == 2 else None
    return width


def auto_chunk_size(
    student: StudentOutput, signal: TeacherSignal | None, chunk_size: int | None, batch: dict
) -> int:
    """chunk_size, or: about CHUNK_ELEMENTS logits per chunk and at most 1/16 of the valid positions (so the
    chunked peak stays well under the full [N, V]), never under 16 rows."""
    if chunk_size is not None:
        if chunk_size <= 0:
            raise ConfigError(f"chunk_size must be positive, got {chunk_size}")
        return chunk_size
    vocab = (
        signal.logits.shape[-1] if signal is not None and signal.logits is not None else _head_width(student)
    )
    positions = int((batch["targets"] != IGNORE_INDEX).sum())
    return max(16, min(CHUNK_ELEMENTS // (vocab or 32768), -(-positions // 16)))


def _plain_linear_weight(head) -> bool:
    """True when the head is an nn.Linear whose weight is an ordinary full tensor (not ZeRO-3 partitioned)."""
    if not isinstance(head, torch.nn.Linear):
        return False
    weight = head.weight
    return not hasattr(weight, "ds_id") and weight.shape == (head.out_features, head.in_features)


class _EagerFusedLinearLoss(torch.autograd.Function):
    """sum_c chunk_fn(h_c W^T + b) with the gradients computed during the forward, chunk by chunk
    (Liger-style).

    Forward, per chunk: logits (1 matmul), the loss and its gradient w.r.t. the chunk's logits (local autograd
    on a [chunk, V] leaf), then grad_h_c = g W and grad_W += g^T h_c (2 matmuls). Backward only scales the
    stored [N, H] and [V, H] gradients by the incoming scalar: 3 head matmuls in all, like the naive version.
    """

    @staticmethod
    def forward(ctx, hidden_rows, weight, bias, chunk_fn, chunk_size, index):
        grad_dtype = torch.float32
        grad_h = torch.empty(hidden_rows.shape, dtype=hidden_rows.dtype, device=hidden_rows.device)
        grad_w = torch.zeros(weight.shape, dtype=grad_dtype, device=weight.device)
        grad_b = torch.zeros(bias.shape, dtype=grad_dtype, device=bias.device) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden_rows.device)
        for start in range(0, hidden_rows.shape[0], chunk_size):
            h = hidden_rows[start : start + chunk_size]
            with torch.enable_grad():
                logits = F.linear(h, weight, bias).detach().requires_grad_(True)
                value = chunk_fn(logits, index[start : start + chunk_size])
                (grad_logits,) = torch.autograd.grad(value, logits)
            total += value.detach().float()
            grad_logits = grad_logits.to(weight.dtype)
            grad_h[start : start + chunk_size] = grad_logits @ weight
            grad_w.addmm_(grad_logits.t().to(grad_dtype), h.to(grad_dtype))
            if grad_b is not None:
                grad_b += grad_logits.sum(0).to(grad_dtype)
            del logits, grad_logits
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype), grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if torch.equal(grad_out, torch.ones_like(grad_out)):
            # Hand the stored gradients over as they are: no extra [V, H] copy at the peak.
            return grad_h, grad_w, grad_b, None, None, None
        scale = grad_out.to(grad_h.dtype)
        return (
            grad_h * scale,
            grad_w * scale,
            grad_b * scale if grad_b is not None else None,
            None,
            None,
            None,
        )


def fused_head_sum(
    student: StudentOutput, batch: dict, chunk_size: int, chunk_fn
) -> tuple[torch.Tensor, int]:
    """sum over chunks of chunk_fn(student.head(hidden[rows]), rows); returns (sum, number of valid
    positions).

    `rows` are flat indices into [B*T]; chunk_fn indexes the teacher with them itself, so no gathered copy of
    the teacher outlives its chunk. Two ways to keep only [chunk, V] logits alive:
    - eager (head is a plain nn.Linear with a full weight: no ZeRO or ZeRO-1/2): gradients are computed in the
      forward, chunk by chunk (_EagerFusedLinearLoss), 3 head matmuls, nothing recomputed;
    - recompute (any other head, e.g. ZeRO-3-partitioned or PEFT-wrapped): each chunk runs `student.head(h)`
      as a module inside a non-reentrant checkpoint, so ZeRO-3's hooks gather the weight in the forward and
      again in the backward's recomputation, and the head weight's gradient is accumulated once per backward.
    """
    index = valid_positions(batch)
    hidden = student.hidden.reshape(-1, student.hidden.shape[-1])
    if index.numel() == 0:
        # Keep the graph connected so every rank's backward touches the same parameters.
        return student.hidden.sum() * 0.0, 0
    needs_grad = torch.is_grad_enabled()
    head = student.head
    if needs_grad and _plain_linear_weight(head):
        rows = hidden.index_select(0, index)
        total = _EagerFusedLinearLoss.apply(rows, head.weight, head.bias, chunk_fn, chunk_size, index)
        return total, index.numel()

    def run(h, rows):
        return chunk_fn(head(h), rows)

    total = None
    for start in range(0, index.numel(), chunk_size):
        rows = index[start : start + chunk_size]
        h = hidden.index_select(0, rows)
        if needs_grad:
            value = checkpoint(run, h, rows, use_reentrant=False, preserve_rng_state=False)
        else:
            value = run(h, rows)
        total = value if total is None else total + value
    return total, index.numel()


# ----------------------------------------------------------------------------------------------------
# Teacher and student log-probabilities on a shared support, one chunk at a time.


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near both ends."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


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


def pair_log_probs(
    student_logits: torch.Tensor, signal: TeacherSignal, rows: torch.Tensor, temperature: float, tail: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_teacher, log q_student) on a common support, [rows, M], fp32; the teacher's clamped at
    LOGP_FLOOR.

    Written for a small peak: the teacher side is built without autograd and in place, and the student's
    logits are divided by T only when T != 1 (each [rows, V] temporary counts at the chunk's peak).
    """
    s = student_logits.float()
    if not signal.is_sparse:
        t_all = signal.logits.reshape(-1, signal.logits.shape[-1])
        vocab = shared_vocab(s.shape[-1], t_all.shape[-1])
        z = s[:, :vocab] if temperature == 1.0 else s[:, :vocab] / temperature
        log_q = F.log_softmax(z, dim=-1)
        with torch.no_grad():
            t = t_all.index_select(0, rows)[:, :vocab].float()  # a fresh copy: safe to modify in place
            if temperature != 1.0:
                t.div_(temperature)
            log_p = F.log_softmax(t, dim=-1).clamp_(min=LOGP_FLOOR)
        return log_p, log_q
    ids, logprobs = sparse_ids(signal, rows, s.shape[-1])
    z = s if temperature == 1.0 else s / temperature
    if tail == "bucket":
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        rest = torch.logsumexp(z.scatter(1, ids, float("-inf")), dim=-1, keepdim=True)
        # The student's rest is -inf only if its top-k hold all the mass: floor it like the teacher's.
        log_q = torch.cat([z.gather(1, ids), rest.clamp(min=LOGP_FLOOR)], dim=-1) - lse
        teacher_rest = log1mexp(torch.logsumexp(logprobs, dim=-1, keepdim=True))
        log_p = F.log_softmax(torch.cat([logprobs, teacher_rest], dim=-1) / temperature, dim=-1)
    else:
        log_q = F.log_softmax(z.gather(1, ids), dim=-1)
        log_p = F.log_softmax(logprobs / temperature, dim=-1)
    return log_p.clamp(min=LOGP_FLOOR), log_q


# ----------------------------------------------------------------------------------------------------
# Divergences between rows of log-probabilities: (log_p teacher, log_q student) -> [rows].


def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b)."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def jsd_rows(log_p, log_q, beta: float):
    # TRL / GKD convention: beta = 0 is exactly forward KL(p||q), beta = 1 exactly reverse KL(q||p); in
    # between beta * KL(p||m) + (1 - beta) * KL(q||m) with m = beta * p + (1 - beta) * q. (The interior tends
    # to 0 at both ends, so the end points are special cases, as in TRL's generalized_jsd_loss.)
    if beta == 0.0:
        return kl(log_p, log_q)
    if beta == 1.0:
        return kl(log_q, log_p)
    log_m = log_mix(log_p, log_q, beta)
    return beta * kl(log_p, log_m) + (1.0 - beta) * kl(log_q, log_m)


def skew_fkl_rows(log_p, log_q, alpha: float):
    # DistiLLM's alpha-skew KL: KL(p || alpha * p + (1 - alpha) * q); alpha = 0 is forward KL.
    return kl(log_p, log_mix(log_p, log_q, alpha)) if alpha > 0 else kl(log_p, log_q)


def skew_rkl_rows(log_p, log_q, alpha: float):
    # DistiLLM's alpha-skew reverse KL: KL(q || alpha * q + (1 - alpha) * p); alpha = 0 is reverse KL.
    return kl(log_q, log_mix(log_q, log_p, alpha)) if alpha > 0 else kl(log_q, log_p)


def tvd_rows(log_p, log_q):
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def _divergence_loss(student, signal, batch, temperature, tail, chunk_size, rows_fn, name):
    if signal is None:
        raise ConfigError(f"loss {name} needs a teacher signal")
    if temperature <= 0:
        raise ConfigError(f"{name}: temperature must be > 0, got {temperature}")
    check_tail(tail)
    if signal.is_sparse:
        width = _head_width(student)
        if width is not None:
            check_sparse_ids(signal, width)

    def chunk_fn(logits, rows):
        log_p, log_q = pair_log_probs(logits, signal, rows, temperature, tail)
        return rows_fn(log_p, log_q).sum()

    total, count = fused_head_sum(
        student, batch, auto_chunk_size(student, signal, chunk_size, batch), chunk_fn
    )
    return total / max(count, 1) * temperature**2, {}


@register("fkl", needs={"teacher"})
def forward_kl(
    student, signal, batch, temperature: float = 1.0, tail: str = "bucket", chunk_size: int | None = None
):
    """Forward KL(teacher || student): mode-covering; the classic distillation loss."""
    return _divergence_loss(student, signal, batch, temperature, tail, chunk_size, kl, "fkl")


@register("rkl", needs={"teacher"})
def reverse_kl(
    student, signal, batch, temperature: float = 1.0, tail: str = "bucket", chunk_size: int | None = None
):
    """Reverse KL(student || teacher): mode-seeking (MiniLLM)."""
    return _divergence_loss(
        student, signal, batch, temperature, tail, chunk_size, lambda lp, lq: kl(lq, lp), "rkl"
    )


@register("jsd", needs={"teacher"})
def generalized_jsd(
    student,
    signal,
    batch,
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: str = "bucket",
    chunk_size: int | None = None,
):
    """Generalized JSD(beta) in the TRL/GKD convention: beta=0 -> forward KL, beta=1 -> reverse KL."""
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"jsd: beta must be in [0, 1], got {beta}")
    return _divergence_loss(
        student, signal, batch, temperature, tail, chunk_size, lambda lp, lq: jsd_rows(lp, lq, beta), "jsd"
    )


@register("skew_fkl", needs={"teacher"})
def skew_forward_kl(
    student,
    signal,
    batch,
    alpha: float = 0.1,
    temperature: float = 1.0,
    tail: str = "bucket",
    chunk_size: int | None = None,
):
    """DistiLLM skew KL: KL(p || alpha p + (1 - alpha) q)."""
    if not 0.0 <= alpha < 1.0:
        raise ConfigError(f"skew_fkl: alpha must be in [0, 1), got {alpha}")
    return _divergence_loss(
        student,
        signal,
        batch,
        temperature,
        tail,
        chunk_size,
        lambda lp, lq: skew_fkl_rows(lp, lq, alpha),
        "skew_fkl",
    )


@register("skew_rkl", needs={"teacher"})
def skew_reverse_kl(
    student,
    signal,
    batch,
    alpha: float = 0.1,
    temperature: float = 1.0,
    tail: str = "bucket",
    chunk_size: int | None = None,
):
    """DistiLLM skew reverse KL: KL(q || alpha q + (1 - alpha) p)."""
    if not 0.0 <= alpha < 1.0:
        raise ConfigError(f"skew_rkl: alpha must be in [0, 1), got {alpha}")
    return _divergence_loss(
        student,
        signal,
        batch,
        temperature,
        tail,
        chunk_size,
        lambda lp, lq: skew_rkl_rows(lp, lq, alpha),
        "skew_rkl",
    )


@register("tvd", needs={"teacher"})
def total_variation(
    student, signal, batch, temperature: float = 1.0, tail: str = "bucket", chunk_size: int | None = None
):
    """Total variation distance 0.5 * sum |p - q|, in [0, 1] (times T^2)."""
    return _divergence_loss(student, signal, batch, temperature, tail, chunk_size, tvd_rows, "tvd")


@register("ce")
def cross_entropy(
    student: StudentOutput,
    signal: TeacherSignal | None,
    batch: dict,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
):
    """Next-token cross-entropy on the data's targets (already shifted; -100 positions are skipped)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"ce: label_smoothing must be in [0, 1), got {label_smoothing}")
    total, count = summed_nll(student, batch, label_smoothing, chunk_size)
    return total / max(count, 1), {}


def summed_nll(
    student: StudentOutput, batch: dict, label_smoothing: float = 0.0, chunk_size: int | None = None
) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood of the batch's targets and the number of target tokens.

    The one held-out NLL: the `ce` loss, the trainer's held-out evaluation (student and teacher) and
    derivation's calibration and candidate losses all use it; the head runs chunk by chunk (fused_head_sum).
    """
    targets = batch["targets"].reshape(-1)

    def chunk_fn(logits, rows):
        return F.cross_entropy(
            logits.float(), targets[rows], reduction="sum", label_smoothing=label_smoothing
        )

    return fused_head_sum(student, batch, auto_chunk_size(student, None, chunk_size, batch), chunk_fn)
