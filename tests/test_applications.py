"""Relaxed top-k, relaxed quantiles, stochastic NeuralSort and DifferentiableKNN against float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from reference import DEVICE, dense_reference, relative_error, tolerance

from triton_sort import (
    DifferentiableKNN,
    NeuralSort,
    PlackettLuce,
    relaxed_quantile,
    relaxed_sort_apply,
    relaxed_topk,
)

TAU = 0.3


def distinct_scores(*shape: int, spread: float = 1.0) -> torch.Tensor:
    """Scores at least ``spread / n`` apart, so small-tau limits and finite differences stay away from ties."""
    n = shape[-1]
    base = torch.stack([torch.randperm(n, dtype=torch.float64) for _ in range(math.prod(shape[:-1]))])
    noise = torch.rand(base.shape, dtype=torch.float64) * 0.3
    return ((base + noise) * spread / max(n, 1)).reshape(shape).to(DEVICE)


def dense_topk(scores: torch.Tensor, k: int, tau: float, descending: bool = True) -> torch.Tensor:
    return dense_reference(scores, tau, descending)[..., :k, :].sum(-2)


def working_dtype(backend: str) -> torch.dtype:
    return torch.float64 if backend == "torch" else torch.float32


# ----------------------------------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("shape", [(9,), (3, 17)])
@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("banded", [True, False])
def test_topk_matches_dense_reference(backend, shape, descending, banded):
    dtype = working_dtype(backend)
    reference_scores = torch.randn(shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    scores = reference_scores.detach().to(dtype).requires_grad_()
    cotangent = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    tol = tolerance(dtype)
    n = shape[-1]
    for k in (0, 1, 4, n):
        out = relaxed_topk(scores, k, TAU, descending=descending, banded=banded, backend=backend)
        expected = dense_topk(reference_scores, k, TAU, descending)
        assert out.shape == scores.shape and out.dtype == dtype
        assert relative_error(out, expected, floor=1.0) <= tol
        (grad,) = torch.autograd.grad((out * cotangent.to(dtype)).sum(), scores)
        (expected_grad,) = torch.autograd.grad((expected * cotangent).sum(), reference_scores)
        assert relative_error(grad, expected_grad, floor=float(cotangent.norm()) / TAU) <= 10 * tol


def test_topk_small_tau_is_the_exact_indicator(backend):
    scores = distinct_scores(4, 12).to(working_dtype(backend))
    for descending in (True, False):
        out = relaxed_topk(scores, 5, 1e-3, descending=descending, backend=backend)
        exact = torch.zeros_like(scores).scatter_(-1, scores.topk(5, largest=descending).indices, 1.0)
        torch.testing.assert_close(out, exact, atol=1e-5, rtol=0)


def test_topk_entries_are_nonnegative_and_sum_to_k():
    scores = torch.randn(5, 30, dtype=torch.float64) * 3
    out = relaxed_topk(scores, 7, 0.7)
    assert bool((out >= 0).all())
    torch.testing.assert_close(out.sum(-1), torch.full((5,), 7.0, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(1,), (6,), (2, 9)])
@pytest.mark.parametrize("descending", [True, False])
def test_topk_gradcheck(shape, descending):
    scores = distinct_scores(*shape).requires_grad_()
    k = shape[-1] // 2
    assert torch.autograd.gradcheck(lambda s: relaxed_topk(s, k, 0.05, descending=descending, backend="torch"),
                                    (scores,))


def test_topk_empty_and_single():
    assert relaxed_topk(torch.zeros(0), 0, 1.0).shape == (0,)
    torch.testing.assert_close(relaxed_topk(torch.tensor([2.0]), 1, 1.0), torch.ones(1))


# -------------------------------------------------------------------------------------------------- quantiles
def dense_quantile(scores, values, q, tau, interpolation):
    rows = dense_reference(scores, tau, descending=False)
    h = q * (scores.shape[-1] - 1)
    if interpolation == "nearest":
        row = rows[..., round(h), :]
    else:
        low, high = math.floor(h), math.ceil(h)
        row = (high - h if high > low else 1.0) * rows[..., low, :] + (h - low) * rows[..., high, :]
    batched = values if values.dim() > scores.dim() else values.unsqueeze(-1)
    out = (row.unsqueeze(-1) * batched.to(torch.float64)).sum(-2)
    return out if values.dim() > scores.dim() else out.squeeze(-1)


@pytest.mark.parametrize(("scores_shape", "values_shape"), [((8,), (8,)), ((8,), (8, 3)), ((2, 9), (2, 9)),
                                                            ((2, 9), (2, 9, 4))])
@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
def test_quantile_matches_dense_reference(scores_shape, values_shape, interpolation):
    scores = torch.randn(scores_shape, dtype=torch.float64, requires_grad=True)
    values = torch.randn(values_shape, dtype=torch.float64, requires_grad=True)
    for q in (0.0, 0.3, 0.5, 0.9, 1.0):
        out = relaxed_quantile(scores, values, q, TAU, interpolation=interpolation)
        expected = dense_quantile(scores, values, q, TAU, interpolation)
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
        grads = torch.autograd.grad(out.sum(), (scores, values))
        expected_grads = torch.autograd.grad(expected.sum(), (scores, values))
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-10)


def test_quantile_float32_matches_reference():
    scores = torch.randn(3, 40)
    values = torch.randn(3, 40, 2)
    out = relaxed_quantile(scores, values, 0.5, 0.2)
    assert out.dtype == torch.float32
    expected = dense_quantile(scores.double(), values.double(), 0.5, 0.2, "linear")
    assert relative_error(out, expected) <= 1e-6


@pytest.mark.parametrize("n", [1, 2, 7, 10])
@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
def test_quantile_small_tau_is_torch_quantile(n, interpolation):
    scores = distinct_scores(3, n)
    for q in (0.0, 0.125, 0.25, 0.5, 0.6, 1.0):
        expected = torch.quantile(scores, q, dim=-1, interpolation=interpolation)
        out = relaxed_quantile(scores, scores, q, 1e-4, interpolation=interpolation)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)


def test_median_is_the_middle_row_of_relaxed_sort():
    scores, values = torch.randn(4, 11, dtype=torch.float64), torch.randn(4, 11, dtype=torch.float64)
    full = relaxed_sort_apply(scores, values, TAU, descending=False)
    torch.testing.assert_close(relaxed_quantile(scores, values, 0.5, TAU), full[:, 5])


def test_quantile_gradcheck():
    scores = distinct_scores(2, 7).requires_grad_()
    values = torch.randn(2, 7, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, v: relaxed_quantile(s, v, 0.4, 0.05), (scores, values))
    assert torch.autograd.gradcheck(lambda s, v: relaxed_quantile(s, v, 0.5, 0.05, interpolation="nearest"),
                                    (scores, values))


# ------------------------------------------------------------------------------------------------ bad inputs
def test_topk_bad_inputs():
    scores = torch.randn(2, 5)
    for k in (-1, 6):
        with pytest.raises(ValueError, match="k must satisfy"):
            relaxed_topk(scores, k, 1.0)
    for k in (2.0, True, None):
        with pytest.raises(TypeError, match="k must be an int"):
            relaxed_topk(scores, k, 1.0)
    with pytest.raises(ValueError, match="tau"):
        relaxed_topk(scores, 2, 0.0)
    with pytest.raises(TypeError, match="scores"):
        relaxed_topk(torch.ones(5, dtype=torch.int64), 2, 1.0)
    with pytest.raises(ValueError, match="scores must have shape"):
        relaxed_topk(torch.tensor(1.0), 0, 1.0)
    with pytest.raises(ValueError, match="scores must be finite"):
        relaxed_topk(torch.tensor([1.0, math.nan]), 1, 1.0)
    with pytest.raises(ValueError, match="backend"):
        relaxed_topk(scores, 2, 1.0, backend="cuda")


def test_quantile_bad_inputs():
    scores = torch.randn(2, 5)
    for q in (-0.1, 1.5, math.nan, "0.5", True):
        with pytest.raises(ValueError, match="q must be"):
            relaxed_quantile(scores, scores, q, 1.0)
    with pytest.raises(ValueError, match="interpolation"):
        relaxed_quantile(scores, scores, 0.5, 1.0, interpolation="midpoint")
    with pytest.raises(ValueError, match="values must have shape"):
        relaxed_quantile(scores, torch.randn(2, 4), 0.5, 1.0)
    with pytest.raises(TypeError, match="values must have the dtype"):
        relaxed_quantile(scores, scores.double(), 0.5, 1.0)
    with pytest.raises(ValueError, match="at least one item"):
        relaxed_quantile(torch.zeros(0), torch.zeros(0), 0.5, 1.0)
    with pytest.raises(ValueError, match="scores must be finite"):
        relaxed_quantile(torch.tensor([1.0, math.inf]), torch.ones(2), 0.5, 1.0)
    with pytest.raises(ValueError, match="tau"):
        relaxed_quantile(scores, scores, 0.5, -1.0)


# ------------------------------------------------------------------------------------ modules: NeuralSort, kNN
def test_stochastic_neuralsort_is_a_relaxed_plackett_luce_sample_in_training_only():
    scores = torch.randn(3, 6)
    x = torch.randn(3, 6, 2)
    layer = NeuralSort(tau=0.5, stochastic=True)
    torch.manual_seed(1)
    sample = layer(scores)
    torch.manual_seed(1)
    torch.testing.assert_close(sample, PlackettLuce(scores).rsample(tau=0.5))
    assert not torch.allclose(layer(scores, x), layer(scores, x))
    layer.eval()
    torch.testing.assert_close(layer(scores, x), NeuralSort(tau=0.5)(scores, x))
    assert "stochastic=True" in repr(layer)
    with pytest.raises(TypeError, match="stochastic"):
        NeuralSort(stochastic=1)


def test_knn_loss_matches_dense_reference(backend):
    dtype = working_dtype(backend)
    queries = torch.randn(4, 3, dtype=dtype, device=DEVICE, requires_grad=True)
    candidates = torch.randn(10, 3, dtype=dtype, device=DEVICE, requires_grad=True)
    labels, query_labels = torch.randint(0, 3, (10,)), torch.randint(0, 3, (4,))
    loss = DifferentiableKNN(k=3, tau=0.5, backend=backend)(queries, candidates, labels, query_labels)
    q64, c64 = queries.detach().double(), candidates.detach().double()
    scores = -((q64[:, None] - c64[None]) ** 2).sum(-1)
    same = (labels[None] == query_labels[:, None]).double()
    expected = -(same * dense_topk(scores, 3, 0.5)).sum(-1).mean() / 3
    assert abs(float(loss.detach()) - float(expected)) <= 1e-5
    loss.backward()
    assert queries.grad is not None and bool(torch.isfinite(candidates.grad).all())


def test_knn_loss_is_minus_one_when_neighbours_agree_and_predict_votes():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = torch.arange(3).repeat_interleave(4)
    candidates = centres[labels] + 0.1 * torch.randn(12, 2)
    queries = centres + 0.1 * torch.randn(3, 2)
    knn = DifferentiableKNN(k=3, tau=0.01)
    assert abs(float(knn(queries, candidates, labels, torch.arange(3))) + 1) < 1e-6
    assert torch.equal(knn.predict(queries, candidates, labels), torch.arange(3))
    # A tie in the vote goes to the smaller label.
    tied = DifferentiableKNN(k=2).predict(torch.zeros(1, 1), torch.tensor([[1.0], [-1.0], [5.0]]),
                                          torch.tensor([2, 1, 0]))
    assert tied.tolist() == [1]


def test_knn_stochastic_and_bad_inputs():
    queries, candidates = torch.randn(2, 4), torch.randn(6, 4)
    labels, query_labels = torch.randint(0, 2, (6,)), torch.randint(0, 2, (2,))
    knn = DifferentiableKNN(k=2, tau=1.0, stochastic=True)
    assert float(knn(queries, candidates, labels, query_labels)) != float(knn(queries, candidates, labels,
                                                                              query_labels))
    knn.eval()
    assert float(knn(queries, candidates, labels, query_labels)) == float(knn(queries, candidates, labels,
                                                                              query_labels))
    for k, error in ((0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="k must be an int"):
            DifferentiableKNN(k=k)
    with pytest.raises(ValueError, match="queries and candidates"):
        knn(queries, torch.randn(6, 3), labels, query_labels)
    with pytest.raises(ValueError, match="candidate_labels"):
        knn(queries, candidates, labels.float(), query_labels)
    with pytest.raises(ValueError, match="query_labels"):
        knn(queries, candidates, labels, labels)
    with pytest.raises(ValueError, match="k must satisfy"):
        DifferentiableKNN(k=7)(queries, candidates, labels, query_labels)
    with pytest.raises(ValueError, match="at least k"):
        DifferentiableKNN(k=7).predict(queries, candidates, labels)


def test_topk_compiles_without_graph_breaks():
    torch._dynamo.reset()
    scores = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)

    def loss(s):
        return (relaxed_topk(s * 2.0, 3, 0.5, backend="torch") ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True)
    torch.testing.assert_close(torch.autograd.grad(compiled(scores), scores)[0],
                               torch.autograd.grad(loss(scores), scores)[0])
