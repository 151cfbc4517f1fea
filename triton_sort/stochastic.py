"""Stochastic NeuralSort: the Plackett-Luce distribution over permutations.

Implements Section 4 of Grover et al., "Stochastic Optimization of Sorting Networks via Continuous
Relaxations" (ICLR 2019):

* exact sampling with the Gumbel-max trick (``sort(logits + Gumbel noise)`` is Plackett-Luce distributed),
* exact, numerically stable log-probabilities,
* reparameterised relaxed samples: NeuralSort of the perturbed logits (Proposition 5, beta = 1), with a
  straight-through ``hard=True`` mode whose forward pass is exactly the matching ``sample``,
* a REINFORCE (score-function) surrogate loss with optional baselines, for objectives that only accept
  exact permutations.

Notation: ``logits`` has shape ``(..., n)``; ``batch = logits.shape[:-1]``; a sample has shape
``sample_shape + batch + (n,)``. Permutations list item indices from the highest perturbed score to
the lowest, the same convention as ``torch.sort(..., descending=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch.distributions import Distribution, constraints

from ._validation import checks_values
from .api import check_tau, relaxed_sort_apply, relaxed_sort_matrix

__all__ = ["PlackettLuce", "permutation", "reinforce_loss"]

_ShapeLike = torch.Size | Sequence[int]
_NO_SAMPLE_DIMS = torch.Size()


class _Permutation(constraints.Constraint):
    """Constraint: the last dimension is a permutation of ``0, ..., n - 1``."""

    is_discrete = True
    event_dim = 1

    def check(self, value: torch.Tensor) -> torch.Tensor:
        if value.dim() < 1 or value.dtype.is_floating_point or value.dtype.is_complex:
            return torch.zeros(value.shape[:-1], dtype=torch.bool, device=value.device)
        identity = torch.arange(value.shape[-1], device=value.device)
        return (value.sort(dim=-1).values == identity).all(dim=-1)

    def __repr__(self) -> str:
        return "permutation()"


permutation = _Permutation()


class PlackettLuce(Distribution):
    """Plackett-Luce distribution over permutations of ``n`` items with log scores ``logits``.

    ``q(z | s) = prod_i s[z_i] / sum_{k >= i} s[z_k]`` with ``s = exp(logits)``: item ``z_1`` is drawn
    with probability proportional to its score, then ``z_2`` among the remaining items, and so on.

    Args:
        logits: floating tensor of shape ``(..., n)``, ``n >= 1``, all finite.
            ``batch_shape = logits.shape[:-1]``, ``event_shape = (n,)``.
        validate_args: as in ``torch.distributions``. ``logits`` and the ``perm`` given to
            ``log_prob`` are always checked, whatever its value (in eager mode; see below).

    Under ``torch.compile`` (``fullgraph=True`` included) the checks that read tensor values are skipped while
    tracing, so nothing data-dependent is traced: ``log_prob`` of a row that is not a permutation is NaN instead of
    a ValueError, non-finite logits give NaN log-probabilities, and ``rsample``/``rsample_apply`` still raise
    (the sort op checks its scores). Shapes, dtypes and ``tau`` are checked as in eager mode.

    ``has_rsample`` is True, but ``rsample`` returns *relaxed* permutation matrices that depend on a
    temperature ``tau`` (``rsample(sample_shape, tau, hard)``), not exact samples from this distribution.
    Noise is drawn on ``logits.device`` in ``logits.dtype`` (float32 for half-precision logits), one
    independent Gumbel variable per sample, batch row and item.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {"logits": constraints.real_vector}
    support = permutation
    has_rsample = True

    def __init__(self, logits: torch.Tensor, validate_args: bool | None = None) -> None:
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
        if not logits.dtype.is_floating_point:
            raise TypeError(f"logits must have a floating-point dtype, got {logits.dtype}")
        if logits.dim() < 1:
            raise ValueError("logits must have at least one dimension (..., n), got a 0-d tensor")
        if logits.shape[-1] < 1:
            raise ValueError(f"logits must have at least one item in its last dimension, got shape "
                             f"{tuple(logits.shape)}")
        eager = checks_values()
        if eager and not torch.isfinite(logits).all():
            raise ValueError("logits must be finite (found NaN or +-inf)")
        self.logits = logits
        # torch.distributions' own argument check is data-dependent too (and implied by the one above).
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=validate_args if eager else False)

    @property
    def num_items(self) -> int:
        """``n``, the number of items being permuted."""
        return self.logits.shape[-1]

    @property
    def mode(self) -> torch.Tensor:
        """The most likely permutation, the descending argsort of ``logits``: shape ``batch + (n,)``."""
        return torch.sort(self.logits.detach(), dim=-1, descending=True, stable=True).indices

    def expand(self, batch_shape: _ShapeLike, _instance: PlackettLuce | None = None) -> PlackettLuce:
        """The same distribution broadcast to ``batch_shape`` (a view of ``logits``, no copy)."""
        new = self._get_checked_instance(PlackettLuce, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits = self.logits.expand(batch_shape + self.event_shape)
        super(PlackettLuce, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def entropy(self) -> torch.Tensor:
        raise NotImplementedError(
            "PlackettLuce.entropy has no closed form (it sums over n! permutations); estimate it with "
            "-dist.log_prob(dist.sample((num_samples,))).mean(0)"
        )

    def perturbed_logits(
        self, sample_shape: _ShapeLike = _NO_SAMPLE_DIMS, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``logits + Gumbel noise`` of shape ``sample_shape + batch + (n,)``, differentiable in ``logits``.

        Sorting them in descending order gives an exact Plackett-Luce sample. ``sample`` and ``rsample``
        both go through here, so the same seed gives the same noise and therefore the same permutation.
        """
        shape = self._extended_shape(torch.Size(sample_shape))
        noise_dtype = torch.promote_types(self.logits.dtype, torch.float32)
        finfo = torch.finfo(noise_dtype)
        options = dict(device=self.logits.device, dtype=noise_dtype)
        # An explicit generator=None breaks torch.compile's dynamic shapes (fake tensors reject symbolic sizes).
        uniform = torch.rand(shape, **options) if generator is None else torch.rand(shape, generator=generator,
                                                                                     **options)
        # torch.rand can return exactly 0, and -log(-log(u)) is infinite at u = 0 and u = 1.
        uniform = uniform.clamp(min=finfo.tiny, max=1.0 - finfo.eps)
        gumbel = -torch.log(-torch.log(uniform))
        return self.logits.to(noise_dtype) + gumbel

    def sample(
        self, sample_shape: _ShapeLike = _NO_SAMPLE_DIMS, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Exact permutations, int64 of shape ``sample_shape + batch + (n,)`` (Gumbel-max trick)."""
        with torch.no_grad():
            scores = self.perturbed_logits(sample_shape, generator)
            return torch.sort(scores, dim=-1, descending=True, stable=True).indices

    def rsample(
        self,
        sample_shape: _ShapeLike = _NO_SAMPLE_DIMS,
        tau: float | torch.Tensor = 1.0,
        hard: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Relaxed permutation matrices ``sample_shape + batch + (n, n)``, differentiable in ``logits``.

        NeuralSort of the perturbed logits at temperature ``tau``: row ``i`` is a softmax peaking at the
        item ranked ``i``-th. ``hard=True`` is straight-through: the forward value is the exact permutation
        matrix of ``sample`` for the same noise (``P[..., i, z_i] = 1``), the gradient is the relaxed one.
        """
        check_tau(tau)  # before drawing noise; passed on as given (a tensor tau keeps its gradient)
        scores = self.perturbed_logits(sample_shape, generator)
        n = self.num_items
        matrices = relaxed_sort_matrix(scores.reshape(-1, n), tau, descending=True, hard=hard)
        return matrices.reshape((*scores.shape, n))

    def rsample_apply(
        self,
        x: torch.Tensor,
        tau: float | torch.Tensor = 1.0,
        sample_shape: _ShapeLike = _NO_SAMPLE_DIMS,
        hard: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``rsample(sample_shape, tau, hard) @ x`` without materialising the ``n x n`` matrices.

        Args:
            x: shape ``batch + (n,)`` or ``batch + (n, d)``, on ``logits.device``; the same ``x`` is used
                for every sample.

        Returns:
            ``sample_shape + x.shape``: ``x`` reordered (softly, unless ``hard``) from the highest
            perturbed score to the lowest, in the promoted dtype of ``x`` and the noise. Same noise as
            ``rsample``/``sample`` for the same seed.
        """
        check_tau(tau)  # before drawing noise; passed on as given (a tensor tau keeps its gradient)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        n = self.num_items
        item_shape = torch.Size((*self.batch_shape, n))
        value_shape = x.shape[len(item_shape):]
        if x.shape[: len(item_shape)] != item_shape or len(value_shape) > 1:
            raise ValueError(f"x must have shape batch + (n,) = {tuple(item_shape)} or batch + (n, d), "
                             f"got {tuple(x.shape)}")
        sample_shape = torch.Size(sample_shape)
        scores = self.perturbed_logits(sample_shape, generator)
        # The core operator wants one dtype and a single batch dimension, so samples and batch rows are
        # flattened together and x is repeated over the samples.
        work_dtype = torch.promote_types(scores.dtype, x.dtype)
        flat_x = x.to(work_dtype).expand(sample_shape + x.shape).reshape((-1, n, *value_shape))
        flat_scores = scores.to(work_dtype).reshape(-1, n)
        result = relaxed_sort_apply(flat_scores, flat_x, tau, descending=True, hard=hard)
        return result.reshape(sample_shape + x.shape)

    def log_prob(self, perm: torch.Tensor) -> torch.Tensor:
        """Exact ``log q(perm)``: shape ``broadcast(perm.shape[:-1], batch)``.

        Args:
            perm: integer tensor of shape ``(..., n)`` whose last dimension is a permutation of
                ``0, ..., n - 1`` (item indices from first place to last); its leading dimensions
                broadcast against ``batch`` like in ``torch.distributions``.
        """
        if not isinstance(perm, torch.Tensor):
            raise TypeError(f"perm must be a torch.Tensor, got {type(perm).__name__}")
        if perm.dtype.is_floating_point or perm.dtype.is_complex or perm.dtype == torch.bool:
            raise TypeError(f"perm must have an integer dtype, got {perm.dtype}")
        n = self.num_items
        if perm.dim() < 1 or perm.shape[-1] != n:
            raise ValueError(f"perm must have shape (..., n) with n = {n}, got {tuple(perm.shape)}")
        try:
            batch = torch.broadcast_shapes(perm.shape[:-1], self.batch_shape)
        except RuntimeError as error:
            raise ValueError(f"perm batch shape {tuple(perm.shape[:-1])} does not broadcast with the "
                             f"distribution batch shape {tuple(self.batch_shape)}") from error
        valid = permutation.check(perm)
        eager = checks_values()
        if eager and not valid.all():
            raise ValueError(f"perm must hold permutations of 0..{n - 1} in its last dimension")
        shape = (*batch, n)
        index = perm.to(device=self.logits.device, dtype=torch.long).expand(shape)
        if not eager:
            index = index.clamp(0, n - 1)  # an index out of range would be a device-side assert on CUDA
        ranked_logits = self.logits.expand(shape).gather(-1, index)
        # log q = sum_i [l_{z_i} - logsumexp_{k >= i} l_{z_k}]; the suffix log-sum-exps are a
        # logcumsumexp of the reversed sequence, stable for any magnitude of logits.
        suffix_log_normalisers = torch.logcumsumexp(ranked_logits.flip(-1), dim=-1)
        log_q = ranked_logits.sum(-1) - suffix_log_normalisers.sum(-1)
        if eager:
            return log_q
        # Traced: the check above could not raise, so rows that are not permutations are NaN, never a number.
        return log_q.masked_fill(~valid.to(log_q.device).expand(log_q.shape), float("nan"))


def reinforce_loss(
    dist: PlackettLuce,
    objective: Callable[[torch.Tensor], torch.Tensor],
    num_samples: int,
    baseline: str | float | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE (score-function) surrogate loss for ``E_{z ~ dist}[objective(z)]`` over exact permutations.

    Draws ``num_samples`` exact permutations ``z`` of shape ``(num_samples,) + batch + (n,)`` and calls
    ``objective(z)``, which must return values of shape ``(num_samples,) + batch``. Back-propagating the
    returned ``surrogate`` gives the Monte-Carlo estimate

        mean_{samples, batch rows} [ (f(z) - b) * grad log q(z) + grad f(z) ]

    i.e. an unbiased estimate of the gradient of ``mean_{batch rows} E[f(z)]`` with respect to
    ``dist.logits`` (and to any parameters ``objective`` itself depends on; ``grad f`` is zero when it
    depends on none).

    Args:
        baseline: control variate ``b`` subtracted from ``f(z)`` in the score term; it never biases the
            gradient because it does not depend on the sample it multiplies.
            ``None``: ``b = 0``. ``"mean"``: leave-one-out mean of the other samples of the same batch
            row (needs ``num_samples >= 2``). A float or a tensor broadcastable to ``batch``: a constant
            baseline (detached; train a learned baseline with its own loss).
        generator: optional ``torch.Generator`` for the noise.

    Returns:
        ``(surrogate, mean_objective)``: two scalars. ``surrogate``'s *value* equals the Monte-Carlo mean
        of ``f(z)`` (the score term is built to be zero in the forward pass); only its gradient is the
        estimator. ``mean_objective`` is the same mean, detached, for logging.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    samples = dist.sample((num_samples,), generator=generator)
    values = objective(samples)
    expected_shape = (num_samples, *dist.batch_shape)
    if not isinstance(values, torch.Tensor) or values.shape != expected_shape:
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"objective must return a tensor of shape (num_samples,) + batch = "
                         f"{expected_shape}, got {got}")
    if not values.dtype.is_floating_point:
        raise TypeError(f"objective must return a floating-point tensor, got {values.dtype}")
    detached_values = values.detach()
    if baseline is None:
        centred_values = detached_values
    elif isinstance(baseline, str):
        if baseline != "mean":
            raise ValueError(f'baseline must be None, "mean", a float or a tensor, got {baseline!r}')
        if num_samples < 2:
            raise ValueError('baseline="mean" (leave-one-out) needs num_samples >= 2')
        leave_one_out_mean = (detached_values.sum(0, keepdim=True) - detached_values) / (num_samples - 1)
        centred_values = detached_values - leave_one_out_mean
    else:
        baseline_tensor = torch.as_tensor(baseline, dtype=values.dtype, device=values.device).detach()
        try:
            centred_values = detached_values - baseline_tensor.expand(dist.batch_shape)
        except RuntimeError as error:
            raise ValueError(f"baseline of shape {tuple(baseline_tensor.shape)} does not broadcast to the "
                             f"batch shape {tuple(dist.batch_shape)}") from error
    log_q = dist.log_prob(samples)
    # (log_q - log_q.detach()) is zero in value but carries grad log q, so the surrogate's value stays the
    # plain Monte-Carlo objective while its gradient is the score-function estimator.
    surrogate = (values + centred_values * (log_q - log_q.detach())).mean()
    return surrogate, detached_values.mean()
