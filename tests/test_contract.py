"""PyTorch's contract for every public differentiable function: gradcheck (scores, values and a tensor tau), forward
mode raises a clear error (never zeros), torch.func (grad, vjp, jacrev, vmap) matches the dense formula, double
backward raises, one compiled graph for any tau, autocast, non-finite values, the validation switch."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from reference import DEVICE, use_torch_chunks

import triton_sort
from triton_sort import relaxed_quantile, relaxed_sort_apply, relaxed_sort_matrix, relaxed_topk
from triton_sort.reference import dense_sort_apply, dense_sort_matrix

F64 = torch.float64
B, N, D = 2, 7, 3


def _x(like: torch.Tensor) -> torch.Tensor:
    """Fixed values (..., n, D) for scores (..., n) (under vmap, of one example's shape); fp32 for 16-bit scores,
    as autocast regions produce them."""
    shape, dtype = (*like.shape, D), torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
    return torch.linspace(-1, 2, like.numel() * D, dtype=dtype, device=like.device).reshape(shape).cos()


# name -> (ours(scores, tau, backend), dense float64 formula(scores, tau)); each returns one tensor.
FUNCTIONS = {
    "relaxed_sort_apply": (lambda s, tau, backend="torch": relaxed_sort_apply(s, _x(s), tau, backend=backend),
                           lambda s, tau: dense_sort_apply(s, _x(s), tau)),
    "relaxed_sort_apply_ascending": (
        lambda s, tau, backend="torch": relaxed_sort_apply(s, _x(s), tau, descending=False, backend=backend),
        lambda s, tau: dense_sort_apply(s, _x(s), tau, descending=False)),
    "relaxed_sort_matrix": (lambda s, tau, backend="torch": relaxed_sort_matrix(s, tau, backend=backend),
                            lambda s, tau: dense_sort_matrix(s, tau)),
    "relaxed_topk": (lambda s, tau, backend="torch": relaxed_topk(s, 3, tau, backend=backend),
                     lambda s, tau: dense_sort_matrix(s, tau)[..., :3, :].sum(-2)),
    "relaxed_quantile": (lambda s, tau, backend="torch": relaxed_quantile(s, _x(s), 0.4, tau),
                         lambda s, tau: None),
}
NAMES = list(FUNCTIONS)


def _scores() -> torch.Tensor:
    return torch.randn(B, N, dtype=F64, device=DEVICE)


def _tau(value: float = 0.6) -> torch.Tensor:
    return torch.tensor(value, dtype=F64, device=DEVICE)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_scores_and_tensor_tau(name):
    ours, _ = FUNCTIONS[name]
    scores, tau = _scores().requires_grad_(), _tau().requires_grad_()
    assert torch.autograd.gradcheck(lambda s, t: ours(s, t), (scores, tau))


# backend -> (scores dtype, rtol, atol of the tau gradient against the float64 dense formula)
TAU_GRADIENT_CASES = {"torch": (F64, 1e-10, 1e-12), "triton": (torch.float32, 1e-5, 1e-6)}


@pytest.mark.parametrize("backend", list(TAU_GRADIENT_CASES))
@pytest.mark.parametrize("name", [n for n in NAMES if n != "relaxed_quantile"])
def test_tau_gradient_matches_the_dense_formula(name, backend):
    """Both backends; on Triton the kernels' NEED_TAU variant of the column pass (the interpreter on CPU)."""
    ours, dense = FUNCTIONS[name]
    dtype, rtol, atol = TAU_GRADIENT_CASES[backend]
    scores, tau = _scores(), _tau(0.35).requires_grad_()
    grad_out = torch.randn_like(dense(scores, tau))
    (expected,) = torch.autograd.grad(dense(scores, tau), tau, grad_out)
    (actual,) = torch.autograd.grad(ours(scores.to(dtype), tau, backend), tau, grad_out.to(dtype))
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", NAMES)
def test_forward_mode_raises_a_clear_error(name):
    ours, _ = FUNCTIONS[name]
    scores = _scores()
    if name == "relaxed_quantile":  # plain PyTorch operations: forward mode works and is correct
        tangent = torch.randn_like(scores)
        _, jvp = torch.func.jvp(lambda s: ours(s, 0.5), (scores,), (tangent,))
        eps = 1e-6
        fd = (ours(scores + eps * tangent, 0.5) - ours(scores - eps * tangent, 0.5)) / (2 * eps)
        torch.testing.assert_close(jvp, fd, rtol=1e-5, atol=1e-7)
        return
    public = name.removesuffix("_ascending")
    for transform in (lambda: torch.func.jvp(lambda s: ours(s, 0.5), (scores,), (scores,)),
                      lambda: torch.func.jacfwd(lambda s: ours(s, 0.5))(scores)):
        with pytest.raises(RuntimeError, match=f"forward-mode AD .* not supported by triton_sort.{public}"):
            transform()
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
        ours(fwad.make_dual(scores, torch.ones_like(scores)), 0.5)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "relaxed_quantile"])
