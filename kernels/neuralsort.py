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

Padded lists: ``LENGTH[b]`` is list b's number ``m`` of real items, at sorted positions ``0..m-1`` (``n`` when
nothing is padded). The drops do not depend on ``n``, so the kernels only bound rows and columns by ``m``: padded
rows have empty windows ``[m, m - 1]`` and output zero (row sum 1), padded columns are never loaded (padding may
hold NaN), descending output rows are ``m - 1 - p``, and the backward's coefficient is ``c_p = 2p - m + 1``.

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
def _output_rows(rows, m, descending):
    """Output row of sorted row p of a list of m real items: m - 1 - p if ``descending`` (a runtime 0/1: no second
    compilation), else p; padded rows (p >= m) keep p. An involution, so also its inverse."""
    return tl.where((descending != 0) & (rows < m), m - 1 - rows, rows)


@triton.jit
def _scale(TAU):
    """log2(e) / tau in float64 (an fp32 scale would perturb tau by 6e-8)."""
    return 1.4426950408889634 / tl.load(TAU)


@triton.jit
def _batch_row(T, W, LOWER, UPPER, LENGTH, pid_b, n):
    """Pointers to one batch row's sorted scores, prefix sums and window bounds, and its number of real items."""
    offset = pid_b * n
    return T + offset, W + offset, LOWER + offset, UPPER + offset, tl.load(LENGTH + pid_b)


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
    T, W, LOWER, UPPER, LENGTH, ORDER, P, n, TAU, descending,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Writes the window entries of P[b, output row of p, ORDER[m]] = exp(-D_p(m)/tau) / l_p (P is pre-zeroed).

    One program per (row tile, batch). T, W: (B, n) float64; LOWER, UPPER, ORDER: (B, n) int64; LENGTH: (B,)
    int64; TAU: (1,) float64."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    scale = _scale(TAU)
    T, W, LOWER, UPPER, m = _batch_row(T, W, LOWER, UPPER, LENGTH, pid_b, n)
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
    norm = tl.where(rows < m, norm, 1.0)  # padded rows: empty windows, nothing stored
    out_rows = _output_rows(rows_c, m, descending)
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
    T, W, LOWER, UPPER, LENGTH, ORDER, X, OUT, NORM, n, d, TAU, descending,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """OUT[b, output row of p, :] = sum_m P_pm X[b, ORDER[m], :] over row p's window; NORM[b, p] = l_p in float64.

    X and OUT are in the caller's coordinates (input items, output rows): the permutations are folded into the
    loads and stores, so no gather or scatter runs outside. Grid (row tiles, B, d chunks). T, W: (B, n) float64;
    LOWER, UPPER, ORDER: (B, n) int64; LENGTH: (B,) int64; X, OUT: (B, n, d); TAU: (1,) float64. d = 0 computes
    the row sums only."""
    _forward_tile(tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64),
                  T, W, LOWER, UPPER, LENGTH, ORDER, X, OUT, NORM, n, d, _scale(TAU), descending,
                  BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)


