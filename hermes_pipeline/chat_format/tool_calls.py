"""The tool-call codec: ``<tool_call>`` blocks in assistant text and ``<tools>`` blocks in system prompts.

Two dialects meet here. The shipped template and later Hermes code write JSON with the name first; the
hermes-function-calling-v1 data writes Python dicts, arguments first, with True/False/None. Both parse to
the same :class:`ToolCall`, which always renders back in the template's JSON form, so a data row that went
through this codec tokenizes exactly like a conversation rendered from structured ``tool_calls``.

Parsing text a model or a data set produced must never crash a pipeline: every problem becomes a
:class:`ToolCallError`, and nothing is ever evaluated (``ast.literal_eval`` only builds literals).
"""

from __future__ import annotations

import ast
import copy
import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOLS_OPEN, TOOLS_CLOSE = "<tools>", "</tools>"
CALL_KEYS = ("name", "arguments")
_TOO_DEEP = "too deeply nested or too large to parse"
_NOT_TOOLS = "tools are not valid JSON nor Python literals"
_WHITESPACE = re.compile(r"\s*")
_DEPTH = {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}
# One step through Python literal text: a whole string (any quotes, backslash escapes), a comment, one
# bracket, or a run of anything else.
_LITERAL_PIECE = re.compile(
    "|".join(
        [
            r"'''(?:\\.|[^\\])*?'''",
            r'"""(?:\\.|[^\\])*?"""',
            r"'(?:\\.|[^\\'\n])*'",
            r'"(?:\\.|[^\\"\n])*"',
            r"#[^\n]*",
            r"[()\[\]{}]",
            r"""[^'"#()\[\]{}]+""",
        ]
    ),
    re.DOTALL,
)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def to_json(self) -> str:
        """The form the tool_use template writes (name first, ``json.dumps`` defaults, unicode kept raw).

        The template pastes the name in unescaped, so the two agree for any name JSON need not escape,
        which covers every real function name.
        """
        return json.dumps({"name": self.name, "arguments": self.arguments}, ensure_ascii=False)

    def as_dict(self) -> dict[str, Any]:
        """A canonical-row ``tool_calls`` entry; a copy, so editing the row cannot change this frozen call."""
        return {"name": self.name, "arguments": copy.deepcopy(self.arguments)}


@dataclass(frozen=True)
class ToolCallError:
    block: str
    reason: str
    offset: int


@dataclass
class ParsedReply:
    content: str
    calls: list[ToolCall]
    errors: list[ToolCallError]


class _Malformed(Exception):
    """Why a block is unusable; carried up to become a ToolCallError's reason."""


def parse_tool_calls(text: str, allow_python: bool = True) -> ParsedReply:
    """Split an assistant reply into its prose and its calls, reporting each broken block instead of raising.

    A block runs from ``<tool_call>`` to the first ``</tool_call>`` after it, like the published scorer's
    non-greedy regex. ``allow_python=False`` accepts JSON only, which is what the published scorer does.
    Broken blocks stay out of ``content``: each is in ``errors``, in text order, with its raw text.
    """
    outside: list[str] = []
    calls: list[ToolCall] = []
    errors: list[ToolCallError] = []
    previous_end = 0
    for start, end, closed in _find_blocks(text, CALL_OPEN, CALL_CLOSE):
        outside.append(_drop_stray_closes(text, previous_end, start, errors))
        block = text[start:end]
        try:
            calls.append(_call_in(block, closed, allow_python))
        except _Malformed as problem:
            errors.append(ToolCallError(block=block, reason=str(problem), offset=start))
        previous_end = end
    outside.append(_drop_stray_closes(text, previous_end, len(text), errors))
    return ParsedReply(content="".join(outside).strip(), calls=calls, errors=errors)


def render_tool_calls(calls: list[ToolCall]) -> str:
    """Assistant content that renders to the same bytes as the same calls given as structured ``tool_calls``.

    The template writes ``<|im_start|>assistant`` then ``\\n<tool_call>...`` per call, while plain content
    follows ``<|im_start|>assistant\\n``; joining the blocks with newlines lines the two up exactly.
    """
    return "\n".join(f"{CALL_OPEN}\n{call.to_json()}\n{CALL_CLOSE}" for call in calls)


