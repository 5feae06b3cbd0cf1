"""Function-calling and JSON-mode scoring: hand-written answers and the verdict each must get, the interval,
the predictions round trip, and the DPO pairs going through data_prep's converter.

The rows under fixtures/evals/ are our own, written in the exact Hub schemas of NousResearch/func-calling-eval
(prompt, tools and completion as JSON text), func-calling-eval-glaive (plus category, task, source) and
json-mode-eval (prompt, completion, schema).
"""

import json
import math
from pathlib import Path
from typing import Any

import pytest

from hermes_pipeline.chat_format.templates import render
from hermes_pipeline.chat_format.tool_calls import ToolCall, parse_tool_calls, render_tool_calls
from hermes_pipeline.data_prep.sources import convert, row_id
from hermes_pipeline.errors import UserError
from hermes_pipeline.evals.predictions import format_results, score_predictions
from hermes_pipeline.evals.scoring import (
    Z_95,
    EvalRowError,
    aggregate,
    category,
    same_value,
    score_function_calling,
    score_json_mode,
    wilson_interval,
)
from hermes_pipeline.readers import iter_records
from hermes_pipeline.recipe.schema import DataSource

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "evals"
FC_ROWS = [json.loads(line) for line in (FIXTURES / "func_calling_eval.jsonl").read_text().splitlines()]
GLAIVE_ROWS = [
    json.loads(line) for line in (FIXTURES / "func_calling_eval_glaive.jsonl").read_text().splitlines()
]
JSON_ROWS = [json.loads(line) for line in (FIXTURES / "json_mode_eval.jsonl").read_text().splitlines()]
# The function-calling fixture rows, by what they expect.
OSLO_CELSIUS, TIMER, FORECAST, TWO_CITIES, CONVERT, OSLO_TWICE = range(6)


