"""``triton-sort autotune`` (also ``python -m triton_sort.autotune``): tune this GPU's launch configurations.

Real tuning needs a CUDA GPU. ``--allow-interpreter`` runs the same loop in Triton's CPU interpreter on tiny
sizes (the timings mean nothing there; it checks the tune -> cache -> use path). ``--show`` prints the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from ..bench.schema import positive_int
from ..kernels.configs import KERNEL_NAMES

GPU_DEFAULTS = {"n": [256, 1024, 4096, 16384, 65536], "d": [1, 16, 64, 128], "dtype": ["fp32", "fp16", "bf16"]}
INTERPRETER_DEFAULTS = {"n": [32], "d": [1], "dtype": ["fp32"]}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triton-sort autotune", description=__doc__.splitlines()[0])
    positive = positive_int
    parser.add_argument("--n", type=positive, nargs="+", help="list lengths to tune for (each tunes its power-of-two "
                        f"bucket; default {GPU_DEFAULTS['n']}, interpreter {INTERPRETER_DEFAULTS['n']})")
    parser.add_argument("--d", type=positive, nargs="+", help=f"value widths (default {GPU_DEFAULTS['d']})")
    parser.add_argument("--dtype", nargs="+", choices=GPU_DEFAULTS["dtype"], help="value dtypes (default all)")
    parser.add_argument("--kernel", nargs="+", choices=KERNEL_NAMES, help="kernels to tune (default all)")
    parser.add_argument("--batch", type=positive, help="batch rows while tuning (default: enough for 2^22 entries)")
    parser.add_argument("--reps", type=positive, default=3, help="timed calls per candidate off-GPU (median)")
    parser.add_argument("--force", action="store_true", help="re-tune keys that are already in the cache")
    parser.add_argument("--show", action="store_true", help="print the tuning cache and exit")
    parser.add_argument("--allow-interpreter", action="store_true",
                        help="without a GPU, run the tuning loop in Triton's interpreter (timings are meaningless)")
    parser.add_argument("--arch", type=positive, help="compute capability to prune for under the interpreter (80)")
    parser.add_argument("--max-shared", type=positive, help="override the device's shared memory per block (bytes)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def show() -> int:
    """Print every tuning file of the cache directory: device, Triton version, and one line per entry."""
    from .cache import CacheProblem, cache_dir, read

    files = sorted((cache_dir() / "autotune").glob("*.json"))
    if not files:
        print(f"no tuning results in {cache_dir() / 'autotune'}")
    for path in files:
        try:
            doc = read(path)
        except CacheProblem as problem:
            print(f"{path}: unusable ({problem})")
            continue
        if doc is None:
            continue  # removed since the listing
        print(f"{path}: {doc.get('device_name') or doc.get('device')} ({doc.get('arch')}), Triton {doc.get('triton')}")
        for kernel, table in sorted(doc["kernels"].items()):
            for key, entry in sorted(table["entries"].items()):
                print(f"  {kernel:<16} {key:<18} {_describe(entry)}")
    return 0


def _describe(entry: object) -> str:
    """One entry's configuration, time and speed-up; what is missing or malformed is said, not fatal."""
    if not isinstance(entry, dict):
        return f"malformed entry ({type(entry).__name__}, expected an object)"

    def number(field: str, spec: str) -> str:
        value = entry.get(field)
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return format(value, spec) if is_number else "?"

    return (f"{json.dumps(entry.get('config'))}  {number('time_ms', '.4g')} ms, {number('speedup', '.2f')}x "
            f"the default ({entry.get('timer', '?')})")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.show:
        return show()
    on_gpu = torch.cuda.is_available()
    if on_gpu and torch.version.hip:
        print("triton-sort autotune: tuning supports CUDA GPUs only (pruning compiles for NVIDIA targets)")
        return 1
    if not on_gpu:
        if not args.allow_interpreter:
            print("triton-sort autotune: real tuning needs a CUDA GPU, and none is available here. Run it on the "
                  "machine whose GPU you will use; --allow-interpreter exercises the tuning loop in Triton's CPU "
                  "interpreter on tiny sizes (its timings mean nothing), --show prints the cache.")
            return 1
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernels' definition (their first import)

    from ..kernels.launch import kernels_interpreted
    from .cache import cache_path
    from .keys import device_key
    from .lookup import triton_version
    from .prune import device_limits
    from .registry import KERNELS
    from .tuner import plan, tune

    if not on_gpu and not kernels_interpreted():
        print("triton-sort autotune: this process loaded the kernels without TRITON_INTERPRET; run it in a fresh "
              "process")
        return 1
    defaults = GPU_DEFAULTS if on_gpu else INTERPRETER_DEFAULTS
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    key = device_key(device)
    limits = device_limits(key, args.arch, args.max_shared)
    print(f"tuning for {key.full_name} ({key.stem}), Triton {triton_version()}"
          + ("" if on_gpu else ": Triton interpreter, timings are meaningless"))
    tasks = plan(args.kernel or list(KERNELS), args.n or defaults["n"], args.d or defaults["d"],
                 args.dtype or defaults["dtype"])
    summaries = tune(tasks, device=device, limits=limits, batch=args.batch, reps=args.reps, force=args.force,
                     progress=not args.no_progress)
    cached = sum(summary["status"] == "cached" for summary in summaries)
    print(f"cache: {cache_path(key)}" + (f" ({cached} keys already tuned; --force re-tunes them)" if cached else ""))
    return 1 if any(summary["status"] == "failed" for summary in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
