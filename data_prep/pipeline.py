"""The prep stage, top to bottom: sources -> canonical rows -> mixture -> tokens and labels -> shuffled shards.

Rows stream through: a reader yields raw records, worker processes convert, check, decontaminate, render and
tokenize them in batches, and the main process makes the decisions that need the whole picture (exact
duplicates across sources, row caps, weights, the train/validation split) and spools the survivors to
disk, each filed by a seeded hash of its id, so that the final pass shuffles one shard's worth of rows at
a time (``Spool``). Every record read is either written or rejected with a reason, per source: rows in =
rows out + rejects.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import shutil
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

from hermes_pipeline.chat_format.tokens import (
    IMAGE_TOKEN,
    add_image_token,
    prepare_tokenizer,
    save_tokenizer,
    use_vicuna_v1,
)
from hermes_pipeline.data_prep.mixture import (
    Decontaminator,
    dedup_key,
    eval_prompts,
    seeded_hash,
    unit_interval,
)
from hermes_pipeline.data_prep.tokenize import IGNORE_INDEX, ImageTokens
from hermes_pipeline.data_prep.workers import Outcome, init_worker, plain_tokenizer_matches, process_batch
from hermes_pipeline.errors import UserError
from hermes_pipeline.readers import Record, iter_records
from hermes_pipeline.recipe.loader import check_prep_paths, recipe_hash
from hermes_pipeline.recipe.schema import DataSource, Recipe
from hermes_pipeline.rundir import (
    file_fingerprint,
    stage_dir,
    write_resolved_recipe,
)
from hermes_pipeline.stages import run_stage

BATCH_ROWS = 256
ROWS_PER_SHARD = 20_000  # ~100-200 MB of tokens: the most rows the final pass holds at once (Spool)
BUCKET_BITS = 6  # 64 spool buckets per (stage, split)
SPOOL_FLUSH_ROWS = 1_000
SPOOL_IPC = pa.ipc.IpcWriteOptions(compression="zstd")  # about a quarter of the raw size, for little time
FRAME_HEADER_BYTES = 8
SHUFFLE_KEY = "shuffle_key"
TOKENS = pa.list_(pa.int32())
SCHEMAS = {
    "sft": ("input_ids", "labels"),
    "projector": ("input_ids", "labels"),
    "dpo": ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"),
}
# Stages whose rows may carry images: their shards hold each row's image paths (empty for a text row), so
# that a Vision stage's collator loads them without parsing the row.
IMAGE_STAGES = ("sft", "projector")


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
    if recipe.tokenizer.template == "vicuna_v1":
        use_vicuna_v1(tokenizer)
    if recipe.vision is not None:
        add_image_token(tokenizer)
    return tokenizer


def image_tokens(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> ImageTokens | None:
    """A vision recipe's image placeholder and the tokens an image fills (none for a text recipe)."""
    if recipe.vision is None:
        return None
    # Imported here: LLaVA's and SigLIP's modules take seconds to import, which only a Vision recipe needs.
    from hermes_pipeline.vision import image_token_count, tower_config

    return ImageTokens(
        tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_token_count(tower_config(recipe.vision))
    )


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
    if recipe.vision is not None:  # its image and patch sizes say how many tokens an image fills
        paths["vision_tower"] = recipe.vision.tower_config or recipe.vision.tower or ""
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
        plain = plain_tokenizer_matches(tokenizer, work / "tokenizer")
        decontaminator, eval_counts = build_decontaminator(recipe)
        spool = Spool(work / "spool", recipe.seed)
        stats: dict[str, SourceStats] = {}
        with (
            (work / "rejects.jsonl").open("w", encoding="utf-8") as rejects,
            WorkerPool(recipe, work, decontaminator, plain, image_tokens(recipe, tokenizer)) as run,
        ):
            seen: dict[int, str] = {}
            for position, source in enumerate(recipe.data.sources):
                log(f"prep: {source.name} ({source.kind}) from {source.path}")
                try:
                    stats[source.name] = _prep_source(recipe, source, run, spool, seen, rejects)
                except UserError as exc:
                    raise UserError(f"data.sources[{position}].path: {exc}") from None
        outputs = spool.shuffle_into_shards(work)
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

    def __init__(
        self,
        recipe: Recipe,
        work: Path,
        decontaminator: Decontaminator,
        plain: bool,
        image: ImageTokens | None,
    ) -> None:
        self.args = (str(work / "tokenizer"), plain, recipe, decontaminator, image)
        self.processes = recipe.data.num_proc
        self.pool: Any = None

    def __enter__(self) -> Callable[[DataSource, Iterable[Record]], Iterator[list[Outcome]]]:
        if self.processes > 1:
            self.pool = multiprocessing.get_context("spawn").Pool(self.processes, init_worker, self.args)
        else:
            init_worker(*self.args)
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


