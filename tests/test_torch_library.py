"""The custom ops pass torch.library.opcheck and trace under torch.compile(fullgraph=True) for both backends."""

from __future__ import annotations

import contextlib

import pytest
import torch
from reference import DEVICE
from torch.utils._python_dispatch import TorchDispatchMode

import triton_sort
from triton_sort import NeuralSort, relaxed_sort_apply, relaxed_sort_matrix

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _dtype_for(backend: str) -> torch.dtype:
    return torch.float64 if backend == "torch" else torch.float32


def _tau(value: float = 0.5, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64, device=DEVICE, requires_grad=requires_grad)


def _mask(batch: int, n: int) -> torch.Tensor:
    """Padded lists with padding in random places: one full list, one with a single real item."""
    mask = torch.rand(batch, n, generator=torch.Generator().manual_seed(3)) < 0.6
    mask[0], mask[1] = True, False
    mask[1, 4] = True
    return mask.to(DEVICE)


@pytest.mark.parametrize(("hard", "banded", "masked", "transpose"),
                         [(False, True, False, False), (True, True, False, False), (False, False, False, False),
                          (False, True, True, False), (True, True, True, True), (False, True, False, True),
                          (False, True, True, True)])
def test_opcheck_apply(backend, hard, banded, masked, transpose):
    dtype = _dtype_for(backend)
    scores = torch.randn(3, 9, dtype=dtype, device=DEVICE, requires_grad=True)
    x = torch.randn(3, 9, 3, dtype=dtype, device=DEVICE, requires_grad=True)
    mask = _mask(3, 9) if masked else None
    torch.library.opcheck(torch.ops.triton_sort.apply.default, (scores, x, _tau(requires_grad=True), mask, True,
                                                                 hard, banded, transpose, backend),
                          test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize(("hard", "banded", "masked"), [(False, True, False), (True, True, False),
                                                        (False, False, False), (False, True, True),
                                                        (True, True, True)])
def test_opcheck_matrix(backend, hard, banded, masked):
    scores = torch.randn(3, 9, dtype=_dtype_for(backend), device=DEVICE, requires_grad=True)
    mask = _mask(3, 9) if masked else None
    torch.library.opcheck(torch.ops.triton_sort.matrix.default, (scores, _tau(requires_grad=True), mask, False,
                                                                  hard, banded, backend),
                          test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize(("need_tau", "masked", "transpose"), [(False, False, False), (True, False, False),
                                                               (True, True, False), (True, True, True)])
def test_opcheck_backward_ops(backend, need_tau, masked, transpose):
    dtype = _dtype_for(backend)
    scores = torch.randn(3, 9, dtype=dtype, device=DEVICE)
    x = torch.randn(3, 9, 3, dtype=dtype, device=DEVICE)
    mask = _mask(3, 9) if masked else None
    out, norm, weights, *terms = torch.ops.triton_sort.apply(scores, x, _tau(), mask, True, False, True, transpose,
                                                             backend)
    torch.library.opcheck(torch.ops.triton_sort.apply_backward.default,
                          (x, torch.randn_like(out), norm, weights, _tau(), *terms, True, True, backend, need_tau,
                           masked, transpose),
                          test_utils=("test_schema", "test_faketensor"))
    soft, *terms = torch.ops.triton_sort.matrix(scores, _tau(), mask, True, False, True, backend)
    torch.library.opcheck(torch.ops.triton_sort.matrix_backward.default,
                          (torch.randn_like(soft), soft, _tau(), *terms[:6], terms[8], True, need_tau, masked),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("hard", [False, True])
def test_compile_fullgraph(backend, hard):
    torch._dynamo.reset()
    dtype = _dtype_for(backend)
    scores = torch.randn(3, 20, dtype=dtype, device=DEVICE)
    x = torch.randn(3, 20, 4, dtype=dtype, device=DEVICE)

    def loss_fn(s, v):
        y = relaxed_sort_apply(s * 2.0, v, 0.3, hard=hard, backend=backend)
        p = relaxed_sort_matrix(s, 0.3, backend=backend)
        return (y * torch.linspace(0, 1, 20, dtype=dtype, device=DEVICE)[:, None]).sum() + (p ** 2).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (loss_fn, compiled):
        s, v = scores.clone().requires_grad_(), x.clone().requires_grad_()
        value = fn(s, v)
        value.backward()
        grads.append((value.detach(), s.grad, v.grad))
    for eager, traced in zip(*grads, strict=True):
        torch.testing.assert_close(traced, eager)


def test_compile_module_inductor():
    torch._dynamo.reset()
    layer = NeuralSort(tau=0.5, backend="torch")
    scores = torch.randn(2, 16, device=DEVICE, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(scores), layer(scores))


def test_public_api():
    assert {"relaxed_sort_apply", "relaxed_sort_matrix", "NeuralSort"} <= set(triton_sort.__all__)


class _OpsSeen(TorchDispatchMode):
    """Records the names of the operations dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("transpose", [False, True])
def test_eager_calls_match_the_dispatched_ops(transpose):
    """Plain eager calls run the ops' implementations without dispatching them (ops.direct_call_allowed); under a
    dispatch mode the ops are dispatched whole. Same values and gradients, bit for bit, both ways."""
    gen = torch.Generator().manual_seed(8)
    scores = torch.randn(3, 17, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 17, 2, generator=gen, dtype=torch.float64)
    grad = torch.randn(3, 17, 2, generator=gen, dtype=torch.float64)
    results, recorder = [], _OpsSeen()
    for mode in (contextlib.nullcontext(), recorder):
        s, v, tau = scores.clone().requires_grad_(), x.clone().requires_grad_(), _tau(0.3, requires_grad=True)
        with mode:
            out = relaxed_sort_apply(s, v, tau, transpose=transpose, backend="torch")
            results.append((out, *torch.autograd.grad(out, (s, v, tau), grad)))
    assert {"triton_sort.apply.default", "triton_sort.apply_backward.default"} <= recorder.names
    for direct, dispatched in zip(*results, strict=True):
        torch.testing.assert_close(direct, dispatched, rtol=0, atol=0)
    # Without a mode, the profiler sees no op call: the implementation ran directly.
    with torch.profiler.profile() as profile:
        relaxed_sort_apply(scores.clone().requires_grad_(), x, 0.3, backend="torch").sum().backward()
    assert not [event for event in profile.events() if event.name.startswith("triton_sort::")]
