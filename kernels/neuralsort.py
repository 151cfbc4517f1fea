"""Triton kernels for NeuralSort (installed as ``triton_sort.kernels.neuralsort``).

Row ``i`` of the relaxed permutation matrix is a softmax over columns ``j`` of base-2 logits
``c_i * s2_j - b2_j`` where ``s2 = (s - median) * log2(e) / tau`` and ``b2 = b * log2(e) / tau`` are prepared in
float64 and rounded once to fp32 (``triton_sort._columns``) and ``c_i = sign * (n - 1 - 2 i)`` is computed in the
kernel. This is attention with a scalar query ``c_i``, a scalar key ``s2_j`` and a per-column bias ``b2_j``, so the
kernels follow Triton's fused-attention tutorial: online softmax in base 2, only the row log-sum-exp is stored, and
the backward pass recomputes tiles and uses ``Delta_i = g_i . y_i`` (FlashAttention-2).

All offsets that can exceed 2^31 (``B * n * n`` of the matrix, ``B * n * d`` of the values) are int64.
Accumulation is always fp32; values of fp16/bf16 are upcast on load (the interpreter's bf16 ``tl.dot`` is wrong,
and fp32 ``tl.dot`` with ``input_precision="tf32x3"`` keeps fp32 accuracy on tensor cores).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _logits_tile(c, s2, b2):
    """Base-2 logits of a (BLOCK_M, BLOCK_N) tile from row coefficients c and column keys/biases s2, b2."""
    return c[:, None] * s2[None, :] - b2[None, :]


@triton.jit
def _row_coefficients(rows, n, sign):
    """c_i = sign * (n - 1 - 2 i), exact in fp32 for n < 2^24."""
    return sign * (n - 1 - 2 * rows).to(tl.float32)


@triton.jit
def _online_softmax_step(m_i, l_i, qk):
    """One column tile of the online softmax: returns the new running max, rescale factor, tile weights and sum."""
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_new = l_i * alpha + tl.sum(p, axis=1)
    return m_new, alpha, p, l_new


@triton.jit
def _tile_matmul(p, x, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) @ (BLOCK_N, BLOCK_D) in fp32; d = 1 is a row reduction, wider d uses tensor cores."""
    if BLOCK_D == 1:
        return tl.sum(p * tl.sum(x, axis=1)[None, :], axis=1)[:, None]
    else:
        return tl.dot(p, x, input_precision=DOT_PRECISION)


