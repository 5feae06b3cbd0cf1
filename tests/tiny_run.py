"""The tiny recipe trained in full once per session, as `make demo` trains it.

Training it is most of a test session's time, so the tests that need a fully trained run share this one:
the demo test checks what `hermes-pipeline run` produced, and the SLURM chain test starts its run directory
from this run's trained stages. Tests copy what they change; none writes into this folder. Under
`pytest -n` a session fixture exists once per worker, so every test that uses it is in the `tiny_run`
xdist group, which runs on one worker.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from train_support import ROOT, cli

TINY_RECIPE = ROOT / "configs" / "recipes" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of the tiny recipe: `hermes-pipeline run configs/recipes/tiny.yaml` in a fresh process."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    cli("run", str(TINY_RECIPE), "--set", f"run_dir={run}")
    return run
