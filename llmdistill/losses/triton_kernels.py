"""The Triton kernels behind kernels.py (which documents them): one program per row of a chunk's logits.

Imported only through kernels._kernels(), so importing the losses never needs Triton.
"""

import triton
import triton.language as tl


@triton.jit
def _tempered_block(s_ptr, t_ptr, start, vocab, inv_temp, other, BLOCK: tl.constexpr):
    """(columns, their mask, student and teacher logits / T in fp32) of the block at `start`; masked
    columns read `other`."""
    cols = start + tl.arange(0, BLOCK)
    mask = cols < vocab
    s = tl.load(s_ptr + cols, mask=mask, other=other).to(tl.float32) * inv_temp
    t = tl.load(t_ptr + cols, mask=mask, other=other).to(tl.float32) * inv_temp
    return cols, mask, s, t


@triton.jit
def _add_block(m, d, x):
    """The running max `m` of a row and sum `d` of exp(value - m), extended by the block `x`: one max and one
    rescale per block, a single exp per element."""
    new = tl.maximum(m, tl.max(x, 0))
    # While all seen is -inf (a masked block), shift by 0: exp(-inf - -inf) would be nan.
    shift = tl.where(new == float("-inf"), 0.0, new)
    return new, d * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)


@triton.jit
def _log_sum_exps(s_ptr, t_ptr, vocab, inv_temp, BLOCK: tl.constexpr):
    m_s = float("-inf")
    d_s = 0.0
    m_t = float("-inf")
    d_t = 0.0
    for start in range(0, vocab, BLOCK):
        _, _, s, t = _tempered_block(s_ptr, t_ptr, start, vocab, inv_temp, float("-inf"), BLOCK)
        m_s, d_s = _add_block(m_s, d_s, s)
        m_t, d_t = _add_block(m_t, d_t, t)
    return m_s + tl.log(d_s), m_t + tl.log(d_t)


@triton.jit
def _row_terms(s, t, lse_s, lse_t, beta, log_beta, log_1m_beta, floor, KIND: tl.constexpr):
    """(value per element, d value / d log q, q) at one block of a row."""
    log_q = s - lse_s
    log_p = tl.maximum(t - lse_t, floor)
    q = tl.exp(log_q)
    if KIND == 0:  # forward KL: p (log p - log q); d/dlog q = -p
        p = tl.exp(log_p)
        value = p * (log_p - log_q)
        grad = -p
    elif KIND == 1:  # reverse KL: q (log q - log p); d/dlog q = q (log q - log p + 1)
        value = q * (log_q - log_p)
        grad = value + q
    else:  # generalized JSD, m = beta p + (1 - beta) q
        a = log_p + log_beta
        b = log_q + log_1m_beta
        top = tl.maximum(a, b)
        log_m = top + tl.log(tl.exp(a - top) + tl.exp(b - top))
        p = tl.exp(log_p)
        q_term = q * (log_q - log_m)
        value = beta * p * (log_p - log_m) + (1.0 - beta) * q_term
        grad = (1.0 - beta) * q_term
    return value, grad, q


@triton.jit
def divergence_rows(
    s_ptr,
    s_stride,
    t_ptr,
    t_stride,
    g_ptr,
    g_stride,
    value_ptr,
    vocab,
    width,
    inv_temp,
    beta,
    log_beta,
    log_1m_beta,
    floor,
    grad_scale,
    KIND: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_ptr += row * s_stride
    t_ptr += row * t_stride
    lse_s, lse_t = _log_sum_exps(s_ptr, t_ptr, vocab, inv_temp, BLOCK)
    value_acc = tl.zeros([BLOCK], dtype=tl.float32)
    grad_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, vocab, BLOCK):
        _, mask, s, t = _tempered_block(s_ptr, t_ptr, start, vocab, inv_temp, 0.0, BLOCK)
        value, grad, _ = _row_terms(s, t, lse_s, lse_t, beta, log_beta, log_1m_beta, floor, KIND)
        value_acc += tl.where(mask, value, 0.0)
        grad_acc += tl.where(mask, grad, 0.0)
    tl.store(value_ptr + row, tl.sum(value_acc, 0))
    if WANT_GRAD:
        grad_sum = tl.sum(grad_acc, 0)
        g_ptr += row * g_stride
        scale = grad_scale * inv_temp
        for start in range(0, vocab, BLOCK):
            cols, mask, s, t = _tempered_block(s_ptr, t_ptr, start, vocab, inv_temp, 0.0, BLOCK)
            _, grad, q = _row_terms(s, t, lse_s, lse_t, beta, log_beta, log_1m_beta, floor, KIND)
            out = (grad - q * grad_sum) * scale
            tl.store(g_ptr + cols, out.to(g_ptr.dtype.element_ty), mask=mask)
        # Student columns past the shared vocabulary (a padded head) get no gradient.
        for start in range(vocab, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            zeros = tl.zeros([BLOCK], dtype=tl.float32)
            tl.store(g_ptr + cols, zeros.to(g_ptr.dtype.element_ty), mask=cols < width)


@triton.jit
def cross_entropy_rows(
    z_ptr,
    z_stride,
    y_ptr,
    g_ptr,
    g_stride,
    value_ptr,
    width,
    smoothing,
    grad_scale,
    WANT_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_ptr += row * z_stride
    m = float("-inf")
    d = 0.0
    total = 0.0
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < width
        z = tl.load(z_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m, d = _add_block(m, d, z)
        total += tl.sum(tl.where(mask, z, 0.0), 0)
    lse = m + tl.log(d)
    y = tl.load(y_ptr + row)
    # A target outside the vocabulary reads no memory: its loss is nan, which the trainer reports as a
    # non-finite `ce` (the torch path would stop the device with an assert).
    z_y = tl.load(z_ptr + y, mask=(y >= 0) & (y < width), other=float("nan")).to(tl.float32)
    # (1 - e) * -log q[y] + e * mean_v(-log q_v), as F.cross_entropy with label smoothing e.
    value = (1.0 - smoothing) * (lse - z_y) + smoothing * (lse - total / width)
    tl.store(value_ptr + row, value)
    if WANT_GRAD:
        g_ptr += row * g_stride
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < width
            z = tl.load(z_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(z - lse) - smoothing / width - tl.where(cols == y, 1.0 - smoothing, 0.0)
            tl.store(g_ptr + cols, (grad * grad_scale).to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def log_sum_exp_rows(
    a_ptr, a_stride, b_ptr, b_stride, lse_a_ptr, lse_b_ptr, width, inv_temp, BLOCK: tl.constexpr
):
    """The log-sum-exps of a row of `a` / T and of the same row of `b` / T."""
    row = tl.program_id(0).to(tl.int64)
    lse_a, lse_b = _log_sum_exps(a_ptr + row * a_stride, b_ptr + row * b_stride, width, inv_temp, BLOCK)
    tl.store(lse_a_ptr + row, lse_a)
    tl.store(lse_b_ptr + row, lse_b)


@triton.jit
def scaled_softmax_rows(
    z_ptr, z_stride, g_ptr, g_stride, shift_ptr, coef_ptr, width, inv_temp, BLOCK: tl.constexpr
):
    """g = exp(z / T - shift) * coef, with a shift and a coefficient per row."""
    row = tl.program_id(0).to(tl.int64)
    z_ptr += row * z_stride
    g_ptr += row * g_stride
    shift = tl.load(shift_ptr + row)
    coef = tl.load(coef_ptr + row)
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < width
        z = tl.load(z_ptr + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
        tl.store(g_ptr + cols, (tl.exp(z - shift) * coef).to(g_ptr.dtype.element_ty), mask=mask)
