"""A stage's place in the run directory. Two commands on one stage: the second stops in one line naming
the holder, and a dead holder's lock is free again at once (the kernel drops it), so a kill or a requeue
never leaves a lock to clear by hand. A finished stage whose outputs were damaged since is done again."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from train_support import cli, prepared, small_recipe_dict, write_recipe

from hermes_pipeline.errors import UserError
from hermes_pipeline.recipe.loader import load_recipe
from hermes_pipeline.rundir import MANIFEST, stage_dir
from hermes_pipeline.stages import run_stage

Holder = Callable[[Path], subprocess.Popen[str]]

HOLD = """
import sys, time
from pathlib import Path
from hermes_pipeline.locks import stage_lock
with stage_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder() -> Iterator[Holder]:
    """Start a process that holds a stage's lock until it is killed."""
    started: list[subprocess.Popen[str]] = []

    def hold(folder: Path) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True
        )
        assert process.stdout is not None and process.stdout.readline() == "held\n"
        started.append(process)
        return process

    yield hold
    for process in started:
        process.kill()
        process.wait()


def test_a_stage_in_use_is_refused_and_free_again_once_its_holder_dies(
    tmp_path: Path, holder: Holder
) -> None:
    recipe = load_recipe(write_recipe(tmp_path, small_recipe_dict(tmp_path / "run")))
    folder = stage_dir(recipe, "final")
    ran: list[Path] = []

    def body(partial: Path) -> None:
        ran.append(partial)
        (partial / "file").write_text("x")

    process = holder(folder)
    with pytest.raises(UserError) as refused:
        run_stage(recipe, "package", folder, {}, body, log=lambda _: None)
    message = str(refused.value)
    assert f"another command is writing this stage (PID {process.pid} on {socket.gethostname()}" in message
    assert "\n" not in message and not ran and not folder.exists()

    os.kill(process.pid, signal.SIGKILL)  # what a crash, kill -9 or a SLURM requeue does to the holder
    process.wait()
    assert run_stage(recipe, "package", folder, {}, body, log=lambda _: None)
    assert len(ran) == 1 and (folder / MANIFEST).is_file()


@pytest.mark.parametrize("command", [("prep",), ("train", "sft")])
def test_a_second_command_on_a_busy_stage_is_one_line(
    tmp_path: Path, holder, command: tuple[str, ...]
) -> None:
    raw = small_recipe_dict(tmp_path / "run")
    if command[0] == "prep":
        recipe = write_recipe(tmp_path, raw)
    else:
        recipe, _ = prepared(tmp_path, raw)
    folder = tmp_path / "run" / command[-1]
    holder(folder)
    result = cli(*command, str(recipe), check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "another command is writing this stage (PID" in lines[0], result.stderr
    assert not folder.exists() and not folder.with_name(folder.name + ".partial").exists()


def test_a_finished_stage_with_a_damaged_output_is_done_again(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, small_recipe_dict(tmp_path / "run")))
    folder = stage_dir(recipe, "final")
    runs: list[str] = []

    def body(partial: Path) -> None:
        runs.append("ran")
        (partial / "weights").write_bytes(b"w" * 100)

    messages: list[str] = []
    assert run_stage(recipe, "package", folder, {}, body, log=messages.append)
    assert not run_stage(recipe, "package", folder, {}, body, log=messages.append)  # whole: skipped
    with (folder / "weights").open("r+b") as weights:
        weights.truncate(40)
    assert run_stage(recipe, "package", folder, {}, body, log=messages.append)
    assert (
        messages[-1]
        == f"package: {folder / 'weights'} has 40 bytes where 100 were written; redoing the stage"
    )
    (folder / "weights").unlink()
    assert run_stage(recipe, "package", folder, {}, body, log=messages.append)
    assert messages[-1] == f"package: {folder / 'weights'} is missing; redoing the stage"
    assert len(runs) == 3 and (folder / "weights").stat().st_size == 100


def test_verify_unmarks_a_stage_whose_output_changed_at_the_same_size(tmp_path: Path) -> None:
    recipe_path = write_recipe(tmp_path, small_recipe_dict(tmp_path / "run"))
    recipe = load_recipe(recipe_path)
    folder = stage_dir(recipe, "final")

    def body(partial: Path) -> None:
        (partial / "weights").write_bytes(b"w" * 100)

    run_stage(recipe, "package", folder, {}, body)
    assert "package: every output matches its manifest" in cli("verify", str(recipe_path)).stdout
    with (folder / "weights").open("r+b") as weights:
        weights.write(b"x")  # one byte flipped: the size check on every start cannot see it
    assert run_stage(recipe, "package", folder, {}, lambda _: None, log=lambda _: None) is False

    verified = cli("verify", str(recipe_path)).stdout
    assert (
        f"package: {folder / 'weights'} differs from the sha256 its manifest recorded; "
        "no longer counts as finished, the next run redoes it"
    ) in verified
    assert not (folder / MANIFEST).exists() and "prep" not in verified  # prep never ran: nothing to check
    assert run_stage(recipe, "package", folder, {}, lambda _: None, log=lambda _: None) is True
