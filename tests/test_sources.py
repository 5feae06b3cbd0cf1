"""Source converters: every Hub schema to canonical rows, every reject reason, and hostile input.

The fixtures under fixtures/sources/ are rows written by us in the exact Hub schemas (all columns, null
metadata included); the PNG files beside them are 8x8 images, one of them cut short on purpose.
"""

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from hermes_pipeline.chat_format.templates import render
from hermes_pipeline.chat_format.tool_calls import ToolCall, parse_tool_calls
from hermes_pipeline.data_prep.sources import CONVERTERS, convert, row_id
from hermes_pipeline.errors import UserError
from hermes_pipeline.readers import iter_records
from hermes_pipeline.recipe.schema import DPO_SOURCE_KINDS, SFT_SOURCE_KINDS, DataSource, SourceFilters
from hermes_pipeline.rows import Reject, check_dpo_row, check_sft_row

FIXTURES = Path(__file__).parent / "fixtures" / "sources"
IMAGES = FIXTURES / "images"
FILES = {
    "openhermes": "openhermes.json",
    "sharegpt": "openhermes.json",
    "function_calling": "function_calling.jsonl",
    "json_mode": "json_mode.jsonl",
    "llava": "llava.json",
    "orca_dpo_pairs": "orca_dpo_pairs.jsonl",
    "distilabel_orca_dpo": "distilabel.jsonl",
    "ultrafeedback_binarized": "ultrafeedback.jsonl",
    "dpo_messages": "dpo_messages.jsonl",
}


def load(kind: str) -> list[dict]:
    path = FIXTURES / FILES[kind]
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()]


def fixture(kind: str, own_id: str) -> dict:
    return next(data for data in load(kind) if data.get("id") == own_id)


def source(kind: str, **options: Any) -> DataSource:
    if kind == "llava":
        options.setdefault("image_root", str(IMAGES))
    return DataSource(name=kind, kind=kind, path="org/data", **options)


def run(kind: str, data: dict, index: int = 0, **options: Any) -> dict:
    return convert(data, row_id(data, index, kind), source(kind, **options))


def reason(kind: str, data: Any, **options: Any) -> str:
    with pytest.raises(Reject) as rejected:
        convert(data, "r", source(kind, **options))
    return str(rejected.value)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str, **extra: Any) -> dict:
    return {"role": "assistant", "content": text, **extra}


def tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    parameters = {"type": "object", "properties": properties, "required": required}
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    }


STOCK_TOOL = tool(
    "get_stock_fundamentals",
    "Get fundamental data for a given stock symbol using yfinance API.",
    {"symbol": {"type": "string"}},
    ["symbol"],
)
TIP_TOOL = tool(
    "calculate_tip",
    "Calculate the tip amount for a bill",
    {
        "bill_amount": {"type": "number", "description": "The total bill amount"},
        "tip_percentage": {"type": "number", "description": "The percentage of tip to give"},
    },
    ["bill_amount", "tip_percentage"],
)
AIR_TOOL = tool(
    "get_air_quality", "Get the air quality index for a city.", {"city": {"type": "string"}}, ["city"]
)


def test_every_kind_has_a_converter() -> None:
    assert set(CONVERTERS) == set(SFT_SOURCE_KINDS + DPO_SOURCE_KINDS)


# --- row ids -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"id": "0c8f7d1e"}, "0c8f7d1e"),
        ({"id": 17}, "17"),
        ({"id": 0}, "0"),
        ({"id": None}, "oh:3"),
        ({"id": ""}, "oh:3"),
        ({"id": "  "}, "oh:3"),
        ({}, "oh:3"),
        ({"prompt_id": "5e1c9a7b"}, "5e1c9a7b"),
        ({"id": "a", "prompt_id": "b"}, "a"),
    ],
)
def test_row_id_is_the_data_id_or_the_position(data: dict, expected: str) -> None:
    assert row_id(data, 3, "oh") == expected


# --- the real files' columns ---------------------------------------------------------------------------

OPENHERMES_METADATA = (
    "source", "category", "topic", "title", "model", "model_name", "language", "skip_prompt_formatting",
    "views", "idx", "hash", "avatarUrl", "system_prompt", "custom_instruction",
)  # fmt: skip
DISTILABEL_RATINGS = (
    "generations", "order", "labelling_model", "labelling_prompt", "raw_labelling_response", "rating",
    "rationale", "original_chosen", "original_rejected",
)  # fmt: skip
# Columns each Hub set carries that its converter must not read; every fixture row carries them all.
IGNORED_COLUMNS = {
    "openhermes": OPENHERMES_METADATA,
    "function_calling": ("category", "subcategory", "task"),
    "json_mode": ("category", "subcategory"),
    "distilabel_orca_dpo": DISTILABEL_RATINGS,
    "ultrafeedback_binarized": ("prompt", "messages", "score_chosen", "score_rejected"),
}
USED_COLUMNS = {
    "openhermes": ("conversations", "id"),
    "function_calling": ("id", "conversations"),
    "json_mode": ("id", "conversations", "schema"),
    "orca_dpo_pairs": ("system", "question", "chosen", "rejected"),
    "distilabel_orca_dpo": (
        "system",
        "input",
        "chosen",
        "rejected",
        "status",
        "chosen_score",
        "in_gsm8k_train",
    ),
    "ultrafeedback_binarized": ("prompt_id", "chosen", "rejected"),
}


