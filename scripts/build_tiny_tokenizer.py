"""Build the tiny tokenizer and the tiny model configs from our own corpus in scripts/tiny_corpus/.

Trains a SentencePiece BPE model with Mistral's settings (byte fallback, digits split one by one, no
normalization, a dummy prefix, <unk>=0 <s>=1 </s>=2), converts it to a transformers Llama tokenizer,
prepares it for the Hermes format and saves it together with its tokenizer.model, which llama.cpp's
converter reads for SentencePiece vocabularies. Then writes the config.json of the tiny Mistral and
Llama models that fit it. Every output is byte-identical from one run to the next:

    python scripts/build_tiny_tokenizer.py [--out-dir DIR] [--config-dir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import sentencepiece as spm
from transformers import PreTrainedTokenizerBase

from hermes_pipeline.chat_format.tokens import prepare_tokenizer, save_tokenizer
from hermes_pipeline.tiny import (
    TINY_TOKENIZER_DIR,
    Arch,
    llama_tokenizer_from_sentencepiece,
    tiny_model_config,
)

ROOT = Path(__file__).resolve().parents[1]
CORPUS_DIR = Path(__file__).resolve().parent / "tiny_corpus"
DEFAULT_CONFIG_DIR = ROOT / "configs" / "models"
ARCHS: tuple[Arch, ...] = ("mistral", "llama")
SEED = 0
# Mistral-7B's trainer settings, scaled down. The coverage below 1 leaves the rarest characters out of the
# vocabulary so that byte fallback is exercised; one thread and a fixed seed make training reproducible.
TRAINER_OPTIONS: dict[str, object] = {
    "model_type": "bpe",
    "vocab_size": 1500,
    "character_coverage": 0.9995,
    "byte_fallback": True,
    "split_digits": True,
    "allow_whitespace_only_pieces": True,
    "remove_extra_whitespaces": False,
    "normalization_rule_name": "identity",
    "add_dummy_prefix": True,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "num_threads": 1,
    "minloglevel": 2,
}


def corpus_lines(corpus_dir: Path = CORPUS_DIR) -> list[str]:
    """The non-empty lines of every corpus file, in a fixed order. SentencePiece trains on lines."""
    return [
        line
        for path in sorted(corpus_dir.glob("*.txt"))
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def train_sentencepiece(lines: list[str], seed: int = SEED) -> bytes:
    """The serialized SentencePiece model. Trained from memory so that no file path ends up inside it."""
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **TRAINER_OPTIONS)
    return model.getvalue()


def build_tokenizer(out_dir: Path) -> PreTrainedTokenizerBase:
    """Train, convert, prepare and save the tokenizer into ``out_dir``, tokenizer.model included.

    transformers 5 saves only tokenizer.json and tokenizer_config.json, so the SentencePiece model is
    written by hand next to them.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model_file = out_dir / "tokenizer.model"
    model_file.write_bytes(train_sentencepiece(corpus_lines()))
    tokenizer = llama_tokenizer_from_sentencepiece(model_file)
    prepare_tokenizer(tokenizer)
    save_tokenizer(tokenizer, out_dir)
    return tokenizer


def write_model_configs(tokenizer: PreTrainedTokenizerBase, config_dir: Path) -> None:
    """Write ``tiny-<arch>.json`` (a model's config.json) for every architecture, sized for ``tokenizer``.

    Without transformers' version stamp, which would make the rebuild differ on every transformers release."""
    config_dir.mkdir(parents=True, exist_ok=True)
    for arch in ARCHS:
        config = tiny_model_config(arch, tokenizer=tokenizer).to_diff_dict()
        config.pop("transformers_version", None)
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        (config_dir / f"tiny-{arch}.json").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", type=Path, default=TINY_TOKENIZER_DIR, help="tokenizer folder")
    parser.add_argument("--config-dir", type=Path, default=DEFAULT_CONFIG_DIR, help="model config folder")
    args = parser.parse_args(argv)
    tokenizer = build_tokenizer(args.out_dir)
    write_model_configs(tokenizer, args.config_dir)
    print(f"wrote the tiny tokenizer to {args.out_dir} and the tiny model configs to {args.config_dir}")


if __name__ == "__main__":
    main()