def block(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call>"


def call(name: str, **arguments: Any) -> str:
    return block(json.dumps({"name": name, "arguments": arguments}))


def encoded_call(name: str, **arguments: Any) -> str:
    """A call whose arguments are JSON text, as OpenAI's API carries them."""
    return block(json.dumps({"name": name, "arguments": json.dumps(arguments)}))


OSLO = call("get_weather", city="Oslo", unit="celsius")
BERGEN = call("get_weather", city="Bergen")

# (case, fixture row, model output, strict reason, lenient reason); None means the sample passes.
FUNCTION_CALLING_CASES = [
    ("valid call", OSLO_CELSIUS, OSLO, None, None),
    ("extra argument", OSLO_CELSIUS, call("get_weather", city="Oslo", unit="celsius", include_forecast=False), None, None),
    (
        "arguments first, keys reordered",
        OSLO_CELSIUS,
        block('{"arguments": {"unit": "celsius", "city": "Oslo"}, "name": "get_weather"}'),
        None,
        None,
    ),
    ("prose around the call", OSLO_CELSIUS, f"Let me check.\n{OSLO}\nOne moment.", None, None),
    ("whole ChatML decode", OSLO_CELSIUS, f"<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n{OSLO}<|im_end|>", None, None),
    ("stray closing tag", OSLO_CELSIUS, f"{OSLO}</tool_call>", None, None),
    ("calls in another order", TWO_CITIES, f"{BERGEN}\n{call('get_weather', city='Oslo')}", None, None),
    ("one call fits two expected", OSLO_TWICE, f"{OSLO}\n{call('get_weather', city='Oslo')}", None, None),
    ("one call fits both expected", OSLO_TWICE, f"{OSLO}\n{BERGEN}", "wrong_arguments", "wrong_arguments"),
    ("one call stands for two", TWO_CITIES, f"{call('get_weather', city='Oslo')}\n{call('get_weather', city='Oslo')}", "wrong_arguments", "wrong_arguments"),
    ("float for a number", CONVERT, call("convert_temperature", degrees=26.0, to_unit="celsius"), None, None),
    ("string for an integer", TIMER, call("set_timer", minutes="3"), "wrong_type", "wrong_type"),
    ("float for an integer", TIMER, call("set_timer", minutes=3.0), "wrong_type", "wrong_type"),
    ("boolean for an integer", TIMER, call("set_timer", minutes=True), "wrong_type", "wrong_type"),
    ("1 for true", FORECAST, call("get_weather", city="Bergen", include_forecast=1), "wrong_type", "wrong_type"),
    ("falsy value of a wrong type", FORECAST, call("get_weather", city="Bergen", include_forecast=0), "wrong_type", "wrong_type"),
    ("missing required argument", OSLO_CELSIUS, call("get_weather", unit="celsius"), "missing_required", "missing_required"),
    ("unknown function", OSLO_CELSIUS, call("get_forecast", city="Oslo"), "unknown_function", "unknown_function"),
    ("another tool of the row", OSLO_CELSIUS, call("set_timer", minutes=5), "wrong_function", "wrong_function"),
    ("integer outside its enum (published checks string enums only)", TIMER, call("set_timer", minutes=3, repeat=5), None, None),
    ("enum violation", OSLO_CELSIUS, call("get_weather", city="Oslo", unit="kelvin"), "enum_violation", "enum_violation"),
    ("wrong value", OSLO_CELSIUS, call("get_weather", city="Bergen", unit="celsius"), "wrong_arguments", "wrong_arguments"),
    ("expected argument left out", OSLO_CELSIUS, call("get_weather", city="Oslo"), "wrong_arguments", "wrong_arguments"),
    ("one call missing", TWO_CITIES, BERGEN, "wrong_call_count", "wrong_call_count"),
    ("one call extra", OSLO_CELSIUS, f"{OSLO}\n{BERGEN}", "wrong_call_count", "wrong_call_count"),
    (
        "Python dict",
        OSLO_CELSIUS,
        block("{'arguments': {'city': 'Oslo', 'unit': 'celsius'}, 'name': 'get_weather'}"),
        "malformed_call",
        None,
    ),
    ("Python dict, wrong value", OSLO_CELSIUS, block("{'name': 'get_weather', 'arguments': {'city': 'Rome'}}"), "malformed_call", "wrong_arguments"),
    ("unclosed tool_call", OSLO_CELSIUS, OSLO.removesuffix("</tool_call>"), "malformed_call", "malformed_call"),
    ("broken JSON beside a good call", OSLO_CELSIUS, f"{OSLO}\n{block('{oops')}", "malformed_call", "malformed_call"),
    ("arguments as a JSON string", OSLO_CELSIUS, encoded_call("get_weather", city="Oslo", unit="celsius"), "arguments_not_object", None),
    ("arguments as a JSON string, wrong value", OSLO_CELSIUS, encoded_call("get_weather", city="Rome"), "arguments_not_object", "wrong_arguments"),
    ("one of two calls with JSON-string arguments", TWO_CITIES, f"{BERGEN}\n{encoded_call('get_weather', city='Oslo')}", "arguments_not_object", None),
    ("JSON-string arguments, one call too many", OSLO_CELSIUS, f"{OSLO}\n{encoded_call('get_weather', city='Oslo')}", "wrong_call_count", "wrong_call_count"),
    ("arguments as a JSON string of a list", OSLO_CELSIUS, block('{"name": "get_weather", "arguments": "[1]"}'), "malformed_call", "malformed_call"),
    ("a key besides name and arguments (published ignores it)", OSLO_CELSIUS, block('{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}, "id": "call_1"}'), "malformed_call", "malformed_call"),
    ("NaN argument (published json.loads reads it)", OSLO_CELSIUS, block('{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius", "x": NaN}}'), "malformed_call", "malformed_call"),
    ("no tool call", OSLO_CELSIUS, "It is 12 degrees in Oslo.", "no_tool_call", "no_tool_call"),
    ("empty output", OSLO_CELSIUS, "", "no_tool_call", "no_tool_call"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("row", "output", "strict", "lenient"),
    [case[1:] for case in FUNCTION_CALLING_CASES],
    ids=[case[0] for case in FUNCTION_CALLING_CASES],
)
def test_function_calling_verdicts(row: int, output: str, strict: str | None, lenient: str | None) -> None:
    for verdict, reason in [
        (score_function_calling(FC_ROWS[row], output), strict),
        (score_function_calling(FC_ROWS[row], output, lenient=True), lenient),
    ]:
        assert (verdict.passed, verdict.reason) == (reason is None, reason), verdict.detail
        assert (verdict.detail is None) == verdict.passed


def test_json_string_arguments_fail_strict_and_count_in_the_lenient_number(tmp_path: Path) -> None:
    output = encoded_call("get_weather", city="Oslo", unit="celsius")
    assert score_function_calling(FC_ROWS[OSLO_CELSIUS], output).detail == (
        "get_weather: 'arguments' is a JSON string, not an object"
    )
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({**FC_ROWS[OSLO_CELSIUS], "output": output})])
    results = score_predictions(path, "function_calling", tmp_path / "out", lenient=True)
    assert results["strict"]["passed"] == 0 and results["strict"]["failures"] == {"arguments_not_object": 1}
    assert results["lenient"]["passed"] == 1