def outcome(kind: str, data: dict, index: int) -> Any:
    """The converted row, or the reason it is rejected."""
    try:
        return run(kind, data, index)
    except Reject as rejected:
        return str(rejected)


@pytest.mark.parametrize("kind", USED_COLUMNS)
def test_fixtures_carry_every_column_of_the_real_files(kind: str) -> None:
    columns = {*USED_COLUMNS[kind], *IGNORED_COLUMNS.get(kind, ())}
    assert all(set(data) == columns for data in load(kind))


def test_openhermes_fixture_has_null_weights_and_an_empty_system_turn() -> None:
    turns = [turn for data in load("openhermes") for turn in data["conversations"]]
    assert any(turn["weight"] is None for turn in turns)
    assert any(turn["from"] == "system" and turn["value"] == "" for turn in turns)
    nullable = [column for column in OPENHERMES_METADATA if column != "source"]
    assert all(any(data[column] is None for data in load("openhermes")) for column in nullable)


@pytest.mark.parametrize("kind", IGNORED_COLUMNS)
def test_ignored_columns_change_nothing(kind: str) -> None:
    ignored = (*IGNORED_COLUMNS[kind], "__index_level_0__")
    for index, data in enumerate(load(kind)):
        expected = outcome(kind, data, index)
        without = {key: value for key, value in data.items() if key not in ignored}
        junk = {**data, **{key: {"x": [None, 2**70]} for key in ignored}}
        assert outcome(kind, without, index) == outcome(kind, junk, index) == expected


@pytest.mark.parametrize("kind", USED_COLUMNS)
def test_pandas_parquet_index_column_is_ignored(tmp_path: Path, kind: str) -> None:
    """A Parquet file written from a pandas frame whose index is not a plain range, as a filtered frame's
    is, carries that index as a ``__index_level_0__`` column. (dpo_messages rows mix types that one Parquet
    column cannot hold, so that kind is left out.)"""
    pandas = pytest.importorskip("pandas")
    rows = load(kind)
    frame = pandas.DataFrame(rows, index=pandas.Index([7 * i + 3 for i in range(len(rows))]))
    frame.to_parquet(tmp_path / "train.parquet")
    records = list(iter_records(str(tmp_path / "train.parquet")))
    assert [record.data["__index_level_0__"] for record in records] == list(frame.index)
    assert [outcome(kind, r.data, r.index) for r in records] == [
        outcome(kind, data, index) for index, data in enumerate(rows)
    ]


# --- openhermes / sharegpt -----------------------------------------------------------------------------


def test_openhermes_rows() -> None:
    rows = [run("openhermes", data, index) for index, data in enumerate(load("openhermes"))]
    assert rows[1] == {
        "id": "openhermes:1",
        "source": "openhermes",
        "messages": [
            {
                "role": "system",
                "content": "You are an AI assistant. You will be given a task. You must generate a detailed and long answer.",
            },
            user("Translate to French: The library opens at nine."),
            assistant("La bibliothèque ouvre à neuf heures."),
        ],
    }
    assert rows[3]["id"] == "0c8f7d1e-5a2b-4f7e-9b1d-3e6a2c9f4b10"
    assert [msg["role"] for msg in rows[4]["messages"]] == ["user", "assistant"], "empty system turn dropped"


def test_weights_stay_on_assistant_turns_only_when_set() -> None:
    haiku = run("openhermes", load("openhermes")[2])["messages"]
    assert haiku == [
        user("Write a haiku about rain."),
        assistant("Warm-up draft, not for training.", weight=0.0),
        user("Now a better one, please."),
        assistant("Soft rain on the roof\nthe garden drinks in silence\npuddles hold the sky", weight=1.0),
    ]
    primes = run("openhermes", load("openhermes")[5])["messages"]
    assert primes[2] == assistant("Yes. 17 has no divisors other than 1 and itself.", weight=1.0)
    assert isinstance(primes[2]["weight"], float)
    assert "weight" not in primes[4]


def test_sharegpt_is_read_like_openhermes() -> None:
    for index, data in enumerate(load("openhermes")):
        assert run("sharegpt", data, index)["messages"] == run("openhermes", data, index)["messages"]


# --- function calling ----------------------------------------------------------------------------------


def test_function_calling_verbatim_keeps_the_data_as_it_is() -> None:
    data = fixture("function_calling", "singleturn-python-call")
    turns = data["conversations"]
    assert run("function_calling", data) == {
        "id": "singleturn-python-call",
        "source": "function_calling",
        "messages": [
            {"role": "system", "content": turns[0]["value"]},
            user("Fetch the stock fundamentals data for Tesla (TSLA)"),
            assistant(
                "<tool_call>\n{'arguments': {'symbol': 'TSLA'}, 'name': 'get_stock_fundamentals'}\n</tool_call>"
            ),
        ],
    }


def test_function_calling_verbatim_is_the_default_and_keeps_tool_turns() -> None:
    for data in load("function_calling"):
        row = run("function_calling", data)
        assert [msg["content"] for msg in row["messages"]] == [
            turn["value"] for turn in data["conversations"]
        ]
        assert row == run("function_calling", data, mode="verbatim")
        assert "tools" not in row, "verbatim rows carry their tools in the system prompt"


