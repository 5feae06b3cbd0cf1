"""Recipes submitted to a real SLURM controller (tests/slurm_support.py): chained end to end, requeued
mid-training, failing on purpose, and launched two-node-shaped on one machine."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from slurm_support import LocalCluster
from tiny_run import TINY_RECIPE
from train_support import cli, small_recipe_dict, write_recipe

from hermes_pipeline.recipe.loader import load_recipe
from hermes_pipeline.slurm.status import ACTIVE_STATES, job_state
from hermes_pipeline.slurm.submit import SubmitRequest, submit
from hermes_pipeline.stages import recipe_stages
from hermes_pipeline.train.checkpoints import SEAL

pytestmark = pytest.mark.slow

# Bounds for a hung job, not speed checks: the whole tiny recipe takes minutes on 2 idle cores, far longer
# on a busy machine.
JOB_TIMEOUT_S = 900
RECIPE_TIMEOUT_S = 3600
CPU_JOB = {"nodes": 1, "gpus_per_node": 0, "cpus_per_task": 2, "time": "00:30:00"}


def _recipe(folder: Path, run: Path, **changes: dict[str, Any]) -> Path:
    """The small training recipe with every stage sized for the one 2-CPU test node."""
    raw = small_recipe_dict(run)
    raw["data"]["resources"] = CPU_JOB
    raw["merge"] = {"resources": CPU_JOB}
    for section, values in changes.items():
        raw[section] = {**raw[section], **values}
    return write_recipe(folder, raw)


def _submit(*arguments: str, cwd: Path) -> dict[str, str]:
    """`slurm submit` as a user runs it; returns the job id of every submitted stage."""
    out = cli("slurm", "submit", *arguments, cwd=cwd).stdout
    return dict(re.findall(r"^(\S+): job (\d+),", out, flags=re.MULTILINE))


def _state(job_id: str) -> str:
    state = job_state(job_id)
    assert state is not None, f"job {job_id} is unknown to the controller"
    return state.state


def _wait_until(condition: Any, what: str, timeout: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(2)


def _wait_for_jobs(jobs: dict[str, str], timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
    """Every job's final state, once none is queued or running (each noted as soon as it ends)."""
    final: dict[str, str] = {}

    def settled() -> bool:
        for name, job_id in jobs.items():
            if name not in final and (state := _state(job_id)) not in ACTIVE_STATES:
                final[name] = state
        return len(final) == len(jobs)

    _wait_until(settled, f"jobs {jobs}", timeout)
    return {name: final[name] for name in jobs}


def _release_requeued(job_id: str) -> None:
    """A requeued job waits about two minutes before it may start again; let it start as soon as that is
    safe. slurmd refuses a launch whose credential is no newer, in whole seconds, than the revocation of the
    first attempt's ("Job credential revoked", seen when released at once): so wait for the node to finish
    the first attempt, then let the clock pass a second."""
    _wait_until(lambda: "Reason=BeginTime" in _show(job_id), f"job {job_id} to be requeued", timeout=120)
    _wait_until(
        lambda: _node_state() == "idle", f"the node to finish job {job_id}'s first attempt", timeout=120
    )
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)


def _node_state() -> str:
    listed = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True)
    return listed.stdout.strip()


