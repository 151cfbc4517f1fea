"""Triton kernels for NeuralSort (installed as ``triton_sort.kernels.neuralsort``).

All kernels work in sorted coordinates (see ``triton_sort/_columns.py``): row ``p`` of ``P_hat`` weighs sorted
column ``m`` by ``exp(-D_p(m) / tau)``, ``D_p(m) = (2p - 1)(t_p - t_m) - 2 (W_p - W_m) >= 0`` with float64 sorted
scores ``t`` and prefix sums ``W``. Its maximum is exactly 1 at ``m = p``, so the softmax needs no running max: the
forward accumulates the row sum ``l_p`` in [1, n] and stores only it, in float64 (not its log); the backward
recomputes tiles from it and from ``Delta_p = sum_m P_pm (g_p . x_m)`` (FlashAttention-2's Delta, recomputed by a
row pass from the same tiles rather than taken from the rounded output ``y``). This is attention with a scalar query
and key in disguise, but the logits are never formed as ``c_p t_m - b_m`` (size ``n |s| / tau``): the drop is
computed in float64 from a tile anchor ``b`` (the tile's first column) as

    D_p(m) = D_p(b) + (2(b - p) + 1) (t_m - t_b) + 2 V_m,   V_m = (W_m - W_b) - b (t_m - t_b),

two float64 operations per element (the per-row and per-column terms are computed once per tile), then rounded to
fp32 for ``exp2``: fp32 results stay exact to float64 precision at any n.

Each row only visits the columns of its window ``[L_p, R_p]`` (``LOWER``/``UPPER``), where ``D_p <= T * tau``; the
rest of a tile is masked. Full windows give the dense evaluation, with the same code.

Offsets that can exceed 2^31 (``B * n * n``, ``B * n * d``) are int64. Tiles are computed in fp32 and accumulated
across tiles in float64 (row sums, outputs, the backward's dz and column sums), which keeps fp32 results within
about 1e-7 of float64 even where sums cancel. fp16/bf16 values are upcast on load (the interpreter's bf16 ``tl.dot``
is wrong), and fp32 ``tl.dot`` uses 3xTF32 for fp32 accuracy.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _column_anchor(t_m, w_m, b, t_b, w_b):
    """Per-column terms of a tile anchored at column b: (t_m - t_b, 2 V_m), float64."""
    offset = t_m - t_b
    return offset, 2.0 * (w_m - w_b) - offset * (2 * b)


@triton.jit
def _drops(rows, t_p, w_p, b, t_b, w_b, offset, twice_v):
    """D_p(m) in float64 (BLOCK_M, BLOCK_N) from the tile's anchor b: two float64 operations per element."""
    drop_at_anchor = (2 * rows - 1).to(tl.float64) * (t_p - t_b) - 2.0 * (w_p - w_b)
    slope = (2 * (b - rows) + 1).to(tl.float64)
    return drop_at_anchor[:, None] + slope[:, None] * offset[None, :] + twice_v[None, :]


@triton.jit
def _scaled_logits(rows, t_p, w_p, b, t_b, w_b, offset, twice_v, inside, scale):
    """-D_p(m) * scale as fp32 (BLOCK_M, BLOCK_N); -inf outside each row's window. scale = log2(e) / tau (float64)."""
    drop = _drops(rows, t_p, w_p, b, t_b, w_b, offset, twice_v)
    return tl.where(inside, (-scale * drop).to(tl.float32), float("-inf"))


