"""lm-evaluation-harness suites: the card task names exist in lm-eval, the cards' averaging rule reproduces a
published average, and a task of our own runs offline on a tiny model, through the API and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from train_support import cli

from hermes_pipeline.chat_format.tokens import save_tokenizer
from hermes_pipeline.errors import UserError
from hermes_pipeline.evals.harness import SUITES, Suite, format_suite, run_suites, suite_result
from hermes_pipeline.tiny import build_tiny_model, load_tiny_tokenizer

HARNESS = Path(__file__).parent / "fixtures" / "evals" / "harness"
ROWS = [json.loads(line) for line in (HARNESS / "capitals_mc.jsonl").read_text().splitlines()]

# The GPT4All table of the Nous Hermes 2 Mistral 7B DPO card: (acc, acc_norm) per task; its average is 73.72.
DPO_CARD_GPT4ALL = {
    "arc_challenge": (0.5776, 0.6220),
    "arc_easy": (0.8380, 0.8245),
    "boolq": (0.8624, None),
    "hellaswag": (0.6418, 0.8249),
    "openbookqa": (0.3420, 0.4540),
    "piqa": (0.8177, 0.8264),
    "winogrande": (0.7466, None),
}


@pytest.fixture(scope="module")
def include_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture task, pointed at its rows by absolute path (datasets resolves data_files from the cwd)."""
    folder = tmp_path_factory.mktemp("tasks")
    config = yaml.safe_load((HARNESS / "capitals_mc.yaml").read_text())
    config["dataset_kwargs"]["data_files"]["test"] = str(HARNESS / "capitals_mc.jsonl")
    (folder / "capitals_mc.yaml").write_text(yaml.safe_dump(config))
    return folder


def test_every_card_task_is_an_lm_eval_task() -> None:
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)
    missing = [task for suite in SUITES.values() for task in suite.tasks if task not in known]
    assert not missing
    assert len(SUITES["gpt4all"].tasks) == 7 and len(SUITES["agieval"].tasks) == 8


def test_suite_average_is_the_cards() -> None:
    output: dict[str, Any] = {"results": {}, "versions": {}, "n-samples": {}}
    for task, (acc, acc_norm) in DPO_CARD_GPT4ALL.items():
        metrics = {"acc,none": acc, "acc_stderr,none": 0.01, "alias": task}
        if acc_norm is not None:
            metrics |= {"acc_norm,none": acc_norm, "acc_norm_stderr,none": 0.01}
        output["results"][task] = metrics
        output["versions"][task] = 1.0
        output["n-samples"][task] = {"original": 100, "effective": 100}
    result = suite_result(SUITES["gpt4all"], output)
    # The card averaged unrounded values; its rounded table gives 73.726. Averaging acc instead would give 73.92.
    assert 100 * result["score"] == pytest.approx(73.72, abs=0.01)
    half = 1.959963984540054 * math.sqrt(7 * 0.01**2) / 7
    assert result["ci95"] == pytest.approx([result["score"] - half, result["score"] + half])
    assert result["n"] == 700
    table = format_suite("GPT4All", result)
    assert table.splitlines()[-1] == "Average: 73.73"
    assert "|arc_challenge|    1.0|acc     |0.5776|±|0.0100|" in table
    assert "|             |       |acc_norm|0.6220|±|0.0100|" in table


def test_truthfulqa_scores_mc2_alone() -> None:
    output = {
        "results": {
            "truthfulqa_mc1": {"acc,none": 0.39, "acc_stderr,none": 0.02},
            "truthfulqa_mc2": {"acc,none": 0.56, "acc_stderr,none": 0.02},
        },
        "versions": {"truthfulqa_mc1": 2.0, "truthfulqa_mc2": 3.0},
        "n-samples": {task: {"effective": 817} for task in ("truthfulqa_mc1", "truthfulqa_mc2")},
    }
    result = suite_result(SUITES["truthfulqa"], output)
    assert result["score"] == 0.56 and result["n"] == 817


@pytest.mark.slow
def test_offline_task_on_a_tiny_model(include_path: Path) -> None:
    result = run_suites(
        build_tiny_model(seed=1),
        {"capitals": Suite(("capitals_mc",))},
        tokenizer=load_tiny_tokenizer(),
        batch_size=4,
        include_path=include_path,
    )["capitals"]
    task = result["tasks"]["capitals_mc"]
    assert task["n"] == len(ROWS) and task["version"] == 1.0
    assert set(task["metrics"]) == {"acc", "acc_norm"}
    for value, stderr in task["metrics"].values():
        assert value in {k / len(ROWS) for k in range(len(ROWS) + 1)} and stderr > 0
    assert result["score"] == task["metrics"]["acc_norm"][0]


def test_unknown_task_is_one_clear_error(include_path: Path) -> None:
    with pytest.raises(UserError, match="no task capitals_typo"):
        run_suites("unused", {"x": Suite(("capitals_typo",))}, include_path=include_path)


@pytest.mark.slow
def test_harness_command_prints_the_card_table(tmp_path: Path, include_path: Path) -> None:
    model = tmp_path / "model"
    build_tiny_model(seed=1).save_pretrained(model)
    save_tokenizer(load_tiny_tokenizer(), model)
    result = cli(
        "eval", "harness", str(model), "--tasks", "capitals_mc", "--include-path", str(include_path),
        "--limit", "4", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert lines[0] == "## tasks" and lines[-1].startswith("Average: ")
    assert any(line.startswith("|capitals_mc|") for line in lines)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["tasks"]["tasks"]["capitals_mc"]["n"] == 4
    assert f"Average: {100 * saved['tasks']['score']:.2f}" == lines[-1]
