"""One sbatch script per stage, written into the run directory: readable, and re-submittable by hand.

Two quoting rules keep user values (paths, names, ``--set`` overrides) from ever running as code:

- ``#SBATCH`` lines are read by sbatch, not by a shell, and never expand variables; they hold literal
  values only, in sbatch's own quoting (double quotes, backslash escapes), with ``%`` doubled in file
  names where sbatch would read it as a pattern.
- Every value in the script body is a single word made by ``shlex.quote``. The one piece of shell that must
  expand on every node (the launcher, whose node rank differs per node) is a constant text with no user
  value in it; the command it runs reaches it as arguments.

Training stages start one torchrun per node under ``srun``, rendezvous over c10d at the first node of the
allocation, and checkpoint and requeue themselves when SLURM signals that the time limit is near.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hermes_pipeline.errors import StageInterrupted, UserError

if TYPE_CHECKING:  # `slurm status` imports this module and needs no recipe machinery (which loads torch)
    from hermes_pipeline.slurm.site import SiteConfig
    from hermes_pipeline.stages import Stage

TRAINING_KINDS = ("projector", "sft", "dpo")
# torchrun handles these by passing them on to its workers, which checkpoint on USR1 and TERM; unhandled,
# USR1 would kill torchrun and leave the workers to be killed mid-save.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# The rendezvous port is derived from the job id, so jobs sharing a head node do not collide.
PORT_BASE, PORT_SPAN = 20000, 20000
_SBATCH_PLAIN = re.compile(r"^[\w@%+=:,./-]+$")

# Expanded by each srun task on its own node, never by the batch shell. SLURM_PROCID is the task's rank:
# with one task per node, its node's rank (unlike SLURM_NODEID it stays distinct when a test packs two
# launcher tasks onto one machine). c10d numbers the nodes itself (torchrun ignores --node-rank with it),
# so the rank decides which task hosts the rendezvous store: task 0, on the head node, rather than
# whichever node's hostname happens to match the node name SLURM uses. "$0" is the Python interpreter,
# "$@" the stage command.
_LAUNCH = f"""\
echo "launcher $SLURM_PROCID of $SLURM_NTASKS on $(hostname), rendezvous at $HERMES_RDZV_ENDPOINT"
exec "$0" -m torch.distributed.run --nnodes="$SLURM_NTASKS" --nproc-per-node="$HERMES_NPROC_PER_NODE" \\
  --rdzv-backend=c10d --rdzv-endpoint="$HERMES_RDZV_ENDPOINT" --rdzv-id="$SLURM_JOB_ID" \\
  --rdzv-conf="is_host=$((SLURM_PROCID == 0))" \\
  --signals-to-handle={TORCHRUN_SIGNALS} --shutdown-timeout="$HERMES_SHUTDOWN_S" \\
  -m hermes_pipeline.cli "$@"
