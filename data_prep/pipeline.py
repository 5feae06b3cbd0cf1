"""The prep stage, top to bottom: sources -> canonical rows -> mixture -> tokens and labels -> shuffled shards.

Rows stream through: a reader yields raw records, worker processes convert, check, decontaminate, render and
tokenize them in batches, and the main process makes the decisions that need the whole picture (exact
duplicates across sources, row caps, weights, the train/validation split) and spools the survivors to
Parquet. A final pass shuffles the spool into shards with the recipe seed. Every record read is either
written or rejected with a reason, per source: rows in = rows out + rejects.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from hermes_pipeline.chat_format.tokens import prepare_tokenizer, save_tokenizer
from hermes_pipeline.data_prep import sources
from hermes_pipeline.data_prep.mixture import Decontaminator, dedup_key, eval_prompts, unit_interval
from hermes_pipeline.data_prep.tokenize import (
    IGNORE_INDEX,
    render_dpo,
    render_sft,
    tokenize_dpo,
    tokenize_rendered,
)
from hermes_pipeline.errors import UserError
from hermes_pipeline.readers import Record, iter_records
from hermes_pipeline.recipe.loader import check_prep_paths, recipe_hash
from hermes_pipeline.recipe.schema import DataSource, Recipe
from hermes_pipeline.rows import Reject
from hermes_pipeline.rundir import (
    file_fingerprint,
    stage_dir,
    write_resolved_recipe,
)
from hermes_pipeline.stages import run_stage

BATCH_ROWS = 256
ROWS_PER_SHARD = 20_000  # ~100-200 MB of tokens: a bucket this size is shuffled in memory
SPOOL_FLUSH_ROWS = 1_000
TOKENS = pa.list_(pa.int32())
SCHEMAS = {
    "sft": ("input_ids", "labels"),
    "projector": ("input_ids", "labels"),
    "dpo": ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"),
}


@dataclass
class SourceStats:
    kind: str
    path: str
    rows_in: int = 0
    rows_out: int = 0
    repeats: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    splits: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": self.path,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rejected": sum(self.rejects.values()),
            "rejects_by_reason": dict(self.rejects.most_common()),
            "repeats_added": self.repeats,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "rows_by_split": dict(self.splits),
        }


@dataclass(frozen=True)
class Outcome:
    """What a worker made of one record: a reason to reject it, or the row and its token columns."""

    index: int
    row_id: str
    reason: str | None = None
    row: dict[str, Any] | None = None
    columns: dict[str, list[int]] | None = None


# --- worker side ---------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_dir: str, recipe: Recipe, decontaminator: Decontaminator) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.model_max_length = sys.maxsize  # lengths are checked here, per row, with a reason
    _WORKER.update(
        tokenizer=tokenizer,
        template=recipe.tokenizer.template,
        max_seq_len=recipe.data.max_seq_len,
        truncate=recipe.data.overlong == "truncate",
        decontaminator=decontaminator,
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
    tokenize = _tokenize_dpo if source.used_by == "dpo" else _tokenize_sft
    for (record, row_id, row), result in zip(kept, tokenize(tokenizer, [r for _, _, r in kept]), strict=True):
        if isinstance(result, Reject):
            outcomes[record.index] = Outcome(record.index, row_id, str(result))
        else:
            outcomes[record.index] = Outcome(record.index, row_id, row=row, columns=result)
    return [outcomes[record.index] for record in records]


def _tokenize_sft(tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]]) -> list[Any]:
    rendered: list[Any] = []
    for row in rows:
        try:
            rendered.append(render_sft(row, _WORKER["template"], tokenizer.bos_token or ""))
        except Reject as reject:
            rendered.append(reject)
    ok = [r for r in rendered if not isinstance(r, Reject)]
    tokenized = iter(
        tokenize_rendered(tokenizer, ok, _WORKER["max_seq_len"], _WORKER["truncate"]) if ok else []
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


# --- main process --------------------------------------------------------------------------------------


def load_tokenizer(recipe: Recipe) -> PreTrainedTokenizerBase:
    """The recipe's tokenizer, prepared for the Hermes format when the recipe asks for it."""
    name = recipe.tokenizer.name_or_path or recipe.model.name_or_path
    assert name is not None, "validation requires a tokenizer for a model built from config"
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"tokenizer {name}: cannot load ({str(exc).splitlines()[0]})") from None
    if recipe.tokenizer.add_chat_tokens:
        prepare_tokenizer(tokenizer, pad_to_multiple_of=recipe.tokenizer.pad_embeddings_to_multiple_of)
    return tokenizer


