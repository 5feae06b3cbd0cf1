"""Raw rows in their Hub schemas, converted to canonical rows (see rows.py), one small converter per kind.

A raw row is untrusted: every shape problem (a missing key, a wrong type, a None where a list belongs, a
tool call that does not parse) becomes :class:`Reject` with a short, categorical reason. The prep report
counts rows by reason, so a reason never quotes row content, and no other exception ever escapes for bad
data. Every row leaves through ``check_sft_row`` or ``check_dpo_row``, so the turn-order and content rules
live in one place.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonschema.exceptions import SchemaError, ValidationError
from jsonschema.validators import Draft202012Validator, validator_for
from PIL import Image

from hermes_pipeline.chat_format.tokens import FN_CALL, IMAGE_TOKEN
from hermes_pipeline.chat_format.tool_calls import (
    TOOLS_OPEN,
    ToolCall,
    ToolCallError,
    parse_tool_calls,
    parse_tools,
    render_tool_calls,
)
from hermes_pipeline.errors import UserError
from hermes_pipeline.recipe.schema import DPO_SOURCE_KINDS, DataSource, SourceFilters
from hermes_pipeline.rows import (
    FORBIDDEN_IN_CONTENT,
    ROLES,
    Reject,
    check_dpo_row,
    check_messages,
    check_sft_row,
    message,
)

Row = dict[str, Any]

# ShareGPT speakers (the "from" field) and the canonical roles they become.
CHAT_SPEAKERS = {"system": "system", "human": "user", "gpt": "assistant"}
TOOL_SPEAKERS = {**CHAT_SPEAKERS, "tool": "tool"}
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
_RESPONSE_BLOCK = re.compile(f"{RESPONSE_OPEN}(.*?){RESPONSE_CLOSE}", re.DOTALL)


def row_id(data: dict, index: int, source_name: str) -> str:
    """The row's own id when it has a usable one, so rejects and dedup point back into the data set: ``id``,
    or ``prompt_id`` for UltraFeedback, which has no ``id``. Otherwise the row's position in the source,
    which is stable for a given file."""
    for key in ("id", "prompt_id") if isinstance(data, dict) else ():
        value = data.get(key)
        if value is not None and str(value).strip():
            return str(value)
    return f"{source_name}:{index}"


def convert(data: dict, row_id: str, source: DataSource) -> Row:
    """One raw row of ``source`` as one canonical row, checked; raises Reject when the row is unusable."""
    if not isinstance(data, dict):
        raise Reject("row is not an object")
    row = CONVERTERS[source.kind](data, row_id, source)
    (check_dpo_row if source.kind in DPO_SOURCE_KINDS else check_sft_row)(row)
    return row


# --- SFT kinds -----------------------------------------------------------------------------------------


def _from_sharegpt(data: dict, row_id: str, source: DataSource) -> Row:
    """OpenHermes-2.5 and generic ShareGPT: the conversation as it is, with per-turn loss weights kept."""
    return {**_header(row_id, source), "messages": _from_turns(_list(data, "conversations"), CHAT_SPEAKERS)}


def _from_function_calling(data: dict, row_id: str, source: DataSource) -> Row:
    """hermes-function-calling-v1's function-calling configs, verbatim or in the form inference servers send.

    Both forms are built and checked in either mode (building the canonical one is what parses every call
    and tool response), so the two modes accept exactly the same rows and differ only in what they write.
    """
    messages = _from_turns(_list(data, "conversations"), TOOL_SPEAKERS)
    tools = _system_tools(messages)
    canonical = _canonical_tool_chat(messages, tools)
    check_messages(messages)
    check_messages(canonical)
    if source.mode != "canonical":
        # The tools stay inside the data's own system prompt; a "tools" column would make the renderer
        # pick the tool_use template and write a second system block.
        return {**_header(row_id, source), "messages": messages}
    row = {**_header(row_id, source), "messages": canonical}
    if tools:
        row["tools"] = tools
    return row


def _from_json_mode(data: dict, row_id: str, source: DataSource) -> Row:
    """hermes-function-calling-v1's JSON-mode configs: the schema column must be a JSON Schema, and the final
    answer JSON, since teaching JSON mode with an answer that does not parse teaches the wrong thing."""
    schema = _text(data, "schema")
    _check_json_schema(schema)
    messages = _from_turns(_list(data, "conversations"), CHAT_SPEAKERS)
    if messages and messages[-1]["role"] == "assistant" and not _parses_as_json(messages[-1]["content"]):
        raise Reject("answer is not JSON")
    return {**_header(row_id, source), "messages": messages, "schema": schema}


def _from_llava(data: dict, row_id: str, source: DataSource) -> Row:
    """A LLaVA-style row: the image file must exist and decode, and ``<image>`` opens the first user turn.

    Text-only rows, common in LLaVA mixes, have no ``image`` and get no ``images``.
    """
    messages = _from_turns(_list(data, "conversations"), CHAT_SPEAKERS)
    tagged = [index for index, msg in enumerate(messages) if IMAGE_TOKEN in msg["content"]]
    row = {**_header(row_id, source), "messages": messages}
    if data.get("image") is None:
        if tagged:
            raise Reject("<image> tag without an image")
        _check_fn_calls(messages)
        return row
    first_user = next((index for index, msg in enumerate(messages) if msg["role"] == "user"), None)
    if first_user is None:
        raise Reject("no user turn for the image")
    if any(index != first_user for index in tagged) or messages[first_user]["content"].count(IMAGE_TOKEN) > 1:
        raise Reject("misplaced <image> tag")
    text = messages[first_user]["content"].replace(IMAGE_TOKEN, "").strip()
    messages[first_user] = {**messages[first_user], "content": f"{IMAGE_TOKEN}\n{text}"}
    _check_fn_calls(messages)
    row["images"] = [_checked_image(data["image"], source)]
    return row


# --- DPO kinds -----------------------------------------------------------------------------------------


def _from_orca_dpo_pairs(data: dict, row_id: str, source: DataSource) -> Row:
    """Intel/orca_dpo_pairs: one question, one chosen and one rejected answer, all plain strings."""
    return _single_turn_pair(data, "question", row_id, source)


def _from_distilabel_orca_dpo(data: dict, row_id: str, source: DataSource) -> Row:
    """argilla/distilabel-intel-orca-dpo-pairs: orca pairs re-rated, filtered before use as its card advises."""
    _apply_filters(data, source.filters or SourceFilters())
    return _single_turn_pair(data, "input", row_id, source)


def _from_ultrafeedback(data: dict, row_id: str, source: DataSource) -> Row:
    """HuggingFaceH4/ultrafeedback_binarized: two full conversations that share everything but the answer."""
    chosen = _chat_messages(_list(data, "chosen"))
    rejected = _chat_messages(_list(data, "rejected"))
    if not chosen or not rejected:
        raise Reject("chosen or rejected is empty")
    if chosen[:-1] != rejected[:-1]:
        raise Reject("chosen and rejected prompts differ")
    return {
        **_header(row_id, source),
        "prompt": chosen[:-1],
        "chosen": chosen[-1:],
        "rejected": rejected[-1:],
    }


def _from_dpo_messages(data: dict, row_id: str, source: DataSource) -> Row:
    """Generic preference rows. Multi-turn prompts, tool calls, tool turns and tools are all kept: agentic
    preference data loses its point when flattened to a last user turn, as other frameworks do."""
    tools = _tools_column(data.get("tools"))
    row = {
        **_header(row_id, source),
        "prompt": _prompt(data.get("prompt")),
        "chosen": _answer(data.get("chosen"), "chosen"),
        "rejected": _answer(data.get("rejected"), "rejected"),
    }
    messages = [*row["prompt"], *row["chosen"], *row["rejected"]]
    _check_calls([call for msg in messages for call in msg.get("tool_calls", [])], tools)
    if tools:
        row["tools"] = tools
    return row


CONVERTERS: dict[str, Callable[[dict, str, DataSource], Row]] = {
    "openhermes": _from_sharegpt,
    "sharegpt": _from_sharegpt,
    "function_calling": _from_function_calling,
    "json_mode": _from_json_mode,
    "llava": _from_llava,
    "orca_dpo_pairs": _from_orca_dpo_pairs,
    "distilabel_orca_dpo": _from_distilabel_orca_dpo,
    "ultrafeedback_binarized": _from_ultrafeedback,
    "dpo_messages": _from_dpo_messages,
}


# --- Shared pieces -------------------------------------------------------------------------------------


def _header(row_id: str, source: DataSource) -> Row:
    return {"id": row_id, "source": source.name}


def _text(data: dict, key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise Reject(f"{key} is missing or not text")
    return value


def _list(data: dict, key: str) -> list:
    value = data.get(key)
    if not isinstance(value, list):
        raise Reject(f"{key} is missing or not a list")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _unknown_role(value: Any) -> str:
    """Name a short role word so the report tells 'bing' from 'bard'; anything longer could be row text."""
    if isinstance(value, str) and value.isidentifier() and len(value) <= 20:
        return f"unknown role {value!r}"
    return "unknown role"


def _from_turns(turns: list, speakers: dict[str, str]) -> list[Row]:
    """ShareGPT turns (``from``/``value``/``weight``) as canonical messages.

    An empty system turn is dropped: it says nothing, and rows.py would reject the whole conversation for
    it. A ``weight`` survives only on assistant turns, the only ones trained on; 0 means "skip this turn".
    """
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise Reject("turn is not an object")
        speaker, value = turn.get("from"), turn.get("value")
        if not isinstance(speaker, str) or speaker not in speakers:
            raise Reject(_unknown_role(speaker))
        if not isinstance(value, str):
            raise Reject("turn value is not text")
        role = speakers[speaker]
        if role == "system" and not value.strip():
            continue
        msg = message(role, value)
        if role == "assistant" and turn.get("weight") is not None:
            msg["weight"] = _weight(turn["weight"])
        messages.append(msg)
    return messages


def _weight(value: Any) -> float:
    if not _is_number(value) or not 0 <= value <= 1:
        raise Reject("invalid weight")
    return float(value)


def _system_tools(messages: list[Row]) -> list[dict]:
    """The tools of a function-calling system prompt; none when there is no ``<tools>`` block at all
    (glaive's "no access to external functions" rows), but a block that does not parse is a broken row."""
    if not messages or messages[0]["role"] != "system" or TOOLS_OPEN not in messages[0]["content"]:
        return []
    tools = parse_tools(messages[0]["content"])
    if isinstance(tools, ToolCallError):
        raise Reject("unparsable tools")
    if _has_control_token(tools):
        raise Reject("tools contain a chat control token")
    return tools


def _canonical_tool_chat(messages: list[Row], tools: list[dict]) -> list[Row]:
    """The conversation as an inference server holds it: calls structured, one message per tool response.

    With tools the data's system prompt goes, because the tool_use template writes its own system block
    from ``tools``; without tools there is nothing to replace it and it stays.
    """
    canonical = []
    for msg in messages[1:] if tools else messages:
        if msg["role"] == "assistant":
            canonical.append(_canonical_assistant(msg, tools))
        elif msg["role"] == "tool":
            canonical.extend(message("tool", payload) for payload in _tool_responses(msg["content"]))
        else:
            canonical.append(msg)
    return canonical


def _canonical_assistant(msg: Row, tools: list[dict]) -> Row:
    """Calls only: structured ``tool_calls``. Prose and calls: the prose, then the calls re-rendered as JSON
    blocks in the content, because the template drops an assistant's content when ``tool_calls`` is set."""
    reply = parse_tool_calls(msg["content"])
    if reply.errors:
        raise Reject("unparsable tool call")
    if not reply.calls:
        return msg
    calls = [call.as_dict() for call in reply.calls]
    _check_calls(calls, tools)
    if not reply.content:
        return {**msg, "content": "", "tool_calls": calls}
    return {**msg, "content": f"{reply.content}\n{render_tool_calls(reply.calls)}"}


def _tool_responses(text: str) -> list[str]:
    """The payload of each ``<tool_response>`` block in a tool turn, or the whole text when it has none."""
    payloads = [match.group(1).strip() for match in _RESPONSE_BLOCK.finditer(text)]
    rest = _RESPONSE_BLOCK.sub("", text)
    if RESPONSE_OPEN in rest or RESPONSE_CLOSE in rest or (payloads and rest.strip()):
        raise Reject("unparsable tool response")
    return payloads or [text.strip()]


def _check_calls(calls: list[dict], tools: list[dict]) -> None:
    """Structured calls must name a tool the row defines and carry no chat control token.

    A call is only rendered next to the tools it may use; training on calls to undefined functions would
    teach the model to invent them. rows.py checks message content but not ``tool_calls``, so the control
    tokens are checked here.
    """
    if not calls:
        return
    if not tools:
        raise Reject("tool calls without tools")
    defined = {_tool_spec(tool)["name"] for tool in tools}
    if any(call["name"] not in defined for call in calls):
        raise Reject("call to an undefined tool")
    if _has_control_token(calls):
        raise Reject("tool call contains a chat control token")


def _has_control_token(value: Any) -> bool:
    text = json.dumps(value, ensure_ascii=False)
    return any(token in text for token in FORBIDDEN_IN_CONTENT)


def _tool_spec(tool: Any) -> dict | None:
    """The function spec of an OpenAI tool dict (``{"type": "function", "function": {...}}``) or a bare spec."""
    spec = tool.get("function", tool) if isinstance(tool, dict) else None
    return spec if isinstance(spec, dict) and isinstance(spec.get("name"), str) else None


def _tools_column(value: Any) -> list[dict]:
    """A ``tools`` column: absent, a list of tool dicts, or that list as a JSON string (Hub eval sets)."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise Reject("invalid tools") from None
    if not isinstance(value, list) or any(_tool_spec(tool) is None for tool in value):
        raise Reject("invalid tools")
    if _has_control_token(value):
        raise Reject("tools contain a chat control token")
    return value


def _check_json_schema(text: str, reason: str = "invalid JSON schema") -> dict[str, Any]:
    """The text must hold a JSON Schema object, checked against the metaschema it declares."""
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError):
        raise Reject(reason) from None
    if not isinstance(schema, dict) or not isinstance(schema.get("$schema", ""), str):
        raise Reject(reason)
    try:
        validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except (SchemaError, RecursionError):
        raise Reject(reason) from None
    return schema


def _check_fn_calls(messages: list[dict[str, Any]]) -> None:
    """Hermes 2 Vision's function calling: a user turn opening with ``<fn_call>`` (after its image) and a
    JSON schema is answered by a JSON object following that schema. The card's own second example has
    trailing commas in its schema, which no JSON parser reads: such rows are rejected, not guessed at."""
    for index, turn in enumerate(messages):
        text = turn["content"].removeprefix(f"{IMAGE_TOKEN}\n")
        if turn["role"] != "user" or not text.startswith(FN_CALL):
            continue
        schema = _check_json_schema(text.removeprefix(FN_CALL), "<fn_call> schema is not a valid JSON schema")
        answer = messages[index + 1] if index + 1 < len(messages) else None
        if answer is None or answer["role"] != "assistant":
            raise Reject("<fn_call> turn without an answer")
        try:
            validator_for(schema, default=Draft202012Validator)(schema).validate(
                json.loads(answer["content"])
            )
        except (ValueError, RecursionError):
            raise Reject("<fn_call> answer is not JSON") from None
        except ValidationError:
            raise Reject("<fn_call> answer does not follow its schema") from None


def _parses_as_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def _checked_image(image: Any, source: DataSource) -> str:
    """The image's absolute path, inside ``image_root``: relative paths are relative to it, and an absolute
    path, a ``..`` or a symlink that leads out of it is rejected before the file is looked at, with one
    reason whether or not the file exists, so data cannot make prep read (or probe) files elsewhere.

    The file must exist and pass Pillow's verify (a cheap integrity check that does not decode pixels), so
    a broken file is rejected here rather than crashing a training step hours later.
    """
    if not isinstance(image, str) or not image.strip() or "\0" in image:
        raise Reject("invalid image path")
    if source.image_root is None:
        raise UserError(
            f"data source {source.name!r} has image paths: set its image_root, the folder they are in"
        )
    root = Path(source.image_root).resolve()
    if root not in Path(os.path.normpath(root / image)).parents:
        raise Reject("image path outside image_root")
    try:
        path = (root / image).resolve()  # symlinks followed: one inside the root may point out of it
        found = path.is_file()
    except OSError:  # a name too long for the filesystem, a symlink loop
        raise Reject("missing image") from None
    if root not in path.parents:
        raise Reject("image path outside image_root")
    if not found:
        raise Reject("missing image")
    try:
        with Image.open(path) as opened:
            opened.verify()
    except Exception:  # Pillow reports a bad file through many exception types
        raise Reject("corrupt image") from None
    return str(path)


def _single_turn_pair(data: dict, question_key: str, row_id: str, source: DataSource) -> Row:
    """A preference pair from plain strings; an empty system prompt means no system turn."""
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise Reject("system is not text")
    prompt = [message("system", system)] if system and system.strip() else []
    prompt.append(message("user", _text(data, question_key)))
    return {
        **_header(row_id, source),
        "prompt": prompt,
        "chosen": [message("assistant", _text(data, "chosen"))],
        "rejected": [message("assistant", _text(data, "rejected"))],
    }


def _apply_filters(data: dict, filters: SourceFilters) -> None:
    """Drop ties, low-rated chosen answers (an unknown score too) and GSM8K train questions, in that order."""
    status = data.get("status")
    if isinstance(status, str) and status in filters.exclude_status:
        raise Reject(f"filtered: status {status}")
    minimum = filters.min_chosen_score
    if minimum is not None:
        score = data.get("chosen_score")
        if not _is_number(score) or not score >= minimum:
            raise Reject(f"filtered: chosen_score < {minimum:g}")
    in_gsm8k = data.get("in_gsm8k_train")
    if in_gsm8k is not None and not isinstance(in_gsm8k, bool):
        raise Reject("in_gsm8k_train is not a boolean")
    if filters.exclude_in_gsm8k_train and in_gsm8k:
        raise Reject("filtered: in gsm8k train")


def _chat_messages(items: list) -> list[Row]:
    return [_chat_message(item) for item in items]


def _chat_message(item: Any) -> Row:
    """An OpenAI-style message as a canonical one; ``content`` may be null beside tool calls, as OpenAI sends."""
    if not isinstance(item, dict):
        raise Reject("message is not an object")
    role = item.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise Reject(_unknown_role(role))
    calls = _structured_calls(item.get("tool_calls"))
    if calls and role != "assistant":
        raise Reject("tool calls outside an assistant turn")
    content = "" if item.get("content") is None and calls else item.get("content")
    if not isinstance(content, str):
        raise Reject("message content is not text")
    msg = message(role, content)
    if calls:
        msg["tool_calls"] = calls
    return msg


def _structured_calls(value: Any) -> list[dict]:
    """``tool_calls`` as ``[{"name", "arguments": {...}}]``, from that form or OpenAI's (arguments as JSON)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise Reject("unparsable tool call")
    return [_structured_call(entry) for entry in value]


def _structured_call(entry: Any) -> dict:
    spec = entry.get("function", entry) if isinstance(entry, dict) else None
    if not isinstance(spec, dict):
        raise Reject("unparsable tool call")
    name, arguments = spec.get("name"), spec.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            raise Reject("unparsable tool call") from None
    if not isinstance(name, str) or not name or not isinstance(arguments, dict) or not _json_safe(arguments):
        raise Reject("unparsable tool call")
    return ToolCall(name, arguments).as_dict()


def _json_safe(value: Any) -> bool:
    """Whether arguments can be written back as JSON (NaN and infinities parse but cannot be rendered)."""
    try:
        json.dumps(value, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return False
    return True


def _prompt(value: Any) -> list[Row]:
    if isinstance(value, str):
        return [message("user", value)]
    if not isinstance(value, list):
        raise Reject("prompt is missing or malformed")
    return _chat_messages(value)


def _answer(value: Any, side: str) -> list[Row]:
    """One side of a pair: a string, one assistant message, or several of them."""
    if isinstance(value, str):
        return [message("assistant", value)]
    if isinstance(value, dict):
        return [_chat_message(value)]
    if not isinstance(value, list):
        raise Reject(f"{side} is missing or malformed")
    return _chat_messages(value)
