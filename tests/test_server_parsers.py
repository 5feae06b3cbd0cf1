"""Our tool calls, as the model emits them, satisfy the Hermes parsers of vLLM and SGLang.

Neither engine installs here (both need a GPU build), so these tests apply the exact rules their Hermes
parsers apply, read from their source:

- vLLM, ``vllm/entrypoints/openai/tool_parsers/hermes_tool_parser.py`` (``Hermes2ProToolParser``, served
  with ``--enable-auto-tool-choice --tool-call-parser hermes``): the detokenized text (vLLM detokenizes with
  ``skip_special_tokens=True`` by default) must contain ``<tool_call>``; every match of
  ``<tool_call>(.*?)</tool_call>|<tool_call>(.*)`` (DOTALL) is ``json.loads``-ed whole, surrounding
  newlines included, and must hold ``name`` and ``arguments``; the content is the text before the first
  ``<tool_call>``. Its streaming path finds the tags by their token ids from ``tokenizer.encode``.
- SGLang, ``python/sglang/srt/function_call/hermes_detector.py`` (``HermesDetector``): after each
  ``<tool_call>`` it skips spaces, tabs and newlines and decodes one JSON value with ``raw_decode``; the
  normal text is the stripped text before the first tag.

llama.cpp's own parser is checked for real, in llama-server, by the GGUF export (tests/test_gguf.py).
"""

from __future__ import annotations

import json
import re

import pytest

from hermes_pipeline.chat_format.tokens import IM_END, IM_START, TOOL_TAGS
from hermes_pipeline.tiny import load_tiny_tokenizer

CALLS = [
    {"name": "get_weather", "arguments": {"city": "São Paulo", "units": "celsius"}},
    {"name": "search", "arguments": {"query": 'say "hi" twice', "filters": {"year": [2023, 2024]}}},
    {"name": "ping", "arguments": {}},
]
VLLM_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tiny_tokenizer()


def _served_text(tokenizer, calls: list[dict]) -> str:
    """What an engine decodes from the model's reply: the assistant turn our template renders, tokenized,
    then detokenized the way vLLM does (skip_special_tokens=True)."""
    messages = [
        {"role": "user", "content": "Go."},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": call} for call in calls]},
    ]
    rendered = tokenizer.apply_chat_template(messages, tools=[], tokenize=False)
    reply = rendered[rendered.rindex(f"{IM_START}assistant") :]
    reply = reply.removeprefix(f"{IM_START}assistant")
    assert reply.rstrip("\n").endswith(IM_END)
    ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_tool_tags_are_single_plain_tokens_and_chatml_markers_are_special(tokenizer) -> None:
    for tag in TOOL_TAGS:
        ids = tokenizer.encode(tag, add_special_tokens=False)
        assert len(ids) == 1, tag
        assert tokenizer.decode(ids, skip_special_tokens=True) == tag  # kept when vLLM skips special tokens
    for marker in (IM_START, IM_END):
        assert (
            tokenizer.decode(tokenizer.encode(marker, add_special_tokens=False), skip_special_tokens=True)
            == ""
        )


@pytest.mark.parametrize("count", [1, 2, 3])
def test_vllm_hermes_parser_rules_extract_our_calls(tokenizer, count: int) -> None:
    text = _served_text(tokenizer, CALLS[:count])
    assert "<tool_call>" in text
    matches = VLLM_TOOL_CALL.findall(text)
    parsed = [json.loads(closed or open_) for closed, open_ in matches]
    assert parsed == CALLS[:count]
    assert text[: text.find("<tool_call>")].strip() == ""


@pytest.mark.parametrize("count", [1, 2, 3])
def test_sglang_hermes_detector_rules_extract_our_calls(tokenizer, count: int) -> None:
    text = _served_text(tokenizer, CALLS[:count])
    decoder, parsed, position = json.JSONDecoder(), [], 0
    while (start := text.find("<tool_call>", position)) != -1:
        cursor = start + len("<tool_call>")
        while cursor < len(text) and text[cursor] in " \t\r\n":
            cursor += 1
        value, position = decoder.raw_decode(text, cursor)
        parsed.append(value)
    assert parsed == CALLS[:count]
    assert text[: text.find("<tool_call>")].strip() == ""


def test_each_call_is_one_json_object_with_name_first(tokenizer) -> None:
    """Servers stream the name as soon as it is complete (vLLM sends it before any arguments), so the name
    comes first, and each block holds exactly one object with exactly these two keys."""
    text = _served_text(tokenizer, CALLS)
    for closed, _ in VLLM_TOOL_CALL.findall(text):
        assert closed.startswith('\n{"name": ')
        assert list(json.loads(closed)) == ["name", "arguments"]
