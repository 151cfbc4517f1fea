"""Autotuning of the kernels' launch configurations (installed as ``triton_sort.autotune``).

``triton-sort autotune`` times every candidate of ``kernels.configs.candidate_configs`` per device, Triton version,
kernel source, dtype, d bucket and n bucket, and records the fastest in a JSON cache (``cache``); the launchers
read it through ``kernels.configs.launch_config`` (``lookup``), falling back to the package's shipped defaults
(``tuned/``) and then to the heuristic. Nothing is tuned implicitly. Modules: ``keys`` (what results are keyed
by), ``registry`` (the tunable kernels), ``prune`` (compile-only pruning), ``tuner`` (the loop), ``cli``.
"""
