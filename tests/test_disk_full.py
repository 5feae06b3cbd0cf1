"""A full disk, on a real small file system: training checks the space before each checkpoint, and a write
that meets a full disk anyway ends in one line, with nothing that looks finished."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from train_support import cli, prepared, small_recipe_dict, write_recipe

from hermes_pipeline.disk import no_space_left
from hermes_pipeline.tiny import build_tiny_model
from hermes_pipeline.train.checkpoints import SEAL

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An empty 64 kB tmpfs (resize it with ``resize``); mounting needs root, as CI has."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def resize(disk: Path, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(disk)], check=True)


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The error line a failed command ended with (training prints progress bars before it)."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def test_prep_on_a_full_disk_is_one_line_and_leaves_nothing_finished(
    small_disk: Path, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path, small_recipe_dict(small_disk / "run"))
    line = _one_line(cli("prep", str(recipe), check=False))
    assert "the disk is full" in line and str(small_disk) in line, line
    prep = small_disk / "run" / "prep"
    assert not (prep / "MANIFEST.json").exists()
    assert not prep.with_name("prep.partial").exists()


def test_training_refuses_a_checkpoint_the_disk_cannot_take_then_resumes(
    small_disk: Path, tmp_path: Path
) -> None:
    raw = small_recipe_dict(small_disk / "run")
    raw["sft"] |= {"max_steps": 6, "save_steps": 2}
    resize(small_disk, 200 * 2**20)
    recipe, _ = prepared(tmp_path, raw)
    used = sum(p.stat().st_size for p in small_disk.rglob("*") if p.is_file())
    # Room for the first checkpoint's estimate (weights, two Adam moments and a master copy: 16 bytes a
    # parameter), not for a second checkpoint as large as the first (about 12 bytes a parameter).
    parameters = sum(p.numel() for p in build_tiny_model().parameters())
    resize(small_disk, used + 20 * parameters)
    line = _one_line(cli("train", "sft", str(recipe), check=False))
    checkpoints = small_disk / "run" / "sft" / "checkpoints"
    assert "checkpoint-4 needs about" in line and str(checkpoints) in line, line
    assert "resumes from checkpoint-2" in line, line
    assert (checkpoints / "checkpoint-2" / SEAL).is_file()
    assert not (checkpoints / "checkpoint-4").exists()
    assert not (small_disk / "run" / "sft" / "MANIFEST.json").exists()

    resize(small_disk, 200 * 2**20)
    cli("train", "sft", str(recipe))
    summary = json.loads((small_disk / "run" / "sft" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 6


def test_torch_s_failed_write_counts_as_a_full_disk_only_on_a_full_disk(small_disk: Path) -> None:
    # torch.save on a full disk names no errno, only its stream (seen on this very file system)
    failed = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8659008 vs 8658896")
    resize(small_disk, 4 * 2**20)
    assert no_space_left(failed, small_disk) is None
    with pytest.raises(OSError) as full, (small_disk / "filler").open("wb") as handle:
        while True:
            handle.write(b"\0" * 2**16)
            handle.flush()
    assert no_space_left(full.value) is not None
    assert no_space_left(failed, small_disk) is not None
    assert no_space_left(RuntimeError("unexpected pos 1 vs 2"), None) is None  # no folder to look at
