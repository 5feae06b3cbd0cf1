"""The README's first command: the tiny recipe end to end on a CPU, and it must actually learn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_support import ROOT, cli

pytestmark = pytest.mark.slow


def test_tiny_recipe_runs_end_to_end_and_learns(tmp_path: Path) -> None:
    run = tmp_path / "tiny"
    cli("run", str(ROOT / "configs" / "recipes" / "tiny.yaml"), "--set", f"run_dir={run}")
    losses = [
        record["loss"]
        for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()
        if "loss" in (record := json.loads(line))
    ]
    assert losses[-1] <= losses[0] / 2, f"SFT loss went from {losses[0]:.3f} to {losses[-1]:.3f}"
    dpo = json.loads((run / "dpo" / "summary.json").read_text())
    assert dpo["eval"]["eval_rewards/accuracies"] > 0.5, "DPO reward accuracy on held-out pairs"
    for stage in ("prep", "sft", "dpo"):
        assert (run / stage / "MANIFEST.json").is_file()
