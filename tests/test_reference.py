"""Forward and both gradients against the float64 dense reference, for both backends, all dtypes and shapes."""

from __future__ import annotations

import pytest
import torch
from reference import (
    DEVICE,
    DTYPES,
    backend_available,
    dense_reference,
    relative_error,
    scores_grad_floor,
    tolerance,
)

from triton_sort import relaxed_sort_apply, relaxed_sort_matrix

SIZES = (1, 2, 3, 17, 100, 257)


def check_apply(backend: str, scores: torch.Tensor, x: torch.Tensor, tau: float, *, descending: bool = True,
                dtype: torch.dtype = torch.float32) -> None:
    """Compare relaxed_sort_apply (value, d_scores, d_x) in ``dtype`` with the float64 dense reference."""
    # The reference sees the inputs already rounded to ``dtype``: only the computation's error is measured.
    s64 = scores.detach().to(DEVICE, dtype).to(torch.float64).requires_grad_()
    x64 = x.detach().to(DEVICE, dtype).to(torch.float64).requires_grad_()
    p = dense_reference(s64, tau, descending)
    expected = (p @ (x64 if x64.dim() == s64.dim() + 1 else x64.unsqueeze(-1))).reshape(x64.shape)
    grad_out = torch.randn_like(expected).to(dtype).to(torch.float64)  # representable in dtype, like the inputs
    exp_ds, exp_dx = torch.autograd.grad(expected, (s64, x64), grad_out)

    s = s64.detach().to(dtype).requires_grad_()
    xs = x64.detach().to(dtype).requires_grad_()
    actual = relaxed_sort_apply(s, xs, tau, descending=descending, backend=backend)
    assert actual.shape == x.shape and actual.dtype == dtype
    ds, dx = torch.autograd.grad(actual, (s, xs), grad_out.to(dtype))
    tol = tolerance(dtype)
    assert relative_error(actual, expected) <= tol, "forward"
    assert relative_error(dx, exp_dx) <= tol, "d_x"
    # d_scores can be small by cancellation (P_hat nearly a permutation): measured against its terms' size then.
    floor = scores_grad_floor(grad_out, x64.detach(), tau)
    assert relative_error(ds, exp_ds, floor) <= tol, "d_scores"


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("d", [1, 5, 32])
@pytest.mark.parametrize("batched", [False, True])
def test_apply_matches_reference(backend, n, d, batched):
    shape = (3, n) if batched else (n,)
    scores = torch.randn(shape)
    x = torch.randn(*shape, d)
    check_apply(backend, scores, x, 0.3, descending=(n % 2 == 1))


@pytest.mark.parametrize("batched", [False, True])
def test_apply_vector_values(backend, batched):
    shape = (4, 17) if batched else (17,)
    check_apply(backend, torch.randn(shape), torch.randn(shape), 0.5)


@pytest.mark.parametrize("tau", [0.01, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("descending", [True, False])
def test_apply_temperature_range(backend, tau, descending):
    check_apply(backend, torch.randn(2, 100), torch.randn(2, 100, 5), tau, descending=descending)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 32])
def test_apply_dtypes(backend, dtype, d):
    if not backend_available(backend, dtype):
        pytest.skip("the Triton backend has no float64 (PyTorch path only)")
    check_apply(backend, torch.randn(2, 100), torch.randn(2, 100, d), 0.5, dtype=dtype)


def test_apply_wide_values_span_several_programs(backend):
    # d = 200 > MAX_BLOCK_D: the kernels split d over programs and the backward loops over all of it.
    check_apply(backend, torch.randn(2, 40), torch.randn(2, 40, 200), 0.5)


def test_apply_large_magnitude_scores(backend):
    # Scores far from zero: the kernels centre them, so only their spread matters.
    scores = 1e4 + torch.randn(2, 64)
    check_apply(backend, scores, torch.randn(2, 64, 3), 0.5)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("descending", [True, False])
def test_matrix_matches_reference(backend, n, descending):
    s64 = torch.randn(2, n, dtype=torch.float64, device=DEVICE, requires_grad=True)
    tau = 0.4
    expected = dense_reference(s64, tau, descending)
    grad_out = torch.randn_like(expected)
    (exp_ds,) = torch.autograd.grad(expected, s64, grad_out)
    s = s64.detach().float().requires_grad_()
    actual = relaxed_sort_matrix(s, tau, descending=descending, backend=backend)
    assert actual.shape == (2, n, n)
    (ds,) = torch.autograd.grad(actual, s, grad_out.float())
    tol = tolerance(torch.float32)
    assert relative_error(actual, expected) <= tol
    assert relative_error(ds, exp_ds) <= 2 * tol


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matrix_dtypes(backend, dtype):
    if not backend_available(backend, dtype):
        pytest.skip("the Triton backend has no float64 (PyTorch path only)")
    s64 = torch.randn(17, device=DEVICE).to(dtype).to(torch.float64)
    actual = relaxed_sort_matrix(s64.to(dtype), 0.5, backend=backend)
    assert actual.shape == (17, 17) and actual.dtype == dtype
    assert relative_error(actual, dense_reference(s64, 0.5)) <= tolerance(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_backends_agree(dtype):
    scores, x = torch.randn(3, 130, dtype=dtype), torch.randn(3, 130, 20, dtype=dtype)
    torch_out = relaxed_sort_apply(scores, x, 0.2, backend="torch")
    triton_out = relaxed_sort_apply(scores, x, 0.2, backend="triton")
    assert relative_error(triton_out, torch_out) <= 2 * tolerance(dtype)
