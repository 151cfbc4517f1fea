"""Small problems in one go, padded or not: the PyTorch path's fewest operations (``TorchBackend.lean``).

Batches of short lists are the common workload, and there a call's cost is its number of small tensor operations,
not the O(B n^2) work. This evaluation does what the one-shot path does (NeuralSort in sorted coordinates, float64
drops from prefix sums of gaps, weights saved for the backward, the scores gradient from the dense signs; MATH.md
sections 1 and 4) in about 20 operations per pass, by working in the output's own order:

- Sorting ``s`` in the output's direction (descending: largest first) gives ``u``, and ``t = sigma u`` with
  ``sigma = -1`` for descending (+1 ascending) is the ascending sort of ``sigma s``. NeuralSort of ``sigma s`` row
  ``p`` (coefficient ``2p + 1 - n``) is output row ``p`` of the requested direction (``-(2p + 1 - n)`` is row p's
  descending coefficient), so rows need no flip; ``sigma`` lives in cached constants and in the order of two
  subtractions, never in an operation of its own.
- Logits ``-D_p(m) / tau = k_p (t_p - t_m) + (b_m - b_p)`` with ``k_p = -(2p - 1) / tau`` and
  ``b_m = -2 W_m / tau``, ``W_m = sum_{q<m} q (t_{q+1} - t_q)`` (the gaps of t are sigma times those of u):
  differences of sorted scores and of prefix sums of gaps, so a row's own column is exactly 0 (weight 1) and
  nothing of the size of the scores is formed. Ties need nothing: tied columns have equal logits in every row.

Padded lists (``mask``): padding sorts last and is then set to 0 (finite: it is never a real item), padded columns
weigh exactly 0, padded rows are zeroed in every product, and padded values and gradients are zeroed before any
product (they may hold NaN).

Outputs are float64 until the last cast; inputs are plain ``(B, n)`` scores and ``(B, n, d)`` values.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._columns import index_positions

_CONSTANTS: dict[tuple[int, str, bool], tuple[Tensor, Tensor]] = {}


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


def _pairwise(u: Tensor, descending: bool) -> Tensor:
    """``t_p - t_m`` (B, n, n) float64 from u (B, n): the operands' order carries sigma."""
    return u.unsqueeze(1) - u.unsqueeze(2) if descending else u.unsqueeze(2) - u.unsqueeze(1)


class LeanTerms(NamedTuple):
    """What a lean forward computes per batch of lists and its backward reuses, all (B, n) but ``scaled``.

    ``u``: float64 scores sorted in the output's direction (padding last, then set to 0: finite, and never used as a
    real item); ``order``: int64, ``u = scores[order]`` on real positions; ``b``: float64 as above; ``scaled``:
    (4, n) float64, the constant ``factors`` over tau; ``length``: int64 (B,) real items per list and ``valid``
    bool (B, n) (sorted position p < length), or None for unpadded lists."""

    u: Tensor
    order: Tensor
    b: Tensor
    scaled: Tensor
    length: Tensor | None
    valid: Tensor | None


def lean_terms(scores: Tensor, tau: Tensor, descending: bool, mask: Tensor | None = None) -> LeanTerms:
    """Sort, prefix sums of gaps, the constants over tau. ``mask`` (B, n) bool, True for a real item: padded lists
    (padding sorts last and may hold anything: it is never read)."""
    n = scores.shape[-1]
    key = scores.detach().to(torch.float64)
    if mask is not None:
        key = torch.where(mask, key, float("-inf") if descending else float("inf"))
    u, order = torch.sort(key, dim=-1, descending=descending, stable=True)
    length = valid = None
    if mask is not None:
        length = mask.sum(-1)
        valid = index_positions(n, u.device)[None, :] < length[:, None]
        u = torch.where(valid, u, 0.0)
    scaled = _constants(n, u.device, descending)[0] / tau.detach()
    b = torch.cumsum(torch.sub(u, u.roll(1, 1)).mul_(scaled[1]), dim=-1)
    return LeanTerms(u, order, b, scaled, length, valid)


