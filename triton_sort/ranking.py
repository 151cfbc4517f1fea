"""Learning to rank: NeuralNDCG (Pobrotyn & Bialobrzeski, 2021) on the relaxed sort, and the exact NDCG metric.

For one list of ``m`` real items with scores ``s``, gains ``g`` (``2^rel - 1``, or ``rel``) and discounts
``d_i = 1 / log2(i + 2)`` of the ranks ``i < k`` (0-based; ``d_i = 0`` for ``i >= k``), both forms of NeuralNDCG are
the same number

    NeuralNDCG@k = d^T M g / IDCG@k,   M = sinkhorn(P_hat) = diag(a) P_hat diag(b)

- ``neuralNDCG`` (allRank): relaxed gains ``M g`` by rank, times the discounts, summed;
- ``neuralNDCG_transposed``: expected discounts ``M^T d`` by item, times the gains, summed;

so they agree up to rounding (tested); they differ in what is streamed (the gains through ``P_hat`` or the
discounts through ``P_hat^T``). ``M`` is computed without an ``n x n`` matrix: each Sinkhorn iteration
(column normalisation, then row normalisation, as allRank's ``sinkhorn_scaling``) needs only the column sums
``b * (P_hat^T a)`` and the row sums ``a * (P_hat b)``, two calls of :func:`relaxed_sort_apply` (the first with
``transpose=True``), and the result ``a * (P_hat (b * g))`` (or ``b * (P_hat^T (a * d))``) one more. Autograd flows
through the calls, whose backwards recompute ``P_hat`` tile by tile, so memory is O(B n) per iteration (the scaling
vectors kept for the backward), never O(n^2). Small problems (``B n^2 <= DENSE_SINKHORN_ENTRIES``) with Sinkhorn
iterations materialise ``P_hat`` instead (:func:`relaxed_sort_matrix` and dense normalisations), which is faster
there; the two evaluations are tested against each other.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
from torch import Tensor

from ._validation import check_backend_name, check_int, checks_values
from .api import Backend, _check_scores, check_mask, check_tau, relaxed_sort_apply, relaxed_sort_matrix

__all__ = ["ndcg", "neural_ndcg"]

Reduction = Literal["mean", "sum", "none"]

# allRank's DEFAULT_EPS: the Sinkhorn sums are clamped to it before dividing.
SINKHORN_EPS = 1e-10
# With Sinkhorn iterations, problems of at most this many (list, row, column) entries materialise P_hat (dense
# normalisations, autograd through them: 2 B n^2 saved values per iteration run, 100 MiB at this limit in fp32 with
# 50 iterations); larger ones stream. On 2 CPU cores (PyTorch path, fp32, 50 iterations, forward + backward) the
# dense evaluation was 5x to 14x faster at every size measured, B n^2 from 64 to 1e6.
DENSE_SINKHORN_ENTRIES = 2**18


# ------------------------------------------------------------------------------------------------- arguments
def _check_lists(scores: object, relevance: object, mask: object) -> tuple[Tensor, Tensor, Tensor | None]:
    scores = _check_scores(scores)
    if not isinstance(relevance, Tensor):
        raise TypeError(f"relevance must be a torch.Tensor, got {type(relevance).__name__}")
    if relevance.dtype == torch.bool or relevance.is_complex():
        raise TypeError(f"relevance must have a real integer or floating dtype, got {relevance.dtype}")
    if tuple(relevance.shape) != tuple(scores.shape):
        raise ValueError(f"relevance must have the shape of scores {tuple(scores.shape)}, "
                         f"got {tuple(relevance.shape)}")
    if relevance.device != scores.device:
        raise ValueError(f"relevance must be on the device of scores ({scores.device}), got {relevance.device}")
    return scores, relevance, check_mask(scores, mask)


def _check_k(k: object) -> int | None:
    if k is None:
        return None
    return check_int("k", k, minimum=1)


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_reduction(reduction: object) -> str:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction  # type: ignore[return-value]


def _check_relevance_values(relevance: Tensor, real: Tensor) -> None:
    """Relevance finite and >= 0 on real items (a host synchronisation: eager mode with validation on only)."""
    if not checks_values():
        return
    bad = real & ~(torch.isfinite(relevance) & (relevance >= 0))
    if bool(bad.any()):
        raise ValueError("relevance must be finite and >= 0 on real items (mask True); found "
                         f"{int(bad.sum())} that are not")


# ------------------------------------------------------------------------------------------------ NDCG parts
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gains(relevance: Tensor, real: Tensor, dtype: torch.dtype, powered: bool) -> Tensor:
    """``2^rel - 1`` (or ``rel``) on real items, 0 on padded ones, in ``dtype``."""
    rel = relevance.to(dtype)
    gains = torch.exp2(rel) - 1 if powered else rel
    return torch.where(real, gains, torch.zeros((), dtype=dtype, device=rel.device))


def _discounts(n: int, k: int | None, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``1 / log2(i + 2)`` for ranks ``i < k`` (0-based), 0 from rank ``k`` on: shape ``(n,)``."""
    ranks = torch.arange(n, dtype=torch.float64, device=device)
    disc = 1.0 / torch.log2(ranks + 2.0)
    if k is not None:
        disc = torch.where(ranks < k, disc, torch.zeros((), dtype=torch.float64, device=device))
    return disc.to(dtype)


