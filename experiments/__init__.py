"""Experiments of Grover et al. (2019) with triton_sort: runnable as ``python -m experiments.NAME``; not shipped."""
