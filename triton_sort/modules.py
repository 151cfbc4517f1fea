"""``nn.Module`` wrappers of the functional API."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from .api import Backend, _check_flag, check_tau, relaxed_sort_apply, relaxed_sort_matrix
from .applications import relaxed_topk
from .stochastic import PlackettLuce


def _perturb(scores: Tensor, stochastic: bool, training: bool) -> Tensor:
    """Stochastic NeuralSort in training: ``scores`` are log-scores of a Plackett-Luce distribution and get
    i.i.d. Gumbel noise (one variable per item and batch row); otherwise they pass through unchanged."""
    if not (stochastic and training):
        return scores
    # perturbed_logits computes in float32 for half-precision logits; the sort wants the scores' dtype back.
    return PlackettLuce(scores).perturbed_logits().to(scores.dtype)


class NeuralSort(nn.Module):
    """Relaxed sort layer: ``forward(scores)`` returns ``P_hat`` (``(n, n)`` or ``(B, n, n)``),
    ``forward(scores, x)`` returns ``P_hat @ x`` without materialising ``P_hat`` (see ``relaxed_sort_apply``).

    ``stochastic=True`` is stochastic NeuralSort: in training mode the scores are treated as Plackett-Luce
    log-scores and perturbed with fresh Gumbel noise on every call before sorting (a reparameterised relaxed
    sample, as ``PlackettLuce.rsample``); in eval mode the layer is deterministic (it sorts the scores, the
    distribution's mode).
    """

    def __init__(self, tau: float = 1.0, *, descending: bool = True, hard: bool = False, stochastic: bool = False,
                 backend: Backend = "auto") -> None:
        super().__init__()
        _check_flag("stochastic", stochastic)
        self.tau = check_tau(tau)
        self.descending = descending
        self.hard = hard
        self.stochastic = stochastic
        self.backend = backend

    def forward(self, scores: Tensor, x: Tensor | None = None) -> Tensor:
        scores = _perturb(scores, self.stochastic, self.training)
        options = dict(descending=self.descending, hard=self.hard, backend=self.backend)
        if x is None:
            return relaxed_sort_matrix(scores, self.tau, **options)
        return relaxed_sort_apply(scores, x, self.tau, **options)

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, descending={self.descending}, hard={self.hard}, stochastic={self.stochastic}, "
                f"backend={self.backend!r}")


def _squared_distances(queries: Tensor, candidates: Tensor) -> Tensor:
    """``||q_a - c_j||^2`` for queries ``(Q, e)`` and candidates ``(M, e)``: ``(Q, M)``, without a ``(Q, M, e)``
    temporary (clamped at 0 against rounding)."""
    cross = queries @ candidates.T
    return (queries.square().sum(-1, keepdim=True) - 2 * cross + candidates.square().sum(-1)).clamp_min(0)


class DifferentiableKNN(nn.Module):
    """Differentiable k-nearest-neighbour loss (Grover et al., 2019, section 6.3) and exact kNN prediction.

    For each query the candidates' scores are minus the squared embedding distances, and the relaxed top-k
    indicator (:func:`relaxed_topk`, never ``M x M``) weights the candidates that share the query's label:
    ``loss = -mean_a sum_j 1[y_j = y_a] topk_aj / k``, which is -1 when the k nearest candidates all share the
    query's label. ``stochastic=True`` perturbs the scores as Plackett-Luce log-scores in training mode (see
    :class:`NeuralSort`).
    """

    def __init__(self, k: int, tau: float = 1.0, *, stochastic: bool = False, backend: Backend = "auto") -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        _check_flag("stochastic", stochastic)
        self.k = int(k)
        self.tau = check_tau(tau)
        self.stochastic = stochastic
        self.backend = backend

    def forward(self, queries: Tensor, candidates: Tensor, candidate_labels: Tensor,
                query_labels: Tensor) -> Tensor:
        """Scalar loss for query embeddings ``(Q, e)``, candidate embeddings ``(M, e)`` (``M >= k``) and integer
        labels ``(M,)`` and ``(Q,)``; differentiable with respect to both embeddings."""
        _check_knn_inputs(queries, candidates, candidate_labels)
        if query_labels.shape != queries.shape[:1]:
            raise ValueError(f"query_labels must have shape ({queries.shape[0]},), got {tuple(query_labels.shape)}")
        scores = _perturb(-_squared_distances(queries, candidates), self.stochastic, self.training)
        topk = relaxed_topk(scores, self.k, self.tau, backend=self.backend)
        same = (candidate_labels[None, :] == query_labels[:, None]).to(topk.dtype)
        return -(same * topk).sum(-1).mean() / self.k

    @torch.no_grad()
    def predict(self, queries: Tensor, candidates: Tensor, candidate_labels: Tensor) -> Tensor:
        """Majority vote over the exact ``k`` nearest candidates: labels ``(Q,)`` (ties go to the smaller
        label, as in scikit-learn)."""
        _check_knn_inputs(queries, candidates, candidate_labels)
        if candidates.shape[0] < self.k:
            raise ValueError(f"need at least k = {self.k} candidates, got {candidates.shape[0]}")
        nearest = _squared_distances(queries, candidates).topk(self.k, dim=-1, largest=False).indices
        votes = nn.functional.one_hot(candidate_labels[nearest], int(candidate_labels.max()) + 1).sum(1)
        return votes.argmax(-1)

    def extra_repr(self) -> str:
        return f"k={self.k}, tau={self.tau}, stochastic={self.stochastic}, backend={self.backend!r}"


def _check_knn_inputs(queries: Tensor, candidates: Tensor, candidate_labels: Tensor) -> None:
    if queries.dim() != 2 or candidates.dim() != 2 or queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"queries and candidates must have shapes (Q, e) and (M, e), got {tuple(queries.shape)} "
                         f"and {tuple(candidates.shape)}")
    if candidate_labels.shape != candidates.shape[:1] or candidate_labels.dtype.is_floating_point:
        raise ValueError(f"candidate_labels must be integers of shape ({candidates.shape[0]},), got "
                         f"{candidate_labels.dtype} of shape {tuple(candidate_labels.shape)}")