def test_torch_func_reverse_transforms_match_the_dense_formula(name):
    ours, dense = FUNCTIONS[name]
    scores = _scores()
    tau = 0.5
    for transform in (torch.func.jacrev, lambda f: torch.func.vmap(f)):
        torch.testing.assert_close(transform(lambda s: ours(s, tau))(scores),
                                   transform(lambda s: dense(s, tau))(scores))
    loss = lambda f: lambda s: f(s, tau).square().sum()  # noqa: E731
    torch.testing.assert_close(torch.func.grad(loss(ours))(scores), torch.func.grad(loss(dense))(scores))
    batched = torch.randn(4, B, N, dtype=F64, device=DEVICE)
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(loss(ours)))(batched),
                               torch.func.vmap(torch.func.grad(loss(dense)))(batched))
    _, vjp = torch.func.vjp(lambda s: ours(s, tau), scores)
    _, vjp_dense = torch.func.vjp(lambda s: dense(s, tau), scores)
    cotangent = torch.randn_like(dense(scores, tau))
    torch.testing.assert_close(vjp(cotangent), vjp_dense(cotangent))


def test_vmap_over_tau_is_a_clear_error():
    scores = _scores()
    with pytest.raises(ValueError, match="vmap over tau is not supported"):
        torch.func.vmap(lambda t: relaxed_sort_apply(scores, _x(scores), t))(torch.rand(3, dtype=F64) + 0.5)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "relaxed_quantile"])
def test_double_backward_raises(name):
    ours, _ = FUNCTIONS[name]
    public = name.removesuffix("_ascending")
    scores = _scores().requires_grad_()
    (grad,) = torch.autograd.grad(ours(scores, 0.5).square().sum(), scores, create_graph=True)
    with pytest.raises(RuntimeError, match=f"double backward is not supported by triton_sort.{public}"):
        grad.sum().backward()
    with pytest.raises(RuntimeError, match="not supported by triton_sort"):
        torch.func.hessian(lambda s: ours(s, 0.5).sum())(scores.detach())


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_one_compiled_graph_for_any_tau(name, dynamic):
    ours, _ = FUNCTIONS[name]
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda s, t: ours(s * 1.0, t), fullgraph=True, dynamic=dynamic, backend=counter)
    scores = _scores()
    frames_after_first_call = None
    for value in (0.05, 0.2, 0.5, 1.0, 3.0):
        tau = _tau(value).requires_grad_()
        s = scores.clone().requires_grad_()
        got = compiled(s, tau)
        got_grads = torch.autograd.grad(got.square().sum(), (s, tau))
        s2, tau2 = scores.clone().requires_grad_(), _tau(value).requires_grad_()
        expected = ours(s2, tau2)
        expected_grads = torch.autograd.grad(expected.square().sum(), (s2, tau2))
        torch.testing.assert_close(got, expected)
        for a, b in zip(got_grads, expected_grads, strict=True):
            torch.testing.assert_close(a, b)
        frames_after_first_call = frames_after_first_call or counter.frame_count
    # No recompilation as tau changes, and one graph holds the computation (Dynamo may add an empty one).
    assert counter.frame_count == frames_after_first_call
    assert sum(any(node.op == "call_function" for node in graph.graph.nodes) for graph in counter.graphs) == 1


