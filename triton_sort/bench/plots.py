"""PNG plots of any ``perf_reports`` CSV (the ``bench.schema`` rows of ``report``, ``scaling``, ``memory``, or
several concatenated; matplotlib, the ``report`` extra): one line per variant, same colour in every plot; shaded
bands are the 20th-80th percentiles of the timings. What is drawn follows a ``bench.grid.Grid``, by default the one
the rows cover (``Grid.from_rows``).

``python -m triton_sort.bench.plots OUT_FOLDER CSV [CSV ...]`` draws the plots of the given CSVs."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from .grid import Grid

PASS_TITLES = {"forward": "forward", "backward": "backward", "forward+backward": "forward + backward"}
ERROR_TITLES = {"rel_error": "output (forward)", "rel_error_dscores": "d scores (backward)",
                "rel_error_dx": "d x (backward)"}


def _series(rows: Iterable[dict], x_key: str, **where) -> list[tuple[float, float, float | None, float | None]]:
    """Sorted (x, median, p20, p80) of the successful rows matching ``where``."""
    points = []
    for row in rows:
        if row["status"] == "ok" and all(str(row[key]) == str(value) for key, value in where.items()):
            low, high = (float(row[q]) if row[q] not in ("", None) else None for q in ("p20", "p80"))
            points.append((float(row[x_key]), float(row["median"]), low, high))
    return sorted(points)


def _panel(ax, rows: list[dict], x_key: str, variants: list[str], title: str, ylabel: str, **where) -> bool:
    """Draw one line per variant; returns whether anything was drawn."""
    import matplotlib.pyplot as plt

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = False
    for index, variant in enumerate(variants):
        points = _series(rows, x_key, variant=variant, **where)
        if not points:
            continue
        xs, medians, lows, highs = zip(*points, strict=True)
        colour = colours[index % len(colours)]
        ax.plot(xs, medians, marker="o", markersize=3, label=variant, color=colour)
        if all(v is not None for v in lows + highs):
            ax.fill_between(xs, lows, highs, alpha=0.2, color=colour, linewidth=0)
        drawn = True
    ax.set_xscale("log", base=2 if x_key == "n" else 10)
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(x_key)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    return drawn


def _figure(path: Path, panels: list[tuple[str, str, dict]], rows: list[dict], x_key: str, variants: list[str],
            suptitle: str, columns: int) -> Path | None:
    """A grid of panels (title, ylabel, filter); written only if some panel has data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(panels)
    lines = -(-count // columns)
    # At least 7 inches wide, so that a single panel's legend and title fit.
    fig, axes = plt.subplots(lines, min(columns, count), figsize=(max(7.0, 4.4 * min(columns, count)), 3.5 * lines),
                             squeeze=False)
    drawn = [_panel(ax, rows, x_key, variants, title, ylabel, **where)
             for ax, (title, ylabel, where) in zip(axes.flat, panels, strict=False)]
    for ax in list(axes.flat)[count:]:
        ax.set_visible(False)
    if not any(drawn):
        plt.close(fig)
        return None
    handles, labels = {}, {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
            labels[label] = label
    fig.legend(list(handles.values()), list(labels), loc="lower center", ncol=min(len(labels), 4), frameon=False)
    fig.suptitle(suptitle)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def make_plots(rows: list[dict], folder: Path, grid: Grid | None = None,
               variants: list[str] | None = None) -> list[Path]:
    """time_vs_n, memory_vs_n, time_vs_tau and error_vs_n PNGs (at the grid's sweep batch and first dtype) in
    ``folder``; the paths written. ``grid``: by default the rows' own; ``variants``: by default all, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    grid = grid if grid is not None else Grid.from_rows(rows)
    variants = variants if variants is not None else list(dict.fromkeys(r["variant"] for r in rows))
    dtype = grid.dtypes[0]
    sweep = {"tau": grid.tau_ref, "dtype": dtype, "batch": grid.batch}
    memory_ds = sorted({int(r["d"]) for r in rows if r["metric"] == "peak_memory" and r["status"] == "ok"})
    figures = [
        ("time_vs_n.png", "n", 3,
         [(f"{PASS_TITLES[p]}, d = {d}", "time (s)", {"pass": p, "d": d, "metric": "time", **sweep})
          for d in grid.ds for p in PASS_TITLES],
         f"Time vs n (tau = {grid.tau_ref}, {dtype}, batch {grid.batch})"),
        ("memory_vs_n.png", "n", 3,
         [(f"{PASS_TITLES[p]}, d = {d}", "peak memory above inputs (MiB)",
           {"pass": p, "d": d, "metric": "peak_memory", **sweep}) for d in memory_ds for p in PASS_TITLES
          if any(r["pass"] == p and r["metric"] == "peak_memory" for r in rows)],
         f"Peak memory vs n (tau = {grid.tau_ref}, {dtype}, batch {grid.batch})"),
        ("time_vs_tau.png", "tau", 3,
         [(PASS_TITLES[p], "time (s)", {"pass": p, "n": grid.n_ref, "d": (grid.tau_ds or grid.ds)[0],
                                        "metric": "time", "dtype": dtype, "batch": grid.batch}) for p in PASS_TITLES],
         f"Time vs tau (n = {grid.n_ref}, d = {(grid.tau_ds or grid.ds)[0]}, {dtype}, batch {grid.batch})"),
        ("error_vs_n.png", "n", 3,
         [(ERROR_TITLES[m], "relative error vs float64", {"metric": m, "d": grid.ds[0], **sweep})
          for m in ERROR_TITLES],
         f"Relative error vs n (tau = {grid.tau_ref}, d = {grid.ds[0]}, {dtype}; reference: dense float64)"),
    ]
    written = []
    for name, x_key, columns, panels, title in figures:
        if panels and (path := _figure(folder / name, panels, rows, x_key, variants, title, columns)):
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    from .schema import read_csv

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print("usage: python -m triton_sort.bench.plots OUT_FOLDER CSV [CSV ...]")
        return 2
    folder = Path(argv[0])
    rows = [row for path in argv[1:] for row in read_csv(Path(path))]
    print("wrote " + ", ".join(str(p) for p in make_plots(rows, folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
