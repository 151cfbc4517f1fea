"""Small problems in one go, padded or not: the PyTorch path's fewest operations (``TorchBackend.lean``).

Batches of short lists are the common workload, and there a call's cost is its number of small tensor operations,
not the O(B n^2) work. This evaluation does what the one-shot path does (NeuralSort in sorted coordinates, float64
drops from prefix sums of gaps, weights saved for the backward, the scores gradient from the dense signs; MATH.md
sections 1 and 4) in about 20 operations per pass, by working in the output's own order for rows and in the
input's for columns (items), so that no value, output or gradient is permuted:

- Sorting ``s`` in the output's direction (descending: largest first) gives ``u``, and ``t = sigma u`` with
  ``sigma = -1`` for descending (+1 ascending) is the ascending sort of ``sigma s``. NeuralSort of ``sigma s`` row
  ``p`` (coefficient ``2p + 1 - n``) is output row ``p`` of the requested direction (``-(2p + 1 - n)`` is row p's
  descending coefficient), so rows need no flip; ``sigma`` lives in cached constants and in the order of two
  subtractions, never in an operation of its own.
- Logits ``-D_p(m) / tau = k_p (t_p - t_m) + (b_m - b_p)`` with ``k_p = -(2p - 1) / tau`` and
  ``b_m = -2 W_m / tau``, ``W_m = sum_{q<m} q (t_{q+1} - t_q)`` (the gaps of t are sigma times those of u):
  differences of sorted scores and of prefix sums of gaps, so a row's own column is exactly 0 (weight 1) and
  nothing of the size of the scores is formed. Column m is item ``j = order[m]``: its score and ``b_m`` are
  scattered to the items once (``b_items``), and ``t_m`` is the item's own score. Ties need nothing: tied columns
  have equal logits in every row.

Padded lists (``mask``): padding sorts last and is then set to 0 (finite: it is never a real item), padded columns
weigh exactly 0, padded rows are zeroed in every product, and padded values and gradients are zeroed before any
product (they may hold NaN).

Outputs are float64 until the last cast; inputs are plain ``(B, n)`` scores and ``(B, n, d)`` values.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import torch
from torch import Tensor

from . import _backends
from ._backends import EXP_FLOOR, batched_product
from ._columns import band_threshold, index_positions
from ._validation import tau_checked

_CONSTANTS: dict[tuple[int, str, bool], tuple[Tensor, Tensor]] = {}
_SCALED: dict[tuple[int, str, bool, int], tuple[Tensor, Tensor]] = {}


def _constants(n: int, device: torch.device, descending: bool) -> tuple[Tensor, Tensor]:
    """Per (n, device, direction), cached (a fresh arange is one more launch per call), never written to:
    ``factors`` (4, n) float64, the rows [-(2p - 1); -2 sigma (p - 1); sigma (2p + 1 - n); sigma] that over tau
    give (``lean_terms``'s ``scaled``) the slopes ``k``, the gap weights of ``b`` (entry 0, 0, takes the wrap-around
    difference of a roll) and the rows whose product with dz gives the column sums ``sigma sum_p c_p dz_pm / tau``
    and ``sigma r_m / tau``; ``ones`` (n,)."""
    key = (n, str(device), descending)
    cached = _CONSTANTS.get(key)
    if cached is None:
        if len(_CONSTANTS) > 256:
            _CONSTANTS.clear()
        p = torch.arange(n, dtype=torch.float64, device=device)
        sigma = -1.0 if descending else 1.0
        gap_weights = ((p - 1) * (-2 * sigma)).index_fill_(0, p[:1].long(), 0.0)  # entry 0: u_0 - u_{n-1} (roll)
        factors = torch.stack([1 - 2 * p, gap_weights, (2 * p + 1 - n) * sigma, torch.full_like(p, sigma)])
        cached = _CONSTANTS[key] = (factors, torch.ones_like(p))
    return cached


def _scaled(n: int, device: torch.device, descending: bool, tau: Tensor) -> Tensor:
    """``factors`` over tau (4, n) float64, never written to; cached for the library's own (checked, immutable)
    tensors of Python taus (``mark_tau_checked``): one division fewer per call."""
    factors = _constants(n, device, descending)[0]
    if not tau_checked(tau):
        return factors / tau.detach()
    key = (n, str(device), descending, id(tau))
    cached = _SCALED.get(key)
    if cached is None:  # the entry keeps its tau alive, so no other tensor can take that id while it exists
        if len(_SCALED) > 256:
            _SCALED.clear()
        cached = _SCALED[key] = (tau, factors / tau)
    return cached[1]


# The two (B, n, n) float64 temporaries of a lean call that are consumed where they are made (the score differences
# of the logits and of the backward's signs; the backward's dz) go to scratch buffers kept per thread and reused
# across calls, on CPU from this many entries: there a fresh allocation of that size is mapped anew by the C
# allocator and costs about as much as a pass over it (page faults). Measured, forward + backward, 1 thread:
# (64, 100) 6.1-7.6 -> 5.2-5.3 ms (d = 1), 7.8-9.4 -> 6.3-6.4 ms (d = 16), (12, 256, 16) 8.5-11.7 -> 6.8-6.9 ms.
# They hold at most 2 x 6 MiB per thread (the lean path's CPU limit, ``_backends.CPU_ONE_SHOT_ELEMENTS``); a GPU's
# caching allocator reuses memory by itself.
SCRATCH_MIN_ELEMENTS = 1 << 14
_SCRATCH = threading.local()


def _scratch(slot: str, shape: tuple[int, int, int], device: torch.device) -> Tensor | None:
    """A float64 buffer of ``shape`` for the temporary ``slot`` ("differences" or "dz"), or None (allocate afresh)
    off CPU and below SCRATCH_MIN_ELEMENTS. Its contents last until the slot's next use in this thread."""
    if device.type != "cpu" or not SCRATCH_MIN_ELEMENTS <= math.prod(shape) <= _backends.CPU_ONE_SHOT_ELEMENTS:
        return None  # (larger: the lean matrix's sizes, not kept)
    buffers = _SCRATCH.__dict__
    buffer = buffers.get(slot)
    if buffer is None or buffer.shape != shape:
        with torch.inference_mode(False):  # a normal tensor, writable outside inference mode too
            buffer = buffers[slot] = torch.empty(shape, dtype=torch.float64)
    return buffer


