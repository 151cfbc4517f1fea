"""NeuralNDCG and NDCG (triton_sort.ranking) against a float64 dense implementation of the paper/allRank definition,
against the exact metric at a small tau, and their conventions, gradients, memory and argument errors."""

from __future__ import annotations

import itertools
import math
import resource

import pytest
import torch

import triton_sort
from triton_sort import _backends, ndcg, neural_ndcg
from triton_sort import ranking as ranking_module

# Tolerances, stated once.
REF_TOL = 1e-9      # float64 neural_ndcg (either evaluation, either form) against the dense float64 reference
FORMS_TOL = 1e-10   # the two forms (d^T M g either way) and the two Sinkhorn evaluations against each other
FP32_TOL = 2e-6     # float32 neural_ndcg against float64 (absolute, NDCG is O(1))
HARD_TOL = 1e-9     # neural_ndcg at tau = 1e-4 against ndcg on lists whose score gaps are >= 0.01 (e^-100)
METRIC_TOL = 1e-12  # ndcg against hand or brute-force values

SMALL_TAU = 1e-4


# ------------------------------------------------------------------------------------ float64 dense reference
def reference_list(s, rel, tau, k, transposed, iters, tol, powered):
    """One list of real items, in float64: P_hat by the paper's formula (explicit |s_j - s_k|), allRank's
    sinkhorn_scaling (columns, then rows, sums clamped to 1e-10; stop when all sums are within tol of 1), the
    relaxed DCG@k of either form and the ideal DCG@k."""
    s, rel = s.to(torch.float64), rel.to(torch.float64)
    n = s.numel()
    if n == 0:
        return 0.0
    i = torch.arange(1, n + 1, dtype=torch.float64)
    a_s = (s[:, None] - s[None, :]).abs()
    p = torch.softmax(((n + 1 - 2 * i)[:, None] * s[None, :] - a_s.sum(1)[None, :]) / tau, dim=-1)
    for _ in range(iters):
        p = p / p.sum(dim=0, keepdim=True).clamp(min=1e-10)
        p = p / p.sum(dim=1, keepdim=True).clamp(min=1e-10)
        if (p.sum(1) - 1).abs().max() < tol and (p.sum(0) - 1).abs().max() < tol:
            break
    g = 2.0**rel - 1 if powered else rel
    d = 1 / torch.log2(torch.arange(n, dtype=torch.float64) + 2)
    if k is not None:
        d[k:] = 0
    dcg = float((p.T @ d * g).sum()) if transposed else float(((p @ g) * d).sum())
    idcg = float((torch.sort(g, descending=True).values * d).sum())
    return dcg / idcg if idcg > 0 else 0.0


def reference(scores, relevance, mask, tau, k=None, transposed=False, iters=0, tol=1e-6, powered=True):
    """Per-list values, ``scores.shape[:-1]``: each list reduced to its real items, then ``reference_list``."""
    n = scores.shape[-1]
    s, r = scores.reshape(-1, n), relevance.reshape(-1, n)
    m = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.reshape(-1, n)
    out = [reference_list(s[b][m[b]], r[b][m[b]], tau, k, transposed, iters, tol, powered) for b in range(len(s))]
    return torch.tensor(out, dtype=torch.float64).reshape(scores.shape[:-1])


