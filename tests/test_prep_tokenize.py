"""Rendering and masking: the fast ChatML path equals the template, spans are exact, cuts fall between turns."""

import functools

import pytest
from prep_support import FIXTURES, TEXT_SOURCES
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from hermes_pipeline.chat_format.templates import render
from hermes_pipeline.chat_format.tokens import add_image_token, prepare_tokenizer
from hermes_pipeline.data_prep import sources
from hermes_pipeline.data_prep.tokenize import (
    IGNORE_INDEX,
    VICUNA_SYSTEM,
    ImageTokens,
    Tokenized,
    plain_chatml,
    render_dpo,
    render_sft,
    tokenize_dpo,
    tokenize_rendered,
)
from hermes_pipeline.readers import iter_records
from hermes_pipeline.recipe.schema import DataSource
from hermes_pipeline.rows import Reject
from hermes_pipeline.tiny import load_tiny_tokenizer

TOKENIZER = load_tiny_tokenizer()
CHAT = {
    "id": "r",
    "source": "s",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": "Lima."},
        {"role": "user", "content": "And of Chile?"},
        {"role": "assistant", "content": "Santiago.", "weight": 0.0},
        {"role": "user", "content": "Of Japan, 日本?"},
        {"role": "assistant", "content": "Tokyo 東京."},
    ],
}


def _fixture_rows() -> list[dict]:
    rows = []
    for spec in TEXT_SOURCES:
        source = DataSource.model_validate({**spec, "path": str(FIXTURES / spec["path"])})
        if source.used_by != "sft":
            continue
        for record in iter_records(source.path):
            try:
                rows.append(
                    sources.convert(
                        record.data, sources.row_id(record.data, record.index, source.name), source
                    )
                )
            except Reject:
                continue
    return rows


@pytest.mark.parametrize("bos", ["", "<s>"])
def test_plain_chatml_is_the_default_template(bos: str) -> None:
    rows = [r for r in _fixture_rows() if "tools" not in r] + [CHAT]
    assert len(rows) > 5
    for row in rows:
        assert plain_chatml(row["messages"], bos) == render(row["messages"], bos_token=bos)


def test_spans_cover_weighted_assistant_content_and_eos() -> None:
    rendered = render_sft(CHAT, "chatml", "<s>")
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["Lima.<|im_end|>", "Tokyo 東京.<|im_end|>"]
    assert [rendered.text[:end].endswith("<|im_end|>") for end in rendered.turn_ends] == [True] * 3


def test_labels_equal_ids_on_spans_and_tokens_equal_a_plain_encode() -> None:
    rendered = render_sft(CHAT, "chatml", "<s>")
    (tokenized,) = tokenize_rendered(TOKENIZER, [rendered], 4096, truncate=False)
    assert tokenized.input_ids == TOKENIZER(rendered.text, add_special_tokens=False)["input_ids"]
    trained = [
        t for t, label in zip(tokenized.input_ids, tokenized.labels, strict=True) if label != IGNORE_INDEX
    ]
    assert TOKENIZER.decode(trained) == "Lima.<|im_end|>Tokyo 東京.<|im_end|>"
    untrained = [label for label in tokenized.labels if label == IGNORE_INDEX]
    assert len(untrained) + len(trained) == len(tokenized.input_ids)


def test_truncation_keeps_whole_turns_or_rejects() -> None:
    rendered = render_sft(CHAT, "chatml", "<s>")
    full = len(TOKENIZER(rendered.text, add_special_tokens=False)["input_ids"])
    first_turn = len(TOKENIZER(rendered.text[: rendered.turn_ends[0]], add_special_tokens=False)["input_ids"])
    (whole,) = tokenize_rendered(TOKENIZER, [rendered], full - 1, truncate=True)
    assert TOKENIZER.decode(whole.input_ids).endswith("Tokyo 東京.<|im_end|>"), (
        "only the final newline is dropped"
    )
    (cut,) = tokenize_rendered(TOKENIZER, [rendered], full - 2, truncate=True)
    assert TOKENIZER.decode(cut.input_ids).endswith("Santiago.<|im_end|>")
    (short,) = tokenize_rendered(TOKENIZER, [rendered], first_turn, truncate=True)
    assert TOKENIZER.decode(short.input_ids).endswith("Lima.<|im_end|>")
    (dropped,) = tokenize_rendered(TOKENIZER, [rendered], full - 1, truncate=False)
    assert str(dropped) == "too long"
    (none,) = tokenize_rendered(TOKENIZER, [rendered], first_turn - 1, truncate=True)
    assert str(none) == "too long even when truncated at a turn"


def test_a_row_whose_only_turns_have_weight_zero_is_rejected() -> None:
    row = {**CHAT, "messages": [*CHAT["messages"][:3]]}
    row["messages"][2] = {**row["messages"][2], "weight": 0.0}
    (result,) = tokenize_rendered(TOKENIZER, [render_sft(row, "chatml", "")], 4096, truncate=False)
    assert str(result) == "nothing to train on"


