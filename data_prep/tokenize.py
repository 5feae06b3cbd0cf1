"""Render canonical rows with the recipe's template, tokenize once, and label only the assistant turns.

Rendering goes through the same templates a server uses (hermes_pipeline.chat_format), so the tokens a
model trains on are the tokens it sees at inference. The trained spans are found in the rendered text: an
assistant turn's content (tool calls included) and its closing ``<|im_end|>``; the ``<|im_start|>assistant``
header, system, user and tool turns are masked. One fast-tokenizer call with character offsets then turns
spans into labels, so training never re-tokenizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from hermes_pipeline.chat_format.templates import render
from hermes_pipeline.chat_format.tokens import IM_END, IM_START, IMAGE_TOKEN, VICUNA_EOS
from hermes_pipeline.chat_format.tool_calls import ToolCall, render_tool_calls
from hermes_pipeline.rows import IGNORE_INDEX, Reject

ASSISTANT_OPEN = f"{IM_START}assistant"
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # [start, end) character ranges that are trained
    turn_ends: list[int]  # character offset just after each assistant turn's closing marker


@dataclass(frozen=True)
class ImageTokens:
    """A LLaVA model's image placeholder: its token id, and how many tokens one image's features fill. Prep
    writes every image as that many tokens, as the model's processor does, so a row's length is its true
    length in training."""

    id: int
    count: int


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]


def render_sft(row: dict[str, Any], template: str, bos_token: str) -> Rendered:
    """The row as training text with its trained spans; assistant turns with weight 0 stay untrained."""
    messages = row["messages"]
    weights = [m.get("weight", 1.0) for m in messages if m["role"] == "assistant"]
    if template == "vicuna_v1":
        return _render_vicuna(messages, weights, bos_token)
    if template == "plain":
        return _render_plain(messages, bos_token)
    tools = row.get("tools")
    text = (
        _render(messages, tools=tools, bos_token=bos_token)
        if tools is not None
        else plain_chatml(messages, bos_token)
    )
    return _chatml_spans(text, weights)


def plain_chatml(messages: list[dict[str, Any]], bos_token: str) -> str:
    """The ``default`` template's output, built directly: most rows have no tools, and building the text
    costs a tenth of a Jinja render. tests/test_prep_tokenize.py holds it equal to the template."""
    return bos_token + "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def _render(messages: list[dict[str, Any]], **options: Any) -> str:
    """Render, turning a template failure on odd data (a tool whose parameters are not an object, say)
    into a rejected row rather than a crashed run."""
    try:
        return render(messages, **options)
    except (TemplateError, TypeError, ValueError) as exc:
        raise Reject(f"template cannot render the row ({type(exc).__name__})") from None


def _chatml_spans(text: str, weights: list[float]) -> Rendered:
    spans, ends = [], []
    position = 0
    for weight in weights:
        start = text.find(ASSISTANT_OPEN, position)
        if start < 0:
            raise Reject("template dropped an assistant turn")
        content = start + len(ASSISTANT_OPEN) + 1  # the header's newline is not trained
        close = text.find(IM_END, content)
        if close < 0:
            raise Reject("assistant turn not closed")
        end = close + len(IM_END)
        if weight:
            spans.append((content, end))
        ends.append(end)
        position = end
    return Rendered(text, spans, ends)


def _render_vicuna(messages: list[dict[str, Any]], weights: list[float], bos_token: str) -> Rendered:
    """LLaVA's conv_llava_v1 (separator style TWO): BOS, the system sentence and a space, then each turn as
    "ROLE: message" followed by a space after a user turn and "</s>" after an assistant turn, so the next
    turn follows "</s>" with no space: "<s>SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>".
    Trained, as LLaVA masks it: each answer from the space after "ASSISTANT:" through its "</s>"."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else VICUNA_SYSTEM
    text, spans, ends = f"{bos_token}{system} ", [], []
    assistant_turn = 0
    for msg in messages:
        if msg["role"] == "user":
            text += f"USER: {msg['content']} "
        elif msg["role"] == "assistant":
            text += "ASSISTANT:"
            start = len(text)
            text += f" {msg['content']}{VICUNA_EOS}"
            if weights[assistant_turn]:
                spans.append((start, len(text)))
            ends.append(len(text))
            assistant_turn += 1
        elif msg["role"] == "tool":
            raise Reject("tool turns cannot be rendered in vicuna_v1")
    return Rendered(text, spans, ends)


def _render_plain(messages: list[dict[str, Any]], bos_token: str) -> Rendered:
    """LLaVA's stage-1 `plain` format for projector pre-training: BOS, the image, the caption and a newline;
    the instruction and system sentence are dropped, and the caption with its newline is trained."""
    turns = [m for m in messages if m["role"] != "system"]
    if [m["role"] for m in turns] != ["user", "assistant"] or not turns[0]["content"].startswith(IMAGE_TOKEN):
        raise Reject(
            "a projector row is one image and its caption (one user turn opening with <image>, one answer)"
        )
    start = len(bos_token) + len(IMAGE_TOKEN)
    text = f"{bos_token}{IMAGE_TOKEN}{turns[1]['content']}\n"
    return Rendered(text, [(start, len(text))], [len(text)])


