"""Autotuning: keys, the cache (round trip, corrupt files, concurrent writers), compile-only pruning, the lookup
at launch time and the whole tune -> cache -> use path in Triton's interpreter, through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from triton_sort.autotune import cache, keys, lookup
from triton_sort.autotune.cli import main as autotune_main
from triton_sort.autotune.prune import DeviceLimits, compile_metadata, job, parse_ptxas_log, prune_reason
from triton_sort.autotune.registry import KERNELS
from triton_sort.autotune.tuner import plan
from triton_sort.kernels import configs, launch
from triton_sort.kernels.configs import KERNEL_NAMES, KernelConfig, candidate_configs, default_config, launch_config

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """An empty user cache and no shipped defaults, and nothing memoised before or after the test."""
    monkeypatch.setenv("TRITON_SORT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(lookup, "SHIPPED", tmp_path / "shipped")
    lookup.clear()
    yield tmp_path / "cache"
    lookup.clear()


def _record(kernel: str, key: str, config: KernelConfig, *, triton_version: str | None = None,
            source_hash: str | None = None) -> Path:
    path = cache.cache_path(keys.INTERPRETER)
    cache.record(path, keys.INTERPRETER, triton_version or lookup.triton_version(), kernel,
                 source_hash or lookup.source_hashes()[kernel], key, {"config": config.as_dict(), "time_ms": 1.0})
    return path


# ------------------------------------------------------------------------------------------------------ keys
@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("H100 SXM", "h100"), ("NVIDIA H100 PCIe", "h100"),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "h100"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA A100 80GB PCIe", "a100"), ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("Tesla V100-SXM2-16GB", "v100"),
    ("NVIDIA GH200 480GB", "gh200"), ("AMD Instinct MI300X", "mi300x"),
])
def test_device_names_are_normalised_per_chip(name, expected):
    assert keys.normalise_device_name(name) == expected


def test_n_is_bucketed_to_the_next_power_of_two_and_d_to_block_d():
    assert [keys.n_bucket(n) for n in (1, 2, 3, 1000, 1024, 1025)] == [1, 2, 4, 1024, 1024, 2048]
    tasks = plan(["matrix_forward", "apply_forward"], ns=[600, 1000], ds=[1, 16, 20], dtypes=["fp32"])
    # n 600 and 1000 share the 1024 bucket; d 16 -> block_d 16, d 20 -> block_d 32.
    assert sorted(t.key for t in tasks if t.spec.name == "apply_forward") == [
        "fp32/d1/n1024", "fp32/d16/n1024", "fp32/d32/n1024"]
    assert [t.key for t in tasks if t.spec.name == "matrix_forward"] == ["fp32/d1/n1024"]  # ignores d
    assert keys.parse_entry_key("bf16/d64/n4096") == ("bf16", 64, 4096)


@triton.jit
def _helper(x):
    return x + 1


@triton.jit
def _toy_kernel(X):
    tl.store(X, _helper(tl.load(X)))


@triton.jit
def _other_helper(x):
    return x + 2


def test_kernel_source_hash_covers_the_jit_helpers_it_calls(monkeypatch):
    compute = keys.kernel_source_hash.__wrapped__  # the uncached function
    before = compute(_toy_kernel)
    assert before == compute(_toy_kernel) and len(before) == 16
    monkeypatch.setitem(_toy_kernel.fn.__globals__, "_helper", _other_helper)
    assert compute(_toy_kernel) != before


def test_every_kernel_is_registered_once_with_a_launcher_taking_config():
    import inspect

    assert set(KERNELS) == set(KERNEL_NAMES)
    for name, spec in KERNELS.items():
        assert "config" in inspect.signature(getattr(launch, name)).parameters
        assert len(keys.kernel_source_hash(spec.kernel)) == 16


# ------------------------------------------------------------------------------------------------------ cache
def test_cache_round_trip_and_stale_kernel_tables_are_replaced(isolated_cache):
    small, large = candidate_configs("apply_forward", 1)[1:]
    path = _record("apply_forward", "fp32/d1/n64", small)
    _record("apply_forward", "fp32/d1/n256", large)
    doc = cache.parse(path.read_text(), triton_version=lookup.triton_version())
    assert path.parent == isolated_cache / "autotune" and path.name == "interpreter-cpu.json"
    entries = lookup.usable_entries(doc, "test")["apply_forward"]
    assert {key: KernelConfig(**entry["config"]) for key, entry in entries.items()} == {
        "fp32/d1/n64": small, "fp32/d1/n256": large}
    assert path.read_text().startswith("{\n")  # indented, readable
    _record("apply_forward", "fp32/d1/n64", small, source_hash="0" * 16)  # the kernel changed: old entries go
    assert list(json.loads(path.read_text())["kernels"]["apply_forward"]["entries"]) == ["fp32/d1/n64"]


def test_lookup_prefers_the_user_cache_then_shipped_then_default_and_uses_the_nearest_bucket(tmp_path):
    base, small, large = candidate_configs("apply_forward", 1)
    shipped_doc = cache.new_document(keys.INTERPRETER, "0.0")  # shipped files are used under any Triton version
    shipped_doc["kernels"]["apply_forward"] = {"source_hash": lookup.source_hashes()["apply_forward"], "entries": {
        "fp32/d1/n64": {"config": small.as_dict()}, "fp32/d1/n1024": {"config": large.as_dict()}}}
    (tmp_path / "shipped").mkdir()
    (tmp_path / "shipped" / "interpreter-cpu.json").write_text(json.dumps(shipped_doc))
    _record("apply_forward", "fp32/d1/n1024", base)

    def config(n: int, d: int = 1, dtype: torch.dtype = torch.float32) -> KernelConfig:
        return launch_config("apply_forward", n=n, d=d, dtype=dtype, device=CPU)

    assert config(1000) == base  # user cache beats shipped for the same bucket
    assert config(50) == small  # only shipped has this bucket
    # Otherwise the nearest tuned bucket in log2 n: 128 -> 64, 512 -> 1024, and 256 (a tie) -> the larger, 1024.
    assert (config(100), config(400), config(200)) == (small, base, base)
    assert config(1000, d=16) == default_config("apply_forward", 16)  # nothing tuned for d = 16
    assert config(1000, dtype=torch.float16) == default_config("apply_forward", 1)


def test_lookup_is_memoised_and_reads_each_file_once(monkeypatch):
    _record("apply_forward", "fp32/d1/n64", candidate_configs("apply_forward", 1)[1])
    reads = []
    original = cache.read
    monkeypatch.setattr(cache, "read", lambda path, **kwargs: reads.append(path) or original(path, **kwargs))
    for n in (64, 40, 33, 64, 1000, 5000):
        launch_config("apply_forward", n=n, d=1, dtype=torch.float32, device=CPU)
    assert len(reads) == 2  # the shipped file and the user's, once
    assert len([k for k in configs._LAUNCH_CONFIGS if k[0] == "apply_forward"]) == 3  # buckets 64, 1024, 8192


@pytest.mark.parametrize("content, reason", [
    ("{not json", "not valid JSON"),
    (b'{"schema": 1, "device": "\xff\xfe"}', "not UTF-8 text"),
    ('{"schema": 99, "kernels": {}}', "schema 99"),
    ("[1, 2]", "schema 'list'"),
    ('{"schema": 1, "kernels": []}', "no valid 'kernels' table"),
    ('{"schema": 1, "kernels": {"apply_forward": {"entries": [1]}}}', "no valid 'kernels' table"),
    ("OTHER_TRITON", "tuned with Triton 0.0.1"),
    ("OTHER_SOURCE", "another version of the kernel"),
    ("NOT_A_CANDIDATE", "not a candidate configuration"),
])
def test_unusable_cache_is_reported_once_and_ignored(content, reason):
    if content == "OTHER_TRITON":
        path = _record("apply_forward", "fp32/d1/n64", candidate_configs("apply_forward", 1)[1], triton_version="0.0.1")
    elif content == "OTHER_SOURCE":
        path = _record("apply_forward", "fp32/d1/n64", candidate_configs("apply_forward", 1)[1], source_hash="f" * 16)
    elif content == "NOT_A_CANDIDATE":
        path = _record("apply_forward", "fp32/d1/n64", KernelConfig(16, 16, 4, 2))
    else:
        path = cache.cache_path(keys.INTERPRETER)
        path.parent.mkdir(parents=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in (64, 200, 3000):
            assert launch_config("apply_forward", n=n, d=1, dtype=torch.float32, device=CPU) == default_config(
                "apply_forward", 1)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and reason in messages[0], messages
    # The next write replaces a file that cannot be used, and says so; a usable file only loses its stale entries.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _record("apply_forward", "fp32/d1/n64", candidate_configs("apply_forward", 1)[2])
    fresh = [str(w.message) for w in caught if "starting a fresh tuning file" in str(w.message)]
    assert len(fresh) == (content not in ("OTHER_SOURCE", "NOT_A_CANDIDATE")), fresh
    assert cache.parse(path.read_text(), triton_version=lookup.triton_version())["kernels"]


def test_tuning_and_show_survive_a_cache_that_is_not_utf8(isolated_cache, capsys):
    """A non-UTF-8 file is a warning and a fresh file for the tuner, and a line of --show, never a traceback."""
    path = cache.cache_path(keys.INTERPRETER)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x80\x81 not text")
    assert autotune_main(["--show"]) == 0
    assert "unusable (not UTF-8 text" in capsys.readouterr().out
    with pytest.warns(RuntimeWarning, match="not UTF-8 text.*starting a fresh tuning file"):
        _record("apply_forward", "fp32/d1/n64", candidate_configs("apply_forward", 1)[1])
    assert list(json.loads(path.read_text())["kernels"]["apply_forward"]["entries"]) == ["fp32/d1/n64"]


def test_show_reports_malformed_entries_instead_of_crashing(isolated_cache, capsys):
    doc = cache.new_document(keys.INTERPRETER, "0.0")
    doc["kernels"]["apply_forward"] = {"source_hash": "0" * 16, "entries": {
        "fp32/d1/n64": 5, "fp32/d1/n128": {"config": {"block_m": 16}, "time_ms": "fast"},
        "fp32/d1/n256": {"config": {"block_m": 32}, "time_ms": 0.5, "speedup": 1.25, "timer": "do_bench"}}}
    path = cache.cache_path(keys.INTERPRETER)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(doc))
    assert autotune_main(["--show"]) == 0
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert "malformed entry (int, expected an object)" in lines["fp32/d1/n64"]
    assert '{"block_m": 16}  ? ms, ?x the default (?)' in lines["fp32/d1/n128"]
    assert '{"block_m": 32}  0.5 ms, 1.25x the default (do_bench)' in lines["fp32/d1/n256"]


@pytest.mark.parametrize("argv, message", [
    (["--n", "0"], "argument --n: expected an integer >= 1, got 0"),
    (["--d", "0"], "argument --d: expected an integer >= 1, got 0"),
    (["--n", "64", "--d", "-3"], "argument --d: expected an integer >= 1, got -3"),
    (["--n", "abc"], "argument --n: expected an integer >= 1, got 'abc'"),
    (["--reps", "0"], "argument --reps"),
    (["--batch", "-1"], "argument --batch"),
    (["--kernel", "apply_sideways"], "argument --kernel: invalid choice: 'apply_sideways'"),
])
def test_cli_rejects_bad_arguments_before_tuning(argv, message, monkeypatch, capsys):
    tuned = []
    monkeypatch.setattr("triton_sort.autotune.tuner.tune", lambda *args, **kwargs: tuned.append(args) or [])
    with pytest.raises(SystemExit) as exit_info:
        autotune_main(["--allow-interpreter", *argv])
    assert exit_info.value.code == 2 and not tuned
    assert message in capsys.readouterr().err
    assert not cache.cache_path(keys.INTERPRETER).exists()


def test_concurrent_writers_lose_nothing(isolated_cache):
    code = """
