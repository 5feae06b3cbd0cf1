"""The Hermes model cards' benchmark suites, run by lm-evaluation-harness and printed in the cards' layout.

The cards list their tasks under the names of the Nous fork of the harness. The tasks here are their
lm-evaluation-harness 0.4 counterparts:

- GPT4All: the seven tasks as named on the cards.
- AGIEval: the eight English tasks (lm-eval's ``agieval_nous`` group).
- BigBench: the multiple-choice BIG-bench tasks the cards list. lm-eval 0.4 has one task for each of
  logical_deduction and tracking_shuffled_objects where the cards split them by 3, 5 and 7 objects, and
  spells causal_judgment without the card's extra "e", so the list has 14 tasks for the cards' 18 rows.
- TruthfulQA: mc1 and mc2; the suite's score is mc2, the number the cards quote.

A suite's score is the mean over its scored tasks of ``acc_norm`` where a task reports it, else ``acc``,
as the cards average (the DPO card's GPT4All 73.72 is that mean). Its interval treats the tasks as
independent: the mean's standard error is sqrt(sum of squared task stderrs) / number of tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hermes_pipeline.errors import UserError
from hermes_pipeline.evals.scoring import Z_95


@dataclass(frozen=True)
class Suite:
    tasks: tuple[str, ...]
    scored: tuple[str, ...] | None = None  # the tasks the suite's score averages; None means all


_AGIEVAL = (
    "aqua_rat", "logiqa_en", "lsat_ar", "lsat_lr", "lsat_rc", "sat_en", "sat_en_without_passage", "sat_math",
)  # fmt: skip
_BIGBENCH = (
    "causal_judgment", "date_understanding", "disambiguation_qa", "geometric_shapes", "logical_deduction",
    "movie_recommendation", "navigate", "reasoning_about_colored_objects", "ruin_names",
    "salient_translation_error_detection", "snarks", "sports_understanding", "temporal_sequences",
    "tracking_shuffled_objects",
)  # fmt: skip

SUITES: dict[str, Suite] = {
    "gpt4all": Suite(("arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")),
    "agieval": Suite(tuple(f"agieval_{name}" for name in _AGIEVAL)),
    "bigbench": Suite(tuple(f"bigbench_{name}_multiple_choice" for name in _BIGBENCH)),
    "truthfulqa": Suite(("truthfulqa_mc1", "truthfulqa_mc2"), scored=("truthfulqa_mc2",)),
}
HEADLINE_METRICS = ("acc_norm", "acc")


def run_suites(
    model: Any,
    suites: dict[str, Suite],
    tokenizer: Any = None,
    batch_size: int = 8,
    limit: int | None = None,
    include_path: str | Path | None = None,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Run every suite's tasks in one lm-eval call and return each suite's tasks and score.

    ``model`` is a model directory, a Hub id or a loaded transformers model (then ``tokenizer`` is needed);
    ``include_path`` adds a folder of task YAML files to lm-eval's own tasks. Returns
    ``{suite: {"tasks": {task: {"version", "n", "metrics": {metric: [value, stderr]}}}, "score", "ci95", "n"}}``.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    tasks = [task for suite in suites.values() for task in suite.tasks]
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise UserError(f"lm-eval has no task {', '.join(unknown)}; check the task names or --include-path")
    device = "cuda" if _cuda() else "cpu"
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return {name: suite_result(suite, output) for name, suite in suites.items()}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def suite_result(suite: Suite, output: dict[str, Any]) -> dict[str, Any]:
    tasks = {task: _task_result(task, output) for task in suite.tasks}
    headline = [_headline(tasks[task]) for task in suite.scored or suite.tasks]
    score = sum(value for value, _ in headline) / len(headline)
    stderr = math.sqrt(sum(error**2 for _, error in headline)) / len(headline)
    return {
        "tasks": tasks,
        "score": score,
        "ci95": [max(0.0, score - Z_95 * stderr), min(1.0, score + Z_95 * stderr)],
        "n": sum(tasks[task]["n"] for task in suite.scored or suite.tasks),
    }


def _task_result(task: str, output: dict[str, Any]) -> dict[str, Any]:
    """lm-eval keys metrics as ``name,filter``; every card task uses the one filter, ``none``."""
    raw = output["results"][task]
    metrics: dict[str, list[float | None]] = {}
    for key, value in raw.items():
        metric, _, filter_name = key.partition(",")
        if filter_name and not metric.endswith("_stderr") and isinstance(value, int | float):
            stderr = raw.get(f"{metric}_stderr,{filter_name}")
            metrics[metric] = [value, stderr if isinstance(stderr, int | float) else None]
    return {
        "version": output["versions"].get(task),
        "n": output["n-samples"][task]["effective"],
        "metrics": metrics,
    }


def _headline(task: dict[str, Any]) -> tuple[float, float]:
    metric = next(name for name in HEADLINE_METRICS if name in task["metrics"])
    value, stderr = task["metrics"][metric]
    return value, stderr or 0.0


_HEADER = ("Task", "Version", "Metric", "Value", "", "Stderr")
_RIGHT_ALIGNED = {1, 3, 5}


def format_suite(name: str, result: dict[str, Any]) -> str:
    """One suite as the cards print it: a Markdown table of task, version, metric, value and stderr, a task's
    further metrics on rows of their own, then the average in percent."""
    rows: list[tuple[str, ...]] = []
    for task, entry in result["tasks"].items():
        for index, (metric, (value, stderr)) in enumerate(sorted(entry["metrics"].items())):
            first = index == 0
            version = str(entry["version"]) if first and entry["version"] is not None else ""
            shown = "N/A" if stderr is None else f"{stderr:.4f}"
            rows.append((task if first else "", version, metric, f"{value:.4f}", "±", shown))
    widths = [max(len(row[i]) for row in [_HEADER, *rows]) for i in range(len(_HEADER))]

    def line(cells: tuple[str, ...]) -> str:
        aligned = [
            cell.rjust(width) if i in _RIGHT_ALIGNED else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "|" + "|".join(aligned) + "|"

    header = line(tuple(heading.center(width) for heading, width in zip(_HEADER, widths, strict=True)))
    rule = (
        "|"
        + "|".join("-" * (w - 1) + ":" if i in _RIGHT_ALIGNED else "-" * w for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([f"## {name}", header, rule, *map(line, rows), f"Average: {100 * result['score']:.2f}"])