def test_vicuna_v1_layout() -> None:
    row = {
        "messages": [
            {"role": "user", "content": "<image>\nWhat is shown?"},
            {"role": "assistant", "content": "A cat."},
        ]
    }
    rendered = render_sft(row, "vicuna_v1", "<s>")
    assert rendered.text == f"<s>{VICUNA_SYSTEM} USER: <image>\nWhat is shown? ASSISTANT: A cat.</s>"
    assert [rendered.text[a:b] for a, b in rendered.spans] == [" A cat.</s>"]


def test_vicuna_v1_multi_turn_golden() -> None:
    """LLaVA's conv_llava_v1.get_prompt() for this conversation, character for character: the next USER
    follows "</s>" with no space, and only the answers (from the space after "ASSISTANT:") are trained."""
    row = {
        "messages": [
            {"role": "user", "content": "<image>\nHow many circles?"},
            {"role": "assistant", "content": "Three."},
            {"role": "user", "content": "And their colour?"},
            {"role": "assistant", "content": "Red, with a blue one."},
        ]
    }
    rendered = render_sft(row, "vicuna_v1", "<s>")
    assert rendered.text == (
        "<s>A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions. USER: <image>\nHow many circles? "
        "ASSISTANT: Three.</s>USER: And their colour? ASSISTANT: Red, with a blue one.</s>"
    )
    assert [rendered.text[a:b] for a, b in rendered.spans] == [" Three.</s>", " Red, with a blue one.</s>"]
    assert rendered.turn_ends == [rendered.text.index("USER: And"), len(rendered.text)]


def test_plain_keeps_only_the_image_and_its_caption() -> None:
    """LLaVA's stage-1 preprocessing: the instruction is replaced by the image alone, the caption follows
    with a newline, and everything after the image is trained."""
    row = {
        "messages": [
            {"role": "user", "content": "<image>\nDescribe the picture briefly."},
            {"role": "assistant", "content": "two green squares"},
        ]
    }
    rendered = render_sft(row, "plain", "<s>")
    assert rendered.text == "<s><image>two green squares\n"
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["two green squares\n"]
    for messages in ([row["messages"][1]], [*row["messages"], *row["messages"]]):
        with pytest.raises(Reject, match="one image and its caption"):
            render_sft({"messages": messages}, "plain", "<s>")
    with pytest.raises(Reject, match="one image and its caption"):
        render_sft(
            {"messages": [{"role": "user", "content": "no image"}, row["messages"][1]]}, "plain", "<s>"
        )


def test_dpo_prompt_and_completions_as_a_server_renders_them() -> None:
    tool = {
        "name": "get_weather",
        "description": "Weather.",
        "parameters": {"type": "object", "properties": {}},
    }
    row = {
        "prompt": [
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}],
            },
            {"role": "tool", "content": '{"temp": 3}'},
        ],
        "chosen": [{"role": "assistant", "content": "3 degrees."}],
        "rejected": [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}],
            }
        ],
        "tools": [tool],
    }
    prompt, chosen, rejected = render_dpo(row, "chatml", "<s>")
    assert prompt == render(row["prompt"], tools=[tool], add_generation_prompt=True, bos_token="<s>")
    assert prompt.endswith('{"temp": 3}\n</tool_response><|im_end|><|im_start|>assistant\n')
    assert chosen == "3 degrees.<|im_end|>"
    assert (
        rejected
        == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'
    )


# --- DPO pairs in context ------------------------------------------------------------------------------

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
OSLO_CALL = {"name": "get_weather", "arguments": {"city": "Oslo"}}


def _pair(prompt: list[dict], chosen: str | dict, rejected: str | dict, **extra: object) -> dict:
    def side(answer: str | dict) -> list[dict]:
        return [answer if isinstance(answer, dict) else {"role": "assistant", "content": answer}]

    return {
        "id": "p",
        "source": "s",
        "prompt": prompt,
        "chosen": side(chosen),
        "rejected": side(rejected),
        **extra,
    }


QUESTION = [{"role": "user", "content": "Which planet is the Red Planet?"}]
DPO_CASES = {
    "no leading space": _pair(QUESTION, "Mars is.", "Jupiter is."),
    "rejected starts with a space": _pair(QUESTION, "Mars is.", " Jupiter is."),
    "chosen starts with a space": _pair(QUESTION, " Mars is.", "Jupiter is."),
    "multi-turn prompt": _pair(
        [
            {"role": "system", "content": "Answer briefly."},
            *QUESTION,
            {"role": "assistant", "content": "Mars."},
            {"role": "user", "content": "And the largest one?"},
        ],
        "Jupiter.",
        " Saturn.",
    ),
    "tool turns": _pair(
        [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [OSLO_CALL]},
            {"role": "tool", "content": '{"name": "get_weather", "content": {"temp": 3}}'},
        ],
        "It is 3 degrees.",
        {"role": "assistant", "content": "", "tool_calls": [OSLO_CALL]},
        tools=[WEATHER_TOOL],
    ),
    "completion starts with a newline": _pair(QUESTION, "\n\nMars is.", "Jupiter is."),
}


