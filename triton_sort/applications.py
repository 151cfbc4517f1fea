"""Applications of the relaxed sort: the relaxed top-k indicator and relaxed quantiles.

Both use only a few rows or one column pass of ``P_hat``, so neither ever allocates ``n x n``:

- ``relaxed_topk``: ``topk_j = sum_{i < k} P_hat[i, j] = (P_hat^T u)_j`` with ``u`` the indicator of the first
  ``k`` rows: the column pass of the apply backward (``dx = P_hat^T g``) with ``g = u``. A custom op
  (``torch.ops.triton_sort.topk``) on both backends.
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

from ._backends import BACKENDS, to_sorted
from ._columns import signed_sum, sorted_terms
from ._validation import checks_values
from .api import (
    Backend,
    _as_batch,
    _check_flag,
    _check_scores,
    _check_values,
    _resolve_backend,
    autocast_inputs,
    check_tau,
)
from .ops import (
    _fake_terms,
    autograd_function,
    once_differentiable,
    register_batch_vmap,
    save_with_terms,
    sort_apply_backward,
    tau_gradient,
    validate_data,
    without_autocast,
)

__all__ = ["relaxed_quantile", "relaxed_topk"]


def _first_rows(scores: Tensor, k: int) -> Tensor:
    """``u``: 1 on the first ``k`` output rows, 0 elsewhere; ``(B, n, 1)`` in the scores' dtype."""
    u = torch.zeros((*scores.shape, 1), dtype=scores.dtype, device=scores.device)
    u[:, :k] = 1
    return u


# ------------------------------------------------------------------------------------- relaxed top-k indicator
@torch.library.custom_op("triton_sort::topk", mutates_args=())
@without_autocast
def topk_indicator(scores: Tensor, k: int, tau: Tensor, descending: bool, banded: bool, backend: str
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(``P_hat^T u`` (B, n), row sums, *sorted terms) for scores (B, n): the relaxed indicator of the ``k``
    first-ranked items, and what its backward reuses."""
    validate_data(scores, None, tau)
    impl = BACKENDS[backend]
    terms = impl.prepare(scores, tau, banded)
    # The backward's column pass needs the row sums, which do not depend on the values: x = 0 gives them (and
    # Delta = 0, so dx is exactly P^T u; the scores gradient it also returns is zero and unused).
    zeros = scores.new_zeros((*scores.shape, 1))
    _, norm = impl.apply_forward(terms, zeros, tau, descending, banded)
    _, indicator, _ = impl.apply_backward(terms, zeros, _first_rows(scores, k), norm, tau, descending, banded, False)
    return (indicator[..., 0], norm, *terms.tensors())


@topk_indicator.register_fake
def _(scores, k, tau, descending, banded, backend):
    return (torch.empty_like(scores), scores.new_empty(scores.shape, dtype=torch.float64),
            *_fake_terms(scores, backend, banded))


def _topk_setup_context(ctx, inputs, output):
    _scores, k, tau, descending, banded, backend = inputs
    save_with_terms(ctx, (tau,), output[1:])
    ctx.k, ctx.descending, ctx.banded, ctx.backend = k, descending, banded, backend


def _topk_backward(ctx, grad, *_):
    if grad is None:
        return (None,) * 6
    # For a cotangent w, w . topk = u^T P_hat w: the output of relaxed_sort_apply(scores, x = w) contracted with
    # u. Its gradients are that op's backward with output cotangent u, so reuse the apply backward verbatim.
    tau, norm, *terms = ctx.saved_tensors
    w = grad.contiguous()[..., None]
    need_tau = ctx.needs_input_grad[2]
    d_scores, _, tau_terms = TopKBackward.apply(w, _first_rows(grad, ctx.k), norm, tau, *terms, ctx.descending,
                                                     ctx.banded, ctx.backend, need_tau)
    return d_scores, None, tau_gradient(tau, tau_terms) if need_tau else None, None, None, None


topk_indicator.register_autograd(_topk_backward, setup_context=_topk_setup_context)
register_batch_vmap(topk_indicator, "relaxed_topk", batched=(0,), tau_index=2)
TopKBackward = once_differentiable("relaxed_topk", sort_apply_backward)
TopK = autograd_function("relaxed_topk", topk_indicator, _topk_setup_context, _topk_backward)


def relaxed_topk(scores: Tensor, k: int, tau: float | Tensor, *, descending: bool = True, banded: bool = True,
                 backend: Backend = "auto") -> Tensor:
    """Relaxed top-k indicator: ``sum_{i < k} P_hat[i, j]`` per item ``j``, without materialising ``P_hat``.

    Entries are >= 0 and sum to ``k`` (but may exceed 1: ``P_hat`` is row-stochastic, not doubly stochastic); as
    ``tau -> 0`` it tends to the 0/1 indicator of the ``k`` largest scores (``descending=False``: smallest). Used by
    :class:`DifferentiableKNN`.

    Args:
        scores: ``(n,)`` or ``(B, n)``.
        k: int with ``0 <= k <= n``.
        tau: temperature > 0.
        banded, backend: as in :func:`relaxed_sort_apply`.

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
    backend = _resolve_backend(backend, scores)
    out = TopK.apply(_as_batch(scores), int(k), tau, descending, banded, backend)[0]
    return out if scores.dim() == 2 else out.squeeze(0)


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
        scores: ``(n,)`` or ``(B, n)``, ``n >= 1``.
        values: ``(n,)`` or ``(n, d)`` for 1-D scores; ``(B, n)`` or ``(B, n, d)`` for 2-D scores; same dtype and
            device as ``scores``.
        q: quantile level in ``[0, 1]``.
        tau: temperature > 0.

    Returns:
        ``values`` without its ``n`` dimension (``()``, ``(d,)``, ``(B,)`` or ``(B, d)``), in the scores' dtype,
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
    # Drop the d axis if values had none, then the batch axis if scores had none.
    out = out if values.dim() == scores.dim() + 1 else out.squeeze(-1)
    return out if scores.dim() == 2 else out.squeeze(0)
