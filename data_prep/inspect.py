"""Show prepared rows as text with the trained spans marked, for a human to check the masks."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from hermes_pipeline.data_prep.tokenize import IGNORE_INDEX

OPEN, CLOSE = "\x1b[42m\x1b[30m", "\x1b[0m"
PLAIN_OPEN, PLAIN_CLOSE = "«", "»"


def inspect_rows(prep_dir: Path, count: int, color: bool = False) -> str:
    """The first ``count`` training rows of each stage, decoded, trained text between markers."""
    tokenizer = AutoTokenizer.from_pretrained(prep_dir / "tokenizer")
    marks = (OPEN, CLOSE) if color else (PLAIN_OPEN, PLAIN_CLOSE)
    blocks = [f"trained spans are marked {marks[0]}like this{marks[1]}"]
    for stage_dir in sorted(p for p in prep_dir.iterdir() if p.is_dir() and p.name != "tokenizer"):
        shards = sorted(stage_dir.glob("train-*.parquet"))
        if not shards:
            continue
        table = pq.read_table(shards[0]).slice(0, count)
        for row in table.to_pylist():
            header = f"=== {stage_dir.name} | {row['source']} | {row['id']} | {row['num_tokens']} tokens"
            if "labels" in row:
                body = _marked(tokenizer, row["input_ids"], row["labels"], marks)
            else:
                body = "\n".join(
                    f"--- {part}\n"
                    + _marked(
                        tokenizer,
                        row[f"{part}_input_ids"],
                        None if part == "prompt" else row[f"{part}_input_ids"],
                        marks,
                    )
                    for part in ("prompt", "chosen", "rejected")
                )
            blocks.append(f"{header}\n{body}")
    return "\n".join(blocks)


def _marked(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int] | None, marks: tuple[str, str]
) -> str:
    """Decode token by token so that each token's text can be wrapped; runs of trained tokens share markers."""
    pieces = _token_texts(tokenizer, ids)
    out, inside = [], False
    for piece, label in zip(pieces, labels or [IGNORE_INDEX] * len(ids), strict=True):
        trained = label != IGNORE_INDEX
        if trained != inside:
            out.append(marks[0] if trained else marks[1])
            inside = trained
        out.append(piece)
    if inside:
        out.append(marks[1])
    return "".join(out)


def _token_texts(tokenizer: PreTrainedTokenizerBase, ids: list[int], context: int = 8) -> list[str]:
    """Each token's share of the decoded text: what it adds to the decoding of the few tokens before it.

    Decoding tokens one at a time would lose SentencePiece's word-initial spaces; a short window of
    context keeps them while staying linear in the row length.
    """
    texts = []
    for end in range(1, len(ids) + 1):
        start = max(0, end - context)
        before = tokenizer.decode(ids[start : end - 1], skip_special_tokens=False)
        texts.append(tokenizer.decode(ids[start:end], skip_special_tokens=False)[len(before) :])
    return texts
