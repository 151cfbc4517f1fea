"""Issue 12's smaller contract items: the modules check their arguments in ``__init__`` and keep ``tau`` as state
(``state_dict``, in-place annealing, ``learn_tau``); kNN distances are float32 for half-precision embeddings;
``relaxed_quantile`` and the Plackett-Luce methods trace with ``torch.compile(fullgraph=True)``.

Tolerances: eager and compiled results of the same ops are compared with ``assert_close``'s float64 defaults
(rtol 1e-7); the kNN loss of fp16 embeddings is within 1e-5 of the float64 dense formula.
"""

from __future__ import annotations

import pytest
import torch
from reference import dense_reference
from torch import nn

from triton_sort import (
    DifferentiableKNN,
    NeuralSort,
    PlackettLuce,
    relaxed_quantile,
    relaxed_sort_apply,
    relaxed_sort_matrix,
)

F64 = torch.float64
# Today check_tau turns a tensor tau into a float (.item()): no gradient, and nothing a compiled graph can trace.
MODULES = {"NeuralSort": NeuralSort, "DifferentiableKNN": lambda **kwargs: DifferentiableKNN(3, **kwargs)}


# ------------------------------------------------------------------------------------ modules: __init__ checks
@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(stochastic=1), TypeError, "stochastic must be a bool, got int"),
    (dict(learn_tau="yes"), TypeError, "learn_tau must be a bool, got str"),
    (dict(backend="bogus"), ValueError, "backend must be 'auto', 'torch' or 'triton', got 'bogus'"),
    (dict(backend=None), ValueError, "backend must be 'auto', 'torch' or 'triton', got None"),
    (dict(tau=0.0), ValueError, "tau must be finite and > 0 with a finite inverse, got 0.0"),
    (dict(tau=-0.5), ValueError, "tau must be finite and > 0 with a finite inverse, got -0.5"),
    (dict(tau=float("nan")), ValueError, "tau must be finite and > 0 with a finite inverse, got nan"),
    (dict(tau=float("inf")), ValueError, "tau must be finite and > 0 with a finite inverse, got inf"),
    (dict(tau=torch.tensor(-1.0)), ValueError, "tau must be finite and > 0"),
    (dict(tau=nn.Parameter(torch.tensor(0.0))), ValueError, "tau must be finite and > 0"),
    (dict(tau="1"), TypeError, "tau must be a real number, got str"),
    (dict(tau=torch.ones(2)), TypeError, "one-element floating-point tensor"),
])
def test_modules_check_their_arguments_in_init(module, kwargs, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        MODULES[module](**kwargs)


@pytest.mark.parametrize("name", ["descending", "hard"])
def test_neuralsort_flags_must_be_bools(name):
    with pytest.raises(TypeError, match=f"{name} must be a bool, got int"):
        NeuralSort(**{name: 1})


def test_knn_k_is_checked_in_init():
    with pytest.raises(TypeError, match="k must be an int, got str"):
        DifferentiableKNN("3")
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        DifferentiableKNN(0)


# --------------------------------------------------------------------------------------- modules: tau as state
@pytest.mark.parametrize("module", MODULES)
def test_tau_is_a_float64_buffer_that_round_trips_through_state_dict(module):
    make = MODULES[module]
    layer = make(tau=0.25)
    assert list(layer.parameters()) == [] and not layer.learn_tau
    buffers = dict(layer.named_buffers())
    assert set(buffers) == {"tau"} and buffers["tau"].dtype == F64 and buffers["tau"].shape == ()
    state = layer.state_dict()
    assert set(state) == {"tau"} and float(state["tau"]) == 0.25
    restored = make(tau=1.0)
    restored.load_state_dict(state)
    assert float(restored.tau) == 0.25
    # The same "tau" key whether learned or not: checkpoints load across learn_tau.
    learned = make(tau=1.0, learn_tau=True)
    learned.load_state_dict(state)
    assert isinstance(learned.tau, nn.Parameter) and float(learned.tau.detach()) == 0.25
    layer.load_state_dict(make(tau=2.0, learn_tau=True).state_dict())
    assert float(layer.tau) == 2.0 and "tau" in dict(layer.named_buffers())


def test_restored_tau_is_the_one_forward_uses():
    scores, x = torch.randn(2, 9, dtype=F64), torch.randn(2, 9, 3, dtype=F64)
    restored = NeuralSort(tau=1.0, backend="torch")
    restored.load_state_dict(NeuralSort(tau=0.3).state_dict())
    torch.testing.assert_close(restored(scores, x), relaxed_sort_apply(scores, x, 0.3))
    torch.testing.assert_close(restored(scores), dense_reference(scores, 0.3))


def test_assigning_tau_updates_the_stored_tensor_in_place():
    scores = torch.randn(3, 7, dtype=F64)
    layer = NeuralSort(tau=0.5, backend="torch")
    stored = layer.tau
    layer.tau = 0.125  # an annealing schedule's step
    assert layer.tau is stored and float(stored) == 0.125 and stored.dtype == F64
    torch.testing.assert_close(layer(scores), relaxed_sort_matrix(scores, 0.125))
    layer.tau = torch.tensor(0.25, dtype=torch.float32)
    assert layer.tau is stored and float(stored) == 0.25 and stored.dtype == F64
    for bad, error in ((0.0, ValueError), (float("nan"), ValueError), ("hot", TypeError)):
        with pytest.raises(error, match="tau"):
            layer.tau = bad
    assert float(layer.tau) == 0.25  # a rejected value leaves tau as it was
    learned = NeuralSort(tau=0.5, learn_tau=True)
    parameter = learned.tau
    learned.tau = 0.3
    assert learned.tau is parameter and parameter.requires_grad and float(parameter.detach()) == pytest.approx(0.3)


def test_a_parameter_tau_is_the_modules_learned_parameter():
    parameter = nn.Parameter(torch.tensor(0.4, dtype=F64))
    layer = NeuralSort(parameter)
    assert layer.tau is parameter and list(layer.parameters()) == [parameter] and layer.learn_tau
    assert "tau=0.4, learn_tau=True" in repr(layer)
    # Assigning a parameter later makes it the module's tau (a buffer no more).
    other = nn.Parameter(torch.tensor(0.7))
    fixed = NeuralSort(0.5)
    fixed.tau = other
    assert fixed.tau is other and list(fixed.parameters()) == [other] and dict(fixed.named_buffers()) == {}
    with pytest.raises(ValueError, match="tau"):
        fixed.tau = nn.Parameter(torch.tensor(-1.0))
    learned = NeuralSort(0.4, learn_tau=True)
    (tau,) = learned.parameters()
    assert tau.dtype == F64 and tau.requires_grad and float(tau.detach()) == 0.4
    assert "tau=0.4" in repr(NeuralSort(0.4)) and "learn_tau" not in repr(NeuralSort(0.4))



def test_learned_tau_gets_its_gradient():
    scores, x = torch.randn(2, 6, dtype=F64), torch.randn(2, 6, 3, dtype=F64)
    weights = torch.randn(2, 6, 3, dtype=F64)
    layer = NeuralSort(0.7, learn_tau=True, backend="torch")
    (layer(scores, x) * weights).sum().backward()

    def loss(tau: float) -> float:
        return float((relaxed_sort_apply(scores, x, tau) * weights).sum())

    step = 1e-6
    finite_difference = (loss(0.7 + step) - loss(0.7 - step)) / (2 * step)
    assert layer.tau.grad is not None
    torch.testing.assert_close(layer.tau.grad, torch.tensor(finite_difference, dtype=F64), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------ kNN in float32
def _knn_reference(queries, candidates, labels, query_labels, k, tau):
    q64, c64 = queries.double(), candidates.double()
    scores = -((q64[:, None] - c64[None]) ** 2).sum(-1)
    same = (labels[None] == query_labels[:, None]).double()
    return -(same * dense_reference(scores, tau)[..., :k, :].sum(-2)).sum(-1).mean() / k


def test_knn_of_half_precision_embeddings_does_not_overflow():
    """Embeddings of magnitude ~300: squared distances reach ~1e6, far past fp16's 65504."""
    queries = (300 * torch.randn(4, 8)).half().requires_grad_()
    candidates = (300 * torch.randn(12, 8)).half()
    labels, query_labels = torch.randint(0, 3, (12,)), torch.randint(0, 3, (4,))
    knn = DifferentiableKNN(k=3, tau=1e5, backend="torch")
    loss = knn(queries, candidates, labels, query_labels)
    assert loss.dtype == torch.float32
    expected = _knn_reference(queries.detach(), candidates, labels, query_labels, 3, 1e5)
    assert abs(float(loss.detach()) - float(expected)) <= 1e-5
    loss.backward()
    assert bool(torch.isfinite(queries.grad).all()) and bool(queries.grad.abs().sum() > 0)
    exact = ((queries.detach().double()[:, None] - candidates.double()[None]) ** 2).sum(-1).topk(3, largest=False)
    votes = nn.functional.one_hot(labels[exact.indices], 3).sum(1).argmax(-1)
    assert torch.equal(knn.predict(queries.detach(), candidates, labels), votes)


def test_knn_distances_stay_float32_under_autocast():
    queries, candidates = 30 * torch.randn(4, 8), 30 * torch.randn(12, 8)
    labels, query_labels = torch.randint(0, 3, (12,)), torch.randint(0, 3, (4,))
    knn = DifferentiableKNN(k=3, tau=1e3, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = knn(queries, candidates, labels, query_labels)
    torch.testing.assert_close(mixed, knn(queries, candidates, labels, query_labels), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------- torch.compile(fullgraph=True) traces
def _compiled(fn, backend: str = "eager"):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)


def test_relaxed_quantile_traces_with_fullgraph():
    def quantile(scores, values):
        return relaxed_quantile(scores, values, 0.3, 0.5)

    compiled = _compiled(quantile)
    for shape in ((3, 7), (2, 17), (4, 2), (1, 1)):  # one graph per shape change at most, never an error
        scores = torch.randn(shape, dtype=F64, requires_grad=True)
        values = torch.randn(*shape, 2, dtype=F64)
        got, expected = compiled(scores, values), quantile(scores, values)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), scores)[0],
                                   torch.autograd.grad(expected.sum(), scores)[0])
    # Traced, the finiteness check is skipped: a row with a NaN score gives NaN, not a number (eager raises).
    bad = torch.randn(2, 5, dtype=F64)
    bad[0, 1] = float("nan")
    traced = compiled(bad, bad[..., None])
    assert bool(traced[0].isnan().all())
    torch.testing.assert_close(traced[1], quantile(bad[1:], bad[1:, :, None])[0])
    with pytest.raises(ValueError, match="scores must be finite"):
        quantile(bad, bad[..., None])


