"""Pass or fail one function-calling or JSON-mode answer, by the rules behind the published Hermes 2 Pro scores.

Pure functions over one eval row in its Hub schema and the model's raw text: nothing here loads a model, so
answers from transformers, llama.cpp or an OpenAI-style server are all scored by the same code.

Where the published rules leave room, these choices hold (each is pinned by a test):

- The answer is the text after the last ``<|im_start|>assistant`` (all of it when there is none), with every
  ``<|im_end|>`` removed and the surrounding whitespace stripped.
- Function calling: a ``<tool_call>`` block that does not parse, or is never closed, fails the sample
  (``malformed_call``) rather than being skipped; a stray ``</tool_call>`` closes nothing and is ignored, as
  the published regex ignores it.
- Types are JSON types: a boolean is neither an integer nor a number (Python's ``isinstance`` says it is),
  ``3.0`` is not an integer, a list of types accepts any of them, and every present argument is checked,
  falsy ones included. Enums are checked on string parameters, as published.
- Values compare type-sensitively at every depth: ``"1" != 1`` and ``1 != True``, but ``26 == 26.0``, since
  JSON has a single number type.
- Expected calls are matched to the model's calls one to one, in any order. The published "first model call
  with the same name" would fail two calls of one tool given in the other order, and would let one model
  call stand for two expected ones.
- JSON mode: the answer must be the bare value. Surrounding whitespace is tolerated (``json.loads`` allows
  it); a Markdown fence is not, as the published parser does not accept one.
- Strict scoring reads calls as JSON only and fails a call whose ``arguments`` is a JSON string rather than
  an object (``arguments_not_object``), the published rules. ``lenient=True`` also reads the Python-dict
  form of the training data and accepts arguments sent as a JSON string, as OpenAI's API carries them; it
  is reported beside the strict number, never in its place.

README.md ("Where our scoring differs from the published evaluator") lists each deliberate difference.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from jsonschema.exceptions import SchemaError, best_match
from jsonschema.protocols import Validator
from jsonschema.validators import Draft202012Validator, validator_for
from referencing.exceptions import Unresolvable

from hermes_pipeline.chat_format.tokens import IM_END, IM_START
from hermes_pipeline.chat_format.tool_calls import (
    CALL_CLOSE,
    CALL_OPEN,
    ParsedReply,
    ToolCall,
    call_from_value,
    parse_tool_calls,
    parse_value,
)

ASSISTANT_START = f"{IM_START}assistant"
_CALL_BLOCK = re.compile(f"{re.escape(CALL_OPEN)}(.*?){re.escape(CALL_CLOSE)}", re.DOTALL)  # published regex
Z_95 = 1.959963984540054  # two-sided 95% quantile of the standard normal distribution
_SHOWN_CHARS = 60


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "boolean": lambda value: isinstance(value, bool),
    "integer": lambda value: isinstance(value, int) and not isinstance(value, bool),
    "number": _is_number,
    "string": lambda value: isinstance(value, str),
    "array": lambda value: isinstance(value, list),
    "object": lambda value: isinstance(value, dict),
    "null": lambda value: value is None,
}


class EvalRowError(ValueError):
    """The eval row itself cannot be read (its tools, completion or schema): not the model's failure, so the
    row is reported as bad input instead of being scored."""


@dataclass(frozen=True)
class Verdict:
    """One sample's result: ``reason`` is a short code to count failures by, ``detail`` the specifics.

    ``parsed`` and ``expected`` are JSON data, so a verdict can be written as it is: lists of
    ``{"name", "arguments"}`` calls for function calling, the answer's value and the expected one for JSON mode.
    """

    passed: bool
    reason: str | None
    detail: str | None
    parsed: Any
    expected: Any


class _Failure(Exception):
    """Ends a sample's checks at the first rule it breaks; the rules are ordered, so the first says the most."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def assistant_text(raw: str) -> str:
    """The reply alone: decoders that keep the prompt or the special tokens leave ChatML around it."""
    start = raw.rfind(ASSISTANT_START)
    reply = raw[start + len(ASSISTANT_START) :] if start != -1 else raw
    return reply.replace(IM_END, "").strip()


