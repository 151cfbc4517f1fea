"""Triton kernels of triton_sort (installed as ``triton_sort.kernels``). Importing this package imports Triton."""
