"""The tool-call codec against both Hermes dialects, the tool_use template, and hostile input."""

import json
import random

import pytest

from hermes_pipeline.chat_format.templates import render
from hermes_pipeline.chat_format.tool_calls import (
    ParsedReply,
    ToolCall,
    ToolCallError,
    parse_tool_calls,
    parse_tools,
    render_tool_calls,
)

WEATHER = ToolCall("get_weather", {"city": "Paris", "unit": "celsius"})
NESTED = ToolCall(
    "book_trip",
    {
        "travellers": [{"name": "Ada", "prefs": {"seats": [1, 2], "vip": True}}],
        "budget": 1200.5,
        "note": None,
    },
)
UNICODE = ToolCall("traduire", {"texte": "Grüße aus 東京 🌸", "quoted": 'say "hi"\nthen <b>'})

STOCK_TOOL = {
    "type": "function",
    "function": {
        "name": "get_stock_price",
        "description": "Get the current stock price",
        "parameters": {
            "type": "object",
            "properties": {
                "symbol": {"type": "string", "description": "The stock symbol, e.g. AAPL"},
                "live": {"type": "boolean", "default": True},
            },
            "required": ["symbol"],
        },
    },
}
NEWS_TOOL = {
    "type": "function",
    "function": {
        "name": "get_news",
        "description": "Latest headlines",
        "parameters": {"type": "object", "properties": {"topic": {"type": "string"}}, "required": []},
    },
}
# The hermes-function-calling-v1 system prompt: tools as a Python repr list, the call format arguments first.
DATASET_SYSTEM_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions "
    "about what values to plug into functions. Here are the available tools: "
    f"<tools> {[STOCK_TOOL, NEWS_TOOL]!r} "
    "</tools> Use the following pydantic model json schema for each tool call you will make: "
    "{'title': 'FunctionCall', 'type': 'object', 'properties': {'arguments': {'title': 'Arguments', 'type': "
    "'object'}, 'name': {'title': 'Name', 'type': 'string'}}, 'required': ['arguments', 'name']} For each "
    "function call return a json object with function name and arguments within <tool_call></tool_call> XML "
    "tags as follows:\n<tool_call>\n{'arguments': <args-dict>, 'name': <function-name>}\n</tool_call>"
)


