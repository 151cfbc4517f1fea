"""``python -m triton_sort.autotune``: the same as ``triton-sort autotune``."""

import sys

from .cli import main

sys.exit(main())