@functools.cache
def _llama3_style_tokenizer() -> PreTrainedTokenizerBase:
    """A tiny byte-level BPE tokenizer with Llama 3's pre-tokenizer, trained here offline. It has "\\n\\n"
    as one token, so a completion that opens with a newline merges with the prompt's last one."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    corpus = ["user\nWhich planet is the Red Planet?\n\nassistant\n\nMars is. It is 3 degrees.\n\n"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|begin_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>")
    prepare_tokenizer(wrapped)
    return wrapped


@pytest.fixture(scope="module", params=["sentencepiece", "llama3_bpe"])
def any_tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    return TOKENIZER if request.param == "sentencepiece" else _llama3_style_tokenizer()


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("case", DPO_CASES)
def test_dpo_prompt_and_completion_ids_are_the_whole_conversations_ids(
    any_tokenizer: PreTrainedTokenizerBase, case: str
) -> None:
    prompt, chosen, rejected = render_dpo(DPO_CASES[case], "chatml", any_tokenizer.bos_token)
    columns = tokenize_dpo(any_tokenizer, prompt, chosen, rejected)
    assert columns["prompt_input_ids"] + columns["chosen_input_ids"] == _ids(any_tokenizer, prompt + chosen)
    assert columns["prompt_input_ids"] + columns["rejected_input_ids"] == _ids(
        any_tokenizer, prompt + rejected
    )
    if case != "completion starts with a newline":
        assert columns["prompt_input_ids"] == _ids(any_tokenizer, prompt), "the prompt as a server sends it"


def test_a_completion_is_not_tokenized_as_if_alone() -> None:
    """SentencePiece opens a text with "▁": answers tokenized alone start with a piece they never have after
    the assistant header, and a leading space, the only difference between these two, disappears."""
    row = _pair(QUESTION, "Mars is.", " Mars is.")
    prompt, chosen, rejected = render_dpo(row, "chatml", "<s>")
    assert _ids(TOKENIZER, chosen) == _ids(TOKENIZER, rejected)
    columns = tokenize_dpo(TOKENIZER, prompt, chosen, rejected)
    assert columns["chosen_input_ids"] != columns["rejected_input_ids"]
    assert TOKENIZER.convert_ids_to_tokens(columns["chosen_input_ids"])[:2] == ["M", "ars"]
    assert TOKENIZER.convert_ids_to_tokens(columns["rejected_input_ids"])[0].startswith("▁")


def test_a_merge_across_the_prompt_boundary_moves_the_merged_token_into_the_completions() -> None:
    tokenizer = _llama3_style_tokenizer()
    prompt, chosen, rejected = render_dpo(
        DPO_CASES["completion starts with a newline"], "chatml", tokenizer.bos_token
    )
    columns = tokenize_dpo(tokenizer, prompt, chosen, rejected)
    alone = _ids(tokenizer, prompt)
    assert columns["prompt_input_ids"] == alone[:-1], "the prompt's closing newline merged with the answer's"
    assert tokenizer.decode(columns["chosen_input_ids"]).startswith("\n\n\nMars")
    assert tokenizer.decode(columns["rejected_input_ids"]).startswith("\nJupiter"), "same prompt for both"


def test_image_tokens_count_towards_the_length_and_a_row_they_push_over_is_rejected() -> None:
    """Each <image> is written as the tokens its features fill, untrained. A row that fits as text but not
    with its image is a counted reject in prep, where truncating it would crash training on "image
    features and image tokens do not match"; truncation keeps whole images or drops the row."""
    tokenizer = load_tiny_tokenizer()
    image = ImageTokens(add_image_token(tokenizer), count=16)
    row = {
        "messages": [
            {"role": "user", "content": "<image>\nWhat is shown?"},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes, a cat."},
        ]
    }
    rendered = render_sft(row, "vicuna_v1", tokenizer.bos_token)
    text_length = len(tokenizer(rendered.text, add_special_tokens=False).input_ids)
    (whole,) = tokenize_rendered(tokenizer, [rendered], text_length + 15, truncate=False, image=image)
    assert isinstance(whole, Tokenized) and len(whole.input_ids) == text_length + 15
    start = whole.input_ids.index(image.id)
    assert (
        whole.input_ids[start : start + 16] == [image.id] * 16
        and image.id not in whole.input_ids[start + 16 :]
    )
    assert whole.labels[start : start + 16] == [IGNORE_INDEX] * 16
    (over,) = tokenize_rendered(tokenizer, [rendered], text_length + 14, truncate=False, image=image)
    assert str(over) == "too long with its image tokens"
    (cut,) = tokenize_rendered(tokenizer, [rendered], text_length + 14, truncate=True, image=image)
    assert isinstance(cut, Tokenized) and cut.input_ids.count(image.id) == 16
    assert tokenizer.decode(cut.input_ids).endswith("ASSISTANT: A cat.</s>")