@triton.jit
def _tile_matmul(p, x, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) @ (BLOCK_N, BLOCK_D) -> float64. d = 1 is a float64 row reduction (exact enough that the
    backward's Delta = g . y matches its recomputed tiles); wider d uses tensor cores (fp32, 3xTF32 for fp32)."""
    if BLOCK_D == 1:
        return tl.sum(p.to(tl.float64) * tl.sum(x, axis=1).to(tl.float64)[None, :], axis=1)[:, None]
    else:
        return tl.dot(p, x, input_precision=DOT_PRECISION).to(tl.float64)


@triton.jit
def _batch_row(T, W, LOWER, UPPER, pid_b, n):
    """Pointers to one batch row's sorted scores, prefix sums and window bounds."""
    offset = pid_b * n
    return T + offset, W + offset, LOWER + offset, UPPER + offset


@triton.jit
def _row_tile_columns(LOWER, UPPER, pid_m, n, BLOCK_M: tl.constexpr):
    """Columns [start, end) a row tile visits: windows move right with p, so [L of its first row, R of its last]."""
    first_row = pid_m * BLOCK_M
    return tl.load(LOWER + first_row), tl.load(UPPER + tl.minimum(first_row + BLOCK_M - 1, n - 1)) + 1


@triton.jit
def _load_rows(T, W, LOWER, UPPER, rows, n):
    """Row quantities of a row tile (rows past n are clamped to the last row and masked by the caller)."""
    rows_c = tl.minimum(rows, n - 1)
    return rows_c, tl.load(T + rows_c), tl.load(W + rows_c), tl.load(LOWER + rows_c), tl.load(UPPER + rows_c)


@triton.jit
def _tile_weights(T, W, rows, t_p, w_p, lower, upper, start, n, scale, BLOCK_N: tl.constexpr):
    """exp(-D_p(m) / tau) on the column tile that starts at ``start``, 0 outside each row's window.

    Returns the tile's columns, the same clamped to n - 1 (safe to load), the window mask and the weights."""
    cols = start + tl.arange(0, BLOCK_N)
    cols_c = tl.minimum(cols, n - 1)
    t_b = tl.load(T + start)
    w_b = tl.load(W + start)
    offset, twice_v = _column_anchor(tl.load(T + cols_c), tl.load(W + cols_c), start, t_b, w_b)
    inside = (cols[None, :] >= lower[:, None]) & (cols[None, :] <= upper[:, None])
    p = tl.math.exp2(_scaled_logits(rows, t_p, w_p, start, t_b, w_b, offset, twice_v, inside, scale))
    return cols, cols_c, inside, p


@triton.jit
def _g_dot_x(G, X, rows, row_mask, cols, col_mask, g_own, x_own, d,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
             SINGLE_D_CHUNK: tl.constexpr):
    """gx_pm = g_p . x_m (BLOCK_M, BLOCK_N) in float64, over all of d. The row pass (Delta) and the column pass use
    it alike, so g_p . x_m - Delta_p is exact to float64 even where P is nearly a permutation and it is a small
    difference of large terms. fp32 values take a float64 ``tl.dot`` (their products are exact there); fp16/bf16
    values an IEEE fp32 one, whose products are exact too (11 + 11 mantissa bits fit fp32's 24) and whose
    accumulation error is far below 16-bit outputs' rounding: Triton 3.6 cannot lower a float64 dot whose operands
    were loaded as 16-bit ("fp64 don't support largeK MMA").
    g_own, x_own: this program's d chunk (all of d when SINGLE_D_CHUNK); other chunks are reloaded."""
    if SINGLE_D_CHUNK:
        if BLOCK_D == 1:
            gx = tl.sum(g_own, axis=1).to(tl.float64)[:, None] * tl.sum(x_own, axis=1).to(tl.float64)[None, :]
        else:
            gx = _dot_f64(g_own, x_own, X.dtype.element_ty)
    else:
        gx = tl.zeros([BLOCK_M, BLOCK_N], tl.float64)
        for d0 in range(0, d, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_mask = dims < d
            g = tl.load(G + rows.to(tl.int64)[:, None] * d + dims[None, :],
                        mask=row_mask[:, None] & dim_mask[None, :], other=0.0).to(tl.float32)
            x = tl.load(X + cols.to(tl.int64)[:, None] * d + dims[None, :],
                        mask=col_mask[:, None] & dim_mask[None, :], other=0.0).to(tl.float32)
            gx += _dot_f64(g, x, X.dtype.element_ty)
    return gx


@triton.jit
def _dot_f64(g, x, VALUE_DTYPE: tl.constexpr):
    """g @ x^T in float64 for fp32 ``g``, ``x`` that hold VALUE_DTYPE values (see ``_g_dot_x``). G has X's dtype:
    autograd hands the custom op the gradient in its output's dtype, which is x's."""
    if VALUE_DTYPE == tl.float32:
        return tl.dot(g.to(tl.float64), tl.trans(x.to(tl.float64)), input_precision="ieee")
    else:
        return tl.dot(g, tl.trans(x), input_precision="ieee").to(tl.float64)


@triton.jit
def matrix_forward_kernel(
    T, W, LOWER, UPPER, ORDER, OUT_ROW, P, n, SCALE,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Writes the window entries of P[b, OUT_ROW[p], ORDER[m]] = exp(-D_p(m)/tau) / l_p (P is pre-zeroed).

    One program per (row tile, batch). T, W: (B, n) float64; LOWER, UPPER, ORDER: (B, n) int32; OUT_ROW: (n,)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    scale = tl.load(SCALE)  # log2(e) / tau in float64: an fp32 scale would perturb tau by 6e-8
    T, W, LOWER, UPPER = _batch_row(T, W, LOWER, UPPER, pid_b, n)
    ORDER += pid_b * n
    P += pid_b * n * n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n
    rows_c, t_p, w_p, lower, upper = _load_rows(T, W, LOWER, UPPER, rows, n)
    col_start, col_end = _row_tile_columns(LOWER, UPPER, pid_m, n, BLOCK_M)
    norm = tl.zeros([BLOCK_M], tl.float64)
    for start in range(col_start, col_end, BLOCK_N):
        _, _, _, p = _tile_weights(T, W, rows_c, t_p, w_p, lower, upper, start, n, scale, BLOCK_N)
        norm += tl.sum(p.to(tl.float64), axis=1)
    out_rows = tl.load(OUT_ROW + rows_c).to(tl.int64)
    for start in range(col_start, col_end, BLOCK_N):
        _, cols_c, inside, p = _tile_weights(T, W, rows_c, t_p, w_p, lower, upper, start, n, scale, BLOCK_N)
        inside = inside & row_mask[:, None]
        p = p.to(tl.float64) / norm[:, None]
        out_cols = tl.load(ORDER + cols_c).to(tl.int64)
        # float64 -> fp32 first: the interpreter cannot convert float64 to bf16 directly.
        tl.store(P + out_rows[:, None] * n + out_cols[None, :], p.to(tl.float32).to(P.dtype.element_ty),
                 mask=inside)


@triton.jit
def apply_forward_kernel(
    T, W, LOWER, UPPER, X, OUT, NORM, n, d, SCALE,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """OUT[b, p, :] = sum_m P_pm X[b, m, :] over row p's window; NORM[b, p] = l_p in float64. Sorted coordinates.

    Grid (row tiles, B, d chunks). T, W: (B, n) float64; LOWER, UPPER: (B, n) int32; X, OUT: (B, n, d)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    scale = tl.load(SCALE)  # log2(e) / tau in float64: an fp32 scale would perturb tau by 6e-8
    pid_d = tl.program_id(2).to(tl.int64)
    T, W, LOWER, UPPER = _batch_row(T, W, LOWER, UPPER, pid_b, n)
    X += pid_b * n * d
    OUT += pid_b * n * d
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n
    dims = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_mask = dims < d
    rows_c, t_p, w_p, lower, upper = _load_rows(T, W, LOWER, UPPER, rows, n)
    col_start, col_end = _row_tile_columns(LOWER, UPPER, pid_m, n, BLOCK_M)

    # Tiles are summed in fp32, tiles into float64 accumulators: the row sums' rounding would rescale whole
    # rows of the backward's dz, and d_scores sums rows whose contributions largely cancel.
    norm = tl.zeros([BLOCK_M], tl.float64)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float64)
    for start in range(col_start, col_end, BLOCK_N):
        cols, cols_c, _, p = _tile_weights(T, W, rows_c, t_p, w_p, lower, upper, start, n, scale, BLOCK_N)
        norm += tl.sum(p.to(tl.float64), axis=1)
        x = tl.load(X + cols_c.to(tl.int64)[:, None] * d + dims[None, :],
                    mask=(cols < n)[:, None] & dim_mask[None, :], other=0.0)
        acc += _tile_matmul(p, x.to(tl.float32), BLOCK_D, DOT_PRECISION)

    acc = acc / norm[:, None]
    out_offsets = rows.to(tl.int64)[:, None] * d + dims[None, :]
    out_mask = row_mask[:, None] & dim_mask[None, :]
    tl.store(OUT + out_offsets, acc.to(tl.float32).to(OUT.dtype.element_ty), mask=out_mask)
    if pid_d == 0:
        tl.store(NORM + pid_b * n + rows, norm, mask=row_mask)


@triton.jit
def apply_delta_kernel(
    T, W, LOWER, UPPER, X, G, NORM, DELTA, n, d, SCALE,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SINGLE_D_CHUNK: tl.constexpr,
):
    """Row pass of the backward: DELTA[b, p] = sum_m P_pm (g_p . x_m) in float64, from the same tiles as the
    column pass (not g_p . y_p: y carries the forward's rounding, which d_scores would feel where P is nearly a
    permutation). One program per (row tile, batch). NORM, DELTA: (B, n) float64; X, G: (B, n, d)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    scale = tl.load(SCALE)
    T, W, LOWER, UPPER = _batch_row(T, W, LOWER, UPPER, pid_b, n)
    X += pid_b * n * d
    G += pid_b * n * d
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < d
    rows_c, t_p, w_p, lower, upper = _load_rows(T, W, LOWER, UPPER, rows, n)
    norm = tl.load(NORM + pid_b * n + rows_c)
    g_own = tl.load(G + rows_c.to(tl.int64)[:, None] * d + dims[None, :],
                    mask=row_mask[:, None] & dim_mask[None, :], other=0.0).to(tl.float32)
    col_start, col_end = _row_tile_columns(LOWER, UPPER, pid_m, n, BLOCK_M)
    delta = tl.zeros([BLOCK_M], tl.float64)
    for start in range(col_start, col_end, BLOCK_N):
        cols, cols_c, _, p = _tile_weights(T, W, rows_c, t_p, w_p, lower, upper, start, n, scale, BLOCK_N)
        col_mask = cols < n
        x_own = tl.load(X + cols_c.to(tl.int64)[:, None] * d + dims[None, :],
                        mask=col_mask[:, None] & dim_mask[None, :], other=0.0).to(tl.float32)
        gx = _g_dot_x(G, X, rows_c, row_mask, cols, col_mask, g_own, x_own, d, BLOCK_M, BLOCK_N, BLOCK_D,
                      DOT_PRECISION, SINGLE_D_CHUNK)
        delta += tl.sum(p.to(tl.float64) / norm[:, None] * gx, axis=1)
    tl.store(DELTA + pid_b * n + rows, delta, mask=row_mask)


@triton.jit
def apply_backward_kernel(
    T, W, LOWER, UPPER, ROW_START, ROW_END, CNT, X, G, NORM, DELTA, DX, U, R, TAU_TERMS, n, d, num_col_tiles, SCALE,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SINGLE_D_CHUNK: tl.constexpr, NEED_TAU: tl.constexpr,
):
    """Column pass of the backward (as dK/dV in FlashAttention-2), one program per (column tile, B, d chunk).

    With dz_pm = P_pm (g_p . x_m - Delta_p) it accumulates over the rows whose windows reach the tile
    (ROW_START..ROW_END - 1, precomputed): DX[b, m] = sum_p P_pm g_p, U[b, m] = sum_p (c_p - cnt_m) dz_pm with
    c_p = 2p - n + 1 (small near the peak, which avoids cancelling two sums of size n r_m), R[b, m] = sum_p dz_pm
    and, if NEED_TAU, TAU_TERMS[b, m] = sum_p dz_pm D_p(m) (dL/dtau is their total over tau^2: the logits are
    -D / tau), from the drops the tile computes anyway.
    CNT: (B, n) fp32; NORM, DELTA, U, R, TAU_TERMS: (B, n) float64; ROW_START, ROW_END: (B, num_col_tiles) int32;
    X, G, DX: (B, n, d).
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    scale = tl.load(SCALE)
    pid_d = tl.program_id(2).to(tl.int64)
    T, W, LOWER, UPPER = _batch_row(T, W, LOWER, UPPER, pid_b, n)
    CNT += pid_b * n
    NORM += pid_b * n
    DELTA += pid_b * n
    X += pid_b * n * d
    G += pid_b * n * d
    DX += pid_b * n * d
    anchor = pid_n * BLOCK_N
    cols = anchor + tl.arange(0, BLOCK_N)
    col_mask = cols < n
    cols_c = tl.minimum(cols, n - 1)
    own_dims = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    own_dim_mask = own_dims < d
    t_b = tl.load(T + anchor)
    w_b = tl.load(W + anchor)
    offset, twice_v = _column_anchor(tl.load(T + cols_c), tl.load(W + cols_c), anchor, t_b, w_b)
    cnt = tl.load(CNT + cols_c)
    x_own = tl.load(X + cols.to(tl.int64)[:, None] * d + own_dims[None, :],
                    mask=col_mask[:, None] & own_dim_mask[None, :], other=0.0).to(tl.float32)
    row_start = tl.load(ROW_START + pid_b * num_col_tiles + pid_n)
    row_end = tl.load(ROW_END + pid_b * num_col_tiles + pid_n)

    # dz and the column sums are float64: where P is nearly a permutation g_p . x_m - Delta_p is a small
    # difference, and d_scores sums rows whose contributions largely cancel.
    dx_acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float64)
    u_acc = tl.zeros([BLOCK_N], tl.float64)
    r_acc = tl.zeros([BLOCK_N], tl.float64)
    tau_acc = tl.zeros([BLOCK_N], tl.float64)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < n
        rows_c, t_p, w_p, lower, upper = _load_rows(T, W, LOWER, UPPER, rows, n)
        norm = tl.load(NORM + rows_c)
        delta = tl.load(DELTA + rows_c)
        inside = (cols[None, :] >= lower[:, None]) & (cols[None, :] <= upper[:, None]) & row_mask[:, None]
        drop = _drops(rows_c, t_p, w_p, anchor, t_b, w_b, offset, twice_v)
        z = tl.where(inside, (-scale * drop).to(tl.float32), float("-inf"))
        p64 = tl.math.exp2(z).to(tl.float64) / norm[:, None]
        p = p64.to(tl.float32)
        row_offsets = rows_c.to(tl.int64)[:, None] * d
        g_own = tl.load(G + row_offsets + own_dims[None, :], mask=row_mask[:, None] & own_dim_mask[None, :],
                        other=0.0).to(tl.float32)
        gx = _g_dot_x(G, X, rows_c, row_mask, cols, col_mask, g_own, x_own, d, BLOCK_M, BLOCK_N, BLOCK_D,
                      DOT_PRECISION, SINGLE_D_CHUNK)
        dz = p64 * (gx - delta[:, None])
        coefficient = (2 * rows_c - n + 1).to(tl.float64)
        u_acc += tl.sum((coefficient[:, None] - cnt.to(tl.float64)[None, :]) * dz, axis=0)
        r_acc += tl.sum(dz, axis=0)
        if NEED_TAU:
            tau_acc += tl.sum(tl.where(inside, dz * drop, 0.0), axis=0)
        dx_acc += _tile_matmul(tl.trans(p), g_own, BLOCK_D, DOT_PRECISION)

    tl.store(DX + cols.to(tl.int64)[:, None] * d + own_dims[None, :],
             dx_acc.to(tl.float32).to(DX.dtype.element_ty), mask=col_mask[:, None] & own_dim_mask[None, :])
    if pid_d == 0:
        tl.store(U + pid_b * n + cols, u_acc, mask=col_mask)
        tl.store(R + pid_b * n + cols, r_acc, mask=col_mask)
        if NEED_TAU:
            tl.store(TAU_TERMS + pid_b * n + cols, tau_acc, mask=col_mask)
