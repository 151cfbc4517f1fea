"""The PyTorch path's lean evaluation of small problems, padded or not (``triton_sort._one_shot``): its eager node
(``ops.LeanApply``) and the custom op that serves traced and transformed calls run the same functions and agree
exactly; both match the float64 dense formula, with gradcheck, at odd sizes, with ties and large magnitudes."""

from __future__ import annotations

import pytest
import torch
from reference import relative_error, scores_grad_floor, tolerance, use_torch_chunks

import triton_sort
from triton_sort import _backends, _one_shot, ops, relaxed_sort_apply
from triton_sort.api import check_tau
from triton_sort.reference import dense_sort_matrix

F64 = torch.float64
TOL = tolerance(F64)  # norm-relative, against the float64 dense formula (tests/reference.py)


def _assert_close(actual, expected, floor: float = 0.0, msg: str = "") -> None:
    error = relative_error(actual, expected, floor)
    assert error <= TOL, f"{msg}: relative error {error:.2e} > {TOL:.0e}"


def _inputs(batch: int, n: int, d: int, scale: float = 1.0, ties: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, n, generator=gen, dtype=F64) * scale
    if ties and n > 2:
        scores[:, ::3] = scores[:, 1:2]
    return scores, torch.randn(batch, n, d, generator=gen, dtype=F64), torch.randn(batch, n, d, generator=gen,
                                                                                  dtype=F64)


def _dense(scores, x, tau, descending, transpose):
    matrix = dense_sort_matrix(scores, tau, descending)
    return matrix.transpose(-1, -2) @ x if transpose else matrix @ x


def _results(fn, scores, x, tau, grad):
    s, v, t = scores.clone().requires_grad_(), x.clone().requires_grad_(), tau.clone().requires_grad_()
    out = fn(s, v, t)
    return (out, *torch.autograd.grad(out, (s, v, t), grad))


@pytest.mark.parametrize("n", [1, 2, 3, 17, 100])
@pytest.mark.parametrize(("descending", "transpose"), [(True, False), (False, False), (True, True), (False, True)])
@pytest.mark.parametrize(("scale", "ties"), [(1.0, False), (1.0, True), (1e4, True)])
def test_lean_path_matches_the_dense_formula(n, descending, transpose, scale, ties):
    scores, x, grad = _inputs(3, n, 4, scale, ties, seed=n)
    tau = torch.tensor(0.4 * scale, dtype=F64)
    assert _backends.TorchBackend().lean(3, n, "cpu")
    ours = _results(lambda s, v, t: relaxed_sort_apply(s, v, t, descending=descending, transpose=transpose,
                                                       backend="torch"), scores, x, tau, grad)
    dense = _results(lambda s, v, t: _dense(s, v, t, descending, transpose), scores, x, tau, grad)
    floors = (0.0, scores_grad_floor(grad, x, float(tau)), 0.0, 0.0)
    for name, a, b, floor in zip(("out", "d_scores", "d_x", "d_tau"), ours, dense, floors, strict=True):
        _assert_close(a, b, floor, name)


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("transpose", [False, True])
def test_lean_path_gradcheck(n, transpose):
    scores, x, _ = _inputs(2, n, 3, seed=7)
    scores[0, -1] = scores[0, 0] + 0.3
    tau = torch.tensor(0.6, dtype=F64, requires_grad=True)
    fn = lambda s, v, t: relaxed_sort_apply(s, v, t, transpose=transpose, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (scores.requires_grad_(), x.requires_grad_(), tau))


