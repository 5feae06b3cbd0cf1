"""Helpers shared by the training tests: a small recipe over the bundled tiny data, prepared once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from hermes_pipeline.data_prep.pipeline import run_prep
from hermes_pipeline.recipe.loader import load_recipe
from hermes_pipeline.recipe.schema import Recipe
from hermes_pipeline.train.checkpoints import SEAL

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "data" / "tiny"


def small_recipe_dict(run_dir: Path) -> dict[str, Any]:
    """A few dozen rows of every kind, short sequences, a handful of steps: seconds per stage on a CPU."""
    train = {
        "mode": "full",
        "precision": "fp32",
        "gradient_checkpointing": False,
        "micro_batch_size": 2,
        "save_steps": 2,
        "save_total_limit": 2,
        "logging_steps": 1,
        "warmup_ratio": 0.0,
        "resources": {"nodes": 1, "gpus_per_node": 0, "processes_per_node": 1, "cpus_per_task": 2},
    }
    return {
        "name": "small",
        "seed": 0,
        "run_dir": str(run_dir),
        "model": {
            "init": "random",
            "config": str(ROOT / "configs/models/tiny-mistral.json"),
            "dtype": "float32",
        },
        "tokenizer": {"name_or_path": str(ROOT / "hermes_pipeline/assets/tiny_tokenizer")},
        "data": {
            "max_seq_len": 256,
            "overlong": "truncate",
            "val_fraction": 0.2,
            "num_proc": 1,
            "sources": [
                {
                    "name": "openhermes",
                    "kind": "openhermes",
                    "path": str(TINY / "openhermes.json"),
                    "max_rows": 40,
                },
                {
                    "name": "function_calling",
                    "kind": "function_calling",
                    "path": str(TINY / "function_calling.json"),
                    "mode": "canonical",
                    "max_rows": 30,
                },
                {
                    "name": "orca",
                    "kind": "orca_dpo_pairs",
                    "path": str(TINY / "orca_dpo_pairs.jsonl"),
                    "max_rows": 40,
                },
            ],
        },
        "sft": {**train, "learning_rate": 1e-3, "max_steps": 6},
        "dpo": {**train, "learning_rate": 5e-5, "max_steps": 4, "init_from": "sft"},
        "export": {"enabled": False},
        "eval": {"enabled": False},
        "tracking": {"mode": "disabled"},
    }


def write_recipe(folder: Path, raw: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def prepared(folder: Path, raw: dict[str, Any], prep_from: Path | None = None) -> tuple[Path, Recipe]:
    """Write the recipe and give it a finished prep stage (copied from ``prep_from`` when given)."""
    path = write_recipe(folder, raw)
    recipe = load_recipe(path)
    if prep_from is not None:
        shutil.copytree(prep_from, Path(raw["run_dir"]) / "prep")
    else:
        run_prep(recipe, log=lambda _: None)
    return path, recipe


def cli(
    *args: str, env: dict[str, str] | None = None, check: bool = True, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """Run ``hermes-pipeline`` in a fresh process, as a user (or a SLURM job) would, from ``cwd``."""
    result = subprocess.run(
        [sys.executable, "-m", "hermes_pipeline.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"hermes-pipeline {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}"
        )
    return result


def popen_cli(*args: str) -> subprocess.Popen[str]:
    """``hermes-pipeline`` started in the background in its own session, for a test to signal or kill."""
    return subprocess.Popen(
        [sys.executable, "-m", "hermes_pipeline.cli", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_seal(process: subprocess.Popen[str], checkpoint: Path) -> None:
    """Wait until ``checkpoint`` is sealed; fail if the process ends first."""
    deadline = time.time() + 300
    while not (checkpoint / SEAL).is_file():
        assert process.poll() is None, (
            f"training ended before {checkpoint.name}: {process.stderr.read()[-3000:]}"
        )
        assert time.time() < deadline
        time.sleep(0.05)