@triton.jit
def _forward_tile(
    pid_m, pid_b, pid_d, T, W, LOWER, UPPER, LENGTH, ORDER, X, OUT, NORM, n, d, scale, descending,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One (row tile, batch row, d chunk) of ``apply_forward_kernel``; scale = log2(e) / tau."""
    T, W, LOWER, UPPER, m = _batch_row(T, W, LOWER, UPPER, LENGTH, pid_b, n)
    ORDER += pid_b * n
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
        items = tl.load(ORDER + cols_c)
        x = tl.load(X + items[:, None] * d + dims[None, :], mask=(cols < m)[:, None] & dim_mask[None, :], other=0.0)
        acc += _tile_matmul(p, x.to(tl.float32), BLOCK_D, DOT_PRECISION)

    norm = tl.where(rows < m, norm, 1.0)  # padded rows: no columns, output 0, row sum 1
    acc = acc / norm[:, None]
    out_offsets = _output_rows(rows_c, m, descending).to(tl.int64)[:, None] * d + dims[None, :]
    out_mask = row_mask[:, None] & dim_mask[None, :]
    tl.store(OUT + out_offsets, acc.to(tl.float32).to(OUT.dtype.element_ty), mask=out_mask)
    if pid_d == 0:
        tl.store(NORM + pid_b * n + rows, norm, mask=row_mask)


@triton.jit
def apply_delta_kernel(
    T, W, LOWER, UPPER, LENGTH, ORDER, X, G, NORM, DELTA, n, d, TAU, descending,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SINGLE_D_CHUNK: tl.constexpr,
):
    """Row pass of the backward: DELTA[b, p] = sum_m P_pm (g_p . x_m) in float64, from the same tiles as the
    column pass (not g_p . y_p: y carries the forward's rounding, which d_scores would feel where P is nearly a
    permutation). One program per (row tile, batch). NORM, DELTA: (B, n) float64 by sorted row; X (B, n, d) by
    input item, G (B, n, d) by output row (the caller's coordinates)."""
    _delta_tile(tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), T, W, LOWER, UPPER, LENGTH, ORDER,
                X, G, NORM, DELTA, n, d, _scale(TAU), descending, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION,
                SINGLE_D_CHUNK)


@triton.jit
def _delta_tile(
    pid_m, pid_b, T, W, LOWER, UPPER, LENGTH, ORDER, X, G, NORM, DELTA, n, d, scale, descending,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SINGLE_D_CHUNK: tl.constexpr,
):
    """One (row tile, batch row) of ``apply_delta_kernel``."""
    T, W, LOWER, UPPER, m = _batch_row(T, W, LOWER, UPPER, LENGTH, pid_b, n)
    ORDER += pid_b * n
    X += pid_b * n * d
    G += pid_b * n * d
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < m  # the gradient of padded output rows is never read (it may hold anything)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < d
    rows_c, t_p, w_p, lower, upper = _load_rows(T, W, LOWER, UPPER, rows, n)
    g_rows = _output_rows(rows_c, m, descending)
    norm = tl.load(NORM + pid_b * n + rows_c)
    g_own = tl.load(G + g_rows.to(tl.int64)[:, None] * d + dims[None, :],
                    mask=row_mask[:, None] & dim_mask[None, :], other=0.0).to(tl.float32)
    col_start, col_end = _row_tile_columns(LOWER, UPPER, pid_m, n, BLOCK_M)
    delta = tl.zeros([BLOCK_M], tl.float64)
    for start in range(col_start, col_end, BLOCK_N):
        cols, cols_c, _, p = _tile_weights(T, W, rows_c, t_p, w_p, lower, upper, start, n, scale, BLOCK_N)
        col_mask = cols < m
        items = tl.load(ORDER + cols_c)
        x_own = tl.load(X + items[:, None] * d + dims[None, :],
                        mask=col_mask[:, None] & dim_mask[None, :], other=0.0).to(tl.float32)
        gx = _g_dot_x(G, X, g_rows, row_mask, items, col_mask, g_own, x_own, d, BLOCK_M, BLOCK_N, BLOCK_D,
                      DOT_PRECISION, SINGLE_D_CHUNK)
        delta += tl.sum(p.to(tl.float64) / norm[:, None] * gx, axis=1)
    tl.store(DELTA + pid_b * n + rows, delta, mask=rows < n)


@triton.jit
def _first_reaching(VALUES, target, lo, hi, n, steps, STRICT: tl.constexpr):
    """Smallest index i in [lo, hi] with VALUES[i] >= target (> target if STRICT), hi if none, for non-decreasing
    VALUES: a bisection of ``steps`` >= bit_length(n) + 1 rounds. Scalars or blocks alike (lo, hi, target)."""
    for _ in range(steps):
        mid = (lo + hi) // 2
        value = tl.load(VALUES + tl.minimum(mid, n - 1))
        if STRICT:
            before = value <= target
        else:
            before = value < target
        active = lo < hi
        lo = tl.where(active & before, mid + 1, lo)
        hi = tl.where(active & ~before, mid, hi)
    return lo


@triton.jit
def apply_backward_kernel(
    T, W, LOWER, UPPER, LENGTH, ORDER, CNT, X, G, NORM, DELTA, DX, U, R, TAU_TERMS, n, d, steps, TAU, descending,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SINGLE_D_CHUNK: tl.constexpr, NEED_TAU: tl.constexpr, TRANSPOSED: tl.constexpr,
):
    """Column pass of the backward (as dK/dV in FlashAttention-2), one program per (column tile, B, d chunk).

    With dz_pm = P_pm (g_p . x_m - Delta_p) it accumulates over the rows whose windows reach the tile (found by
    bisection of the windows, which move right with p: R_p >= the tile's first column, L_p <= its last):
    DX[b, m] = sum_p P_pm g_p, U[b, m] = sum_p (c_p - cnt_m) dz_pm with c_p = 2p - m + 1 (small near the peak,
    which avoids cancelling two sums of size n r_m), R[b, m] = sum_p dz_pm and, if NEED_TAU,
    TAU_TERMS[b, m] = sum_p dz_pm D_p(m) (dL/dtau is their total over tau^2: the logits are
    -D / tau), from the drops the tile computes anyway. ``TRANSPOSED``: DX = P^T G only (the product
    ``P_hat^T @ v``; X, CNT, DELTA, U, R are not read or written).
    CNT, NORM, DELTA, U, R, TAU_TERMS: (B, n) float64 by sorted position; X, DX (B, n, d) by input item
    (DX[b, ORDER[m]]), G (B, n, d) by output row; LENGTH (B,) int64. ``steps``: bit_length(n) + 1.
    """
    _column_tile(tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64),
                 T, W, LOWER, UPPER, LENGTH, ORDER, CNT, X, G, NORM, DELTA, DX, U, R, TAU_TERMS, n, d, steps,
                 _scale(TAU), descending, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, SINGLE_D_CHUNK, NEED_TAU,
                 TRANSPOSED)


