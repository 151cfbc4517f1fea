"""Structural properties: row-stochastic, unimodal, limits in tau, ties, hard mode, edge sizes, batching."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import DEVICE, dense_reference, relative_error, tolerance

from triton_sort import relaxed_sort_apply, relaxed_sort_matrix


def test_rows_are_distributions(backend):
    p = relaxed_sort_matrix(torch.randn(3, 100, device=DEVICE), 0.3, backend=backend)
    assert (p >= 0).all() and (p <= 1).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 100, device=DEVICE))


@pytest.mark.parametrize("descending", [True, False])
def test_unimodal_rows_peak_in_sorted_order(backend, descending):
    scores = torch.randn(2, 257, device=DEVICE)
    p = relaxed_sort_matrix(scores, 0.5, descending=descending, backend=backend)
    order = torch.argsort(scores, dim=-1, descending=descending)
    assert torch.equal(p.argmax(-1), order)
    # In sorted column order every row rises to its peak, then falls (Theorem 4 of the paper).
    rows = torch.gather(p.double(), -1, order[:, None, :].expand_as(p))
    steps = torch.sign(torch.diff(rows, dim=-1))
    rises_after_fall = (steps[..., 1:] > 0) & (torch.cummin(steps, dim=-1).values[..., :-1] < 0)
    assert not rises_after_fall.any()


def test_small_tau_tends_to_the_permutation(backend):
    scores = torch.randperm(50, device=DEVICE).float()
    p = relaxed_sort_matrix(scores, 1e-3, backend=backend)
    hard = relaxed_sort_matrix(scores, 1e-3, hard=True, backend=backend)
    torch.testing.assert_close(p, hard, atol=1e-6, rtol=0)


def test_large_tau_tends_to_uniform(backend):
    p = relaxed_sort_matrix(torch.randn(20, device=DEVICE), 1e6, backend=backend)
    torch.testing.assert_close(p, torch.full_like(p, 1 / 20), atol=1e-4, rtol=0)


def test_descending_false_reverses_rows(backend):
    scores = torch.randn(2, 33, device=DEVICE)
    down = relaxed_sort_matrix(scores, 0.7, backend=backend)
    up = relaxed_sort_matrix(scores, 0.7, descending=False, backend=backend)
    torch.testing.assert_close(up, down.flip(-2))


def test_ties_match_the_paper(backend):
    # The paper's example: s = [3, 3, 1] gives rows [0.5, 0.5, 0] twice in the limit of small tau.
    p = relaxed_sort_matrix(torch.tensor([3.0, 3.0, 1.0], device=DEVICE), 0.01, backend=backend)
    expected = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], device=DEVICE)
    torch.testing.assert_close(p, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("pattern", ["all_equal", "pairs", "blocks"])
def test_ties_against_reference(backend, pattern):
    n = 64
    if pattern == "all_equal":
        scores = torch.full((2, n), 1.5)
    elif pattern == "pairs":
        scores = torch.randn(2, n // 2).repeat_interleave(2, dim=-1)
    else:
        scores = torch.randint(0, 4, (2, n)).float()
    x = torch.randn(2, n, 3)
    expected = dense_reference(scores.double(), 0.3) @ x.double()
    actual = relaxed_sort_apply(scores.to(DEVICE), x.to(DEVICE), 0.3, backend=backend)
    assert relative_error(actual.cpu(), expected) <= tolerance(torch.float32)


def test_hard_mode_is_the_stable_sort(backend):
    scores = torch.tensor([[1.0, 3.0, 3.0, -2.0, 3.0, 0.5]], device=DEVICE)
    x = torch.arange(6.0, device=DEVICE)[None].repeat(1, 1)
    out = relaxed_sort_apply(scores, x, 0.5, hard=True, backend=backend)
    assert out.tolist() == [[1.0, 2.0, 4.0, 0.0, 5.0, 3.0]]
    up = relaxed_sort_apply(scores, x, 0.5, hard=True, descending=False, backend=backend)
    assert up.tolist() == [[3.0, 5.0, 0.0, 1.0, 2.0, 4.0]]
    p = relaxed_sort_matrix(scores, 0.5, hard=True, backend=backend)
    assert torch.equal(p.sum(-1), torch.ones_like(scores)) and torch.equal(p.sum(-2), torch.ones_like(scores))
    assert torch.equal(p @ x[..., None], out[..., None])


def test_hard_mode_with_all_ties_is_a_permutation(backend):
    p = relaxed_sort_matrix(torch.zeros(7, device=DEVICE), 0.5, hard=True, backend=backend)
    assert torch.equal(p, torch.eye(7, device=DEVICE))


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5)])
def test_empty_inputs(backend, shape):
    scores = torch.randn(shape, device=DEVICE, requires_grad=True)
    x = torch.randn(*shape, 4, device=DEVICE, requires_grad=True)
    out = relaxed_sort_apply(scores, x, 1.0, backend=backend)
    assert out.shape == x.shape
    out.sum().backward()
    assert scores.grad.shape == scores.shape and x.grad.shape == x.shape
    assert relaxed_sort_matrix(scores, 1.0, backend=backend).shape == (*shape, shape[-1])


def test_single_element_is_identity(backend):
    scores = torch.randn(4, 1, device=DEVICE, requires_grad=True)
    x = torch.randn(4, 1, 3, device=DEVICE, requires_grad=True)
    out = relaxed_sort_apply(scores, x, 0.1, backend=backend)
    torch.testing.assert_close(out, x)
    out.sum().backward()
    torch.testing.assert_close(scores.grad, torch.zeros_like(scores))


def test_batch_rows_are_independent(backend):
    scores, x = torch.randn(4, 30, device=DEVICE), torch.randn(4, 30, 6, device=DEVICE)
    batched = relaxed_sort_apply(scores, x, 0.4, backend=backend)
    for b in range(4):
        torch.testing.assert_close(batched[b], relaxed_sort_apply(scores[b], x[b], 0.4, backend=backend))


def _scores(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(shape, generator=gen)
    if kind == "uniform":
        return torch.rand(shape, generator=gen) * 10 - 5
    if kind == "cauchy":
        return torch.empty(shape).cauchy_(generator=gen).clamp(-1e3, 1e3)
    return torch.randint(0, 3, shape, generator=gen).float()  # heavy ties


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 70),
    batch=st.integers(1, 3),
    d=st.sampled_from([1, 3, 16]),
    kind=st.sampled_from(["normal", "uniform", "cauchy", "ties"]),
    tau=st.sampled_from([0.05, 0.5, 5.0]),
    backend=st.sampled_from(["torch", "triton"]),
    seed=st.integers(0, 2**16),
)
def test_apply_is_matrix_times_values(n, batch, d, kind, tau, backend, seed):
    """The streaming product equals the float64 reference for any shape and score distribution."""
    scores = _scores(kind, (batch, n), seed)
    x = torch.randn(batch, n, d, generator=torch.Generator().manual_seed(seed + 1))
    expected = dense_reference(scores.double(), tau) @ x.double()
    actual = relaxed_sort_apply(scores.to(DEVICE), x.to(DEVICE), tau, backend=backend)
    assert relative_error(actual.cpu(), expected) <= tolerance(torch.float32)
