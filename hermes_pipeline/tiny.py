"""A tiny Mistral-style tokenizer and tiny models, so every stage can run end to end on a CPU in seconds.

The tokenizer is a SentencePiece BPE model with byte fallback (like Mistral's and Llama 2's) trained on our
own small corpus by ``scripts/build_tiny_tokenizer.py``, then prepared for the Hermes format exactly like a
real base tokenizer. The model shapes are the smallest that still exercise grouped-query attention and
llama.cpp's K-quants (which need every weight row to be a multiple of 256 long).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from tokenizers.models import BPE
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaTokenizer,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.convert_slow_tokenizer import SentencePieceExtractor

from hermes_pipeline.chat_format.tokens import IM_END, padded_rows

Arch = Literal["mistral", "llama"]

# Package data (see pyproject's package-data), so it also ships inside an installed wheel.
TINY_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tiny_tokenizer"
TINY_CONTEXT_LENGTH = 2048
EMBEDDING_MULTIPLE = 64
_CONFIG_CLASSES: dict[str, tuple[type[PretrainedConfig], str]] = {
    "mistral": (MistralConfig, "MistralForCausalLM"),
    "llama": (LlamaConfig, "LlamaForCausalLM"),
}


def llama_tokenizer_from_sentencepiece(model_file: str | Path) -> LlamaTokenizer:
    """Convert a SentencePiece ``.model`` into a transformers Llama tokenizer, the way Mistral ships it.

    These are the two steps ``LlamaTokenizer.from_pretrained`` takes for a folder that holds only a
    ``tokenizer.model``; calling them directly keeps loader bookkeeping (``is_local`` and the like) out of
    the saved ``tokenizer_config.json``. The result is a byte-fallback BPE whose ids match SentencePiece's.
    ``legacy=False`` so that no spurious ``▁`` is inserted after ``<|im_start|>`` and other added tokens.
    """
    pieces = SentencePieceExtractor(str(model_file)).extract(BPE)
    return LlamaTokenizer(
        vocab=pieces["vocab"],
        merges=pieces["merges"],
        legacy=False,
        add_bos_token=True,
        model_max_length=TINY_CONTEXT_LENGTH,
    )


def load_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """The shipped tiny tokenizer, already prepared for the Hermes format. A fresh copy on every call."""
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)


def tiny_model_config(
    arch: Arch = "mistral", *, tokenizer: PreTrainedTokenizerBase | None = None, **overrides: object
) -> PretrainedConfig:
    """The config of a tiny ``arch`` model that fits ``tokenizer`` (by default the shipped tiny one).

    The vocabulary is rounded up to a multiple of 64 like ``prepare_tokenizer`` grows real models, and EOS
    is ``<|im_end|>`` so that generation stops at the end of a turn. ``overrides`` replace any field.
    """
    if arch not in _CONFIG_CLASSES:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(_CONFIG_CLASSES)}")
    if tokenizer is None:
        tokenizer = load_tiny_tokenizer()
    if tokenizer.eos_token != IM_END:
        raise ValueError(f"the tokenizer's EOS is {tokenizer.eos_token!r}; run prepare_tokenizer on it first")
    config_class, architecture = _CONFIG_CLASSES[arch]
    fields: dict[str, object] = {
        "architectures": [architecture],
        "vocab_size": padded_rows(len(tokenizer), EMBEDDING_MULTIPLE),
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": TINY_CONTEXT_LENGTH,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    return config_class(**(fields | overrides))


def build_tiny_model(
    arch: Arch = "mistral", seed: int = 0, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """A randomly initialised tiny model; the same seed always gives the same weights.

    The seed is applied inside a forked RNG so that building a model leaves the caller's random state alone.
    """
    config = tiny_model_config(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model