def _differences(rows: Tensor, cols: Tensor, descending: bool) -> Tensor:
    """``t_p - t_j`` (B, n, n) float64 for rows (B, n) and cols (B, n) in u's units (scores, sigma in the operands'
    order): rows by sorted position p, columns by item j (or both by item). In the "differences" scratch buffer:
    consume it before the next call."""
    out = _scratch("differences", (*rows.shape, cols.shape[1]), rows.device)
    if descending:
        return torch.sub(cols.unsqueeze(1), rows.unsqueeze(2), out=out)
    return torch.sub(rows.unsqueeze(2), cols.unsqueeze(1), out=out)


class LeanTerms(NamedTuple):
    """What a lean forward computes per batch of lists and its backward reuses, all (B, n) but ``scaled``.

    Rows are output rows = sorted positions p; columns are items j in input order (so values, outputs by item and
    gradients need no permutation). ``u``: float64 scores sorted in the output's direction (padding last, then set
    to 0: finite, and never a real item); ``order``: int64, ``u = scores[order]`` on real positions; ``b``: float64
    as above, by sorted position; ``scaled``: (4, n) float64, the constant ``factors`` over tau; ``scores``: float64
    by item (padding 0) and ``b_items``: ``b`` at each item's sorted position; ``length``: int64 (B,) real items per
    list, ``valid`` bool (B, n) (sorted position p < length) and ``mask`` bool (B, n) by item, or None unpadded."""

    u: Tensor
    order: Tensor
    b: Tensor
    scaled: Tensor
    scores: Tensor
    b_items: Tensor
    length: Tensor | None
    valid: Tensor | None
    mask: Tensor | None


def lean_terms(u: Tensor, order: Tensor, tau: Tensor, descending: bool, length: Tensor | None = None,
               mask: Tensor | None = None, scores: Tensor | None = None, b: Tensor | None = None) -> LeanTerms:
    """The terms from the sorted scores ``u``, ``order`` and, for padded lists, the lengths (padded positions of u
    are set to 0): prefix sums of gaps, the constants over tau, the items' scores and ``b``. What is at hand is not
    recomputed: ``mask`` by item (else scattered back from the sorted positions), ``scores`` float64 by item
    (unpadded: the very values u was sorted from; else scattered back from u) and ``b`` (a forward's)."""
    n = u.shape[-1]
    valid = None
    if length is not None:
        valid = index_positions(n, u.device)[None, :] < length[:, None]
        mask = from_sorted(valid, order) if mask is None else mask
        u = torch.where(valid, u, 0.0)
    scaled = _scaled(n, u.device, descending, tau)
    if b is None:
        b = torch.cumsum(torch.sub(u, u.roll(1, 1)).mul_(scaled[1]), dim=-1)
    scores = from_sorted(u, order) if scores is None else scores
    return LeanTerms(u, order, b, scaled, scores, from_sorted(b, order), length, valid, mask)


