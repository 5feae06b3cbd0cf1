"""The tiny recipe trained in full once per test session, as `make demo` trains it.

Training it is most of a test session's time, so the tests that need a fully trained run share this one:
the demo test checks what `hermes-pipeline run` produced, and the SLURM chain test starts its run directory
from this run's trained stages. Tests copy what they change; none writes into this folder.

Under `pytest -n` every worker has a session of its own, so the run lives in the folder all workers share,
and a file lock lets the first worker that needs it train it while any other waits for it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from filelock import FileLock
from train_support import ROOT, cli

from hermes_pipeline.rundir import MANIFEST

TINY_RECIPE = ROOT / "configs" / "recipes" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of the tiny recipe: `hermes-pipeline run configs/recipes/tiny.yaml` in a fresh process."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base
    run = shared / "tiny-run"
    with FileLock(shared / "tiny-run.lock"):
        if not (run / "card" / MANIFEST).is_file():  # the last stage: a run cut short is trained again
            shutil.rmtree(run, ignore_errors=True)
            cli("run", str(TINY_RECIPE), "--set", f"run_dir={run}")
    return run
