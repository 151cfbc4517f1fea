"""Exact at any n: fp32 results within 1e-6 of float64, the band's bound, degenerate inputs, backends agreeing."""

from __future__ import annotations

import math

import pytest
import torch
from reference import DEVICE, relative_error, scores_grad_floor, use_torch_chunks

from triton_sort import relaxed_sort_apply, relaxed_sort_matrix
from triton_sort._backends import dense_drops
from triton_sort._columns import band_threshold, drop, sorted_terms
from triton_sort.reference import dense_sort_matrix

EXACT = 1e-6  # relative error of fp32 results against float64, forward and both gradients


def _scores(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(1, n, generator=gen)
    if kind == "uniform":
        return torch.rand(1, n, generator=gen) * 10 - 5
    if kind == "cauchy":
        return torch.empty(1, n).cauchy_(generator=gen)
    if kind == "ties":  # large blocks of equal scores
        return torch.randint(0, 7, (1, n), generator=gen).float()
    raise ValueError(kind)


def _errors(scores: torch.Tensor, x: torch.Tensor, tau: float, backend: str) -> tuple[float, float, float]:
    """Relative errors (value, d_scores, d_x) of fp32 relaxed_sort_apply against the float64 dense formula."""
    gen = torch.Generator().manual_seed(1)
    s64, x64 = scores.double().requires_grad_(), x.double().requires_grad_()
    expected = dense_sort_matrix(s64, tau) @ x64
    grad_out = torch.randn(expected.shape, generator=gen).double()
    exp_ds, exp_dx = torch.autograd.grad(expected, (s64, x64), grad_out)
    s, xs = scores.to(DEVICE).requires_grad_(), x.to(DEVICE).requires_grad_()
    actual = relaxed_sort_apply(s, xs, tau, backend=backend)
    ds, dx = torch.autograd.grad(actual, (s, xs), grad_out.float().to(DEVICE))
    floor = scores_grad_floor(grad_out, x64.detach(), tau) * 1e-6  # only for gradients that vanish entirely
    return (relative_error(actual.cpu(), expected), relative_error(ds.cpu(), exp_ds, floor),
            relative_error(dx.cpu(), exp_dx))


@pytest.mark.parametrize("kind", ["normal", "uniform", "cauchy", "ties"])
@pytest.mark.parametrize("tau", [1e-3, 1e-1, 1.0, 1e2])
def test_fp32_is_exact_at_large_n(kind, tau):
    """n = 2048 (4096 below): the plain fp32 formula loses ~1e-3 here; the PyTorch path must stay within 1e-6."""
    gen = torch.Generator().manual_seed(0)
    scores, x = _scores(kind, 2048, gen), torch.randn(1, 2048, 2, generator=gen)
    errors = _errors(scores, x, tau, "torch")
    assert max(errors) <= EXACT, errors


def test_fp32_is_exact_at_n_4096():
    gen = torch.Generator().manual_seed(0)
    errors = _errors(torch.randn(1, 4096, generator=gen), torch.randn(1, 4096, 1, generator=gen), 0.1, "torch")
    assert max(errors) <= EXACT, errors


@pytest.mark.parametrize("kind", ["normal", "cauchy", "ties"])
@pytest.mark.parametrize("tau", [1e-3, 1e-1, 1e2])
def test_triton_fp32_is_exact(kind, tau):
    """The kernels (interpreter on CPU, n = 512), d = 1 (row reductions) and d = 16 (tl.dot)."""
    gen = torch.Generator().manual_seed(0)
    scores = _scores(kind, 512, gen)
    value, d_scores, d_x = _errors(scores, torch.randn(1, 512, 1, generator=gen), tau, "triton")
    assert max(value, d_scores, d_x) <= EXACT
    value, d_scores, d_x = _errors(scores, torch.randn(1, 512, 16, generator=gen), tau, "triton")
    assert max(value, d_scores, d_x) <= EXACT


@pytest.mark.parametrize(("scale", "tau"), [(1e-6, 1e-3), (1e-6, 1e-7), (1e6, 1e3), (1e6, 1e5)])
def test_extreme_magnitudes(backend, scale, tau):
    gen = torch.Generator().manual_seed(0)
    n = 300
    scores, x = scale * torch.randn(1, n, generator=gen), torch.randn(1, n, 1, generator=gen)
    assert max(_errors(scores, x, tau, backend)) <= EXACT


@pytest.mark.parametrize("tau", [1e-3, 1e3])
def test_far_from_zero_and_extreme_tau(backend, tau):
    gen = torch.Generator().manual_seed(0)
    scores = 1e4 + torch.randn(1, 200, generator=gen)
    assert max(_errors(scores, torch.randn(1, 200, 1, generator=gen), tau, backend)) <= EXACT


@pytest.mark.parametrize("n", [2, 17, 64, 300])
@pytest.mark.parametrize("tau", [0.01, 0.3, 3.0])
@pytest.mark.parametrize("kind", ["normal", "cauchy", "ties"])
def test_weight_outside_the_window_is_below_the_bound(n, tau, kind):
    """Computed exactly in float64 from the dense matrix: each row's mass outside [L_p, R_p] < e^-30."""
    scores = _scores(kind, n, torch.Generator().manual_seed(n)).double()
    terms = sorted_terms(scores, tau, banded=True)
    p = dense_sort_matrix(scores, tau)[0]
    # Row i of the descending matrix is sorted row p = n - 1 - i; sorted column m is input column order[m].
    sorted_p = p.flip(0)[:, terms.order[0]]
    cols = torch.arange(n)
    inside = (cols[None, :] >= terms.lower[0, :, None]) & (cols[None, :] <= terms.upper[0, :, None])
    outside_mass = (sorted_p * ~inside).sum(-1)
    assert float(outside_mass.max()) < math.exp(-30)
    # The windows are the tightest contiguous ones: their ends are within T * tau of the peak.
    ends = torch.stack([terms.lower[0], terms.upper[0]], dim=-1)
    rows = torch.arange(n)[:, None].expand_as(ends)
    assert float(drop(terms, rows[None], ends[None]).max()) <= band_threshold(n) * tau


def test_band_is_narrow_for_spread_scores_and_full_when_degenerate():
    scores = torch.randn(1, 4096, generator=torch.Generator().manual_seed(0))
    def width(terms) -> float:
        return float((terms.upper - terms.lower + 1).double().mean())

    assert width(sorted_terms(scores, 0.1)) < 4096 / 8
    assert width(sorted_terms(torch.zeros(1, 4096), 0.1)) == 4096  # all equal: full rows
    assert width(sorted_terms(scores, 1e6)) == 4096  # huge tau: full rows


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_banded_equals_full_rows(backend_name):
    gen = torch.Generator().manual_seed(0)
    scores, x = torch.randn(2, 300, generator=gen), torch.randn(2, 300, 4, generator=gen)
    banded = relaxed_sort_apply(scores.to(DEVICE), x.to(DEVICE), 0.05, backend=backend_name)
    full = relaxed_sort_apply(scores.to(DEVICE), x.to(DEVICE), 0.05, banded=False, backend=backend_name)
    assert relative_error(banded, full) <= 1e-7
    matrix = relaxed_sort_matrix(scores.to(DEVICE), 0.05, backend=backend_name)
    assert (matrix == 0).float().mean() > 0.5  # exact zeros outside the band
    torch.testing.assert_close(matrix.sum(-1), torch.ones(2, 300, device=DEVICE))


@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_backends_agree_banded(kind):
    gen = torch.Generator().manual_seed(0)
    scores, x = _scores(kind, 400, gen).to(DEVICE), torch.randn(1, 400, 1, generator=gen).to(DEVICE)
    outs = []
    for backend in ("torch", "triton"):
        s, xs = scores.clone().requires_grad_(), x.clone().requires_grad_()
        y = relaxed_sort_apply(s, xs, 0.2, backend=backend)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), s.grad, xs.grad))
    for a, b in zip(*outs, strict=True):
        assert relative_error(a, b) <= 2 * EXACT


