"""An exported GGUF as llama.cpp's server serves it: templates, tool-call parsing, stopping, sampling defaults.

The file-level checks (merge/gguf_check.py) prove the GGUF holds the right tokens, templates and weights.
These prove the engine users run can use them: llama-server renders the templates with its own Jinja
engine and builds its tool-call parser from the tool_use template, and either can fail where Python's
Jinja succeeds (a filter it lacks turns every request with ``tools`` into HTTP 400).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import GenerationConfig, PreTrainedTokenizerBase

from hermes_pipeline.chat_format.tokens import IM_END, IM_START
from hermes_pipeline.llama_server import LOG_CHAT_FORMAT, LlamaServer, ServerError, running_server
from hermes_pipeline.merge.probes import CONVERSATIONS, SERVED_CONVERSATIONS, UNITS_TOOL, WEATHER_TOOL

REPLY_TOKENS = 128
VERIFY_SERVER_ARGS = ("--threads", "2", "--parallel", "1", *LOG_CHAT_FORMAT)
# The forced call (see check_tool_calls): the assistant's text up to the value of set_units' enum argument.
FORCED_CALL_PREFIX = '<tool_call>\n{"name": "set_units", "arguments": {"unit": "'
# Room for the value, the call's closing text and the whitespace the grammar allows after it.
FORCED_CALL_TOKENS = 64

# generation_config.json names -> llama.cpp's GGUF sampling keys (general.sampling.*) and /props names.
SAMPLING_KEYS = {
    "temperature": ("temp", "temperature"),
    "top_p": ("top_p", "top_p"),
    "top_k": ("top_k", "top_k"),
    "min_p": ("min_p", "min_p"),
    "repetition_penalty": ("penalty_repeat", "repeat_penalty"),
}
# transformers applies the repetition penalty to the whole context; llama.cpp to the last 64 tokens
# unless told otherwise (-1: the whole context).
WHOLE_CONTEXT = -1


@dataclass
class ServerReport:
    tool_call_format: str = ""  # the chat format llama.cpp chose for requests with tools
    supports_tools: bool = False
    supports_tool_calls: bool = False
    supports_parallel_tool_calls: bool = False
    templates_rendered: int = 0
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    reply: str = ""
    sampling: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sampling_defaults(model_dir: Path) -> dict[str, float | int]:
    """What transformers samples the packaged model with, under llama.cpp's GGUF key names
    (general.sampling.<name>): generation_config.json's values, transformers' own defaults for what it
    leaves out (top-k 50, no min-p), and the repetition penalty over the whole context as transformers
    applies it. Empty for a model that does not sample by default."""
    generation = GenerationConfig.from_pretrained(model_dir)
    if not generation.do_sample:
        return {}
    defaults = GenerationConfig._get_default_generation_params()
    values: dict[str, float | int] = {"min_p": 0.0}
    for hf_name, (gguf_name, _) in SAMPLING_KEYS.items():
        value = getattr(generation, hf_name, None)
        value = defaults.get(hf_name) if value is None else value
        if value is not None:
            values[gguf_name] = value
    if values["penalty_repeat"] != 1.0:
        values["penalty_last_n"] = WHOLE_CONTEXT
    return values


def check_served(gguf: Path, model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> ServerReport:
    """Start llama-server on ``gguf`` (loopback, a free port), run every check, stop it by its PID."""
    report = ServerReport()
    try:
        with running_server(gguf, extra=VERIFY_SERVER_ARGS) as server:
            check_props(server, tokenizer, sampling_defaults(model_dir), report)
            _check_templates(server, tokenizer, report)
            check_tool_calls(server, report)
            _check_chat(server, report)
    except ServerError as exc:
        report.problems.append(f"llama-server: {exc}")
    return report


def check_props(
    server: LlamaServer,
    tokenizer: PreTrainedTokenizerBase | None,
    sampling: dict[str, float | int],
    report: ServerReport,
) -> None:
    """Tool support as llama.cpp's template analysis sees it; with a tokenizer, both templates loaded as
    packaged; the default sampling equal to ``sampling`` (llama.cpp's GGUF names)."""
    props = server.get("/props")
    caps = props.get("chat_template_caps", {})
    report.supports_tools = bool(caps.get("supports_tools"))
    report.supports_tool_calls = bool(caps.get("supports_tool_calls"))
    report.supports_parallel_tool_calls = bool(caps.get("supports_parallel_tool_calls"))
    if not (report.supports_tools and report.supports_tool_calls):
        report.problems.append(
            "llama-server does not support tools with this tool_use template "
            f"(supports_tools={report.supports_tools}, supports_tool_calls={report.supports_tool_calls})"
        )
    if tokenizer is not None:
        templates = tokenizer.chat_template if isinstance(tokenizer.chat_template, dict) else {}
        for name, key in (("default", "chat_template"), ("tool_use", "chat_template_tool_use")):
            # llama.cpp trims the template's trailing whitespace when it loads it.
            if (props.get(key) or "").rstrip() != (templates.get(name) or "").rstrip():
                report.problems.append(f"llama-server did not load the packaged {name} template")
    served = props.get("default_generation_settings", {}).get("params", {})
    for gguf_name, props_name in SAMPLING_KEYS.values():
        if gguf_name in sampling:
            report.sampling[props_name] = served.get(props_name)
            if not _close(served.get(props_name), sampling[gguf_name]):
                report.problems.append(
                    f"llama-server samples with {props_name}={served.get(props_name)}, "
                    f"the packaged generation_config says {sampling[gguf_name]}"
                )


def _close(actual: Any, expected: float | int) -> bool:
    return isinstance(actual, int | float) and abs(actual - expected) <= 1e-6 * max(1.0, abs(expected))


def _check_templates(server: LlamaServer, tokenizer: PreTrainedTokenizerBase, report: ServerReport) -> None:
    """llama.cpp's rendering of each conversation equals transformers', byte for byte (llama.cpp puts BOS
    in front when it tokenizes, so the template's own BOS is not part of its prompt)."""
    bos = tokenizer.bos_token or ""
    for messages, tools in SERVED_CONVERSATIONS:
        ours = tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True
        )
        body: dict[str, Any] = {"messages": messages} | ({"tools": tools} if tools else {})
        try:
            rendered = server.post("/apply-template", body)["prompt"]
        except ServerError as exc:
            report.problems.append(f"llama-server could not render a conversation: {exc}")
            continue
        if rendered.removeprefix(bos) != ours.removeprefix(bos):
            report.problems.append(
                "llama-server renders a conversation differently from the tokenizer: "
                f"{_first_difference(ours.removeprefix(bos), rendered.removeprefix(bos))}"
            )
            continue
        report.templates_rendered += 1


