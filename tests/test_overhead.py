"""Per-call overhead, held by counting (deterministic, so tests may hold it): device operations (kernel-launching
torch operations plus Triton launches) and host synchronisations of a forward + backward, and the PyTorch path's
one-shot and chunked evaluations agreeing where one hands over to the other."""

from __future__ import annotations

import pytest
import torch
from reference import use_torch_chunks

import triton_sort
from triton_sort import _backends, relaxed_sort_apply, relaxed_sort_matrix, relaxed_topk
from triton_sort.bench.counting import counting
from triton_sort.kernels.configs import SHORT_MAX_N

# Targets per forward + backward (issue 10): the Triton path's launches at any n; the PyTorch path's one-shot
# evaluation of small problems (the dense formula itself takes ~30-60 at these sizes).
TRITON_DEVICE_OPS = 12
TORCH_SMALL_DEVICE_OPS = 60
# ... and what the lean path (``_one_shot``: one-shot problems) takes, validation on or off (35 and 37 as measured,
# 37-38 from 2^14 entries, where the logits are clamped; padded lists 58-60: the dense formula takes 26 with its
# autograd).
TORCH_LEAN_DEVICE_OPS = 38
TORCH_LEAN_PADDED_DEVICE_OPS = 60
# ``relaxed_sort_matrix`` on the lean path (``_one_shot.lean_matrix``): 45 and 71-72 padded as measured (the
# chunked evaluation it replaced took 67-76 unpadded; the dense formula 23).
TORCH_LEAN_MATRIX_DEVICE_OPS = 48
TORCH_LEAN_MATRIX_PADDED_DEVICE_OPS = 75


def _counted_step(scores, x, backend, tau=1.0, validate=False, **options):
    """Counts of one forward + backward of relaxed_sort_apply alone (inputs and cotangent made outside)."""
    s, v, grad = scores.clone().requires_grad_(), x.clone().requires_grad_(), torch.ones_like(x)
    with triton_sort.validation(validate), counting() as counts:
        relaxed_sort_apply(s, v, tau, backend=backend, **options).backward(grad)
    return counts


@pytest.fixture
def kernels_not_run(monkeypatch):
    """Count the Triton path's launches without running them (the interpreter's own tensor copies would be
    counted as device operations): every launch becomes a no-op, so the outputs are garbage and only counted."""
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *args, **kwargs: None)


@pytest.mark.parametrize(("batch", "n", "d"), [(1, 8, 1), (256, 8, 1), (64, 100, 16), (3, SHORT_MAX_N, 130),
                                               (16, 1000, 1), (1, 65536, 1)])
def test_triton_path_launches_and_syncs(kernels_not_run, batch, n, d):
    scores, x = torch.randn(batch, n), torch.randn(batch, n, d)
    short = n <= SHORT_MAX_N  # one launch per pass; else prepare + forward, row pass + column pass + finish
    launches = 2 if short else 5
    counts = _counted_step(scores, x, "triton")
    assert counts.host_syncs == 0, counts
    assert counts.triton_launches == launches, counts
    assert counts.device_ops <= TRITON_DEVICE_OPS, counts
    tau = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    counts = _counted_step(scores, x, "triton", tau)
    assert counts.host_syncs == 0 and counts.device_ops <= TRITON_DEVICE_OPS + 3, counts  # + the tau gradient
    counts = _counted_step(scores, x, "triton", validate=True)  # one read-back for all the data checks
    assert counts.host_syncs == 1, counts
    # Padded lists: the sort key and the lengths, two operations more; the kernels take the lengths at run time.
    mask = torch.rand(batch, n) < 0.7
    counts = _counted_step(scores, x, "triton", mask=mask)
    assert counts.host_syncs == 0 and counts.triton_launches == launches, counts
    assert counts.device_ops <= TRITON_DEVICE_OPS + 2, counts
    # P_hat^T @ v: forward = prepare, row sums, column pass; backward = the forward kernel, then the backward (one
    # launch for short lists, three else).
    counts = _counted_step(scores, x, "triton", transpose=True)
    assert counts.host_syncs == 0 and counts.triton_launches == (5 if short else 7), counts
    assert counts.device_ops <= TRITON_DEVICE_OPS + 4, counts