@pytest.mark.parametrize(("descending", "transpose"), [(True, False), (False, True), (True, True)])
def test_padded_lists_match_their_real_items_alone(descending, transpose):
    """A list of m real items, padding anywhere and holding NaN, gives the dense formula on those m items alone in
    rows 0..m-1 (transposed: values at ranks 0..m-1), zeros elsewhere, and zero gradients for padded entries."""
    scores, x, grad = _inputs(4, 11, 3, ties=True, seed=11)
    mask = torch.rand(4, 11, generator=torch.Generator().manual_seed(2)) < 0.6
    mask[0], mask[1, 1:] = True, False  # a full list and a single item
    ranks = torch.arange(11)[None, :] < mask.sum(-1, keepdim=True)
    scores, x = scores.masked_fill(~mask, float("nan")), x.masked_fill(~(ranks if transpose else mask)[..., None],
                                                                       float("nan"))
    tau = torch.tensor(0.45, dtype=F64)
    s, v, t = scores.clone().requires_grad_(), x.clone().requires_grad_(), tau.clone().requires_grad_()
    out = relaxed_sort_apply(s, v, t, descending=descending, transpose=transpose, mask=mask, backend="torch")
    d_s, d_x, d_t = torch.autograd.grad(out, (s, v, t), grad)
    expected_tau = torch.zeros((), dtype=F64)
    for b in range(4):
        real, m = mask[b], int(mask[b].sum())
        values_at = slice(0, m) if transpose else real
        ss, vv, tt = scores[b, real].clone().requires_grad_(), x[b, values_at].clone().requires_grad_(), \
            tau.clone().requires_grad_()
        ref = _dense(ss, vv, tt, descending, transpose)
        out_at = real if transpose else slice(0, m)
        _assert_close(out[b, out_at], ref, msg="out")
        torch.testing.assert_close(out[b, ~real if transpose else slice(m, None)],
                                   torch.zeros_like(out[b, ~real if transpose else slice(m, None)]), rtol=0, atol=0)
        g = grad[b, out_at]
        r_s, r_x, r_t = torch.autograd.grad(ref, (ss, vv, tt), g)
        _assert_close(d_s[b, real], r_s, scores_grad_floor(g, vv, float(tau)), "d_scores")
        _assert_close(d_x[b, values_at], r_x, msg="d_x")
        assert (d_s[b, ~real] == 0).all() and (d_x[b, slice(m, None) if transpose else ~real] == 0).all()
        expected_tau = expected_tau + r_t
    _assert_close(d_t, expected_tau, msg="d_tau")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("descending", "transpose", "hard", "masked"), [
    (True, False, False, False), (False, True, False, False), (True, True, False, True), (False, False, True, False),
    (True, False, False, True), (False, False, True, True)])
