"""``torch.library`` custom ops: the layer between the functional API and the backends.

Registered with fake (meta) implementations and ``register_autograd`` so that ``torch.compile(fullgraph=True)``
traces them without graph breaks. Shapes are canonical here: ``scores (B, n)``, ``x (B, n, d)``; the functional API
in ``triton_sort.api`` validates and reshapes user input. ``backend`` is ``"torch"`` or ``"triton"``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backends import BACKENDS
from ._columns import SortedTerms, output_rows, signed_sum, sorted_terms


def _check_finite_scores(scores: Tensor) -> None:
    # Data-dependent, so it lives inside the op (opaque to torch.compile) rather than in the Python wrapper.
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite: found NaN or infinite values")


def hard_order(scores: Tensor, descending: bool) -> Tensor:
    """Exact sort order, stable so that equal scores keep their input order. (B, n) -> (B, n) int64."""
    return torch.sort(scores, dim=-1, descending=descending, stable=True).indices


def _to_sorted(values: Tensor, order: Tensor) -> Tensor:
    """(B, n, ...) in input order -> sorted order."""
    index = order.reshape(*order.shape, *([1] * (values.dim() - 2))).expand_as(values)
    return torch.gather(values, 1, index)


def _from_sorted(values: Tensor, order: Tensor) -> Tensor:
    """(B, n, ...) in sorted order -> input order."""
    index = order.reshape(*order.shape, *([1] * (values.dim() - 2))).expand_as(values)
    return torch.empty_like(values).scatter_(1, index, values)


def _scores_gradient(terms: SortedTerms, u: Tensor, r: Tensor, tau: float, dtype: torch.dtype) -> Tensor:
    """d_scores = (u_m - sum_k sign(t_m - t_k) r_k) / tau in sorted order (MATH.md, section 4), to input order."""
    sorted_grad = (u.to(torch.float64) - signed_sum(terms, r)) / tau
    return _from_sorted(sorted_grad, terms.order).to(dtype)


# ----------------------------------------------------------------------------------------- P_hat @ x (streaming)
@torch.library.custom_op("triton_sort::apply", mutates_args=())
def sort_apply(scores: Tensor, x: Tensor, tau: float, descending: bool, hard: bool, banded: bool,
               backend: str) -> tuple[Tensor, Tensor]:
    """Returns (out, norm): out = P_hat @ x (or x in exact sorted order if ``hard``); norm = the row sums in sorted
    order (float64), all the backward keeps of the forward."""
    _check_finite_scores(scores)
    terms = sorted_terms(scores, tau, banded)
    sorted_out, norm = BACKENDS[backend].apply_forward(terms, _to_sorted(x, terms.order), tau)
    if hard:
        order = hard_order(scores, descending)
        return torch.gather(x, 1, order[..., None].expand_as(x)), norm
    return sorted_out[:, output_rows(terms.n, descending, x.device)], norm


@sort_apply.register_fake
def _(scores, x, tau, descending, hard, banded, backend):
    return torch.empty_like(x), scores.new_empty(scores.shape, dtype=torch.float64)


@torch.library.custom_op("triton_sort::apply_backward", mutates_args=())
def sort_apply_backward(scores: Tensor, x: Tensor, grad: Tensor, norm: Tensor, tau: float, descending: bool,
                        banded: bool, backend: str) -> tuple[Tensor, Tensor]:
    """Gradients (d_scores (B, n), d_x (B, n, d)) of P_hat @ x, recomputing P_hat tile by tile."""
    terms = sorted_terms(scores, tau, banded)
    rows = output_rows(terms.n, descending, x.device)  # an involution: output row i <-> sorted row rows[i]
    sorted_dx, u, r = BACKENDS[backend].apply_backward(terms, _to_sorted(x, terms.order), grad[:, rows], norm, tau)
    return _scores_gradient(terms, u, r, tau, scores.dtype), _from_sorted(sorted_dx, terms.order)


@sort_apply_backward.register_fake
def _(scores, x, grad, norm, tau, descending, banded, backend):
    return torch.empty_like(scores), torch.empty_like(x)


def _apply_setup_context(ctx, inputs, output):
    scores, x, tau, descending, _, banded, backend = inputs
    ctx.save_for_backward(scores, x, output[1])
    ctx.tau, ctx.descending, ctx.banded, ctx.backend = tau, descending, banded, backend


def _apply_backward(ctx, grad_out, grad_norm):
    scores, x, norm = ctx.saved_tensors
    d_scores, d_x = sort_apply_backward(scores, x, grad_out, norm, ctx.tau, ctx.descending, ctx.banded, ctx.backend)
    return d_scores, d_x, None, None, None, None, None


sort_apply.register_autograd(_apply_backward, setup_context=_apply_setup_context)


# ------------------------------------------------------------------------------------------ materialised P_hat
@torch.library.custom_op("triton_sort::matrix", mutates_args=())
def sort_matrix(scores: Tensor, tau: float, descending: bool, hard: bool, banded: bool, backend: str) -> Tensor:
    """P_hat (B, n, n); if ``hard``, the exact permutation matrix (stable for ties)."""
    _check_finite_scores(scores)
    if hard:
        order = hard_order(scores, descending)
        return torch.zeros(*scores.shape, scores.shape[-1], dtype=scores.dtype, device=scores.device).scatter_(
            -1, order[..., None], 1.0)
    return BACKENDS[backend].matrix_forward(sorted_terms(scores, tau, banded), tau, descending, scores.dtype)


@sort_matrix.register_fake
def _(scores, tau, descending, hard, banded, backend):
    return scores.new_empty((*scores.shape, scores.shape[-1]))


@torch.library.custom_op("triton_sort::matrix_backward", mutates_args=())
def sort_matrix_backward(scores: Tensor, grad: Tensor, soft: Tensor, tau: float, descending: bool) -> Tensor:
    """d_scores (B, n) from dL/dP_hat (B, n, n). O(n^2) like the matrix itself; the same for both backends.

    Entries outside the band are exactly 0 in ``soft``, so they get no gradient, as in the banded forward."""
    terms = sorted_terms(scores, tau, banded=False)
    work = torch.float64
    # Renormalised in float64: rows summing to 1 up to the output dtype's rounding would rescale whole rows of dz,
    # and d_scores sums rows whose contributions largely cancel.
    p, g = soft.to(work), grad.to(work)
    p = p / p.sum(-1, keepdim=True)
    dz = p * (g - (p * g).sum(-1, keepdim=True))
    n = scores.shape[-1]
    c = 2 * output_rows(n, descending, scores.device).to(work) - (n - 1)  # c of output row i = c of its sorted row
    count = _from_sorted(terms.count, terms.order).to(work)
    u = (dz * (c[None, :, None] - count[:, None, :])).sum(-2)
    return _scores_gradient(terms, _to_sorted(u, terms.order), _to_sorted(dz.sum(-2), terms.order), tau,
                            scores.dtype)


@sort_matrix_backward.register_fake
def _(scores, grad, soft, tau, descending):
    return torch.empty_like(scores)


def _matrix_setup_context(ctx, inputs, output):
    scores, tau, descending, hard, banded, backend = inputs
    # The hard forward is a permutation: the relaxed matrix is recomputed for the straight-through gradient.
    ctx.save_for_backward(scores, None if hard else output)
    ctx.tau, ctx.descending, ctx.hard, ctx.banded, ctx.backend = tau, descending, hard, banded, backend


def _matrix_backward(ctx, grad):
    scores, soft = ctx.saved_tensors
    if ctx.hard:
        soft = sort_matrix(scores, ctx.tau, ctx.descending, False, ctx.banded, ctx.backend)
    return sort_matrix_backward(scores, grad, soft, ctx.tau, ctx.descending), None, None, None, None, None


sort_matrix.register_autograd(_matrix_backward, setup_context=_matrix_setup_context)