@pytest.fixture
def gpu_block_sizes(monkeypatch):
    """The PyTorch path's block sizes as on a GPU: on CPU blocks are capped at cache-sized ones (more, smaller
    blocks: faster there, but more operations than a GPU would launch)."""
    monkeypatch.setattr(_backends, "CPU_BLOCK_ELEMENTS", _backends.DENSE_ELEMENTS)
    monkeypatch.setattr(_backends, "CPU_ONE_SHOT_ELEMENTS", _backends.ONE_SHOT_ELEMENTS)


@pytest.mark.parametrize(("batch", "n", "d"), [(1, 8, 1), (256, 8, 1), (64, 100, 1), (64, 100, 16), (16, 256, 1)])
def test_torch_small_problems_take_a_fixed_number_of_operations(gpu_block_sizes, batch, n, d):
    scores, x = torch.randn(batch, n), torch.randn(batch, n, d)
    assert _backends.TorchBackend.saves_weights(batch, n, "cpu") and _backends.TorchBackend().lean(batch, n, "cpu")
    for options in ({}, {"transpose": True}, {"descending": False}):
        _counted_step(scores, x, "torch", **options)  # the cached constants of (n, direction) made once
        counts = _counted_step(scores, x, "torch", **options)
        assert counts.host_syncs == 0 and counts.device_ops <= TORCH_LEAN_DEVICE_OPS, (options, counts)
        counts = _counted_step(scores, x, "torch", validate=True, **options)  # the data check: one sync
        assert counts.host_syncs == 1 and counts.device_ops <= TORCH_LEAN_DEVICE_OPS, (options, counts)
    # Padded lists (their sort key, lengths, masked weights, zeroed padding) cost a few more operations, still a
    # fixed number and no synchronisation.
    mask = torch.rand(batch, n) < 0.7
    _counted_step(scores, x, "torch", mask=mask)
    counts = _counted_step(scores, x, "torch", mask=mask)
    assert counts.host_syncs == 0 and counts.device_ops <= TORCH_LEAN_PADDED_DEVICE_OPS, counts


@pytest.mark.parametrize(("batch", "n"), [(1024, 100), (16, 1000)])
def test_torch_grid_sizes_up_to_2_24_entries_take_one_shot_on_a_gpu(gpu_block_sizes, batch, n):
    """The issue's grid sizes beyond 2^22 entries (batch chunks or row blocks below it): one shot on a GPU, the
    same fixed number of operations and no synchronisation."""
    assert _backends.TorchBackend().lean(batch, n, "cuda") and not _backends.TorchBackend().lean(4 * batch, n, "cuda")
    scores, x = torch.randn(batch, n), torch.randn(batch, n, 1)
    _counted_step(scores, x, "torch")
    counts = _counted_step(scores, x, "torch")
    assert counts.host_syncs == 0 and counts.device_ops <= TORCH_LEAN_DEVICE_OPS, counts