def test_eager_node_and_custom_op_agree_exactly(dtype, descending, transpose, hard, masked):
    """``LeanApply`` (eager direct calls) and the op (dispatched: what torch.compile, transforms and tensor
    subclasses see), forward, both gradients and tau's, bit for bit."""
    scores, x, grad = (t.to(dtype) for t in _inputs(4, 9, 2, ties=True, seed=3))
    mask = torch.rand(4, 9, generator=torch.Generator().manual_seed(4)) < 0.7 if masked else None
    tau = torch.tensor(0.7, dtype=F64)
    assert ops.apply_directly(scores, x, check_tau(tau), "torch")
    direct = _results(lambda s, v, t: relaxed_sort_apply(s, v, t, descending=descending, transpose=transpose,
                                                         hard=hard, mask=mask, backend="torch"), scores, x, tau, grad)
    function = ops.APPLY_FUNCTIONS["relaxed_sort_apply"].eager  # dispatches triton_sort::apply
    dispatched = _results(lambda s, v, t: function.apply(s, v, check_tau(t), mask, descending, hard, True, transpose,
                                                         "torch")[0], scores, x, tau, grad)
    for a, b in zip(direct, dispatched, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lean_path_is_not_taken_where_it_must_not_be():
    scores, x, _ = _inputs(2, 8, 1)
    tau = check_tau(0.5)
    assert ops.apply_directly(scores, x, tau, "torch")
    assert not ops.apply_directly(scores, x, tau, "triton")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the op runs it, with autocast off inside
        assert not ops.apply_directly(scores, x, tau, "torch")
    assert not _backends.TorchBackend().lean(64, 128, "cpu")  # above the one-shot size on CPU: row blocks


def test_checked_python_tau_skips_only_its_own_check():
    """A Python tau is checked once when made into a tensor; a tensor tau is checked in every call."""
    scores, x, _ = _inputs(2, 6, 1)
    assert triton_sort._validation.tau_checked(check_tau(0.25))
    assert not triton_sort._validation.tau_checked(torch.tensor(0.25, dtype=F64))
    torch.testing.assert_close(relaxed_sort_apply(scores, x, 0.25), relaxed_sort_apply(scores, x, torch.tensor(0.25)))
    for bad in (-1.0, 0.0, float("inf")):
        with pytest.raises(ValueError, match="tau must be finite and > 0"):
            relaxed_sort_apply(scores, x, torch.tensor(bad, dtype=F64))


@pytest.mark.parametrize("d", [1, 16])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
def test_swapped_products_match_the_dense_formula(monkeypatch, d, transpose, chunked):
    """Where the CPU's products run swapped (``_backends.batched_product``: a transposed view) and d = 1's outer
    product is a broadcast one, in the one shot and in batch chunks: float64 results and gradients as the dense
    formula's, and the output and the values' gradient contiguous."""
    batch, n = 8, 128
    if chunked:
        use_torch_chunks(monkeypatch, entries=4 * n * n)  # chunks of 4 lists
        assert not _backends.TorchBackend().lean(batch, n, "cpu")
    assert _backends.swaps_product(4 if chunked else batch, n, n, d, "cpu")
    scores, x, grad = _inputs(batch, n, d, seed=d)
    tau = torch.tensor(0.3, dtype=F64)
    ours = _results(lambda s, v, t: relaxed_sort_apply(s, v, t, transpose=transpose, backend="torch"), scores, x,
                    tau, grad)
    dense = _results(lambda s, v, t: _dense(s, v, t, True, transpose), scores, x, tau, grad)
    floors = (0.0, scores_grad_floor(grad, x, float(tau)), 0.0, 0.0)
    for name, a, b, floor in zip(("out", "d_scores", "d_x", "d_tau"), ours, dense, floors, strict=True):
        _assert_close(a, b, floor, name)
    assert ours[0].is_contiguous() and ours[2].is_contiguous()
    for dtype in (torch.float32, F64):  # the casts make the swapped views contiguous whatever the dtype
        s, v = scores.to(dtype).requires_grad_(), x.to(dtype).requires_grad_()
        out = relaxed_sort_apply(s, v, 0.3, transpose=transpose, backend="torch")
        assert out.is_contiguous() and torch.autograd.grad(out, v, grad.to(dtype))[0].is_contiguous()


def test_batched_product_is_the_plain_product():
    gen = torch.Generator().manual_seed(3)
    for batch, rows, m, width in [(4, 100, 100, 16), (2, 64, 300, 1), (300, 8, 8, 16), (1, 64, 64, 16)]:
        weights, values = torch.rand(batch, rows, m, generator=gen, dtype=F64), torch.randn(batch, m, width,
                                                                                              generator=gen, dtype=F64)
        for w in (weights, weights.transpose(1, 2).contiguous().transpose(1, 2)):
            expected = torch.einsum("brm,bmd->brd", w, values)
            torch.testing.assert_close(_backends.batched_product(w, values), expected, rtol=1e-13, atol=1e-13)
    assert _backends.swaps_product(4, 100, 100, 16, "cpu") and not _backends.swaps_product(300, 8, 8, 16, "cpu")
    assert not _backends.swaps_product(4, 100, 100, 16, "cuda")  # GPUs: the plain product


def _lean_step(scores, x, tau, grad, **options):
    """(out, d_scores, d_x, d_tau) of one lean forward + backward on the PyTorch path."""
    s, v, t = scores.clone().requires_grad_(), x.clone().requires_grad_(), tau.clone().requires_grad_()
    out = relaxed_sort_apply(s, v, t, backend="torch", **options)
    return (out.detach(), *torch.autograd.grad(out, (s, v, t), grad))


@pytest.mark.parametrize("masked", [False, True])
def test_scratch_buffers_hold_nothing_between_calls(masked):
    """The lean path's scratch buffers (``_one_shot._scratch``: score differences and dz, reused per thread on CPU
    from SCRATCH_MIN_ELEMENTS entries) are consumed where they are made: two interleaved calls of the same shape
    (forward, forward, backward, backward) and calls from several threads give what each gives alone."""
    import threading

    batch, n, d = 3, 80, 2
    assert batch * n * n >= _one_shot.SCRATCH_MIN_ELEMENTS
    mask = torch.rand(batch, n, generator=torch.Generator().manual_seed(5)) < 0.7 if masked else None
    inputs = [(*_inputs(batch, n, d, ties=True, seed=seed), torch.tensor(0.3 + seed, dtype=F64)) for seed in (6, 7, 8)]
    alone = [_lean_step(s, v, t, g, mask=mask) for s, v, g, t in inputs]

    graphs = []
    for s, v, g, t in inputs[:2]:  # both forwards first, then both backwards
        leaves = s.clone().requires_grad_(), v.clone().requires_grad_(), t.clone().requires_grad_()
        graphs.append((relaxed_sort_apply(*leaves, backend="torch", mask=mask), leaves, g))
    for (out, leaves, g), expected in zip(graphs, alone, strict=False):
        for a, b in zip((out.detach(), *torch.autograd.grad(out, leaves, g)), expected, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    results: dict[int, list] = {}

    def work(index: int) -> None:
        s, v, g, t = inputs[index]
        results[index] = [_lean_step(s, v, t, g, mask=mask) for _ in range(5)]

    threads = [threading.Thread(target=work, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, expected in enumerate(alone):
        for step in results[index]:
            for a, b in zip(step, expected, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_scratch_buffers_made_in_inference_mode_serve_training_calls():
    scores, x, grad = _inputs(2, 100, 1, seed=9)
    with torch.inference_mode():
        first = relaxed_sort_apply(scores.float(), x.float(), 0.5)  # makes the scratch buffers of this shape
    out, *grads = _lean_step(scores.float(), x.float(), torch.tensor(0.5, dtype=F64), grad.float())
    torch.testing.assert_close(out, first, rtol=0, atol=0)
    assert all(bool(g.isfinite().all()) for g in grads)


def _matrix_step(scores, tau, grad, **options):
    """(P_hat, d_scores, d_tau) of relaxed_sort_matrix on the PyTorch path, forward + backward."""
    s, t = scores.clone().requires_grad_(), tau.clone().requires_grad_()
    matrix = triton_sort.relaxed_sort_matrix(s, t, backend="torch", **options)
    return (matrix.detach(), *torch.autograd.grad(matrix, (s, t), grad))


@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("banded", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_lean_matrix_matches_the_chunked_matrix(monkeypatch, descending, banded, masked):
    """``relaxed_sort_matrix`` of one-shot sizes takes ``_one_shot.lean_matrix``: the same matrix (the band's exact
    zeros at the same entries, padded rows and columns 0), scores and tau gradients as the chunked evaluation."""
    scores, _, _ = _inputs(3, 40, 1, ties=True, seed=10)
    scores = scores * 3  # wide enough that the band cuts rows at tau = 0.2
    grad = torch.randn(3, 40, 40, generator=torch.Generator().manual_seed(11), dtype=F64)
    mask = torch.rand(3, 40, generator=torch.Generator().manual_seed(12)) < 0.7 if masked else None
    tau = torch.tensor(0.2, dtype=F64)
    assert _backends.TorchBackend().lean(3, 40, "cpu")
    lean = _matrix_step(scores, tau, grad, descending=descending, banded=banded, mask=mask)
    use_torch_chunks(monkeypatch, entries=2 * 40 * 40)
    chunked = _matrix_step(scores, tau, grad, descending=descending, banded=banded, mask=mask)
    assert torch.equal(lean[0] == 0, chunked[0] == 0)
    assert bool((lean[0] == 0).any()) == (banded or masked)
    for name, a, b in zip(("matrix", "d_scores", "d_tau"), lean, chunked, strict=True):
        _assert_close(a, b, msg=name)


@pytest.mark.parametrize("masked", [False, True])
def test_lean_matrix_gradcheck_and_inputs_untouched(masked):
    scores, _, _ = _inputs(2, 6, 1, ties=True, seed=13)
    mask = torch.tensor([[True, False, True, True, False, True], [True] * 6]) if masked else None
    tau = torch.tensor(0.6, dtype=F64, requires_grad=True)
    s = scores.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda s, t: triton_sort.relaxed_sort_matrix(s, t, mask=mask), (s, tau))
    matrix = triton_sort.relaxed_sort_matrix(s, tau, mask=mask)
    kept, grad = matrix.detach().clone(), torch.randn_like(matrix)
    grad_kept = grad.clone()
    matrix.backward(grad)  # float64: the backward must not write into the output or the incoming gradient
    assert torch.equal(matrix.detach(), kept) and torch.equal(grad, grad_kept)
