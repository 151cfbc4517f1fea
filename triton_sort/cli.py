"""The ``triton-sort`` command: ``triton-sort {memory,scaling,report,autotune,gpu-check,model} ...``."""

from __future__ import annotations

import sys

SUBCOMMANDS = {
    "memory": "triton_sort.bench.memory",
    "scaling": "triton_sort.bench.scaling",
    "report": "triton_sort.bench.report",
    "autotune": "triton_sort.autotune.cli",
    "gpu-check": "triton_sort.bench.gpu_check",
    "model": "triton_sort.bench.model",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print("usage: triton-sort {" + ",".join(SUBCOMMANDS) + "} [options]  (--help after a subcommand)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    import importlib

    return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