def same_value(actual: Any, expected: Any) -> bool:
    """JSON equality at every depth: the types must agree, except int and float (JSON's one number type)."""
    if _is_number(actual) and _is_number(expected):
        return actual == expected
    if type(actual) is not type(expected):
        return False
    if isinstance(actual, dict):
        return actual.keys() == expected.keys() and all(same_value(actual[k], expected[k]) for k in actual)
    if isinstance(actual, list):
        return len(actual) == len(expected) and all(map(same_value, actual, expected))
    return actual == expected


# --- Function calling ----------------------------------------------------------------------------------


def load_tools(column: Any) -> list[dict]:
    """The ``tools`` column: a list of OpenAI tool dicts (or bare function specs), usually as JSON text."""
    tools = _json_column(column, "tools")
    if not isinstance(tools, list):
        raise EvalRowError("tools is not a list")
    return tools


def expected_calls(column: Any) -> list[ToolCall]:
    """The ``completion`` column: one ``{name, arguments}`` call or a list of them, usually as JSON text."""
    value = _json_column(column, "completion")
    try:
        return [call_from_value(item) for item in (value if isinstance(value, list) else [value])]
    except ValueError as error:
        raise EvalRowError(f"completion: {error}") from None


def score_function_calling(row: Mapping[str, Any], output: str, lenient: bool = False) -> Verdict:
    """The sample passes when the answer makes exactly the expected calls, each one valid for its tool.

    Raises EvalRowError when the row's own tools or completion cannot be read.
    """
    signatures = _signatures(load_tools(row.get("tools")))
    expected = expected_calls(row.get("completion"))
    text = assistant_text(output)
    reply = parse_tool_calls(text, allow_python=lenient)
    encoded = [] if lenient else _calls_with_encoded_arguments(text)
    parsed, wanted = [call.as_dict() for call in reply.calls], [call.as_dict() for call in expected]
    try:
        _check_reply(reply, expected, signatures, encoded)
    except _Failure as failure:
        return Verdict(False, failure.reason, failure.detail, parsed, wanted)
    return Verdict(True, None, None, parsed, wanted)


def _signatures(tools: list[dict]) -> dict[str, dict]:
    """Each tool's parameter schema by name, checked once here so the rules below can trust its shape."""
    signatures = {}
    for tool in tools:
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise EvalRowError("tools: a tool is not an object with a name")
        parameters = spec.get("parameters") or {}
        properties = parameters.get("properties", {}) if isinstance(parameters, dict) else None
        if not isinstance(properties, dict) or not all(isinstance(p, dict) for p in properties.values()):
            raise EvalRowError(f"tools: {spec['name']} has malformed parameters")
        if not isinstance(parameters.get("required", []), list):
            raise EvalRowError(f"tools: {spec['name']} has a malformed required list")
        signatures[spec["name"]] = parameters
    return signatures


def _calls_with_encoded_arguments(text: str) -> list[str]:
    """The names of the calls whose ``arguments`` is JSON text rather than an object.

    The codec decodes such a string (OpenAI's wire form), which training data and lenient scoring want;
    the published evaluator fails the call, so strict scoring looks at the blocks as written. Blocks that
    do not parse are left to ``parse_tool_calls``, which reports them.
    """
    names = []
    for block in _CALL_BLOCK.findall(text):
        try:
            call = parse_value(block, allow_python=False)
        except ValueError:
            continue
        if isinstance(call, dict) and isinstance(call.get("arguments"), str):
            names.append(str(call.get("name")))
    return names


def _check_reply(
    reply: ParsedReply, expected: list[ToolCall], signatures: dict[str, dict], encoded: list[str]
) -> None:
    broken = [error for error in reply.errors if error.block != CALL_CLOSE]
    if broken:
        raise _Failure("malformed_call", broken[0].reason)
    if expected and not reply.calls:
        raise _Failure("no_tool_call", f"expected {len(expected)} call(s), the answer makes none")
    if len(reply.calls) != len(expected):
        raise _Failure("wrong_call_count", f"expected {len(expected)} call(s), got {len(reply.calls)}")
    if encoded:
        raise _Failure("arguments_not_object", f"{encoded[0]}: 'arguments' is a JSON string, not an object")
    for call in reply.calls:
        _check_signature(call, signatures)
    _match(reply.calls, expected)