"""


@dataclass(frozen=True)
class RunFiles:
    """Where submission keeps its scripts, job records and logs: in the run directory, beside the stages."""

    root: Path  # the run directory, absolute

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def jobs(self) -> Path:
        return self.slurm / "jobs.json"

    def script(self, stage: str) -> Path:
        return self.slurm / f"{stage}.sbatch"

    def done(self, stage: str) -> Path:
        """Written by a job whose stage command succeeded; holds the recipe hash it succeeded for."""
        return self.slurm / f"{stage}.done"

    def log(self, stage: str, job_id: str) -> Path:
        return self.logs / f"{stage}-{job_id}.log"


@dataclass(frozen=True)
class JobOptions:
    """What every job of one submission shares."""

    site: SiteConfig
    workdir: Path  # the folder the jobs run in; a relative run_dir or recipe path resolves against it
    recipe_name: str
    recipe_hash: str
    python: str  # the interpreter the job runs, unless the site config names one
    time: str | None = None  # a time limit for every job, instead of each stage's resources.time
    # Launcher tasks per node. Real jobs use one per node; a test packs two onto its one machine to run a
    # two-node-shaped job through this same script.
    launchers_per_node: int = 1


def render_script(stage: Stage, files: RunFiles, options: JobOptions) -> str:
    training = stage.kind in TRAINING_KINDS
    lines = ["#!/bin/bash", *_directives(stage, files, options, training)]
    lines += [
        f"# Stage {stage.name} of recipe {options.recipe_name} (hash {options.recipe_hash}), written by",
        "# `hermes-pipeline slurm submit`; `sbatch` this file to run the stage again by hand.",
        "",
        *_environment(stage, options, training),
        "",
        "set -uo pipefail  # after the site's setup, whose module and conda scripts may not survive it",
        *(_training_body(stage, options) if training else _single_body(stage, options)),
        'if [ "$status" -eq 0 ]; then',
        f"  printf '%s\\n' {shlex.quote(options.recipe_hash)} > {shlex.quote(str(files.done(stage.name)))}",
        "fi",
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def _directives(stage: Stage, files: RunFiles, options: JobOptions, training: bool) -> list[str]:
    """The #SBATCH lines. Non-training stages are single processes on one node."""
    resources, site = stage.resources, options.site
    per_node = options.launchers_per_node if training else 1
    nodes = -(-resources.nodes // per_node) if training else 1
    log_pattern = str(files.logs).replace("%", "%%") + f"/{stage.name}-%j.log"
    settings: list[tuple[str, object | None]] = [
        ("job-name", f"{options.recipe_name}.{stage.name}"),
        ("nodes", nodes),
        ("ntasks-per-node", per_node),
        ("cpus-per-task", resources.cpus_per_task),
        ("gpus-per-node", resources.gpus_per_node or None),
        ("mem", resources.mem),
        ("time", options.time or resources.time),
        ("partition", site.partition),
        ("account", site.account),
        ("qos", site.qos),
        ("constraint", site.constraint),
        ("chdir", str(options.workdir)),
        ("output", log_pattern),
        ("open-mode", "append"),  # a requeued job adds to its log instead of erasing the first attempt
        ("requeue", ""),
        ("kill-on-invalid-dep", "yes"),  # a failed stage cancels its dependents instead of leaving them
        ("signal", f"B:USR1@{site.checkpoint_signal_s}" if training else None),
    ]
    lines = [
        f"#SBATCH --{name}" + (f"={sbatch_quote(str(value), name)}" if value != "" else "")
        for name, value in settings
        if value is not None
    ]
    return lines + [f"#SBATCH {extra}" for extra in site.sbatch]


def sbatch_quote(value: str, what: str) -> str:
    """A value as sbatch reads it from a #SBATCH line: plain when safe, else double-quoted and escaped."""
    if "\n" in value or "\r" in value:
        raise UserError(f"{what}: {value!r} holds a line break, which a #SBATCH line cannot; rename it")
    if _SBATCH_PLAIN.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _environment(stage: Stage, options: JobOptions, training: bool) -> list[str]:
    site = options.site
    lines = [f"module load {shlex.quote(module)}" for module in site.modules]
    if site.venv:
        lines.append(f"source {shlex.quote(site.venv + '/bin/activate')}")
    lines += site.setup
    variables: dict[str, str] = {"AXOLOTL_DO_NOT_TRACK": "1"}
    if site.hf_hub_offline:
        variables["HF_HUB_OFFLINE"] = "1"
    if site.hf_home:
        variables["HF_HOME"] = site.hf_home
    if site.scratch_dir:
        variables["TMPDIR"] = site.scratch_dir
    resources = stage.resources
    if training and resources.gpus_per_node:
        # A rank that dies makes the others fail fast instead of hanging in a collective until the limit.
        variables["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
    elif training:
        # torchrun would pin every CPU worker to one thread; share the task's cores out instead.
        per_node = resources.processes_per_node or 1
        variables["OMP_NUM_THREADS"] = str(max(1, resources.cpus_per_task // per_node))
    variables.update(site.env)
    if site.scratch_dir:
        lines.append(f"mkdir -p {shlex.quote(site.scratch_dir)}")
    lines += [f"export {name}={shlex.quote(value)}" for name, value in variables.items()]
    return lines


def _words(*parts: str) -> str:
    """Shell text joined with spaces, leaving out the parts that are empty (no container, for one)."""
    return " ".join(part for part in parts if part)


def _quoted(words: tuple[str, ...] | list[str]) -> str:
    return " ".join(shlex.quote(word) for word in words)


def _srun(stage: Stage) -> str:
    """srun with the task's CPUs given again: srun 22.05 does not inherit --cpus-per-task from sbatch, and
    a task bound to one core would starve the data loaders."""
    return f"srun --kill-on-bad-exit=1 --cpus-per-task={stage.resources.cpus_per_task}"


def _single_body(stage: Stage, options: JobOptions) -> list[str]:
    python = shlex.quote(options.site.python or options.python)
    run = _words(
        _srun(stage),
        "--ntasks=1",
        _quoted(options.site.container),
        python,
        "-m hermes_pipeline.cli",
        _quoted(stage.command),
    )
    return [run, "status=$?"]


def _training_body(stage: Stage, options: JobOptions) -> list[str]:
    """torchrun on every node under srun; USR1 (the time limit is near) is passed on to the workers, which
    save a checkpoint and stop, and the job requeues itself so that its next start resumes from it."""
    resources = stage.resources
    python = shlex.quote(options.site.python or options.python)
    head = 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
    port = f"$(({PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN}))"
    launch = _words(
        _srun(stage), _quoted(options.site.container), 'bash -c "$launch"', python, _quoted(stage.command)
    )
    return [
        f"export HERMES_NPROC_PER_NODE={resources.processes_per_node or resources.gpus_per_node or 1}",
        f"export HERMES_SHUTDOWN_S={options.site.checkpoint_signal_s}",
        head,
        f'export HERMES_RDZV_ENDPOINT="$head_node:{port}"',
        f"launch={shlex.quote(_LAUNCH)}",
        f"{launch} &",
        "launcher=$!",
        "stop_requested=0",
        "trap 'stop_requested=1; kill -USR1 \"$launcher\" 2>/dev/null' USR1",
        "# wait returns early when the trap runs; wait again until srun itself has ended.",
        'wait "$launcher"; status=$?',
        'while kill -0 "$launcher" 2>/dev/null; do wait "$launcher"; status=$?; done',
        'if [ "$status" -ne 0 ] && [ "$stop_requested" -eq 1 ]; then',
        f"  echo {shlex.quote(f'{stage.name}: checkpointed ahead of the time limit; requeueing job')} "
        '"$SLURM_JOB_ID" to resume',
        '  scontrol requeue "$SLURM_JOB_ID"',
        f"  exit {StageInterrupted.exit_code}",
        "fi",
    ]
