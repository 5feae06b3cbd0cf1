"""Scoring Hermes 2 Vision's <fn_call> answers: rows read from the LLaVA shape with their reference, answers
passed only when they parse, follow the request's schema and equal the reference field by field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hermes_pipeline.evals.scoring import EvalRowError
from hermes_pipeline.evals.vision import field_matches, read_row, score_fn_call

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "data" / "tiny-vision" / "images"
ROW = json.loads((ROOT / "data" / "tiny-vision" / "eval.json").read_text())[0]  # a yellow triangle pair


def test_row_reads_prompt_picture_schema_and_reference() -> None:
    row = read_row(ROW, IMAGES)
    assert [m["role"] for m in row.messages] == ["user"]  # the answer is left out of the prompt
    assert row.messages[0]["content"].startswith("<image>\n<fn_call>{")
    assert row.image == IMAGES / ROW["image"] and row.schema["required"] == ["shape", "colour", "count"]
    assert row.reference == {"shape": "triangle", "colour": "yellow", "count": 2}


@pytest.mark.parametrize(
    ("output", "passed", "reason", "fields"),
    [
        ('{"shape": "triangle", "colour": "yellow", "count": 2}', True, None, (True, True, True)),
        ('{\n  "shape": "triangle",\n  "colour": "red",\n  "count": 2\n}', False, "wrong_value", (True, False, True)),
        ('{"shape": "triangle", "colour": "yellow", "count": "2"}', False, "schema_invalid", (True, True, False)),
        ('{"shape": "hexagon", "colour": "yellow", "count": 2}', False, "schema_invalid", (False, True, True)),
        ('{"shape": "triangle", "colour": "yellow"', False, "unparsable", (False, False, False)),
        ("", False, "unparsable", (False, False, False)),
    ],
    ids=["right", "wrong colour", "count as text", "outside the enum", "cut off", "empty"],
)  # fmt: skip
def test_answers_pass_only_when_valid_and_equal_to_the_reference(
    output: str, passed: bool, reason: str | None, fields: tuple[bool, bool, bool]
) -> None:
    row = read_row(ROW, IMAGES)
    verdict = score_fn_call(row, output)
    assert (verdict.passed, verdict.reason) == (passed, reason)
    assert tuple(field_matches(verdict, row.reference).values()) == fields


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"reference": None}, "reference (each field's right answer) is not a JSON object"),
        ({"image": "eval/no-such.png"}, "is not a file under"),
        ({"conversations": [{"from": "human", "value": "<image>\nWhat shape?"}]}, "does not open with <fn_call>"),
        ({"conversations": [{"from": "human", "value": "<image>\n<fn_call>{not json"}]}, "schema is not JSON"),
        ({"conversations": [{"from": "human", "value": "<fn_call>{}"}]}, "must hold one <image>"),
        ({"conversations": "hello"}, "not a list of {from, value} turns"),
    ],
    ids=["no reference", "missing picture", "not a fn_call", "schema not JSON", "no image tag", "bad turns"],
)  # fmt: skip
def test_unscorable_rows_are_named(change: dict, reason: str) -> None:
    with pytest.raises(
        EvalRowError, match=reason.replace("(", r"\(").replace(")", r"\)").replace("{", r"\{")
    ):
        read_row({**ROW, **change}, IMAGES)