def _check_signature(call: ToolCall, signatures: dict[str, dict]) -> None:
    """Every call must be one the tools allow, whether or not it is one the answer needs."""
    if call.name not in signatures:
        raise _Failure("unknown_function", f"{call.name!r} is not one of the tools")
    parameters = signatures[call.name]
    missing = [name for name in parameters.get("required", []) if name not in call.arguments]
    if missing:
        raise _Failure("missing_required", f"{call.name}: missing {', '.join(map(repr, missing))}")
    properties = parameters.get("properties", {})
    for name, value in call.arguments.items():
        if name in properties:
            _check_argument(f"{call.name}.{name}", value, properties[name])


def _check_argument(where: str, value: Any, schema: dict) -> None:
    declared = schema.get("type")
    types = [
        t
        for t in (declared if isinstance(declared, list) else [declared])
        if isinstance(t, str) and t in _JSON_TYPES
    ]
    if types and not any(_JSON_TYPES[t](value) for t in types):
        wanted = " or ".join(types)
        raise _Failure("wrong_type", f"{where}: expected {wanted}, got {_json_type(value)} {_show(value)}")
    options = schema.get("enum")
    enforced = "string" in types and isinstance(options, list) and len(options) > 0
    if enforced and not any(same_value(value, option) for option in options):
        raise _Failure("enum_violation", f"{where}: {_show(value)} is not one of {_show(options)}")


def _match(calls: list[ToolCall], expected: list[ToolCall]) -> None:
    """Pair expected calls with the model's one to one, in any order (a bipartite matching by augmenting
    paths: a sample holds a few calls, so its cost does not matter, while a greedy pass can miss a pairing
    when one call carries the arguments of two expected ones)."""
    fits = [[j for j, call in enumerate(calls) if _difference(call, want) is None] for want in expected]
    owner: dict[int, int] = {}  # model call -> the expected call it stands for
    for i, want in enumerate(expected):
        if not _augment(i, fits, owner, set()):
            raise _Failure(*_mismatch(want, calls))


def _augment(i: int, fits: list[list[int]], owner: dict[int, int], seen: set[int]) -> bool:
    for j in fits[i]:
        if j not in seen:
            seen.add(j)
            if j not in owner or _augment(owner[j], fits, owner, seen):
                owner[j] = i
                return True
    return False


def _difference(call: ToolCall, want: ToolCall) -> str | None:
    """The first expected argument ``call`` lacks or gets wrong; None when it has them all (extras allowed)."""
    if call.name != want.name:
        return f"calls {call.name!r}, not {want.name!r}"
    for name, value in want.arguments.items():
        if name not in call.arguments:
            return f"{want.name}.{name}: missing, expected {_show(value)}"
        if not same_value(call.arguments[name], value):
            return f"{want.name}.{name}: expected {_show(value)}, got {_show(call.arguments[name])}"
    return None


def _mismatch(want: ToolCall, calls: list[ToolCall]) -> tuple[str, str]:
    same_name = [call for call in calls if call.name == want.name]
    if not same_name:
        return "wrong_function", f"no call to {want.name!r}"
    differences = [found for call in same_name if (found := _difference(call, want))]
    if not differences:
        return "wrong_function", f"{want.name!r} is called fewer times than expected"
    return "wrong_arguments", differences[0]


# --- JSON mode -----------------------------------------------------------------------------------------


def score_json_mode(row: Mapping[str, Any], output: str) -> Verdict:
    """The sample passes when the answer parses, fits the schema and has the expected keys and values.

    Raises EvalRowError when the row's own schema or completion cannot be read.
    """
    validator = _validator(_json_column(row.get("schema"), "schema"))
    expected = _json_column(row.get("completion"), "completion")
    if not isinstance(expected, dict):
        raise EvalRowError("completion is not a JSON object")
    text = assistant_text(output)
    try:
        answer = _parse_answer(text)
    except _Failure as failure:
        return Verdict(False, failure.reason, failure.detail, None, expected)
    try:
        _check_answer(answer, expected, validator)
    except _Failure as failure:
        return Verdict(False, failure.reason, failure.detail, answer, expected)
    return Verdict(True, None, None, answer, expected)


def _validator(schema: Any) -> Validator:
    """A validator for the schema's declared draft (2020-12 when it declares none), as ``jsonschema.validate``
    picks it; a schema that breaks its own metaschema is the row's fault, not the model's."""
    if not isinstance(schema, dict):
        raise EvalRowError("schema is not a JSON object")
    cls = validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as error:
        raise EvalRowError(f"schema is invalid: {error.message}") from None
    return cls(schema)