@pytest.mark.parametrize("name", NAMES)
def test_autocast_accepts_mixed_dtypes_at_fp32_accuracy(name):
    """Under CPU autocast, bf16 scores (as a Linear returns) with fp32 values compute at fp32: within bf16 rounding
    of the inputs, not of the result."""
    ours, _ = FUNCTIONS[name]
    scores = torch.randn(B, N, device=DEVICE).bfloat16()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = ours(scores, 0.5)
    expected = ours(scores.double(), 0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_mismatched_dtypes_outside_autocast_stay_a_type_error():
    with pytest.raises(TypeError, match="dtype of scores"):
        relaxed_sort_apply(torch.randn(3, 5), torch.randn(3, 5).bfloat16(), 0.5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_raise_with_validation_on(backend, bad):
    scores = torch.randn(B, 300, device=DEVICE)  # n = 300: the banded, windowed paths too
    for n in (N, 300):
        x = torch.randn(B, n, D, device=DEVICE)
        x[1, n // 2, 1] = bad
        with pytest.raises(ValueError, match="x must be finite"):
            relaxed_sort_apply(scores[:, :n], x, 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"values must be finite|x must be finite"):
        relaxed_quantile(scores[:, :N], torch.full((B, N), bad), 0.5, 0.5)


def test_validation_switch():
    scores = torch.randn(B, N, dtype=F64)
    scores[0, 2] = float("nan")
    assert triton_sort.validation_enabled()
    with pytest.raises(ValueError, match="scores must be finite"):
        relaxed_sort_apply(scores, _x(scores), 0.5)
    triton_sort.set_validation(False)
    try:
        out = relaxed_sort_apply(scores, _x(scores), 0.5)
        assert out[0].isnan().all() and out[1].isfinite().all()  # the NaN list only
    finally:
        triton_sort.set_validation(True)
    with triton_sort.validation(False):
        relaxed_sort_apply(scores, _x(scores), torch.tensor(-1.0, dtype=F64))  # no check, no error
    with pytest.raises(ValueError, match="tau must be finite and > 0"):
        relaxed_sort_apply(scores.nan_to_num(), _x(scores), torch.tensor(-1.0, dtype=F64))
    with pytest.raises(TypeError):
        triton_sort.set_validation(1)


@pytest.mark.parametrize("tau", [1e-310, 0.0, -1.0, float("inf"), float("nan")])
def test_tau_whose_inverse_overflows_or_is_not_positive_is_rejected(tau):
    for value in (tau, torch.tensor(tau, dtype=F64)):
        with pytest.raises(ValueError, match="tau must be finite and > 0 with a finite inverse"):
            relaxed_sort_apply(_scores(), _x(_scores()), value)


def test_backward_with_zero_width_values():
    scores = torch.randn(B, N, requires_grad=True)
    x = torch.randn(B, N, 0, requires_grad=True)
    out = relaxed_sort_apply(scores, x, 0.5)
    d_scores, d_x = torch.autograd.grad(out.sum(), (scores, x), allow_unused=True)
    assert out.shape == (B, N, 0) and d_x.shape == (B, N, 0)
    assert d_scores is None or (d_scores == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n", [7, 300])  # one-shot and (PyTorch) chunked, banded paths
@pytest.mark.parametrize(("where", "bad"), [("x", float("nan")), ("x", float("inf")), ("scores", float("nan")),
                                            ("scores", float("-inf"))])
def test_non_finite_inputs_poison_their_list_with_validation_off(monkeypatch, backend, n, where, bad):
    """One rule on every path: the list with a non-finite input is NaN throughout (outputs, both gradients, the
    matrix of a non-finite score), the other lists are untouched."""
    if n == 300:
        use_torch_chunks(monkeypatch)  # the chunked, windowed PyTorch path
    scores, x = torch.randn(3, n), torch.randn(3, n, 2)
    (scores if where == "scores" else x)[1, n // 3] = bad
    scores, x = scores.requires_grad_(), x.requires_grad_()
    with triton_sort.validation(False):
        out = relaxed_sort_apply(scores, x, 0.5, backend=backend)
        out.backward(torch.ones_like(out))
        matrix = relaxed_sort_matrix(scores.detach(), 0.5, backend=backend)
    for tensor in (out, scores.grad, x.grad, *([matrix] if where == "scores" else [])):  # the matrix sees no x
        assert tensor[1].isnan().all()
        assert tensor[[0, 2]].isfinite().all()
