"""The axolotl backend checked against axolotl itself, in its own environment: its config validation, the
rows its trainer feeds the model, the losses it reaches beside the TRL path, and the stage contract
(a signal, a kill, resume, package, GGUF) with axolotl doing the training."""

from __future__ import annotations

import json
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from train_support import ROOT, cli, popen_cli, prepared, small_recipe_dict, wait_for_seal

from hermes_pipeline.axolotl_env import ensure_env
from hermes_pipeline.recipe.loader import load_recipe
from hermes_pipeline.train.axolotl_config import axolotl_config
from hermes_pipeline.train.axolotl_run import CONFIG, write_inputs
from hermes_pipeline.train.checkpoints import SEAL

pytestmark = pytest.mark.slow
RECIPES = ROOT / "configs" / "recipes"
TEXT_RECIPES = sorted(p for p in RECIPES.glob("*.yaml") if "vision" not in p.name)  # Vision is refused
STEPS = {"max_steps": 12, "save_steps": 2, "packing": False}


@pytest.fixture(scope="module")
def axolotl_python() -> Path:
    return ensure_env(log=lambda _: None)


@pytest.fixture(scope="module")
def prep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("prep")
    prepared(folder, small_recipe_dict(folder / "run"))
    return folder / "run" / "prep"


def _small(folder: Path, prep_dir: Path, backend: str, **sft: object) -> tuple[Path, Path]:
    raw = small_recipe_dict(folder / "run")
    raw["sft"] = {**raw["sft"], "backend": backend, **sft}
    path, _ = prepared(folder, raw, prep_from=prep_dir)
    return path, folder / "run"


def _validate(python: Path, configs: list[Path]) -> list[dict]:
    done = subprocess.run(
        [python, ROOT / "train" / "axolotl_validate.py", *configs], capture_output=True, text=True, check=True
    )
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _write_config(recipe_path: Path, name: str, folder: Path) -> Path:
    recipe = load_recipe(recipe_path, [f"{name}.backend=axolotl"])
    config = axolotl_config(
        recipe,
        name,
        folder / "start",
        [folder / "train-00000-of-00001.parquet"],
        [folder / "val-00000-of-00001.parquet"],
        folder / "checkpoints",
        [32000, 32001],
        {"wandb_project": "hermes", "wandb_name": "run", "wandb_mode": "offline"},
    )
    path = folder / f"{recipe_path.stem}-{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory, axolotl_python: Path) -> dict[str, dict]:
    """axolotl's verdict (through train/axolotl_validate.py, in one process) on the config generated for
    every enabled training stage of every shipped recipe, and on a broken one named ``broken``."""
    folder = tmp_path_factory.mktemp("configs")
    configs = []
    for path in TEXT_RECIPES:
        recipe = load_recipe(path)
        configs += [_write_config(path, n, folder) for n in ("sft", "dpo") if getattr(recipe, n).enabled]
    broken = yaml.safe_load(_write_config(RECIPES / "tiny.yaml", "sft", folder).read_text())
    broken["learning_rat"] = 1e-5  # axolotl's own validation drops it without a word
    broken["datasets"][0]["typ"] = "chat_template"
    broken["plugins"] = ["hermes_pipeline.train.no_such_plugin.Plugin"]  # axolotl skips it without a word
    broken["micro_batch_size"] = "two"
    (folder / "broken.yaml").write_text(yaml.safe_dump(broken), encoding="utf-8")
    results = _validate(axolotl_python, [*configs, folder / "broken.yaml"])
    return {Path(r["config"]).stem: r for r in results}


def test_every_shipped_recipe_gives_axolotl_a_config_it_accepts_whole(checked: dict[str, dict]) -> None:
    shipped = {name: result for name, result in checked.items() if name != "broken"}
    assert len(shipped) >= 5
    for result in shipped.values():
        assert result == {"config": result["config"], "unknown": [], "missing": [], "error": None}


def test_the_check_reports_what_axolotl_would_drop_skip_or_reject(checked: dict[str, dict]) -> None:
    result = checked["broken"]
    assert result["unknown"] == ["learning_rat", "datasets[0].typ"]
    assert result["missing"][0].startswith("hermes_pipeline.train.no_such_plugin.Plugin: No module")
    assert "micro_batch_size" in result["error"]