def lean_logits(terms: LeanTerms, descending: bool) -> Tensor:
    """-D_p(m) / tau (B, n, n) float64 by output row p and sorted column m (finite on padded rows and columns)."""
    u, b = terms.u, terms.b
    return (b.unsqueeze(1) - b.unsqueeze(2)).addcmul_(_pairwise(u, descending), terms.scaled[0].unsqueeze(1))


# Above this many entries the logits are clamped at the smallest normal exponent before exp: a denormal result sends
# the CPU's vectorised exp down a slow path (also exp(-inf): the padded lists' masked logits took 10x the unmasked
# exp at (64, 100)); below it the clamp would be one more operation for nothing measurable.
CLAMP_ELEMENTS = 1 << 14
EXP_FLOOR = -708.0


def lean_weights(terms: LeanTerms, descending: bool) -> tuple[Tensor, Tensor]:
    """(P_hat in sorted columns (B, n, n) float64, real rows summing to 1, padded columns exactly 0, padded rows
    finite garbage (every product zeroes them: the output's padded rows and the gradient's); the row sums (B, n)
    float64, >= 1). The logits are clamped to [EXP_FLOOR, 0] for padded lists (their padded rows' logits have no
    bound) and large problems (denormals); real rows' logits are <= 0 anyway (drops are >= 0)."""
    logits = lean_logits(terms, descending)
    if terms.valid is not None or logits.numel() > CLAMP_ELEMENTS:
        logits.clamp_(min=EXP_FLOOR, max=0.0)
    weights = logits.exp_()
    if terms.valid is not None:
        weights.mul_(terms.valid.to(torch.float64).unsqueeze(1))
    norm = weights.sum(-1)
    if terms.valid is not None:  # a list without real items has no weight at all
        norm.clamp_(min=1.0)
    return weights.div_(norm[..., None]), norm


def _real(values: Tensor, valid: Tensor | None) -> Tensor:
    """(B, n, d) by sorted position or output row with padded positions set to 0 (they may hold NaN)."""
    return values if valid is None else torch.where(valid.unsqueeze(2), values, 0.0)


