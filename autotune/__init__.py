"""Autotuning of the kernels' launch configurations (installed as ``triton_sort.autotune``).

Not implemented yet: the package launches ``triton_sort.kernels.configs.default_config``.
"""
