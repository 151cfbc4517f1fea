"""What a performance report measures: the grid of points, read by ``report`` (to measure) and ``plots`` (to draw).

A point is ``(batch, n, tau, d, dtype)``, the ``POINT`` columns of the CSV schema (``bench.schema``). A ``Grid`` has
four parts: an n sweep (at ``batch``, ``tau_ref``, over ``ds`` x ``dtypes``), a tau sweep (at ``n_ref``), the
batch grid of common workloads (``workloads``: (B, n) pairs at ``tau_ref`` over ``workload_ds``, the first dtype),
where the report compares our op with the dense formula and the peers, per call, with device-operation counts, and
the same comparison at every tau for a few of them (``tau_workloads``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

PASSES = ("forward", "backward", "forward+backward")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (B, n) of the batch grid: the sizes people train with (short lists in big batches, a few long lists).
WORKLOADS = ((1, 8), (256, 8), (1, 100), (64, 100), (1024, 100), (64, 256), (16, 1000), (1, 4096))
WORKLOAD_DS = (1, 16)
# Workloads also measured at every tau of the grid: a short-list batch, where the cost of exp and of the products
# depends on tau (the CPU's slow path for exp near the bottom of its range and subnormal products: (64, 100) at
# tau = 0.1 once ran 6x-12x slower than at tau = 1, unseen by the tau sweep of one long list).
TAU_WORKLOADS = ((64, 100),)
# The variant that is "ours" (relaxed_sort_apply with its defaults) per device type, in tables and ratios.
OURS = {"cpu": "torch_banded", "cuda": "triton_banded"}
# ... and ours when the matrix itself is wanted (``relaxed_sort_matrix``, then a product with x).
OURS_MATRIX = {"cpu": "torch_matrix", "cuda": "triton_matrix"}
DENSE = "dense_reference"

Point = tuple[int, int, float, int, str]  # (batch, n, tau, d, dtype)


@dataclasses.dataclass(frozen=True)
class Grid:
    """What to measure: an n sweep at ``tau_ref`` over ``ds`` x ``dtypes`` (``batch`` rows), a tau sweep at
    ``n_ref`` over ``tau_ds``, and the ``workloads`` batch grid at ``tau_ref`` over ``workload_ds`` and the first
    dtype. ``full`` measures the whole product n x tau x d x dtype instead of the two sweeps."""

    ns: tuple[int, ...]
    taus: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    ds: tuple[int, ...] = (1, 16, 64)
    dtypes: tuple[str, ...] = ("fp32",)
    batch: int = 1
    tau_ds: tuple[int, ...] | None = None  # d of the tau sweep (default: the first d)
    full: bool = False
    workloads: tuple[tuple[int, int], ...] = ()
    workload_ds: tuple[int, ...] = WORKLOAD_DS
    tau_workloads: tuple[tuple[int, int], ...] = ()  # (B, n) pairs measured at every tau over ``workload_ds``
    memory_ds: tuple[int, ...] | None = None  # CPU: d of the fresh-process memory runs (None: the first d)
    seconds_per_timing: float = 0.25  # CPU only: keep repeating a timed call until this much time has passed
    max_reps: int = 100  # rounds at most: short calls get more samples within the same time budget
    max_seconds: float | None = None  # skip sizes whose forward + backward is predicted to take longer
    count_ops: bool = True  # record device operations and host syncs per call (bench.counting)

    @property
    def tau_ref(self) -> float:
        """tau of the n sweep and the workloads: 1 if measured, else the middle tau."""
        return 1.0 if 1.0 in self.taus else sorted(self.taus)[len(self.taus) // 2]

    @property
    def n_ref(self) -> int:
        """n of the tau sweep: the middle n."""
        return sorted(self.ns)[len(self.ns) // 2]

    def sweep_points(self) -> set[Point]:
        """The n and tau sweeps (or their full product), at ``batch`` rows."""
        b = self.batch
        if self.full:
            return {(b, n, tau, d, dt) for n in self.ns for tau in self.taus for d in self.ds for dt in self.dtypes}
        wanted = {(b, n, self.tau_ref, d, dt) for n in self.ns for d in self.ds for dt in self.dtypes}
        tau_ds = self.tau_ds or self.ds[:1]
        return wanted | {(b, self.n_ref, tau, d, dt) for tau in self.taus for d in tau_ds for dt in self.dtypes}

    def workload_points(self) -> set[Point]:
        return {(b, n, self.tau_ref, d, self.dtypes[0]) for b, n in self.workloads for d in self.workload_ds}

    def tau_workload_points(self) -> set[Point]:
        """The ``tau_workloads`` at every tau, over ``workload_ds`` and the first dtype."""
        return {(b, n, tau, d, self.dtypes[0]) for b, n in self.tau_workloads for tau in self.taus
                for d in self.workload_ds}

    def points(self) -> list[Point]:
        """Every point to measure, least work (batch x n^2) first."""
        return sorted(self.sweep_points() | self.workload_points() | self.tau_workload_points(),
                      key=lambda p: (p[0] * p[1] ** 2, p))

    @classmethod
    def from_rows(cls, rows: Iterable[dict]) -> Grid:
        """The grid a set of schema rows covers (for plotting any CSV): its n, tau, d and dtypes, the most common
        batch as the sweeps' batch, the other (batch, n) pairs as workloads."""
        rows = [r for r in rows if r["status"] == "ok"]
        if not rows:
            raise ValueError("no measured rows to plot")
        batches = [int(r["batch"]) for r in rows]
        batch = max(set(batches), key=batches.count)
        sweep = [r for r in rows if int(r["batch"]) == batch]
        taus = tuple(sorted({float(r["tau"]) for r in sweep}))
        others = [r for r in rows if int(r["batch"]) != batch]
        pair_taus: dict[tuple[int, int], set[float]] = {}
        for r in others:
            pair_taus.setdefault((int(r["batch"]), int(r["n"])), set()).add(float(r["tau"]))
        return cls(ns=tuple(sorted({int(r["n"]) for r in sweep})), taus=taus,
                   ds=tuple(sorted({int(r["d"]) for r in sweep})),
                   dtypes=tuple(dict.fromkeys(r["dtype"] for r in sweep)), batch=batch,
                   workloads=tuple(sorted(pair_taus)),
                   tau_workloads=tuple(sorted(pair for pair, seen in pair_taus.items() if len(seen) > 1)))


def default_grid(device: torch.device, quick: bool) -> Grid:
    """``--quick``: a few minutes on a 2-core CPU; otherwise the full grid (meant for GPUs). Both measure the
    ``WORKLOADS`` batch grid."""
    if device.type == "cuda":
        if quick:
            return Grid(ns=tuple(2**k for k in range(8, 15)), batch=4, workloads=WORKLOADS,
                        tau_workloads=TAU_WORKLOADS, max_seconds=1.0)
        return Grid(ns=tuple(2**k for k in range(8, 18)), dtypes=tuple(DTYPES), batch=4, full=True,
                    workloads=WORKLOADS, tau_workloads=TAU_WORKLOADS, max_seconds=30.0)
    if quick:
        # The batch grid carries d = 16; the n sweep stays at d = 1 so that the whole report takes minutes.
        return Grid(ns=(256, 1024, 4096), ds=(1,), workloads=WORKLOADS, tau_workloads=TAU_WORKLOADS,
                    max_seconds=2.0)
    return Grid(ns=tuple(2**k for k in range(8, 15)), full=True, workloads=WORKLOADS, tau_workloads=TAU_WORKLOADS,
                memory_ds=(1, 64), max_seconds=60.0)