def sort_scores(scores: Tensor, tau: Tensor, descending: bool, mask: Tensor | None = None) -> LeanTerms:
    """Sort and ``lean_terms``. ``mask`` (B, n) bool, True for a real item: padded lists (padding sorts last and may
    hold anything: it is never read)."""
    key = scores.detach().double()
    if mask is None:
        u, order = torch.sort(key, dim=-1, descending=descending, stable=True)
        return lean_terms(u, order, tau, descending, scores=key)
    key = torch.where(mask, key, float("-inf") if descending else float("inf"))
    u, order = torch.sort(key, dim=-1, descending=descending, stable=True)
    return lean_terms(u, order, tau, descending, mask.sum(-1), mask)


def from_sorted(values: Tensor, order: Tensor) -> Tensor:
    """(B, n) by sorted position -> by item."""
    return torch.empty_like(values).scatter_(1, order, values)


def lean_logits(terms: LeanTerms, descending: bool) -> Tensor:
    """-D_p(m) / tau (B, n, n) float64 by output row p and item (finite on padded rows and columns)."""
    b_rows_cols = terms.b_items.unsqueeze(1) - terms.b.unsqueeze(2)
    return b_rows_cols.addcmul_(_differences(terms.u, terms.scores, descending), terms.scaled[0].unsqueeze(1))


def lean_weights(terms: LeanTerms, descending: bool, banded: bool = False) -> Tensor:
    """P_hat by output row and item (B, n, n) float64: real rows sum to 1, padded columns are exactly 0, padded rows
    finite garbage (every product zeroes them: the output's padded rows and the gradient's): exp over the row sum
    (the row maximum is the diagonal's 0, so no shift is needed). The logits are clamped to [EXP_FLOOR, 0]
    (float64's), at every size: exp of a logit below the floor, and products of its near-denormal weight, take
    the CPU's slow path (at tau = 0.1, (64, 100) ran 6x and (1, 100) 1.8x slower unclamped; the clamp is one
    operation); padded rows' logits have no bound either way, real rows' are <= 0 anyway (drops are >= 0).
    ``banded``: exactly 0 past the band's threshold (``relaxed_sort_matrix``'s exact zeros), before the row sums."""
    logits = lean_logits(terms, descending).clamp_(min=EXP_FLOOR[torch.float64], max=0.0)
    outside = logits < -band_threshold(terms.u.shape[-1]) if banded else None
    weights = logits.exp_()  # (torch.softmax: 2 operations fewer, but 1.2x-10x slower on CPU from B n > 16 rows)
    if outside is not None:
        weights.masked_fill_(outside, 0.0)
    if terms.valid is None:
        return weights.div_(weights.sum(-1, keepdim=True))
    weights.mul_(terms.mask.double().unsqueeze(1))
    return weights.div_(weights.sum(-1, keepdim=True).clamp_(min=1.0))  # a list without real items has no weight


def _outer(rows: Tensor, cols: Tensor) -> Tensor:
    """``rows @ cols^T``: (B, n, d) x (B, n, d) -> (B, n, n), in the "dz" scratch buffer; d = 1 as a broadcast
    product (one exact product per entry either way; a K = 1 ``bmm`` ran 10x slower on CPU at (64, 100))."""
    out = _scratch("dz", (rows.shape[0], rows.shape[1], cols.shape[1]), rows.device)
    if rows.shape[-1] == 1:
        return torch.mul(rows, cols.transpose(1, 2), out=out)
    return torch.bmm(rows, cols.transpose(1, 2), out=out)


# Casts by dtype: ``Tensor.double()`` and its kin parse their arguments in a third of ``Tensor.to(dtype)``'s time
# (1-2 us of a call's few hundred, six times per forward + backward).
_CASTS = {torch.float64: Tensor.double, torch.float32: Tensor.float, torch.float16: Tensor.half,
          torch.bfloat16: Tensor.bfloat16}