def _show(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout


def _log(run: Path, stage: str, job_id: str) -> str:
    return (run / "logs" / f"{stage}-{job_id}.log").read_text(encoding="utf-8", errors="replace")


@pytest.mark.parametrize("interruption", ["scontrol requeue", "USR1 ahead of the time limit"])
def test_requeued_training_resumes_from_its_checkpoint(
    slurm_cluster: LocalCluster, tmp_path: Path, interruption: str
) -> None:
    run = tmp_path / "run"
    recipe = _recipe(tmp_path, run, sft={"max_steps": 30, "save_steps": 2})
    jobs = _submit(str(recipe), "--stages", "prep,sft", cwd=tmp_path)
    sft = jobs["sft"]
    checkpoints = run / "sft" / "checkpoints"
    _wait_until(lambda: any(checkpoints.glob(f"checkpoint-*/{SEAL}")), "a sealed SFT checkpoint")
    assert _state(sft) == "RUNNING"
    if interruption == "scontrol requeue":
        subprocess.run(["scontrol", "requeue", sft], check=True)
    else:  # what --signal=B:USR1@N sends to the batch shell before the time limit
        subprocess.run(["scancel", "--signal=USR1", "--batch", sft], check=True)
    _release_requeued(sft)
    assert _wait_for_jobs(jobs) == {"prep": "COMPLETED", "sft": "COMPLETED"}
    assert "Restarts=1" in _show(sft)
    summary = json.loads((run / "sft" / "summary.json").read_text())
    assert summary["resumed_from_step"] > 0 and summary["steps"] == 30
    log = _log(run, "sft", sft)
    assert "stopped by a signal" in log and f"resuming from checkpoint-{summary['resumed_from_step']}" in log
    if interruption != "scontrol requeue":
        assert "checkpointed ahead of the time limit; requeueing" in log
    assert (run / "sft" / "MANIFEST.json").is_file()


def test_failed_stage_cancels_its_dependents_and_status_names_it(
    slurm_cluster: LocalCluster, tmp_path: Path
) -> None:
    """The run directory's name is hostile too: sbatch must read its #SBATCH lines literally."""
    run = tmp_path / "run \"dir\" 'x' $(touch pwned) `touch pwned`; 100%j"
    missing = "hermes-test/no-such-model"  # valid as a Hub id; the SFT job fails when it loads it
    recipe = _recipe(tmp_path, run, sft={"init_from": missing})
    jobs = _submit(str(recipe), "--stages", "prep,sft,dpo", cwd=tmp_path)
    states = _wait_for_jobs(jobs)
    assert states == {"prep": "COMPLETED", "sft": "FAILED", "dpo": "CANCELLED"}
    assert "Reason=DependencyNeverSatisfied" in _show(jobs["dpo"])
    assert not (run / "dpo").exists() and not (run / "logs" / f"dpo-{jobs['dpo']}.log").exists()
    assert f"model {missing}: cannot load" in _log(run, "sft", jobs["sft"])
    status = cli("slurm", "status", str(run), cwd=tmp_path).stdout
    sft_log = run / "logs" / f"sft-{jobs['sft']}.log"
    assert f"failed: sft (job {jobs['sft']}); its log: {sft_log}" in status
    assert re.search(r"^dpo\s+\d+\s+CANCELLED, never started: a stage before it failed", status, re.MULTILINE)
    assert not list(tmp_path.rglob("pwned"))


def test_two_node_shaped_launch_takes_its_ranks_from_slurm(
    slurm_cluster: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two launcher tasks on the one machine stand in for two nodes: the same script a real two-node job
    gets, with one torchrun per task meeting over c10d and gloo on the CPU."""
    run = tmp_path / "run"
    two_nodes = {"nodes": 2, "gpus_per_node": 0, "processes_per_node": 1, "cpus_per_task": 1}
    recipe = _recipe(tmp_path, run, sft={"resources": {**two_nodes, "time": "00:30:00"}})
    monkeypatch.chdir(tmp_path)
    records = submit(SubmitRequest(str(recipe), stages=("prep", "sft"), launchers_per_node=2))
    jobs = {record.name: record.job_id for record in records if record.job_id}
    script = (run / "slurm" / "sft.sbatch").read_text()
    assert "#SBATCH --nodes=1\n#SBATCH --ntasks-per-node=2\n" in script
    assert _wait_for_jobs(jobs) == {"prep": "COMPLETED", "sft": "COMPLETED"}
    log = _log(run, "sft", jobs["sft"])
    assert "launcher 0 of 2 on" in log and "launcher 1 of 2 on" in log
    summary = json.loads((run / "sft" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6


def test_tiny_recipe_runs_end_to_end_as_chained_jobs(
    slurm_cluster: LocalCluster, tiny_run: Path, tmp_path: Path
) -> None:
    """Every stage of the tiny recipe is a job of one chain. The trained stages come from the session's
    tiny run (export checks that the model stops at <|im_end|>, which a shorter training does not teach), so
    their jobs find their work done; every stage after them runs in its job. Training under SLURM is
    tested by the requeue and two-node tests."""
    run = tmp_path / "run"
    trained = ("prep", "sft", "dpo")
    for stage in trained:
        shutil.copytree(tiny_run / stage, run / stage)
    recipe = TINY_RECIPE
    # The recipe leaves merge.resources at the 16-CPU default; the test node has 2.
    overrides = [
        f"run_dir={run}",
        "merge.resources={nodes: 1, gpus_per_node: 0, cpus_per_task: 2, time: '00:30:00'}",
    ]
    stages = recipe_stages(load_recipe(recipe, overrides), str(recipe), overrides)
    assert {stage.kind for stage in stages} == {"prep", "sft", "dpo", "package", "export", "eval", "card"}
    set_arguments = [arg for override in overrides for arg in ("--set", override)]
    jobs = _submit(str(recipe), *set_arguments, cwd=tmp_path)
    assert list(jobs) == [stage.name for stage in stages]
    states = _wait_for_jobs(jobs, RECIPE_TIMEOUT_S)
    assert set(states.values()) == {"COMPLETED"}, states
    records = json.loads((run / "slurm/jobs.json").read_text())["stages"]
    assert [r["name"] for r in records] == list(jobs)
    for record in records:
        assert (Path(record["folder"]) / "MANIFEST.json").is_file(), record["name"]
    for stage in trained:
        assert "up to date" in _log(run, stage, jobs[stage]), f"{stage} should have found its work done"
    assert "up to date" not in _log(run, "package", jobs["package"])
    assert (run / "final" / "config.json").is_file()
    assert "| dpo | function_calling |" in (run / "final" / "README.md").read_text()  # the card saw the evals
    assert list((run / "gguf").rglob("*.gguf"))
    status = cli("slurm", "status", str(run), cwd=tmp_path).stdout
    assert "every stage is complete" in status and "failed" not in status
    again = cli("slurm", "submit", str(recipe), *set_arguments, cwd=tmp_path)
    assert "nothing to submit: every stage is done for this recipe" in again.stdout