def test_function_calling_canonical_single_call() -> None:
    data = fixture("function_calling", "singleturn-python-call")
    assert run("function_calling", data, mode="canonical") == {
        "id": "singleturn-python-call",
        "source": "function_calling",
        "messages": [
            user("Fetch the stock fundamentals data for Tesla (TSLA)"),
            assistant("", tool_calls=[{"name": "get_stock_fundamentals", "arguments": {"symbol": "TSLA"}}]),
        ],
        "tools": [STOCK_TOOL],
    }


def test_function_calling_tools_side_by_side_in_one_block() -> None:
    """hermes-function-calling-v1 also lists tools as Python dicts one after another, not in a list."""
    data = fixture("function_calling", "singleturn-tools-side-by-side")
    row = run("function_calling", data, mode="canonical")
    assert [tool["function"]["name"] for tool in row["tools"]] == ["get_current_weather", "get_local_time"]
    assert row["messages"][-1]["tool_calls"] == [
        {"name": "get_local_time", "arguments": {"location": "Lima"}}
    ]


def test_function_calling_canonical_parallel_calls_keep_order_and_python_literals() -> None:
    data = fixture("function_calling", "singleturn-parallel-calls")
    calls = run("function_calling", data, mode="canonical")["messages"][-1]["tool_calls"]
    assert calls == [
        {
            "name": "get_current_weather",
            "arguments": {"location": "Oslo", "unit": "celsius", "include_forecast": False},
        },
        {
            "name": "get_current_weather",
            "arguments": {"location": "Bergen", "unit": "celsius", "include_forecast": True},
        },
        {"name": "get_air_quality", "arguments": {"city": "Oslo"}},
    ]


def test_function_calling_canonical_splits_tool_responses() -> None:
    data = fixture("function_calling", "multiturn-tool-responses")
    messages = run("function_calling", data, mode="canonical")["messages"]
    assert [msg["role"] for msg in messages] == [
        "user", "assistant", "tool", "tool", "assistant", "user", "assistant", "tool", "assistant",
    ]  # fmt: skip
    assert messages[2:4] == [
        {
            "role": "tool",
            "content": '{"name": "search_flights", "content": {"flights": [{"id": "TP1940", "price": 79.0}]}}',
        },
        {
            "role": "tool",
            "content": '{"name": "search_flights", "content": {"flights": [{"id": "TP1901", "price": 64.5}]}}',
        },
    ]


def test_function_calling_canonical_prose_and_calls_stay_text_in_json_form() -> None:
    data = fixture("function_calling", "glaive-prose-and-call")
    row = run("function_calling", data, mode="canonical")
    assert row["tools"] == [TIP_TOOL]
    assert row["messages"][3:6] == [
        assistant(
            "Let me work that out.\n<tool_call>\n"
            '{"name": "calculate_tip", "arguments": {"bill_amount": 50, "tip_percentage": 15}}\n</tool_call>'
        ),
        {"role": "tool", "content": "{'tip_amount': 7.5}"},
        assistant("The tip amount for your bill is $7.50."),
    ]


def test_glaive_row_without_tools_is_plain_chat_in_both_modes() -> None:
    data = fixture("function_calling", "glaive-no-functions")
    expected = {
        "id": "glaive-no-functions",
        "source": "function_calling",
        "messages": [
            {
                "role": "system",
                "content": "You are a helpful assistant, with no access to external functions.",
            },
            user("Can you explain the difference between weather and climate?"),
            assistant(
                "Weather is the state of the atmosphere at a given time and place; climate is the average "
                "of weather over decades."
            ),
        ],
    }
    assert run("function_calling", data) == expected
    assert run("function_calling", data, mode="canonical") == expected


def test_tool_turn_without_tags_is_used_whole() -> None:
    data = fixture("function_calling", "glaive-untagged-tool-turn")
    messages = run("function_calling", data, mode="canonical")["messages"]
    assert messages[2] == {
        "role": "tool",
        "content": "{'headlines': ['Cherry blossoms arrive early', 'Yen steadies against the dollar']}",
    }


@pytest.mark.parametrize("own_id", [data["id"] for data in load("function_calling")])
def test_canonical_rows_render_with_the_tool_use_template(own_id: str) -> None:
    data = fixture("function_calling", own_id)
    row = run("function_calling", data, mode="canonical")
    expected_calls = [
        call
        for turn in data["conversations"]
        if turn["from"] == "gpt"
        for call in parse_tool_calls(turn["value"]).calls
    ]
    if "tools" not in row:
        assert expected_calls == []
        return
    rendered = render(row["messages"], tools=row["tools"])
    assert rendered.startswith("<|im_start|>system\nYou are a function calling AI model.")
    assert rendered.count("<|im_start|>system") == 1
    for call in expected_calls:
        assert f"<tool_call>\n{call.to_json()}\n</tool_call>" in rendered
    assert "{'arguments'" not in rendered


def test_canonical_render_of_a_call_matches_the_inference_form() -> None:
    row = run("function_calling", fixture("function_calling", "singleturn-python-call"), mode="canonical")
    rendered = render(row["messages"], tools=row["tools"])
    call = ToolCall("get_stock_fundamentals", {"symbol": "TSLA"})
    assert rendered.endswith(
        f"<|im_start|>assistant\n<tool_call>\n{call.to_json()}\n</tool_call><|im_end|>\n"
    )


# --- json mode -----------------------------------------------------------------------------------------


def test_json_mode_row() -> None:
    data = fixture("json_mode", "jm-singleturn-movie")
    assert run("json_mode", data) == {
        "id": "jm-singleturn-movie",
        "source": "json_mode",
        "messages": [
            {"role": "system", "content": data["conversations"][0]["value"]},
            user("Give me the title, year and genres of the 1979 film Alien."),
            assistant('{"title": "Alien", "year": 1979, "genres": ["science fiction", "horror"]}'),
        ],
        "schema": data["schema"],
    }


