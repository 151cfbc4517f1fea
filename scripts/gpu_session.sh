#!/usr/bin/env bash
# The whole GPU session in one device call, from the repository root of a copy of the working tree:
#     bash scripts/gpu_session.sh        (results in $OUT/gpu; $OUT defaults to ./gpu_check_out)
# Installs the package into the image's Python without downloading anything (torch and Triton are already there;
# no build isolation, which would fetch setuptools), then runs triton-sort gpu-check within its budget. If the
# install fails, gpu-check still runs from the checkout (python -m from the repository root).
set -u
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-gpu_check_out}"
"$PYTHON" -m pip install -e . --no-deps --no-build-isolation -q || echo "pip install failed: running from the checkout"
"$PYTHON" -m triton_sort.cli gpu-check --budget-s "${BUDGET_S:-420}" --out "$OUT/gpu"