import sys
from triton_sort.autotune import cache, keys, lookup
path = cache.cache_path(keys.INTERPRETER)
version, hashes = lookup.triton_version(), lookup.source_hashes()
for i in range(40):  # each process its own dtype: 80 distinct keys in all
    cache.record(path, keys.INTERPRETER, version, "apply_forward", hashes["apply_forward"],
                 f"{sys.argv[1]}/d1/n{2 ** i}", {"config": {}})
"""
    env = {**os.environ, "TRITON_SORT_CACHE_DIR": str(isolated_cache)}
    writers = [subprocess.Popen([sys.executable, "-c", code, name], env=env, stderr=subprocess.PIPE, text=True)
               for name in ("fp32", "fp16")]
    for writer in writers:
        assert writer.wait(timeout=120) == 0, writer.stderr.read()
    entries = json.loads(cache.cache_path(keys.INTERPRETER).read_text())["kernels"]["apply_forward"]["entries"]
    assert len(entries) == 80
    assert not list((isolated_cache / "autotune").glob("*.tmp"))  # temporary files were all renamed


# ---------------------------------------------------------------------------------------------------- pruning
BROKEN = KernelConfig(block_m=48, block_n=64)  # tl.arange needs a power of two: does not compile


@pytest.fixture(scope="module")
def apply_forward_metadata() -> dict[KernelConfig, dict]:
    """Compile-only metadata (sm_80) of apply_forward's candidates at d = 1, plus one that does not compile."""
    configs_ = [*candidate_configs("apply_forward", 1), BROKEN]
    metadata = compile_metadata([job("apply_forward", c, "fp32", 1) for c in configs_], arch=80)
    return dict(zip(configs_, metadata, strict=True))


