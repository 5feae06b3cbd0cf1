import os

import pytest
from slurm_support import slurm_cluster  # noqa: F401 - a real SLURM cluster, started once per session
from tiny_run import (
    start_early,
    stop_early,
    tiny_run,  # noqa: F401 - the tiny recipe trained in full, once per session
)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def pytest_collection_finish(session: pytest.Session) -> None:
    start_early(session)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stop_early(interrupted=exitstatus == pytest.ExitCode.INTERRUPTED)