def test_packed_rows_are_preps_rows_with_preps_labels_and_never_see_each_other(
    tmp_path: Path, prep_dir: Path, axolotl_python: Path
) -> None:
    # Three packed rows a batch, so the last batch is smaller: axolotl's own sampler would drop it.
    path, run = _small(tmp_path, prep_dir, "axolotl", packing=True, micro_batch_size=3)
    work = run / "sft" / "axolotl"
    write_inputs(load_recipe(path), "sft", work, axolotl_python, fresh=True)
    out = tmp_path / "batches.json"
    subprocess.run([axolotl_python, ROOT / "tests" / "axolotl_batches.py", work / CONFIG, out], check=True)
    fed = json.loads(out.read_text())
    shards = sorted((prep_dir / "sft").glob("train-*.parquet"))
    prep_rows = pq.read_table(shards, columns=["input_ids", "labels"]).to_pylist()
    expected = Counter((tuple(r["input_ids"]), tuple(r["labels"])) for r in prep_rows)
    assert Counter((tuple(ids), tuple(labels)) for ids, labels in fed["rows"]) == expected
    assert "attention_mask" not in fed["batch_keys"] and "position_ids" in fed["batch_keys"]
    assert len(fed["rows"]) > fed["batches"] >= 2, "rows should be packed several to a batch"
    assert fed["cross_row_max_abs_diff"] < 1e-4


@pytest.fixture(scope="module")
def unpacked_runs(tmp_path_factory: pytest.TempPathFactory, prep_dir: Path, axolotl_python: Path) -> dict:
    """The small recipe trained unpacked by each backend, 12 steps from the same starting weights: TRL in
    one go; axolotl stopped by SIGUSR1 once checkpoint-4 is sealed, as SLURM stops a job before its time
    limit, then run again to resume (so its losses after the resume are checked against TRL's too)."""
    trl_recipe, trl_run = _small(tmp_path_factory.mktemp("trl"), prep_dir, "trl", **STEPS)
    cli("train", "sft", str(trl_recipe))
    recipe, run = _small(tmp_path_factory.mktemp("axolotl"), prep_dir, "axolotl", **STEPS)
    process = popen_cli("train", "sft", str(recipe))
    wait_for_seal(process, run / "sft" / "checkpoints" / "checkpoint-4")
    process.send_signal(signal.SIGUSR1)  # passed on by the stage to axolotl, which saves and stops
    code = process.wait(timeout=300)
    stopped = {
        "code": code,
        "stderr": process.stderr.read(),
        "finished": (run / "sft" / "MANIFEST.json").exists(),
    }
    cli("train", "sft", str(recipe))
    return {"trl": trl_run / "sft", "axolotl": run / "sft", "stopped": stopped}


def _losses(stage: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    return [(line["step"], line["loss"]) for line in lines if "loss" in line]


def test_unpacked_axolotl_takes_the_trl_paths_steps_to_the_same_losses(unpacked_runs: dict) -> None:
    trl, axolotl = _losses(unpacked_runs["trl"]), _losses(unpacked_runs["axolotl"])
    assert [step for step, _ in axolotl] == [step for step, _ in trl] == list(range(1, 13))
    for (step, ours), (_, theirs) in zip(axolotl, trl, strict=True):
        assert ours == pytest.approx(theirs, rel=1e-4), f"step {step}"
    lines = [
        json.loads(line) for line in (unpacked_runs["axolotl"] / "metrics.jsonl").read_text().splitlines()
    ]
    assert [line["step"] for line in lines if "eval_loss" in line] == [12], "evaluated once, after training"
    summaries = [json.loads((unpacked_runs[b] / "summary.json").read_text()) for b in ("trl", "axolotl")]
    assert summaries[0]["tokens_seen"] == summaries[1]["tokens_seen"] > 0
    assert summaries[1]["train_loss"] == pytest.approx(summaries[0]["train_loss"], rel=1e-4)
    assert summaries[1]["saved_logits_max_abs_diff"] < 1e-4


def test_a_signalled_axolotl_run_stops_for_requeue_then_resumes_where_it_stopped(unpacked_runs: dict) -> None:
    stopped = unpacked_runs["stopped"]
    assert stopped["code"] == 75, stopped["stderr"][-3000:]
    assert stopped["stderr"].strip().splitlines()[-1].startswith("sft: stopped by a signal")
    assert not stopped["finished"]
    summary = json.loads((unpacked_runs["axolotl"] / "summary.json").read_text())
    assert 4 <= summary["resumed_from_step"] < 12 and summary["steps"] == 12
    checkpoints = sorted((unpacked_runs["axolotl"] / "checkpoints").glob("checkpoint-*"))
    assert checkpoints and all((c / SEAL).is_file() for c in checkpoints)