@triton.jit
def matrix_forward_kernel(
    S2, B2, P, n, sign,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """P[b, i, j] = softmax_j(c_i s2_j - b2_j) for one (row block, batch) program. S2, B2: (B, n); P: (B, n, n)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n
    c = _row_coefficients(rows, n, sign)
    S2 += pid_b * n
    B2 += pid_b * n
    P += pid_b * n * n

    # Pass 1: row max and sum of the block-wise softmax.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < n
        s2 = tl.load(S2 + cols, mask=col_mask, other=0.0)
        b2 = tl.load(B2 + cols, mask=col_mask, other=0.0)
        qk = tl.where(col_mask[None, :], _logits_tile(c, s2, b2), float("-inf"))
        m_i, _, _, l_i = _online_softmax_step(m_i, l_i, qk)
    lse = m_i + tl.math.log2(l_i)

    # Pass 2: normalised tiles.
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < n
        s2 = tl.load(S2 + cols, mask=col_mask, other=0.0)
        b2 = tl.load(B2 + cols, mask=col_mask, other=0.0)
        qk = tl.where(col_mask[None, :], _logits_tile(c, s2, b2), float("-inf"))
        p = tl.math.exp2(qk - lse[:, None])
        offsets = rows[:, None] * n + cols[None, :]
        tl.store(P + offsets, p.to(P.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def apply_forward_kernel(
    S2, B2, X, OUT, LSE, n, d, sign,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """OUT[b, i, :] = sum_j P_ij X[b, j, :] streaming over column tiles; LSE[b, i] = base-2 row log-sum-exp.

    Grid (row blocks, B, d chunks). S2, B2, LSE: (B, n) fp32; X, OUT: (B, n, d).
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n
    dims = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_mask = dims < d
    c = _row_coefficients(rows, n, sign)
    S2 += pid_b * n
    B2 += pid_b * n
    X += pid_b * n * d
    OUT += pid_b * n * d

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_mask = cols < n
        s2 = tl.load(S2 + cols, mask=col_mask, other=0.0)
        b2 = tl.load(B2 + cols, mask=col_mask, other=0.0)
        qk = tl.where(col_mask[None, :], _logits_tile(c, s2, b2), float("-inf"))
        m_i, alpha, p, l_i = _online_softmax_step(m_i, l_i, qk)
        x = tl.load(X + cols[:, None] * d + dims[None, :], mask=col_mask[:, None] & dim_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + _tile_matmul(p, x.to(tl.float32), BLOCK_D, DOT_PRECISION)

    acc = acc / l_i[:, None]
    tl.store(OUT + rows[:, None] * d + dims[None, :], acc.to(OUT.dtype.element_ty),
             mask=row_mask[:, None] & dim_mask[None, :])
    if pid_d == 0:
        tl.store(LSE + pid_b * n + rows, m_i + tl.math.log2(l_i), mask=row_mask)


@triton.jit
def apply_backward_kernel(
    S2, B2, CNT, X, G, LSE, DELTA, DX, U, R, n, d, sign,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SINGLE_D_CHUNK: tl.constexpr,
):
    """Column pass of the backward (as dK/dV in FlashAttention-2), one program per (column block, B, d chunk).

    With dz_ij = P_ij (g_i . x_j - Delta_i) it accumulates over all rows i:
    DX[b, j, :] = sum_i P_ij g_i,  U[b, j] = sum_i (c_i - cnt_j) dz_ij,  R[b, j] = sum_i dz_ij.
    (c_i - cnt_j is small near row i's peak, which avoids the cancellation of sum_i c_i dz_ij - cnt_j r_j.)
    CNT, LSE, DELTA, U, R: (B, n) fp32; X, G, DX: (B, n, d).
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n
    own_dims = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    own_dim_mask = own_dims < d
    S2 += pid_b * n
    B2 += pid_b * n
    CNT += pid_b * n
    LSE += pid_b * n
    DELTA += pid_b * n
    X += pid_b * n * d
    G += pid_b * n * d
    DX += pid_b * n * d

    s2 = tl.load(S2 + cols, mask=col_mask, other=0.0)
    b2 = tl.load(B2 + cols, mask=col_mask, other=0.0)
    cnt = tl.load(CNT + cols, mask=col_mask, other=0.0)
    x_own = tl.load(X + cols[:, None] * d + own_dims[None, :],
                    mask=col_mask[:, None] & own_dim_mask[None, :], other=0.0).to(tl.float32)

    dx_acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    u_acc = tl.zeros([BLOCK_N], tl.float32)
    r_acc = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, n, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = rows < n
        c = _row_coefficients(rows, n, sign)
        lse = tl.load(LSE + rows, mask=row_mask, other=float("inf"))
        delta = tl.load(DELTA + rows, mask=row_mask, other=0.0)
        # Masked rows have lse = +inf and masked columns logit -inf: both give exactly 0 without overflow.
        qk = tl.where(col_mask[None, :], _logits_tile(c, s2, b2), float("-inf"))
        p = tl.math.exp2(qk - lse[:, None])
        g_own = tl.load(G + rows[:, None] * d + own_dims[None, :],
                        mask=row_mask[:, None] & own_dim_mask[None, :], other=0.0).to(tl.float32)
        # gx_ij = g_i . x_j over all of d (the other chunks are reloaded only when d spans several programs).
        if SINGLE_D_CHUNK:
            if BLOCK_D == 1:
                gx = tl.sum(g_own, axis=1)[:, None] * tl.sum(x_own, axis=1)[None, :]
            else:
                gx = tl.dot(g_own, tl.trans(x_own), input_precision=DOT_PRECISION)
        else:
            gx = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for d0 in range(0, d, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                dim_mask = dims < d
                g = tl.load(G + rows[:, None] * d + dims[None, :],
                            mask=row_mask[:, None] & dim_mask[None, :], other=0.0).to(tl.float32)
                x = tl.load(X + cols[:, None] * d + dims[None, :],
                            mask=col_mask[:, None] & dim_mask[None, :], other=0.0).to(tl.float32)
                gx += tl.dot(g, tl.trans(x), input_precision=DOT_PRECISION)
        dz = p * (gx - delta[:, None])
        u_acc += tl.sum((c[:, None] - cnt[None, :]) * dz, axis=0)
        r_acc += tl.sum(dz, axis=0)
        dx_acc += _tile_matmul(tl.trans(p), g_own, BLOCK_D, DOT_PRECISION)

    tl.store(DX + cols[:, None] * d + own_dims[None, :], dx_acc.to(DX.dtype.element_ty),
             mask=col_mask[:, None] & own_dim_mask[None, :])
    if pid_d == 0:
        tl.store(U + pid_b * n + cols, u_acc, mask=col_mask)
        tl.store(R + pid_b * n + cols, r_acc, mask=col_mask)