def _ideal_dcg(gains: Tensor, disc: Tensor) -> Tensor:
    """DCG@k of the gains sorted descending: padded items have gain 0 and so sort last or among the 0 gains."""
    return (torch.sort(gains, dim=-1, descending=True).values * disc).sum(-1)


def _reduce(values: Tensor, valid: Tensor, batch_shape: torch.Size, reduction: str) -> Tensor:
    """Per-list NDCG (0 where IDCG = 0) reduced: ``"mean"`` over the lists with IDCG > 0 (0 if there are none)."""
    if reduction == "none":
        return values.reshape(batch_shape)
    if reduction == "sum":
        return values.sum()
    return values.sum() / valid.sum().clamp(min=1).to(values.dtype)


def _normalise(dcg: Tensor, idcg: Tensor) -> tuple[Tensor, Tensor]:
    valid = idcg > 0
    safe = torch.where(valid, idcg, torch.ones_like(idcg))
    return torch.where(valid, dcg / safe, torch.zeros_like(dcg)), valid


def _masked_max(values: Tensor, real: Tensor) -> Tensor:
    """Per-list maximum over the real items of ``values >= 0`` (0 for a list without real items)."""
    return torch.where(real, values, torch.zeros_like(values)).amax(-1)


# -------------------------------------------------------------------------------------------- Sinkhorn scaling
def _streaming_sinkhorn(scores: Tensor, tau, mask: Tensor | None, real: Tensor, ranks: Tensor, iters: int,
                        tol: float, backend: str) -> tuple[Tensor, Tensor]:
    """Scaling vectors ``(a, b)`` with ``diag(a) P_hat diag(b)`` = allRank's ``sinkhorn_scaling(P_hat)``, each list
    stopped at the first iteration after which its row and column sums are within ``tol`` of 1.

    Iteration: ``b <- b / clamp(b * (P_hat^T a), eps)`` (columns), then ``a <- a / clamp(a * (P_hat b), eps)``
    (rows). ``a`` is indexed by rank (output row), ``b`` by item: ``ranks`` marks the ranks ``0..m-1`` of a list
    of ``m`` real items, ``real`` its real items. The others have ``a = 0``, ``b = 0`` and stay 0 (their rows and
    columns of ``P_hat`` are zero)."""
    def apply(x: Tensor) -> Tensor:
        return relaxed_sort_apply(scores, x, tau, mask=mask, backend=backend)

    def apply_t(v: Tensor) -> Tensor:
        return relaxed_sort_apply(scores, v, tau, mask=mask, backend=backend, transpose=True)

    a, b = ranks.to(scores.dtype), real.to(scores.dtype)
    done = torch.zeros(scores.shape[:-1], dtype=torch.bool, device=scores.device)
    column = apply_t(a)  # P_hat^T a
    eager = not torch.compiler.is_compiling()
    zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
    for step in range(iters):
        # torch.where keeps padded entries at 0 with zero gradient (not 0 / eps, whose gradient would grow 1e10-fold
        # per iteration)
        b_new = torch.where(real, b / (b * column).clamp(min=SINKHORN_EPS), zero)
        rows = a * apply(b_new)
        a_new = torch.where(ranks, a / rows.clamp(min=SINKHORN_EPS), zero)
        frozen = done[..., None]
        a, b = torch.where(frozen, a, a_new), torch.where(frozen, b, b_new)
        if step == iters - 1:
            break
        column = apply_t(a)
        with torch.no_grad():
            row_dev = (rows / rows.clamp(min=SINKHORN_EPS) - 1).abs()
            col_dev = (b * column - 1).abs()
            converged = (_masked_max(row_dev, ranks) < tol) & (_masked_max(col_dev, real) < tol)
            done = done | converged
        if eager and bool(done.all()):
            break
    return a, b