def _parse_answer(text: str) -> Any:
    """JSON, then a Python literal (the published fallback); ``parse_value`` never evaluates code."""
    if not text:
        raise _Failure("unparsable", "empty answer")
    try:
        return parse_value(text)
    except ValueError as error:
        fenced = " (a Markdown fence is not accepted)" if text.startswith("```") else ""
        raise _Failure("unparsable", f"{error}{fenced}") from None


def _check_answer(answer: Any, expected: dict, validator: Validator) -> None:
    try:
        error = best_match(validator.iter_errors(answer))
    except Unresolvable as unresolvable:
        raise EvalRowError(f"schema has an unresolvable reference: {unresolvable}") from None
    if error is not None:
        where = "/".join(map(str, error.absolute_path)) or "(root)"
        raise _Failure("schema_invalid", f"{where}: {_clip(error.message)}")
    if not isinstance(answer, dict):
        raise _Failure("not_an_object", f"expected an object, got {_json_type(answer)}")
    missing, extra = expected.keys() - answer.keys(), answer.keys() - expected.keys()
    if missing:
        raise _Failure("missing_key", f"missing {_show(sorted(missing))}")
    if extra:
        raise _Failure("extra_key", f"unexpected {_show(sorted(extra))}")
    for key, value in expected.items():
        if not same_value(answer[key], value):
            raise _Failure("wrong_value", f"{key}: expected {_show(value)}, got {_show(answer[key])}")


# --- Aggregation ---------------------------------------------------------------------------------------


def wilson_interval(passed: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a pass rate.

    Eval sets are small (json-mode-eval has 100 rows) and good models score near 1, which is where the
    usual normal-approximation interval fails: it collapses to zero width at 0/n or n/n and runs past 1.
    Wilson's interval stays inside [0, 1] and keeps close to its nominal coverage at small n and extreme
    rates (Brown, Cai and DasGupta, 2001), without the over-wide Clopper-Pearson bounds.
    """
    if total <= 0 or not 0 <= passed <= total:
        raise ValueError(f"need 0 <= passed <= total and total > 0, got {passed}/{total}")
    rate = passed / total
    spread = z * z / total
    centre = (rate + spread / 2) / (1 + spread)
    half = z * math.sqrt(rate * (1 - rate) / total + spread / (4 * total)) / (1 + spread)
    return max(0.0, centre - half), min(1.0, centre + half)


def category(row: Mapping[str, Any], eval_set: str) -> str:
    """The glaive set's ``category`` (else ``task``); the other sets have neither, so the set's name stands in."""
    for key in ("category", "task"):
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return eval_set


def aggregate(samples: Iterable[tuple[str, Verdict]]) -> dict[str, Any]:
    """Accuracy with its 95% interval, overall and per category, and failures counted by reason.

    ``samples`` are ``(category, verdict)`` pairs. With no samples the accuracy and interval are None: a rate
    of nothing is not zero.
    """
    outcomes: dict[str, list[bool]] = {}
    failures: Counter[str] = Counter()
    for name, verdict in samples:
        outcomes.setdefault(name, []).append(verdict.passed)
        if not verdict.passed:
            failures[verdict.reason or "unknown"] += 1
    every = [passed for results in outcomes.values() for passed in results]
    return {
        **_rate(sum(every), len(every)),
        "by_category": {
            name: _rate(sum(results), len(results)) for name, results in sorted(outcomes.items())
        },
        "failures": dict(failures.most_common()),
    }


def _rate(passed: int, total: int) -> dict[str, Any]:
    if total == 0:
        return {"passed": 0, "total": 0, "accuracy": None, "ci95": None}
    return {
        "passed": passed,
        "total": total,
        "accuracy": passed / total,
        "ci95": list(wilson_interval(passed, total)),
    }


# --- Shared pieces -------------------------------------------------------------------------------------


def _json_column(value: Any, column: str) -> Any:
    """A column the Hub stores as JSON text; an already-decoded value (a hand-written row) is taken as is."""
    if value is None:
        raise EvalRowError(f"{column} is missing")
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        raise EvalRowError(f"{column} is not valid JSON") from None


def _json_type(value: Any) -> str:
    return next((name for name, test in _JSON_TYPES.items() if test(value)), type(value).__name__)


def _show(value: Any) -> str:
    return _clip(json.dumps(value, ensure_ascii=False))


def _clip(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else f"{text[: _SHOWN_CHARS - 3]}..."
