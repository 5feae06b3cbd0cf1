"""Canonical rows: the one shape every source is converted to, and the checks every row must pass.

SFT:  {id, source, messages: [{role, content, tool_calls?, weight?}], tools?, schema?, images?}
DPO:  {id, source, prompt: [messages], chosen: [assistant messages], rejected: [assistant messages], tools?}

Rows are plain JSON-able dicts so they cross process boundaries and land in Parquet without conversion.
A row that cannot be used raises Reject with a short reason; the pipeline counts it and writes it to
rejects.jsonl, and nothing else stops the run.
"""

from __future__ import annotations

from typing import Any

from hermes_pipeline.chat_format.tokens import CONTROL_TOKENS

ROLES = ("system", "user", "assistant", "tool")
# A label that is not trained: prep writes it, the collators pad with it, the loss skips it.
IGNORE_INDEX = -100
# Text that would be read as turn structure if it appeared inside a message.
FORBIDDEN_IN_CONTENT = CONTROL_TOKENS


class Reject(Exception):
    """A row we cannot use; the message is the reason written to rejects.jsonl (short, no row content)."""


def message(role: str, content: str, **extra: Any) -> dict[str, Any]:
    return {"role": role, "content": content, **extra}


def check_messages(messages: list[dict[str, Any]], *, ends_with_assistant: bool = True) -> None:
    """Roles known, content present, and a turn order the templates render and training can use.

    Order: an optional system turn, then user turns and assistant turns alternating, where an assistant
    turn that calls tools may be followed by one or more tool turns and then another assistant turn.
    """
    if not messages:
        raise Reject("no messages")
    previous = None
    for position, msg in enumerate(messages):
        role = msg.get("role")
        if role not in ROLES:
            raise Reject(f"unknown role {role!r}")
        _check_content(msg)
        if role == "system" and position != 0:
            raise Reject("system turn after the first turn")
        if not _may_follow(previous, role, messages[position - 1] if position else None):
            raise Reject(f"broken turn order: {role} after {previous or 'start'}")
        previous = role
    if ends_with_assistant and previous != "assistant":
        raise Reject(f"last turn is {previous}, not assistant")


def check_sft_row(row: dict[str, Any]) -> None:
    check_messages(row["messages"])


def check_dpo_row(row: dict[str, Any]) -> None:
    check_messages(row["prompt"], ends_with_assistant=False)
    if row["prompt"][-1]["role"] not in ("user", "tool"):
        raise Reject("prompt does not end with a user or tool turn")
    for side in ("chosen", "rejected"):
        answer = row[side]
        if not answer or any(m.get("role") != "assistant" for m in answer):
            raise Reject(f"{side} is not a list of assistant turns")
        for msg in answer:
            _check_content(msg)
    if row["chosen"] == row["rejected"]:
        raise Reject("chosen and rejected are identical")


def _may_follow(previous: str | None, role: str, previous_msg: dict[str, Any] | None) -> bool:
    if previous is None:
        return role in ("system", "user")
    if role == "user":
        return previous in ("system", "assistant", "tool")
    if role == "assistant":
        return previous in ("user", "tool")
    if role == "tool":
        return previous == "tool" or (previous == "assistant" and _calls_tools(previous_msg))
    return False


def _calls_tools(msg: dict[str, Any] | None) -> bool:
    return bool(msg and (msg.get("tool_calls") or "<tool_call>" in msg.get("content", "")))


def _check_content(msg: dict[str, Any]) -> None:
    content = msg.get("content")
    if not isinstance(content, str):
        raise Reject(f"{msg.get('role')} content is not text")
    if not content.strip() and not msg.get("tool_calls"):
        raise Reject(f"empty {msg.get('role')} content")
    if any(token in content for token in FORBIDDEN_IN_CONTENT):
        raise Reject(f"{msg.get('role')} content contains a chat control token")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:
        raise Reject("invalid UTF-8") from None