def test_function_calling_verdict_carries_calls_and_a_precise_detail() -> None:
    verdict = score_function_calling(FC_ROWS[TIMER], call("set_timer", minutes="3", label="tea"))
    assert verdict.parsed == [{"name": "set_timer", "arguments": {"minutes": "3", "label": "tea"}}]
    assert verdict.expected == [{"name": "set_timer", "arguments": {"minutes": 3}}]
    assert verdict.detail == 'set_timer.minutes: expected integer, got string "3"'
    wrong = score_function_calling(FC_ROWS[OSLO_CELSIUS], call("get_weather", city="Bergen", unit="celsius"))
    assert wrong.detail == 'get_weather.city: expected "Oslo", got "Bergen"'


def test_expected_call_may_be_given_decoded() -> None:
    """Hand-built rows (and Parquet files) may hold tools and completion decoded rather than as JSON text."""
    row = {**FC_ROWS[OSLO_CELSIUS]}
    row["tools"], row["completion"] = json.loads(row["tools"]), json.loads(row["completion"])
    assert score_function_calling(row, OSLO).passed
    assert not score_function_calling(row, BERGEN).passed


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("tools", "[{oops", "tools is not valid JSON"),
        ("tools", json.dumps({"name": "f"}), "tools is not a list"),
        ("tools", json.dumps([{"type": "function"}]), "a tool is not an object with a name"),
        ("completion", "{oops", "completion is not valid JSON"),
        ("completion", json.dumps({"arguments": {}}), "completion: missing 'name'"),
        ("completion", None, "completion is missing"),
    ],
)
def test_unreadable_function_calling_row_is_the_rows_fault(column: str, value: Any, message: str) -> None:
    with pytest.raises(EvalRowError, match=message):
        score_function_calling({**FC_ROWS[OSLO_CELSIUS], column: value}, OSLO)


ADA = {"name": "Ada", "age": 36, "email": "ada@example.org"}

# (case, model output, reason); None means the sample passes.
JSON_MODE_CASES = [
    ("valid", json.dumps(ADA), None),
    ("keys reordered", json.dumps({"email": "ada@example.org", "age": 36, "name": "Ada"}), None),
    ("surrounding whitespace", f"\n  {json.dumps(ADA)}  \n", None),
    ("Python literal (published fallback)", repr(ADA), None),
    ("whole ChatML decode", f"<|im_start|>assistant\n{json.dumps(ADA)}<|im_end|>", None),
    ("wrong type", json.dumps({**ADA, "age": "36"}), "schema_invalid"),
    ("boolean for an integer", json.dumps({**ADA, "age": True}), "schema_invalid"),
    ("required key missing", json.dumps({"name": "Ada", "email": "ada@example.org"}), "schema_invalid"),
    ("optional key missing", json.dumps({"name": "Ada", "age": 36}), "missing_key"),
    ("extra key", json.dumps({**ADA, "city": "London"}), "extra_key"),
    ("wrong value", json.dumps({**ADA, "age": 37}), "wrong_value"),
    ("fenced", f"```json\n{json.dumps(ADA)}\n```", "unparsable"),
    ("prose before", f"Here it is: {json.dumps(ADA)}", "unparsable"),
    ("truncated", json.dumps(ADA)[:-1], "unparsable"),
    ("empty", "", "unparsable"),
    ("a list of records", json.dumps([ADA]), "schema_invalid"),
]