def test_pruning_uses_compile_only_metadata(apply_forward_metadata):
    metadata = dict(apply_forward_metadata)
    broken = metadata.pop(BROKEN)
    assert "power of 2" in broken["error"]
    assert "does not compile" in prune_reason(broken, BROKEN, DeviceLimits(80, 1 << 20))
    # ptxas -v reports registers and spilled bytes of every compiled candidate.
    assert all(meta["shared_bytes"] > 0 and meta["registers"] > 0 and meta["spill_bytes"] >= 0
               for meta in metadata.values())
    smallest = min(meta["shared_bytes"] for meta in metadata.values())
    tight = DeviceLimits(80, max_shared_bytes=smallest)
    reasons = {config: prune_reason(meta, config, tight) for config, meta in metadata.items()}
    assert all((reason is None) == (metadata[config]["shared_bytes"] <= smallest) for config, reason in reasons.items())
    assert any(reason and "shared memory" in reason for reason in reasons.values())
    config, meta = next(iter(metadata.items()))
    few_registers = DeviceLimits(80, 1 << 20, max_registers_per_block=meta["registers"] * config.num_warps * 32 - 1)
    assert "registers" in prune_reason(meta, config, few_registers)


def test_ptxas_spills_are_parsed():
    log = ("ptxas info    : Compiling entry function 'apply_forward_kernel' for 'sm_80'\n"
           "ptxas info    : Function properties for apply_forward_kernel\n"
           "    1400 bytes stack frame, 2056 bytes spill stores, 1848 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 1400 bytes cumulative stack size\n")
    assert parse_ptxas_log(log) == {"registers": 255, "spill_bytes": 2056 + 1848}
    assert parse_ptxas_log("") == {"registers": None, "spill_bytes": None}


