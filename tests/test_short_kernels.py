"""The one-program-per-list kernels of short lists (``short_forward_kernel``, ``short_backward_kernel``: one launch
per pass for n <= SHORT_MAX_N) against the float64 dense formula, and against the tiled kernels (five launches) on
the same inputs at the threshold, where one hands over to the other. On CPU they run in Triton's interpreter."""

from __future__ import annotations

import pytest
import torch
from reference import BASE_TOLERANCE, relative_error, scores_grad_floor

import triton_sort
from triton_sort import relaxed_sort_apply
from triton_sort.kernels import launch
from triton_sort.kernels.configs import SHORT_MAX_N, SHORT_ROW_BLOCK
from triton_sort.reference import dense_sort_matrix

TOL = BASE_TOLERANCE[torch.float32]  # fp32 against float64, forward and both gradients


def _inputs(batch: int, n: int, d: int, ties: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, n, generator=generator) * 3
    if ties:  # runs of equal scores: the tie counts of the scores gradient
        scores = scores.round()
    return scores, torch.randn(batch, n, d, generator=generator), torch.randn(batch, n, d, generator=generator)


def _step(scores, x, grad, tau, dtype=torch.float32, backend="triton", **options):
    """(out, d_scores, d_x, d_tau) of one forward + backward."""
    s = scores.to(dtype).requires_grad_()
    v = x.to(dtype).requires_grad_()
    t = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    out = relaxed_sort_apply(s, v, t, backend=backend, **options)
    return (out, *torch.autograd.grad(out, (s, v, t), grad.to(dtype)))


def _reference(scores, x, grad, tau, descending):
    s = scores.to(torch.float64).requires_grad_()
    v = x.to(torch.float64).requires_grad_()
    t = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    out = dense_sort_matrix(s, t, descending) @ v
    return (out, *torch.autograd.grad(out, (s, v, t), grad.to(torch.float64)))


@pytest.mark.parametrize("n", [1, 2, 3, 17, 100, SHORT_MAX_N])
@pytest.mark.parametrize("d", [1, 16, 130])  # d = 130: the backward loops over two d chunks
def test_short_kernels_match_the_float64_formula(n, d):
    tau = 0.3
    for seed, (ties, descending) in enumerate([(False, True), (True, False)]):
        scores, x, grad = _inputs(3, n, d, ties, seed)
        got = _step(scores, x, grad, tau, descending=descending)
        want = _reference(scores, x, grad, tau, descending)
        floor = scores_grad_floor(grad, x, tau)
        for name, a, b, scale in zip(("out", "d_scores", "d_x", "d_tau"), got, want, (0, floor, 0, floor), strict=True):
            assert relative_error(a, b, scale) <= TOL, (name, n, d, ties, relative_error(a, b, scale))


@pytest.mark.parametrize("banded", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("n", "d"), [(SHORT_MAX_N, 1), (37, 20)])
def test_short_and_tiled_kernels_agree(monkeypatch, banded, masked, n, d):
    scores, x, grad = _inputs(4, n, d, ties=True, seed=n)
    mask = None
    if masked:  # a full list, a list of one real item, an empty list and a random one
        mask = torch.rand(4, n, generator=torch.Generator().manual_seed(1)) < 0.6
        mask[0], mask[1], mask[2] = True, False, False
        mask[1, n // 2] = True
    options = {"descending": True, "banded": banded, "mask": mask}
    short = _step(scores, x, grad, 0.05, **options)
    monkeypatch.setattr(launch, "SHORT_MAX_N", 0)
    tiled = _step(scores, x, grad, 0.05, **options)
    for name, a, b in zip(("out", "d_scores", "d_x", "d_tau"), short, tiled, strict=True):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL * float(b.abs().max()), msg=name)


def test_short_kernels_loop_over_lists_longer_than_their_row_block(monkeypatch):
    """The threshold is a speed choice (``gpu-check`` measures it): raised above SHORT_ROW_BLOCK, the row passes
    loop over blocks, with the prefix sums carried across them, and agree with the tiled kernels."""
    n = SHORT_ROW_BLOCK + 43
    scores, x, grad = _inputs(2, n, 1, ties=True, seed=7)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, SHORT_ROW_BLOCK - 5:] = False  # the real items end just before the second block
    for options in ({"mask": None}, {"mask": mask, "descending": False}):
        monkeypatch.setattr(launch, "SHORT_MAX_N", 2 * SHORT_ROW_BLOCK)
        assert launch.is_short(n)
        short = _step(scores, x, grad, 0.3, **options)
        monkeypatch.setattr(launch, "SHORT_MAX_N", 0)
        tiled = _step(scores, x, grad, 0.3, **options)
        for name, a, b in zip(("out", "d_scores", "d_x", "d_tau"), short, tiled, strict=True):
            torch.testing.assert_close(a, b, rtol=TOL, atol=TOL * float(b.abs().max()), msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_short_kernels_in_half_precision(dtype):
    scores, x, grad = _inputs(2, 33, 16, ties=False, seed=5)
    got = _step(scores, x, grad, 0.5, dtype)
    want = _reference(scores.to(dtype), x.to(dtype), grad.to(dtype), 0.5, True)
    tol = BASE_TOLERANCE[dtype]
    assert relative_error(got[0], want[0]) <= tol and relative_error(got[2], want[2]) <= tol
    assert relative_error(got[1], want[1], scores_grad_floor(grad, x, 0.5)) <= tol


def test_short_kernels_poison_only_the_lists_with_non_finite_inputs():
    """Validation off: a NaN score or value makes its own list's outputs and gradients NaN, no other's."""
    scores, x, grad = _inputs(3, 9, 2, ties=False, seed=2)
    scores[0, 4] = float("nan")
    x[1, 7, 1] = float("inf")
    with triton_sort.validation(False):
        out, d_scores, d_x, _ = _step(scores, x, grad, 1.0)
    for value in (out, d_scores, d_x):
        assert value[:2].isnan().all() and value[2].isfinite().all()
    want = _reference(scores[2:], x[2:], grad[2:], 1.0, True)
    assert relative_error(out[2:], want[0]) <= TOL


def test_short_backward_serves_the_transposed_product():
    """P_hat^T @ v takes the tiled forward and the one-launch backward: gradients as the float64 formula's."""
    scores, v, grad = _inputs(2, 23, 3, ties=False, seed=3)
    s, x = scores.clone().requires_grad_(), v.clone().requires_grad_()
    out = relaxed_sort_apply(s, x, 0.7, backend="triton", transpose=True)
    got = torch.autograd.grad(out, (s, x), grad)
    s64, x64 = scores.double().requires_grad_(), v.double().requires_grad_()
    want_out = dense_sort_matrix(s64, 0.7).transpose(-1, -2) @ x64
    want = torch.autograd.grad(want_out, (s64, x64), grad.double())
    assert relative_error(out, want_out) <= TOL
    assert relative_error(got[0], want[0], scores_grad_floor(grad, v, 0.7)) <= TOL
    assert relative_error(got[1], want[1]) <= TOL