def _dense_sinkhorn(p: Tensor, real: Tensor, ranks: Tensor, iters: int, tol: float) -> Tensor:
    """allRank's ``sinkhorn_scaling`` on materialised ``P_hat`` (B, n, n) with zero padded rows and columns:
    ``p / clamp(column sums)``, then ``/ clamp(row sums)``, per iteration; each list stops at its own tolerance.

    As in allRank, the block of padded rows (ranks ``>= m``) and padded columns is set to 1 during the iterations
    (it scales to a doubly stochastic block of its own at once) and to 0 at the end: the padded rows and columns
    then have sums that need no clamp, so their gradients stay finite."""
    block = ~ranks[..., :, None] & ~real[..., None, :]
    p = torch.where(block, torch.ones((), dtype=p.dtype, device=p.device), p)
    done = torch.zeros(p.shape[:-2], dtype=torch.bool, device=p.device)
    eager = not torch.compiler.is_compiling()
    for _ in range(iters):
        q = p / p.sum(dim=-2, keepdim=True).clamp(min=SINKHORN_EPS)
        q = q / q.sum(dim=-1, keepdim=True).clamp(min=SINKHORN_EPS)
        p = torch.where(done[..., None, None], p, q)
        with torch.no_grad():
            row_dev = (p.sum(-1) - 1).abs()
            col_dev = (p.sum(-2) - 1).abs()
            done = done | ((_masked_max(row_dev, ranks) < tol) & (_masked_max(col_dev, real) < tol))
        if eager and bool(done.all()):
            break
    return torch.where(block, torch.zeros((), dtype=p.dtype, device=p.device), p)