def test_json_mode_agentic_and_declared_drafts() -> None:
    for data in load("json_mode"):
        row = run("json_mode", data)
        assert isinstance(row["schema"], str)
        assert json.loads(row["schema"]) == json.loads(data["schema"])


@pytest.mark.parametrize(
    "schema",
    [
        "{not json",
        "[1, 2]",
        '"a string"',
        '{"type": "strng"}',
        '{"type": "object", "required": "name"}',
        '{"$schema": 7}',
        "[" * 100_000,
    ],
    ids=["not-json", "array", "string", "bad-type", "bad-required", "bad-$schema", "too-deep"],
)
def test_invalid_json_schema(schema: str) -> None:
    data = copy.deepcopy(fixture("json_mode", "jm-singleturn-movie"))
    data["schema"] = schema
    assert reason("json_mode", data) == "invalid JSON schema"


def test_json_mode_answer_must_parse() -> None:
    data = copy.deepcopy(fixture("json_mode", "jm-singleturn-movie"))
    data["conversations"][-1]["value"] = '```json\n{"title": "Alien", "year": 1979, "genres": []}\n```'
    assert reason("json_mode", data) == "answer is not JSON"


# --- llava ---------------------------------------------------------------------------------------------


def test_llava_row_moves_the_image_tag_and_resolves_the_path() -> None:
    data = fixture("llava", "000000033471")
    assert run("llava", data) == {
        "id": "000000033471",
        "source": "llava",
        "messages": [
            user("<image>\nWhat colour is the square in the image?"),
            assistant("The square is red."),
            user("Is it a photograph?"),
            assistant("No, it is a flat computer-generated image."),
        ],
        "images": [str(IMAGES / "red.png")],
    }
    assert run("llava", fixture("llava", "000000052846"))["images"] == [str(IMAGES / "nested" / "blue.png")]


def test_llava_text_only_row_has_no_images() -> None:
    row = run("llava", fixture("llava", "sharegpt4v-text-only"))
    assert "images" not in row
    assert row["messages"] == [user("Name three primary colours."), assistant("Red, yellow and blue.")]


def test_llava_missing_and_corrupt_images() -> None:
    assert reason("llava", fixture("llava", "missing-file")) == "missing image"
    assert reason("llava", fixture("llava", "corrupt-file")) == "corrupt image"


def test_llava_absolute_path_inside_the_image_root_is_kept() -> None:
    data = {**fixture("llava", "000000052846"), "image": str(IMAGES / "red.png")}
    assert run("llava", data)["images"] == [str(IMAGES / "red.png")]


def test_llava_paths_never_leave_the_image_root(tmp_path: Path) -> None:
    """One reason for every path outside the root, whether the file exists or not: rows cannot probe."""
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (4, 4), "white").save(outside)
    for image in (
        str(outside),
        str(tmp_path / "absent.png"),
        "../fixtures.png",
        "nested/../../x.png",
        "/etc/passwd",
    ):
        assert (
            reason("llava", {**fixture("llava", "000000052846"), "image": image})
            == "image path outside image_root"
        )
    link = tmp_path / "root" / "link.png"
    link.parent.mkdir()
    link.symlink_to(outside)
    data = {**fixture("llava", "000000052846"), "image": "link.png"}
    assert reason("llava", data, image_root=str(link.parent)) == "image path outside image_root"


def test_llava_image_paths_need_an_image_root() -> None:
    llava = DataSource(name="vision", kind="llava", path="org/data")
    with pytest.raises(UserError, match="image_root"):
        convert(fixture("llava", "000000033471"), "r", llava)


def test_llava_image_without_tag_gets_it_at_the_start() -> None:
    data = copy.deepcopy(fixture("llava", "000000052846"))
    data["conversations"][0]["value"] = "Describe the image."
    assert run("llava", data)["messages"][0] == user("<image>\nDescribe the image.")


@pytest.mark.parametrize(
    ("first", "answer", "expected"),
    [
        ("<image>\nDescribe it.", "See <image>.", "misplaced <image> tag"),
        ("<image> and <image>", "Two?", "misplaced <image> tag"),
    ],
)
def test_llava_misplaced_image_tags(first: str, answer: str, expected: str) -> None:
    data = copy.deepcopy(fixture("llava", "000000052846"))
    data["conversations"][0]["value"] = first
    data["conversations"][1]["value"] = answer
    assert reason("llava", data) == expected


def test_llava_tag_without_image() -> None:
    data = copy.deepcopy(fixture("llava", "sharegpt4v-text-only"))
    data["conversations"][0]["value"] = "<image>\nName three primary colours."
    assert reason("llava", data) == "<image> tag without an image"


# --- orca pairs, distilabel, ultrafeedback -------------------------------------------------------------


def test_orca_dpo_pairs() -> None:
    rows = [run("orca_dpo_pairs", data, index) for index, data in enumerate(load("orca_dpo_pairs"))]
    assert rows[0] == {
        "id": "orca_dpo_pairs:0",
        "source": "orca_dpo_pairs",
        "prompt": [user("Is 91 a prime number?")],
        "chosen": [assistant("No. 91 = 7 x 13, so it is not prime.")],
        "rejected": [assistant("Yes, 91 is prime.")],
    }
    assert rows[1]["prompt"][0]["role"] == "system"
    assert rows[1]["prompt"][1] == user("Which planet is known as the Red Planet?")