@triton.jit
def _column_tile(
    pid_n, pid_b, pid_d, T, W, LOWER, UPPER, LENGTH, ORDER, CNT, X, G, NORM, DELTA, DX, U, R, TAU_TERMS, n, d,
    steps, scale, descending,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SINGLE_D_CHUNK: tl.constexpr, NEED_TAU: tl.constexpr, TRANSPOSED: tl.constexpr,
):
    """One (column tile, batch row, d chunk) of ``apply_backward_kernel``."""
    T, W, LOWER, UPPER, m = _batch_row(T, W, LOWER, UPPER, LENGTH, pid_b, n)
    ORDER += pid_b * n
    CNT += pid_b * n
    NORM += pid_b * n
    DELTA += pid_b * n
    X += pid_b * n * d
    G += pid_b * n * d
    DX += pid_b * n * d
    anchor = pid_n * BLOCK_N
    cols = anchor + tl.arange(0, BLOCK_N)
    col_mask = cols < n
    col_real = cols < m  # padded items are never loaded (they may hold anything) and get 0
    cols_c = tl.minimum(cols, n - 1)
    own_dims = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    own_dim_mask = own_dims < d
    t_b = tl.load(T + anchor)
    w_b = tl.load(W + anchor)
    offset, twice_v = _column_anchor(tl.load(T + cols_c), tl.load(W + cols_c), anchor, t_b, w_b)
    items = tl.load(ORDER + cols_c)
    if not TRANSPOSED:
        cnt = tl.load(CNT + cols_c)
        x_own = tl.load(X + items[:, None] * d + own_dims[None, :],
                        mask=col_real[:, None] & own_dim_mask[None, :], other=0.0).to(tl.float32)
    # Typed (int64 tensor) bounds: a loop-carried Python constant may not turn into a tensor (Triton 3.6).
    first_row = anchor * 0
    row_start = _first_reaching(UPPER, anchor, first_row, first_row + m, n, steps, False)
    row_end = _first_reaching(LOWER, tl.minimum(anchor + BLOCK_N - 1, n - 1), first_row, first_row + m, n, steps,
                              True)

    # dz and the column sums are float64: where P is nearly a permutation g_p . x_m - Delta_p is a small
    # difference, and d_scores sums rows whose contributions largely cancel.
    dx_acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float64)
    u_acc = tl.zeros([BLOCK_N], tl.float64)
    r_acc = tl.zeros([BLOCK_N], tl.float64)
    tau_acc = tl.zeros([BLOCK_N], tl.float64)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < m
        rows_c, t_p, w_p, lower, upper = _load_rows(T, W, LOWER, UPPER, rows, n)
        norm = tl.load(NORM + rows_c)
        inside = (cols[None, :] >= lower[:, None]) & (cols[None, :] <= upper[:, None]) & row_mask[:, None]
        drop = _drops(rows_c, t_p, w_p, anchor, t_b, w_b, offset, twice_v)
        z = tl.where(inside, (-scale * drop).to(tl.float32), float("-inf"))
        p64 = tl.math.exp2(z).to(tl.float64) / norm[:, None]
        p = p64.to(tl.float32)
        g_rows = _output_rows(rows_c, m, descending)
        g_own = tl.load(G + g_rows.to(tl.int64)[:, None] * d + own_dims[None, :],
                        mask=row_mask[:, None] & own_dim_mask[None, :], other=0.0).to(tl.float32)
        if not TRANSPOSED:
            delta = tl.load(DELTA + rows_c)
            gx = _g_dot_x(G, X, g_rows, row_mask, items, col_real, g_own, x_own, d, BLOCK_M, BLOCK_N, BLOCK_D,
                          DOT_PRECISION, SINGLE_D_CHUNK)
            dz = p64 * (gx - delta[:, None])
            coefficient = (2 * rows_c - m + 1).to(tl.float64)
            u_acc += tl.sum((coefficient[:, None] - cnt[None, :]) * dz, axis=0)
            r_acc += tl.sum(dz, axis=0)
            if NEED_TAU:
                tau_acc += tl.sum(tl.where(inside, dz * drop, 0.0), axis=0)
        dx_acc += _tile_matmul(tl.trans(p), g_own, BLOCK_D, DOT_PRECISION)

    tl.store(DX + items[:, None] * d + own_dims[None, :],
             dx_acc.to(tl.float32).to(DX.dtype.element_ty), mask=col_mask[:, None] & own_dim_mask[None, :])
    if not TRANSPOSED:
        if pid_d == 0:
            tl.store(U + pid_b * n + cols, u_acc, mask=col_mask)
            tl.store(R + pid_b * n + cols, r_acc, mask=col_mask)
            if NEED_TAU:
                tl.store(TAU_TERMS + pid_b * n + cols, tau_acc, mask=col_mask)


