"""``triton-sort gpu-check``: one command that proves and measures the kernels on a GPU, within a time budget.

``triton-sort gpu-check [--budget-s 420] [--out gpu_check_out] [--dry-run]`` runs ``STEPS`` in order, each in its own
process (a step that crashes or hangs is recorded as failed and the next one runs), each writing its results as it
finishes; when the budget is spent the remaining steps are skipped with a note. ``--dry-run`` runs the same steps on
CPU with the kernels in Triton's interpreter at tiny sizes (about a minute), so CI proves the command end to end.

Output (``--out``, at most 8 files, each under 16 MiB; rewritten after every step):

- ``summary.json``: the environment, every step (status ``ok``/``failed``/``skipped``, seconds, note, command) and
  the headline figures;
- ``README.md``: the same for people, with the measured-versus-predicted table of the static model;
- ``gpu_check.csv``: the rows of the correctness, compile/graph, launch-count and measured-versus-model steps, in the
  reports' long-format columns (``triton_sort.bench.schema.COLUMNS``);
- ``commit.tar.gz``: the files to commit, ``perf_reports/<gpu>/`` (report, scaling, gpu_check.csv and this README as
  gpu_check.md) and ``autotune/tuned/<device>-<arch>.json``: ``tar xzf commit.tar.gz`` in the repository root;
- ``log.txt``: the tail of every step's output.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

MAX_FILE_BYTES = 16 * 2**20
LOG_TAIL_CHARS = 20_000  # per step, in log.txt
RESERVE_S = 10.0  # kept back from the budget for the summary and the archive
MIN_STEP_S = 15.0  # a step with less time than this left is skipped, not started


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of the check. ``gpu`` / ``dry``: the arguments after ``python -m`` on a GPU and in a dry run
    (``{work}`` is the work folder, ``{cache}`` the tuning cache); ``timeout_s`` / ``dry_timeout_s``: the most it may
    take (cut to what is left of the budget)."""

    name: str
    description: str
    gpu: tuple[str, ...]
    dry: tuple[str, ...]
    timeout_s: float
    dry_timeout_s: float = 120.0  # generous: CI machines are slow and shared; the budget still applies


def _internal(name: str) -> tuple[str, ...]:
    return ("triton_sort.bench.gpu_check", "--step", name, "--work", "{work}")


def _cli(*args: str) -> tuple[str, ...]:
    return ("triton_sort.cli", *args)


# The steps, in order. Adjust the sizes here; each entry point's own flags apply.
STEPS: tuple[Step, ...] = (
    Step("environment", "GPU name, SMs, clocks, driver, torch, Triton, package commit", _internal("environment"),
         _internal("environment"), 30),
    Step("correctness", "every kernel path (backend='triton', public API) against the float64 dense formula: "
         "forward and both gradients, odd n, B > 1, ties, d = 1/16/130, fp32/fp16/bf16", _internal("correctness"),
         _internal("correctness"), 90),
    Step("compile_and_graphs", "torch.compile(fullgraph=True) of a training step, and a CUDA-graph-captured step",
         _internal("compile_and_graphs"), _internal("compile_and_graphs"), 60),
    Step("launches", "Triton kernel launches, CUDA kernels, aten ops and syncs per forward + backward step",
         _internal("launches"), _internal("launches"), 30),
    Step("short_lists", "one-launch-per-pass kernels of short lists against the tiled kernels and the dense formula "
         "across n and B: the measured threshold (kernels.configs.SHORT_MAX_N)", _internal("short_lists"),
         _internal("short_lists"), 90),
    Step("model_vs_measured", "each kernel alone (full windows, default configuration) against the static model's "
         "predicted time per entry", _internal("model_vs_measured"), _internal("model_vs_measured"), 45),
    Step("autotune", "triton-sort autotune for the common workloads' keys (short lists in batches, n up to 2^17)",
         _cli("autotune", "--n", "1024", "16384", "131072", "--d", "1", "16", "64", "--dtype", "fp32", "bf16",
              "--no-progress"),
         _cli("autotune", "--allow-interpreter", "--n", "32", "--d", "1", "--dtype", "fp32", "--kernel",
              "apply_forward", "--no-progress"), 90),
    Step("report", "triton-sort report: the (B, n) grid with do_bench, dense formula and peers, exp/s, memory",
         _cli("report", "--quick", "--n", "256", "2048", "16384", "--tau", "0.1", "1", "--d", "1", "64", "--out",
              "{work}/perf_reports"),
         _cli("report", "--n", "16", "--tau", "1", "--d", "1", "--batch", "2", "--variants", "dense_reference",
              "triton_banded", "--out", "{work}/perf_reports"), 150),
    Step("scaling", "triton-sort scaling: large n, banded against dense",
         _cli("scaling", "--n", "16384", "65536", "131072", "--tau", "0.1", "1", "--repeats", "3", "--out",
              "{work}/perf_reports"),
         _cli("scaling", "--n", "32", "--tau", "1", "--repeats", "1", "--out", "{work}/perf_reports"), 60),
)

