"""``torch.library`` custom ops: the layer between the functional API and the backends.

Registered with fake (meta) implementations and ``register_autograd`` so that ``torch.compile(fullgraph=True)``
traces them without graph breaks. Shapes are canonical here: ``scores (B, n)``, ``x (B, n, d)``; the functional API
in ``triton_sort.api`` validates and reshapes user input. ``backend`` is ``"torch"`` or ``"triton"``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backends import BACKENDS, compute_dtype
from ._columns import column_terms, row_coefficients, signed_sum


def _check_finite_scores(scores: Tensor) -> None:
    # Data-dependent, so it lives inside the op (opaque to torch.compile) rather than in the Python wrapper.
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite: found NaN or infinite values")


def hard_order(scores: Tensor, descending: bool) -> Tensor:
    """Exact sort order, stable so that equal scores keep their input order. (B, n) -> (B, n) int64."""
    return torch.sort(scores, dim=-1, descending=descending, stable=True).indices


def _scores_gradient(terms, u: Tensor, r: Tensor, tau: float, dtype: torch.dtype) -> Tensor:
    """d_scores_j = (u_j - sum_k sign(s_j - s_k) r_k) / tau (MATH.md, section 4)."""
    return ((u.to(torch.float64) - signed_sum(terms, r)) / tau).to(dtype)


# ----------------------------------------------------------------------------------------- P_hat @ x (streaming)
@torch.library.custom_op("triton_sort::apply", mutates_args=())
def sort_apply(scores: Tensor, x: Tensor, tau: float, descending: bool, hard: bool,
               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out, soft, lse): out = P_hat @ x (or x in exact sorted order if ``hard``), soft = the relaxed
    product kept for the backward pass when ``hard`` (else empty), lse = row log-sum-exp (backend's base)."""
    _check_finite_scores(scores)
    soft, lse = BACKENDS[backend].apply_forward(column_terms(scores), x, tau, descending)
    if not hard:
        return soft, soft.new_empty(0), lse
    order = hard_order(scores, descending)
    return torch.gather(x, 1, order[..., None].expand_as(x)), soft, lse


@sort_apply.register_fake
def _(scores, x, tau, descending, hard, backend):
    lse = scores.new_empty(scores.shape, dtype=compute_dtype(x.dtype))
    return torch.empty_like(x), (torch.empty_like(x) if hard else x.new_empty(0)), lse


@torch.library.custom_op("triton_sort::apply_backward", mutates_args=())
def sort_apply_backward(scores: Tensor, x: Tensor, grad: Tensor, soft: Tensor, lse: Tensor, tau: float,
                        descending: bool, backend: str) -> tuple[Tensor, Tensor]:
    """Gradients (d_scores (B, n), d_x (B, n, d)) of P_hat @ x, recomputing P_hat tile by tile."""
    terms = column_terms(scores)
    dx, u, r = BACKENDS[backend].apply_backward(terms, x, grad, soft, lse, tau, descending)
    return _scores_gradient(terms, u, r, tau, scores.dtype), dx


@sort_apply_backward.register_fake
def _(scores, x, grad, soft, lse, tau, descending, backend):
    return torch.empty_like(scores), torch.empty_like(x)


def _apply_setup_context(ctx, inputs, output):
    scores, x, tau, descending, hard, backend = inputs
    out, soft, lse = output
    ctx.save_for_backward(scores, x, soft if hard else out, lse)
    ctx.tau, ctx.descending, ctx.backend = tau, descending, backend


def _apply_backward(ctx, grad_out, grad_soft, grad_lse):
    scores, x, soft, lse = ctx.saved_tensors
    d_scores, d_x = sort_apply_backward(scores, x, grad_out, soft, lse, ctx.tau, ctx.descending, ctx.backend)
    return d_scores, d_x, None, None, None, None


sort_apply.register_autograd(_apply_backward, setup_context=_apply_setup_context)


# ------------------------------------------------------------------------------------------ materialised P_hat
@torch.library.custom_op("triton_sort::matrix", mutates_args=())
def sort_matrix(scores: Tensor, tau: float, descending: bool, hard: bool, backend: str) -> Tensor:
    """P_hat (B, n, n); if ``hard``, the exact permutation matrix (stable for ties)."""
    _check_finite_scores(scores)
    if hard:
        order = hard_order(scores, descending)
        return torch.zeros(*scores.shape, scores.shape[-1], dtype=scores.dtype, device=scores.device).scatter_(
            -1, order[..., None], 1.0)
    return BACKENDS[backend].matrix_forward(column_terms(scores), tau, descending, scores.dtype)


@sort_matrix.register_fake
def _(scores, tau, descending, hard, backend):
    return scores.new_empty((*scores.shape, scores.shape[-1]))


@torch.library.custom_op("triton_sort::matrix_backward", mutates_args=())
def sort_matrix_backward(scores: Tensor, grad: Tensor, soft: Tensor, tau: float, descending: bool) -> Tensor:
    """d_scores (B, n) from dL/dP_hat (B, n, n). O(n^2) like the matrix itself; the same for both backends."""
    terms = column_terms(scores)
    work = compute_dtype(soft.dtype)
    p, g = soft.to(work), grad.to(work)
    dz = p * (g - (p * g).sum(-1, keepdim=True))
    c = row_coefficients(scores.shape[-1], descending, work, scores.device)
    u = (dz * (c[None, :, None] - terms.count.to(work)[:, None, :])).sum(-2)
    return _scores_gradient(terms, u, dz.sum(-2), tau, scores.dtype)


@sort_matrix_backward.register_fake
def _(scores, grad, soft, tau, descending):
    return torch.empty_like(scores)


def _matrix_setup_context(ctx, inputs, output):
    scores, tau, descending, hard, backend = inputs
    # The hard forward is a permutation: the relaxed matrix is recomputed for the straight-through gradient.
    ctx.save_for_backward(scores, None if hard else output)
    ctx.tau, ctx.descending, ctx.hard, ctx.backend = tau, descending, hard, backend


def _matrix_backward(ctx, grad):
    scores, soft = ctx.saved_tensors
    if ctx.hard:
        soft = sort_matrix(scores, ctx.tau, ctx.descending, False, ctx.backend)
    return sort_matrix_backward(scores, grad, soft, ctx.tau, ctx.descending), None, None, None, None


sort_matrix.register_autograd(_matrix_backward, setup_context=_matrix_setup_context)