@pytest.mark.parametrize("system", ["", "   ", None])
def test_orca_without_a_system_prompt(system: str | None) -> None:
    data = {**load("orca_dpo_pairs")[1], "system": system}
    assert [msg["role"] for msg in run("orca_dpo_pairs", data)["prompt"]] == ["user"]


def test_distilabel_default_filters() -> None:
    outcomes = []
    for index, data in enumerate(load("distilabel_orca_dpo")):
        try:
            outcomes.append(run("distilabel_orca_dpo", data, index)["id"])
        except Reject as rejected:
            outcomes.append(str(rejected))
    assert outcomes == [
        "distilabel_orca_dpo:0",
        "distilabel_orca_dpo:1",
        "filtered: status tie",
        "filtered: chosen_score < 8",
        "filtered: in gsm8k train",
        "filtered: chosen_score < 8",
    ]


def test_distilabel_row() -> None:
    assert run("distilabel_orca_dpo", load("distilabel_orca_dpo")[0]) == {
        "id": "distilabel_orca_dpo:0",
        "source": "distilabel_orca_dpo",
        "prompt": [
            {"role": "system", "content": "You are a helpful assistant."},
            user("What is 12 times 12?"),
        ],
        "chosen": [assistant("12 x 12 = 144.")],
        "rejected": [assistant("12 x 12 = 124.")],
    }


def test_distilabel_filters_from_the_recipe() -> None:
    everything = SourceFilters(exclude_status=[], min_chosen_score=None, exclude_in_gsm8k_train=False)
    for data in load("distilabel_orca_dpo"):
        run("distilabel_orca_dpo", data, filters=everything)
    strict = SourceFilters(exclude_status=["swapped", "tie"], min_chosen_score=9.5)
    first, second = load("distilabel_orca_dpo")[:2]
    assert run("distilabel_orca_dpo", first, filters=strict)["chosen"] == [assistant("12 x 12 = 144.")]
    assert reason("distilabel_orca_dpo", second, filters=strict) == "filtered: status swapped"
    assert (
        reason("distilabel_orca_dpo", {**first, "chosen_score": 9}, filters=strict)
        == "filtered: chosen_score < 9.5"
    )


def test_distilabel_score_edge_cases() -> None:
    data = load("distilabel_orca_dpo")[0]
    assert run("distilabel_orca_dpo", {**data, "chosen_score": 8})["chosen"] == [assistant("12 x 12 = 144.")]
    for score in (7.99, None, "9", float("nan"), True):
        assert reason("distilabel_orca_dpo", {**data, "chosen_score": score}) == "filtered: chosen_score < 8"
    missing = {key: value for key, value in data.items() if key != "chosen_score"}
    assert reason("distilabel_orca_dpo", missing) == "filtered: chosen_score < 8"


def test_ultrafeedback_row_is_named_by_its_prompt_id() -> None:
    data = load("ultrafeedback_binarized")[0]
    assert run("ultrafeedback_binarized", data, 7) == {
        "id": data["prompt_id"],
        "source": "ultrafeedback_binarized",
        "prompt": [user("How many legs does a spider have?")],
        "chosen": [assistant("A spider has eight legs.")],
        "rejected": [assistant("Spiders have six legs, like insects.")],
    }
    assert run("ultrafeedback_binarized", {**data, "prompt_id": None}, 7)["id"] == "ultrafeedback_binarized:7"


def test_ultrafeedback_prompts_must_agree() -> None:
    data = copy.deepcopy(load("ultrafeedback_binarized")[0])
    data["rejected"][0]["content"] = "How many legs does an ant have?"
    assert reason("ultrafeedback_binarized", data) == "chosen and rejected prompts differ"


# --- generic preference rows ---------------------------------------------------------------------------


def test_dpo_messages_plain_strings() -> None:
    assert run("dpo_messages", load("dpo_messages")[0]) == {
        "id": "dpo_messages:0",
        "source": "dpo_messages",
        "prompt": [user("Say hello in Spanish.")],
        "chosen": [assistant("Hola.")],
        "rejected": [assistant("Bonjour.")],
    }


def test_dpo_messages_keep_multi_turn_tool_prompts_and_tools() -> None:
    data = load("dpo_messages")[1]
    row = run("dpo_messages", data)
    weather_calls = [
        {"name": "get_current_weather", "arguments": {"location": "Oslo"}},
        {"name": "get_current_weather", "arguments": {"location": "Bergen"}},
    ]
    assert row["prompt"] == [
        {"role": "system", "content": "Answer briefly."},
        user("Should I take an umbrella in Oslo and in Bergen today?"),
        assistant("", tool_calls=weather_calls),
        {"role": "tool", "content": '{"name": "get_current_weather", "content": {"rain_mm": 0}}'},
        {"role": "tool", "content": '{"name": "get_current_weather", "content": {"rain_mm": 12}}'},
        assistant("Oslo is dry; Bergen expects 12 mm of rain."),
        user("And the air quality in Bergen?"),
    ]
    assert row["chosen"] == [
        assistant("", tool_calls=[{"name": "get_air_quality", "arguments": {"city": "Bergen"}}])
    ]
    assert row["rejected"] == [assistant("The air in Bergen is always clean.")]
    assert row["tools"] == json.loads(data["tools"])
    assert AIR_TOOL in row["tools"]
    rendered = render(row["prompt"] + row["chosen"], tools=row["tools"])
    assert (
        '<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Bergen"}}\n</tool_call>'
        in rendered
    )
    assert rendered.count("<tool_response>") == 2