# Sizes of the internal steps: (on a GPU, in a dry run).
CORRECTNESS_CASES = {
    "gpu": {"n": (1, 17, 257, 2049), "batch": (3,), "d": (1, 16, 130), "dtypes": ("fp32", "fp16", "bf16"),
            "tau": (0.5,)},
    "dry": {"n": (17,), "batch": (2,), "d": (1, 16), "dtypes": ("fp32",), "tau": (1.0,)},
}
MEASURE_SIZES = {"gpu": {"batch": 4, "n": 4096, "d": (1, 16, 64), "dtypes": ("fp32", "bf16")},
                 "dry": {"batch": 1, "n": 32, "d": (1,), "dtypes": ("fp32",)}}
# Sizes of the short-list step: every (n, batch) with n * n * batch at most ``max_entries``, each d.
SHORT_LIST_SIZES = {"gpu": {"n": (8, 32, 100, 256, 512, 1024, 2048, 4096), "batch": (1, 64, 1024), "d": (1, 16),
                            "max_entries": 2**32, "dense_max_entries": 2**27},
                    "dry": {"n": (8, 40), "batch": (2,), "d": (1,), "max_entries": 2**20, "dense_max_entries": 2**20}}
# The model's device for a normalised device name (``autotune.keys.normalise_device_name``).
MODEL_DEVICE = {"a100": "a100-sxm4-80gb", "h100": "h100-sxm", "h200": "h200", "gh200": "h200"}


# ------------------------------------------------------------------------------------------------ orchestration
@dataclasses.dataclass
class Run:
    out: Path
    work: Path
    cache: Path
    dry_run: bool
    budget_s: float
    command: str
    started: float = dataclasses.field(default_factory=time.monotonic)
    steps: list[dict] = dataclasses.field(default_factory=list)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)


def _env(run: Run) -> dict[str, str]:
    env = dict(os.environ)
    env["TRITON_SORT_CACHE_DIR"] = str(run.cache)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # The package must come from this checkout even when it was not installed (python -m from the repository).
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if run.dry_run:
        env["TRITON_INTERPRET"] = "1"  # before triton_sort is imported: the children import it fresh
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def run_step(run: Run, step: Step, log) -> dict:
    """Run one step in a subprocess within what is left of the budget; its summary entry."""
    argv = [part.format(work=run.work, cache=run.cache) for part in (step.dry if run.dry_run else step.gpu)]
    command = "python -m " + " ".join(argv)
    entry = {"name": step.name, "description": step.description, "command": command, "status": "skipped",
             "seconds": 0.0, "note": ""}
    left = run.left() - RESERVE_S
    if left < MIN_STEP_S:
        entry["note"] = f"budget spent: {max(run.left(), 0):.0f} s left of {run.budget_s:.0f} s"
        return entry
    timeout = min(step.dry_timeout_s if run.dry_run else step.timeout_s, left)
    started = time.monotonic()
    cpu_before = _children_cpu_s()
    try:
        proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, env=_env(run),
                              timeout=timeout, cwd=run.work)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output = _text(exc.stdout) + _text(exc.stderr)
        code = None
    entry["seconds"] = round(time.monotonic() - started, 1)
    entry["cpu_s"] = round(_children_cpu_s() - cpu_before, 1)
    log.write(f"===== {step.name}: {command} (exit {code}, {entry['seconds']} s)\n{output[-LOG_TAIL_CHARS:]}\n")
    log.flush()
    result_file = run.work / f"{step.name}.json"
    details = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if code is None:
        entry.update(status="failed", note=f"timed out after {timeout:.0f} s (what it wrote is kept)")
    elif code != 0:
        last = [line for line in output.strip().splitlines() if line.strip()]
        entry.update(status="failed", note=f"exit {code}: {last[-1][:300] if last else ''}")
    else:
        entry.update(status=details.get("status", "ok"), note=details.get("note", ""))
    if details:
        entry["details"] = {k: v for k, v in details.items() if k not in ("status", "note")}
    return entry


