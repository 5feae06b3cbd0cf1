"""Score answers produced elsewhere (a server, llama.cpp, another harness) against an eval set.

Two calls serve the ``eval function-calling --predictions FILE`` and ``eval json-mode --predictions FILE``
commands:

- ``score_predictions(path, kind, out_dir, lenient=False, eval_set=None) -> dict`` reads a predictions file
  (JSON lines, a JSON array or Parquet) whose rows are eval rows in their Hub schema plus ``output``, the raw
  assistant text, and writes to ``out_dir``:

  - ``samples.jsonl``: every scored sample, with its prompt, raw output, parsed answer, verdict and reason;
  - ``results.json``: the dict it returns (accuracy with a 95% Wilson interval, per-category breakdown,
    failures by reason, the lenient numbers when asked, every bad input row with its reason);
  - ``dpo_pairs.jsonl``: each failure as a ``dpo_messages`` preference row (prompt and tools, chosen = the
    expected answer in the Hermes format, rejected = the model's answer), ready to list in a recipe's
    ``data.sources``. They are built from eval prompts, so a recipe that evaluates on the same set has
    data_prep's decontamination drop them, as it should: they suit a model judged on other sets.

- ``format_results(results) -> str``: that dict as a table for the terminal.

A bad input row (unreadable, no ``output``, an eval row whose own columns do not parse) never stops the run
and never vanishes: it is counted and listed with a one-line reason.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Literal

from hermes_pipeline.chat_format.tool_calls import render_tool_calls
from hermes_pipeline.errors import UserError
from hermes_pipeline.evals.scoring import (
    EvalRowError,
    Verdict,
    aggregate,
    assistant_text,
    category,
    expected_calls,
    load_tools,
    score_function_calling,
    score_json_mode,
)
from hermes_pipeline.readers import Record, iter_records
from hermes_pipeline.rows import Reject, check_dpo_row, message

Kind = Literal["function_calling", "json_mode"]
KINDS: tuple[Kind, ...] = ("function_calling", "json_mode")
SAMPLES_FILE, RESULTS_FILE, PAIRS_FILE = "samples.jsonl", "results.json", "dpo_pairs.jsonl"
_FILES = {"samples": SAMPLES_FILE, "results": RESULTS_FILE, "dpo_pairs": PAIRS_FILE}


@dataclass(frozen=True)
class _Scored:
    number: int  # 1-based row number in the predictions file (blank lines are not rows)
    row: dict[str, Any]
    output: str
    category: str
    strict: Verdict
    lenient: Verdict | None


def score_predictions(
    path: str | Path, kind: Kind, out_dir: str | Path, lenient: bool = False, eval_set: str | None = None
) -> dict[str, Any]:
    """Score every row of a predictions file, write samples, results and DPO pairs, and return the results.

    ``eval_set`` names the set in the results and stands in as the category of rows that have none; it
    defaults to the file's name. ``lenient`` adds a second, separately reported function-calling score
    that also reads Python-dict calls and arguments given as a JSON string; JSON mode already reads Python
    literals, as published.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if lenient and kind != "function_calling":
        raise UserError(
            "lenient scoring is for function calling only: JSON mode already reads Python literals"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = eval_set or Path(path).stem
    scored: list[_Scored] = []
    bad_rows: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    with (
        (out / SAMPLES_FILE).open("w", encoding="utf-8") as samples,
        (out / PAIRS_FILE).open("w", encoding="utf-8") as dpo,
    ):
        for record in iter_records(str(path)):
            try:
                sample = _score(record, kind, name, lenient)
            except EvalRowError as error:
                bad_rows.append({"row": record.index + 1, "reason": str(error)})
                continue
            scored.append(sample)
            _write_line(samples, _sample_record(sample))
            if not sample.strict.passed and (reason := _write_pair(dpo, _dpo_pair(sample, kind, name))):
                skipped[reason] += 1
    results = _results(path, kind, name, scored, bad_rows, lenient)
    failed = sum(not sample.strict.passed for sample in scored)
    results["dpo_pairs"] = {"written": failed - skipped.total(), "skipped": dict(skipped.most_common())}
    results["files"] = {key: str(out / file) for key, file in _FILES.items()}
    (out / RESULTS_FILE).write_text(
        json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return results


def _score(record: Record, kind: Kind, eval_set: str, lenient: bool) -> _Scored:
    """One row scored, or EvalRowError saying in one line why it cannot be."""
    if record.data is None:
        raise EvalRowError(record.error or "unreadable row")
    row = record.data
    output = row.get("output")
    if not isinstance(output, str):
        raise EvalRowError("output is missing or not text")
    _check_prompt(row.get("prompt"))
    if kind == "function_calling":
        strict = score_function_calling(row, output)
        loose = score_function_calling(row, output, lenient=True) if lenient else None
    else:
        strict, loose = score_json_mode(row, output), None
    return _Scored(record.index + 1, row, output, category(row, eval_set), strict, loose)


def _check_prompt(prompt: Any) -> None:
    """The prompt goes into samples and DPO pairs as it is, so it must be the Hub's list of messages."""
    if not isinstance(prompt, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in prompt
    ):
        raise EvalRowError("prompt is not a list of {role, content} messages")


def _sample_record(sample: _Scored) -> dict[str, Any]:
    record = {"row": sample.number, "category": sample.category, "prompt": sample.row["prompt"]}
    if "id" in sample.row:
        record["id"] = sample.row["id"]
    record |= {"output": sample.output, **asdict(sample.strict)}
    if sample.lenient is not None:
        record["lenient"] = asdict(sample.lenient)
    return record


def _write_pair(dpo: IO[str], pair: dict[str, Any]) -> str | None:
    """Write the pair when data_prep's row check accepts it, else return why not: an empty answer, a chat
    control token in it, or an answer equal to the expected one would only be rejected at prep time."""
    try:
        check_dpo_row(pair)
    except Reject as reject:
        return str(reject)
    _write_line(dpo, pair)
    return None


def _dpo_pair(sample: _Scored, kind: Kind, eval_set: str) -> dict[str, Any]:
    """The ``dpo_messages`` source form. The chosen calls are rendered as the Hermes ``<tool_call>`` text the
    model should have written; the rejected side is the model's reply without the ChatML around it."""
    row = sample.row
    if kind == "function_calling":
        chosen = render_tool_calls(expected_calls(row["completion"]))
    else:
        chosen = json.dumps(sample.strict.expected, ensure_ascii=False)
    pair = {
        "id": str(row["id"]) if row.get("id") is not None else f"{eval_set}:{sample.number}",
        "prompt": [message(m["role"], m["content"]) for m in row["prompt"]],
        "chosen": [message("assistant", chosen)],
        "rejected": [message("assistant", assistant_text(sample.output))],
    }
    if kind == "function_calling":
        pair["tools"] = load_tools(row["tools"])
    return pair


def _results(
    path: str | Path, kind: Kind, eval_set: str, scored: list[_Scored], bad_rows: list[dict], lenient: bool
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "kind": kind,
        "eval_set": eval_set,
        "predictions": str(path),
        "strict": aggregate((s.category, s.strict) for s in scored),
    }
    if lenient:
        results["lenient"] = aggregate((s.category, s.lenient) for s in scored if s.lenient is not None)
    results["bad_rows"] = {"count": len(bad_rows), "rows": bad_rows}
    return results


def _write_line(stream: IO[str], value: dict[str, Any]) -> None:
    stream.write(json.dumps(value, ensure_ascii=False) + "\n")


# --- Terminal table ------------------------------------------------------------------------------------

_HEADINGS = ["passed", "total", "accuracy", "95% CI"]


def format_results(results: dict[str, Any]) -> str:
    """The scores, the per-category breakdown, the failure reasons and the bad rows, for a terminal."""
    modes = [mode for mode in ("strict", "lenient") if mode in results]
    lines = [f"{results['kind']} on {results['eval_set']}", ""]
    lines += _table(["score", *_HEADINGS], [[mode, *_cells(results[mode])] for mode in modes])
    categories = results["strict"]["by_category"]
    if len(categories) > 1:
        rows = [[name, *_cells(rate)] for name, rate in categories.items()]
        lines += ["", *_table(["category (strict)", *_HEADINGS], rows)]
    failures = [f"failures ({m}): {_counts(results[m]['failures'])}" for m in modes if results[m]["failures"]]
    lines += ["", *failures] if failures else []
    bad = results["bad_rows"]
    lines += ["", f"bad input rows: {bad['count']}"]
    lines += [f"  row {entry['row']}: {entry['reason']}" for entry in bad["rows"]]
    pairs = results["dpo_pairs"]
    skipped = f", skipped: {_counts(pairs['skipped'])}" if pairs["skipped"] else ""
    lines.append(f"DPO pairs from failures: {pairs['written']} written{skipped}")
    return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in counts.items())


def _cells(rate: dict[str, Any]) -> list[str]:
    if rate["accuracy"] is None:
        return [str(rate["passed"]), str(rate["total"]), "-", "-"]
    low, high = rate["ci95"]
    return [str(rate["passed"]), str(rate["total"]), f"{rate['accuracy']:.1%}", f"{low:.1%} - {high:.1%}"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned first column, the numbers right-aligned under their headings."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join(
            [first, *(cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))]
        )

    return [line(header), *map(line, rows)]
