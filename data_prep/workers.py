"""The prep work done in worker processes: convert, check, decontaminate, render and tokenize records.

This module is what a spawned worker imports, so it stays clear of torch: tokenizing needs only the Rust
tokenizer and the BOS text, which a plain ``PreTrainedTokenizerFast`` gives, while ``AutoTokenizer`` would
import torch (~0.2 GB a process) to pick the model's tokenizer class. The main process checks that the plain
load is exactly the tokenizer it prepared (``plain_tokenizer_matches``); only when it is not do the workers
load it through ``AutoTokenizer``, as they used to.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from hermes_pipeline.data_prep import sources
from hermes_pipeline.data_prep.mixture import Decontaminator
from hermes_pipeline.data_prep.tokenize import (
    ImageTokens,
    render_dpo,
    render_sft,
    tokenize_dpo,
    tokenize_rendered,
)
from hermes_pipeline.readers import Record
from hermes_pipeline.recipe.schema import DataSource, Recipe
from hermes_pipeline.rows import Reject


@dataclass(frozen=True)
class Outcome:
    """What a worker made of one record: a reason to reject it, or the row and its token columns."""

    index: int
    row_id: str
    reason: str | None = None
    row: dict[str, Any] | None = None
    columns: dict[str, list[int]] | None = None


_WORKER: dict[str, Any] = {}


def plain_tokenizer_matches(tokenizer: PreTrainedTokenizerBase, folder: Path) -> bool:
    """Whether the tokenizer saved in ``folder``, loaded without its model class, tokenizes exactly as
    ``tokenizer``: the same Rust tokenizer (normalizer, pre-tokenizer, model, added tokens) and BOS text."""
    plain = PreTrainedTokenizerFast.from_pretrained(str(folder))
    same_backend = plain.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    return same_backend and plain.bos_token == tokenizer.bos_token


def init_worker(
    tokenizer_dir: str, plain: bool, recipe: Recipe, decontaminator: Decontaminator, image: ImageTokens | None
) -> None:
    if plain:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    else:
        from transformers import AutoTokenizer  # imports torch: only for tokenizers the plain load changes

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.model_max_length = sys.maxsize  # lengths are checked here, per row, with a reason
    _WORKER.update(
        tokenizer=tokenizer,
        template=recipe.tokenizer.template,
        max_seq_len=recipe.data.max_seq_len,
        truncate=recipe.data.overlong == "truncate",
        decontaminator=decontaminator,
        image=image,
    )


def process_batch(source: DataSource, records: list[Record]) -> list[Outcome]:
    """Convert, check, decontaminate, render and tokenize a batch of records from one source."""
    tokenizer: PreTrainedTokenizerBase = _WORKER["tokenizer"]
    outcomes: dict[int, Outcome] = {}
    kept: list[tuple[Record, str, dict[str, Any]]] = []
    for record in records:
        if record.data is None:
            outcomes[record.index] = Outcome(record.index, f"{source.name}:{record.index}", record.error)
            continue
        row_id = sources.row_id(record.data, record.index, source.name)
        try:
            row = sources.convert(record.data, row_id, source)
        except Reject as reject:
            outcomes[record.index] = Outcome(record.index, row_id, str(reject))
            continue
        if (reason := _WORKER["decontaminator"].match(row)) is not None:
            outcomes[record.index] = Outcome(record.index, row_id, reason)
            continue
        kept.append((record, row_id, row))
    if source.used_by == "dpo":
        tokenize = _tokenize_dpo
    else:  # projector pre-training renders LLaVA's stage-1 `plain` format, whatever the chat template
        tokenize = partial(
            _tokenize_sft, template="plain" if source.used_by == "projector" else _WORKER["template"]
        )
    for (record, row_id, row), result in zip(kept, tokenize(tokenizer, [r for _, _, r in kept]), strict=True):
        if isinstance(result, Reject):
            outcomes[record.index] = Outcome(record.index, row_id, str(result))
        else:
            outcomes[record.index] = Outcome(record.index, row_id, row=row, columns=result)
    return [outcomes[record.index] for record in records]


def _tokenize_sft(tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], template: str) -> list[Any]:
    rendered: list[Any] = []
    for row in rows:
        try:
            rendered.append(render_sft(row, template, tokenizer.bos_token or ""))
        except Reject as reject:
            rendered.append(reject)
    ok = [r for r in rendered if not isinstance(r, Reject)]
    tokenized = iter(
        tokenize_rendered(tokenizer, ok, _WORKER["max_seq_len"], _WORKER["truncate"], _WORKER["image"])
        if ok
        else []
    )
    results: list[Any] = []
    for r in rendered:
        if isinstance(r, Reject):
            results.append(r)
            continue
        t = next(tokenized)
        results.append(t if isinstance(t, Reject) else {"input_ids": t.input_ids, "labels": t.labels})
    return results


def _tokenize_dpo(tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]]) -> list[Any]:
    results: list[Any] = []
    for row in rows:
        try:
            texts = render_dpo(row, _WORKER["template"], tokenizer.bos_token or "")
        except Reject as reject:
            results.append(reject)
            continue
        columns = tokenize_dpo(tokenizer, *texts)
        longest = max(len(columns["chosen_input_ids"]), len(columns["rejected_input_ids"]))
        if len(columns["prompt_input_ids"]) + longest > _WORKER["max_seq_len"]:
            results.append(Reject("too long"))
            continue
        results.append(columns)
    return results