def _children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def check(out: Path, budget_s: float, dry_run: bool, steps: tuple[Step, ...] = STEPS,
          command: str = "triton-sort gpu-check") -> dict:
    """Run the steps; returns the summary (also written to ``out/summary.json``)."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-work-"))
    cache = work / "cache"
    run = Run(out, work, cache, dry_run, budget_s, command)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with open(out / "log.txt", "w") as log:
        for step in steps:
            print(f"[gpu-check] {step.name} ...", flush=True)
            entry = run_step(run, step, log)
            run.steps.append(entry)
            print(f"[gpu-check] {step.name}: {entry['status']} ({entry['seconds']} s) {entry['note']}", flush=True)
            _collect(run)
            write_outputs(run, started_at)
    shutil.rmtree(work, ignore_errors=True)
    return json.loads((out / "summary.json").read_text())


def _collect(run: Run) -> None:
    """Gather what the steps wrote into the files to commit: tuned configurations and the step rows."""
    tuned = sorted((run.cache / "autotune").glob("*.json")) if (run.cache / "autotune").is_dir() else []
    for path in tuned:
        target = run.work / "commit" / "autotune" / "tuned" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def _rows(run: Run) -> list[dict]:
    rows: list[dict] = []
    for path in sorted(run.work.glob("rows_*.csv")):
        with open(path, newline="") as handle:
            rows += list(csv.DictReader(handle))
    return rows


def write_outputs(run: Run, started_at: str) -> None:
    """summary.json, README.md, gpu_check.csv and commit.tar.gz from what the steps have written so far."""
    from .schema import COLUMNS

    rows = _rows(run)
    with open(run.out / "gpu_check.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    environment = next((s.get("details", {}) for s in run.steps if s["name"] == "environment"), {})
    summary = {"command": run.command, "dry_run": run.dry_run, "started": started_at,
               "budget_s": run.budget_s, "elapsed_s": round(time.monotonic() - run.started, 1),
               "environment": environment.get("environment", {}), "steps": run.steps,
               "headline": headline(run, rows),
               "files": ["summary.json", "README.md", "gpu_check.csv", "commit.tar.gz", "log.txt"]}
    (run.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    readme = readme_text(summary, rows)
    (run.out / "README.md").write_text(readme)
    gpu_folder = _gpu_folder(run, summary)
    gpu_folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run.out / "gpu_check.csv", gpu_folder / "gpu_check.csv")
    (gpu_folder / "gpu_check.md").write_text(readme)
    with tarfile.open(run.out / "commit.tar.gz", "w:gz") as archive:
        # A dry run's files are not to be committed: under dry-run/, unpacking them cannot overwrite the CPU reports.
        prefix = Path("dry-run") if run.dry_run else Path()
        for path in sorted((run.work / "commit").rglob("*")):
            if path.is_file():
                archive.add(path, arcname=str(prefix / path.relative_to(run.work / "commit")))
        reports = run.work / "perf_reports"
        for path in sorted(reports.rglob("*")) if reports.is_dir() else ():
            if path.is_file():
                archive.add(path, arcname=str(prefix / "perf_reports" / path.relative_to(reports)))
    _trim(run.out / "log.txt")


def _gpu_folder(run: Run, summary: dict) -> Path:
    """perf_reports/<machine name>/ inside the archive (the name ``report`` uses)."""
    name = summary["environment"].get("machine_name") or ("dry-run" if run.dry_run else "unknown-gpu")
    return run.work / "perf_reports" / name


def _trim(path: Path) -> None:
    if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
        data = path.read_bytes()[-MAX_FILE_BYTES // 2:]
        path.write_bytes(b"[... earlier output cut: the file limit is 16 MiB]\n" + data)


def headline(run: Run, rows: list[dict]) -> dict:
    """The figures a reader wants first: correctness pass/fail, launches per step, measured vs predicted, the best
    exp rate of the report."""
    out: dict = {}
    checks = [r for r in rows if r["variant"].startswith("correctness/")]
    if checks:
        failed = [r for r in checks if r["status"] == "failed"]
        out["correctness"] = {"checked": len(checks), "failed": len(failed),
                              "first_failures": [f"{r['variant']} {r['metric']} n={r['n']} d={r['d']} {r['dtype']}: "
                                                 f"{r['note']}" for r in failed[:5]]}
    launches = [r for r in rows if r["metric"] == "triton_launches"]
    if launches:
        out["launches_per_step"] = {r["variant"]: int(r["median"]) for r in launches if r["median"] != ""}
    threshold = [r for r in rows if r["metric"] == "short_max_n_measured"]
    if threshold:
        out["short_max_n_measured"] = {"n": int(threshold[0]["median"]), "note": threshold[0]["note"]}
    ratios = [r for r in rows if r["metric"] == "measured_over_predicted" and r["status"] == "ok"]
    if ratios:
        out["measured_over_predicted"] = {f"{r['variant']} d={r['d']} {r['dtype']}": float(r["median"])
                                          for r in ratios}
    report_csv = next(run.work.glob("perf_reports/*/report.csv"), None)
    if report_csv is not None:
        try:
            from .schema import read_csv

            rates = [r for r in read_csv(report_csv) if r.get("metric") == "exp_rate" and r.get("status") == "ok"]
            if rates:
                best = max(rates, key=lambda r: float(r["median"]))
                out["best_exp_rate"] = {"variant": best["variant"], "pass": best["pass"], "n": best["n"],
                                        "exp_per_s": float(best["median"]), "note": best["note"]}
        except (KeyError, ValueError, OSError) as exc:  # another schema: say so rather than fail the summary
            out["best_exp_rate"] = f"unreadable report.csv ({exc})"
    return out


def readme_text(summary: dict, rows: list[dict]) -> str:
    env = summary["environment"]
    lines = ["# gpu-check" + (" (dry run: CPU, kernels in Triton's interpreter, tiny sizes)" if summary["dry_run"]
                              else ""), "",
             f"Started {summary['started']}, {summary['elapsed_s']:.0f} s of a {summary['budget_s']:.0f} s budget. "
             f"Device: {env.get('gpu_name', 'unknown')} ({env.get('sm_count', '?')} SMs), driver "
             f"{env.get('driver', 'unknown')}, torch {env.get('torch', '?')}, Triton {env.get('triton', '?')}, "
             f"package commit {env.get('commit', 'unknown')}.", "",
             "| step | status | seconds | note |", "|---|---|---|---|"]
    for step in summary["steps"]:
        lines.append(f"| {step['name']} | {step['status']} | {step['seconds']} | {step['note'].replace('|', '/')} |")
    head = summary["headline"]
    if "correctness" in head:
        c = head["correctness"]
        lines += ["", f"Correctness: {c['checked'] - c['failed']} of {c['checked']} comparisons within the tests' "
                  "tolerances." + ("" if not c["failed"] else " Failures: " + "; ".join(c["first_failures"]))]
    if "launches_per_step" in head:
        lines += ["", "Triton kernel launches per forward + backward step: "
                  + ", ".join(f"{k.removeprefix('launches/')} {v}" for k, v in head["launches_per_step"].items())]
    if "best_exp_rate" in head and isinstance(head["best_exp_rate"], dict):
        b = head["best_exp_rate"]
        lines += ["", f"Best exponential rate in the report: {b['exp_per_s']:.3g} exp/s ({b['variant']}, {b['pass']}, "
                  f"n = {b['n']}; {b['note']})."]
    measured = [r for r in rows if r["metric"] == "measured_time_per_entry"]
    if measured:
        lines += ["", "Each kernel alone (full windows, default configuration) against the static model "
                  "(`perf_reports/model/`): time per entry of P_hat.", "",
                  "| kernel | d | dtype | measured (ps) | predicted (ps) | limiting unit | measured / predicted |",
                  "|---|---|---|---|---|---|---|"]
        predicted = {(r["variant"], r["d"], r["dtype"]): r for r in rows if r["metric"] == "predicted_time_per_entry"}
        for r in measured:
            p = predicted.get((r["variant"], r["d"], r["dtype"]))
            if r["status"] != "ok":
                lines.append(f"| {r['variant']} | {r['d']} | {r['dtype']} | {r['status']}: {r['note']} | | | |")
                continue
            ratio = f"{float(r['median']) / float(p['median']):.2f}x" if p and p["median"] else "-"
            lines.append(f"| {r['variant']} | {r['d']} | {r['dtype']} | {float(r['median']) * 1e12:.3g} | "
                         + (f"{float(p['median']) * 1e12:.3g} | {p['note'].removeprefix('limited by ')} | {ratio} |"
                            if p and p["median"] else "- | - | - |"))
    lines += ["", "Files: `summary.json` (all of this as data), `gpu_check.csv` (the steps' rows; columns of "
              "`triton_sort.bench.schema.COLUMNS`), `log.txt` (each step's output), `commit.tar.gz` (unpack in the "
              "repository root: `perf_reports/<gpu>/` and `autotune/tuned/<device>-<arch>.json`)."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ the steps
class Rows:
    """Appends rows in the reports' columns to ``rows_<step>.csv`` as they come (a cut-off step keeps them)."""

    def __init__(self, work: Path, step: str) -> None:
        from .. import __version__
        from .memory import machine_name
        from .schema import COLUMNS, commit

        self.columns = COLUMNS
        self.path = work / f"rows_{step}.csv"
        self.common = {"tool": "gpu-check", "device": machine_name(), "package_version": __version__,
                       "commit": commit() or "unknown",
                       "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.count = 0
        self.failed = 0
        with open(self.path, "w", newline="") as handle:
            csv.DictWriter(handle, fieldnames=COLUMNS).writeheader()

    def add(self, variant: str, metric: str, value="", *, unit: str = "", status: str = "ok", note: str = "",
            **fields) -> None:
        row = dict.fromkeys(self.columns, "")
        values = {"variant": variant, "metric": metric, "unit": unit, "median": value, "status": status,
                  "note": note, **self.common, **fields}
        row.update({k: v for k, v in values.items() if k in row})
        self.count += 1
        self.failed += status == "failed"
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns).writerow(row)


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def step_environment(work: Path, dry: bool) -> dict:
    import platform

    import torch

    from .memory import machine_name
    from .schema import commit

    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "commit": commit() or "unknown",
           "machine_name": machine_name(), "dry_run": dry}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    try:
        import matplotlib

        env["matplotlib"] = matplotlib.__version__
    except ImportError:
        env["matplotlib"] = "not installed (report plots will fail)"
    env["cuobjdump"] = bool(_cuobjdump())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_name=props.name, sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1))
        try:
            from triton.runtime import driver

            p = driver.active.utils.get_device_properties(0)
            env.update(sm_clock_mhz=p["sm_clock_rate"] / 1e3, mem_clock_mhz=p["mem_clock_rate"] / 1e3,
                       mem_bus_width=p["mem_bus_width"], max_shared_bytes=p["max_shared_mem"])
        except Exception as exc:  # the clocks are nice to have
            env["clocks"] = f"unavailable ({type(exc).__name__}: {exc})"
        env.update(_nvidia_smi())
        from ..autotune.keys import device_key

        env["device_key"] = device_key(torch.device("cuda", 0)).stem
    else:
        env.update(gpu_name="none (CPU)" + (", dry run" if dry else ""), sm_count=0, driver="none")
    return {"environment": env}