def eval_sets(recipe: Recipe) -> list[str]:
    """Every evaluation set the training data must stay clear of."""
    sets = list(recipe.data.decontaminate.eval_sets)
    if recipe.eval.enabled:
        if "function_calling" in recipe.eval.suites:
            sets += recipe.eval.function_calling_sets
        if "json_mode" in recipe.eval.suites:
            sets.append(recipe.eval.json_mode_set)
    return list(dict.fromkeys(sets))


def build_decontaminator(recipe: Recipe) -> tuple[Decontaminator, dict[str, int]]:
    decontaminator = Decontaminator(recipe.data.decontaminate.ngram)
    counts: dict[str, int] = {}
    if recipe.data.decontaminate.enabled:
        for path in eval_sets(recipe):
            name = Path(path).name if Path(path).exists() else path
            prompts = (p for r in iter_records(path) if r.data for p in eval_prompts(r.data))
            counts[name] = decontaminator.add(name, prompts)
    return decontaminator, counts


def input_fingerprints(recipe: Recipe) -> dict[str, str]:
    """Local inputs by content hash; Hub inputs by id (their revision is the Hub's business)."""
    paths = {f"source:{s.name}": s.path for s in recipe.data.sources}
    paths["tokenizer"] = recipe.tokenizer.name_or_path or recipe.model.name_or_path or ""
    paths |= {f"eval:{p}": p for p in eval_sets(recipe)}
    return {key: (file_fingerprint(p) if Path(p).exists() else f"hub:{p}") for key, p in paths.items()}