@triton.jit
def _drop_to(T, W, rows, t_p, w_p, cols):
    """D_p(m) in float64 for row positions ``rows`` and column positions ``cols`` (same shape), loaded from T, W."""
    return (2 * rows - 1).to(tl.float64) * (t_p - tl.load(T + cols)) - 2.0 * (w_p - tl.load(W + cols))


@triton.jit
def _real_sorted(SORTED, positions, m, n, median, t_last):
    """float64 sorted scores minus the median at ``positions``; padded positions (>= m) repeat the last real one, so
    their gaps are 0 (the padding's own values, +inf sort keys, are never used)."""
    value = tl.load(SORTED + tl.maximum(tl.minimum(positions, n - 1), 0)).to(tl.float64) - median
    return tl.where(positions < m, value, t_last)


@triton.jit
def prepare_kernel(
    SORTED, ORDER, X, d, TAU, LENGTH, T, W, COUNT, LESS, NOT_GREATER, LOWER, UPPER, n, steps,
    BLOCK: tl.constexpr, BANDED: tl.constexpr, MASKED: tl.constexpr,
):
    """The O(n log n) preparation of one batch row (``triton_sort._columns.sorted_terms``) after one torch.sort:
    float64 sorted scores minus their median T, prefix sums W_m = sum_{q<m} q (t_{q+1} - t_q), tie counts
    LESS/NOT_GREATER (scores below / not above each position) and COUNT = LESS + NOT_GREATER - m, and the windows
    [LOWER, UPPER] of D_p(m) <= (ln(n) + 30) tau by bisection (full rows unless BANDED).

    ``MASKED``: LENGTH (B,) int64 holds each list's number m of real items, sorted first (padding has +inf keys);
    padded positions get finite T, W (gaps 0), LESS = 0, NOT_GREATER = n (a zero signed sum) and empty windows
    [m, m - 1]. Otherwise m = n and the kernel writes LENGTH.

    A list with a non-finite score or value gets NaN sorted scores (0 * the sum of its real scores and values
    X[ORDER[q]] (B, n, d), d may be 0), so all its outputs and gradients are NaN, as on the PyTorch path
    (``_backends.poison_lists``).

    One program per batch row, BLOCK positions at a time. SORTED: (B, n) sorted scores (their dtype); ORDER: (B, n)
    int64; TAU: (1,) float64; T, W, COUNT: (B, n) float64; LESS, NOT_GREATER, LOWER, UPPER: (B, n) int64.
    ``steps``: bit_length(n) + 1 bisection rounds."""
    limit = (tl.log(n.to(tl.float64)) + 30.0) * tl.load(TAU)  # _columns.band_threshold(n) * tau
    _prepare_row(tl.program_id(0).to(tl.int64), SORTED, ORDER, X, d, limit, LENGTH, T, W, COUNT, LESS, NOT_GREATER,
                 LOWER, UPPER, n, steps, BLOCK, BANDED, MASKED)