def _cast(values: Tensor, dtype: torch.dtype) -> Tensor:
    """``values`` in ``dtype``, contiguous (``batched_product`` may return a transposed view): one copy at most."""
    return _CASTS[dtype](values, memory_format=torch.contiguous_format).contiguous()


def _real(values: Tensor, valid: Tensor | None) -> Tensor:
    """(B, n, d) with the entries where ``valid`` (B, n) is False set to 0 (padding may hold NaN)."""
    return values if valid is None else torch.where(valid.unsqueeze(2), values, 0.0)


def lean_backward(probs: Tensor, terms: LeanTerms, rows: Tensor, cols: Tensor, descending: bool,
                  dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The scores gradient of ``a . (P b)`` summed over rows: (d_scores (B, n) by item in ``dtype``, 0 on padded
    items; dz (B, n, n) float64, the logits' gradient, for the tau term, in the "dz" scratch buffer). ``rows``
    (B, n, d) float64 by output row p and ``cols`` (B, n, d) float64 by item, both 0 where padded: the output
    gradient and the values for ``P @ x``, the values and the output gradient for ``P^T @ v``.

    dz_pj = P_pj (a_p . b_j - Delta_p) with Delta_p from the very products dz uses; then, for ``sigma s``, the
    gradient (sum_p c_p dz_pj - cnt_j r_j - sum_k sign(t_j - t_k) r_k) / tau (MATH.md, section 4), the tie terms
    from the dense signs S_kj = sign(t_k - t_j) over items (``sum_k S_kj = -cnt_j`` over real k, S antisymmetric),
    times sigma for ``s``: folded into the constant rows and the signs' operand order (see ``_constants``). A list
    of m real items has ``c_p = 2p + 1 - m``: the constant rows' ``2p + 1 - n`` plus ``n - m``."""
    dz = _outer(rows, cols).mul_(probs)
    dz.addcmul_(probs, dz.sum(-1, keepdim=True), value=-1)
    return lean_scores_gradient(dz, terms, descending, dtype), dz


def lean_scores_gradient(dz: Tensor, terms: LeanTerms, descending: bool, dtype: torch.dtype) -> Tensor:
    """d_scores (B, n) by item in ``dtype`` (0 on padded items) from the logits' gradient dz (B, n, n) float64 by
    output row and item (0 on padded rows and columns); see ``lean_backward``."""
    batch, n = terms.u.shape
    column_sums = torch.bmm(terms.scaled[2:].expand(batch, 2, n), dz)  # sigma / tau [sum_p c_p dz_pj, r_j]
    c_dz, r = column_sums[:, 0], column_sums[:, 1]
    if terms.length is None:
        real = _constants(n, terms.u.device, descending)[1].expand(batch, n)
    else:
        c_dz.addcmul_(r, torch.sub(n, terms.length).unsqueeze(1))
        real = terms.mask.double()
    signs = _differences(terms.scores, terms.scores, descending).sign_()  # S_kj = sign(t_k - t_j)
    # [sigma / tau sum_k r_k S_kj, sum_k S_kj = -cnt_j]: the gradient of sigma s, times sigma: that of s
    tie_sums = torch.bmm(torch.stack([r, real], 1), signs)
    gradient = torch.addcmul(c_dz, tie_sums[:, 1], r).add_(tie_sums[:, 0])  # a fresh, contiguous tensor
    if terms.mask is not None:  # padded items: exactly 0 (their signs are arbitrary)
        gradient = torch.where(terms.mask, gradient, 0.0)
    return _CASTS[dtype](gradient)


def _tau_terms(dz: Tensor, terms: LeanTerms, tau: Tensor, descending: bool) -> Tensor:
    """``sum_pj dz_pj D_p(j)`` (B,) float64, the tau gradient's terms (dL/dtau is their sum over tau^2), from the
    logits' gradient dz: D = -tau * logits."""
    return lean_logits(terms, descending).mul_(dz).sum((1, 2)).mul_(tau.detach()).neg_()


def saved_values(x: Tensor, terms: LeanTerms, transpose: bool) -> Tensor:
    """x (B, n, d) in float64 with padded entries 0: by item, or (``transpose``) by output row."""
    return _real(x.detach().double(), terms.valid if transpose else terms.mask)


def lean_apply(scores: Tensor, x: Tensor, tau: Tensor, descending: bool, transpose: bool, poison: bool,
               mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, LeanTerms, Tensor]:
    """``P_hat @ x`` (x by item, result by output row) or ``P_hat^T @ x`` (``transpose``: x by output row, result
    by item), in x's dtype; also the same in float64 before its cast, and what the backward needs: (out, product,
    P_hat by output row and item (B, n, n), terms, saved), ``saved`` (B, n, d) x in float64, 0 where padded.
    ``mask``: padded lists (a list of m real items gives the call on those items alone in rows 0..m-1; padded rows
    and items are 0). ``poison``: a list with a non-finite real score or value becomes NaN throughout (validation
    off, as on every path: ``_backends.poison_lists``)."""
    terms = sort_scores(scores, tau, descending, mask)
    saved = saved_values(x, terms, transpose)
    if poison:  # a non-finite score already makes all of b NaN (the roll's wrap-around gap, times 0)
        terms.u.add_(saved.sum((1, 2)).mul_(0.0)[:, None])
    probs = lean_weights(terms, descending)
    if transpose:
        product = batched_product(probs.transpose(1, 2), saved)
    else:
        product = _real(batched_product(probs, saved), terms.valid)
    return _cast(product, x.dtype), product, probs, terms, saved


def lean_apply_backward(probs: Tensor, terms: LeanTerms, saved: Tensor, grad: Tensor, tau: Tensor, descending: bool,
                        transpose: bool, need_x: bool, need_tau: bool
                        ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients of ``lean_apply``'s output: (d_scores (B, n), d_x (B, n, d) or None unless ``need_x``, the tau
    terms ``sum_pj dz_pj D_p(j)`` (B,) float64 or None unless ``need_tau``; dL/dtau is their sum over tau^2).
    ``saved``: ``lean_apply``'s; grad (B, n, d) like the output (padded entries ignored)."""
    dtype = grad.dtype
    if transpose:  # w . P^T v = v . P w: d_v = P @ w, and the scores term of P @ w with output gradient v
        rows, cols = saved, _real(grad.double(), terms.mask)
        d_x = _cast(_real(batched_product(probs, cols), terms.valid), dtype) if need_x else None
    else:
        rows, cols = _real(grad.double(), terms.valid), saved
        d_x = _cast(batched_product(probs.transpose(1, 2), rows), dtype) if need_x else None
    d_scores, dz = lean_backward(probs, terms, rows, cols, descending, dtype)
    tau_terms = None
    if need_tau:
        tau_terms = _tau_terms(dz, terms, tau, descending)
    return d_scores, d_x, tau_terms


def lean_matrix(scores: Tensor, tau: Tensor, descending: bool, banded: bool, mask: Tensor | None = None
                ) -> tuple[Tensor, LeanTerms]:
    """``relaxed_sort_matrix`` of a small problem: (P_hat (B, n, n) in the scores' dtype by output row and item,
    padded rows and columns 0, exact zeros past the band when ``banded``; the terms)."""
    terms = sort_scores(scores, tau, descending, mask)
    return _CASTS[scores.dtype](_real(lean_weights(terms, descending, banded), terms.valid)), terms


def _float64_copy(values: Tensor) -> Tensor:
    """A float64 tensor of ``values`` that may be written to (a copy also when it is float64 already)."""
    return values.clone() if values.dtype == torch.float64 else values.double()


def lean_matrix_backward(grad: Tensor, matrix: Tensor, terms: LeanTerms, tau: Tensor, descending: bool,
                         need_tau: bool) -> tuple[Tensor, Tensor | None]:
    """(d_scores (B, n), the tau terms (B,) float64 or None unless ``need_tau``) of ``lean_matrix`` from dL/dP_hat
    ``grad`` and the forward's ``matrix`` (B, n, n), both by output row and item. The matrix is renormalised in
    float64 (rows summing to 1 up to its dtype's rounding would rescale whole rows of dz, and d_scores sums rows
    whose contributions largely cancel); entries it holds as 0 (past the band, padding) get no gradient."""
    probs = _float64_copy(matrix)  # (a float64 matrix or grad is the caller's own tensor: never written to)
    row_sums = probs.sum(-1, keepdim=True)
    probs = probs.div_(row_sums if terms.valid is None else row_sums.clamp_(min=0.5))  # padded rows: all 0
    dz = _real(_float64_copy(grad), terms.valid).mul_(probs)
    dz.addcmul_(probs, dz.sum(-1, keepdim=True), value=-1)
    d_scores = lean_scores_gradient(dz, terms, descending, matrix.dtype)
    if not need_tau:
        return d_scores, None
    return d_scores, _tau_terms(dz, terms, tau, descending)
