"""plan's memory estimate against the peaks benchmarks/gpu_check.py measured on a GPU (the JSON it wrote,
kept under benchmarks/results/): for the same settings the estimate must stay within 15% of every peak
whose batches fill the planned shape, so that a change to memory.py drifting from what a GPU measured fails
here, on a CPU. The padded run's rows and the DPO runs' pairs are shorter than max_len (batches padded to their longest
row, far from full), so their peaks say nothing of the estimate and are not compared."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
gpu_check = pytest.importorskip("gpu_check")

TOLERANCE = 0.15
# run name in c_memory -> the file it was measured in, and the recipe settings gpu_check gave that run
COMPARED = {
    "packed sdpa": ("gpu_check-h200.json", ()),
    "qlora": ("gpu_check-h200-qlora.json", ("model.init=pretrained", "sft.mode=qlora")),
}


def _results(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def plan_total(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """plan's total (GiB) for gpu_check's full-size SFT recipe with `settings` added."""
    work = tmp_path_factory.mktemp("gpu_check")
    config = json.loads(gpu_check.TINY_LLAMA.read_text(encoding="utf-8")) | gpu_check.FULL.model
    (work / "model_config.json").write_text(json.dumps(config), encoding="utf-8")
    (work / "base").mkdir()  # QLoRA loads a saved model; plan reads only model.config
    recipe = partial(gpu_check.make_recipe, work, gpu_check.FULL, True, f"model.name_or_path={work / 'base'}")
    return lambda settings: gpu_check.plan_gib(recipe(*settings), "sft")["total"]


@pytest.mark.parametrize("name", list(COMPARED))
def test_plan_is_within_15_percent_of_the_measured_peak(name: str, plan_total: Any) -> None:
    file, settings = COMPARED[name]
    results = _results(file)
    assert results["scale"] == {"tiny": False, **asdict(gpu_check.FULL)}, "gpu_check's FULL scale changed"
    peak = results["parts"]["c_memory"][name]["peak_gpu_memory_gib"]
    estimate = plan_total(settings)
    assert abs(estimate - peak) / peak <= TOLERANCE, (
        f"{name}: plan {estimate:.2f} GiB, measured {peak:.2f} GiB"
    )


def test_attention_kernels_that_keep_less_stay_under_the_estimate(plan_total: Any) -> None:
    """flex attention (and Liger) keep less than the block the estimate counts: an over-estimate, never an
    under-estimate that would let a recipe run out of memory."""
    entries = _results("gpu_check-h200.json")["parts"]["c_memory"]
    for name in ("packed sdpa +liger", "packed flex_attention", "packed flex_attention +liger"):
        assert entries[name]["peak_gpu_memory_gib"] < plan_total(()), name
