"""Triton kernels for a chunk of the fused head losses on a GPU (fkl, rkl, jsd against a full-vocabulary
teacher, and ce): the value and the gradient w.r.t. the student's logits, read and written in the logits' own
dtype, each row in streaming passes, with no [chunk, V] fp32 buffer. A top-k teacher's bucket form uses two
smaller ones (log_sum_exps, scaled_softmax) for its [chunk, V] work.

The torch path of divergences.py spends ~30 fp32 passes over [chunk, V] per chunk (two log-softmaxes, exps,
products, the softmax backward, the casts); on a GPU those memory-bound passes cost more than the chunk's four
head matmuls (on an H200 the kernels made the loss 1.6-2.5x faster, README "Losses"). Here one program
handles one row:
1. online max and sum of exponentials of both sides (their log-sum-exps);
2. the row's value and the sum of its gradient w.r.t. log q;
3. the gradient w.r.t. the logits, g - q * sum(g), scaled and cast on the store
(cross-entropy needs only the log-sum-exp pass and the gradient's). Only the student's and the teacher's
logits are read (bf16 on a GPU: 4 bytes per position and pass), and the gradient is written once. The formulas
and conventions (temperature, LOGP_FLOOR, the shared vocabulary, the TRL/GKD beta of jsd) are those of
divergences.py, which stays the reference: tests compare the two. `LLMDISTILL_LOSS_KERNELS=torch` in the
environment turns these off (divergences.py then runs its torch path on a GPU too), to compare or to rule them
out.
"""

from __future__ import annotations

import functools
import math
import os

import torch

# The divergences a kernel computes; jsd's beta 0 and 1 are fkl and rkl (divergences.jsd_grad).
KINDS = {"fkl": 0, "rkl": 1, "jsd": 2}
# Columns per step of a row's loop: 16 values per thread with 8 warps (one setting, measured on an H200).
BLOCK = 4096
NUM_WARPS = 8
# They compute in fp32: float64 logits keep the torch path's full precision.
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def enabled(logits: torch.Tensor) -> bool:
    """True when the kernels run for `logits`: a CUDA tensor of a DTYPES dtype, with Triton installed and
    the kernels not turned off."""
    if os.environ.get("LLMDISTILL_LOSS_KERNELS", "triton") == "torch" or logits.dtype not in DTYPES:
        return False
    return (logits.is_cuda or interpreted()) and _kernels() is not None


def interpreted() -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors: how the tests check them
    on a machine without a GPU. It must be set before Triton is first imported (its own functions, tl.max
    and the like, are built interpreted or compiled at import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernels():
    """The Triton kernels (triton_kernels.py), or None without Triton: imported on first use, not with the
    losses, so nothing else needs Triton."""
    try:
        from llmdistill.losses import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def _launch_options() -> dict:
    # The interpreter ignores num_warps; a GPU gets 8 warps for a 4096-wide block (16 values per thread).
    return {} if interpreted() else {"num_warps": NUM_WARPS}


def divergence(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    vocab: int,
    kind: str,
    beta: float,
    temperature: float,
    floor: float,
    grad_scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum over rows of the divergence between softmax(teacher_logits / T) and softmax(logits / T) over the
    first `vocab` columns, grad_scale * its gradient w.r.t. `logits` in their dtype, or None): the value and
    gradient that divergences.dense_divergence computes, for `kind` fkl, rkl or jsd(beta)."""
    rows, width = logits.shape
    logits, teacher_logits = _row_major(logits), _row_major(teacher_logits)
    values = torch.empty(rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits) if grad_scale is not None else None
    if rows:
        # beta's logs only matter for jsd, where 0 < beta < 1.
        log_beta, log_1m_beta = (math.log(beta), math.log1p(-beta)) if kind == "jsd" else (0.0, 0.0)
        _kernels().divergence_rows[(rows,)](
            logits,
            logits.stride(0),
            teacher_logits,
            teacher_logits.stride(0),
            grad if grad is not None else values,
            grad.stride(0) if grad is not None else 0,
            values,
            vocab,
            width,
            1.0 / temperature,
            beta,
            log_beta,
            log_1m_beta,
            floor,
            grad_scale or 0.0,
            KIND=KINDS[kind],
            WANT_GRAD=grad is not None,
            BLOCK=BLOCK,
            **_launch_options(),
        )
    return values.sum(), grad


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, smoothing: float, grad_scale: float | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(summed cross-entropy of the rows' `targets` with label smoothing, grad_scale * its gradient w.r.t.
    `logits` in their dtype, or None): what divergences._nll_value_and_grad computes."""
    rows, width = logits.shape
    logits = _row_major(logits)
    values = torch.empty(rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits) if grad_scale is not None else None
    if rows:
        _kernels().cross_entropy_rows[(rows,)](
            logits,
            logits.stride(0),
            targets.contiguous(),
            grad if grad is not None else values,
            grad.stride(0) if grad is not None else 0,
            values,
            width,
            smoothing,
            grad_scale or 0.0,
            WANT_GRAD=grad is not None,
            BLOCK=BLOCK,
            **_launch_options(),
        )
    return values.sum(), grad


def log_sum_exps(a: torch.Tensor, b: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp(a / T, -1), logsumexp(b / T, -1)) in fp32, of two [rows, V] tensors in one pass."""
    a, b = _row_major(a), _row_major(b)
    rows, width = a.shape
    lse_a = torch.empty(rows, dtype=torch.float32, device=a.device)
    lse_b = torch.empty_like(lse_a)
    if rows:
        _kernels().log_sum_exp_rows[(rows,)](
            a,
            a.stride(0),
            b,
            b.stride(0),
            lse_a,
            lse_b,
            width,
            1.0 / temperature,
            BLOCK=BLOCK,
            **_launch_options(),
        )
    return lse_a, lse_b


def scaled_softmax(logits: torch.Tensor, shift: torch.Tensor, coef: torch.Tensor, temperature: float):
    """exp(logits / T - shift) * coef in the logits' dtype, `shift` and `coef` one fp32 number per row."""
    logits = _row_major(logits)
    rows, width = logits.shape
    out = torch.empty_like(logits)
    if rows:
        shift, coef = shift.float().contiguous(), coef.float().contiguous()
        _kernels().scaled_softmax_rows[(rows,)](
            logits,
            logits.stride(0),
            out,
            out.stride(0),
            shift,
            coef,
            width,
            1.0 / temperature,
            BLOCK=BLOCK,
            **_launch_options(),
        )
    return out


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """Rows may be strided (a slice of wider logits); the elements of a row must be adjacent."""
    return x if x.stride(-1) == 1 else x.contiguous()