@pytest.mark.parametrize(
    ("output", "reason"), [case[1:] for case in JSON_MODE_CASES], ids=[case[0] for case in JSON_MODE_CASES]
)
def test_json_mode_verdicts(output: str, reason: str | None) -> None:
    verdict = score_json_mode(JSON_ROWS[0], output)
    assert (verdict.passed, verdict.reason) == (reason is None, reason), verdict.detail
    assert verdict.expected == ADA


def test_json_mode_details() -> None:
    assert score_json_mode(JSON_ROWS[0], json.dumps(ADA)).parsed == ADA
    assert score_json_mode(JSON_ROWS[0], json.dumps({**ADA, "age": 37})).detail == "age: expected 36, got 37"
    fenced = score_json_mode(JSON_ROWS[0], f"```json\n{json.dumps(ADA)}\n```")
    assert "fence" in fenced.detail and fenced.parsed is None
    assert score_json_mode(JSON_ROWS[0], json.dumps({**ADA, "age": "36"})).detail.startswith("age: ")


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("schema", "{oops", "schema is not valid JSON"),
        ("schema", json.dumps({"type": "no-such-type"}), "schema is invalid"),
        ("completion", json.dumps([1, 2]), "completion is not a JSON object"),
    ],
)
def test_unreadable_json_mode_row_is_the_rows_fault(column: str, value: str, message: str) -> None:
    with pytest.raises(EvalRowError, match=message):
        score_json_mode({**JSON_ROWS[0], column: value}, json.dumps(ADA))


def test_wilson_interval_known_values() -> None:
    """Closed forms at the edges (0/n: upper z²/(n+z²); n/n: lower n/(n+z²)) and one textbook middle value."""
    assert wilson_interval(0, 10) == (0.0, pytest.approx(Z_95**2 / (10 + Z_95**2)))
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + Z_95**2), 1.0))
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(84, 100)
    assert (low, high) == (pytest.approx(0.7558, abs=1e-4), pytest.approx(0.8990, abs=1e-4))
    # The same bounds from the other usual way of writing the formula.
    root = Z_95 * math.sqrt(84 * 16 / 100 + Z_95**2 / 4)
    assert (low, high) == pytest.approx(
        ((84 + Z_95**2 / 2 - root) / (100 + Z_95**2), (84 + Z_95**2 / 2 + root) / (100 + Z_95**2))
    )
    # Rounding would put the bounds a hair outside [0, 1] at these sizes.
    assert wilson_interval(0, 21)[0] == 0.0 and wilson_interval(16, 16)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(1, 0)


def test_aggregate_counts_categories_and_reasons() -> None:
    passed = score_function_calling(FC_ROWS[OSLO_CELSIUS], OSLO)
    wrong_type = score_function_calling(FC_ROWS[TIMER], call("set_timer", minutes="3"))
    no_call = score_function_calling(FC_ROWS[TIMER], "no")
    summary = aggregate(
        [("Weather", passed), ("Timers", wrong_type), ("Timers", no_call), ("Timers", passed)]
    )
    assert (summary["passed"], summary["total"], summary["accuracy"]) == (2, 4, 0.5)
    assert summary["ci95"] == pytest.approx(list(wilson_interval(2, 4)))
    assert summary["by_category"]["Timers"] | {"ci95": None} == {
        "passed": 1,
        "total": 3,
        "accuracy": 1 / 3,
        "ci95": None,
    }
    assert summary["by_category"]["Weather"]["accuracy"] == 1.0
    assert summary["failures"] == {"wrong_type": 1, "no_tool_call": 1}
    assert aggregate([]) == {
        "passed": 0,
        "total": 0,
        "accuracy": None,
        "ci95": None,
        "by_category": {},
        "failures": {},
    }


def test_category_prefers_the_rows_own() -> None:
    assert category(GLAIVE_ROWS[0], "glaive") == "Weather"
    assert category({"task": "Timers"}, "glaive") == "Timers"
    assert category(FC_ROWS[0], "func-calling-eval") == "func-calling-eval"


# --- Predictions files ---------------------------------------------------------------------------------


