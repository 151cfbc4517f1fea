"""Applications of the relaxed sort: the relaxed top-k indicator and relaxed quantiles.

Both use only a few rows or one column pass of ``P_hat``, so neither ever allocates ``n x n``:

- ``relaxed_topk``: ``topk_j = sum_{i < k} P_hat[i, j] = (P_hat^T u)_j`` with ``u`` the indicator of the first
  ``k`` rows: ``relaxed_sort_apply(..., transpose=True)`` (the column pass of the apply backward).
- ``relaxed_quantile``: one or two rows of the ascending ``P_hat`` applied to values. A row is a softmax over
  ``n`` logits built from the O(n log n) sorted terms (``_columns``): O(n) PyTorch work, differentiable through
  autograd.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
from torch import Tensor

from ._backends import to_sorted
from ._columns import signed_sum, sorted_terms
from ._validation import checks_values
from .api import (
    Backend,
    _as_batch,
    _check_flag,
    _check_mask,
    _check_scores,
    _check_values,
    _resolve_backend,
    autocast_inputs,
    check_tau,
)
from .ops import APPLY_FUNCTIONS, validate_data

__all__ = ["relaxed_quantile", "relaxed_topk"]


# ------------------------------------------------------------------------------------- relaxed top-k indicator
def relaxed_topk(scores: Tensor, k: int, tau: float | Tensor, *, descending: bool = True, banded: bool = True,
                 backend: Backend = "auto", mask: Tensor | None = None) -> Tensor:
    """Relaxed top-k indicator: ``sum_{i < k} P_hat[i, j]`` per item ``j``, without materialising ``P_hat``.

    Entries are >= 0 and sum to ``k`` (but may exceed 1: ``P_hat`` is row-stochastic, not doubly stochastic); as
    ``tau -> 0`` it tends to the 0/1 indicator of the ``k`` largest scores (``descending=False``: smallest). Used by
    :class:`DifferentiableKNN`. ``P_hat^T u`` (``relaxed_sort_apply(..., transpose=True)``) with ``u`` the
    indicator of the first ``k`` ranks.

    Args:
        scores: ``(..., n)``.
        k: int with ``0 <= k <= n``.
        tau: temperature > 0.
        banded, backend: as in :func:`relaxed_sort_apply`.
        mask: bool, scores' shape, True for a real item: a list of ``m`` real items gets the indicator of its
            ``min(k, m)`` first-ranked items (entries sum to ``min(k, m)``); padded items 0.

    Returns:
        A tensor of ``scores``' shape, differentiable with respect to ``scores`` (O(B n) extra memory).
    """
    scores = _check_scores(scores)
    (scores,) = autocast_inputs(scores)
    tau = check_tau(tau, scores.device)
    _check_flag("descending", descending)
    _check_flag("banded", banded)
    n = scores.shape[-1]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 0 <= k <= n:
        raise ValueError(f"k must satisfy 0 <= k <= n = {n}, got {k}")
    flat_mask = _check_mask(scores, mask)
    backend = _resolve_backend(backend, scores)
    batch = _as_batch(scores)
    first_ranks = (torch.arange(n, device=scores.device) < k).to(scores.dtype)[None, :, None].expand(*batch.shape, 1)
    out = APPLY_FUNCTIONS["relaxed_topk"].apply(batch, first_ranks, tau, flat_mask, descending, False, banded, True,
                                                backend)[0]
    return out.reshape(scores.shape)


# ------------------------------------------------------------------------------------------- relaxed quantiles
def _ascending_rows(scores: Tensor, values: Tensor, ranks: list[int], tau: float) -> Tensor:
    """Rows ``ranks`` of the ascending ``P_hat`` applied to values: scores (B, n), values (B, n, d) ->
    ``(B, len(ranks), d)`` float64, O(B n d) memory.

    Row ``p`` has logits ``(c_p t_m - b_m) / tau`` over the sorted scores ``t`` (``c_p = 2p - n + 1``,
    ``b_m = sum_k |t_m - t_k|``). ``b_m = cnt_m t_m - sum_k sign(t_m - t_k) t_k`` is linear in ``t`` for a fixed
    order, so ``cnt`` and the signs of the detached sort give its exact value and gradient in O(n log n)
    (``signed_sum`` is prefix sums, differentiable in its argument). Float64 keeps logits of size n |s| / tau exact
    enough (relative 1e-16).
    """
    terms = sorted_terms(scores, tau, banded=False)
    t = to_sorted(scores.to(torch.float64), terms.order)
    # The median-centred sorted scores of the terms (the value), with the gradient of the scores (a shift cancels
    # in softmax rows, so its gradient would be zero anyway).
    t = terms.t + (t - t.detach())
    b = terms.count * t - signed_sum(terms, t)
    rows = torch.tensor(ranks, device=scores.device)  # ascending rank r is sorted row r
    c = (2 * rows - (terms.n - 1)).to(torch.float64)
    p = torch.softmax((c[None, :, None] * t[:, None, :] - b[:, None, :]) / tau, dim=-1)
    return p @ to_sorted(values.to(torch.float64), terms.order)


def relaxed_quantile(scores: Tensor, values: Tensor, q: float, tau: float | Tensor, *,
                     interpolation: Literal["linear", "nearest"] = "linear") -> Tensor:
    """Relaxed ``q``-quantile: the ``values`` of the item whose score has the ``q``-quantile rank, relaxed.

    Ranks are ascending (rank 0 has the smallest score) and the quantile rank is ``h = q * (n - 1)``, as in
    ``torch.quantile``: ``"nearest"`` takes row ``round(h)`` of the ascending ``P_hat`` (halves round to even),
    ``"linear"`` mixes rows ``floor(h)`` and ``ceil(h)`` with weights ``ceil(h) - h`` and ``h - floor(h)``. As
    ``tau -> 0``, ``relaxed_quantile(s, s, q, tau)`` tends to ``torch.quantile(s, q, interpolation=...)``;
    ``q = 0.5`` with odd ``n`` is the median row. Computed with PyTorch ops in float64 (one or two rows of
    ``P_hat``, O(B n d) memory) on any device. Traces with ``torch.compile(fullgraph=True)``; while compiling,
    the finiteness check of ``scores`` is skipped and NaN/inf scores give NaN instead of a ValueError.

    Args:
        scores: ``(..., n)``, ``n >= 1``.
        values: ``(..., n)`` or ``(..., n, d)`` with the leading dimensions of ``scores``; same dtype and device.
        q: quantile level in ``[0, 1]``.
        tau: temperature > 0.

    Returns:
        ``values`` without its ``n`` dimension (``(...)`` or ``(..., d)``), in the scores' dtype,
        differentiable with respect to ``scores`` and ``values``.
    """
    scores = _check_scores(scores)
    if isinstance(values, Tensor):
        scores, values = autocast_inputs(scores, values)
    tau = check_tau(tau, scores.device)
    batched_values = _check_values(scores, values, "values")
    n = scores.shape[-1]
    if n == 0:
        raise ValueError("scores must have at least one item to take a quantile of")
    if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0 <= q <= 1:
        raise ValueError(f"q must be a real number in [0, 1], got {q!r}")
    if interpolation not in ("linear", "nearest"):
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    if checks_values():  # traced (torch.compile), non-finite scores make the result NaN instead
        validate_data(scores, batched_values, tau)
    h = float(q) * (n - 1)
    if interpolation == "nearest":
        rows, weights = [round(h)], [1.0]
    else:
        low, high = math.floor(h), math.ceil(h)
        rows, weights = ([low], [1.0]) if low == high else ([low, high], [high - h, h - low])
    applied = _ascending_rows(_as_batch(scores), batched_values, rows, tau)
    w = torch.tensor(weights, dtype=torch.float64, device=scores.device)
    out = torch.einsum("r,brd->bd", w, applied).to(scores.dtype)
    # Back to the leading dimensions, with a d axis only if values had one.
    return out.reshape((*scores.shape[:-1], *values.shape[scores.dim():]))