@triton.jit
def _prepare_row(
    batch_row, SORTED, ORDER, X, d, limit, LENGTH, T, W, COUNT, LESS, NOT_GREATER, LOWER, UPPER, n, steps,
    BLOCK: tl.constexpr, BANDED: tl.constexpr, masked,
):
    """``prepare_kernel`` for one batch row; windows where D_p(m) <= ``limit`` (float64) if BANDED. ``masked``:
    constexpr or runtime (one compiled short kernel serves padded and full lists)."""
    if masked:
        m = tl.load(LENGTH + batch_row)
    else:
        m = batch_row * 0 + n
        tl.store(LENGTH + batch_row, m)
    row = batch_row * n
    SORTED += row
    ORDER += row
    T += row
    W += row
    COUNT += row
    LESS += row
    NOT_GREATER += row
    LOWER += row
    UPPER += row
    X += row * d
    total = tl.zeros([BLOCK], tl.float64)
    for start in range(0, n, BLOCK):
        q = start + tl.arange(0, BLOCK)
        total += tl.load(SORTED + q, mask=q < m, other=0.0).to(tl.float64)
    for start in range(0, n * d, BLOCK):
        flat = start + tl.arange(0, BLOCK)
        q = flat // d
        items = tl.load(ORDER + tl.minimum(q, n - 1))
        total += tl.load(X + items * d + flat % d, mask=q < m, other=0.0).to(tl.float64)
    poison = tl.sum(total, axis=0) * 0.0
    median = tl.where(m > 0, tl.load(SORTED + tl.maximum(tl.minimum(m // 2, n - 1), 0)).to(tl.float64), 0.0)
    t_last = tl.where(m > 0, tl.load(SORTED + tl.maximum(m - 1, 0)).to(tl.float64) - median, 0.0) + poison
    median = median - poison
    # Prefix sums chunk by chunk; the running total is the sum of every earlier chunk's increments.
    carried = tl.zeros([BLOCK], tl.float64)
    for start in range(0, n, BLOCK):
        q = start + tl.arange(0, BLOCK)
        mask = q < n
        t = _real_sorted(SORTED, q, m, n, median, t_last)
        t_before = _real_sorted(SORTED, q - 1, m, n, median, t_last)
        increment = tl.where(mask & (q >= 1), (q - 1).to(tl.float64) * (t - t_before), 0.0)
        tl.store(T + q, t, mask=mask)
        tl.store(W + q, tl.sum(carried, axis=0) + tl.cumsum(increment, axis=0), mask=mask)
        carried += increment
    # The second pass reads T and W at other positions than this thread wrote.
    tl.debug_barrier()
    last = tl.maximum(m - 1, 0)
    for start in range(0, n, BLOCK):
        p = start + tl.arange(0, BLOCK)
        mask = p < n
        real = p < m
        p = tl.minimum(p, n - 1)
        t_p = tl.load(T + p)
        w_p = tl.load(W + p)
        # Tie counts among the real items: first positions in [0, m] with T >= t_p and with T > t_p.
        first = tl.zeros([BLOCK], tl.int64)
        end = first + m
        lo_less = _first_reaching(T, t_p, first, end, n, steps, False)
        lo_greater = _first_reaching(T, t_p, first, end, n, steps, True)
        tl.store(LESS + p, tl.where(real, lo_less, 0), mask=mask)
        tl.store(NOT_GREATER + p, tl.where(real, lo_greater, n), mask=mask)
        tl.store(COUNT + p, tl.where(real, (lo_less + lo_greater - m).to(tl.float64), 0.0), mask=mask)
        if BANDED:
            # As _columns._windows: D_p decreases towards p (where it is 0) and increases after it.
            lo = tl.zeros([BLOCK], tl.int64)
            hi = p.to(tl.int64)
            for _ in range(steps):
                mid = (lo + hi) // 2
                inside = _drop_to(T, W, p, t_p, w_p, mid) <= limit
                hi = tl.where(inside, mid, hi)
                lo = tl.where(inside, lo, mid + 1)
            lower = hi
            lo = p.to(tl.int64)
            hi = tl.zeros([BLOCK], tl.int64) + last
            for _ in range(steps):
                mid = (lo + hi + 1) // 2
                inside = _drop_to(T, W, p, t_p, w_p, tl.minimum(mid, n - 1)) <= limit
                lo = tl.where(inside, mid, lo)
                hi = tl.where(inside, hi, mid - 1)
            upper = lo
        else:
            lower = tl.zeros([BLOCK], tl.int64)
            upper = tl.zeros([BLOCK], tl.int64) + last
        tl.store(LOWER + p, tl.where(real, lower, m), mask=mask)
        tl.store(UPPER + p, tl.where(real, upper, m - 1), mask=mask)


@triton.jit
def finish_kernel(
    U, R, TAU_TERMS, LESS, NOT_GREATER, ORDER, PREFIX, TAU, DS, TAU_ROWS, n,
    BLOCK: tl.constexpr, NEED_TAU: tl.constexpr,
):
    """Scores gradient of one batch row from the column sums (MATH.md, section 4):
    DS[b, ORDER[m]] = (U_m - sum_k sign(t_m - t_k) R_k) / tau, the signed sum by prefix sums of R over the sorted
    positions (ties by LESS/NOT_GREATER); and TAU_ROWS[b] = sum_m TAU_TERMS[b, m] if NEED_TAU.

    One program per batch row. U, R, TAU_TERMS: (B, n) float64 by sorted position; PREFIX: (B, n + 1) float64
    scratch; DS: (B, n) in the scores' dtype, by input item; TAU_ROWS: (B,) float64."""
    _finish_row(tl.program_id(0).to(tl.int64), U, R, TAU_TERMS, LESS, NOT_GREATER, ORDER, PREFIX, TAU, DS, TAU_ROWS,
                n, BLOCK, NEED_TAU)


@triton.jit
def _finish_row(
    row, U, R, TAU_TERMS, LESS, NOT_GREATER, ORDER, PREFIX, TAU, DS, TAU_ROWS, n,
    BLOCK: tl.constexpr, NEED_TAU: tl.constexpr,
):
    """``finish_kernel`` for batch row ``row``."""
    U += row * n
    R += row * n
    TAU_TERMS += row * n
    LESS += row * n
    NOT_GREATER += row * n
    ORDER += row * n
    DS += row * n
    PREFIX += row * (n + 1)
    carried = tl.zeros([BLOCK], tl.float64)
    tau_sum = tl.zeros([BLOCK], tl.float64)
    tl.store(PREFIX, 0.0)
    for start in range(0, n, BLOCK):
        m = start + tl.arange(0, BLOCK)
        mask = m < n
        r = tl.load(R + m, mask=mask, other=0.0)
        tl.store(PREFIX + m + 1, tl.sum(carried, axis=0) + tl.cumsum(r, axis=0), mask=mask)
        carried += r
        if NEED_TAU:
            tau_sum += tl.load(TAU_TERMS + m, mask=mask, other=0.0)
    tl.debug_barrier()
    total = tl.load(PREFIX + n)
    tau = tl.load(TAU)
    for start in range(0, n, BLOCK):
        m = start + tl.arange(0, BLOCK)
        mask = m < n
        below = tl.load(PREFIX + tl.load(LESS + m, mask=mask, other=0), mask=mask, other=0.0)
        above = total - tl.load(PREFIX + tl.load(NOT_GREATER + m, mask=mask, other=0), mask=mask, other=0.0)
        grad = (tl.load(U + m, mask=mask, other=0.0) - (below - above)) / tau
        items = tl.load(ORDER + m, mask=mask, other=0)
        tl.store(DS + items, grad.to(tl.float32).to(DS.dtype.element_ty), mask=mask)
    if NEED_TAU:
        tl.store(TAU_ROWS + row, tl.sum(tau_sum, axis=0))


# ------------------------------------------------------------------------------------ short rows: one program each
# A batch of short lists (the common workload: 5 to a few hundred items) is dominated by per-launch costs, not by
# the O(n^2) work. These kernels run the same code as the five kernels above, one program per list: the forward
# prepares the list's sorted terms and applies P_hat in one launch, the backward runs the row pass, the column pass
# and the finish in one launch. Barriers order the phases (each phase reads what other threads of the program
# stored); the scratch buffers (DELTA, U, R, TAU_TERMS, PREFIX) are plain allocations, not launches.


@triton.jit
def short_forward_kernel(
    SORTED, ORDER, X, OUT, NORM, LENGTH, T, W, COUNT, LESS, NOT_GREATER, LOWER, UPPER, n, d, steps, TAU, banded,
    masked, descending,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``prepare_kernel`` then ``apply_forward_kernel`` over all row tiles and d chunks of one batch row (grid
    (B,)): the sorted terms (as ``prepare_kernel`` writes them, for the backward), OUT (B, n, d) by output row and
    NORM (B, n) float64. ``banded`` (runtime 0/1): windows D_p(m) <= (ln(n) + 30) tau, else full rows (the
    bisection of an infinite limit); ``masked`` (runtime 0/1): LENGTH holds the lists' lengths, else the kernel
    writes n. Runtime flags, so one compiled kernel per (dtype, BLOCK_D) serves every call."""
    batch_row = tl.program_id(0).to(tl.int64)
    tau = tl.load(TAU)
    limit = tl.where(banded != 0, (tl.log(n.to(tl.float64)) + 30.0) * tau, float("inf"))
    _prepare_row(batch_row, SORTED, ORDER, X, d, limit, LENGTH, T, W, COUNT, LESS, NOT_GREATER, LOWER, UPPER, n,
                 steps, BLOCK, True, masked != 0)
    tl.debug_barrier()  # the row tiles read terms that other threads stored
    scale = _scale(TAU)
    zero = batch_row * 0  # int64 tile indices (the interpreter's loop variables are Python ints)
    for pid_m in range(0, tl.cdiv(n, BLOCK_M)):
        for pid_d in range(0, tl.maximum(tl.cdiv(d, BLOCK_D), 1)):
            _forward_tile(zero + pid_m, batch_row, zero + pid_d, T, W, LOWER, UPPER, LENGTH, ORDER, X,
                          OUT, NORM, n, d, scale, descending, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)


@triton.jit
def short_backward_kernel(
    T, W, LOWER, UPPER, LENGTH, ORDER, CNT, LESS, NOT_GREATER, X, G, NORM, DELTA, DX, U, R, TAU_TERMS, PREFIX, DS,
    TAU_ROWS, n, d, steps, TAU, descending,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SINGLE_D_CHUNK: tl.constexpr,
):
    """``apply_delta_kernel``, ``apply_backward_kernel`` and ``finish_kernel`` of one batch row (grid (B,)), with
    the same arguments as those; DELTA, U, R, TAU_TERMS (B, n) and PREFIX (B, n + 1) are float64 scratch. Always
    writes TAU_ROWS (B,): the tau terms cost little next to the tile work and one variant halves the compiled
    kernels."""
    batch_row = tl.program_id(0).to(tl.int64)
    scale = _scale(TAU)
    zero = batch_row * 0  # int64 tile indices (the interpreter's loop variables are Python ints)
    for pid_m in range(0, tl.cdiv(n, BLOCK_M)):
        _delta_tile(zero + pid_m, batch_row, T, W, LOWER, UPPER, LENGTH, ORDER, X, G, NORM, DELTA, n, d,
                    scale, descending, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, SINGLE_D_CHUNK)
    tl.debug_barrier()  # the column tiles read every row's Delta
    for pid_n in range(0, tl.cdiv(n, BLOCK_N)):
        for pid_d in range(0, tl.cdiv(d, BLOCK_D)):
            _column_tile(zero + pid_n, batch_row, zero + pid_d, T, W, LOWER, UPPER, LENGTH, ORDER, CNT,
                         X, G, NORM, DELTA, DX, U, R, TAU_TERMS, n, d, steps, scale, descending, BLOCK_M, BLOCK_N,
                         BLOCK_D, DOT_PRECISION, SINGLE_D_CHUNK, True, False)
    tl.debug_barrier()  # the finish reads every column's sums
    _finish_row(batch_row, U, R, TAU_TERMS, LESS, NOT_GREATER, ORDER, PREFIX, TAU, DS, TAU_ROWS, n, BLOCK, True)