def expected_output(row: dict) -> str:
    """What a perfect model answers: the expected calls in the Hermes format."""
    completion = json.loads(row["completion"])
    calls = completion if isinstance(completion, list) else [completion]
    return render_tool_calls([ToolCall(c["name"], c["arguments"]) for c in calls])


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def glaive_predictions(tmp_path: Path) -> Path:
    """Three glaive rows (one answered right, one with the wrong type, one with Python-dict calls), an empty
    answer, and three bad lines: not JSON, no output, unreadable tools."""
    weather, timer, stock = GLAIVE_ROWS
    rows = [
        {**weather, "output": expected_output(weather)},
        {**timer, "output": call("set_timer", minutes="12", label="tea")},
        {**stock, "output": block("{'name': 'get_stock_price', 'arguments': {'symbol': 'NVDA'}}")},
        {**weather, "output": ""},
    ]
    bad = ["{not json", json.dumps(weather), json.dumps({**stock, "tools": "[{", "output": "x"})]
    return write_lines(
        tmp_path / "glaive.jsonl", [*map(json.dumps, rows[:2]), bad[0], *map(json.dumps, rows[2:]), *bad[1:]]
    )


def test_predictions_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "out"
    results = score_predictions(
        glaive_predictions(tmp_path), "function_calling", out, lenient=True, eval_set="glaive"
    )
    assert json.loads((out / "results.json").read_text()) == results
    strict, lenient = results["strict"], results["lenient"]
    assert (strict["passed"], strict["total"]) == (1, 4)
    assert (lenient["passed"], lenient["total"]) == (2, 4)
    assert strict["failures"] == {"wrong_type": 1, "malformed_call": 1, "no_tool_call": 1}
    assert strict["by_category"]["Weather"]["total"] == 2 and strict["by_category"]["Finance"]["passed"] == 0
    assert lenient["by_category"]["Finance"]["passed"] == 1
    assert results["bad_rows"]["count"] == 3
    reasons = {entry["row"]: entry["reason"] for entry in results["bad_rows"]["rows"]}
    assert reasons[3].startswith("invalid JSON") and reasons[6] == "output is missing or not text"
    assert reasons[7] == "tools is not valid JSON"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["row"] for s in samples] == [1, 2, 4, 5]
    assert [s["reason"] for s in samples] == [None, "wrong_type", "malformed_call", "no_tool_call"]
    assert samples[1]["output"] == call("set_timer", minutes="12", label="tea")
    assert samples[1]["parsed"] == [{"name": "set_timer", "arguments": {"minutes": "12", "label": "tea"}}]
    assert samples[1]["prompt"] == GLAIVE_ROWS[1]["prompt"] and samples[1]["category"] == "Productivity"
    assert samples[2]["lenient"]["passed"] and not samples[2]["passed"]
    # Three failures; the empty answer would be rejected by data_prep, so it is counted, not written.
    assert results["dpo_pairs"] == {"written": 2, "skipped": {"empty assistant content": 1}}
    assert len((out / "dpo_pairs.jsonl").read_text().splitlines()) == 2


def test_format_results_shows_every_number(tmp_path: Path) -> None:
    results = score_predictions(
        glaive_predictions(tmp_path), "function_calling", tmp_path / "out", lenient=True
    )
    text = format_results(results)
    assert "function_calling on glaive" in text
    assert any(line.split()[:4] == ["strict", "1", "4", "25.0%"] for line in text.splitlines())
    assert any(line.split()[:4] == ["lenient", "2", "4", "50.0%"] for line in text.splitlines())
    assert any(line.split()[:3] == ["Productivity", "0", "1"] for line in text.splitlines())
    assert "failures (strict): wrong_type 1, malformed_call 1, no_tool_call 1" in text
    assert "bad input rows: 3" in text and "  row 6: output is missing or not text" in text
    assert "DPO pairs from failures: 2 written, skipped: empty assistant content 1" in text


def test_strict_is_reported_alone_unless_lenient_is_asked(tmp_path: Path) -> None:
    results = score_predictions(glaive_predictions(tmp_path), "function_calling", tmp_path / "out")
    assert "lenient" not in results and "lenient" not in format_results(results)
    samples = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    assert all("lenient" not in json.loads(line) for line in samples)


def test_lenient_json_mode_is_refused(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({**JSON_ROWS[0], "output": "{}"})])
    with pytest.raises(UserError, match="function calling only"):
        score_predictions(path, "json_mode", tmp_path / "out", lenient=True)