def _cuobjdump() -> str | None:
    from .model import cuobjdump_path

    return cuobjdump_path()


def _nvidia_smi() -> dict:
    fields = "driver_version,clocks.max.sm,clocks.max.mem,clocks.sm,power.limit"
    try:
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"driver": f"unknown (nvidia-smi: {exc})"}
    values = [v.strip() for v in proc.stdout.splitlines()[0].split(",")] if proc.stdout.strip() else []
    if len(values) != 5:
        return {"driver": "unknown (nvidia-smi gave no answer)"}
    return {"driver": values[0], "max_sm_clock": values[1], "max_mem_clock": values[2], "sm_clock": values[3],
            "power_limit": values[4]}


def _load_test_reference():
    """tests/reference.py of this checkout: the tests' tolerance table and error measures (one place)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tests" / "reference.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run gpu-check from a checkout of the repository")
    spec = importlib.util.spec_from_file_location("triton_sort_test_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs(batch: int, n: int, d: int, dtype, device, ties: bool, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, n, generator=generator, dtype=torch.float64)
    if ties:
        scores = torch.round(scores * 2) / 2  # many equal scores
    x = torch.randn(batch, n, d, generator=generator, dtype=torch.float64)
    grad = torch.randn(batch, n, d, generator=generator, dtype=torch.float64)
    cast = (scores.to(dtype), x.to(dtype), grad.to(dtype))
    return tuple(t.to(device) for t in cast)


def _kernel_paths():
    """(name, function (scores, x, tau) -> output, whether x is differentiated) of every public kernel path."""
    from .. import relaxed_sort_apply, relaxed_sort_matrix, relaxed_topk

    return (
        ("apply_banded", lambda s, x, tau: relaxed_sort_apply(s, x, tau, backend="triton"), True),
        ("apply_dense", lambda s, x, tau: relaxed_sort_apply(s, x, tau, banded=False, backend="triton"), True),
        ("apply_ascending", lambda s, x, tau: relaxed_sort_apply(s, x, tau, descending=False, backend="triton"),
         True),
        ("matrix", lambda s, x, tau: relaxed_sort_matrix(s, tau, backend="triton"), False),
        ("topk", lambda s, x, tau: relaxed_topk(s, max(1, s.shape[-1] // 3), tau, backend="triton"), False),
        ("apply_transposed", lambda s, x, tau: relaxed_sort_apply(s, x, tau, transpose=True, backend="triton"), True),
        ("apply_masked", lambda s, x, tau: relaxed_sort_apply(s, x, tau, mask=_fixed_mask(s), backend="triton"),
         True),
    )


def _fixed_mask(scores):
    """Padded lists for the correctness step: every third item is padding (the same positions in every list)."""
    import torch

    return (torch.arange(scores.shape[-1], device=scores.device) % 3 != 2).expand(scores.shape)


def _reference_paths():
    """The same paths computed from the dense formula (``triton_sort.reference``), for float64 inputs."""
    from ..reference import dense_sort_apply, dense_sort_matrix

    def topk(s, x, tau):
        k = max(1, s.shape[-1] // 3)
        return dense_sort_matrix(s, tau)[..., :k, :].sum(-2)

    def masked(s, x, tau):
        import torch

        real = _fixed_mask(s)[0].nonzero()[:, 0]
        compact = dense_sort_apply(s[..., real], x[..., real, :], tau)
        return torch.cat([compact, compact.new_zeros(*compact.shape[:-2], s.shape[-1] - len(real),
                                                     compact.shape[-1])], dim=-2)

    return {"apply_transposed": lambda s, x, tau: dense_sort_matrix(s, tau).transpose(-1, -2) @ x,
            "apply_masked": masked,
            "apply_banded": lambda s, x, tau: dense_sort_apply(s, x, tau),
            "apply_dense": lambda s, x, tau: dense_sort_apply(s, x, tau),
            "apply_ascending": lambda s, x, tau: dense_sort_apply(s, x, tau, descending=False),
            "matrix": lambda s, x, tau: dense_sort_matrix(s, tau), "topk": topk}


def step_correctness(work: Path, dry: bool) -> dict:
    import itertools

    import torch

    ref = _load_test_reference()
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    cases = CORRECTNESS_CASES["dry" if dry else "gpu"]
    device = _device()
    rows = Rows(work, "correctness")
    references = _reference_paths()
    seed = 0
    for n, batch, d, dtype_name, tau, ties in itertools.product(cases["n"], cases["batch"], cases["d"],
                                                                 cases["dtypes"], cases["tau"], (False, True)):
        seed += 1
        dtype = dtypes[dtype_name]
        tol = ref.tolerance(dtype)
        s, x, g = _inputs(batch, n, d, dtype, device, ties, seed)
        case = {"n": n, "d": d, "dtype": dtype_name, "batch": batch, "tau": tau}
        for name, fn, uses_x in _kernel_paths():
            if not uses_x and d != cases["d"][0]:
                continue  # matrix and top-k ignore x: once per (n, batch, dtype, tau)
            variant = f"correctness/{name}" + ("/ties" if ties else "")
            try:
                s_req, x_req = s.clone().requires_grad_(), x.clone().requires_grad_()
                out = fn(s_req, x_req, tau)
                s64, x64 = s.double().requires_grad_(), x.double().requires_grad_()
                out64 = references[name](s64, x64, tau)
                g_out = g[..., : out.shape[-1]] if out.dim() == 3 else g[..., 0]
                if out.shape != g_out.shape:
                    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)
                inputs = (s_req, x_req) if uses_x else (s_req,)
                grads = torch.autograd.grad(out, inputs, g_out)
                grads64 = torch.autograd.grad(out64, (s64, x64) if uses_x else (s64,), g_out.double())
                # The score gradient's natural size; matrix and top-k act like P_hat @ I.
                x_like = x64.detach() if uses_x else torch.eye(n, dtype=torch.float64, device=device).expand(
                    batch, n, n)
                floor = ref.scores_grad_floor(g_out.double(), x_like, tau)
                measures = [("rel_error", "forward", ref.relative_error(out, out64)),
                            ("rel_error_dscores", "backward", ref.relative_error(grads[0], grads64[0], floor))]
                if uses_x:
                    measures.append(("rel_error_dx", "backward", ref.relative_error(grads[1], grads64[1])))
                for metric, pass_, error in measures:
                    ok = error <= tol
                    rows.add(variant, metric, error, unit="ratio", status="ok" if ok else "failed",
                             note=f"tolerance {tol:g}", **{"pass": pass_}, **case)
            except Exception as exc:  # a path that raises is a failure of this case, not of the step
                rows.add(variant, "rel_error", status="failed", note=_error(exc), **{"pass": "forward"}, **case)
    return _step_status(rows, "comparisons")


def _step_status(rows: Rows, what: str) -> dict:
    return {"status": "failed" if rows.failed else "ok",
            "note": f"{rows.count - rows.failed} of {rows.count} {what} ok"}


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def step_compile_and_graphs(work: Path, dry: bool) -> dict:
    import torch

    from .. import relaxed_sort_apply

    device = _device()
    rows = Rows(work, "compile_and_graphs")
    batch, n, d, tau = (2, 17, 16, 1.0) if dry else (4, 4096, 16, 1.0)
    s, x, _ = _inputs(batch, n, d, torch.float32, device, False, 0)

    def step(scores, values):
        out = relaxed_sort_apply(scores, values, tau, backend="triton")
        return (out * torch.arange(out.shape[-2], device=out.device, dtype=out.dtype)[:, None]).square().mean()

    def eager_grads():
        scores, values = s.clone().requires_grad_(), x.clone().requires_grad_()
        return torch.autograd.grad(step(scores, values), (scores, values))

    expected = eager_grads()
    # Inductor on a GPU; aot_eager in a dry run (it traces the same custom ops without generating C++).
    backend = "aot_eager" if dry else "inductor"
    try:
        compiled = torch.compile(step, fullgraph=True, backend=backend)
        scores, values = s.clone().requires_grad_(), x.clone().requires_grad_()
        grads = torch.autograd.grad(compiled(scores, values), (scores, values))
        error = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(grads, expected, strict=True))
        rows.add("compile/torch_compile_fullgraph", "rel_error_vs_eager", error, unit="ratio",
                 status="ok" if error <= 1e-5 else "failed", note=f"backend {backend}; tolerance 1e-05",
                 n=n, d=d, dtype="fp32", batch=batch, tau=tau, **{"pass": "forward+backward"})
    except Exception as exc:
        rows.add("compile/torch_compile_fullgraph", "rel_error_vs_eager", status="failed", note=_error(exc),
                 n=n, d=d, dtype="fp32", batch=batch, tau=tau, **{"pass": "forward+backward"})
    if device.type != "cuda":
        rows.add("compile/cuda_graph_step", "rel_error_vs_eager", status="skipped", note="needs a CUDA GPU",
                 n=n, d=d, dtype="fp32", batch=batch, tau=tau, **{"pass": "forward+backward"})
        return _step_status(rows, "checks")
    try:
        scores, values = s.clone().requires_grad_(), x.clone().requires_grad_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
            for _ in range(2):
                grads = torch.autograd.grad(step(scores, values), (scores, values))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            grads = torch.autograd.grad(step(scores, values), (scores, values))
        graph.replay()
        torch.cuda.synchronize()
        error = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(grads, expected, strict=True))
        rows.add("compile/cuda_graph_step", "rel_error_vs_eager", error, unit="ratio",
                 status="ok" if error <= 1e-5 else "failed", note="tolerance 1e-05", n=n, d=d, dtype="fp32",
                 batch=batch, tau=tau, **{"pass": "forward+backward"})
    except Exception as exc:  # e.g. a host sync inside the captured step
        rows.add("compile/cuda_graph_step", "rel_error_vs_eager", status="failed", note=_error(exc), n=n, d=d,
                 dtype="fp32", batch=batch, tau=tau, **{"pass": "forward+backward"})
    return _step_status(rows, "checks")


class LaunchCounter:
    """Counts Triton kernel launches by name while active: wraps ``run`` of Triton's JIT and interpreted kernels
    (``kernel[grid](...)`` calls ``self.run``)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._saved: list[tuple[type, object]] = []

    def __enter__(self) -> LaunchCounter:
        from triton.runtime.jit import JITFunction

        classes = [JITFunction]
        try:
            from triton.runtime.interpreter import InterpretedFunction

            classes.append(InterpretedFunction)
        except ImportError:
            pass
        for cls in classes:
            original = cls.run
            self._saved.append((cls, original))

            def run(kernel, *args, _original=original, **kwargs):
                if not kwargs.get("warmup", False):
                    name = getattr(getattr(kernel, "fn", None), "__name__", "kernel")
                    self.counts[name] = self.counts.get(name, 0) + 1
                return _original(kernel, *args, **kwargs)

            cls.run = run
        return self

    def __exit__(self, *exc) -> None:
        for cls, original in self._saved:
            cls.run = original