def tokenize_rendered(
    tokenizer: PreTrainedTokenizerBase,
    rendered: list[Rendered],
    max_seq_len: int,
    truncate: bool,
    image: ImageTokens | None = None,
) -> list[Tokenized | Reject]:
    """Tokenize a batch in one call and turn character spans into labels.

    Only span boundaries are mapped to tokens (``char_to_token``), never every token's offsets, and the
    Rust tokenizer is called directly: labels then cost a few slices per row, which keeps this close to
    the speed of bare tokenization. A row longer than ``max_seq_len`` is dropped, or with ``truncate``
    cut after the last assistant turn that still fits, never inside a turn. With ``image``, each image
    token counts as the tokens its features fill: a row whose images would not fit is rejected here, never
    cut into the "image features and image tokens do not match" crash in training.
    """
    encodings = tokenizer.backend_tokenizer.encode_batch([r.text for r in rendered], add_special_tokens=False)
    return [
        _labelled(r, encoding, max_seq_len, truncate, image)
        for r, encoding in zip(rendered, encodings, strict=True)
    ]


def _labelled(
    r: Rendered, encoding: Any, max_seq_len: int, truncate: bool, image: ImageTokens | None
) -> Tokenized | Reject:
    ids = encoding.ids
    length = len(ids)
    # Images open the first user turn (sources.py puts them there), so every cut point lies after them all.
    extra = (image.count - 1) * ids.count(image.id) if image else 0
    if length + extra > max_seq_len:
        too_long = "too long with its image tokens" if extra and length <= max_seq_len else "too long"
        if not truncate:
            return Reject(too_long)
        fits = [
            cut
            for cut in (encoding.char_to_token(end - 1) + 1 for end in r.turn_ends)
            if cut + extra <= max_seq_len
        ]
        if not fits:
            return Reject(f"{too_long} even when truncated at a turn")
        length = fits[-1]
    labels = [IGNORE_INDEX] * length
    trained = False
    for start, end in r.spans:
        first, last = encoding.char_to_token(start), min(encoding.char_to_token(end - 1) + 1, length)
        if first < last:
            labels[first:last] = ids[first:last]
            trained = True
    if not trained:
        return Reject("nothing to train on")
    if extra:
        return _expand_images(ids[:length], labels, image)
    return Tokenized(ids[:length], labels)


def _expand_images(ids: list[int], labels: list[int], image: ImageTokens) -> Tokenized:
    """Each image token written ``image.count`` times, never trained."""
    expanded_ids: list[int] = []
    expanded_labels: list[int] = []
    for token, label in zip(ids, labels, strict=True):
        if token == image.id:
            expanded_ids += [token] * image.count
            expanded_labels += [IGNORE_INDEX] * image.count
        else:
            expanded_ids.append(token)
            expanded_labels.append(label)
    return Tokenized(expanded_ids, expanded_labels)


def render_dpo(row: dict[str, Any], template: str, bos_token: str) -> tuple[str, str, str]:
    """Prompt text as a server renders it for generation, and each completion up to and including EOS.

    The prompt is rendered on its own with the generation header, not cut from a full conversation: the
    published tool_use template renders a final tool turn differently from an inner one, and DPO must
    score the completion against the prompt the model will really see.
    """
    if template != "chatml":
        raise Reject(f"DPO rows need the chatml template, not {template}")
    prompt = _render(row["prompt"], tools=row.get("tools"), add_generation_prompt=True, bos_token=bos_token)
    between = f"{IM_END}\n{ASSISTANT_OPEN}\n"
    chosen, rejected = (
        between.join(map(_assistant_text, row[side])) + IM_END for side in ("chosen", "rejected")
    )
    return prompt, chosen, rejected


def tokenize_dpo(
    tokenizer: PreTrainedTokenizerBase, prompt: str, chosen: str, rejected: str
) -> dict[str, list[int]]:
    """Prompt and completion tokens as they stand in the whole conversation, not as each text alone.

    A completion tokenized alone is not the completion the model writes after the prompt: a SentencePiece
    vocabulary starts it with a "▁" piece it never has after ``<|im_start|>assistant\\n``, and an answer
    that starts with a space (as many rejected ones do) gets tokens it would not get in context. So
    prompt + chosen and prompt + rejected are tokenized whole and split where the prompt's own tokens end.

    A tokenizer may merge the prompt's last characters with the completion's first into one token
    (byte-level BPE joins ``\\n`` + ``\\n``). The shared prompt then stops before the first token on
    which the prompt alone and either conversation differ, and the tokens from there on open each
    completion: prompt + completion ids are always exactly the conversation's ids.
    """
    alone, with_chosen, with_rejected = (
        encoding.ids
        for encoding in tokenizer.backend_tokenizer.encode_batch(
            [prompt, prompt + chosen, prompt + rejected], add_special_tokens=False
        )
    )
    cut = min(_shared_length(alone, with_chosen), _shared_length(alone, with_rejected))
    return {
        "prompt_input_ids": alone[:cut],
        "chosen_input_ids": with_chosen[cut:],
        "rejected_input_ids": with_rejected[cut:],
    }


def _shared_length(first: list[int], second: list[int]) -> int:
    """How many leading ids two sequences share."""
    shorter = min(len(first), len(second))
    return next((i for i in range(shorter) if first[i] != second[i]), shorter)


def _assistant_text(message: dict[str, Any]) -> str:
    """An assistant turn's text as the templates write it: structured tool calls become Hermes blocks."""
    calls = message.get("tool_calls")
    if calls:
        return render_tool_calls([ToolCall(c["name"], c["arguments"]) for c in calls])
    return message["content"]
