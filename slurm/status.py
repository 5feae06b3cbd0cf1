"""Where a submitted recipe stands: each stage's job, its SLURM state, its manifest, and its log.

The controller is asked first (``scontrol show job`` knows every job until MinJobAge after it ends, and
works without an accounting database); ``sacct`` answers for older jobs where accounting is configured.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hermes_pipeline.errors import UserError
from hermes_pipeline.rundir import MANIFEST
from hermes_pipeline.slurm.render import RunFiles

ACTIVE_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
     "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT"}
)  # fmt: skip
NEVER_STARTED = "DependencyNeverSatisfied"


@dataclass(frozen=True)
class JobState:
    state: str  # SLURM's word: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    reason: str = "None"
    exit_code: str = "0:0"


@dataclass(frozen=True)
class StageStatus:
    name: str
    job_id: str | None
    job: JobState | None  # None: skipped at submission, or no longer known to SLURM
    manifest: bool
    log: Path | None

    @property
    def failed(self) -> bool:
        """The stage's own job ended badly (its dependents, cancelled because of it, did not fail)."""
        return (
            self.job is not None
            and self.job.state not in ACTIVE_STATES | {"COMPLETED"}
            and self.job.reason != NEVER_STARTED
        )

    def describe(self) -> str:
        if self.job_id is None:
            return "skipped (done)"
        if self.job is None:
            return "unknown to SLURM now"
        if self.job.reason == NEVER_STARTED:
            return f"{self.job.state}, never started: a stage before it failed"
        if self.failed:
            return f"{self.job.state} (exit {self.job.exit_code}, {self.job.reason})"
        return self.job.state


def read_jobs(files: RunFiles) -> list[dict[str, Any]]:
    if not files.jobs.is_file():
        raise UserError(
            f"{files.root}: no SLURM submission recorded here ({files.jobs} is missing); "
            "submit with `hermes-pipeline slurm submit RECIPE`"
        )
    return json.loads(files.jobs.read_text(encoding="utf-8"))["stages"]


def job_state(job_id: str) -> JobState | None:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if shown.returncode == 0:
        fields = {key: _field(shown.stdout, key) for key in ("JobState", "Reason", "ExitCode")}
        if fields["JobState"]:
            return JobState(fields["JobState"], fields["Reason"] or "None", fields["ExitCode"] or "0:0")
    accounted = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,ExitCode"], capture_output=True, text=True
    )
    line = accounted.stdout.strip().splitlines()[0] if accounted.returncode == 0 and accounted.stdout else ""
    if not line:
        return None
    state, _, exit_code = line.partition("|")
    return JobState(state.split()[0], "None", exit_code or "0:0")


def _field(text: str, key: str) -> str | None:
    match = re.search(rf"\b{key}=(\S+)", text)
    return match.group(1) if match else None


def active_jobs(files: RunFiles) -> list[str]:
    """Job ids of this run directory's last submission that SLURM still has queued or running."""
    if not files.jobs.is_file():
        return []
    ids = [entry["job_id"] for entry in read_jobs(files) if entry["job_id"]]
    return [job_id for job_id in ids if (state := job_state(job_id)) and state.state in ACTIVE_STATES]


def run_status(run_root: Path) -> list[StageStatus]:
    files = RunFiles(run_root.resolve())
    statuses = []
    for entry in read_jobs(files):
        job_id = entry["job_id"]
        statuses.append(
            StageStatus(
                name=entry["name"],
                job_id=job_id,
                job=job_state(job_id) if job_id else None,
                manifest=(Path(entry["folder"]) / MANIFEST).is_file(),
                log=files.log(entry["name"], job_id) if job_id else None,
            )
        )
    return statuses


def format_status(statuses: list[StageStatus]) -> str:
    rows = [("stage", "job", "state", "manifest", "log")]
    rows += [
        (s.name, s.job_id or "-", s.describe(), "complete" if s.manifest else "missing", str(s.log or "-"))
        for s in statuses
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    failed = [s for s in statuses if s.failed]
    lines += [f"failed: {s.name} (job {s.job_id}); its log: {s.log}" for s in failed]
    if not failed and statuses and all(s.manifest for s in statuses):
        lines.append("every stage is complete")
    return "\n".join(line.rstrip() for line in lines)