def parse_value(text: str, allow_python: bool = True) -> Any:
    """One value read the way a ``<tool_call>`` body is read, as plain JSON data; ValueError says why not.

    For callers holding a bare value rather than a block, such as the JSON-mode scorer, so that JSON
    first, the literal fallback that never evaluates code, and the refusal of values JSON cannot carry
    stay one rule.
    """
    try:
        return _load(text.strip(), allow_python)
    except _Malformed as problem:
        raise ValueError(str(problem)) from None


def call_from_value(value: Any) -> ToolCall:
    """A call given as data (``{"name", "arguments"}``, as eval sets store the expected call), checked like
    a parsed block; ValueError says why not."""
    try:
        return _call_from(_json_compatible(value))
    except _Malformed as problem:
        raise ValueError(str(problem)) from None


def parse_tools(text: str) -> list[dict] | ToolCallError:
    """The tool definitions in a system prompt's ``<tools>`` block.

    Hermes prompts first mention the tags empty ("signatures within <tools></tools> XML tags"), so the
    first block with something in it is the one that holds the tools; a prompt whose blocks are all
    empty offers no tools.
    """
    blocks = list(_find_blocks(text, TOOLS_OPEN, TOOLS_CLOSE))
    if not blocks:
        return ToolCallError(block="", reason=f"no {TOOLS_OPEN} block", offset=0)
    for start, end, closed in blocks:
        block = text[start:end]
        if not closed:
            return ToolCallError(block=block, reason=f"unclosed {TOOLS_OPEN}", offset=start)
        body = block[len(TOOLS_OPEN) : -len(TOOLS_CLOSE)].strip()
        if body:
            try:
                return _tools_from(_tool_values(body))
            except _Malformed as problem:
                return ToolCallError(block=block, reason=str(problem), offset=start)
    return []


def _find_blocks(text: str, open_tag: str, close_tag: str) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, closed)`` per block; an unclosed block runs to the end of the text.

    ``str.find`` rather than a non-greedy regex keeps this linear on text full of opening tags.
    """
    position = 0
    while (start := text.find(open_tag, position)) != -1:
        close = text.find(close_tag, start + len(open_tag))
        closed = close != -1
        position = close + len(close_tag) if closed else len(text)
        yield start, position, closed


def _drop_stray_closes(text: str, start: int, end: int, errors: list[ToolCallError]) -> str:
    """The prose between two blocks, minus any ``</tool_call>`` that closes nothing (each one reported)."""
    gap = text[start:end]
    position = 0
    while (stray := gap.find(CALL_CLOSE, position)) != -1:
        errors.append(ToolCallError(block=CALL_CLOSE, reason=f"stray {CALL_CLOSE}", offset=start + stray))
        position = stray + len(CALL_CLOSE)
    return gap.replace(CALL_CLOSE, "")


def _call_in(block: str, closed: bool, allow_python: bool) -> ToolCall:
    if not closed:
        raise _Malformed(f"unclosed {CALL_OPEN}")
    return _call_from(_load(block[len(CALL_OPEN) : -len(CALL_CLOSE)].strip(), allow_python))


def _load(body: str, allow_python: bool) -> Any:
    if not body:
        raise _Malformed("empty block")
    try:
        value = json.loads(body)
    except (RecursionError, MemoryError):
        raise _Malformed(_TOO_DEEP) from None
    except ValueError as error:
        if not allow_python:
            raise _Malformed(f"not valid JSON: {error}") from None
        value = _literal(body)
    return _json_compatible(value)


def _literal(source: str, invalid: str = "not valid JSON nor a Python literal") -> Any:
    """A Python literal, for the data set's dict form; invalid escapes are data noise, not warnings."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.literal_eval(source)
    except (RecursionError, MemoryError):
        raise _Malformed(_TOO_DEEP) from None
    except (ValueError, TypeError, SyntaxError):
        raise _Malformed(invalid) from None


