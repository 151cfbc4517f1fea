"""torch.autograd.gradcheck in float64 for every differentiable path (PyTorch backend: Triton has no float64)."""

from __future__ import annotations

import pytest
import torch
from reference import DEVICE

from triton_sort import NeuralSort, relaxed_sort_apply, relaxed_sort_matrix


def distinct_scores(*shape: int) -> torch.Tensor:
    # |s_j - s_k| is not differentiable at ties: keep scores well apart so finite differences stay on one side.
    n = shape[-1]
    base = torch.randperm(n, dtype=torch.float64, device=DEVICE) * 0.7 / max(n, 1)
    noise = torch.rand(*shape, dtype=torch.float64, device=DEVICE) * 0.1 / max(n, 1)
    return (base + noise).requires_grad_()


@pytest.mark.parametrize("n", [1, 2, 3, 17])
@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("hard", [False, True])
def test_gradcheck_apply(n, descending, hard):
    scores = distinct_scores(2, n)
    x = torch.randn(2, n, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def fn(s, v):
        return relaxed_sort_apply(s, v, 0.05, descending=descending, hard=hard, backend="torch")

    if hard:
        # The straight-through value is piecewise constant; its gradient is the relaxed one by definition.
        soft = torch.autograd.grad(relaxed_sort_apply(scores, x, 0.05, descending=descending).sum(), (scores, x))
        st = torch.autograd.grad(fn(scores, x).sum(), (scores, x))
        for a, b in zip(soft, st, strict=True):
            torch.testing.assert_close(a, b)
    else:
        assert torch.autograd.gradcheck(fn, (scores, x))


@pytest.mark.parametrize("shape", [(1,), (2,), (5,), (3, 17)])
@pytest.mark.parametrize("descending", [True, False])
def test_gradcheck_matrix(shape, descending):
    scores = distinct_scores(*shape)
    assert torch.autograd.gradcheck(
        lambda s: relaxed_sort_matrix(s, 0.05, descending=descending, backend="torch"), (scores,))


def test_gradcheck_vector_values_and_module():
    scores = distinct_scores(9)
    x = torch.randn(9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    layer = NeuralSort(tau=0.1, backend="torch")
    assert torch.autograd.gradcheck(layer, (scores, x))


def test_hard_matrix_gradient_is_relaxed():
    scores = distinct_scores(2, 6)
    weights = torch.randn(2, 6, 6, dtype=torch.float64, device=DEVICE)
    soft = torch.autograd.grad((relaxed_sort_matrix(scores, 0.2) * weights).sum(), scores)[0]
    hard = torch.autograd.grad((relaxed_sort_matrix(scores, 0.2, hard=True) * weights).sum(), scores)[0]
    torch.testing.assert_close(hard, soft)
