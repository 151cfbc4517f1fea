"""The two implementations behind the custom ops: PyTorch (dense blocks) and Triton (``triton_sort.kernels``).

Both work in sorted coordinates (``_columns``): row ``p`` of ``P_hat`` peaks at sorted column ``p`` and weighs
column ``m`` by ``exp(-D_p(m) / tau)`` inside its window ``[L_p, R_p]`` (0 outside), normalised by the row sum
``l_p >= 1``. Values and gradients arrive already permuted to sorted order (``ops`` does that). Each backend gives

- ``matrix_forward``: ``P_hat`` in the caller's coordinates, ``(B, n, n)``;
- ``apply_forward``: ``y_p = sum_m P_pm x_m`` in the values' dtype and the row sums ``l_p`` in float64 (in [1, n]:
  the peak weighs exactly 1, so the sums themselves are stored, not their logs);
- ``apply_backward``: ``dx_m = sum_p P_pm g_p`` and the column sums ``u_m = sum_p (c_p - cnt_m) dz_pm``,
  ``r_m = sum_p dz_pm`` with ``dz_pm = P_pm (g_p . x_m - Delta_p)``, ``c_p = 2p - n + 1``. ``Delta_p`` (which is
  ``g_p . y_p``) is recomputed as ``sum_m P_pm (g_p . x_m)`` from the very weights and products dz uses: where P is
  nearly a permutation ``g_p . x_p - Delta_p`` is a small difference, exact only if both sides round alike.

``d_scores = (u - signed_sum(r)) / tau`` is assembled by the caller (MATH.md, section 4).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._columns import (
    SortedTerms,
    band_threshold,
    positions,
    signed_sum,
    sorted_terms,
)
from ._validation import validation_enabled


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_sorted(values: Tensor, order: Tensor) -> Tensor:
    """(B, n, ...) in input order -> sorted order."""
    index = order.reshape(*order.shape, *([1] * (values.dim() - 2))).expand_as(values)
    return torch.gather(values, 1, index)


def from_sorted(values: Tensor, order: Tensor) -> Tensor:
    """(B, n, ...) in sorted order -> input order."""
    index = order.reshape(*order.shape, *([1] * (values.dim() - 2))).expand_as(values)
    return torch.empty_like(values).scatter_(1, index, values)


def rows_to_output(values: Tensor, descending: bool, terms: SortedTerms | None = None) -> Tensor:
    """(B, n, ...) indexed by sorted row p -> by output row i (descending: i = n - 1 - p; for padded lists
    ``terms.masked``, i = m - 1 - p on real rows, padded rows stay). An involution."""
    if not descending:
        return values
    if terms is None or not terms.masked:
        return values.flip(1)
    index = terms.output_index()
    return torch.gather(values, 1, index.reshape(*index.shape, *([1] * (values.dim() - 2))).expand_as(values))


def real_rows(values: Tensor, terms: SortedTerms) -> Tensor:
    """(B, n, ...) by sorted position with padded positions set to 0 (for padded lists; unchanged otherwise): padding
    may hold anything, NaN included, and a zero weight times NaN is NaN."""
    if not terms.masked:
        return values
    valid = terms.valid()
    return torch.where(valid.reshape(*valid.shape, *([1] * (values.dim() - 2))), values, 0)


# Problems with at most this many (batch, row, column) entries are evaluated in one go, densely in sorted
# coordinates: a fixed, small number of operations whatever n is (no windows, no row blocks, no host
# synchronisation), where the per-call overhead, not the O(n^2) work, is what costs. 2^22 entries keep each float64
# temporary at 32 MiB; above it long lists run in row blocks (BLOCK_ELEMENTS) in O(B n d) extra memory.
DENSE_ELEMENTS = 1 << 22
# Lists up to this long are evaluated densely at any batch size, in batch chunks of at most DENSE_ELEMENTS entries
# (without saving the weights: recomputed per chunk in the backward): their band covers much of the row, so row
# blocks would save little there ((1024, 100) ran 4x faster than in the former windowed chunks).
DENSE_MAX_N = 512


def dense_drops(t: Tensor, w: Tensor) -> Tensor:
    """D_p(m) = (2p - 1)(t_p - t_m) - 2 (W_p - W_m) for every (p, m): (B, n, n) float64 from t, w (B, n)."""
    drop = (t[:, :, None] - t[:, None, :]).mul_(positions(t.shape[-1], t.device, 2, -1)[:, None])
    return drop.sub_(w[:, :, None] - w[:, None, :], alpha=2)


# Logits are clamped at this floor before exp, per dtype: CPUs compute exp on a slow path where its result is near
# or below the smallest normal number (measured on this Xeon, 1 thread, 320k entries: float64 exp at -700 took
# 0.17 ms, at -708 2.9 ms, at -709 41 ms, at -800 6.2 ms; fp32 at -87 0.08 ms, at -90 10 ms), and products of such
# weights with values below 1 are denormals again (10x slower products: (1024, 100) fp32 forward + backward
# 109 ms with fp32's former floor of -87, 85 ms without denormals). float64's -500 keeps a weight (>= 7e-218)
# times two factors of fp32 range a normal number, fp32's -60 (9e-27) times values down to 1e-12. Raising a weight
# below e^floor to e^floor changes no sum that matters: the row's peak weighs exactly 1, so a row moves by at most
# n e^floor of its values' size (n 9e-27 for fp32, far below the band's e^-30); the band and the masks still set
# exact zeros.
EXP_FLOOR = {torch.float32: -60.0, torch.float64: -500.0}


def _block_logits(terms: SortedTerms, tau: Tensor, rows: slice, cols: slice) -> Tensor:
    """-D_p(m) / tau for lists ``terms`` (B lists), sorted rows ``rows`` and columns ``cols``: (B, rows, cols) float64
    in four passes over the block (one broadcast subtraction, three in place: a broadcast ``addcmul`` is 5x slower
    on CPU).

    With s = -1 / tau, s D_p(m) = k_p (t_p - t_m) + (b_m - b_p), k_p = s (2p - 1), b = 2 s W: differences of sorted
    scores and of prefix sums, as in MATH.md, so a row's own column is exactly 0 (its weight exactly 1) and no term
    of the size of the scores themselves is ever formed (a score of -1e30 stays harmless)."""
    s2 = tau.reciprocal().mul_(-2.0)  # 2 s
    k = positions(terms.n, terms.t.device, 1, -0.5)[rows] * s2  # s (2p - 1)
    b = terms.w * s2
    logits = terms.t[:, rows, None] - terms.t[:, None, cols]
    return logits.mul_(k[None, :, None]).add_(b[:, None, cols]).sub_(b[:, rows, None])


def _block_weights(terms: SortedTerms, tau: Tensor, rows: slice, cols: slice, dtype: torch.dtype,
                   banded: bool = False, logits: Tensor | None = None) -> Tensor:
    """exp(-D_p(m) / tau) on a block, (B, rows, cols) of ``dtype``; exactly 0 past the band's threshold when
    ``banded`` (the matrix's exact zeros) and on padded rows and columns. ``logits``: the block's, if at hand."""
    if logits is None:
        logits = _block_logits(terms, tau, rows, cols).to(dtype)
    else:  # the caller's logits stay as they are (float64 to float64 would not copy)
        logits = logits.to(dtype, copy=True)
    # Zeros are set after exp, not as -inf logits before it: exp(-inf) takes the CPU's slow path (10x-15x).
    outside = logits < -band_threshold(terms.n) if banded else None
    weights = logits.clamp_(min=EXP_FLOOR[dtype]).exp_()
    if outside is not None:
        weights.masked_fill_(outside, 0.0)
    if terms.masked:  # padded rows and columns weigh 0 (their logits may be NaN)
        valid = terms.valid()
        weights = torch.where(valid[:, rows, None] & valid[:, None, cols], weights, 0.0)
    return weights


def signed_sum_gradient(terms: SortedTerms, u: Tensor, r: Tensor, tau: Tensor, dtype: torch.dtype) -> Tensor:
    """d_scores = (u_m - sum_k sign(t_m - t_k) r_k) / tau in sorted order (MATH.md, section 4), to input order."""
    return from_sorted((u - signed_sum(terms, r)).div_(tau), terms.order).to(dtype)


def list_poison(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """0 per list, NaN for a list with a non-finite entry among the real ones (``mask`` (B, n) True; all if None):
    values (B, n) or (B, n, d) -> (B,) float64. (A sum minus itself: NaN exactly when the sum is NaN or infinite;
    summed in float64, finite inputs do not overflow.)"""
    total = _list_sums(values, mask)
    return total.sub_(total)


def _list_sums(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is not None:
        values = torch.where(mask.reshape(*mask.shape, *([1] * (values.dim() - 2))), values, 0)
    return values.sum(tuple(range(1, values.dim())), dtype=torch.float64)


def poison_lists(t: Tensor, values: Tensor | None, mask: Tensor | None = None) -> Tensor:
    """0 per list, NaN for a list with a non-finite score or value: (B,) float64 from t (B, n) (sorted scores, or
    the scores themselves) and values (B, n, d), counting only the real items of ``mask`` (B, n) if given.

    Added to the sorted scores ``t`` when validation is off, it makes every drop, output and gradient of such a list
    NaN, on every path alike (the Triton ``prepare`` kernel does the same), instead of NaN reaching whichever rows
    a path's windows or tiles happen to mix it into."""
    total = _list_sums(t, mask)
    if values is not None:
        total.add_(_list_sums(values, mask))
    return total.sub_(total)


def _row_sums(weights: Tensor, terms: SortedTerms) -> Tensor:
    """Row sums (..., rows) of weights, accumulated in float64; real rows sum to >= 1 (their peak weighs exactly
    1), padded rows to 0, kept at 1."""
    norm = weights.sum(-1, dtype=torch.float64)
    return norm.clamp_(min=1.0) if terms.masked else norm


# Entries of one row block of the windowed evaluation (long lists): its float64 logits, fp32 weights and the
# backward's float64 copy are alive together, about 20 bytes per entry, so 20 MiB per block whatever n is.
BLOCK_ELEMENTS = 1 << 20
# On CPU every limit above is capped at this many entries (1 MiB of float64): a block's passes then stay in the
# cache. Measured on 2 cores, forward + backward: (1024, 100) 247 -> 118 ms, (64, 256) 113 -> 47 ms and
# (16, 512) 97 -> 23 ms against blocks of 2^22, the weights recomputed in the backward included.
CPU_BLOCK_ELEMENTS = 1 << 17
# ... except the one-shot evaluation, whose saved weights spare the backward a recomputation: on CPU up to 768k
# entries (at (64, 100), 640k entries, one shot and blocks of 2^17 took the same time with a third of the
# operations; at (64, 128), 1M entries, blocks took 13.6 ms and one shot 24.7 ms).
CPU_ONE_SHOT_ELEMENTS = 768 << 10
# On a GPU the one-shot evaluation serves up to 2^24 entries (its saved float64 weights 128 MiB, less than the
# dense formula's fp32 matrices under autograd hold): there every operation is a launch of several microseconds,
# and row blocks or batch chunks above 2^22 dispatch 25x more of them ((16, 1000): about 950 operations and 4 syncs
# in row blocks, 36-38 in one shot), where each of the one shot's ~25 full-size passes over 16M entries streams in
# tens of microseconds (not yet measured on a GPU).
ONE_SHOT_ELEMENTS = 1 << 24
# One-shot problems, padded or not, take the lean path (``_one_shot``; measured on 2 cores, forward + backward,
# d = 1, against the former one-shot evaluation with tie counts: 0.90x at (64, 100), 0.87x at (12, 256), 1.02x at
# (1000, 8); 0.74x at (64, 100) with d = 16).


# ``relaxed_sort_matrix`` (not hard) takes the lean path up to this many entries on any device
# (``_one_shot.lean_matrix``): its output is B n^2 anyway, and one shot with float64 temporaries of that size
# (128 MiB each at the limit) ran 35%-45% faster than the chunked evaluation on CPU ((1024, 100) 541 -> 344 ms,
# (16, 1000) 782 -> 512 ms, (1, 4096) 841 -> 538 ms forward + backward, 1 thread).
LEAN_MATRIX_ELEMENTS = 1 << 24


def block_limit(limit: int, device: torch.device | str, cpu_cap: int | None = None) -> int:
    """``limit`` (DENSE_ELEMENTS, ONE_SHOT_ELEMENTS or BLOCK_ELEMENTS) on ``device``: capped at ``cpu_cap`` on CPU
    (CPU_BLOCK_ELEMENTS unless given)."""
    if (device.type if isinstance(device, torch.device) else torch.device(device).type) != "cpu":
        return limit
    return min(limit, CPU_BLOCK_ELEMENTS if cpu_cap is None else cpu_cap)


def vector_products_on_cpu(values: Tensor) -> bool:
    """Whether a block's products with ``values`` (B, m, d) run as an elementwise product and a sum: d = 1 on CPU,
    where a batched matrix-vector ``bmm`` runs about 6x slower."""
    return values.shape[-1] == 1 and values.device.type == "cpu"


# The CPU's batched matrix products (MKL's gemm) run up to 5x faster with the values' short side d as the output's rows,
# ``(x^T @ P^T)^T``, once a product has some work, n is not short and d is narrow; measured on an AMD EPYC (torch 2.13
# + MKL 2024.2, 1 thread), float64: (64, 100, 16) 2.5 -> 1.5 ms, (64, 100, 1) 0.87 -> 0.18 ms, (3, 1000, 16) 11 -> 5.5
# ms; fp32: (76, 100, 16) 0.66 -> 0.47 ms, (11, 256, 1) 0.86 -> 0.19 ms; but (256, 8, 16) 0.07 -> 0.18 ms (n short).
# GPUs keep the plain product (cuBLAS takes either layout).
SWAPPED_PRODUCT_ELEMENTS = 1 << 15
SWAPPED_PRODUCT_MIN_N = 32


def batched_product(weights: Tensor, values: Tensor) -> Tensor:
    """``weights @ values``: (B, r, m) (or a transposed view) times (B, m, d) -> (B, r, d), as a transposed view
    ``(values^T @ weights^T)^T`` where that is faster (see SWAPPED_PRODUCT_ELEMENTS): the same sums, contiguous only
    if the caller makes it so."""
    if swaps_product(*weights.shape, values.shape[-1], values.device):
        return torch.bmm(values.transpose(1, 2), weights.transpose(1, 2)).transpose(1, 2)
    return torch.bmm(weights, values)


def swaps_product(batch: int, rows: int, m: int, width: int, device: torch.device | str) -> bool:
    """Whether ``batched_product`` of (batch, rows, m) weights and (batch, m, width) values runs swapped."""
    short = min(rows, m)
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return (device_type == "cpu" and short >= SWAPPED_PRODUCT_MIN_N and 4 * width <= short
            and batch * rows * m >= SWAPPED_PRODUCT_ELEMENTS)


class TorchBackend:
    """PyTorch path: dense blocks of (lists, rows, columns) entries, each a handful of large tensor operations.

    Short lists: the whole problem at once (at most DENSE_ELEMENTS entries; the forward's weights are saved for the
    backward), or batch chunks of that size for large batches of lists up to DENSE_MAX_N long. Long lists: blocks of
    consecutive rows with the columns their windows reach (windows move right with p, so a block of rows needs one
    contiguous column range: no gathers), at most BLOCK_ELEMENTS entries, recomputed in the backward: O(B n d) extra
    memory plus one block. A block holds every row's whole window (and some columns beyond it, whose weights are
    below the band's bound anyway: included, they make the result closer to the dense one, not further)."""

    name = "torch"

    @staticmethod
    def dense(batch: int, n: int, device: torch.device | str) -> bool:
        """Whether the dense (one-shot or batch-chunked) evaluation runs, not the windowed row blocks."""
        one_shot = TorchBackend.saves_weights(batch, n, device)
        return one_shot or (n <= DENSE_MAX_N and n * n <= block_limit(DENSE_ELEMENTS, device))

    @staticmethod
    def saves_weights(batch: int, n: int, device: torch.device | str) -> bool:
        """Whether the forward returns its weights for the backward (the one-shot evaluation: at most
        ONE_SHOT_ELEMENTS of them on a GPU, CPU_ONE_SHOT_ELEMENTS on CPU) instead of an empty tensor."""
        return 0 < batch * n * n <= block_limit(ONE_SHOT_ELEMENTS, device, CPU_ONE_SHOT_ELEMENTS)

    def has_counts(self, batch: int, n: int, device: torch.device | str, masked: bool) -> bool:
        """Whether the terms of ``P_hat @ x`` count ties (``count``, ``less``, ``not_greater``; else empty): all but
        one-shot problems, whose lean backward takes the signs densely (``_one_shot``)."""
        return not self.saves_weights(batch, n, device)

    def lean(self, batch: int, n: int, device: torch.device | str) -> bool:
        """Whether ``P_hat @ x`` takes the lean path (``_one_shot``), padded or not: every one-shot problem
        (``saves_weights``)."""
        return self.saves_weights(batch, n, device)

    @staticmethod
    def fuses_apply(batch: int, n: int, d: int) -> bool:
        """Whether ``prepare_and_apply`` serves ``P_hat @ x``: never (``prepare``, then ``apply_forward``)."""
        return False

    def has_windows(self, batch: int, n: int, device: torch.device | str) -> bool:
        """Whether ``prepare`` computes the rows' windows (the row blocks) or leaves them empty (dense)."""
        return not self.dense(batch, n, device)

    def prepare(self, scores: Tensor, tau: Tensor, banded: bool, values: Tensor | None = None,
                mask: Tensor | None = None) -> SortedTerms:
        terms = sorted_terms(scores, tau, banded, windows=not self.dense(*scores.shape, scores.device), mask=mask)
        if not validation_enabled():  # unchecked inputs: the one rule for non-finite values (see poison_lists)
            source = terms.t if mask is None else scores
            terms.t.add_(poison_lists(source, values, mask)[:, None])
        return terms

    def _blocks(self, terms: SortedTerms) -> list[tuple[slice, slice, slice]]:
        """(lists, rows, columns) of each block; every (list, row) is in exactly one block."""
        batch, n = terms.t.shape
        if batch == 0 or n == 0:
            return []
        device = terms.t.device
        if self.dense(batch, n, device):
            step = max(1, block_limit(DENSE_ELEMENTS, device) // (n * n))
            return [(slice(b0, min(b0 + step, batch)), slice(0, n), slice(0, n)) for b0 in range(0, batch, step)]
        # Rows per block: a quarter of the widest window (a block spans its rows' windows: rows + window columns,
        # so 80% of its entries are inside them; measured fastest on CPU at n = 4096 to 65536 against 1/8, 1/2 and
        # 1), at least 32, fewer if a block would exceed BLOCK_ELEMENTS. Two read-backs for the whole loop.
        widest = max(1, int((terms.upper - terms.lower + 1).amax()))
        rows = max(widest // 4, 32)
        entries = block_limit(BLOCK_ELEMENTS, device) / batch
        rows = min(rows, max(1, int((math.sqrt(widest**2 + 4 * entries) - widest) / 2)), n)
        starts = list(range(0, n, rows))
        last_rows = torch.tensor([min(p0 + rows, n) - 1 for p0 in starts], device=terms.t.device)
        bounds = torch.stack([terms.lower[:, ::rows].amin(0), terms.upper[:, last_rows].amax(0) + 1]).tolist()
        return [(slice(0, batch), slice(p0, min(p0 + rows, n)), slice(c0, max(c0, c1)))
                for p0, c0, c1 in zip(starts, *bounds, strict=True)]

    def matrix_forward(self, terms: SortedTerms, tau: Tensor, descending: bool, banded: bool,
                       dtype: torch.dtype) -> Tensor:
        """P_hat (B, n, n) in the caller's coordinates (exact zeros outside the band when ``banded``)."""
        work = compute_dtype(dtype)
        batch, n = terms.t.shape
        out = torch.zeros((batch, n, n), device=terms.t.device, dtype=dtype)  # by sorted row, input column
        for lists, rows, cols in self._blocks(terms):
            chunk = terms.lists(lists.start, lists.stop)
            weights = _block_weights(chunk, tau, rows, cols, work, banded=banded)
            weights /= weights.sum(-1, keepdim=True).clamp_(min=1.0)
            index = chunk.order[:, None, cols].expand_as(weights)
            if (rows, cols) == (slice(0, n), slice(0, n)):  # a whole list: every column written
                out[lists] = torch.empty_like(weights).scatter_(2, index, weights).to(dtype)
            else:
                out[lists, rows].scatter_(2, index, weights.to(dtype))
        return rows_to_output(out, descending, terms)

    def apply_forward(self, terms: SortedTerms, x: Tensor, tau: Tensor, descending: bool, banded: bool
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, n, d) in input order -> (P_hat @ x (B, n, d) by output row, row sums (B, n) float64 by sorted row,
        padded rows 0 and 1; an empty tensor: no weights are saved, one-shot problems take the lean path). Row sums
        stay float64: a row's rounding error would rescale all of its dz in the backward, and d_scores is a sum over
        rows whose contributions largely cancel."""
        work = compute_dtype(x.dtype)
        batch, n, d = x.shape
        xw = real_rows(to_sorted(x, terms.order).to(work), terms)
        out = torch.zeros((batch, n, d), device=x.device, dtype=work)
        norm = torch.ones((batch, n), device=x.device, dtype=torch.float64)
        for lists, rows, cols in self._blocks(terms):
            out[lists, rows], norm[lists, rows] = _forward_block(terms.lists(lists.start, lists.stop), tau, rows, cols,
                                                                 xw[lists, cols])
        return rows_to_output(out, descending, terms).to(x.dtype), norm, x.new_empty(0, dtype=torch.float64)

    def apply_transposed(self, terms: SortedTerms, v: Tensor, tau: Tensor, descending: bool,
                         banded: bool) -> tuple[Tensor, Tensor, Tensor]:
        """v (B, n, d) by output row -> (P_hat^T @ v (B, n, d) by input item, row sums (B, n) float64, an empty
        tensor). Column sums over row blocks accumulate in float64."""
        work = compute_dtype(v.dtype)
        batch, n, d = v.shape
        v_rows = real_rows(rows_to_output(v, descending, terms).to(work), terms)
        out = torch.zeros((batch, n, d), device=v.device, dtype=torch.float64)
        norm = torch.ones((batch, n), device=v.device, dtype=torch.float64)
        for lists, rows, cols in self._blocks(terms):
            chunk = terms.lists(lists.start, lists.stop)
            block_weights, norm[lists, rows] = _weights_and_row_sums(chunk, tau, rows, cols, work)
            scaled = v_rows[lists, rows] / norm[lists, rows, None].to(work)
            out[lists, cols] += batched_product(block_weights.transpose(1, 2), scaled)
        return from_sorted(out, terms.order).to(v.dtype), norm, v.new_empty(0, dtype=torch.float64)

    def apply_backward(self, terms: SortedTerms, x: Tensor, grad: Tensor, norm: Tensor, tau: Tensor,
                       descending: bool, banded: bool, need_tau: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """Gradients of P_hat @ x: (d_scores (B, n), d_x (B, n, d), both in input order, and
        sum_pm dz_pm D_p(m) per batch row (B,) float64 when ``need_tau``, else None). grad: (B, n, d) by output row.
        The weights are recomputed block by block, as the forward made them.

        Per block, in float64 (``_backward_block``): dz_pm = P_pm (g_p . x_m - Delta_p) with Delta_p recomputed as
        sum_m P_pm (g_p . x_m) from the very weights dz uses, then the column sums dx = P^T g, r_m = sum_p dz_pm and
        sum_p c_p dz_pm (c_p = 2p + 1 - m); u_m = sum_p (c_p - cnt_m) dz_pm."""
        batch, n, d = x.shape
        x64 = real_rows(to_sorted(x, terms.order).to(torch.float64), terms)
        g64 = real_rows(rows_to_output(grad, descending, terms).to(torch.float64), terms)
        if terms.masked:
            coefficient = positions(n, x.device, 2, 1)[None, :] - terms.length[:, None].to(torch.float64)
        else:
            coefficient = positions(n, x.device, 2, 1 - n)[None, :].expand(batch, n)
        columns = torch.zeros((batch, n, d + 2), device=x.device, dtype=torch.float64)
        tau_terms = torch.zeros(batch, device=x.device, dtype=torch.float64) if need_tau else None
        for lists, rows, cols in self._blocks(terms):
            block_columns, block_tau = _backward_block(
                terms.lists(lists.start, lists.stop), tau, rows, cols, x64[lists, cols], g64[lists, rows],
                norm[lists, rows], coefficient[lists, rows], need_tau, compute_dtype=compute_dtype(x.dtype))
            columns[lists, cols] += block_columns
            if need_tau:
                tau_terms[lists] += block_tau
        dx, r = columns[..., :d], columns[..., d]
        u = columns[..., d + 1] - terms.count * r
        d_scores = signed_sum_gradient(terms, u, r, tau, x.dtype)
        return d_scores, from_sorted(dx, terms.order).to(x.dtype), tau_terms


def _weights_and_row_sums(terms: SortedTerms, tau: Tensor, rows: slice, cols: slice, work: torch.dtype
                          ) -> tuple[Tensor, Tensor]:
    """A block's weights in ``work`` (fp32 or float64) and their row sums (B, rows), accumulated in float64."""
    block_weights = _block_weights(terms, tau, rows, cols, work)
    return block_weights, _row_sums(block_weights, terms)


def _forward_block(terms: SortedTerms, tau: Tensor, rows: slice, cols: slice, x_cols: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """One block of the forward: (P x (B, rows, d) in x_cols' dtype, row sums (B, rows) float64). x_cols:
    (B, cols, d) by sorted position, fp32 or float64 (the work dtype). Large temporaries are reused in place: on CPU
    a fresh block-sized allocation costs about as much as a pass over it (page faults)."""
    work = x_cols.dtype
    block_weights, norm = _weights_and_row_sums(terms, tau, rows, cols, work)
    if vector_products_on_cpu(x_cols) and work != torch.float64:  # a product and a sum in place
        out = block_weights.mul_(x_cols.transpose(1, 2)).sum(-1, keepdim=True)
    else:
        out = batched_product(block_weights, x_cols)
    return out.div_(norm[..., None]), norm


def _backward_block(terms: SortedTerms, tau: Tensor, rows: slice, cols: slice, x_cols: Tensor, g_rows: Tensor,
                    norm: Tensor, coefficient: Tensor, need_tau: bool, compute_dtype: torch.dtype = torch.float32
                    ) -> tuple[Tensor, Tensor | None]:
    """One block of the backward, float64: (columns (B, cols, d + 2) = [P^T g, sum_p dz_pm, sum_p c_p dz_pm] and
    the tau terms sum_pm dz_pm D_p(m) (B,) if ``need_tau``). x_cols (B, cols, d), g_rows (B, rows, d), norm and
    coefficient (B, rows) float64; the weights are recomputed as the forward made them (``compute_dtype``). One
    block-sized scratch buffer, reused in place."""
    logits = _block_logits(terms, tau, rows, cols)
    block_weights = _block_weights(terms, tau, rows, cols, compute_dtype, logits=logits)
    weights = block_weights.to(torch.float64) if need_tau else logits.copy_(block_weights)
    scratch = torch.empty_like(weights)
    inv_norm = norm.reciprocal()[..., None]
    g_scaled = g_rows * inv_norm
    if vector_products_on_cpu(x_cols):
        dx = torch.mul(weights, g_scaled, out=scratch).sum(1)[..., None]
        gx = torch.mul(g_rows, x_cols.transpose(1, 2), out=scratch)
    else:
        dx = batched_product(weights.transpose(1, 2), g_scaled)
        gx = torch.bmm(g_rows, x_cols.transpose(1, 2), out=scratch)
    dz = gx.mul_(weights)  # w_pm g_p . x_m
    delta = dz.sum(-1, keepdim=True).mul_(inv_norm)  # Delta_p
    dz.addcmul_(weights, delta, value=-1).mul_(inv_norm)
    r = dz.sum(1)
    tau_terms = logits.mul_(dz).sum((1, 2)).mul_(-tau) if need_tau else None  # D = -tau * logits
    c_dz = dz.mul_(coefficient[..., None]).sum(1)
    return torch.cat([dx, r[..., None], c_dz[..., None]], dim=-1), tau_terms


class TritonBackend:
    """Triton kernels; fp32/fp16/bf16 values with fp32 accumulation, drops in float64 (see kernels/).

    A forward is one ``torch.sort`` and two launches (``prepare``, the forward kernel); a backward three launches
    (row pass, column pass, ``finish``): the permutations live in the kernels' loads and stores, and nothing reads
    a result back to the host. Short lists (``fuses_apply``: n <= ``kernels.configs.SHORT_MAX_N``) take one launch
    per pass, one program per list. Padded lists cost two more operations (the sort key and the lengths); the
    kernels take each list's length at run time."""

    name = "triton"

    @staticmethod
    def has_windows(batch: int, n: int, device: torch.device | str) -> bool:
        return True

    @staticmethod
    def has_counts(batch: int, n: int, device: torch.device | str, masked: bool) -> bool:
        return True

    @staticmethod
    def _sorted(scores: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(sorted scores, order, real items per list or None): padded items sort last (+inf keys)."""
        key = scores.detach() if mask is None else torch.where(mask, scores.detach(), float("inf"))
        sorted_scores, order = torch.sort(key, dim=-1, stable=True)
        return sorted_scores, order, None if mask is None else mask.sum(-1)

    def prepare(self, scores: Tensor, tau: Tensor, banded: bool, values: Tensor | None = None,
                mask: Tensor | None = None) -> SortedTerms:
        """Always folds ``poison_lists`` into t (in the kernel, for free), and always counts ties."""
        from .kernels import launch

        sorted_scores, order, lengths = self._sorted(scores, mask)
        x = values.detach().contiguous() if values is not None else None
        return SortedTerms(order=order, **launch.prepare(sorted_scores, order, tau.reshape(1), banded, x, lengths),
                           masked=mask is not None)

    @staticmethod
    def fuses_apply(batch: int, n: int, d: int) -> bool:
        """Whether ``prepare_and_apply`` serves ``P_hat @ x`` (short lists: one launch after the sort)."""
        from .kernels import launch

        return batch > 0 and launch.is_short(n)

    def prepare_and_apply(self, scores: Tensor, x: Tensor, tau: Tensor, descending: bool, banded: bool,
                          mask: Tensor | None = None) -> tuple[SortedTerms, Tensor, Tensor, Tensor]:
        """``prepare`` and ``apply_forward`` in one launch (``fuses_apply``): (terms, out, row sums, no weights)."""
        from .kernels import launch

        sorted_scores, order, lengths = self._sorted(scores, mask)
        terms, out, norm = launch.short_apply(sorted_scores, order, x.contiguous(), tau.reshape(1), banded,
                                              descending, lengths)
        return (SortedTerms(order=order, **terms, masked=mask is not None), out, norm,
                x.new_empty(0, dtype=torch.float64))

    @staticmethod
    def _windowed(terms: SortedTerms) -> dict[str, Tensor]:
        return {"t": terms.t, "w": terms.w, "lower": terms.lower, "upper": terms.upper, "length": terms.length,
                "order": terms.order}

    def matrix_forward(self, terms: SortedTerms, tau: Tensor, descending: bool, banded: bool,
                       dtype: torch.dtype) -> Tensor:
        from .kernels import launch

        return launch.matrix_forward(**self._windowed(terms), tau=tau.reshape(1), descending=descending,
                                     out_dtype=dtype)

    @staticmethod
    def saves_weights(batch: int, n: int, device: torch.device | str) -> bool:
        return False

    def apply_forward(self, terms: SortedTerms, x: Tensor, tau: Tensor, descending: bool, banded: bool
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """(out, row sums, an empty tensor: the kernels save no weights)."""
        from .kernels import launch

        out, norm = launch.apply_forward(**self._windowed(terms), x=x.contiguous(), tau=tau.reshape(1),
                                         descending=descending)
        return out, norm, x.new_empty(0, dtype=torch.float64)

    def apply_transposed(self, terms: SortedTerms, v: Tensor, tau: Tensor, descending: bool,
                         banded: bool) -> tuple[Tensor, Tensor, Tensor]:
        """The row sums (the forward kernel with no values), then the column pass without the scores' terms."""
        from .kernels import launch

        windowed, tau = self._windowed(terms), tau.reshape(1)
        _, norm = launch.apply_forward(**windowed, x=v.new_empty((*v.shape[:2], 0)), tau=tau, descending=descending)
        out = launch.apply_transposed(**windowed, v=v.contiguous(), norm=norm, tau=tau, descending=descending)
        return out, norm, v.new_empty(0, dtype=torch.float64)

    def apply_backward(self, terms: SortedTerms, x: Tensor, grad: Tensor, norm: Tensor, tau: Tensor,
                       descending: bool, banded: bool, need_tau: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """Two passes over the tiles, as the column pass needs each row's Delta (a row pass first), then the
        scores gradient from the column sums (``finish``)."""
        from .kernels import launch

        inputs = {**self._windowed(terms), "x": x.contiguous(), "grad": grad.contiguous(), "norm": norm,
                  "tau": tau.reshape(1), "descending": descending}
        if self.fuses_apply(*norm.shape, x.shape[-1]) and x.shape[-1] > 0:  # one launch for short lists
            return launch.short_backward(**inputs, count=terms.count, less=terms.less,
                                         not_greater=terms.not_greater, need_tau=need_tau)
        delta = launch.apply_delta(**inputs)
        dx, u, r, tau_terms = launch.apply_backward(**inputs, count=terms.count, delta=delta, need_tau=need_tau)
        d_scores, tau_rows = launch.finish(u, r, tau_terms, terms.less, terms.not_greater, terms.order,
                                           tau.reshape(1), x.dtype)
        return d_scores, dx, tau_rows


BACKENDS = {"torch": TorchBackend(), "triton": TritonBackend()}