def _json_compatible(value: Any) -> Any:
    """``value`` as plain JSON data, so every parsed call can be rendered again.

    A Python literal may hold tuples (become lists), sets, bytes or complex numbers (rejected); JSON and
    Python both allow NaN and infinities, which JSON output cannot carry (rejected).
    """
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (RecursionError, MemoryError):
        raise _Malformed(_TOO_DEEP) from None
    except (TypeError, ValueError):
        raise _Malformed("holds values JSON cannot represent (sets, bytes, NaN...)") from None


def _call_from(data: Any) -> ToolCall:
    if not isinstance(data, dict):
        raise _Malformed(f"a call must be an object, got {type(data).__name__}")
    unknown = [key for key in data if key not in CALL_KEYS]
    if unknown:
        raise _Malformed(f"unknown keys: {', '.join(map(repr, unknown))}")
    if "name" not in data:
        raise _Malformed("missing 'name'")
    name = data["name"]
    if not isinstance(name, str) or not name:
        raise _Malformed("'name' must be a non-empty string")
    if "arguments" not in data:
        raise _Malformed("missing 'arguments'")
    return ToolCall(name=name, arguments=_arguments_from(data["arguments"]))


def _arguments_from(arguments: Any) -> dict[str, Any]:
    """Arguments as an object; OpenAI clients send them as a JSON string holding that object."""
    if isinstance(arguments, str):
        try:
            arguments = _load(arguments, allow_python=False)
        except _Malformed:
            raise _Malformed("'arguments' string is not valid JSON") from None
    if not isinstance(arguments, dict):
        raise _Malformed("'arguments' must be an object")
    return arguments


def _tool_values(body: str) -> list[Any]:
    """Every top-level value in a tools block, one after another, each read as JSON first and as a Python
    literal second.

    The template writes one JSON-like object per tool whose description holds raw newlines (hence the
    lenient decoder); the data set writes a Python repr list, or several dicts side by side with or
    without whitespace between them. Reading value by value lets the forms mix in one block.
    """
    decoder = json.JSONDecoder(strict=False)
    values = []
    position = 0
    while position < len(body):
        value, position = _next_value(decoder, body, position)
        values.append(value)
        position = _WHITESPACE.match(body, position).end()
    return values


def _next_value(decoder: json.JSONDecoder, body: str, position: int) -> tuple[Any, int]:
    try:
        return _decode_entry(decoder, body, position)
    except (RecursionError, MemoryError):
        raise _Malformed(_TOO_DEEP) from None
    except ValueError:
        end = _literal_end(body, position)
        return _literal(body[position:end], invalid=_NOT_TOOLS), end


def _decode_entry(decoder: json.JSONDecoder, body: str, position: int) -> tuple[Any, int]:
    """One JSON value, forgiving a single missing ``}`` where the next entry or the block's end begins.

    The published tool_use template (and ours, which matches it byte for byte) never closes the outer
    ``{"type": "function", ...`` object of a tool, so without this the tools it renders could not be read.
    """
    try:
        return decoder.raw_decode(body, position)
    except json.JSONDecodeError as error:
        next_entry = _WHITESPACE.match(body, error.pos).end()
        if next_entry < len(body) and body[next_entry] != "{":
            raise
        return decoder.decode(body[position : error.pos] + "}"), error.pos


def _literal_end(body: str, start: int) -> int:
    """Where the bracketed Python literal opening at ``start`` closes.

    Strings and comments are stepped over whole, so brackets inside them do not count; this only finds
    the extent that ``ast.literal_eval`` then reads, it evaluates nothing.
    """
    depth = 0
    position = start
    while (piece := _LITERAL_PIECE.match(body, position)) is not None:
        step = _DEPTH.get(piece.group(), 0)
        if position == start and step != 1:
            break
        depth += step
        position = piece.end()
        if depth == 0:
            return position
    raise _Malformed(_NOT_TOOLS)


def _tools_from(values: list[Any]) -> list[dict]:
    """A flat list of tools, whether the block held one list, one object, or several objects."""
    tools = [tool for value in values for tool in (value if isinstance(value, list) else [value])]
    for number, tool in enumerate(tools, start=1):
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _Malformed(f"tool {number} is not an object with a name")
    return _json_compatible(tools)
