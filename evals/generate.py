"""Answer an eval set with a backend, then score the answers with the same code that scores outside predictions.

``evaluate(backend, kind, data, out_dir)`` writes ``predictions.jsonl`` (each eval row plus ``output``) next to
what ``score_predictions`` writes, so a run can be re-scored later, or with ``--lenient``, without generating
again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from hermes_pipeline.chat_format.prompts import function_calling_system_prompt
from hermes_pipeline.chat_format.templates import render
from hermes_pipeline.errors import UserError
from hermes_pipeline.evals.backends import Backend, Prompt
from hermes_pipeline.evals.predictions import Kind, score_predictions
from hermes_pipeline.evals.scoring import EvalRowError, load_tools
from hermes_pipeline.readers import iter_records
from hermes_pipeline.recipe.schema import DATA_FILE_SUFFIXES

PREDICTIONS_FILE = "predictions.jsonl"


def eval_prompt(row: dict[str, Any], kind: Kind) -> Prompt:
    """The prompt exactly as training rendered it: function calling through the tool_use template with the
    row's tools, JSON mode through the default template (its system turn already holds the schema).

    Raises EvalRowError when the row's prompt or tools cannot be rendered.
    """
    messages = row.get("prompt")
    if not isinstance(messages, list):
        raise EvalRowError("prompt is not a list of messages")
    try:
        if kind == "function_calling":
            tools = load_tools(row.get("tools"))
            system = {"role": "system", "content": function_calling_system_prompt(tools)}
            return Prompt(render(messages, tools=tools, add_generation_prompt=True), [system, *messages])
        return Prompt(render(messages, add_generation_prompt=True), list(messages))
    except (TemplateError, TypeError, KeyError, AttributeError) as error:
        raise EvalRowError(f"prompt cannot be rendered ({type(error).__name__})") from None


def eval_set_name(ref: str) -> str:
    """How results name a set: a Hub id as it is, a local file by its name without the suffix."""
    return Path(ref).stem if Path(ref).suffix in DATA_FILE_SUFFIXES else ref


def load_eval_rows(ref: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` rows (all by default) of a local eval file or a Hub data set's train split.

    An eval set is curated, so an unreadable row stops the run with its row number rather than being
    scored as a failure of the model.
    """
    rows: list[dict[str, Any]] = []
    for record in iter_records(ref):
        if limit is not None and len(rows) >= limit:
            break
        if record.data is None:
            raise UserError(f"eval set {ref}: row {record.index + 1} is unreadable ({record.error})")
        rows.append(record.data)
    return rows


def evaluate(
    backend: Backend,
    kind: Kind,
    data: str,
    out_dir: str | Path,
    limit: int | None = None,
    lenient: bool = False,
) -> dict[str, Any]:
    """Generate an answer for every row of ``data`` and score them; returns ``score_predictions``'s results.

    A row whose prompt cannot be rendered gets an empty answer instead of a generation; scoring then reports
    it as a bad input row, with the reason the row's own columns give.
    """
    rows = load_eval_rows(data, limit)
    if not rows:
        raise UserError(f"eval set {data}: no rows")
    prompts: dict[int, Prompt] = {}
    for index, row in enumerate(rows):
        try:
            prompts[index] = eval_prompt(row, kind)
        except EvalRowError:
            continue
    answers = dict(zip(prompts, backend.generate(list(prompts.values())), strict=True))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictions = out / PREDICTIONS_FILE
    with predictions.open("w", encoding="utf-8") as stream:
        for index, row in enumerate(rows):
            stream.write(json.dumps({**row, "output": answers.get(index, "")}, ensure_ascii=False) + "\n")
    return score_predictions(predictions, kind, out, lenient=lenient, eval_set=eval_set_name(data))