def test_dpo_messages_tools_as_a_list() -> None:
    assert run("dpo_messages", load("dpo_messages")[2]) == {
        "id": "tip-pair",
        "source": "dpo_messages",
        "prompt": [user("Tip on a $80 bill at 20%?")],
        "chosen": [
            assistant(
                "",
                tool_calls=[
                    {"name": "calculate_tip", "arguments": {"bill_amount": 80, "tip_percentage": 20}}
                ],
            )
        ],
        "rejected": [assistant("About $20.")],
        "tools": [TIP_TOOL],
    }


# --- malformed rows ------------------------------------------------------------------------------------


def sharegpt(*turns: tuple[str, Any]) -> dict:
    return {"conversations": [{"from": speaker, "value": value} for speaker, value in turns]}


FC_SYSTEM = (
    f"You are a function calling AI model. Here are the available tools: <tools> {[STOCK_TOOL]!r} </tools>"
)
CALL = "<tool_call>\n{'arguments': {'symbol': 'TSLA'}, 'name': 'get_stock_fundamentals'}\n</tool_call>"
ORCA = {"system": "", "question": "Q?", "chosen": "Good.", "rejected": "Bad."}
PAIR = {"prompt": [user("Q?")], "chosen": "Good.", "rejected": "Bad."}
SCHEMA = '{"type": "object"}'


def fc(*turns: tuple[str, Any]) -> dict:
    return sharegpt(("system", FC_SYSTEM), ("human", "Tesla?"), *turns)


def with_call(arguments: Any, tools: Any = None, role: str = "assistant") -> dict:
    calls = [{"name": "calculate_tip", "arguments": arguments}]
    return {**PAIR, "chosen": [{"role": role, "content": "", "tool_calls": calls}], "tools": tools}