# ----------------------------------------------------------------------------------------------- public API
def neural_ndcg(scores: Tensor, relevance: Tensor, tau: float | Tensor = 1.0, *, k: int | None = None,
                mask: Tensor | None = None, transposed: bool = False, sinkhorn_iters: int = 50,
                sinkhorn_tol: float = 1e-6, powered_relevance: bool = True, reduction: Reduction = "mean",
                backend: Backend = "auto") -> Tensor:
    """NeuralNDCG@k (Pobrotyn & Bialobrzeski, 2021): NDCG with the sort relaxed by NeuralSort. Higher is better;
    use ``-neural_ndcg(...)`` as the loss.

    For each list, ``P_hat`` is NeuralSort's relaxed permutation matrix of its real items (padded items take no
    part: a list of ``m`` real items gives exactly what those ``m`` items alone give), scaled by Sinkhorn
    iterations towards a doubly stochastic ``M`` as in allRank's ``sinkhorn_scaling`` (each iteration divides the
    columns, then the rows, by their sums clamped to ``1e-10``; a list stops after the first iteration at which all
    its row and column sums are within ``sinkhorn_tol`` of 1, or after ``sinkhorn_iters``). Then

    - ``transposed=False`` (allRank's ``neuralNDCG``): relaxed gains ``M @ g`` by rank times the discounts
      ``1 / log2(i + 2)`` of ranks ``i < k`` (0-based), summed;
    - ``transposed=True`` (``neuralNDCG_transposed``): expected discounts ``M^T @ d`` by item (``d`` cut to 0 at
      ranks ``>= k``) times the gains, summed;

    both are ``d^T M g`` and agree up to rounding. Gains are ``g = 2^rel - 1`` (``powered_relevance=True``) or
    ``rel``. The result is divided by the ideal DCG@k (the real items' gains sorted descending). Lists whose IDCG is
    0 (no relevant item, or no real item) give 0 and are left out of the ``"mean"``. Without Sinkhorn
    (``sinkhorn_iters=0``) ``P_hat`` is only row-stochastic and the value can exceed 1.

    Differences from allRank: the IDCG is divided exactly (allRank adds 1e-10), the transposed form with
    ``powered_relevance=False`` uses linear gains in its IDCG too (allRank keeps ``2^rel - 1`` there), padding may
    be anywhere in a list (allRank masks rank rows by item positions, which is right only for padding at the end),
    and convergence is decided per list (allRank stops the whole batch when every list has converged).

    Memory: no ``n x n`` tensor is formed when ``sinkhorn_iters=0`` (one :func:`relaxed_sort_apply`, with
    ``transpose=True`` for the transposed form: O(B n) memory forward and backward) nor, with Sinkhorn iterations,
    when ``B n^2 > DENSE_SINKHORN_ENTRIES`` (2^18): then the scaling is streamed, ``M = diag(a) P_hat diag(b)``
    with each iteration two calls of :func:`relaxed_sort_apply` (column sums ``b * P_hat^T a``, row sums
    ``a * P_hat b``); memory O(B n) per iteration run (the vectors autograd keeps), time about ``2 x iterations``
    relaxed sorts. Smaller problems with Sinkhorn iterations materialise ``P_hat`` (:func:`relaxed_sort_matrix`)
    and normalise it densely: the same values up to rounding, 5x to 14x faster on CPU, but ``2 B n^2`` values kept
    per iteration for the backward. In eager mode the loop stops once every list has converged (one host
    synchronisation per iteration); under ``torch.compile`` it runs ``sinkhorn_iters`` iterations with converged
    lists frozen, which gives the same result.

    Args:
        scores: ``(..., n)`` predicted scores (float32, float16, bfloat16 or float64).
        relevance: ``(..., n)`` graded relevance labels, integer or floating, finite and ``>= 0`` on real items
            (padded items may hold anything, e.g. allRank's -1).
        tau: NeuralSort temperature > 0, a number or a one-element tensor (differentiable).
        k: truncation rank (an int >= 1; ``None``: the whole list). ``k > n`` is the whole list.
        mask: ``(..., n)`` bool, True for a real item; ``None``: all items are real.
        transposed: the transposed form (see above).
        sinkhorn_iters: maximum number of Sinkhorn iterations (int >= 0; allRank's 50 by default).
        sinkhorn_tol: tolerance > 0 of the Sinkhorn stopping test (allRank's 1e-6).
        powered_relevance: gains ``2^rel - 1`` (True) or ``rel`` (False).
        reduction: ``"mean"`` (over lists with IDCG > 0), ``"sum"`` or ``"none"`` (shape ``scores.shape[:-1]``).
        backend: as in :func:`relaxed_sort_apply`.

    Returns:
        NeuralNDCG, float64 for float64 scores and float32 otherwise, differentiable with respect to ``scores``
        and a tensor ``tau``.
    """
    scores, relevance, mask = _check_lists(scores, relevance, mask)
    check_tau(tau, scores.device)
    k = _check_k(k)
    _check_flag("transposed", transposed)
    sinkhorn_iters = check_int("sinkhorn_iters", sinkhorn_iters, minimum=0)
    if (isinstance(sinkhorn_tol, bool) or not isinstance(sinkhorn_tol, numbers.Real)
            or not math.isfinite(sinkhorn_tol) or sinkhorn_tol <= 0):
        raise ValueError(f"sinkhorn_tol must be a finite real number > 0, got {sinkhorn_tol!r}")
    _check_flag("powered_relevance", powered_relevance)
    reduction = _check_reduction(reduction)
    backend = check_backend_name(backend)

    batch_shape, n = scores.shape[:-1], scores.shape[-1]
    lists = math.prod(batch_shape)
    dtype = _compute_dtype(scores.dtype)
    s = scores.to(dtype).reshape(lists, n)
    flat_mask = None if mask is None else mask.reshape(lists, n)
    real = torch.ones_like(s, dtype=torch.bool) if flat_mask is None else flat_mask
    # The ranks a list of m real items occupies: output rows 0..m-1 (its other rows of P_hat are zero).
    ranks = torch.arange(n, device=s.device) < real.sum(-1, keepdim=True)
    rel = relevance.reshape(lists, n)
    _check_relevance_values(rel, real)
    gains = _gains(rel, real, dtype, powered_relevance)
    disc = _discounts(n, k, dtype, s.device)
    idcg = _ideal_dcg(gains, disc)

    if n == 0 or lists == 0:
        dcg = s.sum(-1) * 0  # nothing to sort; keeps the graph to scores
    elif sinkhorn_iters > 0 and lists * n * n <= DENSE_SINKHORN_ENTRIES:
        p = relaxed_sort_matrix(s, tau, mask=flat_mask, backend=backend)
        m = _dense_sinkhorn(p, real, ranks, sinkhorn_iters, float(sinkhorn_tol))
        if transposed:
            dcg = ((m.transpose(-1, -2) @ disc[:, None])[..., 0] * gains).sum(-1)
        else:
            dcg = ((m @ gains[..., None])[..., 0] * disc).sum(-1)
    else:
        if sinkhorn_iters > 0:
            a, b = _streaming_sinkhorn(s, tau, flat_mask, real, ranks, sinkhorn_iters, float(sinkhorn_tol),
                                       backend)
        else:
            a = b = None
        if transposed:
            v = disc.expand(lists, n) if a is None else a * disc
            expected = relaxed_sort_apply(s, v.contiguous(), tau, mask=flat_mask, backend=backend, transpose=True)
            dcg = ((expected if b is None else b * expected) * gains).sum(-1)
        else:
            x = gains if b is None else b * gains
            relaxed = relaxed_sort_apply(s, x, tau, mask=flat_mask, backend=backend)
            dcg = ((relaxed if a is None else a * relaxed) * disc).sum(-1)
    values, valid = _normalise(dcg, idcg)
    return _reduce(values, valid, batch_shape, reduction)