def padded_batch(lists=7, n=9, dtype=torch.float64, seed=0):
    """Random scores and graded relevance (0..4) with padding at random positions; list 0 has no real item, list 1
    one, list 2 all n, list 3 real items that are all irrelevant (IDCG = 0)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(lists, n, generator=gen, dtype=torch.float64).to(dtype)
    relevance = torch.randint(0, 5, (lists, n), generator=gen)
    mask = torch.rand(lists, n, generator=gen) < 0.7
    mask[0] = False
    mask[1] = False
    mask[1, n // 2] = True
    relevance[1, n // 2] = 3
    mask[2] = True
    relevance[3] = 0
    relevance[~mask] = -1  # allRank's padding label: must be ignored
    return scores, relevance, mask


@pytest.fixture(params=["dense", "streaming"])
def evaluation(request, monkeypatch):
    """Sinkhorn on materialised P_hat or streamed through relaxed_sort_apply."""
    limit = 2**40 if request.param == "dense" else 0
    monkeypatch.setattr(ranking_module, "DENSE_SINKHORN_ENTRIES", limit)
    return request.param


# -------------------------------------------------------------------------------------------- vs the reference
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("iters", [0, 50])
@pytest.mark.parametrize("k", [None, 3])
def test_matches_dense_reference(evaluation, transposed, iters, k):
    scores, relevance, mask = padded_batch()
    for tau in (0.3, 2.0):
        got = neural_ndcg(scores, relevance, tau, k=k, mask=mask, transposed=transposed, sinkhorn_iters=iters,
                          reduction="none", backend="torch")
        want = reference(scores, relevance, mask, tau, k, transposed, iters)
        assert got.dtype == torch.float64 and got.shape == (7,)
        torch.testing.assert_close(got, want, atol=REF_TOL, rtol=0)
        assert got[0] == 0 and got[3] == 0 and got[1] == 1  # no real item, IDCG = 0, one relevant item


@pytest.mark.parametrize("powered", [True, False])
def test_linear_gains_and_tolerances(evaluation, powered):
    scores, relevance, mask = padded_batch(seed=1)
    rel = relevance.double() / 3  # fractional labels
    for iters, tol in ((3, 1e-6), (50, 1e-3), (50, 1e-12)):
        got = neural_ndcg(scores, rel, 0.5, mask=mask, sinkhorn_iters=iters, sinkhorn_tol=tol,
                          powered_relevance=powered, reduction="none", backend="torch")
        want = reference(scores, rel, mask, 0.5, None, False, iters, tol, powered)
        torch.testing.assert_close(got, want, atol=REF_TOL, rtol=0)


def test_forms_and_evaluations_agree(monkeypatch):
    scores, relevance, mask = padded_batch(lists=5, n=12, seed=2)
    results = []
    for limit, transposed in itertools.product((0, 2**40), (False, True)):
        monkeypatch.setattr(ranking_module, "DENSE_SINKHORN_ENTRIES", limit)
        results.append(neural_ndcg(scores, relevance, 0.2, k=5, mask=mask, transposed=transposed,
                                   reduction="none", backend="torch"))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], atol=FORMS_TOL, rtol=0)


def test_each_list_stops_at_its_own_tolerance(evaluation):
    scores, relevance, mask = padded_batch(seed=10)  # at tau = 1 its lists stop after 1, 29, 39 or 50 iterations
    batch = neural_ndcg(scores, relevance, 1.0, mask=mask, reduction="none", backend="torch")
    alone = torch.stack([neural_ndcg(scores[b], relevance[b], 1.0, mask=mask[b], reduction="none", backend="torch")
                         for b in range(len(scores))])
    torch.testing.assert_close(batch, alone, atol=FORMS_TOL, rtol=0)


def test_compiles_without_graph_breaks():
    scores, relevance, mask = padded_batch(lists=5, n=6, seed=11)
    tau = torch.tensor(0.5, dtype=torch.float64)
    for transposed, iters in ((False, 0), (True, 3)):
        def fn(s, t, transposed=transposed, iters=iters):
            return neural_ndcg(s, relevance, t, k=4, mask=mask, transposed=transposed, sinkhorn_iters=iters,
                               reduction="none", backend="torch")

        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(scores, tau), fn(scores, tau), atol=FORMS_TOL, rtol=0)


@pytest.mark.parametrize("transposed", [False, True])
def test_triton_backend_matches_torch(evaluation, transposed):
    """The kernels (Triton's interpreter on CPU) give the PyTorch path's values and gradients, fp32."""
    scores, relevance, mask = padded_batch(lists=4, n=6, dtype=torch.float32, seed=14)
    results = []
    for backend in ("torch", "triton"):
        s = scores.clone().requires_grad_()
        value = neural_ndcg(s, relevance, 0.5, mask=mask, transposed=transposed, sinkhorn_iters=3, backend=backend)
        (grad,) = torch.autograd.grad(value, s)
        results.append((value, grad))
    torch.testing.assert_close(results[1][0], results[0][0], atol=FP32_TOL, rtol=0)
    torch.testing.assert_close(results[1][1], results[0][1], atol=10 * FP32_TOL, rtol=0)


def test_without_mask_and_batch_shapes():
    scores, relevance, _ = padded_batch(lists=6, n=8, seed=3)
    relevance = relevance.clamp(min=0)
    flat = neural_ndcg(scores, relevance, 0.5, reduction="none", backend="torch")
    torch.testing.assert_close(flat, reference(scores, relevance, None, 0.5, iters=50), atol=REF_TOL, rtol=0)
    shaped = neural_ndcg(scores.reshape(2, 3, 8), relevance.reshape(2, 3, 8), 0.5, reduction="none",
                         backend="torch")
    assert shaped.shape == (2, 3)
    torch.testing.assert_close(shaped.reshape(6), flat, atol=FORMS_TOL, rtol=0)
    one = neural_ndcg(scores[4], relevance[4], 0.5, reduction="none", backend="torch")
    assert one.shape == ()
    torch.testing.assert_close(one, flat[4], atol=FORMS_TOL, rtol=0)
    assert ndcg(scores.reshape(2, 3, 8), relevance.reshape(2, 3, 8), reduction="none").shape == (2, 3)


def test_fp32_matches_float64():
    scores, relevance, mask = padded_batch(lists=6, n=16, seed=4)
    for transposed, iters in itertools.product((False, True), (0, 50)):
        want = neural_ndcg(scores, relevance, 0.3, mask=mask, transposed=transposed, sinkhorn_iters=iters,
                           reduction="none", backend="torch")
        got = neural_ndcg(scores.float(), relevance, 0.3, mask=mask, transposed=transposed, sinkhorn_iters=iters,
                          reduction="none", backend="torch")
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=FP32_TOL, rtol=0)


# ------------------------------------------------------------------------------------ vs the exact metric
HAND_LISTS = [
    # (scores, relevance, mask): padding anywhere, a real score of -1e30, ties, one real item
    ([3.0, -1.0, 0.5, 2.0, 7.0], [2, 0, 3, 1, -1], [True, True, True, True, False]),
    ([0.1, -1e30, 0.2, 5.0, 0.3], [1, 3, 0, -1, 2], [True, True, True, False, True]),
    ([1.0, 9.0, 1.0, 2.0, 1.0], [1, -1, 0, 2, 3], [True, False, True, True, True]),    # a three-way tie
    ([4.0, 0.0, 0.0, 0.0, 0.0], [5, -1, -1, -1, -1], [True, False, False, False, False]),
    ([2.0, 1.0, 0.0, -1.0, -2.0], [0, 1, 2, 3, 4], [True] * 5),                       # reversed order
    ([5.0, 4.0, 3.0, 2.0, 1.0], [0, 0, 0, 0, 0], [True] * 5),                         # IDCG = 0
]


def hand_batch():
    scores = torch.tensor([row[0] for row in HAND_LISTS], dtype=torch.float64)
    relevance = torch.tensor([row[1] for row in HAND_LISTS])
    mask = torch.tensor([row[2] for row in HAND_LISTS])
    return scores, relevance, mask


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("iters", [0, 50])
@pytest.mark.parametrize("k", [None, 1, 2, 10])
def test_small_tau_is_ndcg(transposed, iters, k):
    scores, relevance, mask = hand_batch()
    exact = ndcg(scores, relevance, k, mask=mask, reduction="none")
    relaxed = neural_ndcg(scores, relevance, SMALL_TAU, k=k, mask=mask, transposed=transposed,
                          sinkhorn_iters=iters, reduction="none", backend="torch")
    torch.testing.assert_close(relaxed, exact, atol=HARD_TOL, rtol=0)
    assert exact[3] == 1 and exact[5] == 0


def dcg(gains, k):
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains) if k is None or i < k)


def test_ndcg_by_hand():
    scores, relevance, mask = hand_batch()
    got = ndcg(scores, relevance, mask=mask, reduction="none")
    # list 0: order 0, 3, 2, 1 -> relevance 2, 1, 3, 0; ideal 3, 2, 1, 0
    want0 = dcg([3, 1, 7, 0], None) / dcg([7, 3, 1, 0], None)
    # list 2: order 3, then the tie {0, 2, 4} (gains 1, 0, 7, mean 8/3 at ranks 1..3)
    want2 = (3 + 8 / 3 * sum(1 / math.log2(i + 2) for i in (1, 2, 3))) / dcg([7, 3, 1, 0], None)
    assert abs(float(got[0]) - want0) < METRIC_TOL
    assert abs(float(got[2]) - want2) < METRIC_TOL
    at2 = ndcg(scores, relevance, 2, mask=mask, powered_relevance=False, reduction="none")
    assert abs(float(at2[4]) - dcg([0, 1], None) / dcg([4, 3], None)) < METRIC_TOL
    assert got.dtype == torch.float64 and not got.requires_grad


def test_ndcg_ties_are_the_mean_over_tie_orders():
    gen = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 3, (6,), generator=gen).double()  # many ties
    relevance = torch.randint(0, 4, (6,), generator=gen)
    for k in (None, 2, 4):
        total, count = 0.0, 0
        for perm in itertools.permutations(range(6)):
            # break ties by the permutation (a random order of tied items), then the plain NDCG
            broken = scores + 1e-3 * torch.tensor(perm, dtype=torch.float64) / 6
            total += float(ndcg(broken, relevance, k))
            count += 1
        assert abs(float(ndcg(scores, relevance, k)) - total / count) < METRIC_TOL
        shuffle = torch.randperm(6, generator=gen)
        assert abs(float(ndcg(scores[shuffle], relevance[shuffle], k)) - float(ndcg(scores, relevance, k))) < 1e-15


# ------------------------------------------------------------------------------ conventions and reductions
def test_reductions_and_idcg_zero():
    scores, relevance, mask = padded_batch(seed=6)
    for fn in (lambda **kw: neural_ndcg(scores, relevance, 0.5, mask=mask, backend="torch", **kw),
               lambda **kw: ndcg(scores, relevance, mask=mask, **kw)):
        per_list = fn(reduction="none")
        valid = torch.tensor([False, True, True, False, True, True, True])
        assert torch.all(per_list[~valid] == 0)
        torch.testing.assert_close(fn(reduction="sum"), per_list.sum(), atol=FORMS_TOL, rtol=0)
        torch.testing.assert_close(fn(reduction="mean"), per_list[valid].mean(), atol=FORMS_TOL, rtol=0)


def test_no_relevant_list_at_all():
    scores = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    relevance = torch.zeros(3, 5)
    for reduction in ("mean", "sum"):
        value = neural_ndcg(scores, relevance, 1.0, reduction=reduction, backend="torch")
        assert value == 0
        (grad,) = torch.autograd.grad(value, scores)
        assert torch.all(grad == 0)
        assert ndcg(scores, relevance, reduction=reduction) == 0
    empty = torch.zeros(2, 0, dtype=torch.float64)
    assert neural_ndcg(empty, empty, 1.0, reduction="none").shape == (2,)
    assert neural_ndcg(empty, empty, 1.0) == 0 and ndcg(empty, empty) == 0


def test_padded_items_get_no_gradient(evaluation):
    scores, relevance, mask = padded_batch(seed=7)
    scores = scores.clone().requires_grad_()
    for transposed, iters in itertools.product((False, True), (0, 50)):
        value = neural_ndcg(scores, relevance, 0.5, mask=mask, transposed=transposed, sinkhorn_iters=iters,
                            backend="torch")
        (grad,) = torch.autograd.grad(value, scores)
        assert torch.all(grad[~mask] == 0) and torch.isfinite(grad).all() and grad[mask].abs().sum() > 0


# ------------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("iters", [0, 4])
def test_gradcheck(evaluation, transposed, iters):
    gen = torch.Generator().manual_seed(8)
    scores = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    relevance = torch.randint(0, 4, (3, 5), generator=gen)
    relevance[:, 0] = 2
    mask = torch.tensor([[True] * 5, [True, False, True, True, False], [False, True, True, True, True]])

    def fn(s, t):
        # a tolerance that is never met: a fixed number of iterations, so the function is smooth
        return neural_ndcg(s, relevance, t, k=3, mask=mask, transposed=transposed, sinkhorn_iters=iters,
                           sinkhorn_tol=1e-300, reduction="none", backend="torch")

    assert torch.autograd.gradcheck(fn, (scores, tau))


# --------------------------------------------------------------------------------------------------- memory
def largest_allocation(fn) -> int:
    """The largest number of bytes any single operator allocated on the CPU while ``fn`` ran (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(max(event.cpu_memory_usage, 0) for event in prof.events())


def test_memory_probe_sees_a_dense_matrix():
    n = 3000
    assert largest_allocation(lambda: torch.ones(n, 1) @ torch.ones(1, n)) >= 4 * n * n


@pytest.mark.parametrize(("transposed", "iters"), [(False, 0), (True, 0), (False, 1), (True, 1)])
def test_no_n_by_n_matrix(transposed, iters):
    """Streaming, with or without Sinkhorn: no operator allocates anything near n x n. (n = 3000 is past the PyTorch
    path's one-shot size on CPU, 768k entries, below which the backend itself evaluates a dense block by design.)"""
    n = 3000
    assert not _backends.TorchBackend.saves_weights(1, n, "cpu")
    gen = torch.Generator().manual_seed(9)
    scores = torch.randn(1, n, generator=gen, requires_grad=True)
    relevance = torch.randint(0, 3, (1, n), generator=gen)
    mask = torch.rand(1, n, generator=gen) < 0.9

    def step():
        neural_ndcg(scores, relevance, 0.05, mask=mask, transposed=transposed, sinkhorn_iters=iters,
                    sinkhorn_tol=1e-300, backend="torch").backward()

    assert largest_allocation(step) < 4 * n * n / 16  # one fp32 n x n is 34 MiB; the chunks are at most 1 MiB
    assert torch.isfinite(scores.grad).all() and torch.all(scores.grad[~mask] == 0)


def test_a_list_of_1e5_items():
    """sinkhorn_iters=0 at n = 1e5 (an n x n fp32 matrix would be 40 GB, more than the machine has: allocating one
    fails), and the peak resident memory grows by far less than that."""
    n = 100_000
    gen = torch.Generator().manual_seed(12)
    scores = torch.randn(1, n, generator=gen, requires_grad=True)
    relevance = torch.randint(0, 3, (1, n), generator=gen)
    mask = torch.rand(1, n, generator=gen) < 0.9
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    value = neural_ndcg(scores, relevance, 0.01, mask=mask, transposed=True, sinkhorn_iters=0, backend="torch")
    value.backward()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 1024**2, f"peak resident memory grew by {grown / 1024:.0f} MiB"
    assert 0 < float(value.detach()) <= 1
    assert torch.isfinite(scores.grad).all() and torch.all(scores.grad[~mask] == 0)


# --------------------------------------------------------------------------------------------- bad arguments
def _args():
    scores = torch.randn(2, 4)
    return scores, torch.randint(0, 3, (2, 4)), torch.ones(2, 4, dtype=torch.bool)


BAD = [
    (dict(scores=[1.0, 2.0]), TypeError, "scores"),
    (dict(scores=torch.arange(8).reshape(2, 4)), TypeError, "scores"),
    (dict(scores=torch.tensor(1.0)), ValueError, "scores"),
    (dict(relevance=torch.ones(2, 3)), ValueError, "relevance"),
    (dict(relevance=torch.ones(2, 4, dtype=torch.bool)), TypeError, "relevance"),
    (dict(relevance="x"), TypeError, "relevance"),
    (dict(relevance=torch.tensor([[1.0, -1.0, 0, 0], [0, 0, 0, 0]])), ValueError, "relevance"),
    (dict(relevance=torch.tensor([[1.0, math.nan, 0, 0], [0, 0, 0, 0]])), ValueError, "relevance"),
    (dict(mask=torch.ones(2, 4)), TypeError, "mask"),
    (dict(mask=torch.ones(4, dtype=torch.bool)), ValueError, "mask"),
    (dict(k=0), ValueError, "k"),
    (dict(k=2.0), TypeError, "k"),
    (dict(k=True), TypeError, "k"),
    (dict(reduction="max"), ValueError, "reduction"),
    (dict(powered_relevance=1), TypeError, "powered_relevance"),
]
BAD_NEURAL = [
    *BAD,
    (dict(tau=0.0), ValueError, "tau"),
    (dict(tau="1"), TypeError, "tau"),
    (dict(sinkhorn_iters=-1), ValueError, "sinkhorn_iters"),
    (dict(sinkhorn_iters=1.5), TypeError, "sinkhorn_iters"),
    (dict(sinkhorn_tol=0.0), ValueError, "sinkhorn_tol"),
    (dict(sinkhorn_tol=math.inf), ValueError, "sinkhorn_tol"),
    (dict(transposed=None), TypeError, "transposed"),
    (dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize(("kwargs", "error", "name"), BAD_NEURAL)
def test_neural_ndcg_bad_arguments(kwargs, error, name):
    scores, relevance, mask = _args()
    call = dict(scores=scores, relevance=relevance, mask=mask, tau=1.0, backend="torch")
    call.update(kwargs)
    with pytest.raises(error, match=name):
        neural_ndcg(call.pop("scores"), call.pop("relevance"), call.pop("tau"), **call)


@pytest.mark.parametrize(("kwargs", "error", "name"), BAD)
def test_ndcg_bad_arguments(kwargs, error, name):
    scores, relevance, mask = _args()
    call = dict(scores=scores, relevance=relevance, mask=mask, k=None)
    call.update(kwargs)
    with pytest.raises(error, match=name):
        ndcg(call.pop("scores"), call.pop("relevance"), call.pop("k"), **call)


def test_padded_relevance_and_scores_are_ignored(evaluation):
    scores, relevance, mask = padded_batch(seed=13)
    relevance = relevance.double()
    want = neural_ndcg(scores, relevance, 1.0, mask=mask, reduction="none", backend="torch")
    relevance[~mask] = math.nan
    scores = torch.where(mask, scores, torch.tensor(math.nan, dtype=torch.float64)).requires_grad_()
    for transposed, iters in itertools.product((False, True), (0, 50)):
        got = neural_ndcg(scores, relevance, 1.0, mask=mask, transposed=transposed, sinkhorn_iters=iters,
                          reduction="none", backend="torch")
        if iters == 50:
            torch.testing.assert_close(got, want, atol=FORMS_TOL, rtol=0)
        (grad,) = torch.autograd.grad(got.sum(), scores)
        assert torch.isfinite(grad).all() and torch.all(grad[~mask] == 0)
    assert torch.isfinite(ndcg(scores, relevance, mask=mask, reduction="none")).all()


def test_exported():
    assert triton_sort.neural_ndcg is neural_ndcg and triton_sort.ndcg is ndcg
    assert {"neural_ndcg", "ndcg"} <= set(triton_sort.__all__)
