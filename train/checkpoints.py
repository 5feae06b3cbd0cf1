"""Which checkpoint a restarted job resumes from.

transformers' Trainer writes ``checkpoint-N`` folders in place, so a job killed mid-save leaves a folder
that looks like a checkpoint but is not one. ``SealCheckpoints`` (callbacks.py) drops a ``COMPLETE`` file
into a checkpoint once everything in it is on disk; only sealed checkpoints are ever resumed from, and
unsealed ones are removed before training restarts so the Trainer's rotation never keeps them instead.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

SEAL = "COMPLETE"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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


def remove_incomplete(folder: Path) -> list[Path]:
    """Delete checkpoints that were cut off mid-write; returns what was removed."""
    removed = [p for p in checkpoints(folder) if not (p / SEAL).is_file()]
    for path in removed:
        shutil.rmtree(path)
    return removed