def ndcg(scores: Tensor, relevance: Tensor, k: int | None = None, *, mask: Tensor | None = None,
         powered_relevance: bool = True, reduction: Reduction = "mean") -> Tensor:
    """The exact NDCG@k metric: items ranked by score, descending, real items only.

    ``DCG@k = sum_{i < k} g_(i) / log2(i + 2)`` over the items in score order (0-based rank ``i``), divided by the
    ideal DCG@k (gains sorted descending); gains ``2^rel - 1`` or ``rel`` as in :func:`neural_ndcg`. **Ties**: items
    with equal scores are credited the mean gain of their tie group at each of the group's ranks, i.e. the expected
    NDCG over a uniformly random order of tied items. This is the limit of :func:`neural_ndcg` as ``tau -> 0``
    (NeuralSort's rows at a tied group's ranks spread evenly over the group), it does not depend on the input order,
    and without ties it is the plain NDCG. Lists whose IDCG is 0 give 0 and are left out of the ``"mean"``.

    Args:
        scores: ``(..., n)`` floating scores, finite on real items (padded ones are ignored).
        relevance: ``(..., n)`` integer or floating labels, finite and ``>= 0`` on real items.
        k: truncation rank, an int >= 1 or ``None`` (the whole list).
        mask: ``(..., n)`` bool, True for a real item; ``None``: all real.
        powered_relevance: gains ``2^rel - 1`` (True) or ``rel`` (False).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``scores.shape[:-1]``).

    Returns:
        A detached tensor (no gradient: the metric is piecewise constant in the scores), computed in float64 and
        returned as float64 for float64 scores, float32 otherwise.
    """
    scores, relevance, mask = _check_lists(scores, relevance, mask)
    k = _check_k(k)
    _check_flag("powered_relevance", powered_relevance)
    reduction = _check_reduction(reduction)
    batch_shape, n = scores.shape[:-1], scores.shape[-1]
    lists = math.prod(batch_shape)
    with torch.no_grad():
        s = scores.detach().to(torch.float64).reshape(lists, n)
        real = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.reshape(lists, n)
        rel = relevance.detach().reshape(lists, n)
        if checks_values():
            bad = real & ~torch.isfinite(s)
            if bool(bad.any()):
                raise ValueError("scores must be finite on real items (mask True): found NaN or infinite values")
        _check_relevance_values(rel, real)
        gains = _gains(rel, real, torch.float64, powered_relevance)
        disc = _discounts(n, k, torch.float64, s.device)
        idcg = _ideal_dcg(gains, disc)
        # Real items first, by score descending; padded ones last (their gain is 0).
        key = torch.where(real, s, torch.full((), -math.inf, dtype=torch.float64, device=s.device))
        ordered, order = torch.sort(key, dim=-1, descending=True, stable=True)
        sorted_gains = gains.gather(-1, order)
        # Tie groups among the sorted scores: credit each group's mean gain at each of its ranks.
        starts = torch.ones_like(ordered, dtype=torch.bool)
        starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        group = (starts.cumsum(-1) - 1) + n * torch.arange(lists, device=s.device)[:, None]
        group = group.reshape(-1)
        totals = torch.zeros(lists * n, dtype=torch.float64, device=s.device)
        group_gain = totals.index_add(0, group, sorted_gains.reshape(-1))
        group_size = totals.index_add(0, group, torch.ones_like(sorted_gains).reshape(-1))
        group_disc = totals.index_add(0, group, disc.expand(lists, n).reshape(-1))
        dcg = (group_gain * group_disc / group_size.clamp(min=1)).reshape(lists, n).sum(-1)
        values, valid = _normalise(dcg, idcg)
        out = _reduce(values, valid, batch_shape, reduction)
    return out.to(_compute_dtype(scores.dtype))
