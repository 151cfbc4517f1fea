"""The two implementations behind the custom ops: PyTorch (row-chunked) and Triton (``triton_sort.kernels``).

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

import os
import warnings

import torch
from torch import Tensor

from ._columns import (
    SortedTerms,
    band_threshold,
    output_rows,
    positions,
    signed_sum,
    sorted_terms,
)
from ._validation import validation_enabled

# Elements of one (B, rows, window) temporary of the PyTorch path; about six of them (float64 ones included)
# are alive at once, so a chunk costs at most ~15 MiB whatever n is (the extra memory stays far below the dense
# matrix: 40 MiB at n = 16384 against 5 GiB, perf_reports/*/scaling.md).
CHUNK_ELEMENTS = 1 << 18


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _band_weights(t: Tensor, w: Tensor, t_rows: Tensor, w_rows: Tensor, lower_rows: Tensor, upper_rows: Tensor,
                  rows: Tensor, offsets: Tensor, neg_inv_tau: Tensor, dtype: torch.dtype,
                  keep_drop: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """exp(-D_p(m) / tau) for a chunk of rows, each over its own window m = L_p + offsets (0 past R_p).

    t, w: (B, n) float64; *_rows: (B, rows); rows: (rows,) float64 positions p; offsets: (width,).
    Returns (weights (B, rows, width) of ``dtype``, columns (B, rows, width) clamped to n - 1, and the float64 drops
    D_p(m) if ``keep_drop``, for the tau gradient). Drops are differences of float64 prefix sums, so they are formed
    in float64; the weights' exponent is rounded to ``dtype`` (fp32: a relative error of |D / tau| * 2^-24, below
    1e-7 for every weight above 1e-3)."""
    cols = lower_rows[..., None] + offsets
    inside = cols <= upper_rows[..., None]
    cols = cols.clamp(max=t.shape[1] - 1)
    flat = cols.flatten(1)
    t_m = torch.gather(t, 1, flat).view_as(cols)
    w_m = torch.gather(w, 1, flat).view_as(cols)
    # In place: the eager path is bound by memory passes over these (B, rows, width) temporaries.
    drop = t_m.neg_().add_(t_rows[..., None]).mul_((2 * rows - 1)[None, :, None])  # (2p - 1)(t_p - t_m)
    drop.sub_(w_m.neg_().add_(w_rows[..., None]).mul_(2))  # - 2 (W_p - W_m)
    logits = drop.mul(neg_inv_tau) if keep_drop else drop.mul_(neg_inv_tau)
    weights = logits.masked_fill_(~inside, float("-inf")).to(dtype).exp_()
    return weights, cols, (drop if keep_drop else None)


def _gather_rows(values: Tensor, cols: Tensor) -> Tensor:
    """values (B, n, d) at columns (B, rows, width) -> (B, rows, width, d)."""
    d = values.shape[-1]
    return torch.gather(values, 1, cols.flatten(1)[..., None].expand(-1, -1, d)).view(*cols.shape, d)


def _forward_chunk(t, w, t_rows, w_rows, lower_rows, upper_rows, rows, offsets, neg_inv_tau, x):
    """(y (B, rows, d), row sums (B, rows)) of a chunk of rows; x (B, n, d) in the compute dtype."""
    weights, cols, _ = _band_weights(t, w, t_rows, w_rows, lower_rows, upper_rows, rows, offsets, neg_inv_tau,
                                     x.dtype)
    # The row sums are kept in float64: a row's rounding error rescales all of its dz in the backward, and
    # d_scores is a sum over rows whose contributions largely cancel.
    # Padded rows (empty windows) sum to 0: 1 keeps them 0 / 1; real rows sum to >= 1 (their peak weighs 1).
    norm = weights.sum(-1, dtype=torch.float64).clamp_(min=1.0)
    return (weights[..., None] * _gather_rows(x, cols)).sum(2) / norm[..., None].to(x.dtype), norm


def _backward_chunk(t, w, t_rows, w_rows, lower_rows, upper_rows, rows, offsets, neg_inv_tau, x, g_rows,
                    norm_rows, count, length, dtype: torch.dtype, need_tau: bool):
    """Column contributions of a chunk of rows: (columns (B, rows * width), P^T g terms (B, rows * width, d),
    dz (B, rows * width), (c_p - cnt_m) dz (B, rows * width), sum_pm dz_pm D_p(m) per batch row (B,) or None),
    in float64.

    Each chunk holds whole rows, so Delta_p = sum_m P_pm (g_p . x_m) is recomputed from the very weights it
    goes with (each row of dz sums to 0) and the small differences g_p . x_m - Delta_p are formed in float64:
    where P is nearly a permutation they cancel, and d_scores would otherwise carry fp32 rounding."""
    weights, cols, drop = _band_weights(t, w, t_rows, w_rows, lower_rows, upper_rows, rows, offsets, neg_inv_tau,
                                        dtype, keep_drop=need_tau)
    p = weights.to(torch.float64) / norm_rows[..., None]
    gx = (g_rows[:, :, None, :] * _gather_rows(x, cols)).sum(-1)
    dz = p * (gx - (p * gx).sum(-1, keepdim=True))
    flat = cols.flatten(1)
    # Centred form: c_p - cnt_m (c_p = 2p + 1 - m) is small near the peak, so no two large sums cancel.
    centred = ((2 * rows + 1)[None, :, None] - length[:, None, None]) - torch.gather(count, 1, flat).view_as(cols)
    batch, d = g_rows.shape[0], g_rows.shape[-1]
    tau_terms = (dz * drop).sum((1, 2)) if need_tau else None
    return (flat, (p[..., None] * g_rows[:, :, None, :]).view(batch, -1, d), dz.flatten(1),
            (dz * centred).flatten(1), tau_terms)


# Problems with at least this many (row, column) pairs in their windows run their chunks through torch.compile:
# fused loops instead of a dozen memory passes per elementwise step, about 8x faster on CPU, for a one-off
# compilation of 15-20 s (cached on disk afterwards). Smaller problems, and all of them when compilation is
# unavailable or TRITON_SORT_COMPILE=0, run eagerly; the results are the same.
COMPILE_MIN_ELEMENTS = 1 << 22
_compiled: dict[str, object] = {}


def _chunk_function(name: str, fn, total: int):
    if total < COMPILE_MIN_ELEMENTS or os.environ.get("TRITON_SORT_COMPILE", "1") == "0":
        return fn
    if name not in _compiled:
        _compiled[name] = _fallback_on_error(torch.compile(fn, dynamic=True), fn, name)
    return _compiled[name]


def _fallback_on_error(compiled, eager, name: str):
    def run(*args):
        try:
            return compiled(*args)
        except Exception as exc:  # no C++ compiler, unsupported platform, ...: the eager path is always there
            warnings.warn(f"triton_sort: torch.compile of the PyTorch path failed ({type(exc).__name__}: {exc}); "
                          "running it eagerly", RuntimeWarning, stacklevel=2)
            _compiled[name] = eager
            return eager(*args)

    return run


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
# coordinates: a fixed, small number of operations whatever n is (no windows, no chunks, no host
# synchronisation), where the per-call overhead, not the O(n^2) work, is what costs. 2^22 entries keep each float64
# temporary at 32 MiB; above it the banded, row-chunked path runs in O(B n d) extra memory.
DENSE_ELEMENTS = 1 << 22
# Lists up to this long are evaluated densely at any batch size, in batch chunks of at most DENSE_ELEMENTS entries
# (without saving the weights: recomputed per chunk in the backward): their band covers much of the row, and a
# dense entry costs a third of a windowed one (no gathers), so the band saves nothing there.
DENSE_MAX_N = 512


def dense_drops(t: Tensor, w: Tensor) -> Tensor:
    """D_p(m) = (2p - 1)(t_p - t_m) - 2 (W_p - W_m) for every (p, m): (B, n, n) float64 from t, w (B, n)."""
    drop = (t[:, :, None] - t[:, None, :]).mul_(positions(t.shape[-1], t.device, 2, -1)[:, None])
    return drop.sub_(w[:, :, None] - w[:, None, :], alpha=2)


# The smallest exponent whose exp is a normal number, per dtype: exp of anything below it is a denormal or 0, which
# CPUs compute on a slow path (measured: exp of 4M fp32 values at -90 took 150 ms, at -87 9 ms). Such weights
# (< 1e-37 of their row's peak, exactly 1) change no sum; the band and the masks still set exact zeros.
EXP_FLOOR = {torch.float32: -87.0, torch.float64: -708.0}


def _dense_logits(terms: SortedTerms, tau: Tensor) -> Tensor:
    """-D_p(m) / tau for every (p, m): (B, n, n) float64 in two passes over it.

    With s = -1 / tau, s D_p(m) = a_p + b_m - k_p t_m: k_p = s (2p - 1), a_p = k_p t_p - 2 s W_p, b_m = 2 s W_m, so
    one broadcast sum and one broadcast multiply-add (instead of a difference of t, one of W, their scaling and
    combination). The rounding is that of the terms themselves, about 1e-16 |W| / tau, as for the difference
    form: W's own float64 rounding bounds both."""
    s = tau.reciprocal().neg_()
    k = positions(terms.n, terms.t.device, 2, -1) * s
    b = terms.w * (2 * s)
    a = torch.addcmul(b.neg(), k, terms.t)
    return (a[:, :, None] + b[:, None, :]).addcmul_(k[None, :, None], terms.t[:, None, :], value=-1)