# ------------------------------------------------------------------------------------- tune -> cache -> use
def _launched_configs(monkeypatch, kernel) -> list[dict]:
    """Record the launch parameters of every launch of a ``@triton.jit`` kernel (``kernel[grid](...)`` calls
    ``kernel.run``)."""
    seen = []
    original = kernel.run

    def run(*args, **kwargs):
        seen.append({key: kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")})
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", run)
    return seen


def test_tune_cache_use_end_to_end_in_the_interpreter(apply_forward_metadata, isolated_cache, monkeypatch, capsys):
    # A shared-memory limit just below the largest candidate's need: that candidate is pruned before timing.
    shared = {config: meta["shared_bytes"] for config, meta in apply_forward_metadata.items()
              if config in candidate_configs("apply_forward", 1)}
    assert min(shared.values()) < max(shared.values())
    assert autotune_main(["--allow-interpreter", "--kernel", "apply_forward", "--n", "48", "--d", "1",
                          "--max-shared", str(max(shared.values()) - 1), "--reps", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "apply_forward fp32 d1 n64:" in out and "the default" in out and "pruned" in out

    doc = json.loads(cache.cache_path(keys.INTERPRETER).read_text())
    entry = doc["kernels"]["apply_forward"]["entries"]["fp32/d1/n64"]
    statuses = {KernelConfig(**row["config"]): row["status"] for row in entry["candidates"]}
    assert statuses == {config: "pruned" if size == max(shared.values()) else "timed"
                        for config, size in shared.items()}
    tuned = KernelConfig(**entry["config"])
    assert statuses[tuned] == "timed" and tuned != default_config("apply_forward", 1)

    # The launcher now uses the tuned configuration for every n of the bucket, without tuning again.
    seen = _launched_configs(monkeypatch, KERNELS["apply_forward"].kernel)
    from triton_sort import relaxed_sort_apply
    from triton_sort.kernels import launch

    monkeypatch.setattr(launch, "SHORT_MAX_N", 0)  # lists this short take the one-launch kernels otherwise

    for n in (40, 64):
        relaxed_sort_apply(torch.randn(n), torch.randn(n), 0.5, backend="triton")
    expected = {"BLOCK_M": tuned.block_m, "BLOCK_N": tuned.block_n, "num_warps": tuned.num_warps,
                "num_stages": tuned.num_stages}
    assert seen == [expected, expected]

    # A second run finds the key in the cache; --show prints it.
    assert autotune_main(["--allow-interpreter", "--kernel", "apply_forward", "--n", "64", "--d", "1",
                          "--no-progress"]) == 0
    assert "1 keys already tuned" in capsys.readouterr().out
    assert autotune_main(["--show"]) == 0
    assert "fp32/d1/n64" in capsys.readouterr().out


def test_cli_without_a_gpu_says_real_tuning_needs_one(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert autotune_main([]) == 1
    assert "real tuning needs a CUDA GPU" in capsys.readouterr().out
    from triton_sort.cli import SUBCOMMANDS

    assert SUBCOMMANDS["autotune"] == "triton_sort.autotune.cli"
