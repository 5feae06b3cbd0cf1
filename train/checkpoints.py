"""Which checkpoint a restarted job resumes from.

transformers' Trainer writes ``checkpoint-N`` folders in place, so a job killed mid-save leaves a folder
that looks like a checkpoint but is not one. ``SealCheckpoints`` (callbacks.py) drops a ``COMPLETE`` file
into a checkpoint once everything in it is on disk, listing every file's size; only sealed checkpoints
whose files still have those sizes, and whose trainer state reads, are resumed from. The others (cut off
mid-write, or damaged since: a truncated shard, a lost trainer state) are removed before training restarts,
so the Trainer's rotation never keeps them instead and the resume falls back to the sealed one before.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from hermes_pipeline.rundir import size_mismatch

SEAL = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def seal(folder: Path, step: int) -> None:
    """Mark ``folder`` complete: its step and the size of every file in it, written last."""
    sizes = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    partial = folder / f"{SEAL}.partial"
    partial.write_text(json.dumps({"step": step, "sizes": sizes}) + "\n", encoding="utf-8")
    partial.rename(folder / SEAL)


def damage(folder: Path) -> str | None:
    """Why a sealed checkpoint cannot be resumed from, or None when it can."""
    try:
        sealed = json.loads((folder / SEAL).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "its seal is unreadable"
    # A seal holding only the step number was written before seals listed sizes.
    if mismatch := size_mismatch(
        folder, sealed.get("sizes", {}) if isinstance(sealed, dict) else {}, "sealed"
    ):
        return mismatch
    try:
        json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{TRAINER_STATE} is missing or unreadable"
    return None


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT.match(path.name)
    return int(match.group(1)) if match else None


def checkpoints(folder: Path) -> list[Path]:
    """Every checkpoint folder under ``folder``, oldest step first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def latest_complete(folder: Path) -> Path | None:
    sealed = [p for p in checkpoints(folder) if (p / SEAL).is_file()]
    return sealed[-1] if sealed else None


def remove_unusable(folder: Path) -> list[tuple[Path, str]]:
    """Delete checkpoints cut off mid-write or damaged since they were sealed; returns each with why."""
    removed = []
    for path in checkpoints(folder):
        reason = "cut off before it was complete" if not (path / SEAL).is_file() else damage(path)
        if reason is not None:
            shutil.rmtree(path)
            removed.append((path, reason))
    return removed


class FinishedResume:
    """A Trainer mixin: resuming from the checkpoint of the last step trains nothing more.

    transformers works out where to resume from the step count and the epoch length; when the last step
    falls inside an epoch (``max_steps``, fractional epochs) it re-enters that epoch and takes one step past
    the end before it checks for the end. A kill after the last checkpoint was sealed, before the model was
    saved, would then finish with one step more than an uninterrupted run. Here every epoch counts as done.
    ``_init_training_state`` is transformers' own (5.x) split of that computation; the resume tests in
    tests/test_train_stage.py fail if a release stops calling it. Both backends' trainers use it.
    """

    def _init_training_state(
        self, max_steps: int, num_update_steps_per_epoch: int, num_train_epochs: int, *args: Any
    ) -> tuple[int, int]:
        epochs_done, batches_to_skip = super()._init_training_state(  # type: ignore[misc]
            max_steps, num_update_steps_per_epoch, num_train_epochs, *args
        )
        if self.state.global_step >= max_steps:  # type: ignore[attr-defined]
            return num_train_epochs, 0
        return epochs_done, batches_to_skip