PLACKETT_LUCE = {
    "rsample": lambda logits, x, perm: PlackettLuce(logits).rsample((2,), 0.5),
    "rsample_apply": lambda logits, x, perm: PlackettLuce(logits).rsample_apply(x, 0.5, (2,)),
    "log_prob": lambda logits, x, perm: PlackettLuce(logits).log_prob(perm),
    "sample": lambda logits, x, perm: PlackettLuce(logits).sample((3,)),
}


@pytest.mark.parametrize("method", PLACKETT_LUCE)
def test_plackett_luce_traces_with_fullgraph(method):
    fn = PLACKETT_LUCE[method]
    compiled = _compiled(fn)
    for shape in ((3, 5), (2, 8), (4, 1)):
        logits = torch.randn(shape, dtype=F64, requires_grad=True)
        x = torch.randn(*shape, 2, dtype=F64)
        perm = torch.rand(shape).argsort(-1)
        results = []
        for f in (fn, compiled):
            torch.manual_seed(1)  # the same noise for eager and compiled
            results.append(f(logits, x, perm))
        torch.testing.assert_close(results[1], results[0])
        if results[0].is_floating_point():
            grads = [torch.autograd.grad(out.sum(), logits)[0] for out in results]
            torch.testing.assert_close(grads[1], grads[0])


