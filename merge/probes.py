"""The fixed prompts every merged, packaged or exported model is checked on.

They cover what breaks silently: plain chat, the tool-use system prompt with its ``<tools>`` block, an
assistant ``<tool_call>`` turn with a tool response, and JSON mode. Each is rendered by the model's own
templates, so the check also exercises the template the model ships with.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}

CONVERSATIONS: list[tuple[list[dict], list[dict] | None]] = [
    ([{"role": "user", "content": "Hello! Who are you?"}], None),
    (
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write one sentence about the sea."},
        ],
        None,
    ),
    ([{"role": "user", "content": "What is the weather in Paris?"}], [WEATHER_TOOL]),
    (
        [
            {"role": "user", "content": "And in Oslo?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
                ],
            },
            {"role": "tool", "name": "get_weather", "content": '{"temperature_c": 3}'},
        ],
        [WEATHER_TOOL],
    ),
    (
        [
            {
                "role": "system",
                "content": 'You are a helpful assistant that answers in JSON. Here\'s the json schema you must adhere to:\n<schema>\n{"type": "object", "properties": {"name": {"type": "string"}}}\n</schema>',
            },
            {"role": "user", "content": "Name a colour."},
        ],
        None,
    ),
]


UNITS_TOOL = {
    "type": "function",
    "function": {
        "name": "set_units",
        "description": "Choose the temperature unit for every later answer.",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["unit"],
        },
    },
}

# Conversations a server must render exactly as transformers does: every construct of the tool_use
# template (several tools and parameter types, a user system turn, tool calls with object and with string
# arguments, consecutive tool responses, a later plain turn) and the default template with a system turn.
SERVED_CONVERSATIONS: list[tuple[list[dict], list[dict] | None]] = [
    CONVERSATIONS[1],
    (
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Weather in Oslo and in Rome, in celsius?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    },
                ],
            },
            {"role": "tool", "name": "get_weather", "content": '{"name": "get_weather", "content": 3}'},
            {"role": "tool", "name": "get_weather", "content": '{"name": "get_weather", "content": 19}'},
            {"role": "assistant", "content": "Oslo 3 °C, Rome 19 °C."},
            {"role": "user", "content": "Thanks!"},
        ],
        [WEATHER_TOOL, UNITS_TOOL],
    ),
]


def probe_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Every probe rendered up to the assistant's turn, as a server would send it."""
    return [
        tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        for messages, tools in CONVERSATIONS
    ]


def probe_ids(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in probe_texts(tokenizer)]


@torch.no_grad()
def probe_logits(model: PreTrainedModel, prompts: list[list[int]]) -> list[torch.Tensor]:
    """fp32 logits at every position of every probe, one prompt at a time (no padding to reason about)."""
    model.eval()
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in prompts]


def max_difference(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> float:
    """Largest absolute logit difference over all probes; NaN anywhere makes it NaN (and fail)."""
    return max(float((a - e).abs().max()) for e, a in zip(expected, actual, strict=True))
