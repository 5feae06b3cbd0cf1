"""The Hermes special tokens and the one function that prepares any base tokenizer for them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerBase

from hermes_pipeline.chat_format.templates import VICUNA_TEMPLATE, install_templates, template_source

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TOOL_TAGS = ("<tools>", "</tools>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
# ChatML markers are control tokens: they never appear in decoded text with skip_special_tokens=True.
CONTROL_TOKENS = (IM_START, IM_END)
# The agentic tags are single tokens too, but plain ones: a decoded reply must keep its <tool_call> blocks
# so that servers and our own codec can parse them.
CHAT_TOKENS = (*CONTROL_TOKENS, *TOOL_TAGS)
FALLBACK_PAD = "<|pad|>"
# LLaVA's image placeholder: one special token, which the model replaces by the image's features.
IMAGE_TOKEN = "<image>"
# Hermes 2 Vision's function calling: a user turn opens with it and a JSON schema; the answer is JSON under it.
FN_CALL = "<fn_call>"
# Vicuna v1 (LLaVA's sep2) ends every answer with the base model's EOS written as text, whatever the chat EOS.
VICUNA_EOS = "</s>"


def prepare_tokenizer(
    tokenizer: PreTrainedTokenizerBase, embedding_rows: int | None = None, pad_to_multiple_of: int = 64
) -> int:
    """Make ``tokenizer`` speak the Hermes format and return how many embedding rows the model must grow by.

    Adds whichever chat tokens are missing (so it is idempotent, and a tokenizer that already has them,
    like Hermes 2 Pro's, keeps their ids), sets EOS to ``<|im_end|>`` so generation stops at the end of a
    turn, picks a pad token that is *not* EOS (a collator that masks pad labels would otherwise never
    train the model to emit ``<|im_end|>``), and installs the ``default`` and ``tool_use`` templates.

    ``embedding_rows`` is the model's current embedding size; by default the tokenizer's size before
    the new tokens. The model grows to the tokenizer's new size rounded up to ``pad_to_multiple_of``.
    """
    rows_before = len(tokenizer) if embedding_rows is None else embedding_rows
    old_eos = tokenizer.eos_token
    vocab = tokenizer.get_vocab()
    missing_control = [t for t in CONTROL_TOKENS if t not in vocab]
    missing_tags = [t for t in TOOL_TAGS if t not in vocab]
    if missing_control:
        tokenizer.add_tokens([_added(t, special=True) for t in missing_control], special_tokens=True)
    if missing_tags:
        tokenizer.add_tokens([_added(t, special=False) for t in missing_tags])
    tokenizer.eos_token = IM_END
    tokenizer.pad_token = _choose_pad(tokenizer, old_eos)
    install_templates(tokenizer)
    target_rows = padded_rows(len(tokenizer), pad_to_multiple_of)
    return max(0, target_rows - rows_before)


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add ``<image>`` as a special token (one id, never split, not in decoded text) and return its id; the
    model's embeddings grow for it as they do for the chat tokens."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([_added(IMAGE_TOKEN, special=True)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def use_vicuna_v1(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make a tokenizer speak Vicuna v1 (Hermes 2 Vision): its template is the one chat template, ``</s>``
    is EOS so generation stops where answers end, and the pad token is kept off it (LLaVA pads v1 with
    UNK): masking pad labels would otherwise never train the stop."""
    tokenizer.chat_template = template_source(VICUNA_TEMPLATE)
    tokenizer.eos_token = VICUNA_EOS
    if tokenizer.pad_token in (None, VICUNA_EOS):
        tokenizer.pad_token = tokenizer.unk_token or _add_fallback_pad(tokenizer)


def padded_rows(tokens: int, multiple: int) -> int:
    """Embedding rows for ``tokens`` tokens, rounded up to ``multiple`` (fast matmuls want round shapes):
    the one rule by which tokenizer preparation, training, merging and the tiny models size embeddings."""
    return -(-tokens // multiple) * multiple


def _added(token: str, special: bool) -> AddedToken:
    return AddedToken(token, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False)


def _choose_pad(tokenizer: PreTrainedTokenizerBase, old_eos: str | None) -> str:
    """Keep an existing pad token; else reuse the base model's old EOS, its UNK, or add ``<|pad|>``."""
    for candidate in (tokenizer.pad_token, old_eos, tokenizer.unk_token):
        if candidate and candidate != IM_END:
            return candidate
    return _add_fallback_pad(tokenizer)


def _add_fallback_pad(tokenizer: PreTrainedTokenizerBase) -> str:
    tokenizer.add_tokens([_added(FALLBACK_PAD, special=True)], special_tokens=True)
    return FALLBACK_PAD


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    """Save a tokenizer so that every consumer finds the chat tokens and the templates.

    The templates go into tokenizer_config.json as a named list, the way Hermes 2 Pro ships them (newer
    transformers would write separate .jinja files that older readers miss). transformers 5 also stops
    writing ``added_tokens_decoder`` and ``add_bos_token``; llama.cpp's converter reads added tokens of a
    SentencePiece vocabulary only from there, so without them a GGUF would lose ``<|im_end|>``.
    """
    out_dir = Path(out_dir)
    # Template files left by an earlier save (a Trainer checkpoint) would shadow the named list.
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    shutil.rmtree(out_dir / "additional_chat_templates", ignore_errors=True)
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
    _keep_sentencepiece_model(tokenizer, out_dir)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {
        str(index): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for index, token in sorted(tokenizer.added_tokens_decoder.items())
    }
    probe = tokenizer("a")["input_ids"]
    config["add_bos_token"] = tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
    config["add_eos_token"] = tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id
    config_path.write_text(
        json.dumps(config, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8"
    )


def _keep_sentencepiece_model(tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """Copy the SentencePiece model along: transformers 5 no longer writes it, and llama.cpp's converter
    needs it to give the GGUF one token per embedding row (padding the vocabulary to the model's size)."""
    source = getattr(tokenizer, "vocab_file", None)
    if source and Path(source).name == "tokenizer.model" and Path(source).is_file():
        target = out_dir / "tokenizer.model"
        if not target.exists() or not target.samefile(source):
            shutil.copyfile(source, target)
