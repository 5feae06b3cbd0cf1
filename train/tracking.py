"""Weights & Biases, configured so that a job never blocks on a login prompt and never leaks the API key.

With ``tracking.mode: auto`` a run goes online only when WANDB_API_KEY is set; on clusters without egress
it records offline (``wandb sync`` uploads it later). The key itself is only ever read from the environment
by wandb; nothing of ours writes it into a log, a config or the run directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from hermes_pipeline.errors import UserError
from hermes_pipeline.recipe.schema import Recipe


def wandb_mode(recipe: Recipe) -> str:
    mode = recipe.tracking.mode
    if recipe.tracking.wandb_project is None or mode == "disabled":
        return "disabled"
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def configure_wandb(recipe: Recipe, stage_folder: Path) -> list[str]:
    """Set wandb's environment for this stage and return the Trainer's ``report_to`` list."""
    mode = wandb_mode(recipe)
    if mode == "disabled":
        return []
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        # wandb would ask for a login, and a batch job has nobody to answer.
        raise UserError(
            "tracking.mode is online but WANDB_API_KEY is not set; set it, or use mode auto/offline"
        )
    assert recipe.tracking.wandb_project is not None
    os.environ["WANDB_MODE"] = mode
    os.environ["WANDB_PROJECT"] = recipe.tracking.wandb_project
    os.environ["WANDB_DIR"] = str(stage_folder)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["WANDB_CONSOLE"] = "off"
    os.environ["WANDB_DISABLE_CODE"] = "true"
    return ["wandb"]


def run_name(recipe: Recipe, stage: str) -> str:
    return f"{recipe.tracking.wandb_run_name or recipe.name}-{stage}"