def step_launches(work: Path, dry: bool) -> dict:
    import torch

    from .. import relaxed_sort_apply, relaxed_sort_matrix, relaxed_topk

    device = _device()
    rows = Rows(work, "launches")
    batch, n, d, tau = (2, 17, 16, 1.0) if dry else (4, 4096, 16, 1.0)
    s, x, _ = _inputs(batch, n, d, torch.float32, device, False, 0)
    paths = {"launches/apply": lambda a, b: relaxed_sort_apply(a, b, tau, backend="triton"),
             "launches/matrix": lambda a, b: relaxed_sort_matrix(a, tau, backend="triton"),
             "launches/topk": lambda a, b: relaxed_topk(a, n // 3, tau, backend="triton")}
    case = {"n": n, "d": d, "dtype": "fp32", "batch": batch, "tau": tau, "pass": "forward+backward"}
    for name, fn in paths.items():
        try:
            def training_step(fn=fn):
                scores, values = s.clone().requires_grad_(), x.clone().requires_grad_()
                out = fn(scores, values)
                out.backward(torch.ones_like(out))

            training_step()  # warm-up: compilation and tuning lookups are not part of a step
            with LaunchCounter() as counter:
                training_step()
            rows.add(name, "triton_launches", sum(counter.counts.values()), unit="count",
                     note=" ".join(f"{k}={v}" for k, v in sorted(counter.counts.items())), **case)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                training_step()
            events = prof.events()
            aten = sum(1 for e in events if e.name.startswith("aten::"))
            syncs = sum(1 for e in events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize")
                        or ("Memcpy" in e.name and "DtoH" in e.name))
            gpu_kernels = sum(1 for e in events if str(getattr(e, "device_type", "")).endswith("CUDA"))
            rows.add(name, "aten_ops", aten, unit="count", note="torch.profiler events named aten::*", **case)
            rows.add(name, "syncs", syncs, unit="count", note="cudaStreamSynchronize/DeviceSynchronize/DtoH copies",
                     **case)
            rows.add(name, "cuda_kernels", gpu_kernels if device.type == "cuda" else "",
                     status="ok" if device.type == "cuda" else "skipped",
                     unit="count", note="" if device.type == "cuda" else "needs a CUDA GPU", **case)
        except Exception as exc:
            rows.add(name, "triton_launches", status="failed", note=_error(exc), **case)
    return _step_status(rows, "counts")


def step_short_lists(work: Path, dry: bool) -> dict:
    """Forward + backward of ``relaxed_sort_apply`` with every list on the short kernels (one launch per pass, one
    program per list) and on the tiled kernels, on the same inputs, and the dense formula: the largest n up to which
    the short kernels are no slower at every batch and d is the measured threshold (``short_max_n_measured``)."""
    import torch

    from .. import relaxed_sort_apply
    from ..kernels import launch
    from ..reference import dense_sort_matrix

    device = _device()
    rows = Rows(work, "short_lists")
    sizes = SHORT_LIST_SIZES["dry" if dry else "gpu"]
    configured = launch.SHORT_MAX_N
    tau = torch.tensor(1.0, dtype=torch.float64, device=device)
    short_wins: dict[int, bool] = {}
    paths = {"short": lambda s, v: relaxed_sort_apply(s, v, tau, backend="triton"),
             "tiled": lambda s, v: relaxed_sort_apply(s, v, tau, backend="triton"),
             "dense": lambda s, v: dense_sort_matrix(s, tau) @ v}
    thresholds = {"short": 1 << 40, "tiled": 0, "dense": configured}
    try:
        for n in sizes["n"]:
            for batch in sizes["batch"]:
                if batch * n * n > sizes["max_entries"]:
                    continue
                for d in sizes["d"]:
                    s, x, g = _inputs(batch, n, d, torch.float32, device, False, n)
                    case = {"n": n, "d": d, "dtype": "fp32", "batch": batch, "tau": 1.0, "pass": "forward+backward"}
                    times = {}
                    for variant, fn in paths.items():
                        if variant == "dense" and batch * n * n > sizes["dense_max_entries"]:
                            continue
                        launch.SHORT_MAX_N = thresholds[variant]

                        def training_step(fn=fn, s=s, x=x, g=g):
                            scores, values = s.clone().requires_grad_(), x.clone().requires_grad_()
                            torch.autograd.grad(fn(scores, values), (scores, values), g)

                        try:
                            times[variant] = _time(training_step, device)
                            rows.add(f"short_lists/{variant}", "time", times[variant], unit="s", **case)
                        except Exception as exc:
                            rows.add(f"short_lists/{variant}", "time", status="failed", note=_error(exc), **case)
                    launch.SHORT_MAX_N = configured
                    if "short" in times and "tiled" in times:
                        rows.add("short_lists/short", "short_over_tiled", times["short"] / times["tiled"],
                                 unit="ratio", **case)
                        short_wins[n] = short_wins.get(n, True) and times["short"] <= times["tiled"]
                    if "short" in times and "dense" in times:
                        rows.add("short_lists/short", "short_over_dense", times["short"] / times["dense"],
                                 unit="ratio", **case)
    finally:
        launch.SHORT_MAX_N = configured
    measured = 0
    for n in sorted(short_wins):  # the short kernels win at every size up to here
        if not short_wins[n]:
            break
        measured = n
    rows.add("short_lists/threshold", "short_max_n_measured", measured, unit="items",
             note=f"largest measured n with short <= tiled at every batch and d up to it; configured {configured}"
             + ("; dry run: interpreter times (meaningless, checks the path)" if dry else ""))
    return _step_status(rows, "measurements")


def step_model_vs_measured(work: Path, dry: bool) -> dict:
    """Each kernel alone with full windows (tau huge) at its default configuration, timed, against the model."""
    import torch

    from ..autotune.keys import device_key
    from ..autotune.registry import KERNELS
    from ..kernels.configs import block_d_for, gpu_heuristic_config
    from . import model

    device = _device()
    rows = Rows(work, "model_vs_measured")
    sizes = MEASURE_SIZES["dry" if dry else "gpu"]
    key = device_key(device)
    model_device = model.DEVICES.get(MODEL_DEVICE.get(key.name, "h200"))
    note = "" if key.name in MODEL_DEVICE else f"no model for {key.full_name}; compared with {model_device.name}"
    if dry:
        note = "dry run: interpreter times against the H200 model (meaningless, checks the path)"
    predictions = _predictions(model_device)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    batch, n = sizes["batch"], sizes["n"]
    for kernel, spec in KERNELS.items():
        for d in sizes["d"] if spec.uses_d else (1,):
            for dtype_name in sizes["dtypes"]:
                block_d = spec.block_d(d)
                config = gpu_heuristic_config(kernel, block_d)  # what an untuned GPU launches
                variant = model.variant_name({"kernel": kernel, **config.as_dict(), "single_d_chunk": True})
                case = {"n": n, "d": block_d, "dtype": dtype_name, "batch": batch, "tau": 1e6,
                        "pass": model.PASS_OF_KERNEL.get(kernel, "")}
                try:
                    replay = spec.capture(batch, n, d, dtypes[dtype_name], device, tau=1e6)  # full windows
                    seconds = _time(lambda replay=replay, config=config: replay(config), device)
                    per_entry = seconds / (batch * n * n)
                    rows.add(variant, "measured_time_per_entry", per_entry, unit="s", note=note, **case)
                    predicted = predictions.get((variant, block_d_for(d) if spec.uses_d else 1, dtype_name))
                    if predicted is None:
                        rows.add(variant, "predicted_time_per_entry", status="skipped",
                                 note=f"no model row for {variant} on {model_device.name}", **case)
                        continue
                    rows.add(variant, "predicted_time_per_entry", predicted[0], unit="s",
                             note=f"limited by {predicted[1]} ({model_device.name})", **case)
                    rows.add(variant, "measured_over_predicted", per_entry / predicted[0], unit="ratio", note=note,
                             **case)
                except Exception as exc:
                    rows.add(variant, "measured_time_per_entry", status="failed", note=_error(exc), **case)
    return _step_status(rows, "measurements")


def _predictions(device) -> dict:
    """(variant, block_d, dtype) -> (seconds per entry, unit) for ``device``: from the committed
    perf_reports/model/model.csv of this checkout if there is one, else compiled now (default configurations)."""
    from . import model

    folder = Path(__file__).resolve().parents[2] / "perf_reports" / "model"
    if (folder / "model.csv").is_file():
        return {(v, d, dt): p for (v, dev, d, dt), p in model.predictions(folder).items() if dev == device.name}
    defaults = model.default_configs()
    items = [(job, device.arch) for job, _ in model.all_items((device.arch,))
             if job.single_d_chunk and (job.kernel, job.block_d, *dataclasses.astuple(job.config)) in defaults]
    out = {}
    for result in model.run_model(items):
        if "error" not in result:
            unit, seconds = model.limiting(model.unit_seconds(model.entry_of(result), device))
            out[(model.variant_name(result), result["block_d"], result["dtype"])] = (seconds, unit)
    return out


def _time(fn, device) -> float:
    """Median seconds of ``fn``: ``triton.testing.do_bench`` on a GPU, three wall-clock calls otherwise."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn) / 1e3
    import statistics

    fn()
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


STEP_FUNCTIONS = {"environment": step_environment, "correctness": step_correctness,
                  "compile_and_graphs": step_compile_and_graphs, "launches": step_launches,
                  "short_lists": step_short_lists, "model_vs_measured": step_model_vs_measured}


def _run_internal(name: str, work: Path) -> int:
    dry = os.environ.get("TRITON_INTERPRET") == "1"
    details = STEP_FUNCTIONS[name](work, dry)
    (work / f"{name}.json").write_text(json.dumps(details, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="triton-sort gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of all steps (seconds)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="folder of the results")
    parser.add_argument("--dry-run", action="store_true", help="on CPU, kernels in Triton's interpreter, tiny sizes")
    parser.add_argument("--step", choices=list(STEP_FUNCTIONS), help=argparse.SUPPRESS)  # one internal step
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        return _run_internal(args.step, args.work)
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA GPU here: run on a GPU machine, or use --dry-run to check the command on CPU")
    command = "triton-sort gpu-check " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = check(args.out, args.budget_s, args.dry_run, command=command.strip())
    counts = {status: sum(s["status"] == status for s in summary["steps"]) for status in ("ok", "failed", "skipped")}
    print(f"[gpu-check] {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped; "
          f"wrote {args.out / 'summary.json'}, {args.out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