@pytest.mark.parametrize(("banded", "masked"), [(True, False), (False, False), (True, True)])
def test_torch_one_shot_and_chunked_paths_agree(monkeypatch, banded, masked):
    """The same inputs through both sides of DENSE_ELEMENTS: values, both gradients, the matrix and top-k."""
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(3, 257, generator=gen, dtype=torch.float64) * 3
    scores[1, ::7] = scores[1, 3]  # ties
    x = torch.randn(3, 257, 4, generator=gen, dtype=torch.float64)
    grad = torch.randn(3, 257, 4, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 257, generator=gen) < 0.7 if masked else None
    results = []
    # One shot (the lean path), then chunked (weights recomputed in the backward, tie counts).
    for limit in (_backends.DENSE_ELEMENTS, 0):
        if limit == 0:
            use_torch_chunks(monkeypatch)
        assert _backends.TorchBackend.dense(3, 257, "cpu") == (limit > 0)
        assert _backends.TorchBackend().lean(3, 257, "cpu") == (limit > 0)
        assert _backends.TorchBackend().has_counts(3, 257, "cpu", masked) == (limit == 0)
        s, v = scores.clone().requires_grad_(), x.clone().requires_grad_()
        tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        out = relaxed_sort_apply(s, v, tau, banded=banded, mask=mask, backend="torch")
        out_t = relaxed_sort_apply(s, v, tau, banded=banded, descending=False, transpose=True, mask=mask,
                                   backend="torch")
        results.append((out, out_t, *torch.autograd.grad(out, (s, v, tau), grad),
                        *torch.autograd.grad(out_t, (s, v, tau), grad),
                        relaxed_sort_matrix(scores, 0.3, banded=banded, backend="torch"),
                        relaxed_topk(scores, 5, 0.3, banded=banded, backend="torch")))
    # Not bit for bit: the one-shot logits come from per-row and per-column terms (rounding ~1e-16 |W| / tau, as
    # W's own), and banded, the one-shot apply still evaluates every column (the band's columns weigh < e^-30 of
    # each row); the scores gradient scales both by up to n / tau.
    tolerance = 1e-10
    for lean, chunked in zip(*results, strict=True):
        torch.testing.assert_close(lean, chunked, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transpose", [False, True])
def test_saved_one_shot_weights_serve_every_backward(dtype, transpose):
    """The one-shot forward saves its weights for the backward: a second backward (retain_graph) must find them
    untouched (that they equal the chunked path's recomputed ones: test_torch_one_shot_and_chunked_paths_agree)."""
    scores = torch.randn(4, 30, dtype=dtype, requires_grad=True)
    x = torch.randn(4, 30, 3, dtype=dtype, requires_grad=True)
    grad = torch.randn(4, 30, 3, dtype=dtype)
    out = relaxed_sort_apply(scores, x, 0.4, transpose=transpose, backend="torch")
    first = torch.autograd.grad(out, (scores, x), grad, retain_graph=True)
    second = torch.autograd.grad(out, (scores, x), grad)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_batch_chunks_of_the_dense_evaluation_agree_with_one_shot(monkeypatch, masked):
    """Short lists at large batch sizes run densely in batch chunks (weights recomputed in the backward): the same
    results as one chunk, for the values, both gradients, tau's, the transposed product and the matrix."""
    gen = torch.Generator().manual_seed(6)
    scores = torch.randn(7, 20, generator=gen, dtype=torch.float64)
    x = torch.randn(7, 20, 3, generator=gen, dtype=torch.float64)
    mask = (torch.rand(7, 20, generator=gen) < 0.7) if masked else None
    results = []
    for limit in (_backends.DENSE_ELEMENTS, 3 * 20 * 20):  # one chunk; chunks of 3 lists (7 = 3 + 3 + 1)
        use_torch_chunks(monkeypatch, limit)
        assert _backends.TorchBackend.dense(7, 20, "cpu")
        terms = _backends.sorted_terms(scores, torch.tensor(0.3, dtype=torch.float64), windows=False)
        assert len(_backends.TorchBackend()._blocks(terms)) == (1 if limit > 7 * 400 else 3)
        s, v = scores.clone().requires_grad_(), x.clone().requires_grad_()
        tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        out = relaxed_sort_apply(s, v, tau, mask=mask, backend="torch")
        out_t = relaxed_sort_apply(s, v, tau, mask=mask, transpose=True, backend="torch")
        results.append((out, out_t, *torch.autograd.grad((out + out_t).sum(), (s, v, tau)),
                        relaxed_sort_matrix(scores, 0.3, mask=mask, backend="torch")))
    for one, chunked in zip(*results, strict=True):
        torch.testing.assert_close(one, chunked, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("batch", "n"), [(1, 8), (256, 8), (64, 100)])
def test_torch_lean_matrix_operations_and_syncs(batch, n):
    scores, grad = torch.randn(batch, n), torch.ones(batch, n, n)
    mask = torch.rand(batch, n) < 0.7
    cases = (({}, TORCH_LEAN_MATRIX_DEVICE_OPS), ({"mask": mask}, TORCH_LEAN_MATRIX_PADDED_DEVICE_OPS))
    for validate in (True, False):
        for options, bound in cases:
            for _ in range(2):  # the second call: constants cached, as in a training loop
                s = scores.clone().requires_grad_()
                with triton_sort.validation(validate), counting() as counts:
                    relaxed_sort_matrix(s, 1.0, backend="torch", **options).backward(grad)
            assert counts.host_syncs == int(validate) and counts.device_ops <= bound, (validate, options, counts)