def lean_backward(probs: Tensor, terms: LeanTerms, rows: Tensor, cols: Tensor, descending: bool,
                  dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The scores gradient of ``a . (P b)`` summed over rows: (d_scores (B, n) in input order and ``dtype``, 0 on
    padded items; dz (B, n, n) float64, the logits' gradient, for the tau term). ``rows`` (B, n, d) float64 by
    output row p and ``cols`` (B, n, d) float64 by sorted position m, both 0 where padded: the output gradient
    and the sorted values for ``P @ x``, the values and the sorted output gradient for ``P^T @ v``.

    dz_pm = P_pm (a_p . b_m - Delta_p) with Delta_p from the very products dz uses; then, for ``sigma s``, the
    gradient (sum_p c_p dz_pm - cnt_m r_m - sum_k sign(t_m - t_k) r_k) / tau (MATH.md, section 4), the tie terms
    from the dense signs S_km = sign(t_k - t_m) (``sum_k S_km = -cnt_m`` over real k, S antisymmetric), times sigma
    for ``s``: folded into the constant rows and the signs' operand order (see ``_constants``). A list of m real
    items has ``c_p = 2p + 1 - m``: the constant rows' ``2p + 1 - n`` plus ``n - m``."""
    batch, n = terms.u.shape
    dz = torch.bmm(rows, cols.transpose(1, 2)).mul_(probs)
    dz.addcmul_(probs, dz.sum(-1, keepdim=True), value=-1)
    column_sums = torch.bmm(terms.scaled[2:].expand(batch, 2, n), dz)  # sigma / tau [sum_p c_p dz_pm, r_m]
    c_dz, r = column_sums[:, 0], column_sums[:, 1]
    if terms.length is None:
        real = _constants(n, terms.u.device, descending)[1].expand(batch, n)
    else:
        c_dz.addcmul_(r, torch.sub(n, terms.length).unsqueeze(1))
        real = terms.valid.to(torch.float64)
    signs = _pairwise(terms.u, descending).sign_()  # S_km = sign(t_k - t_m)
    # [sigma / tau sum_k r_k S_km, sum_k S_km = -cnt_m]: the gradient of sigma s, times sigma: that of s
    tie_sums = torch.bmm(torch.stack([r, real], 1), signs)
    gradient = tie_sums[:, 0].addcmul_(tie_sums[:, 1], r).add_(c_dz)
    if terms.valid is not None:  # padded items: exactly 0 (their signs are arbitrary)
        gradient = torch.where(terms.valid, gradient, 0.0)
    return scatter(gradient, terms.order, dtype), dz


def scatter(values: Tensor, order: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, n, ...) by sorted position -> input order, cast to ``dtype``."""
    values = values.to(dtype)
    index = order.reshape(*order.shape, *([1] * (values.dim() - 2))).expand_as(values)
    return torch.empty_like(values).scatter_(1, index, values)


def gather(values: Tensor, order: Tensor) -> Tensor:
    """(B, n, d) in input order -> sorted positions, float64."""
    return torch.gather(values.detach(), 1, order[..., None].expand_as(values)).to(torch.float64)


def lean_apply(scores: Tensor, x: Tensor, tau: Tensor, descending: bool, transpose: bool, poison: bool,
               mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, LeanTerms, Tensor]:
    """``P_hat @ x`` (x by item, result by output row) or ``P_hat^T @ x`` (``transpose``: x by output row, result
    by item), in x's dtype; also the same in float64 before its cast (and, transposed, in sorted order), and what
    the backward needs: (out, product, row sums (B, n), P_hat in sorted columns (B, n, n), terms, saved), ``saved``
    (B, n, d) float64 the sorted values (or, transposed, x itself), 0 where padded. ``mask``: padded lists (a list
    of m real items gives the call on those items alone in rows 0..m-1; padded rows and items are 0).
    ``poison``: a list with a non-finite real score or value becomes NaN throughout (validation off, as on every
    path: ``_backends.poison_lists``)."""
    terms = lean_terms(scores, tau, descending, mask)
    saved = _real(x.detach().to(torch.float64) if transpose else gather(x, terms.order), terms.valid)
    if poison:  # a non-finite score already makes all of b NaN (the roll's wrap-around gap, times 0)
        terms.u.add_(saved.sum((1, 2)).mul_(0.0)[:, None])
    probs, norm = lean_weights(terms, descending)
    if transpose:
        product = torch.bmm(probs.transpose(1, 2), saved)
        out = scatter(product, terms.order, x.dtype)
    else:
        product = _real(torch.bmm(probs, saved), terms.valid)
        out = product.to(x.dtype)
    return out, product, norm, probs, terms, saved


def lean_apply_backward(probs: Tensor, terms: LeanTerms, saved: Tensor, grad: Tensor, tau: Tensor, descending: bool,
                        transpose: bool, need_x: bool, need_tau: bool
                        ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients of ``lean_apply``'s output: (d_scores (B, n), d_x (B, n, d) or None unless ``need_x``, the tau
    terms ``sum_pm dz_pm D_p(m)`` (B,) float64 or None unless ``need_tau``; dL/dtau is their sum over tau^2).
    ``saved``: ``lean_apply``'s; grad (B, n, d) like the output (padded entries ignored)."""
    dtype = grad.dtype
    if transpose:  # w . P^T v = v . P w: d_v = P @ w, and the scores term of P @ w with output gradient v
        rows, cols = saved, _real(gather(grad, terms.order), terms.valid)
        d_x = _real(torch.bmm(probs, cols), terms.valid).to(dtype) if need_x else None
    else:
        rows, cols = _real(grad.to(torch.float64), terms.valid), saved
        d_x = scatter(torch.bmm(probs.transpose(1, 2), rows), terms.order, dtype) if need_x else None
    d_scores, dz = lean_backward(probs, terms, rows, cols, descending, dtype)
    tau_terms = None
    if need_tau:  # D = -tau * logits
        tau_terms = lean_logits(terms, descending).mul_(dz).sum((1, 2)).mul_(tau.detach()).neg_()
    return d_scores, d_x, tau_terms
