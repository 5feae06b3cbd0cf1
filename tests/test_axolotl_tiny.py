"""The tiny recipe trained through axolotl as a user runs it: `run` killed mid-SFT (its stage and the stage's
axolotl die with it), run again to resume, then DPO and packaging. (The GGUF export of the package is the
same stage as after TRL, tested there; the whole recipe through axolotl, export included, is in the README.)"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from train_support import ROOT, cli, popen_cli, wait_for_seal

from hermes_pipeline.axolotl_env import ensure_env
from hermes_pipeline.train.axolotl_run import CONFIG

pytestmark = pytest.mark.slow
TINY = ROOT / "configs" / "recipes" / "tiny.yaml"


def _axolotl_processes(config: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(config).encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_tiny_recipe_through_axolotl_survives_a_kill_and_ends_packaged(
    tmp_path: Path,
) -> None:
    ensure_env(log=lambda _: None)
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        *("sft.backend=axolotl", "sft.max_steps=20", "sft.save_steps=10"),
        *("dpo.backend=axolotl", "dpo.max_steps=4", "dpo.save_steps=2"),
        # one process for axolotl's passes over the data: on rows this few, starting workers costs more
        *("data.num_proc=1", "export.enabled=false", "eval.enabled=false"),
    ]
    command = ["run", str(TINY), *(arg for o in overrides for arg in ("--set", o))]
    process = popen_cli(*command)
    sft = tmp_path / "run" / "sft"
    wait_for_seal(process, sft / "checkpoints" / "checkpoint-10")
    assert _axolotl_processes(sft / "axolotl" / CONFIG), "axolotl should be training as the stage's child"
    os.kill(process.pid, signal.SIGKILL)  # `run` only: its stage, and the stage's axolotl, die with it
    process.wait()
    deadline = time.time() + 30
    while _axolotl_processes(sft / "axolotl" / CONFIG):
        assert time.time() < deadline, "axolotl outlived the stage that started it"
        time.sleep(0.2)
    assert not (sft / "MANIFEST.json").exists()

    finished = cli(*command)
    assert "sft: resuming from checkpoint-10" in finished.stdout
    for stage, steps in (("sft", 20), ("dpo", 4)):
        summary = json.loads((tmp_path / "run" / stage / "summary.json").read_text())
        assert summary["steps"] == steps and summary["saved_logits_max_abs_diff"] < 1e-4
    assert (tmp_path / "run" / "final" / "MANIFEST.json").is_file()