def block(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call>"


def only_call(text: str, **options: bool) -> ToolCall:
    reply = parse_tool_calls(text, **options)
    assert reply.errors == []
    assert len(reply.calls) == 1
    return reply.calls[0]


def test_json_form() -> None:
    text = block('{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}')
    assert parse_tool_calls(text) == ParsedReply(content="", calls=[WEATHER], errors=[])


def test_python_dict_form_arguments_first_becomes_canonical_json() -> None:
    call = only_call(block("{'arguments': {'live': True, 'delayed': False, 'day': None}, 'name': 'quote'}"))
    assert call == ToolCall("quote", {"live": True, "delayed": False, "day": None})
    assert call.to_json() == '{"name": "quote", "arguments": {"live": true, "delayed": false, "day": null}}'


def test_several_calls_in_one_reply_keep_their_order() -> None:
    text = "\n".join(block(call.to_json()) for call in (WEATHER, NESTED, UNICODE))
    assert parse_tool_calls(text).calls == [WEATHER, NESTED, UNICODE]


def test_nested_arguments() -> None:
    traveller = only_call(block(NESTED.to_json())).arguments["travellers"][0]
    assert traveller["prefs"] == {"seats": [1, 2], "vip": True}


def test_unicode_is_kept_raw() -> None:
    assert only_call(block(UNICODE.to_json())) == UNICODE
    assert "東京 🌸" in UNICODE.to_json()


def test_text_around_the_blocks_is_the_content() -> None:
    text = f"  Checking both.\n{render_tool_calls([WEATHER])}\nOne moment.\n{render_tool_calls([NESTED])}  "
    reply = parse_tool_calls(text)
    assert reply.content == "Checking both.\n\nOne moment."
    assert reply.calls == [WEATHER, NESTED]


def test_arguments_as_a_json_string_openai_style() -> None:
    call = only_call(block('{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}'))
    assert call.arguments == {"city": "Paris"}


def test_canonical_json_is_name_first_with_default_separators() -> None:
    assert WEATHER.to_json() == '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
    assert WEATHER.as_dict() == {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}


def test_as_dict_is_a_copy() -> None:
    row = NESTED.as_dict()
    row["arguments"]["travellers"].clear()
    assert NESTED.arguments["travellers"]


@pytest.mark.parametrize("calls", [[WEATHER], [WEATHER, NESTED, UNICODE]])
def test_round_trip(calls: list[ToolCall]) -> None:
    assert parse_tool_calls(render_tool_calls(calls)) == ParsedReply(content="", calls=calls, errors=[])


def test_python_dict_round_trips_to_the_canonical_block() -> None:
    python_form = block("{'arguments': {'city': 'Paris', 'unit': 'celsius'}, 'name': 'get_weather'}")
    assert render_tool_calls(parse_tool_calls(python_form).calls) == render_tool_calls([WEATHER])


@pytest.mark.parametrize("calls", [[WEATHER], [WEATHER, NESTED, UNICODE]], ids=["one", "several"])
def test_content_renders_like_structured_tool_calls(calls: list[ToolCall]) -> None:
    """A row storing calls as text trains on the same tokens a server builds from structured tool_calls."""
    user = {"role": "user", "content": "Plan my trip."}
    response = {"role": "tool", "content": '{"name": "get_weather", "content": "sunny"}'}
    structured = {"role": "assistant", "tool_calls": [call.as_dict() for call in calls]}
    as_text = {"role": "assistant", "content": render_tool_calls(calls)}
    tools = [STOCK_TOOL]
    assert render([user, structured, response], tools=tools) == render([user, as_text, response], tools=tools)


def test_allow_python_false_accepts_json_only() -> None:
    python_form = block("{'arguments': {'city': 'Paris'}, 'name': 'get_weather'}")
    reply = parse_tool_calls(python_form, allow_python=False)
    assert reply.calls == []
    assert "not valid JSON" in reply.errors[0].reason
    assert only_call(render_tool_calls([WEATHER]), allow_python=False) == WEATHER


MALFORMED = [
    ("<tool_call></tool_call>", "empty block"),
    ("<tool_call>\n  \n</tool_call>", "empty block"),
    (block('{"name": "f", "arguments": {}'), "not valid JSON"),
    (block("{'name': 'f', 'arguments': {}"), "not valid JSON nor a Python literal"),
    (block("[1, 2]"), "must be an object, got list"),
    (block('"get_weather"'), "must be an object, got str"),
    (block('{"arguments": {}}'), "missing 'name'"),
    (block('{"name": 3, "arguments": {}}'), "'name' must be a non-empty string"),
    (block('{"name": "", "arguments": {}}'), "'name' must be a non-empty string"),
    (block('{"name": "f"}'), "missing 'arguments'"),
    (block('{"name": "f", "arguments": [1]}'), "'arguments' must be an object"),
    (block('{"name": "f", "arguments": "[1]"}'), "'arguments' must be an object"),
    (block('{"name": "f", "arguments": "{oops"}'), "'arguments' string is not valid JSON"),
    (block('{"name": "f", "arguments": {}, "id": "call_1"}'), "unknown keys: 'id'"),
    (block("{'name': 'f', 'arguments': {'tags': {1, 2}}}"), "JSON cannot represent"),
    (block('{"name": "f", "arguments": {"x": NaN}}'), "JSON cannot represent"),
    (block("__import__('os').getcwd()"), "not valid JSON nor a Python literal"),
    (block('{"name": "f", "arguments": {"n": ' + "7" * 5000 + "}}"), "not valid JSON"),
    (block("[" * 100_000), "too deeply nested"),
    (block("[" * 100_000 + "]" * 100_000), "too deeply nested"),
    ('<tool_call>\n{"name": "f", "arguments": {}}', "unclosed <tool_call>"),
    ('{"name": "f", "arguments": {}}\n</tool_call>', "stray </tool_call>"),
]


@pytest.mark.parametrize(("text", "reason"), MALFORMED, ids=[reason for _, reason in MALFORMED])
def test_malformed_blocks_become_errors(text: str, reason: str) -> None:
    reply = parse_tool_calls(text)
    assert reply.calls == []
    assert len(reply.errors) == 1
    assert reason in reply.errors[0].reason
    assert "\n" not in reply.errors[0].reason


def test_errors_carry_the_raw_block_and_its_offset() -> None:
    bad = block("{'name': 'f'}")
    text = f"Sure.\n{render_tool_calls([WEATHER])}\n{bad}\ndone </tool_call>"
    reply = parse_tool_calls(text)
    assert reply.calls == [WEATHER]
    assert reply.content == "Sure.\n\n\ndone"
    assert reply.errors == [
        ToolCallError(block=bad, reason="missing 'arguments'", offset=text.index(bad)),
        ToolCallError(block="</tool_call>", reason="stray </tool_call>", offset=text.rindex("</tool_call>")),
    ]


def test_nothing_is_evaluated(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    parse_tool_calls(block("open('created', 'w')"))
    parse_tools("<tools> [open('created', 'w')] </tools>")
    assert list(tmp_path.iterdir()) == []


def _mutate(text: str, rng: random.Random) -> str:
    noise = ["'", '"', "{", "}", "[", "]", ":", ",", "\\", "<tool_call>", "</tool_call>", "True", "\x00", "é"]
    for _ in range(rng.randint(1, 4)):
        position = rng.randrange(len(text) + 1)
        match rng.randrange(4):
            case 0:
                text = text[:position]
            case 1:
                text = text[:position] + text[position + rng.randint(1, 5) :]
            case 2:
                text = text[:position] + rng.choice(noise) + text[position:]
            case _:
                text = text[:position] + rng.choice(["[", "{", "("]) * rng.randint(1, 3000) + text[position:]
    return text


def test_fuzzed_replies_never_raise() -> None:
    rng = random.Random(20240315)
    python_form = block("{'arguments': {'live': True, 'market': None, 'ids': [1, (2, 3)]}, 'name': 'quote'}")
    seeds = [
        render_tool_calls([WEATHER, NESTED, UNICODE]),
        f"Checking.\n{python_form}\nDone.",
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": [1, 2]}"}</tool_call>',
    ]
    for _ in range(500):
        text = _mutate(rng.choice(seeds), rng)
        reply = parse_tool_calls(text)
        assert all(0 <= error.offset <= len(text) and error.reason for error in reply.errors)
        for call in reply.calls:
            assert parse_tool_calls(render_tool_calls([call])).calls == [call]


def test_fuzzed_tool_blocks_never_raise() -> None:
    rng = random.Random(7)
    seeds = [
        DATASET_SYSTEM_PROMPT,
        f"<tools> {STOCK_TOOL!r} {NEWS_TOOL!r} </tools>",
        f"<tools>{json.dumps(STOCK_TOOL)}{TRICKY_TOOL!r}\n{NEWS_TOOL!r}</tools>",
        render([], tools=[STOCK_TOOL, NEWS_TOOL]),
    ]
    for _ in range(400):
        tools = parse_tools(_mutate(rng.choice(seeds), rng))
        assert isinstance(tools, ToolCallError) or all(isinstance(tool, dict) for tool in tools)


def test_parse_tools_python_repr_list_from_the_data_set() -> None:
    assert parse_tools(DATASET_SYSTEM_PROMPT) == [STOCK_TOOL, NEWS_TOOL]


def test_parse_tools_json_list() -> None:
    assert parse_tools(f"<tools> {json.dumps([STOCK_TOOL, NEWS_TOOL])} </tools>") == [STOCK_TOOL, NEWS_TOOL]


def test_parse_tools_one_object_per_line() -> None:
    assert parse_tools(f"<tools>\n{json.dumps(STOCK_TOOL)}\n{json.dumps(NEWS_TOOL)}\n</tools>") == [
        STOCK_TOOL,
        NEWS_TOOL,
    ]
    assert parse_tools(f"<tools>\n{STOCK_TOOL!r}\n{NEWS_TOOL!r}\n</tools>") == [STOCK_TOOL, NEWS_TOOL]


# Brackets, quotes, a backslash and a hash inside strings must not end or hide a value.
TRICKY_TOOL = {
    "type": "function",
    "function": {
        "name": "regex_search",
        "description": "Find {x} or [y] (z) in 'a \"quoted\" text' # not a comment \\ done",
        "parameters": {"type": "object", "properties": {"pattern": {"type": "string", "default": "]})"}}},
    },
}
STOCK_JSON, NEWS_JSON = json.dumps(STOCK_TOOL), json.dumps(NEWS_TOOL)
# (case, block body, the tools it holds)
SIDE_BY_SIDE = [
    ("Python dicts, a space between", f"{STOCK_TOOL!r} {NEWS_TOOL!r}", [STOCK_TOOL, NEWS_TOOL]),
    ("Python dicts, nothing between", f"{STOCK_TOOL!r}{NEWS_TOOL!r}", [STOCK_TOOL, NEWS_TOOL]),
    ("Python dicts, a newline between", f"{STOCK_TOOL!r}\n{NEWS_TOOL!r}", [STOCK_TOOL, NEWS_TOOL]),
    ("Python dicts, CRLF and a tab", f"{STOCK_TOOL!r}\r\n\t{NEWS_TOOL!r}", [STOCK_TOOL, NEWS_TOOL]),
    ("Python list", f"[{STOCK_TOOL!r}, {NEWS_TOOL!r}]", [STOCK_TOOL, NEWS_TOOL]),
    ("JSON objects, nothing between", STOCK_JSON + NEWS_JSON, [STOCK_TOOL, NEWS_TOOL]),
    ("JSON then Python", f"{STOCK_JSON} {NEWS_TOOL!r}", [STOCK_TOOL, NEWS_TOOL]),
    ("Python then JSON", f"{STOCK_TOOL!r}{NEWS_JSON}", [STOCK_TOOL, NEWS_TOOL]),
    ("a Python list, then a dict", f"[{STOCK_TOOL!r}]\n{NEWS_TOOL!r}", [STOCK_TOOL, NEWS_TOOL]),
    ("brackets and quotes in strings", f"{TRICKY_TOOL!r} {STOCK_TOOL!r}", [TRICKY_TOOL, STOCK_TOOL]),
    ("three dicts", f"{NEWS_TOOL!r} {TRICKY_TOOL!r}{STOCK_TOOL!r}", [NEWS_TOOL, TRICKY_TOOL, STOCK_TOOL]),
]


@pytest.mark.parametrize(
    ("body", "tools"), [case[1:] for case in SIDE_BY_SIDE], ids=[c[0] for c in SIDE_BY_SIDE]
)
def test_parse_tools_reads_values_side_by_side(body: str, tools: list[dict]) -> None:
    assert parse_tools(f"Here are the available tools: <tools> {body} </tools> Use them.") == tools


def test_parse_tools_reads_the_template_rendering() -> None:
    """The template leaves each tool's outer object unclosed and rewrites its description; names and
    parameters still come back."""
    system_turn = render([], tools=[STOCK_TOOL, NEWS_TOOL])
    tools = parse_tools(system_turn)
    assert [tool["function"]["name"] for tool in tools] == ["get_stock_price", "get_news"]
    assert [tool["function"]["parameters"] for tool in tools] == [
        STOCK_TOOL["function"]["parameters"],
        NEWS_TOOL["function"]["parameters"],
    ]
    assert parse_tools(render([], tools=[])) == []


BROKEN_TOOLS = [
    ("You are a helpful assistant.", "no <tools> block"),
    ("Here are the tools: <tools> [{'name': 'f'}]", "unclosed <tools>"),
    ("<tools> [{'name': 'f'} </tools>", "not valid JSON nor Python literals"),
    ("<tools> [{'name': 'f'}]; import os </tools>", "not valid JSON nor Python literals"),
    ("<tools> {'name': 'f'}, {'name': 'g'} </tools>", "not valid JSON nor Python literals"),
    ("<tools> {'name': 'f'} {'name': 'g' </tools>", "not valid JSON nor Python literals"),
    ("<tools> {'name': 'f'} {'name': 'g} </tools>", "not valid JSON nor Python literals"),
    ("<tools> {'name': 'f'} {'name': 'g', 'x': f(1)} </tools>", "not valid JSON nor Python literals"),
    ("<tools> [1, 2] </tools>", "tool 1 is not an object with a name"),
    ("<tools> [{'type': 'function', 'function': {'name': 'f'}}, {'description': 'x'}] </tools>", "tool 2"),
    ("<tools> " + "[" * 100_000 + " </tools>", "too deeply nested"),
]


@pytest.mark.parametrize(("text", "reason"), BROKEN_TOOLS, ids=[reason for _, reason in BROKEN_TOOLS])
def test_parse_tools_reports_broken_input(text: str, reason: str) -> None:
    error = parse_tools(text)
    assert isinstance(error, ToolCallError)
    assert reason in error.reason
