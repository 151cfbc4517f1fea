"""Bad input gets a clear ValueError/TypeError naming the argument, never a crash in a kernel."""

from __future__ import annotations

import math

import pytest
import torch

from triton_sort import NeuralSort, relaxed_sort_apply, relaxed_sort_matrix


@pytest.mark.parametrize("tau", [0.0, -1.0, math.inf, -math.inf, math.nan, torch.tensor(0.0)])
def test_bad_tau_values(backend, tau):
    with pytest.raises(ValueError, match="tau"):
        relaxed_sort_apply(torch.randn(5), torch.randn(5), tau, backend=backend)
    with pytest.raises(ValueError, match="tau"):
        relaxed_sort_matrix(torch.randn(5), tau, backend=backend)


@pytest.mark.parametrize("tau", ["1.0", None, True, 1 + 2j, torch.ones(2)])
def test_bad_tau_types(tau):
    with pytest.raises(TypeError, match="tau"):
        relaxed_sort_apply(torch.randn(5), torch.randn(5), tau)


def test_tau_accepts_numbers_and_one_element_tensors():
    x = torch.randn(5)
    expected = relaxed_sort_apply(torch.arange(5.0), x, 2.0)
    torch.testing.assert_close(relaxed_sort_apply(torch.arange(5.0), x, 2), expected)
    torch.testing.assert_close(relaxed_sort_apply(torch.arange(5.0), x, torch.tensor([2.0])), expected)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scores(backend, bad):
    scores = torch.randn(2, 6)
    scores[1, 3] = bad
    with pytest.raises(ValueError, match="scores must be finite"):
        relaxed_sort_apply(scores, torch.randn(2, 6), 1.0, backend=backend)
    with pytest.raises(ValueError, match="scores must be finite"):
        relaxed_sort_matrix(scores, 1.0, backend=backend)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_unsupported_score_dtypes(dtype):
    scores = torch.ones(4, dtype=dtype)
    with pytest.raises(TypeError, match="scores"):
        relaxed_sort_matrix(scores, 1.0)
    with pytest.raises(TypeError, match="scores"):
        relaxed_sort_apply(scores, torch.ones(4, dtype=dtype), 1.0)


def test_scores_must_be_a_tensor():
    with pytest.raises(TypeError, match="scores"):
        relaxed_sort_matrix([1.0, 2.0], 1.0)
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        relaxed_sort_apply(torch.randn(3), [1.0, 2.0, 3.0], 1.0)


def test_scores_rank():
    with pytest.raises(ValueError, match="scores must have shape"):
        relaxed_sort_matrix(torch.randn(()), 1.0)


@pytest.mark.parametrize(("scores_shape", "x_shape"), [
    ((5,), (4,)), ((5,), (4, 3)), ((5,), (1, 5, 3)), ((2, 5), (5,)), ((2, 5), (3, 5)), ((2, 5), (2, 4, 3)),
    ((2, 5), (2, 5, 3, 1)),
])
def test_mismatched_shapes(scores_shape, x_shape):
    with pytest.raises(ValueError, match="x must have shape"):
        relaxed_sort_apply(torch.randn(scores_shape), torch.randn(x_shape), 1.0)


def test_mismatched_dtypes():
    with pytest.raises(TypeError, match="dtype of scores"):
        relaxed_sort_apply(torch.randn(5), torch.randn(5, dtype=torch.float64), 1.0)


def test_mismatched_devices():
    x = torch.randn(5, device="meta")
    with pytest.raises(ValueError, match="device of scores"):
        relaxed_sort_apply(torch.randn(5), x, 1.0)


def test_bad_flags_and_backend():
    with pytest.raises(TypeError, match="descending"):
        relaxed_sort_matrix(torch.randn(5), 1.0, descending="yes")
    with pytest.raises(TypeError, match="hard"):
        relaxed_sort_apply(torch.randn(5), torch.randn(5), 1.0, hard=1)
    with pytest.raises(ValueError, match="backend"):
        relaxed_sort_matrix(torch.randn(5), 1.0, backend="cuda")


def test_triton_backend_has_no_float64():
    with pytest.raises(TypeError, match="backend='triton'"):
        relaxed_sort_matrix(torch.randn(5, dtype=torch.float64), 1.0, backend="triton")


def test_module_validates_tau():
    with pytest.raises(ValueError, match="tau"):
        NeuralSort(tau=0.0)
    assert "tau=0.5" in repr(NeuralSort(tau=0.5))


@pytest.mark.parametrize("tau", [0.0, -0.0, -1.0, math.inf, -math.inf, math.nan, 1e-310])
def test_bad_tensor_tau_values(tau):
    """A tensor tau is checked inside the op, with the data (one sync): the same errors as for numbers."""
    with pytest.raises(ValueError, match="tau"):
        relaxed_sort_apply(torch.randn(2, 5), torch.randn(2, 5), torch.tensor(tau, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_inputs_whose_sums_overflow_pass(dtype):
    """The quick check's sums overflow for finite inputs near their dtype's limit: the per-tensor checks then
    find them finite, so no error (only a slower check)."""
    big = torch.finfo(dtype).max
    scores = torch.tensor([[big, big, -big, 0.5, big]], dtype=dtype)
    x = torch.full((1, 5), big, dtype=dtype)
    out = relaxed_sort_apply(scores, x, 1.0, backend="torch")
    assert out.shape == x.shape
