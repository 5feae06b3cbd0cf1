"""Submit a recipe's stages as SLURM jobs, each starting only once the stages it needs succeeded (``afterok``
on the jobs of ``Stage.needs`` submitted with it); a dry run prints that plan with ``<stage>`` for job ids.

Evals hang off the stage they measure and only the model card waits for them, so a failed eval never holds
up training.

A stage is skipped at submission when its MANIFEST.json exists and one of our jobs succeeded for this very
recipe (its ``<stage>.done`` record holds the recipe hash); once a stage other than an eval must run,
every later one runs too, since its inputs may change. Everything else a stage decides itself when it starts: a training stage
resumes from its newest sealed checkpoint and a finished stage whose inputs match skips its work. So
re-submitting a half-finished recipe continues where it stopped.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from hermes_pipeline.axolotl_env import ENV_VARIABLE, env_dir, is_ready
from hermes_pipeline.errors import UserError
from hermes_pipeline.recipe.checks import optimization_stages, settings_key
from hermes_pipeline.recipe.loader import load_recipe, recipe_hash
from hermes_pipeline.recipe.schema import SLURM_TIME, Recipe
from hermes_pipeline.rundir import MANIFEST, run_dir
from hermes_pipeline.slurm.render import JobOptions, RunFiles, render_script
from hermes_pipeline.slurm.site import load_site_config, site_config_path
from hermes_pipeline.slurm.status import active_jobs, read_jobs
from hermes_pipeline.stages import STAGE_KINDS, Stage, recipe_stages

# What --stages accepts: the stage kinds, with "merge" also meaning the packaging that merges LoRA adapters.
STAGE_CHOICES = {kind: (kind,) for kind in STAGE_KINDS} | {"merge": ("merge", "package")}


@dataclass(frozen=True)
class SubmitRequest:
    recipe: str
    overrides: tuple[str, ...] = ()
    stages: tuple[str, ...] = ()  # names from STAGE_CHOICES; empty means every stage
    nodes: int | None = None
    gpus_per_node: int | None = None
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    dry_run: bool = False
    launchers_per_node: int = 1  # see JobOptions


@dataclass(frozen=True)
class SubmittedStage:
    """One line of the jobs file that `slurm status` reads."""

    name: str
    kind: str
    folder: str
    job_id: str | None  # None: skipped, already done for this recipe
    script: str


def submit(request: SubmitRequest, log: Callable[[str], None] = print) -> list[SubmittedStage]:
    overrides = _with_resource_overrides(request)
    recipe = load_recipe(request.recipe, overrides)
    workdir = Path.cwd()
    files = RunFiles(workdir / run_dir(recipe))
    digest = recipe_hash(recipe)
    options = _job_options(request, recipe, workdir, digest)
    recipe_path = str(Path(request.recipe).resolve())
    every_stage = recipe_stages(recipe, recipe_path, overrides)
    stages = _selected(every_stage, request.stages)
    to_run = _stages_to_run(stages, files, digest, workdir)
    scripts = {stage.name: render_script(stage, files, options) for stage in to_run}
    skipped = [stage for stage in stages if stage not in to_run]
    for stage in skipped:
        log(f"{stage.name}: done for this recipe, skipped")
    if not to_run:
        log("nothing to submit: every stage is done for this recipe")
        return []
    if request.dry_run:
        for name, text in scripts.items():
            log(f"# ---- {files.script(name)}\n{text}")
        log(_plan(to_run, files))
        return []

    _check_axolotl_env(to_run, recipe)
    running = active_jobs(files)
    if running:
        raise UserError(
            f"{files.root}: jobs {', '.join(running)} of an earlier submission are still queued or running; "
            f"wait for them or cancel them (scancel {' '.join(running)})"
        )
    files.slurm.mkdir(parents=True, exist_ok=True)
    files.logs.mkdir(parents=True, exist_ok=True)
    records = [
        SubmittedStage(s.name, s.kind, str(workdir / s.folder), None, str(files.script(s.name)))
        for s in skipped
    ]
    jobs: dict[str, str] = {}
    for stage in to_run:
        script = files.script(stage.name)
        script.write_text(scripts[stage.name], encoding="utf-8")
        after = [jobs[name] for name in _waits_for(stage, to_run)]
        jobs[stage.name] = job = _sbatch(script, after, list(jobs.values()))
        records.append(SubmittedStage(stage.name, stage.kind, str(workdir / stage.folder), job, str(script)))
        log(f"{stage.name}: job {job}, log {files.log(stage.name, job)}")
    _write_jobs(files, digest, records, [stage.name for stage in every_stage])
    return records


def _job_options(request: SubmitRequest, recipe: Recipe, workdir: Path, digest: str) -> JobOptions:
    """The site config, with this submission's --partition, --account and --time on top."""
    if request.time and not SLURM_TIME.match(request.time):
        raise UserError(f"--time {request.time}: expected [D-]HH:MM:SS, e.g. 48:00:00 or 2-00:00:00")
    site = load_site_config(site_config_path(recipe))
    replaced = {"partition": request.partition, "account": request.account}
    return JobOptions(
        site=site.model_copy(update={key: value for key, value in replaced.items() if value}),
        workdir=workdir,
        recipe_name=recipe.name,
        recipe_hash=digest,
        python=sys.executable,
        time=request.time,
        launchers_per_node=request.launchers_per_node,
    )