@dataclass(frozen=True)
class Piece:
    """The rows of one spool bucket whose key, with the bucket's top bits masked off, lies in [low, high)."""

    bucket: int
    low: int
    high: int

    @property
    def whole(self) -> bool:
        return self.low == 0 and self.high == _bucket_width()


class Spool:
    """Kept rows filed into bucket files by a seeded hash as they arrive, then written as shuffled shards.

    Each row gets a 64-bit key when it is spooled: a hash of the recipe seed, its source, id and copy
    number. The key is the shuffle: read in name order, the shards hold the rows sorted by key. A key depends
    on the row alone, not on when it arrived, so the shards are the same whatever the number of workers.

    The key's top BUCKET_BITS bits pick the row's bucket file within its (stage, split). Rows wait in memory
    SPOOL_FLUSH_ROWS at a time per (stage, split); then each bucket's share is appended to its file as one
    Arrow IPC frame. A bucket file is open only for that append: no writer, row-group metadata or file
    descriptor is kept per bucket while rows stream.

    The number of shards follows from the rows counted per bucket (``_plan_shards``): consecutive buckets
    share a shard while together they hold at most ROWS_PER_SHARD rows, and a bucket holding more (from
    about 64 x ROWS_PER_SHARD rows in one split) is cut into equal key ranges of about ROWS_PER_SHARD rows,
    and read once per range. The final pass reads one shard's buckets, sorts them by key and writes them:
    it holds one shard at a time, so its memory is set by ROWS_PER_SHARD, not by the size of the input.
    """

    def __init__(self, folder: Path, seed: int) -> None:
        self.folder = folder
        self.seed = seed
        folder.mkdir(parents=True)
        self.buffers: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.buckets: dict[tuple[str, str], Counter[int]] = {}
        self.lengths: dict[str, list[int]] = {}

    def add(self, stage: str, split: str, outcome: Outcome, copy: int) -> None:
        assert outcome.columns is not None and outcome.row is not None
        source = outcome.row["source"]
        record = {
            "id": outcome.row_id,
            "source": source,
            "copy": copy,
            "row": json.dumps(outcome.row, ensure_ascii=False),
            **outcome.columns,
            **({"images": outcome.row.get("images", [])} if stage in IMAGE_STAGES else {}),
            "num_tokens": sum(len(v) for k, v in outcome.columns.items() if k != "labels"),
            SHUFFLE_KEY: seeded_hash(self.seed, "shuffle", source, outcome.row_id, copy),
        }
        key = (stage, split)
        buffer = self.buffers.setdefault(key, [])
        buffer.append(record)
        if copy == 0:
            self.lengths.setdefault(stage, []).append(record["num_tokens"])
        if len(buffer) >= SPOOL_FLUSH_ROWS:
            self._flush(key)

    def _flush(self, key: tuple[str, str]) -> None:
        """Append the waiting rows of a (stage, split) to their bucket files, one frame per bucket."""
        rows = self.buffers.pop(key, [])
        if not rows:
            return
        table = pa.Table.from_pylist(rows, schema=_spool_schema(key[0]))
        buckets = table[SHUFFLE_KEY].to_numpy() >> np.uint64(64 - BUCKET_BITS)
        order = np.argsort(buckets, kind="stable")
        table = table.take(order)
        found, starts, sizes = np.unique(buckets[order], return_index=True, return_counts=True)
        counts = self.buckets.setdefault(key, Counter())
        for bucket, start, size in zip(found.tolist(), starts.tolist(), sizes.tolist(), strict=True):
            _append_frame(self._path(key, bucket), table.slice(start, size))
            counts[bucket] += size

    def _path(self, key: tuple[str, str], bucket: int) -> Path:
        return self.folder / f"{key[0]}-{key[1]}-{bucket:05d}.arrows"

    def shuffle_into_shards(self, out: Path) -> dict[str, dict[str, Any]]:
        """Write each (stage, split) as shards of its rows sorted by key, one shard in memory at a time."""
        for key in list(self.buffers):
            self._flush(key)
        outputs: dict[str, dict[str, Any]] = {}
        for (stage, split), counts in sorted(self.buckets.items()):
            plan = _plan_shards(counts)
            (out / stage).mkdir(exist_ok=True)
            names = []
            for i, pieces in enumerate(plan):
                name = f"{split}-{i:05d}-of-{len(plan):05d}.parquet"
                paths = [self._path((stage, split), piece.bucket) for piece in pieces]
                _write_shard(list(zip(paths, pieces, strict=True)), out / stage / name, _schema(stage))
                for path, piece in zip(paths, pieces, strict=True):
                    if piece.high == _bucket_width():  # the bucket's last piece: its file is done with
                        path.unlink()
                names.append(f"{stage}/{name}")
            outputs.setdefault(stage, {})[split] = {"rows": counts.total(), "shards": names}
        return outputs