@pytest.mark.parametrize("masked", [False, True])
def test_row_blocks_of_long_lists_match_the_one_shot_evaluation(monkeypatch, masked):
    """Long lists run in blocks of rows with the columns their windows reach: many small blocks (each holding
    every row's window) give the one-shot dense result, for the values, both gradients, tau's, P_hat^T v and the
    matrix, to the band's bound."""
    import triton_sort._backends as backends

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 700, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 700, 2, generator=gen, dtype=torch.float64)
    mask = (torch.rand(2, 700, generator=gen) < 0.8) if masked else None
    results = []
    for dense in (True, False):
        if not dense:
            use_torch_chunks(monkeypatch)
            monkeypatch.setattr(backends, "BLOCK_ELEMENTS", 50_000)  # blocks of about 100 rows
        s, xs = scores.clone().requires_grad_(), x.clone().requires_grad_()
        tau = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        y = relaxed_sort_apply(s, xs, tau, mask=mask, backend="torch")
        z = relaxed_sort_apply(s, xs, tau, mask=mask, transpose=True, backend="torch")
        grads = torch.autograd.grad((y * x).sum() + (z * x).sum(), (s, xs, tau))
        matrix = relaxed_sort_matrix(scores, 0.5, mask=mask, backend="torch")
        results.append((y, z, *grads, matrix))
    assert len(backends.TorchBackend()._blocks(sorted_terms(scores, torch.tensor(0.5, dtype=torch.float64)))) > 5
    for one_shot, blocked in zip(*results, strict=True):
        torch.testing.assert_close(blocked, one_shot, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("masked", [False, True])
def test_windows_are_the_exact_band_by_brute_force(masked):
    """[L_p, R_p] are exactly the columns with D_p(m) <= T tau (monotone drops: one contiguous run), found
    against every drop evaluated densely: B > 1, odd sizes, ties, padded lists."""
    gen = torch.Generator().manual_seed(11)
    for n in (1, 2, 3, 17, 100, 257):
        scores = torch.randn(3, n, generator=gen) * 2
        scores[1, ::3] = scores[1, 0]  # ties
        mask = torch.rand(3, n, generator=gen) < 0.7 if masked else None
        tau = 0.2
        terms = sorted_terms(scores, tau, banded=True, mask=mask)
        drops = dense_drops(terms.t, terms.w)  # (B, p, m)
        real = torch.arange(n)[None, :] < terms.length[:, None]
        inside = (drops <= band_threshold(n) * tau) & real[:, None, :]
        cols = torch.arange(n).expand_as(drops)
        lower = torch.where(inside, cols, n).amin(-1)
        upper = torch.where(inside, cols, -1).amax(-1)
        assert torch.equal(torch.where(real, terms.lower, 0), torch.where(real, lower, 0)), n
        assert torch.equal(torch.where(real, terms.upper, 0), torch.where(real, upper, 0)), n
