"""The eval stage on a small recipe: results.json and its manifest, the skip when nothing changed, nothing
finished-looking after a failure, the base model being training's starting point, and the failures going
back into data prep as DPO pairs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from train_support import TINY, cli, prepared, small_recipe_dict, write_recipe

from hermes_pipeline.data_prep.pipeline import run_prep
from hermes_pipeline.evals.backends import Sampling, TransformersBackend
from hermes_pipeline.evals.generate import eval_prompt, load_eval_rows
from hermes_pipeline.models import load_model
from hermes_pipeline.recipe.loader import load_recipe
from hermes_pipeline.rundir import MANIFEST

FC_SET, JSON_SET = TINY / "func_calling_eval.jsonl", TINY / "json_mode_eval.jsonl"
LIMIT, TOKENS = 4, 8


def eval_recipe(run_dir: Path) -> dict[str, Any]:
    raw = small_recipe_dict(run_dir)
    raw["eval"] = {
        "after": ["base", "sft"],
        "suites": ["function_calling", "json_mode"],
        "function_calling_sets": [str(FC_SET)],
        "json_mode_set": str(JSON_SET),
        "temperature": 0.0,
        "max_new_tokens": TOKENS,
        "batch_size": LIMIT,
        "limit": LIMIT,
    }
    return raw


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A prepared small recipe evaluated after base once, shared by the tests that only read it."""
    folder = tmp_path_factory.mktemp("stage")
    raw = eval_recipe(folder / "run")
    path, _ = prepared(folder, raw)
    cli("eval", "stage", "--after", "base", str(path))
    return path, raw


def test_results_summary_and_manifest(base_run: tuple[Path, dict[str, Any]]) -> None:
    _, raw = base_run
    out = Path(raw["run_dir"]) / "eval" / "base"
    summary = json.loads((out / "results.json").read_text())
    assert set(summary) == {"function_calling", "json_mode"}
    for result in summary.values():
        assert set(result) == {"accuracy", "ci95", "n"} and result["n"] == LIMIT
        low, high = result["ci95"]
        assert 0 <= low <= result["accuracy"] <= high <= 1
    detail = json.loads((out / "function_calling" / "func_calling_eval" / "results.json").read_text())
    assert detail["strict"]["total"] == LIMIT
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["results"] == summary and manifest["after"] == "base"
    assert {
        "results.json",
        "json_mode/samples.jsonl",
        "function_calling/func_calling_eval/dpo_pairs.jsonl",
    } <= set(manifest["outputs"])
    assert not (out.parent / "base.partial").exists()


def test_finished_eval_is_skipped_until_its_settings_change(base_run: tuple[Path, dict[str, Any]]) -> None:
    path, raw = base_run
    out = Path(raw["run_dir"]) / "eval" / "base"
    assert "up to date" in cli("eval", "stage", "--after", "base", str(path)).stdout
    cli("eval", "stage", "--after", "base", str(path), "--set", "eval.limit=2")
    assert json.loads((out / "results.json").read_text())["json_mode"]["n"] == 2
    cli("eval", "stage", "--after", "base", str(path))
    assert json.loads((out / "results.json").read_text())["json_mode"]["n"] == LIMIT


def test_base_is_the_model_training_starts_from(base_run: tuple[Path, dict[str, Any]]) -> None:
    """The random init is rebuilt with the recipe seed and grown for the chat tokens, exactly as SFT builds it."""
    from transformers import AutoTokenizer

    path, raw = base_run
    recipe = load_recipe(path)
    tokenizer = AutoTokenizer.from_pretrained(Path(raw["run_dir"]) / "prep" / "tokenizer")
    backend = TransformersBackend(
        load_model(recipe, recipe.sft, tokenizer, None), tokenizer, Sampling(0.0, 0, TOKENS, LIMIT)
    )
    prompts = [eval_prompt(row, "json_mode") for row in load_eval_rows(str(JSON_SET), LIMIT)]
    predictions = Path(raw["run_dir"]) / "eval" / "base" / "json_mode" / "predictions.jsonl"
    assert [json.loads(line)["output"] for line in predictions.read_text().splitlines()] == backend.generate(
        prompts
    )


def test_failures_are_a_dpo_source_that_prep_accepts(
    tmp_path: Path, base_run: tuple[Path, dict[str, Any]]
) -> None:
    _, raw = base_run
    folder = Path(raw["run_dir"]) / "eval" / "base" / "function_calling" / "func_calling_eval"
    written = json.loads((folder / "results.json").read_text())["dpo_pairs"]["written"]
    assert written > 0
    recipe = small_recipe_dict(tmp_path / "run")
    recipe["data"]["max_seq_len"] = 768  # the tool_use system prompt alone outgrows the small recipe's 256
    recipe["data"]["sources"].append(
        {"name": "eval_failures", "kind": "dpo_messages", "path": str(folder / "dpo_pairs.jsonl")}
    )
    run_prep(load_recipe(write_recipe(tmp_path, recipe)), log=lambda _: None)
    report = json.loads((tmp_path / "run" / "prep" / "prep_report.json").read_text())["sources"][
        "eval_failures"
    ]
    assert report["rows_in"] == report["rows_out"] == written and report["rejected"] == 0


def test_failed_eval_leaves_nothing_that_looks_finished(
    tmp_path: Path, base_run: tuple[Path, dict[str, Any]]
) -> None:
    """Function calling is scored, then the JSON-mode set turns out unreadable: no results, no manifest."""
    _, raw = base_run
    broken = tmp_path / "json_mode_eval.jsonl"
    broken.write_text(JSON_SET.read_text().splitlines()[0] + "\n{not json\n")
    raw = {**eval_recipe(tmp_path / "run"), "eval": {**raw["eval"], "json_mode_set": str(broken)}}
    path = write_recipe(tmp_path, raw)
    shutil.copytree(Path(base_run[1]["run_dir"]) / "prep", tmp_path / "run" / "prep")
    result = cli("eval", "stage", "--after", "base", str(path), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"eval set {broken}: row 2 is unreadable (invalid JSON: Expecting property name enclosed in double quotes)"
    ]
    assert not (tmp_path / "run" / "eval" / "base").exists()
    assert not (tmp_path / "run" / "eval" / "base.partial").exists()


def test_eval_after_an_unfinished_stage_says_so(base_run: tuple[Path, dict[str, Any]]) -> None:
    path, raw = base_run
    result = cli("eval", "stage", "--after", "sft", str(path), check=False)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"eval after sft: {Path(raw['run_dir']) / 'sft'} has not finished; run that stage first"
    )