def _first_difference(expected: str, actual: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b), None)
    at = min(len(expected), len(actual)) if at is None else at
    return f"at character {at}, expected {expected[at : at + 40]!r}, got {actual[at : at + 40]!r}"


def forced_call_request(user: str) -> dict[str, Any]:
    """A /v1/chat/completions body whose answer must be one set_units call: the assistant turn prefilled
    up to the enum argument's value, greedy (the packaged defaults sample, and could spend the tokens on
    the whitespace the grammar allows after the call)."""
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": FORCED_CALL_PREFIX}],
        "tools": [WEATHER_TOOL, UNITS_TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": FORCED_CALL_TOKENS,
        "temperature": 0.0,
    }


def check_tool_calls(server: LlamaServer, report: ServerReport) -> None:
    """A request with tools comes back with parsed ``message.tool_calls``: the parser llama.cpp derived
    from the tool_use template works. The assistant turn is prefilled up to the argument's value, the one
    part the model writes (under the server's grammar, an enum), so a model too small to call tools by
    itself still completes one call, and what is checked is llama.cpp's parser and grammar."""
    body = forced_call_request("Use celsius from now on.")
    try:
        choice = server.post("/v1/chat/completions", body)["choices"][0]
    except ServerError as exc:
        report.problems.append(f"llama-server refused a request with tools: {exc}")
        return
    message = choice["message"]
    for call in message.get("tool_calls") or []:
        function = call.get("function", {})
        try:
            arguments = json.loads(function.get("arguments", ""))
        except json.JSONDecodeError:
            arguments = function.get("arguments")
        report.tool_calls.append({"name": function.get("name"), "arguments": arguments})
    units = UNITS_TOOL["function"]["parameters"]["properties"]["unit"]["enum"]
    parsed = len(report.tool_calls) == 1 and report.tool_calls[0]["name"] == UNITS_TOOL["function"]["name"]
    if not (parsed and report.tool_calls[0]["arguments"] in [{"unit": unit} for unit in units]):
        report.problems.append(
            f"llama-server did not parse the tool call: tool_calls {report.tool_calls}, "
            f"content {message.get('content')!r}, finish_reason {choice.get('finish_reason')!r}"
        )
    if "<tool_call>" in (message.get("content") or ""):
        report.problems.append("llama-server left <tool_call> markup in the message content")
    report.tool_call_format = server.chat_format() or "unknown"


def _check_chat(server: LlamaServer, report: ServerReport) -> None:
    """Plain chat stops at <|im_end|> (finish_reason "stop", not the token limit) with no marker in the text."""
    messages, _ = CONVERSATIONS[0]
    body = {"messages": messages, "max_tokens": REPLY_TOKENS, "temperature": 0.0}
    try:
        choice = server.post("/v1/chat/completions", body)["choices"][0]
    except ServerError as exc:
        report.problems.append(f"llama-server refused a plain chat request: {exc}")
        return
    report.reply = choice["message"].get("content") or ""
    if choice.get("finish_reason") != "stop":
        report.problems.append(
            f"llama-server's reply did not stop at {IM_END} within {REPLY_TOKENS} tokens "
            f"(finish_reason {choice.get('finish_reason')!r})"
        )
    if IM_END in report.reply or IM_START in report.reply:
        report.problems.append(f"llama-server's reply contains a ChatML marker: {report.reply!r}")
