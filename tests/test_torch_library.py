"""The custom ops pass torch.library.opcheck and trace under torch.compile(fullgraph=True) for both backends."""

from __future__ import annotations

import pytest
import torch
from reference import DEVICE

import triton_sort
from triton_sort import NeuralSort, relaxed_sort_apply, relaxed_sort_matrix

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _dtype_for(backend: str) -> torch.dtype:
    return torch.float64 if backend == "torch" else torch.float32


@pytest.mark.parametrize(("hard", "banded"), [(False, True), (True, True), (False, False)])
def test_opcheck_apply(backend, hard, banded):
    dtype = _dtype_for(backend)
    scores = torch.randn(2, 9, dtype=dtype, device=DEVICE, requires_grad=True)
    x = torch.randn(2, 9, 3, dtype=dtype, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.triton_sort.apply.default, (scores, x, 0.5, True, hard, banded, backend),
                          test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize(("hard", "banded"), [(False, True), (True, True), (False, False)])
def test_opcheck_matrix(backend, hard, banded):
    scores = torch.randn(2, 9, dtype=_dtype_for(backend), device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.triton_sort.matrix.default, (scores, 0.5, False, hard, banded, backend),
                          test_utils=OPCHECK_TESTS)


def test_opcheck_backward_ops(backend):
    dtype = _dtype_for(backend)
    scores = torch.randn(2, 9, dtype=dtype, device=DEVICE)
    x = torch.randn(2, 9, 3, dtype=dtype, device=DEVICE)
    out, norm = torch.ops.triton_sort.apply(scores, x, 0.5, True, False, True, backend)
    torch.library.opcheck(torch.ops.triton_sort.apply_backward.default,
                          (scores, x, torch.randn_like(out), norm, 0.5, True, True, backend),
                          test_utils=("test_schema", "test_faketensor"))
    soft = torch.ops.triton_sort.matrix(scores, 0.5, True, False, True, backend)
    torch.library.opcheck(torch.ops.triton_sort.matrix_backward.default,
                          (scores, torch.randn_like(soft), soft, 0.5, True),
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


@pytest.mark.xfail(strict=True, reason="NeuralSort passes its tau buffer as a tensor; check_tau's .item() cannot be "
                   "traced until tau is a tensor input of the custom ops (core op change)")
def test_compile_module_inductor():
    torch._dynamo.reset()
    layer = NeuralSort(tau=0.5, backend="torch")
    scores = torch.randn(2, 16, device=DEVICE, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(scores), layer(scores))


def test_public_api():
    assert {"relaxed_sort_apply", "relaxed_sort_matrix", "NeuralSort"} <= set(triton_sort.__all__)