@pytest.mark.parametrize(
    ("kind", "eval_file"),
    [("function_calling", "func_calling_eval.jsonl"), ("json_mode", "json_mode_eval.jsonl")],
)
def test_bundled_tiny_sets_score_perfect_answers_perfectly(tmp_path: Path, kind: str, eval_file: str) -> None:
    rows = [json.loads(line) for line in (ROOT / "data" / "tiny" / eval_file).read_text().splitlines()]
    answer = expected_output if kind == "function_calling" else (lambda row: row["completion"])
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({**row, "output": answer(row)}) for row in rows])
    results = score_predictions(path, kind, tmp_path / "out")
    assert (results["strict"]["passed"], results["strict"]["total"]) == (len(rows), len(rows))
    assert results["bad_rows"]["count"] == 0 and results["dpo_pairs"]["written"] == 0


# --- DPO pairs through data_prep -----------------------------------------------------------------------


def converted_pairs(pairs_file: Path) -> list[dict]:
    """Every pair as data_prep converts a ``dpo_messages`` source: read like any source, then converted."""
    source = DataSource(name="eval_failures", kind="dpo_messages", path=str(pairs_file))
    records = list(iter_records(str(pairs_file)))
    assert all(record.error is None for record in records)
    return [convert(r.data, row_id(r.data, r.index, source.name), source) for r in records]


def test_function_calling_failures_are_a_dpo_source(tmp_path: Path) -> None:
    outputs = {
        OSLO_CELSIUS: call("get_weather", city="Oslo", unit="kelvin"),
        TWO_CITIES: BERGEN,
        TIMER: "Done!",
    }
    path = write_lines(
        tmp_path / "p.jsonl", [json.dumps({**FC_ROWS[i], "output": o}) for i, o in outputs.items()]
    )
    results = score_predictions(path, "function_calling", tmp_path / "out", eval_set="fc")
    assert results["dpo_pairs"] == {"written": 3, "skipped": {}}
    rows = converted_pairs(tmp_path / "out" / "dpo_pairs.jsonl")
    assert [row["id"] for row in rows] == ["fc:1", "fc:2", "fc:3"]
    for row, (index, output) in zip(rows, outputs.items(), strict=True):
        expected = FC_ROWS[index]
        assert row["prompt"] == expected["prompt"] and row["tools"] == json.loads(expected["tools"])
        assert row["rejected"] == [{"role": "assistant", "content": output}]
        chosen = row["chosen"][0]["content"]
        assert chosen == expected_output(expected)
        assert parse_tool_calls(chosen, allow_python=False).calls == [
            ToolCall(c["name"], c["arguments"]) for c in score_function_calling(expected, output).expected
        ]
        rendered = render([*row["prompt"], *row["chosen"]], tools=row["tools"])
        assert f"<|im_start|>assistant\n{expected_output(expected)}<|im_end|>" in rendered
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
        in rows[1]["chosen"][0]["content"]
    )


def test_json_mode_failures_are_a_dpo_source(tmp_path: Path) -> None:
    row = JSON_ROWS[1]
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({**row, "output": '{"name": "Alan", "age": "41"}'})])
    score_predictions(path, "json_mode", tmp_path / "out", eval_set="jm")
    (pair,) = converted_pairs(tmp_path / "out" / "dpo_pairs.jsonl")
    assert pair["prompt"] == row["prompt"]
    assert json.loads(pair["chosen"][0]["content"]) == json.loads(row["completion"])
    assert pair["rejected"][0]["content"] == '{"name": "Alan", "age": "41"}'


@pytest.mark.parametrize(
    ("actual", "expected", "equal"),
    [
        ("1", 1, False),
        (1, True, False),
        (0, False, False),
        (None, False, False),
        (26.0, 26, True),
        ({"a": [1, {"b": True}]}, {"a": [1, {"b": True}]}, True),
        ({"a": [1, {"b": 1}]}, {"a": [1, {"b": True}]}, False),
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}, True),
        ({"a": 1}, {"a": 1, "b": None}, False),
        ([1, 2], [2, 1], False),
    ],
)
def test_same_value_is_type_sensitive_at_every_depth(actual: Any, expected: Any, equal: bool) -> None:
    assert same_value(actual, expected) is equal
