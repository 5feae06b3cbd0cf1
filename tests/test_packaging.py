"""What `pip install` puts into a user's environment: the project's namespace and nothing else."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from train_support import ROOT

pytestmark = pytest.mark.slow

STAGE_PACKAGES = ("data_prep", "train", "merge", "evals", "slurm")


def test_the_wheel_installs_every_stage_under_hermes_pipeline_and_no_top_level_module(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("hermes_pipeline-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {
        "hermes_pipeline"
    }
    for package in STAGE_PACKAGES:
        assert f"hermes_pipeline/{package}/__init__.py" in names
    assert "hermes_pipeline/chat_format/templates/tool_use.jinja" in names
    assert "hermes_pipeline/assets/tiny_tokenizer/tokenizer.model" in names