def _check_axolotl_env(stages: list[Stage], recipe: Recipe) -> None:
    """A stage training through axolotl needs its environment made before the job starts: a compute node
    may have no package index to make it from."""
    uses = [
        s.kind for s in stages if s.kind in ("sft", "dpo") and getattr(recipe, s.kind).backend == "axolotl"
    ]
    if uses and not is_ready():
        raise UserError(
            f"{uses[0]}.backend is axolotl but its environment is not made at {env_dir()}; run `hermes-pipeline "
            f"setup axolotl` first, with {ENV_VARIABLE} naming a folder every node sees"
        )


def _with_resource_overrides(request: SubmitRequest) -> tuple[str, ...]:
    """--nodes and --gpus-per-node become recipe overrides of every training stage, so that the stage
    command in the job sees the shape its job was given (and a resume on another shape is refused)."""
    overrides = tuple(request.overrides)
    if request.nodes is None and request.gpus_per_node is None:
        return overrides
    names = optimization_stages(load_recipe(request.recipe, list(overrides)))
    if not names:
        raise UserError("--nodes and --gpus-per-node size the training stages, and this recipe has none")
    for name in map(settings_key, names):
        if request.nodes is not None:
            overrides += (f"{name}.resources.nodes={request.nodes}",)
        if request.gpus_per_node is not None:
            overrides += (f"{name}.resources.gpus_per_node={request.gpus_per_node}",)
    return overrides


def _selected(stages: list[Stage], wanted: tuple[str, ...]) -> list[Stage]:
    if not wanted:
        return stages
    unknown = [name for name in wanted if name not in STAGE_CHOICES]
    if unknown:
        raise UserError(
            f"--stages: unknown stage {', '.join(unknown)}; choose from {', '.join(STAGE_CHOICES)}"
        )
    kinds = {kind for name in wanted for kind in STAGE_CHOICES[name]}
    absent = [name for name in wanted if not any(s.kind in STAGE_CHOICES[name] for s in stages)]
    if absent:
        raise UserError(
            f"--stages: this recipe has no {', '.join(absent)} stage (disabled or not configured); "
            f"its stages: {', '.join(s.name for s in stages)}"
        )
    return [stage for stage in stages if stage.kind in kinds]


def _stages_to_run(stages: list[Stage], files: RunFiles, digest: str, workdir: Path) -> list[Stage]:
    """The stages not finished for exactly this recipe, and every stage after the first such one that is
    not an eval: a stage that runs again may change what every later stage reads."""
    to_run: list[Stage] = []
    rerun_rest = False
    for stage in stages:
        done = files.done(stage.name)
        finished = (
            (workdir / stage.folder / MANIFEST).is_file()
            and done.is_file()
            and done.read_text(encoding="utf-8").strip() == digest
        )
        rerun_rest = rerun_rest or (not finished and stage.kind != "eval")
        if rerun_rest or not finished:
            to_run.append(stage)
    return to_run


def _waits_for(stage: Stage, submission: list[Stage]) -> list[str]:
    """The stages ``stage`` needs that this submission runs; the others are done for this recipe (skipped)
    or left out with --stages, so there is no job of theirs to wait for."""
    names = {other.name for other in submission}
    return [name for name in stage.needs if name in names]


def _sbatch_command(script: Path, after: list[str]) -> list[str]:
    """``after``: the job ids (or, in a dry run's plan, placeholders) that must succeed first."""
    dependency = [f"--dependency=afterok:{':'.join(after)}"] if after else []
    return ["sbatch", "--parsable", *dependency, str(script)]


def _plan(to_run: list[Stage], files: RunFiles) -> str:
    """The sbatch commands a submission runs, in order; ``<stage>`` stands for that stage's job id."""
    lines = ["# ---- submission plan: <stage> is the job id sbatch gives that stage"]
    for stage in to_run:
        command = _sbatch_command(files.script(stage.name), [f"<{n}>" for n in _waits_for(stage, to_run)])
        # Only the script path can need quoting: the options are ours, the placeholders are not shell.
        lines.append(" ".join([*command[:-1], shlex.quote(command[-1])]))
    return "\n".join(lines)


def _sbatch(script: Path, after: list[str], submitted: list[str]) -> str:
    """Submit one script; on a refusal cancel this submission's earlier jobs, so no half chain is left."""
    try:
        result = subprocess.run(_sbatch_command(script, after), capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError(
            "sbatch not found: run this on a SLURM login node (or install slurm-client)"
        ) from None
    if result.returncode != 0:
        if submitted:
            subprocess.run(["scancel", *submitted], capture_output=True)
        reason = " ".join(result.stderr.split()) or f"exit code {result.returncode}"
        cancelled = f" (cancelled the jobs submitted before it: {', '.join(submitted)})" if submitted else ""
        raise UserError(f"sbatch refused {script}: {reason}{cancelled}")
    return result.stdout.strip().split(";")[0]


def _write_jobs(files: RunFiles, digest: str, records: list[SubmittedStage], order: list[str]) -> None:
    """Record this submission's jobs, keeping earlier records of stages it did not include, in run order."""
    kept = {entry["name"]: entry for entry in read_jobs(files)} if files.jobs.is_file() else {}
    kept.update({record.name: asdict(record) for record in records})
    body = {
        "recipe_hash": digest,
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "stages": sorted(
            kept.values(), key=lambda e: order.index(e["name"]) if e["name"] in order else len(order)
        ),
    }
    tmp = files.jobs.with_name(files.jobs.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, files.jobs)