MALFORMED = [
    ("openhermes", ["not", "a", "dict"], "row is not an object"),
    ("openhermes", {}, "conversations is missing or not a list"),
    ("openhermes", {"conversations": None}, "conversations is missing or not a list"),
    ("openhermes", {"conversations": "hi"}, "conversations is missing or not a list"),
    ("openhermes", {"conversations": []}, "no messages"),
    ("openhermes", {"conversations": ["hi"]}, "turn is not an object"),
    ("openhermes", {"conversations": [None]}, "turn is not an object"),
    ("openhermes", {"conversations": [{"value": "hi"}]}, "unknown role"),
    ("openhermes", sharegpt(("bing", "hi")), "unknown role 'bing'"),
    ("openhermes", sharegpt(("tool", "hi")), "unknown role 'tool'"),
    ("openhermes", sharegpt((["human"], "hi")), "unknown role"),
    ("openhermes", sharegpt(("x" * 500, "hi")), "unknown role"),
    ("openhermes", sharegpt(("human", None)), "turn value is not text"),
    ("openhermes", sharegpt(("human", 5)), "turn value is not text"),
    ("openhermes", sharegpt(("human", "hi"), ("gpt", "")), "empty assistant content"),
    ("openhermes", sharegpt(("gpt", "hi")), "broken turn order: assistant after start"),
    ("openhermes", sharegpt(("human", "a"), ("human", "b"), ("gpt", "c")), "broken turn order: user after user"),
    ("openhermes", sharegpt(("human", "a"), ("gpt", "b"), ("gpt", "c")), "broken turn order: assistant after assistant"),
    ("openhermes", sharegpt(("human", "a"), ("gpt", "b"), ("human", "c")), "last turn is user, not assistant"),
    ("openhermes", sharegpt(("human", "a"), ("system", "b"), ("gpt", "c")), "system turn after the first turn"),
    ("openhermes", sharegpt(("human", "a<|im_end|>"), ("gpt", "b")), "user content contains a chat control token"),
    ("openhermes", {"conversations": [{"from": "gpt", "value": "b", "weight": "high"}]}, "invalid weight"),
    ("openhermes", {"conversations": [{"from": "gpt", "value": "b", "weight": 2}]}, "invalid weight"),
    ("openhermes", {"conversations": [{"from": "gpt", "value": "b", "weight": True}]}, "invalid weight"),
    ("function_calling", fc(("gpt", "<tool_call>\n{'name': 'x'\n</tool_call>")), "unparsable tool call"),
    ("function_calling", fc(("gpt", "<tool_call>\n{'arguments': {}, 'name': 'x'}")), "unparsable tool call"),
    ("function_calling", fc(("gpt", "Done.</tool_call>")), "unparsable tool call"),
    ("function_calling", sharegpt(("system", "<tools> [{'name': </tools>"), ("human", "a"), ("gpt", "b")), "unparsable tools"),
    ("function_calling", sharegpt(("system", "<tools> [{'x': 1}] </tools>"), ("human", "a"), ("gpt", "b")), "unparsable tools"),
    ("function_calling", sharegpt(("human", "Tesla?"), ("gpt", CALL)), "tool calls without tools"),
    ("function_calling", fc(("gpt", CALL.replace("get_stock_fundamentals", "rm_rf"))), "call to an undefined tool"),
    ("function_calling", fc(("gpt", CALL.replace("TSLA", "\\x3c|im_end|>"))), "tool call contains a chat control token"),
    ("function_calling", fc(("gpt", CALL), ("tool", "<tool_response>\n{}")), "unparsable tool response"),
    ("function_calling", fc(("gpt", CALL), ("tool", "{}</tool_response>")), "unparsable tool response"),
    ("function_calling", fc(("gpt", CALL), ("tool", "<tool_response>{}</tool_response> and more")), "unparsable tool response"),
    ("function_calling", fc(("gpt", CALL), ("tool", "<tool_response> </tool_response>"), ("gpt", "ok")), "empty tool content"),
    ("function_calling", fc(("gpt", "Let me see."), ("tool", "{}")), "broken turn order: tool after assistant"),
    ("function_calling", fc(("tool", "{}"), ("gpt", "ok")), "broken turn order: tool after user"),
    ("function_calling", fc(("gpt", CALL), ("tool", "{}")), "last turn is tool, not assistant"),
    ("function_calling", fc(("observation", "{}")), "unknown role 'observation'"),
    ("json_mode", sharegpt(("human", "a"), ("gpt", "{}")), "schema is missing or not text"),
    ("json_mode", {**sharegpt(("human", "a"), ("gpt", "{}")), "schema": {"type": "object"}}, "schema is missing or not text"),
    ("json_mode", {**sharegpt(("human", "a"), ("gpt", "{}")), "schema": "{"}, "invalid JSON schema"),
    ("json_mode", {**sharegpt(("human", "a"), ("gpt", "{}")), "schema": '{"type": 12}'}, "invalid JSON schema"),
    ("json_mode", {**sharegpt(("human", "a"), ("gpt", "Sure! {}")), "schema": SCHEMA}, "answer is not JSON"),
    ("json_mode", {"schema": SCHEMA, "conversations": None}, "conversations is missing or not a list"),
    ("llava", {"image": "red.png"}, "conversations is missing or not a list"),
    ("llava", {**sharegpt(("human", "<image>\nhi"), ("gpt", "b")), "image": 5}, "invalid image path"),
    ("llava", {**sharegpt(("human", "<image>\nhi"), ("gpt", "b")), "image": ""}, "invalid image path"),
    ("llava", {**sharegpt(("human", "<image>\nhi"), ("gpt", "b")), "image": "red\x00.png"}, "invalid image path"),
    ("llava", {**sharegpt(("human", "<image>\nhi"), ("gpt", "b")), "image": "x" * 5000}, "missing image"),
    ("llava", {**sharegpt(("human", "<image>\nhi"), ("gpt", "b")), "image": "nested"}, "missing image"),
    ("llava", {**sharegpt(("gpt", "<image>\nhi")), "image": "red.png"}, "no user turn for the image"),
    ("orca_dpo_pairs", {**ORCA, "question": None}, "question is missing or not text"),
    ("orca_dpo_pairs", {key: value for key, value in ORCA.items() if key != "chosen"}, "chosen is missing or not text"),
    ("orca_dpo_pairs", {**ORCA, "rejected": ["Bad."]}, "rejected is missing or not text"),
    ("orca_dpo_pairs", {**ORCA, "system": 5}, "system is not text"),
    ("orca_dpo_pairs", {**ORCA, "question": ""}, "empty user content"),
    ("orca_dpo_pairs", {**ORCA, "chosen": " "}, "empty assistant content"),
    ("orca_dpo_pairs", {**ORCA, "rejected": "Good."}, "chosen and rejected are identical"),
    ("distilabel_orca_dpo", {**ORCA, "chosen_score": 9}, "input is missing or not text"),
    ("distilabel_orca_dpo", {**ORCA, "input": "Q?", "chosen_score": 9, "in_gsm8k_train": "no"}, "in_gsm8k_train is not a boolean"),
    ("ultrafeedback_binarized", {"chosen": None, "rejected": []}, "chosen is missing or not a list"),
    ("ultrafeedback_binarized", {"chosen": [], "rejected": []}, "chosen or rejected is empty"),
    ("ultrafeedback_binarized", {"chosen": ["hi"], "rejected": ["hi"]}, "message is not an object"),
    ("ultrafeedback_binarized", {"chosen": [{"role": "bot", "content": "a"}], "rejected": []}, "unknown role 'bot'"),
    ("ultrafeedback_binarized", {"chosen": [{"role": "user"}], "rejected": []}, "message content is not text"),
    ("ultrafeedback_binarized", {"chosen": [user("a")], "rejected": [user("a")]}, "no messages"),
    ("ultrafeedback_binarized", {"chosen": [user("a"), user("b")], "rejected": [user("a"), assistant("c")]}, "chosen is not a list of assistant turns"),
    ("dpo_messages", {**PAIR, "prompt": None}, "prompt is missing or malformed"),
    ("dpo_messages", {**PAIR, "prompt": 3}, "prompt is missing or malformed"),
    ("dpo_messages", {**PAIR, "chosen": 5}, "chosen is missing or malformed"),
    ("dpo_messages", {**PAIR, "rejected": None}, "rejected is missing or malformed"),
    ("dpo_messages", {**PAIR, "prompt": []}, "no messages"),
    ("dpo_messages", {**PAIR, "prompt": [user("a"), assistant("b")]}, "prompt does not end with a user or tool turn"),
    ("dpo_messages", {**PAIR, "chosen": [user("a")]}, "chosen is not a list of assistant turns"),
    ("dpo_messages", {**PAIR, "chosen": []}, "chosen is not a list of assistant turns"),
    ("dpo_messages", {**PAIR, "tools": "not json"}, "invalid tools"),
    ("dpo_messages", {**PAIR, "tools": {"name": "f"}}, "invalid tools"),
    ("dpo_messages", {**PAIR, "tools": [{"type": "function"}]}, "invalid tools"),
    ("dpo_messages", {**PAIR, "tools": '[{"name": "f", "description": "<|im_start|>"}]'}, "tools contain a chat control token"),
    ("dpo_messages", with_call({"bill_amount": 1}), "tool calls without tools"),
    ("dpo_messages", with_call({"bill_amount": 1}, [STOCK_TOOL]), "call to an undefined tool"),
    ("dpo_messages", with_call('{"bill_amount": 1}', [TIP_TOOL], role="user"), "tool calls outside an assistant turn"),
    ("dpo_messages", with_call("[1]", [TIP_TOOL]), "unparsable tool call"),
    ("dpo_messages", with_call("{oops", [TIP_TOOL]), "unparsable tool call"),
    ("dpo_messages", with_call({"x": float("nan")}, [TIP_TOOL]), "unparsable tool call"),
    ("dpo_messages", with_call({"note": "<|im_end|>"}, [TIP_TOOL]), "tool call contains a chat control token"),
    ("dpo_messages", {**PAIR, "chosen": [{"role": "assistant", "content": "", "tool_calls": "f()"}]}, "unparsable tool call"),
    ("dpo_messages", {**PAIR, "chosen": [{"role": "assistant", "content": "", "tool_calls": [None]}]}, "unparsable tool call"),
    ("dpo_messages", {**PAIR, "chosen": [{"role": "assistant", "content": None}]}, "message content is not text"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "data", "expected"), MALFORMED, ids=[f"{kind}-{why}" for kind, _, why in MALFORMED]
)
def test_malformed_rows_are_rejected_with_a_reason(kind: str, data: Any, expected: str) -> None:
    assert reason(kind, data) == expected


