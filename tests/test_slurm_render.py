"""sbatch scripts without a cluster: quoting, site settings, the multi-node shape, and one-line user errors."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from train_support import ROOT, cli, small_recipe_dict, write_recipe

from hermes_pipeline.errors import RecipeError
from hermes_pipeline.recipe.loader import load_recipe, recipe_hash
from hermes_pipeline.slurm.render import JobOptions, RunFiles, render_script
from hermes_pipeline.slurm.site import SiteConfig, load_site_config
from hermes_pipeline.slurm.submit import SubmitRequest, submit
from hermes_pipeline.stages import recipe_stages

# Each piece would run `touch pwned` if it ever reached a shell unquoted.
HOSTILE = "a b'c\"d $(touch pwned) `touch pwned` ; touch pwned & # e"
HERMES_2_PRO = ROOT / "configs/recipes/hermes-2-pro-mistral-7b.yaml"


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/bash\n{body}\n", encoding="utf-8")
    path.chmod(0o755)


def test_hostile_names_paths_and_overrides_run_nothing(tmp_path: Path) -> None:
    """Render every stage for a recipe in a folder, a run directory and an override full of shell syntax,
    run each script with bash (srun and scontrol stubbed, the interpreter replaced by an argument
    recorder) and check that the stage command arrives word for word and nothing else ever ran."""
    hostile = tmp_path / HOSTILE
    work = tmp_path / "work"
    stubs = tmp_path / "stubs"
    for folder in (hostile, work, stubs):
        folder.mkdir()
    raw = small_recipe_dict(hostile / f"run {HOSTILE}")
    recipe_path = write_recipe(hostile, raw)
    override = f"description={HOSTILE}"
    recipe = load_recipe(recipe_path, [override])
    files = RunFiles(Path(raw["run_dir"]))
    recorded = tmp_path / "argv"
    _stub(stubs, "srun", 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"')
    _stub(stubs, "scontrol", "echo node-a")
    _stub(stubs, "python", f"printf '%s\\0' \"$@\" > '{recorded}'")
    options = JobOptions(
        site=SiteConfig(python=str(stubs / "python"), hf_home=str(hostile / "hf")),
        workdir=work,
        recipe_name=recipe.name,
        recipe_hash=recipe_hash(recipe),
        python="unused",
    )
    files.slurm.mkdir(parents=True)
    stages = recipe_stages(recipe, str(recipe_path), [override])
    assert {stage.kind for stage in stages} >= {"prep", "sft", "dpo"}
    for stage in stages:
        script = files.script(stage.name)
        script.write_text(render_script(stage, files, options), encoding="utf-8")
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        env = {
            **os.environ,
            "PATH": f"{stubs}:{os.environ['PATH']}",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "node-a",
            "SLURM_NTASKS": "1",
            "SLURM_PROCID": "0",
        }
        result = subprocess.run(["bash", str(script)], cwd=work, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        argv = recorded.read_bytes().decode().split("\0")[:-1]
        assert argv[-len(stage.command) - 2 :] == ["-m", "hermes_pipeline.cli", *stage.command]
        assert files.done(stage.name).read_text().strip() == recipe_hash(recipe)
    assert not list(tmp_path.rglob("pwned"))


def test_training_script_launches_one_torchrun_per_node_with_per_node_values(tmp_path: Path) -> None:
    result = cli(
        "slurm", "submit", str(HERMES_2_PRO), "--nodes", "4", "--stages", "sft", "--dry-run", cwd=tmp_path
    )
    script = result.stdout
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",
        "export HF_HUB_OFFLINE=1",
        "export AXOLOTL_DO_NOT_TRACK=1",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        "export HERMES_NPROC_PER_NODE=8",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "scontrol requeue",
    ):
        assert line in script, line
    assert "--set sft.resources.nodes=4" in script
    # The per-node values sit inside the single-quoted launcher text, so they expand on each node.
    launch = script.split("launch='", 1)[1].split("'\n", 1)[0]
    for per_node in ('"$SLURM_NTASKS"', "$((SLURM_PROCID == 0))", "--rdzv-backend=c10d"):
        assert per_node in launch
    assert f"#SBATCH --output={tmp_path}/runs/hermes-2-pro-mistral-7b/logs/sft-%j.log" in script
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_site_settings_reach_the_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(
        yaml.safe_dump(
            {
                "partition": "gpu",
                "account": "proj-42",
                "qos": "high",
                "constraint": "h100&ib",
                "sbatch": ["--exclusive"],
                "modules": ["cuda/12.4"],
                "venv": "/shared/envs/hermes",
                "container": ["apptainer", "exec", "--nv", "/shared/hermes.sif"],
                "hf_home": "/shared/${SITE_USER}/hf",
                "scratch_dir": "/scratch/job",
                "env": {"NCCL_SOCKET_IFNAME": "ib0"},
                "checkpoint_signal_s": 600,
            }
        )
    )
    monkeypatch.setenv("SITE_USER", "ada")
    monkeypatch.setenv("HERMES_SITE_CONFIG", str(site))
    script = cli(
        "slurm", "submit", str(HERMES_2_PRO), "--stages", "sft", "--time", "2-00:00:00", "--dry-run"
    ).stdout
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj-42",
        "#SBATCH --qos=high",
        '#SBATCH --constraint="h100&ib"',
        "#SBATCH --exclusive",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --signal=B:USR1@600",
        "module load cuda/12.4",
        "source /shared/envs/hermes/bin/activate",
        "export HF_HOME=/shared/ada/hf",
        "export TMPDIR=/scratch/job",
        "export NCCL_SOCKET_IFNAME=ib0",
        "apptainer exec --nv /shared/hermes.sif bash -c",
    ):
        assert line in script, line
    partition = cli(
        "slurm", "submit", str(HERMES_2_PRO), "--stages", "prep", "--partition", "cpu", "--dry-run"
    ).stdout
    assert "#SBATCH --partition=cpu" in partition and "--gpus-per-node" not in partition


def test_site_config_mistakes_are_one_line_each(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("partiton: gpu\nmodules: cuda\nenv: {1BAD: x}\n")
    with pytest.raises(RecipeError) as error:
        load_site_config(site)
    lines = {line.split(": ")[1]: line for line in error.value.lines}
    assert set(lines) == {"partiton", "modules", "env.1BAD"}
    assert lines["partiton"] == (
        f"{site}: partiton: unknown key; did you mean 'partition'? allowed keys: account, "
        "checkpoint_signal_s, constraint, container, env, hf_home, hf_hub_offline, modules, partition, "
        "python, qos, sbatch, scratch_dir, setup, venv"
    )
    assert lines["modules"] == f"{site}: modules: expected a valid list (got 'cuda')"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--stages", "prep,fine-tune"],
            "--stages: unknown stage fine-tune; choose from prep, merge, projector, sft,",
        ),
        (["--stages", "dpo"], "--stages: this recipe has no dpo stage (disabled or not configured)"),
        (["--time", "two days"], "--time two days: expected [D-]HH:MM:SS"),
    ],
)
def test_submit_mistakes_are_one_line(arguments: list[str], message: str) -> None:
    result = cli("slurm", "submit", str(HERMES_2_PRO), *arguments, "--dry-run", check=False)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1


def test_status_without_a_submission_says_how_to_submit(tmp_path: Path) -> None:
    result = cli("slurm", "status", str(tmp_path), check=False)
    assert result.returncode == 2
    assert "no SLURM submission recorded here" in result.stderr and "slurm submit RECIPE" in result.stderr


def test_resubmission_runs_what_is_not_done_for_this_recipe(tmp_path: Path) -> None:
    recipe = ROOT / "configs/recipes/tiny.yaml"
    overrides = (f"run_dir={tmp_path / 'run'}",)
    loaded = load_recipe(recipe, list(overrides))
    stages = recipe_stages(loaded, str(recipe), overrides)
    files = RunFiles(tmp_path / "run")
    files.slurm.mkdir(parents=True)
    for stage in stages:
        stage.folder.mkdir(parents=True, exist_ok=True)
        (stage.folder / "MANIFEST.json").write_text("{}")
        files.done(stage.name).write_text(recipe_hash(loaded) + "\n")

    def submitted(*extra: str) -> list[str]:
        lines: list[str] = []
        submit(SubmitRequest(str(recipe), overrides + extra, dry_run=True), log=lines.append)
        return re.findall(r"^# ---- .*/slurm/(\w+)\.sbatch$", "\n".join(lines), flags=re.MULTILINE)

    assert submitted() == []
    files.done("eval_sft").unlink()  # an eval that failed is submitted again alone
    assert submitted() == ["eval_sft"]
    files.done("dpo").unlink()  # a training stage that must run again takes every later stage along
    names = [stage.name for stage in stages]
    assert submitted() == ["eval_sft", *names[names.index("dpo") :]]
    assert submitted("sft.learning_rate=1e-4") == names  # another recipe: nothing is done for it


def _submission_plan(recipe: Path) -> list[str]:
    """The sbatch lines a dry run ends with."""
    logged: list[str] = []
    submit(SubmitRequest(str(recipe), dry_run=True), log=logged.append)
    header, *commands = logged[-1].splitlines()
    assert header == "# ---- submission plan: <stage> is the job id sbatch gives that stage"
    return commands


def test_dry_run_ends_with_every_sbatch_line_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each stage waits (afterok) for the stages it needs; <stage> stands for a job id not known yet."""
    monkeypatch.chdir(tmp_path)
    recipe = ROOT / "configs/recipes/tiny.yaml"
    stages = recipe_stages(load_recipe(recipe), str(recipe))
    commands = _submission_plan(recipe)
    scripts = tmp_path / "runs" / "tiny" / "slurm"
    assert commands[0] == f"sbatch --parsable {scripts}/prep.sbatch"
    assert f"sbatch --parsable --dependency=afterok:<prep>:<sft> {scripts}/dpo.sbatch" in commands
    assert len(commands) == len(stages) >= 6
    for position, (stage, command) in enumerate(zip(stages, commands, strict=True)):
        assert command.endswith(f" {scripts}/{stage.name}.sbatch")
        waits_for = re.findall(r"<(\w+)>", command)
        assert waits_for == list(stage.needs) and (position == 0 or waits_for), command
        assert set(waits_for) <= {earlier.name for earlier in stages[:position]}, command
    assert not (tmp_path / "runs").exists()


def test_submission_runs_the_plan_the_dry_run_showed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stub sbatch records each call and answers job ids 101, 102, ...: the calls are the plan's lines
    with each <stage> replaced by that stage's job id."""
    stubs, calls = tmp_path / "stubs", tmp_path / "sbatch-calls"
    stubs.mkdir()
    _stub(stubs, "sbatch", f'echo "sbatch $*" >> {calls}\nwc -l < {calls} | xargs expr 100 +')
    monkeypatch.setenv("PATH", f"{stubs}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    recipe = ROOT / "configs/recipes/tiny.yaml"
    plan = _submission_plan(recipe)
    records = submit(SubmitRequest(str(recipe)), log=lambda _: None)
    jobs = {record.name: record.job_id for record in records}
    assert list(jobs.values()) == [str(101 + i) for i in range(len(plan))]
    expected = [re.sub(r"<(\w+)>", lambda m: jobs[m.group(1)], line) for line in plan]
    assert calls.read_text().splitlines() == expected