def test_traced_log_prob_of_a_non_permutation_is_nan():
    logits = torch.randn(3, 5, dtype=F64)
    perm = torch.tensor([[4, 3, 2, 1, 0], [0, 0, 1, 2, 3], [0, 1, 2, 3, 7]])  # a repeat; an index out of range

    def log_prob(logits, perm):
        return PlackettLuce(logits).log_prob(perm)

    traced = _compiled(log_prob)(logits, perm)
    torch.testing.assert_close(traced[0], log_prob(logits, perm[:1])[0])
    assert bool(traced[1:].isnan().all())
    with pytest.raises(ValueError, match="perm must hold permutations"):
        log_prob(logits, perm)


def test_traced_non_finite_logits_are_nan_or_an_error():
    logits = torch.randn(2, 4, dtype=F64)
    logits[1, 2] = float("nan")
    with pytest.raises(ValueError, match="logits must be finite"):
        PlackettLuce(logits)
    log_prob = _compiled(lambda logits: PlackettLuce(logits).log_prob(torch.arange(4)))(logits)
    assert bool(torch.isfinite(log_prob[0])) and bool(log_prob[1].isnan())
    with pytest.raises(ValueError, match="scores must be finite"):  # the sort op checks its input, traced or not
        _compiled(lambda logits: PlackettLuce(logits).rsample(tau=0.5))(logits)



def test_stochastic_neuralsort_traces_with_fullgraph():
    layer = NeuralSort(0.5, stochastic=True, backend="torch")
    compiled = _compiled(layer)
    scores = torch.randn(3, 6, dtype=F64)
    results = []
    for f in (layer, compiled):
        torch.manual_seed(2)
        results.append(f(scores))
    torch.testing.assert_close(results[1], results[0])



def test_one_compiled_function_takes_any_tau():
    def fn(logits, tau):
        return relaxed_quantile(logits, logits, 0.5, tau), PlackettLuce(logits).rsample_apply(logits, tau)

    compiled = _compiled(fn)
    logits = torch.randn(2, 7, dtype=F64)
    for tau in (0.3, 0.5, 0.9, 1.7, 2.5):
        results = []
        for f in (fn, compiled):
            torch.manual_seed(3)
            results.append(f(logits, tau))
        torch.testing.assert_close(results[1], results[0])


@pytest.mark.slow  # one Inductor compilation, ~45 s on a loaded 2-core CPU
def test_inductor_compiles_quantile_and_plackett_luce():
    """The default backend once, over all of them in one graph (one compilation); eager's random stream."""

    def fn(logits, x, perm):
        return (relaxed_quantile(logits, x, 0.5, 0.5), *(method(logits, x, perm) for method in PLACKETT_LUCE.values()))

    compiled = _compiled(fn, backend="inductor")
    logits, x = torch.randn(2, 5, dtype=F64), torch.randn(2, 5, dtype=F64)
    perm = torch.rand(2, 5).argsort(-1)
    results = []
    with torch._inductor.config.patch(fallback_random=True):
        for f in (fn, compiled):
            torch.manual_seed(4)
            results.append(f(logits, x, perm))
    for got, expected in zip(*results[::-1], strict=True):
        torch.testing.assert_close(got, expected)
