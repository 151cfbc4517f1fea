"""Padded lists (``mask=``), ``P_hat^T @ v`` (``transpose=True``), any leading batch shape, ``relaxed_sort`` and
``relaxed_rank``: against the float64 dense formula on the compacted lists, on both backends (the Triton kernels in
the interpreter on CPU) and on both PyTorch paths (one-shot and chunked)."""

from __future__ import annotations

import math

import pytest
import torch
from reference import BASE_TOLERANCE, DEVICE, relative_error, use_torch_chunks

from triton_sort import (
    relaxed_quantile,
    relaxed_rank,
    relaxed_sort,
    relaxed_sort_apply,
    relaxed_sort_matrix,
    relaxed_topk,
    validation,
)
from triton_sort.kernels import launch
from triton_sort.reference import dense_sort_matrix

TAU = 0.4
F64 = torch.float64


def working_dtype(backend: str) -> torch.dtype:
    return F64 if backend == "torch" else torch.float32


def tol(backend: str) -> float:
    # fp32 kernels against float64: the suite's fp32 bound (gradients of sums of cancelling terms: 10x).
    return BASE_TOLERANCE[working_dtype(backend)] * 10


def random_mask(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    """Padding in random places, plus the edge cases: a full list, a list of one real item, an empty list."""
    mask = torch.rand(batch, n, generator=torch.Generator().manual_seed(seed)) < 0.6
    mask[0] = True
    if batch > 1:
        mask[1] = False
        mask[1, n // 2] = True
    if batch > 2:
        mask[2] = False
    return mask.to(DEVICE)


def with_garbage(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Padding that holds NaN and -inf: it must never be read."""
    garbage = values.clone()
    fill = mask.reshape(*mask.shape, *([1] * (values.dim() - mask.dim())))
    garbage = garbage.masked_fill(~fill, math.nan)
    if garbage.shape[0] > 0:
        garbage[0:1] = garbage[0:1].masked_fill(~fill[0:1], -math.inf)
    return garbage


@pytest.fixture(params=["torch-one-shot", "torch-chunked", "triton-short", "triton-tiled"])
def path(request, monkeypatch) -> str:
    """The backend to call: the PyTorch path's one-shot (dense) and chunked evaluations, and the Triton kernels
    (one launch per pass for short lists, and the tiled kernels that serve long ones)."""
    if request.param == "torch-chunked":
        use_torch_chunks(monkeypatch)
    if request.param == "triton-tiled":
        monkeypatch.setattr(launch, "SHORT_MAX_N", 0)
    return request.param.split("-")[0]


@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("hard", [False, True])
def test_masked_apply_equals_the_compacted_lists(path, descending, hard):
    backend = path
    dtype = working_dtype(backend)
    batch, n, d = 5, 17, 3
    mask = random_mask(batch, n)
    scores = torch.randn(batch, n, dtype=dtype, device=DEVICE)
    x = torch.randn(batch, n, d, dtype=dtype, device=DEVICE)
    s = with_garbage(scores, mask).requires_grad_()
    v = with_garbage(x, mask).requires_grad_()
    out = relaxed_sort_apply(s, v, TAU, descending=descending, hard=hard, mask=mask, backend=backend)
    grad = torch.randn_like(out)
    out.backward(grad)
    for b in range(batch):
        real = mask[b]
        m = int(real.sum())
        s_b = scores[b][real].to(F64).requires_grad_()
        x_b = x[b][real].to(F64).requires_grad_()
        p = dense_sort_matrix(s_b, TAU, descending)
        soft = p @ x_b
        if hard:
            order = torch.sort(s_b.detach(), descending=descending, stable=True).indices
            expected = x_b.detach()[order]
        else:
            expected = soft
        soft.backward(grad[b, :m].to(F64))
        assert relative_error(out[b, :m], expected) <= tol(backend)
        assert (out[b, m:] == 0).all()
        assert relative_error(s.grad[b][real], s_b.grad, floor=1e-8) <= tol(backend)
        assert relative_error(v.grad[b][real], x_b.grad) <= tol(backend)
        assert (s.grad[b][~real] == 0).all() and (v.grad[b][~real] == 0).all()


@pytest.mark.parametrize("descending", [True, False])
def test_masked_matrix_equals_the_compacted_lists(path, descending):
    backend = path
    dtype = working_dtype(backend)
    batch, n = 4, 13
    mask = random_mask(batch, n, seed=1)
    scores = torch.randn(batch, n, dtype=dtype, device=DEVICE)
    s = with_garbage(scores, mask).requires_grad_()
    p = relaxed_sort_matrix(s, TAU, descending=descending, mask=mask, backend=backend)
    grad = torch.randn_like(p)
    p.backward(grad)
    for b in range(batch):
        items = mask[b].nonzero()[:, 0]
        m = len(items)
        s_b = scores[b][items].to(F64).requires_grad_()
        expected = dense_sort_matrix(s_b, TAU, descending)
        expected.backward(grad[b][:m][:, items].to(F64))
        assert relative_error(p[b][:m][:, items], expected) <= tol(backend)
        assert (p[b][m:] == 0).all() and (p[b][:, ~mask[b]] == 0).all()
        assert relative_error(s.grad[b][items], s_b.grad, floor=1e-8) <= tol(backend)
        assert (s.grad[b][~mask[b]] == 0).all()


def test_masked_hard_matrix_is_the_compacted_permutation(backend):
    mask = random_mask(3, 9, seed=2)
    scores = torch.randn(3, 9, dtype=working_dtype(backend), device=DEVICE)
    p = relaxed_sort_matrix(scores, TAU, hard=True, mask=mask, backend=backend)
    for b in range(3):
        items = mask[b].nonzero()[:, 0]
        m = len(items)
        order = torch.sort(scores[b][items], descending=True, stable=True).indices
        expected = torch.zeros(m, m, dtype=p.dtype, device=DEVICE)
        expected[torch.arange(m), order] = 1
        assert torch.equal(p[b][:m][:, items], expected)
        assert p[b].sum() == m


@pytest.mark.parametrize("descending", [True, False])
def test_transpose_matches_the_dense_transposed_product(path, descending):
    backend = path
    dtype = working_dtype(backend)
    for shape in [(3, 17, 4), (2, 1, 2), (1, 100, 1)]:
        scores = torch.randn(shape[:2], dtype=dtype, device=DEVICE, requires_grad=True)
        v = torch.randn(shape, dtype=dtype, device=DEVICE, requires_grad=True)
        z = relaxed_sort_apply(scores, v, TAU, descending=descending, transpose=True, backend=backend)
        grad = torch.randn_like(z)
        z.backward(grad)
        s64 = scores.detach().to(F64).requires_grad_()
        v64 = v.detach().to(F64).requires_grad_()
        expected = dense_sort_matrix(s64, TAU, descending).transpose(-1, -2) @ v64
        expected.backward(grad.to(F64))
        assert relative_error(z, expected) <= tol(backend)
        assert relative_error(scores.grad, s64.grad, floor=1e-8) <= tol(backend)
        assert relative_error(v.grad, v64.grad) <= tol(backend)


def test_masked_transpose_and_rank_equal_the_compacted_lists(path):
    backend = path
    dtype = working_dtype(backend)
    batch, n = 4, 11
    mask = random_mask(batch, n, seed=4)
    scores = torch.randn(batch, n, dtype=dtype, device=DEVICE)
    v = torch.randn(batch, n, 2, dtype=dtype, device=DEVICE)
    s = with_garbage(scores, mask).requires_grad_()
    # v is indexed by rank: ranks m..n-1 of a list are padding, whatever they hold.
    ranks_real = torch.arange(n, device=DEVICE)[None, :] < mask.sum(-1, keepdim=True)
    v_in = with_garbage(v, ranks_real).requires_grad_()
    z = relaxed_sort_apply(s, v_in, TAU, transpose=True, mask=mask, backend=backend)
    rank = relaxed_rank(s, TAU, mask=mask, backend=backend)
    grad = torch.randn_like(z)
    (z * grad).sum().backward()
    for b in range(batch):
        items = mask[b].nonzero()[:, 0]
        m = len(items)
        s_b = scores[b][items].to(F64).requires_grad_()
        v_b = v[b][:m].to(F64).requires_grad_()
        p = dense_sort_matrix(s_b, TAU)
        expected = p.T @ v_b
        expected.backward(grad[b][items].to(F64))
        assert relative_error(z[b][items], expected) <= tol(backend)
        assert (z[b][~mask[b]] == 0).all()
        assert relative_error(s.grad[b][items], s_b.grad, floor=1e-8) <= tol(backend)
        assert relative_error(v_in.grad[b][:m], v_b.grad) <= tol(backend)
        assert (v_in.grad[b][m:] == 0).all()
        expected_rank = p.T @ torch.arange(1, m + 1, dtype=F64, device=DEVICE)
        assert relative_error(rank[b][items], expected_rank) <= tol(backend)
        assert (rank[b][~mask[b]] == 0).all()


@pytest.mark.parametrize("descending", [True, False])
def test_rank_at_small_tau_is_the_exact_rank(backend, descending):
    scores = torch.randn(3, 50, dtype=working_dtype(backend), device=DEVICE)
    ranks = relaxed_rank(scores, 1e-4, descending=descending, backend=backend)
    exact = torch.argsort(torch.argsort(scores, dim=-1, descending=descending), dim=-1) + 1
    torch.testing.assert_close(ranks, exact.to(ranks.dtype), atol=1e-3, rtol=0)
    # Every list's ranks sum to 1 + ... + n (P_hat is row-stochastic).
    torch.testing.assert_close(ranks.sum(-1).to(F64), torch.full((3,), 50 * 51 / 2, dtype=F64, device=DEVICE))


def test_relaxed_sort_is_p_hat_at_scores(backend):
    dtype = working_dtype(backend)
    mask = random_mask(3, 12, seed=5)
    scores = torch.randn(3, 12, dtype=dtype, device=DEVICE)
    s = with_garbage(scores, mask).requires_grad_()
    out = relaxed_sort(s, TAU, mask=mask, backend=backend)
    out.sum().backward()
    for b in range(3):
        items = mask[b].nonzero()[:, 0]
        m = len(items)
        s_b = scores[b][items].to(F64).requires_grad_()
        expected = dense_sort_matrix(s_b, TAU) @ s_b
        expected.sum().backward()
        assert relative_error(out[b, :m], expected) <= tol(backend)
        assert relative_error(s.grad[b][items], s_b.grad) <= tol(backend)
        assert (s.grad[b][~mask[b]] == 0).all()
    hard = relaxed_sort(scores, TAU, hard=True, descending=False, backend=backend)
    torch.testing.assert_close(hard, torch.sort(scores, dim=-1).values)


def test_masked_topk_and_sums(backend):
    mask = random_mask(4, 10, seed=6)
    scores = torch.randn(4, 10, dtype=working_dtype(backend), device=DEVICE)
    out = relaxed_topk(with_garbage(scores, mask), 3, TAU, mask=mask, backend=backend)
    for b in range(4):
        items = mask[b].nonzero()[:, 0]
        expected = dense_sort_matrix(scores[b][items].to(F64), TAU)[:3].sum(0)
        assert relative_error(out[b][items], expected) <= tol(backend)
        assert (out[b][~mask[b]] == 0).all()
        torch.testing.assert_close(out[b].sum().to(F64), torch.tensor(float(min(3, len(items))), dtype=F64,
                                                                      device=DEVICE))


@pytest.mark.parametrize("leading", [(2, 3), (1, 2, 2), (0, 4)])
def test_leading_batch_shapes_equal_the_flattened_call(backend, leading):
    dtype = working_dtype(backend)
    n, d = 7, 2
    scores = torch.randn(*leading, n, dtype=dtype, device=DEVICE, requires_grad=True)
    x = torch.randn(*leading, n, d, dtype=dtype, device=DEVICE, requires_grad=True)
    mask = (torch.rand(*leading, n) < 0.7).to(DEVICE)
    flat = (-1, n)
    cases = {
        "apply": (lambda s, v, m: relaxed_sort_apply(s, v, TAU, mask=m, backend=backend), True),
        "apply_1d_values": (lambda s, v, m: relaxed_sort_apply(s, v[..., 0], TAU, mask=m, backend=backend), True),
        "transpose": (lambda s, v, m: relaxed_sort_apply(s, v, TAU, mask=m, transpose=True, backend=backend), True),
        "matrix": (lambda s, v, m: relaxed_sort_matrix(s, TAU, mask=m, backend=backend), True),
        "sort": (lambda s, v, m: relaxed_sort(s, TAU, mask=m, backend=backend), True),
        "rank": (lambda s, v, m: relaxed_rank(s, TAU, mask=m, backend=backend), True),
        "topk": (lambda s, v, m: relaxed_topk(s, 2, TAU, mask=m, backend=backend), True),
        "quantile": (lambda s, v, m: relaxed_quantile(s, v, 0.5, TAU), False),
    }
    if backend == "triton":  # the shape handling is the API's, before any backend: the kernels' outputs once each
        cases = {name: cases[name] for name in ("apply", "transpose", "matrix")}
    for name, (fn, takes_mask) in cases.items():
        for m in ([None, mask] if takes_mask else [None]):
            nd = fn(scores, x, m)
            flat_out = fn(scores.reshape(flat), x.reshape(-1, n, d), None if m is None else m.reshape(flat))
            assert nd.shape[:len(leading)] == leading, name
            torch.testing.assert_close(nd.reshape(flat_out.shape), flat_out, msg=name)
            if nd.numel():
                g_nd = torch.autograd.grad(nd.sum(), scores)[0]
                g_flat = torch.autograd.grad(flat_out.sum(), scores)[0]
                torch.testing.assert_close(g_nd, g_flat, msg=name)


@pytest.mark.parametrize("chunked", [False, True])
def test_gradcheck_masked_and_transposed_paths(chunked, monkeypatch):
    if chunked:
        use_torch_chunks(monkeypatch)
    torch.manual_seed(1)
    base = torch.randperm(9, dtype=F64) * 0.7 / 9 + torch.rand(2, 9, dtype=F64) * 0.01
    scores = base.to(DEVICE).requires_grad_()
    mask = random_mask(2, 9, seed=7)
    mask[1] = torch.tensor([True, False, True, True, False, True, False, True, True])
    x = torch.randn(2, 9, 2, dtype=F64, device=DEVICE, requires_grad=True)
    tau = torch.tensor(0.1, dtype=F64, device=DEVICE, requires_grad=True)
    for fn in (lambda s, v, t: relaxed_sort_apply(s, v, t, mask=mask, backend="torch"),
               lambda s, v, t: relaxed_sort_apply(s, v, t, transpose=True, backend="torch"),
               lambda s, v, t: relaxed_sort_apply(s, v, t, transpose=True, mask=mask, descending=False,
                                                  backend="torch"),
               lambda s, v, t: relaxed_sort_matrix(s, t, mask=mask, backend="torch"),
               lambda s, v, t: relaxed_rank(s, t, mask=mask, backend="torch"),
               lambda s, v, t: relaxed_sort(s, t, mask=mask, backend="torch")):
        assert torch.autograd.gradcheck(fn, (scores, x, tau))


def test_masked_validation_ignores_padding_and_poisons_real_lists(backend):
    dtype = working_dtype(backend)
    scores = torch.randn(3, 6, dtype=dtype, device=DEVICE)
    mask = random_mask(3, 6, seed=8)
    x = torch.randn(3, 6, dtype=dtype, device=DEVICE)
    relaxed_sort_apply(with_garbage(scores, mask), with_garbage(x, mask), TAU, mask=mask, backend=backend)
    bad = scores.clone()
    bad[0, 2] = math.nan  # list 0 is all real
    with pytest.raises(ValueError, match="scores must be finite"):
        relaxed_sort_apply(bad, x, TAU, mask=mask, backend=backend)
    bad_v = x.clone()
    bad_v[0, 0] = math.inf  # rank 0 of a full list is real
    with pytest.raises(ValueError, match="x must be finite"):
        relaxed_sort_apply(scores, bad_v, TAU, mask=mask, transpose=True, backend=backend)
    with validation(False):
        out = relaxed_sort_apply(bad, x, TAU, mask=mask, backend=backend)
    assert out[0].isnan().all() and not out[1:].isnan().any()


def test_mask_argument_errors():
    scores = torch.randn(2, 5)
    with pytest.raises(TypeError, match=r"mask must have dtype torch\.bool"):
        relaxed_sort_apply(scores, scores, TAU, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="mask must have the shape of scores"):
        relaxed_sort_matrix(scores, TAU, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask must be a bool torch\.Tensor"):
        relaxed_rank(scores, TAU, mask=[True] * 5)
    with pytest.raises(TypeError, match="transpose must be a bool"):
        relaxed_sort_apply(scores, scores, TAU, transpose=1)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., n\)"):
        relaxed_sort_apply(torch.randn(2, 3, 5), torch.randn(3, 2, 5), TAU)


def test_masked_call_compiles_without_graph_breaks():
    mask = random_mask(3, 8, seed=9)

    @torch.compile(fullgraph=True, backend="eager")
    def loss(s, v):
        return (relaxed_sort_apply(s, v, TAU, mask=mask, backend="torch") ** 2).sum() + relaxed_rank(
            s, TAU, mask=mask, backend="torch").sum()

    scores = torch.randn(3, 8, requires_grad=True)
    x = torch.randn(3, 8)
    value = loss(scores, x)
    value.backward()
    expected = (relaxed_sort_apply(scores, x, TAU, mask=mask) ** 2).sum() + relaxed_rank(scores, TAU, mask=mask).sum()
    torch.testing.assert_close(value, expected)
    assert (scores.grad[~mask] == 0).all()


def test_neuralsort_module_takes_a_mask():
    from triton_sort import NeuralSort

    mask = random_mask(3, 8, seed=10)
    scores, x = torch.randn(3, 8), torch.randn(3, 8, 2)
    layer = NeuralSort(0.3)
    torch.testing.assert_close(layer(scores, x, mask=mask), relaxed_sort_apply(scores, x, 0.3, mask=mask))
    torch.testing.assert_close(layer(scores, mask=mask), relaxed_sort_matrix(scores, 0.3, mask=mask))
