"""benchmarks/gpu_check.py --tiny on a CPU: every part of the GPU check runs, or says why it cannot, so that
the script works on the rare day a GPU is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("a_sft_attention", "b_packing", "c_memory", "d_dpo", "e_qlora", "f_packed_loss")
# What a CPU can run; everything else must be skipped with a reason.
MEASURED_ON_CPU = {
    "a_sft_attention": {"packed sdpa"},
    "b_packing": {"packed sdpa", "padded sdpa", "packed over padded"},
    "c_memory": set(),
    "d_dpo": {"reference model", "precomputed"},
    "e_qlora": set(),
    "f_packed_loss": {"sdpa"},
}

pytestmark = pytest.mark.slow


def _run_check(out: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}  # the CPU path, even on a GPU box
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--out", str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run, json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def check(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    return _run_check(tmp_path_factory.mktemp("gpu_check"))


def test_every_part_is_measured_or_skipped_with_a_reason(check: tuple[Any, dict[str, Any]]) -> None:
    _, results = check
    parts = results["parts"]
    assert tuple(parts) == PARTS and results["complete"]
    for part, entries in parts.items():
        assert entries, f"{part} has no entries"
        measured = {name for name, entry in entries.items() if entry["status"] == "measured"}
        assert measured == MEASURED_ON_CPU[part], part
        for name, entry in entries.items():
            if entry["status"] != "measured":
                assert entry["status"] == "skipped" and entry["reason"], f"{part}/{name}: {entry}"
                # a skipped run carries no figure (the memory part keeps plan's estimate, which is no measure)
                assert set(entry) <= {"status", "reason", "plan_gib"}, f"{part}/{name}: {entry}"


def test_cpu_figures_are_real_measurements(check: tuple[Any, dict[str, Any]]) -> None:
    _, results = check
    parts = results["parts"]
    packed, padded = parts["a_sft_attention"]["packed sdpa"], parts["b_packing"]["padded sdpa"]
    for run in (packed, padded, *parts["d_dpo"].values()):
        assert run["timed_steps"] == results["scale"]["steps"] == 1
        assert run["real_tokens_per_s"] > 0 and all(s > 0 for s in run["step_seconds"])
        assert "mfu" not in run and "peak_gpu_memory_gib" not in run  # no GPU: neither is measured
    assert packed["padding_fraction"] == 0 < padded["padding_fraction"]
    loss = parts["f_packed_loss"]["sdpa"]
    assert loss["equal"] and loss["relative_difference"] <= loss["tolerance"] == 1e-5
    for name, memory in parts["c_memory"].items():
        assert memory["plan_gib"]["total"] > 0, name


def test_table_comes_last(check: tuple[Any, dict[str, Any]]) -> None:
    run, results = check
    lines = run.stdout.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == ["part", "run", "status", "figures"])
    rows = lines[start + 2 : -2]  # after the header and its rule; then a blank line and the closing line
    assert len(rows) == sum(len(entries) for entries in results["parts"].values())
    assert all(row.startswith(PARTS) for row in rows)
    assert "gpu_check.json" in lines[-1]


def test_past_the_deadline_the_remaining_runs_are_skipped_and_said_so(tmp_path: Path) -> None:
    """A call near the end of its GPU slot: what has not started is skipped with the reason, and the JSON
    (rewritten after every run, so that a killed call keeps what it measured) is still complete."""
    run, results = _run_check(tmp_path, "--deadline", "0", "--runs", "dpo")
    entries = {
        f"{part}/{name}": entry for part, named in results["parts"].items() for name, entry in named.items()
    }
    assert set(entries) == {"a_sft_attention/matmul_peak", "d_dpo/reference model", "d_dpo/precomputed"}
    for name in ("d_dpo/reference model", "d_dpo/precomputed"):
        assert entries[name]["status"] == "skipped" and entries[name]["reason"].startswith("out of time"), (
            name
        )
        assert name.replace("/", " ") in " ".join(run.stdout.split())  # printed as it was recorded
    assert results["complete"]
