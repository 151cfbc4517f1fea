"""Statistical and shape tests of the Plackett-Luce distribution and its estimators (triton_sort.stochastic).

All randomness is seeded, so every test is deterministic; tolerances are set from the Monte-Carlo standard
error measured in the test itself.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
from reference import dense_reference

from triton_sort.stochastic import PlackettLuce, permutation, reinforce_loss

# Upper 1e-3 quantiles of the chi-square distribution, keyed by degrees of freedom (= n! - 1).
CHI_SQUARE_CRITICAL_P1E3 = {5: 20.515, 23: 49.728}
NUM_DRAWS = 100_000

PermutationObjective = Callable[[torch.Tensor], torch.Tensor]


def _all_permutations(n: int) -> torch.Tensor:
    """All n! permutations in lexicographic order, shape (n!, n)."""
    return torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long)


def _direct_probability(logits: list[float], perm: tuple[int, ...]) -> float:
    """q(perm) as the textbook product of ratios, in Python floats."""
    scores = [math.exp(value) for value in logits]
    probability = 1.0
    for place in range(len(perm)):
        probability *= scores[perm[place]] / sum(scores[item] for item in perm[place:])
    return probability


def _count_permutations(samples: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """How often each row of ``table`` (lexicographic) occurs among ``samples`` (..., n)."""
    n = table.shape[-1]
    place_values = n ** torch.arange(n - 1, -1, -1)
    codes = (samples.reshape(-1, n) * place_values).sum(-1)
    table_codes = (table * place_values).sum(-1)
    return torch.bincount(torch.searchsorted(table_codes, codes), minlength=len(table)).double()


def _chi_square(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    expected = counts.sum() * probabilities
    return float(((counts - expected) ** 2 / expected).sum())


def _weighted_sort_objective(item_values: torch.Tensor, place_weights: torch.Tensor) -> PermutationObjective:
    """f(z) = sum_i w_i v_{z_i}: the objective on exact permutations z of shape (..., n)."""
    return lambda perm: (item_values[perm] * place_weights).sum(-1)


def _exact_expectation_gradient(logits: torch.Tensor, objective: PermutationObjective) -> torch.Tensor:
    """Gradient of E_{z ~ PL(logits)}[f(z)] by summing over all n! permutations."""
    logits = logits.detach().clone().requires_grad_(True)
    table = _all_permutations(logits.shape[-1])
    expectation = (PlackettLuce(logits).log_prob(table).exp() * objective(table)).sum()
    (gradient,) = torch.autograd.grad(expectation, logits)
    return gradient


def _per_row_estimates(
    base_logits: torch.Tensor, num_rows: int, estimate_fn: Callable[[PlackettLuce], torch.Tensor]
) -> torch.Tensor:
    """Runs ``estimate_fn(dist)`` (a loss averaged over batch rows) on ``num_rows`` copies of the logits.

    Every row gets independent noise, so the rows of the returned gradient (num_rows, n) are independent
    and identically distributed single-row estimates: their mean and standard error are the test statistic.
    """
    logits = base_logits.expand(num_rows, -1).clone().requires_grad_(True)
    estimate_fn(PlackettLuce(logits)).backward()
    return logits.grad * num_rows


def _assert_within_standard_errors(estimates: torch.Tensor, exact: torch.Tensor, num_errors: float) -> None:
    mean = estimates.mean(0)
    standard_error = estimates.std(0) / math.sqrt(len(estimates))
    assert ((mean - exact).abs() <= num_errors * standard_error).all(), (mean, exact, standard_error)


# ----------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(("n", "dtype"), [(3, torch.float32), (4, torch.float64)])
def test_sample_frequencies_match_exact_probabilities(n: int, dtype: torch.dtype) -> None:
    logits = torch.tensor([0.9, -0.4, 0.3, -1.1][:n], dtype=dtype)
    table = _all_permutations(n)
    dist = PlackettLuce(logits)
    counts = _count_permutations(dist.sample((NUM_DRAWS,), generator=torch.Generator().manual_seed(n)), table)
    critical_value = CHI_SQUARE_CRITICAL_P1E3[math.factorial(n) - 1]

    assert _chi_square(counts, dist.log_prob(table).double().exp()) < critical_value
    # The test has power: the distribution with the item order reversed is clearly rejected.
    assert _chi_square(counts, PlackettLuce(logits.flip(-1)).log_prob(table).double().exp()) > critical_value


def test_sample_is_int64_permutations_in_every_shape() -> None:
    dist = PlackettLuce(torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0)))
    samples = dist.sample((4, 6))
    assert samples.shape == (4, 6, 2, 3, 5)
    assert samples.dtype == torch.int64
    assert permutation.check(samples).all()
    assert dist.log_prob(samples).shape == (4, 6, 2, 3)


def test_identical_batch_rows_get_independent_noise() -> None:
    logits = torch.tensor([0.5, 0.2, 0.0, -0.3, -0.6], dtype=torch.float64)
    dist = PlackettLuce(logits.expand(2, -1))
    samples = dist.sample((4000,), generator=torch.Generator().manual_seed(3))
    rows_match = (samples[:, 0] == samples[:, 1]).all(-1).double()
    # Independent rows coincide with probability sum_z q(z)^2 (shared noise would make it 1).
    collision_probability = PlackettLuce(logits).log_prob(_all_permutations(5)).exp().square().sum()
    standard_error = math.sqrt(collision_probability * (1 - collision_probability) / len(rows_match))
    assert abs(rows_match.mean() - collision_probability) < 5 * standard_error

    relaxed = dist.rsample((3,), tau=0.5, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(relaxed[:, 0], relaxed[:, 1])


def test_generator_and_manual_seed_reproducibility() -> None:
    dist = PlackettLuce(torch.randn(3, 6, generator=torch.Generator().manual_seed(0)))
    first = dist.sample((50,), generator=torch.Generator().manual_seed(11))
    assert torch.equal(first, dist.sample((50,), generator=torch.Generator().manual_seed(11)))
    assert not torch.equal(first, dist.sample((50,), generator=torch.Generator().manual_seed(12)))

    global_state = torch.get_rng_state()
    relaxed = dist.rsample((2,), tau=0.3, generator=torch.Generator().manual_seed(11))
    assert torch.equal(torch.get_rng_state(), global_state), "a generator must not touch the global RNG"
    assert torch.equal(relaxed, dist.rsample((2,), tau=0.3, generator=torch.Generator().manual_seed(11)))

    torch.manual_seed(5)
    seeded = dist.sample((50,))
    torch.manual_seed(5)
    assert torch.equal(seeded, dist.sample((50,)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampling_is_on_device_and_reproducible() -> None:
    dist = PlackettLuce(torch.randn(3, 8, device="cuda"))
    samples = dist.sample((20,), generator=torch.Generator("cuda").manual_seed(1))
    assert samples.device.type == "cuda"
    assert torch.equal(samples, dist.sample((20,), generator=torch.Generator("cuda").manual_seed(1)))
    hard = dist.rsample((20,), tau=0.5, hard=True, generator=torch.Generator("cuda").manual_seed(1))
    assert torch.equal(hard.argmax(-1), samples)


def test_half_precision_logits_draw_float32_noise() -> None:
    dist = PlackettLuce(torch.tensor([1.0, 0.0, -1.0], dtype=torch.bfloat16))
    assert dist.perturbed_logits((4,)).dtype == torch.float32
    assert permutation.check(dist.sample((4,))).all()


# ----------------------------------------------------------------------------------------------- log_prob


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_log_prob_is_normalised_and_matches_product_formula(n: int) -> None:
    logits = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    table = _all_permutations(n)
    log_probs = PlackettLuce(logits).log_prob(table.unsqueeze(1))
    assert log_probs.shape == (math.factorial(n), 3)
    torch.testing.assert_close(log_probs.exp().sum(0), torch.ones(3, dtype=torch.float64))
    direct = torch.tensor([[_direct_probability(row.tolist(), tuple(perm.tolist())) for row in logits]
                           for perm in table], dtype=torch.float64)
    torch.testing.assert_close(log_probs.exp(), direct)


def test_log_prob_is_stable_for_large_logits() -> None:
    logits = torch.tensor([1000.0, -1000.0, 500.0, 0.0])
    table = _all_permutations(4)
    log_probs = PlackettLuce(logits).log_prob(table)
    assert torch.isfinite(log_probs).all()
    assert log_probs.max() == 0.0  # the mode is certain to float32 precision
    torch.testing.assert_close(log_probs.logsumexp(0), torch.tensor(0.0))


def test_log_prob_broadcasts_like_torch_distributions() -> None:
    dist = PlackettLuce(torch.randn(3, 4))
    single = torch.tensor([2, 0, 3, 1])
    assert dist.log_prob(single).shape == (3,)
    assert dist.log_prob(single.expand(5, 1, 4)).shape == (5, 3)
    torch.testing.assert_close(dist.log_prob(single.int()), dist.log_prob(single))


def test_mode_is_the_most_likely_permutation() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.7], [3.0, 3.0, 1.0, -2.0]], dtype=torch.float64)
    dist = PlackettLuce(logits)
    table = _all_permutations(4)
    log_probs = dist.log_prob(table.unsqueeze(1))
    torch.testing.assert_close(dist.log_prob(dist.mode), log_probs.max(0).values)
    assert dist.mode[1].tolist() == [0, 1, 2, 3]  # ties keep their index order (stable sort)


def test_distribution_properties_and_expand() -> None:
    dist = PlackettLuce(torch.randn(4, 5))
    assert dist.batch_shape == (4,)
    assert dist.event_shape == (5,)
    assert dist.has_rsample
    assert dist.support is permutation
    assert permutation.check(torch.tensor([[1, 0, 2], [1, 1, 2]])).tolist() == [True, False]
    assert "logits" in repr(dist)
    with pytest.raises(NotImplementedError, match="entropy"):
        dist.entropy()

    expanded = PlackettLuce(torch.randn(5)).expand((2, 3))
    assert expanded.batch_shape == (2, 3)
    assert expanded.sample((7,)).shape == (7, 2, 3, 5)
    assert expanded.rsample((7,), tau=1.0).shape == (7, 2, 3, 5, 5)


# ---------------------------------------------------------------------------------- relaxed (rsample)


@pytest.mark.parametrize("sample_shape", [(), (3,), (2, 3)])
@pytest.mark.parametrize("batch_shape", [(), (4,), (2, 3)])
def test_rsample_shapes_and_values_match_dense_reference(sample_shape: tuple, batch_shape: tuple) -> None:
    n, d = 5, 2
    logits = torch.randn((*batch_shape, n), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dist = PlackettLuce(logits)
    relaxed = dist.rsample(sample_shape, tau=0.4, generator=torch.Generator().manual_seed(1))
    assert relaxed.shape == sample_shape + batch_shape + (n, n)
    scores = dist.perturbed_logits(sample_shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(relaxed, dense_reference(scores, 0.4))

    for x in (torch.randn((*batch_shape, n), dtype=torch.float64),
              torch.randn((*batch_shape, n, d), dtype=torch.float64)):
        applied = dist.rsample_apply(x, tau=0.4, sample_shape=sample_shape,
                                     generator=torch.Generator().manual_seed(1))
        assert applied.shape == sample_shape + x.shape
        expected = relaxed @ (x if x.dim() > len(batch_shape) + 1 else x.unsqueeze(-1))
        torch.testing.assert_close(applied, expected.reshape(applied.shape))


@pytest.mark.parametrize("hard", [False, True])
def test_rsample_and_rsample_apply_gradients_agree(hard: bool) -> None:
    base_logits = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(4, 3, 6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def gradients(use_apply: bool) -> tuple[torch.Tensor, torch.Tensor]:
        logits = base_logits.clone().requires_grad_(True)
        values = x.clone().requires_grad_(True)
        dist, generator = PlackettLuce(logits), torch.Generator().manual_seed(3)
        if use_apply:
            sorted_values = dist.rsample_apply(values, 0.3, (4,), hard=hard, generator=generator)
        else:
            sorted_values = dist.rsample((4,), 0.3, hard=hard, generator=generator) @ values
        return torch.autograd.grad((sorted_values * weights).sum(), (logits, values))

    (logits_grad_matrix, x_grad_matrix), (logits_grad_apply, x_grad_apply) = gradients(False), gradients(True)
    torch.testing.assert_close(logits_grad_matrix, logits_grad_apply)
    if not hard:
        # With hard=True the core op sends the relaxed gradient to x too (P_soft^T g), whereas a hard matrix
        # followed by a matmul sends P_hard^T g, so only the logits gradients are comparable there.
        torch.testing.assert_close(x_grad_matrix, x_grad_apply)


def test_hard_rsample_forward_is_the_matching_sample() -> None:
    dist = PlackettLuce(torch.randn(3, 7))
    torch.manual_seed(0)
    samples = dist.sample((5,))
    torch.manual_seed(0)
    hard = dist.rsample((5,), tau=0.5, hard=True)
    torch.testing.assert_close(hard, torch.nn.functional.one_hot(samples, 7).float())

    x = torch.randn(3, 7)
    applied = dist.rsample_apply(x, tau=0.5, sample_shape=(5,), hard=True,
                                 generator=torch.Generator().manual_seed(4))
    samples = dist.sample((5,), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(applied, x.expand(5, 3, 7).gather(-1, samples))


def test_hard_rsample_has_the_relaxed_gradient() -> None:
    base_logits = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(3, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def gradient(hard: bool) -> torch.Tensor:
        logits = base_logits.clone().requires_grad_(True)
        generator = torch.Generator().manual_seed(2)
        relaxed = PlackettLuce(logits).rsample((3,), 0.5, hard=hard, generator=generator)
        return torch.autograd.grad((relaxed * weights).sum(), logits)[0]

    torch.testing.assert_close(gradient(True), gradient(False))


def test_rsample_gradcheck_with_fixed_noise() -> None:
    logits = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def relaxed_matrices(logits: torch.Tensor) -> torch.Tensor:
        # A fresh generator with a fixed seed: every call sees the same noise, so this is deterministic.
        return PlackettLuce(logits).rsample((2,), tau=0.7, generator=torch.Generator().manual_seed(5))

    def relaxed_apply(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return PlackettLuce(logits).rsample_apply(x, 0.7, (2,), generator=torch.Generator().manual_seed(5))

    assert torch.autograd.gradcheck(relaxed_matrices, (logits.requires_grad_(True),))
    assert torch.autograd.gradcheck(relaxed_apply, (logits, x.requires_grad_(True)))


def test_low_temperature_reparameterised_gradient_approaches_exact_gradient() -> None:
    # f(sort) is piecewise constant, but E_g[f_tau(logits + g)] -> E[f(z)] as tau -> 0, so the pathwise
    # gradient at small tau estimates the exact gradient; at tau = 0.05 its relaxation bias is below the
    # Monte-Carlo error of 20,000 samples (measured over several seeds).
    base_logits = torch.tensor([0.6, -0.2, 0.1, -0.5], dtype=torch.float64)
    item_values = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64)
    place_weights = torch.tensor([3.0, 1.0, -1.0, -2.0], dtype=torch.float64)
    exact = _exact_expectation_gradient(base_logits, _weighted_sort_objective(item_values, place_weights))

    def relaxed_objective(dist: PlackettLuce) -> torch.Tensor:
        values = item_values.expand((*dist.batch_shape, 4))
        sorted_values = dist.rsample_apply(values, tau=0.05, generator=torch.Generator().manual_seed(0))
        return (sorted_values * place_weights).sum(-1).mean()

    estimates = _per_row_estimates(base_logits, 20_000, relaxed_objective)
    _assert_within_standard_errors(estimates, exact, num_errors=5.0)


# ------------------------------------------------------------------------------------------- REINFORCE


@pytest.mark.parametrize("baseline", [None, "mean"])
def test_reinforce_gradient_matches_exact_enumeration(baseline: str | None) -> None:
    base_logits = torch.tensor([0.6, -0.2, 0.1, -0.5], dtype=torch.float64)
    objective = _weighted_sort_objective(torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64),
                                         torch.tensor([3.0, 1.0, -1.0, -2.0], dtype=torch.float64))
    exact = _exact_expectation_gradient(base_logits, objective)

    def surrogate(dist: PlackettLuce) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return reinforce_loss(dist, objective, 4, baseline=baseline, generator=generator)[0]

    _assert_within_standard_errors(_per_row_estimates(base_logits, 5_000, surrogate), exact, num_errors=4.0)


def test_leave_one_out_baseline_removes_the_offset_variance() -> None:
    base_logits = torch.tensor([0.6, -0.2, 0.1, -0.5], dtype=torch.float64)
    weighted = _weighted_sort_objective(torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64),
                                        torch.tensor([3.0, 1.0, -1.0, -2.0], dtype=torch.float64))

    def variance(baseline: str | None, offset: float) -> torch.Tensor:
        def surrogate(dist: PlackettLuce) -> torch.Tensor:
            return reinforce_loss(dist, lambda perm: weighted(perm) + offset, 4, baseline=baseline,
                                  generator=torch.Generator().manual_seed(0))[0]

        return _per_row_estimates(base_logits, 2_000, surrogate).var(0).sum()

    # A constant offset inflates the plain estimator's variance (about 10x here) but cancels exactly in
    # the leave-one-out differences.
    torch.testing.assert_close(variance("mean", 10.0), variance("mean", 0.0))
    assert variance("mean", 10.0) < 0.25 * variance(None, 10.0)


@pytest.mark.parametrize("baseline", [1.5, torch.tensor([1.5, -2.0, 0.25])])
def test_constant_baseline_is_subtracted_from_the_objective(baseline: float | torch.Tensor) -> None:
    base_logits = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    item_values = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def objective(perm: torch.Tensor) -> torch.Tensor:
        return item_values[perm[..., 0]]

    def gradient(baseline: float | torch.Tensor | None, shift: float | torch.Tensor) -> torch.Tensor:
        logits = base_logits.clone().requires_grad_(True)
        surrogate, _ = reinforce_loss(PlackettLuce(logits), lambda perm: objective(perm) - shift, 6,
                                      baseline=baseline, generator=torch.Generator().manual_seed(2))
        return torch.autograd.grad(surrogate, logits)[0]

    torch.testing.assert_close(gradient(baseline, 0.0), gradient(None, baseline))


def test_reinforce_values_and_objective_parameter_gradient() -> None:
    dist = PlackettLuce(torch.randn(2, 4, dtype=torch.float64, requires_grad=True))
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    first_item_value = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)

    def objective(perm: torch.Tensor) -> torch.Tensor:
        return scale * first_item_value[perm[..., 0]]

    surrogate, mean_objective = reinforce_loss(dist, objective, 8, generator=torch.Generator().manual_seed(0))
    samples = dist.sample((8,), generator=torch.Generator().manual_seed(0))
    expected_mean = (scale * first_item_value[samples[..., 0]]).mean()
    assert not mean_objective.requires_grad
    torch.testing.assert_close(mean_objective, expected_mean.detach())
    torch.testing.assert_close(surrogate.detach(), expected_mean.detach())
    (scale_gradient,) = torch.autograd.grad(surrogate, scale)
    torch.testing.assert_close(scale_gradient, first_item_value[samples[..., 0]].mean())


# ------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    ("logits", "error", "message"),
    [
        (torch.tensor([0.0, float("nan")]), ValueError, "logits"),
        (torch.tensor([0.0, float("inf")]), ValueError, "logits"),
        (torch.tensor(1.0), ValueError, "logits"),
        (torch.zeros(3, 0), ValueError, "logits"),
        (torch.tensor([1, 2, 3]), TypeError, "logits"),
        ([0.0, 1.0], TypeError, "logits"),
    ],
)
def test_bad_logits_are_rejected(logits: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        PlackettLuce(logits)


@pytest.mark.parametrize(
    ("perm", "error"),
    [
        (torch.tensor([0, 1, 1, 3]), ValueError),
        (torch.tensor([0, 1, 2, 4]), ValueError),
        (torch.tensor([0, -1, 2, 3]), ValueError),
        (torch.tensor([0, 1, 2]), ValueError),
        (torch.tensor(0), ValueError),
        (torch.tensor([[0, 1, 2, 3]] * 3), ValueError),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError),
    ],
)
def test_bad_perm_is_rejected(perm: torch.Tensor, error: type[Exception]) -> None:
    with pytest.raises(error, match="perm"):
        PlackettLuce(torch.zeros(2, 4)).log_prob(perm)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_tau_is_rejected(tau: float) -> None:
    dist = PlackettLuce(torch.zeros(4))
    with pytest.raises(ValueError, match="tau"):
        dist.rsample(tau=tau)
    with pytest.raises(ValueError, match="tau"):
        dist.rsample_apply(torch.zeros(4), tau=tau)


def test_bad_x_and_reinforce_arguments_are_rejected() -> None:
    dist = PlackettLuce(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="x"):
        dist.rsample_apply(torch.zeros(4))
    with pytest.raises(ValueError, match="x"):
        dist.rsample_apply(torch.zeros(2, 4, 3, 1))

    def first_place(perm: torch.Tensor) -> torch.Tensor:
        return perm[..., 0].double()

    with pytest.raises(ValueError, match="num_samples"):
        reinforce_loss(dist, first_place, 0)
    with pytest.raises(ValueError, match="num_samples >= 2"):
        reinforce_loss(dist, first_place, 1, baseline="mean")
    with pytest.raises(ValueError, match="baseline"):
        reinforce_loss(dist, first_place, 3, baseline="median")
    with pytest.raises(ValueError, match="baseline"):
        reinforce_loss(dist, first_place, 3, baseline=torch.zeros(3))
    with pytest.raises(ValueError, match="objective"):
        reinforce_loss(dist, lambda perm: perm.double().sum(), 3)
    with pytest.raises(TypeError, match="objective"):
        reinforce_loss(dist, lambda perm: perm[..., 0], 3)