def run_prep(recipe: Recipe, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Run the prep stage into the run directory; skip it when a finished run matches recipe and inputs."""
    check_prep_paths(recipe)
    out = stage_dir(recipe, "prep")
    started = time.time()

    def prep(work: Path) -> dict[str, Any]:
        write_resolved_recipe(recipe, recipe_hash(recipe))
        tokenizer = load_tokenizer(recipe)
        save_tokenizer(tokenizer, work / "tokenizer")
        decontaminator, eval_counts = build_decontaminator(recipe)
        spool = Spool(work / "spool")
        stats: dict[str, SourceStats] = {}
        with (
            (work / "rejects.jsonl").open("w", encoding="utf-8") as rejects,
            WorkerPool(recipe, work, decontaminator) as run,
        ):
            seen: dict[int, str] = {}
            for position, source in enumerate(recipe.data.sources):
                log(f"prep: {source.name} ({source.kind}) from {source.path}")
                try:
                    stats[source.name] = _prep_source(recipe, source, run, spool, seen, rejects)
                except UserError as exc:
                    raise UserError(f"data.sources[{position}].path: {exc}") from None
        outputs = spool.shuffle_into_shards(work, recipe.seed)
        shutil.rmtree(work / "spool")
        report = _report(recipe, stats, outputs, eval_counts, spool.lengths)
        (work / "prep_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        log(_summary(report, out, time.time() - started))
        return {"rows": report["totals"]}

    run_stage(recipe, "prep", out, input_fingerprints(recipe), prep, force, log)
    return out


def _prep_source(
    recipe: Recipe,
    source: DataSource,
    run: Callable[[DataSource, list[Record]], Iterator[list[Outcome]]],
    spool: Spool,
    seen: dict[int, str],
    rejects: Any,
) -> SourceStats:
    stats = SourceStats(source.kind, source.path)
    records = iter_records(source.path, config_name=source.config_name, split=source.split)
    for outcomes in run(source, records):
        for outcome in outcomes:
            if source.max_rows is not None and stats.rows_out >= source.max_rows:
                return stats
            stats.rows_in += 1
            reason = outcome.reason or _mixture_reason(recipe, source, outcome, seen)
            if reason is not None:
                stats.rejects[reason] += 1
                rejects.write(
                    json.dumps(
                        {
                            "source": source.name,
                            "id": outcome.row_id,
                            "index": outcome.index,
                            "reason": reason,
                        }
                    )
                    + "\n"
                )
                continue
            _keep(recipe, source, outcome, stats, spool)
    return stats


def _mixture_reason(recipe: Recipe, source: DataSource, outcome: Outcome, seen: dict[int, str]) -> str | None:
    assert outcome.row is not None
    if recipe.data.dedup:
        key = dedup_key(outcome.row)
        if key in seen:
            return f"duplicate of a row in {seen[key]}"
        seen[key] = source.name
    if _copies(recipe.seed, source, outcome.row_id) == 0:
        return "sampled out by weight"
    return None


def _copies(seed: int, source: DataSource, row_id: str) -> int:
    """How many times a row is written: weight 0.3 keeps ~30% of rows, weight 2.5 writes each 2 or 3 times."""
    whole, fraction = divmod(source.weight, 1)
    return int(whole) + (unit_interval(seed, "weight", source.name, row_id) < fraction)


def _keep(recipe: Recipe, source: DataSource, outcome: Outcome, stats: SourceStats, spool: Spool) -> None:
    assert outcome.columns is not None and outcome.row is not None
    split = (
        "val" if unit_interval(recipe.seed, "split", outcome.row_id) < recipe.data.val_fraction else "train"
    )
    copies = _copies(recipe.seed, source, outcome.row_id)
    for copy in range(copies):
        spool.add(source.used_by, split, outcome, copy)
    stats.rows_out += 1
    stats.repeats += copies - 1
    stats.splits[split] += 1
    columns = outcome.columns
    stats.tokens += sum(len(v) for k, v in columns.items() if k != "labels")
    if "labels" in columns:
        stats.trained_tokens += sum(1 for t in columns["labels"] if t != IGNORE_INDEX)
    else:
        stats.trained_tokens += len(columns["chosen_input_ids"]) + len(columns["rejected_input_ids"])


class WorkerPool:
    """Map batches of records to outcomes in order, in worker processes, with a bounded number in flight.

    Pool.imap would read the whole source ahead of the workers; a window keeps memory flat on a 1M-row file.
    """

    def __init__(self, recipe: Recipe, work: Path, decontaminator: Decontaminator) -> None:
        self.args = (str(work / "tokenizer"), recipe, decontaminator)
        self.processes = recipe.data.num_proc
        self.pool: Any = None

    def __enter__(self) -> Callable[[DataSource, Iterable[Record]], Iterator[list[Outcome]]]:
        if self.processes > 1:
            self.pool = multiprocessing.get_context("spawn").Pool(self.processes, _init_worker, self.args)
        else:
            _init_worker(*self.args)
        return self.run

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def run(self, source: DataSource, records: Iterable[Record]) -> Iterator[list[Outcome]]:
        batches = _batched(records, BATCH_ROWS)
        if self.pool is None:
            yield from (process_batch(source, batch) for batch in batches)
            return
        pending: deque[Any] = deque()
        for batch in batches:
            pending.append(self.pool.apply_async(process_batch, (source, batch)))
            if len(pending) >= 2 * self.processes:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _batched(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Spool:
    """Rows in arrival order, one Parquet file per (stage, split), before the shuffle."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True)
        self.writers: dict[tuple[str, str], pq.ParquetWriter] = {}
        self.buffers: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.counts: Counter[tuple[str, str]] = Counter()
        self.lengths: dict[str, list[int]] = {}

    def add(self, stage: str, split: str, outcome: Outcome, copy: int) -> None:
        assert outcome.columns is not None
        record = {
            "id": outcome.row_id,
            "source": outcome.row["source"] if outcome.row else "",
            "copy": copy,
            "row": json.dumps(outcome.row, ensure_ascii=False),
            **outcome.columns,
            "num_tokens": sum(len(v) for k, v in outcome.columns.items() if k != "labels"),
        }
        key = (stage, split)
        self.buffers.setdefault(key, []).append(record)
        self.counts[key] += 1
        if copy == 0:
            self.lengths.setdefault(stage, []).append(record["num_tokens"])
        if len(self.buffers[key]) >= SPOOL_FLUSH_ROWS:
            self._flush(key)

    def _flush(self, key: tuple[str, str]) -> None:
        rows = self.buffers.pop(key, [])
        if not rows:
            return
        table = pa.Table.from_pylist(rows, schema=_schema(key[0]))
        if key not in self.writers:
            self.writers[key] = pq.ParquetWriter(self.folder / f"{key[0]}-{key[1]}.parquet", table.schema)
        self.writers[key].write_table(table)

    def shuffle_into_shards(self, out: Path, seed: int) -> dict[str, dict[str, Any]]:
        """Shuffle each spool with the seed into shards of at most ROWS_PER_SHARD rows.

        Rows first go to a seeded random bucket per shard (streamed, one pass), then each bucket, small
        enough for memory, is permuted and written. The result does not depend on worker count or timing.
        """
        for key in list(self.buffers):
            self._flush(key)
        for writer in self.writers.values():
            writer.close()
        outputs: dict[str, dict[str, Any]] = {}
        rng = np.random.default_rng(seed)
        for (stage, split), count in sorted(self.counts.items()):
            shards = max(1, math.ceil(count / ROWS_PER_SHARD))
            spool = pq.ParquetFile(self.folder / f"{stage}-{split}.parquet")
            _distribute(spool, [self.folder / f"bucket-{i}.parquet" for i in range(shards)], rng)
            (out / stage).mkdir(exist_ok=True)
            names = []
            for i in range(shards):
                name = f"{split}-{i:05d}-of-{shards:05d}.parquet"
                _write_permuted(self.folder / f"bucket-{i}.parquet", out / stage / name, rng)
                names.append(f"{stage}/{name}")
            outputs.setdefault(stage, {})[split] = {"rows": count, "shards": names}
        return outputs


def _distribute(spool: pq.ParquetFile, buckets: list[Path], rng: np.random.Generator) -> None:
    """Send every spooled row to a seeded random bucket, writing each bucket in full-size row groups.

    Writing each small slice as it comes would make tens of thousands of tiny row groups, whose metadata
    the writers keep until closed: that, not the rows, is what grows with the input.
    """
    writers = [pq.ParquetWriter(path, spool.schema_arrow) for path in buckets]
    pending: list[list[pa.RecordBatch]] = [[] for _ in buckets]
    for batch in spool.iter_batches(batch_size=SPOOL_FLUSH_ROWS):
        assignment = rng.integers(0, len(buckets), size=batch.num_rows)
        for i, waiting in enumerate(pending):
            waiting.append(batch.filter(pa.array(assignment == i)))
            if sum(b.num_rows for b in waiting) >= SPOOL_FLUSH_ROWS:
                writers[i].write_table(pa.Table.from_batches(waiting).combine_chunks())
                waiting.clear()
    for writer, waiting in zip(writers, pending, strict=True):
        if waiting:
            writer.write_table(pa.Table.from_batches(waiting).combine_chunks())
        writer.close()


def _write_permuted(bucket: Path, shard: Path, rng: np.random.Generator) -> None:
    """Write a bucket's rows in a seeded random order, a slice at a time so that only the bucket itself,
    not a permuted copy of it, is held in memory."""
    table = pq.read_table(bucket)
    order = rng.permutation(table.num_rows)
    with pq.ParquetWriter(shard, table.schema) as writer:
        for start in range(0, table.num_rows, SPOOL_FLUSH_ROWS):
            writer.write_table(table.take(order[start : start + SPOOL_FLUSH_ROWS]))
    del table
    bucket.unlink()
    pa.default_memory_pool().release_unused()


def _schema(stage: str) -> pa.Schema:
    fields = [("id", pa.string()), ("source", pa.string()), ("copy", pa.int16()), ("row", pa.string())]
    fields += [(name, TOKENS) for name in SCHEMAS[stage]]
    fields.append(("num_tokens", pa.int32()))
    return pa.schema(fields)


def _percentiles(lengths: list[int]) -> dict[str, int]:
    if not lengths:
        return {}
    values = np.percentile(np.asarray(lengths), [50, 90, 95, 99, 100])
    return {name: int(v) for name, v in zip(("p50", "p90", "p95", "p99", "max"), values, strict=True)}


def _report(
    recipe: Recipe,
    stats: dict[str, SourceStats],
    outputs: dict[str, dict[str, Any]],
    eval_counts: dict[str, int],
    lengths: dict[str, list[int]],
) -> dict[str, Any]:
    per_source = {name: s.as_dict() for name, s in stats.items()}
    totals = {
        key: sum(s[key] for s in per_source.values())
        for key in ("rows_in", "rows_out", "rejected", "repeats_added", "tokens", "trained_tokens")
    }
    return {
        "recipe": recipe.name,
        "seed": recipe.seed,
        "max_seq_len": recipe.data.max_seq_len,
        "sources": per_source,
        "totals": totals,
        "token_lengths": {stage: _percentiles(values) for stage, values in lengths.items()},
        "decontamination": {"ngram": recipe.data.decontaminate.ngram, "eval_prompts": eval_counts},
        "outputs": outputs,
    }


def _summary(report: dict[str, Any], out: Path, seconds: float) -> str:
    t = report["totals"]
    return (
        f"prep: {t['rows_in']:,} rows in, {t['rows_out']:,} out, {t['rejected']:,} rejected "
        f"({t['tokens']:,} tokens, {t['trained_tokens']:,} trained) in {seconds:.1f}s -> {out}"
    )