def _bucket_width() -> int:
    """How many keys one bucket spans."""
    return 1 << (64 - BUCKET_BITS)


def _plan_shards(counts: Counter[int]) -> list[list[Piece]]:
    """The shards of one (stage, split) in key order, each as the bucket pieces it is made of.

    Consecutive buckets go into one shard while their rows add up to at most ROWS_PER_SHARD; a bucket with
    more rows is cut into equal key ranges, one shard each, about ROWS_PER_SHARD rows apiece.
    """
    width = _bucket_width()
    shards: list[list[Piece]] = []
    size = ROWS_PER_SHARD  # full, so that the first bucket opens a shard
    for bucket in sorted(counts):
        rows = counts[bucket]
        if rows > ROWS_PER_SHARD:
            cuts = math.ceil(rows / ROWS_PER_SHARD)
            shards += [[Piece(bucket, width * i // cuts, width * (i + 1) // cuts)] for i in range(cuts)]
            size = ROWS_PER_SHARD
        elif size + rows > ROWS_PER_SHARD:
            shards.append([Piece(bucket, 0, width)])
            size = rows
        else:
            shards[-1].append(Piece(bucket, 0, width))
            size += rows
    return shards


def _append_frame(path: Path, table: pa.Table) -> None:
    """Append rows to a bucket file as one length-prefixed Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=SPOOL_IPC) as writer:
        writer.write_table(table)
    frame = sink.getvalue()
    with path.open("ab") as file:
        file.write(len(frame).to_bytes(FRAME_HEADER_BYTES, "little"))
        file.write(frame)


def _read_piece(path: Path, piece: Piece) -> Iterator[pa.Table]:
    """A piece's rows, frame by frame: a cut bucket is filtered as it is read, never held whole."""
    with path.open("rb") as file:
        while header := file.read(FRAME_HEADER_BYTES):
            frame = pa.ipc.open_stream(file.read(int.from_bytes(header, "little"))).read_all()
            if piece.whole:
                yield frame
                continue
            below = frame[SHUFFLE_KEY].to_numpy() & np.uint64(_bucket_width() - 1)
            yield frame.filter((below >= piece.low) & (below < piece.high))


def _write_shard(pieces: list[tuple[Path, Piece]], shard: Path, schema: pa.Schema) -> None:
    """Write the pieces' rows sorted by key, a row group at a time, so that the shard is held once, not
    once more as a sorted copy. The small frames are combined first: taking rows across a thousand chunks
    made the shuffle about twice as slow, for a copy that lives only while the frames are combined."""
    table = pa.concat_tables(t for path, piece in pieces for t in _read_piece(path, piece)).combine_chunks()
    order = np.argsort(table[SHUFFLE_KEY].to_numpy(), kind="stable")
    table = table.drop_columns(SHUFFLE_KEY)
    with pq.ParquetWriter(shard, schema) as writer:
        for start in range(0, table.num_rows, SPOOL_FLUSH_ROWS):
            writer.write_table(table.take(order[start : start + SPOOL_FLUSH_ROWS]))


def _schema(stage: str) -> pa.Schema:
    fields = [("id", pa.string()), ("source", pa.string()), ("copy", pa.int16()), ("row", pa.string())]
    fields += [(name, TOKENS) for name in SCHEMAS[stage]]
    if stage in IMAGE_STAGES:
        fields.append(("images", pa.list_(pa.string())))
    fields.append(("num_tokens", pa.int32()))
    return pa.schema(fields)


def _spool_schema(stage: str) -> pa.Schema:
    """The shard schema plus the row's shuffle key, which only the spool keeps."""
    return _schema(stage).append(pa.field(SHUFFLE_KEY, pa.uint64()))


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
