"""``nn.Module`` wrappers of the functional API."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._validation import check_backend_name, check_int
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


def _checked_tau(tau: object) -> Tensor:
    """``check_tau`` plus, for a tensor, its value (a module's tau is set rarely, so one read-back is cheap here,
    and a bad value is reported where it is set rather than at the next forward)."""
    checked = check_tau(tau)
    if isinstance(tau, Tensor):
        check_tau(float(tau.detach()))
    return checked


class _WithTau(nn.Module):
    """A module whose temperature is state: ``tau`` is a 0-d float64 buffer, or an ``nn.Parameter`` when learned,
    so ``state_dict`` holds it under ``"tau"`` either way (checkpoints load across ``learn_tau``).

    Assigning a number or a tensor (``module.tau = 0.5``, an annealing schedule) checks it and updates the stored
    tensor in place: its dtype, device and any optimizer's reference to it stay, and a compiled forward sees the
    new value without recompiling. Assigning an ``nn.Parameter`` makes that parameter the module's tau.
    """

    tau: Tensor

    def _init_tau(self, tau: float | Tensor, learn_tau: bool) -> None:
        _check_flag("learn_tau", learn_tau)
        if isinstance(tau, nn.Parameter):
            self.tau = tau  # the caller's own parameter (checked by __setattr__), learned whatever learn_tau says
            return
        value = _checked_tau(tau).detach().clone()
        if learn_tau:
            self.register_parameter("tau", nn.Parameter(value))
        else:
            self.register_buffer("tau", value)

    def __setattr__(self, name: str, value: object) -> None:
        if name == "tau":
            _checked_tau(value)
            current = self._parameters.get("tau", self._buffers.get("tau"))
            if current is not None and not isinstance(value, nn.Parameter):
                with torch.no_grad():
                    current.copy_(torch.as_tensor(value, dtype=current.dtype))
                return
        super().__setattr__(name, value)

    @property
    def learn_tau(self) -> bool:
        """Whether ``tau`` is a parameter (raw tau, not log tau: a step to ``tau <= 0`` is a ValueError in the next
        forward, never a silent clamp)."""
        return "tau" in self._parameters

    def _tau_repr(self) -> str:
        return f"tau={float(self.tau.detach()):g}" + (", learn_tau=True" if self.learn_tau else "")


class NeuralSort(_WithTau):
    """Relaxed sort layer: ``forward(scores)`` returns ``P_hat`` (``(..., n, n)`` for scores ``(..., n)``),
    ``forward(scores, x)`` returns ``P_hat @ x`` without materialising ``P_hat`` (see ``relaxed_sort_apply``);
    ``forward(..., mask=mask)`` for padded lists.

    ``tau`` is a 0-d float64 buffer (in ``state_dict``; ``module.tau = 0.5`` updates it in place), or a parameter
    with ``learn_tau=True`` or when an ``nn.Parameter`` is given (see ``_WithTau``); it reaches the functional API as
    a tensor. Arguments are checked here, not at the first ``forward``.

    ``stochastic=True`` is stochastic NeuralSort: in training mode the scores are treated as Plackett-Luce
    log-scores and perturbed with fresh Gumbel noise on every call before sorting (a reparameterised relaxed
    sample, as ``PlackettLuce.rsample``); in eval mode the layer is deterministic (it sorts the scores, the
    distribution's mode).
    """

    def __init__(self, tau: float | Tensor = 1.0, *, descending: bool = True, hard: bool = False,
                 stochastic: bool = False, backend: Backend = "auto", learn_tau: bool = False) -> None:
        super().__init__()
        for name, flag in (("descending", descending), ("hard", hard), ("stochastic", stochastic)):
            _check_flag(name, flag)
        self.backend = check_backend_name(backend)
        self._init_tau(tau, learn_tau)
        self.descending = descending
        self.hard = hard
        self.stochastic = stochastic

    def forward(self, scores: Tensor, x: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """``P_hat`` (``(..., n, n)``) or ``P_hat @ x``; ``mask``: padded lists (see ``relaxed_sort_apply``)."""
        scores = _perturb(scores, self.stochastic, self.training)
        options = dict(descending=self.descending, hard=self.hard, backend=self.backend, mask=mask)
        if x is None:
            return relaxed_sort_matrix(scores, self.tau, **options)
        return relaxed_sort_apply(scores, x, self.tau, **options)

    def extra_repr(self) -> str:
        return (f"{self._tau_repr()}, descending={self.descending}, hard={self.hard}, "
                f"stochastic={self.stochastic}, backend={self.backend!r}")


def _squared_distances(queries: Tensor, candidates: Tensor) -> Tensor:
    """``||q_a - c_j||^2`` for queries ``(Q, e)`` and candidates ``(M, e)``: ``(Q, M)``, without a ``(Q, M, e)``
    temporary (clamped at 0 against rounding).

    Computed in float32 (float64 stays float64), also under autocast: squared distances of half-precision
    embeddings overflow fp16 (65504) already for entries of a few hundred."""
    dtype = torch.promote_types(queries.dtype, torch.float32)
    with torch.autocast(queries.device.type, enabled=False):
        queries, candidates = queries.to(dtype), candidates.to(dtype)
        cross = queries @ candidates.T
        return (queries.square().sum(-1, keepdim=True) - 2 * cross + candidates.square().sum(-1)).clamp_min(0)


class DifferentiableKNN(_WithTau):
    """Differentiable k-nearest-neighbour loss (Grover et al., 2019, section 6.3) and exact kNN prediction.

    For each query the candidates' scores are minus the squared embedding distances, and the relaxed top-k
    indicator (:func:`relaxed_topk`, never ``M x M``) weights the candidates that share the query's label:
    ``loss = -mean_a sum_j 1[y_j = y_a] topk_aj / k``, which is -1 when the k nearest candidates all share the
    query's label. ``stochastic=True`` perturbs the scores as Plackett-Luce log-scores in training mode (see
    :class:`NeuralSort`); ``tau`` and ``learn_tau`` as in :class:`NeuralSort`. The squared distances are computed in
    float32 whatever the embeddings' dtype (and autocast), so the loss is float32 for half-precision embeddings.
    """

    def __init__(self, k: int, tau: float | Tensor = 1.0, *, stochastic: bool = False, backend: Backend = "auto",
                 learn_tau: bool = False) -> None:
        super().__init__()
        self.k = check_int("k", k, minimum=1)
        _check_flag("stochastic", stochastic)
        self.backend = check_backend_name(backend)
        self._init_tau(tau, learn_tau)
        self.stochastic = stochastic

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
        return f"k={self.k}, {self._tau_repr()}, stochastic={self.stochastic}, backend={self.backend!r}"


def _check_knn_inputs(queries: Tensor, candidates: Tensor, candidate_labels: Tensor) -> None:
    if queries.dim() != 2 or candidates.dim() != 2 or queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"queries and candidates must have shapes (Q, e) and (M, e), got {tuple(queries.shape)} "
                         f"and {tuple(candidates.shape)}")
    if candidate_labels.shape != candidates.shape[:1] or candidate_labels.dtype.is_floating_point:
        raise ValueError(f"candidate_labels must be integers of shape ({candidates.shape[0]},), got "
                         f"{candidate_labels.dtype} of shape {tuple(candidate_labels.shape)}")
