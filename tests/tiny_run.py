"""The tiny recipe trained in full once per test session, as `make demo` trains it.

Training it is most of a test session's time, so the tests that need a fully trained run share this one:
the demo test checks what `hermes-pipeline run` produced, and the SLURM chain test starts its run directory
from this run's trained stages. Tests copy what they change; none writes into this folder.

Under `pytest -n` every worker has a session of its own, so the run lives in the folder all workers share,
and a file lock lets one process train it while any other waits for it. When the session has a test that
needs it, training starts in the background as soon as collection ends (``start_early``), so it overlaps the
tests that come before its users instead of starting when the first of them is reached.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock
from train_support import ROOT, cli

from hermes_pipeline.rundir import MANIFEST

TINY_RECIPE = ROOT / "configs" / "recipes" / "tiny.yaml"
_early: subprocess.Popen[bytes] | None = None


def _shared(factory: pytest.TempPathFactory) -> Path:
    base = factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


def train(shared: Path) -> Path:
    """The finished run under ``shared``, trained here unless another process finished it first."""
    run = shared / "tiny-run"
    with FileLock(shared / "tiny-run.lock"):
        if not (run / "card" / MANIFEST).is_file():  # the last stage: a run cut short is trained again
            shutil.rmtree(run, ignore_errors=True)
            cli("run", str(TINY_RECIPE), "--set", f"run_dir={run}")
    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of the tiny recipe: `hermes-pipeline run configs/recipes/tiny.yaml` in a fresh process.

    If the early start failed, this trains the run again in the foreground, so the failure is reported by
    the test that needed it."""
    return train(_shared(tmp_path_factory))


def start_early(session: pytest.Session) -> None:
    """Start training in the background when a selected test needs the run; once per session, whichever
    worker gets here first."""
    global _early
    if session.config.option.collectonly or not any(
        "tiny_run" in getattr(item, "fixturenames", ()) for item in session.items
    ):
        return
    shared = _shared(session.config._tmp_path_factory)  # type: ignore[attr-defined]
    try:
        os.close(os.open(shared / "tiny-run.started", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    with (shared / "tiny-run.log").open("wb") as log:
        _early = subprocess.Popen(
            [sys.executable, __file__, str(shared)], stdout=log, stderr=log, start_new_session=True
        )


def stop_early(interrupted: bool) -> None:
    """At the end of the session that started it: wait for the training (a test on another worker may be
    waiting for it too), or stop it when the session was interrupted."""
    if _early is None or _early.poll() is not None:
        return
    if interrupted:
        os.killpg(_early.pid, signal.SIGTERM)
    _early.wait()


if __name__ == "__main__":
    train(Path(sys.argv[1]))