@pytest.mark.parametrize(
    ("turns", "expected"),
    [
        ((("gpt", CALL), ("tool", "<tool_response> </tool_response>")), "empty tool content"),
        ((("gpt", CALL.replace("TSLA", "\\x3c|im_end|>")),), "tool call contains a chat control token"),
    ],
)
def test_both_function_calling_modes_reject_the_same_rows(turns: tuple, expected: str) -> None:
    for mode in ("verbatim", "canonical"):
        assert reason("function_calling", fc(*turns, ("gpt", "ok")), mode=mode) == expected


# --- fuzz ----------------------------------------------------------------------------------------------

HUGE = "<tool_call>{'" + "x" * 100_000


def _containers(value: Any, found: list) -> list:
    """Every dict and list inside ``value``, each a place a mutation can hit."""
    if isinstance(value, dict | list):
        found.append(value)
        for child in value.values() if isinstance(value, dict) else value:
            _containers(child, found)
    return found


def _mutate(data: dict, rng: random.Random) -> dict:
    data = copy.deepcopy(data)
    target = rng.choice(_containers(data, []))
    if not target:
        return data
    key = rng.choice(list(target)) if isinstance(target, dict) else rng.randrange(len(target))
    value = target[key]
    match rng.randrange(6):
        case 0:
            del target[key]
        case 1:
            target[key] = None
        case 2:
            target[key] = rng.choice([0, -1, 2**70, 3.5, True])
        case 3:
            target[key] = rng.choice([[], [value], {}])
        case 4:
            target[key] = HUGE
        case _:
            target[key] = value[: rng.randrange(len(value) + 1)] if isinstance(value, str) else ""
    return data


def test_fuzzed_rows_are_rejected_or_valid() -> None:
    rng = random.Random(1729)
    kinds = [(kind, {}) for kind in FILES] + [("function_calling", {"mode": "canonical"})]
    for attempt in range(300):
        kind, options = kinds[attempt % len(kinds)]
        data = _mutate(rng.choice(load(kind)), rng)
        try:
            row = run(kind, data, attempt, **options)
        except Reject as rejected:
            assert 0 < len(str(rejected)) <= 60 and "xxxx" not in str(rejected), (kind, str(rejected))
            continue
        (check_dpo_row if kind in DPO_SOURCE_KINDS else check_sft_row)(row)
        assert {"id", "source"} <= set(row)
        json.dumps(row, allow_nan=False)


def test_fn_call_rows_keep_schema_and_answer_when_the_answer_follows_the_schema() -> None:
    """Hermes 2 Vision's function calling, in the model card's own examples: `<fn_call>` and a JSON schema
    open the user turn, the answer is JSON under that schema."""
    rows = {data["id"]: data for data in json.loads((FIXTURES / "llava_fn_call.json").read_text())}
    kept = run("llava", rows["fn-call-bus"])
    assert kept["messages"][0]["content"].startswith('<image>\n<fn_call>{\n  "type": "object"')
    assert json.loads(kept["messages"][1]["content"])["bus_location"] == "driving"
    # the card's second example: its schema has trailing commas, which no JSON parser reads
    assert reason("llava", rows["fn-call-menu-card-quirk"]) == "<fn_call> schema is not a valid JSON schema"
    assert reason("llava", rows["fn-call-off-schema"]) == "<fn_call> answer does not follow its schema"
    assert reason("llava", rows["fn-call-prose"]) == "<fn_call> answer is not JSON"