def _dense_weights(terms: SortedTerms, tau: Tensor, banded: bool, dtype: torch.dtype) -> Tensor:
    """exp(-D_p(m) / tau) for every (p, m), (B, n, n) of ``dtype``; exactly 0 past the band's threshold when
    ``banded`` (like the windows of the chunked path) and on padded rows and columns."""
    logits = _dense_logits(terms, tau).to(dtype).clamp_(min=EXP_FLOOR[dtype])
    if banded:
        logits.masked_fill_(logits < -band_threshold(terms.n), float("-inf"))
    if terms.masked:  # padded rows and columns weigh 0
        valid = terms.valid()
        logits = torch.where(valid[:, :, None] & valid[:, None, :], logits, float("-inf"))
    return logits.exp_()


def signed_sum_gradient(terms: SortedTerms, u: Tensor, r: Tensor, tau: Tensor, dtype: torch.dtype) -> Tensor:
    """d_scores = (u_m - sum_k sign(t_m - t_k) r_k) / tau in sorted order (MATH.md, section 4), to input order."""
    return from_sorted((u - signed_sum(terms, r)).div_(tau), terms.order).to(dtype)


def list_poison(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """0 per list, NaN for a list with a non-finite entry among the real ones (``mask`` (B, n) True; all if None):
    values (B, n) or (B, n, d) -> (B,) float64."""
    if mask is not None:
        values = torch.where(mask.reshape(*mask.shape, *([1] * (values.dim() - 2))), values, 0)
    return values.sum(tuple(range(1, values.dim())), dtype=torch.float64).mul_(0)


def poison_lists(t: Tensor, values: Tensor | None, mask: Tensor | None = None) -> Tensor:
    """0 per list, NaN for a list with a non-finite score or value: (B,) float64 from t (B, n) (sorted scores, or
    the scores themselves) and values (B, n, d), counting only the real items of ``mask`` (B, n) if given.

    Added to the sorted scores ``t`` when validation is off, it makes every drop, output and gradient of such a list
    NaN, on every path alike (the Triton ``prepare`` kernel does the same), instead of NaN reaching whichever rows
    a path's windows or tiles happen to mix it into."""
    poison = list_poison(t, mask)
    return poison if values is None else poison.add_(list_poison(values, mask))


class TorchBackend:
    """PyTorch path: small problems in one go (``DENSE_ELEMENTS``), larger ones row-chunked in O(B * n * d + chunk)
    memory with no autograd graph over the temporaries. Each row of a chunk gathers exactly its own window, so the
    work is n * (mean window), not a rectangle per block."""

    name = "torch"

    @staticmethod
    def dense(batch: int, n: int) -> bool:
        """Whether the dense (one-shot or batch-chunked) evaluation runs, not the windowed row chunks."""
        return n * n <= DENSE_ELEMENTS and (batch * n * n <= DENSE_ELEMENTS or n <= DENSE_MAX_N)

    @staticmethod
    def _batch_chunks(batch: int, n: int) -> list[tuple[int, int]]:
        """Lists [b0, b1) evaluated together: at most DENSE_ELEMENTS (list, row, column) entries each."""
        step = max(1, DENSE_ELEMENTS // max(n * n, 1))
        return [(b0, min(b0 + step, batch)) for b0 in range(0, batch, step)] or [(0, 0)]

    def has_windows(self, batch: int, n: int) -> bool:
        """Whether ``prepare`` computes the rows' windows (the chunked path) or leaves them empty (dense)."""
        return not self.dense(batch, n)

    def prepare(self, scores: Tensor, tau: Tensor, banded: bool, values: Tensor | None = None,
                mask: Tensor | None = None) -> SortedTerms:
        terms = sorted_terms(scores, tau, banded, windows=not self.dense(*scores.shape), mask=mask)
        if not validation_enabled():  # unchecked inputs: the one rule for non-finite values (see poison_lists)
            source = terms.t if mask is None else scores
            terms.t.add_(poison_lists(source, values, mask)[:, None])
        return terms

    @staticmethod
    def _chunks(terms: SortedTerms, tau: Tensor, d: int):
        """Yields (p0, p1, total, chunk arguments) for row chunks of at most CHUNK_ELEMENTS (row, column, d) pairs;
        ``total`` is the number of (row, column) pairs of the whole problem's windows."""
        batch, n = terms.t.shape
        if batch == 0 or n == 0:
            return
        windows = (terms.upper - terms.lower + 1).clamp_(min=0)
        widths = windows.amax(0)
        # One read-back for the sizes of the whole loop (total, step and the chunks' widths).
        total, widest = (int(v) for v in torch.stack([windows.sum(), widths.max()]).tolist())
        step = max(1, CHUNK_ELEMENTS // (batch * max(widest, 1) * max(1, d)))
        block_widths = torch.nn.functional.pad(widths, (0, -n % step)).view(-1, step).amax(1).tolist()
        neg_inv_tau = (-1.0 / tau).to(torch.float64)
        for p0, width in zip(range(0, n, step), block_widths, strict=True):
            p1 = min(p0 + step, n)
            rows = positions(n, terms.t.device)[p0:p1]
            offsets = torch.arange(width, device=terms.t.device)
            yield p0, p1, total, (
                terms.t, terms.w, terms.t[:, p0:p1], terms.w[:, p0:p1], terms.lower[:, p0:p1],
                terms.upper[:, p0:p1], rows, offsets, neg_inv_tau)

    def matrix_forward(self, terms: SortedTerms, tau: Tensor, descending: bool, banded: bool,
                       dtype: torch.dtype) -> Tensor:
        """P_hat (B, n, n) in the caller's coordinates."""
        work = compute_dtype(dtype)
        batch, n = terms.t.shape
        if self.dense(batch, n):
            blocks = []
            for b0, b1 in self._batch_chunks(batch, n):
                chunk = terms.lists(b0, b1)
                weights = _dense_weights(chunk, tau, banded, work)
                norm = weights.sum(-1, keepdim=True)
                weights = weights / (norm.clamp_(min=1.0) if terms.masked else norm)
                index = chunk.order[:, None, :].expand(b1 - b0, n, n)
                blocks.append(rows_to_output(torch.empty_like(weights).scatter_(2, index, weights), descending,
                                             chunk).to(dtype))
            return blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        out = torch.zeros((batch, n, n), device=terms.t.device, dtype=dtype)
        # Padded lists' rows move per list: written by sorted row, then reordered once.
        out_row = output_rows(n, descending and not terms.masked, terms.t.device)
        for p0, p1, _, args in self._chunks(terms, tau, 1):
            weights, cols, _ = _band_weights(*args, work)
            weights /= weights.sum(-1, keepdim=True).clamp_(min=1.0)
            input_cols = torch.gather(terms.order, 1, cols.flatten(1)).view_as(cols)
            block = torch.zeros((batch, p1 - p0, n), device=terms.t.device, dtype=work)
            out[:, out_row[p0:p1]] = block.scatter_add_(2, input_cols, weights).to(dtype)
        return rows_to_output(out, descending, terms) if terms.masked else out

    @staticmethod
    def saves_weights(batch: int, n: int) -> bool:
        """Whether the forward returns its weights for the backward (the one-shot evaluation: at most
        DENSE_ELEMENTS of them, 16 MiB in fp32) instead of an empty tensor."""
        return batch * n * n <= DENSE_ELEMENTS

    def _dense_forward(self, terms: SortedTerms, tau: Tensor, banded: bool, work: torch.dtype,
                       weights: Tensor | None) -> tuple[Tensor, Tensor]:
        """The one-shot weights exp(-D / tau) (B, n, n) (``weights`` if the forward saved them) and their row sums in
        float64 (a row's rounding error would rescale all of its dz in the backward, and d_scores is a sum over rows
        whose contributions largely cancel); padded rows sum to 1."""
        if weights is None or weights.numel() == 0:
            # Every column, banded or not: skipping the band's columns saves no work here, and what they weigh
            # (< e^-30 of each row, about 1e-13) is within the band's own bound (two passes fewer).
            weights = _dense_weights(terms, tau, False, work)
        norm = weights.sum(-1, dtype=torch.float64)
        return weights, (norm.clamp_(min=1.0) if terms.masked else norm)

    def apply_forward(self, terms: SortedTerms, x: Tensor, tau: Tensor, descending: bool, banded: bool,
                      weights: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, n, d) in input order -> (P_hat @ x (B, n, d) by output row, row sums (B, n) float64 by sorted row;
        padded rows: 0 and 1, and the one-shot weights for the backward, or an empty tensor; ``weights``: those of
        an earlier forward)."""
        work = compute_dtype(x.dtype)
        batch, n, d = x.shape
        xw = real_rows(to_sorted(x, terms.order).to(work), terms)
        if self.dense(batch, n):
            outs, norms = [], []
            for b0, b1 in self._batch_chunks(batch, n):
                chunk_weights, norm = self._dense_forward(terms.lists(b0, b1), tau, banded, work, weights)
                outs.append(torch.bmm(chunk_weights, xw[b0:b1]).div_(norm[..., None]))
                norms.append(norm)
            out, norm = (outs[0], norms[0]) if len(outs) == 1 else (torch.cat(outs), torch.cat(norms))
            saved = chunk_weights if self.saves_weights(batch, n) else x.new_empty(0, dtype=work)
            return rows_to_output(out, descending, terms).to(x.dtype), norm, saved
        out = torch.empty((batch, n, d), device=x.device, dtype=x.dtype)
        norm = torch.empty((batch, n), device=x.device, dtype=torch.float64)
        for p0, p1, total, args in self._chunks(terms, tau, d):
            y, norm[:, p0:p1] = _chunk_function("forward", _forward_chunk, total)(*args, xw)
            out[:, p0:p1] = y.to(x.dtype)
        return rows_to_output(out, descending, terms), norm, x.new_empty(0, dtype=work)

    def apply_transposed(self, terms: SortedTerms, v: Tensor, tau: Tensor, descending: bool,
                         banded: bool) -> tuple[Tensor, Tensor, Tensor]:
        """v (B, n, d) by output row -> (P_hat^T @ v (B, n, d) by input item, row sums (B, n) float64, the one-shot
        weights or an empty tensor)."""
        work = compute_dtype(v.dtype)
        batch, n, d = v.shape
        v_rows = real_rows(rows_to_output(v, descending, terms).to(work), terms)
        if self.dense(batch, n):
            outs, norms = [], []
            for b0, b1 in self._batch_chunks(batch, n):
                weights, norm = self._dense_forward(terms.lists(b0, b1), tau, banded, work, None)
                outs.append(torch.bmm(weights.transpose(1, 2), v_rows[b0:b1] / norm[..., None].to(work)))
                norms.append(norm)
            out, norm = (outs[0], norms[0]) if len(outs) == 1 else (torch.cat(outs), torch.cat(norms))
            saved = weights if self.saves_weights(batch, n) else v.new_empty(0, dtype=work)
            return from_sorted(out, terms.order).to(v.dtype), norm, saved
        out = torch.zeros((batch, n, d), device=v.device, dtype=work)
        norm = torch.empty((batch, n), device=v.device, dtype=torch.float64)
        for p0, p1, _, args in self._chunks(terms, tau, d):
            weights, cols, _ = _band_weights(*args, work)
            norm[:, p0:p1] = weights.sum(-1, dtype=torch.float64).clamp_(min=1.0)
            scaled = v_rows[:, p0:p1] / norm[:, p0:p1, None].to(work)
            out.scatter_add_(1, cols.flatten(1)[..., None].expand(-1, -1, d),
                             (weights[..., None] * scaled[:, :, None, :]).flatten(1, 2))
        return from_sorted(out, terms.order).to(v.dtype), norm, v.new_empty(0, dtype=work)

    @staticmethod
    def _dense_backward(terms: SortedTerms, weights: Tensor, norm: Tensor, x64: Tensor, g64: Tensor,
                        need_tau: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(dx, u, r, tau terms) in sorted order, float64, from the one-shot weights w (B, n, n) and row sums l.

        With P = w / l, dz_pm = P_pm (g_p . x_m - Delta_p) and Delta_p = g_p . (P x)_p, every column sum is a
        product of w^T with per-row vectors (a = g / l, beta = Delta / l, c = 2p + 1 - m):
        dx = w^T a, r_m = x_m . (w^T a)_m - (w^T beta)_m, u_m = x_m . (w^T c a)_m - (w^T c beta)_m - cnt_m r_m:
        two matrix products over w in float64 (where P is nearly a permutation, r is a small difference of such
        terms; in float64 it keeps about 16 - log10(n) digits of them) and no (B, n, n) temporary but w itself.
        The tau gradient's sum_pm dz_pm D_p(m) needs dz entry by entry: formed only then."""
        batch, n, d = x64.shape
        w64 = weights.to(torch.float64)
        if terms.masked:
            coefficient = positions(n, x64.device, 2, 1)[None, :] - terms.length[:, None]
        else:
            coefficient = positions(n, x64.device, 2, 1 - n)[None, :].expand(batch, n)
        inv_norm = norm.reciprocal()[..., None]
        delta = (torch.bmm(w64, x64) * g64).sum(-1, keepdim=True).mul_(inv_norm)  # (B, n, 1)
        a = g64 * inv_norm
        rows = torch.cat([a, coefficient[..., None] * a, delta * inv_norm, coefficient[..., None] * delta * inv_norm],
                         dim=-1)
        columns = torch.bmm(w64.transpose(1, 2), rows)  # (B, n, 2 d + 2)
        dx = columns[..., :d]
        r = (x64 * dx).sum(-1) - columns[..., 2 * d]
        u = (x64 * columns[..., d:2 * d]).sum(-1) - columns[..., 2 * d + 1] - terms.count * r
        tau_terms = None
        if need_tau:
            gx = g64 * x64.transpose(1, 2) if d == 1 else torch.bmm(g64, x64.transpose(1, 2))
            dz = gx.sub_(delta).mul_(w64).mul_(inv_norm)
            tau_terms = (dz * dense_drops(terms.t, terms.w)).sum((1, 2))
        return dx, u, r, tau_terms

    def apply_backward(self, terms: SortedTerms, x: Tensor, grad: Tensor, norm: Tensor, tau: Tensor,
                       descending: bool, banded: bool, need_tau: bool, weights: Tensor | None = None
                       ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Gradients of P_hat @ x: (d_scores (B, n), d_x (B, n, d), both in input order, and
        sum_pm dz_pm D_p(m) per batch row (B,) float64 when ``need_tau``, else None). grad: (B, n, d) by output row.
        ``weights``: the one-shot forward's (else recomputed).

        Delta_p = sum_m P_pm (g_p . x_m) is recomputed from the very weights dz uses (per chunk of whole rows)."""
        work = compute_dtype(x.dtype)
        batch, n, d = x.shape
        x64 = real_rows(to_sorted(x, terms.order).to(torch.float64), terms)
        g64 = real_rows(rows_to_output(grad, descending, terms).to(torch.float64), terms)
        if self.dense(batch, n):
            parts = []
            for b0, b1 in self._batch_chunks(batch, n):
                chunk = terms.lists(b0, b1)
                if weights is None or weights.numel() == 0:
                    chunk_weights = _dense_weights(chunk, tau, False, work)  # as the forward (_dense_forward)
                else:
                    chunk_weights = weights
                parts.append(self._dense_backward(chunk, chunk_weights, norm[b0:b1], x64[b0:b1], g64[b0:b1],
                                                  need_tau))
            if len(parts) == 1:
                dx, u, r, tau_terms = parts[0]
            else:
                dx, u, r = (torch.cat([part[i] for part in parts]) for i in range(3))
                tau_terms = torch.cat([part[3] for part in parts]) if need_tau else None
        else:
            dx = torch.zeros((batch, n, d), device=x.device, dtype=torch.float64)
            u = torch.zeros((batch, n), device=x.device, dtype=torch.float64)
            r = torch.zeros_like(u)
            tau_terms = torch.zeros(batch, device=x.device, dtype=torch.float64) if need_tau else None
            for p0, p1, total, args in self._chunks(terms, tau, d):
                cols, pg, dz, centred_dz, tau_chunk = _chunk_function(f"backward{int(need_tau)}", _backward_chunk,
                                                                      total)(
                    *args, x64, g64[:, p0:p1], norm[:, p0:p1], terms.count, terms.length, work, need_tau)
                dx.scatter_add_(1, cols[..., None].expand(-1, -1, d), pg)
                r.scatter_add_(1, cols, dz)
                u.scatter_add_(1, cols, centred_dz)
                if need_tau:
                    tau_terms += tau_chunk
        d_scores = signed_sum_gradient(terms, u, r, tau, x.dtype)
        return d_scores, from_sorted(dx, terms.order).to(x.dtype), tau_terms


class TritonBackend:
    """Triton kernels; fp32/fp16/bf16 values with fp32 accumulation, drops in float64 (see kernels/).

    A forward is one ``torch.sort`` and two launches (``prepare``, the forward kernel); a backward three launches
    (row pass, column pass, ``finish``): the permutations live in the kernels' loads and stores, and nothing reads
    a result back to the host. Padded lists cost two more operations (the sort key and the lengths); the kernels
    take each list's length at run time."""

    name = "triton"

    @staticmethod
    def has_windows(batch: int, n: int) -> bool:
        return True

    def prepare(self, scores: Tensor, tau: Tensor, banded: bool, values: Tensor | None = None,
                mask: Tensor | None = None) -> SortedTerms:
        """Always folds ``poison_lists`` into t (in the kernel, for free)."""
        from .kernels import launch

        key = scores.detach() if mask is None else torch.where(mask, scores.detach(), float("inf"))
        sorted_scores, order = torch.sort(key, dim=-1, stable=True)
        lengths = None if mask is None else mask.sum(-1)
        x = values.detach().contiguous() if values is not None else None
        return SortedTerms(order=order, **launch.prepare(sorted_scores, order, tau.reshape(1), banded, x, lengths),
                           masked=mask is not None)

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
    def saves_weights(batch: int, n: int) -> bool:
        return False

    def apply_forward(self, terms: SortedTerms, x: Tensor, tau: Tensor, descending: bool, banded: bool,
                      weights: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(out, row sums, an empty tensor: the kernels save no weights)."""
        from .kernels import launch

        out, norm = launch.apply_forward(**self._windowed(terms), x=x.contiguous(), tau=tau.reshape(1),
                                         descending=descending)
        return out, norm, x.new_empty(0, dtype=torch.float32)

    def apply_transposed(self, terms: SortedTerms, v: Tensor, tau: Tensor, descending: bool,
                         banded: bool) -> tuple[Tensor, Tensor, Tensor]:
        """The row sums (the forward kernel with no values), then the column pass without the scores' terms."""
        from .kernels import launch

        windowed, tau = self._windowed(terms), tau.reshape(1)
        _, norm = launch.apply_forward(**windowed, x=v.new_empty((*v.shape[:2], 0)), tau=tau, descending=descending)
        out = launch.apply_transposed(**windowed, v=v.contiguous(), norm=norm, tau=tau, descending=descending)
        return out, norm, v.new_empty(0, dtype=torch.float32)

    def apply_backward(self, terms: SortedTerms, x: Tensor, grad: Tensor, norm: Tensor, tau: Tensor,
                       descending: bool, banded: bool, need_tau: bool, weights: Tensor | None = None
                       ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Two passes over the tiles, as the column pass needs each row's Delta (a row pass first), then the
        scores gradient from the column sums (``finish``)."""
        from .kernels import launch

        inputs = {**self._windowed(terms), "x": x.contiguous(), "grad": grad.contiguous(), "norm": norm,
                  "tau": tau.reshape(1), "descending": descending}
        delta = launch.apply_delta(**inputs)
        dx, u, r, tau_terms = launch.apply_backward(**inputs, count=terms.count, delta=delta, need_tau=need_tau)
        d_scores, tau_rows = launch.finish(u, r, tau_terms, terms.less, terms.not_greater, terms.order,
                                           tau.reshape(1), x.dtype)
        return d_scores, dx, tau_rows


BACKENDS = {"torch": TorchBackend(), "triton": TritonBackend()}
