"""Data prep throughput and memory, measured side by side in one run.

Why: the prep stage promises three things that tests cannot show. Rendering, tokenizing and masking must
cost little more than tokenizing alone (target: at least 0.7x the rows/s of a bare fast-tokenizer batch
encode of the same texts), it must beat TRL's own SFT dataset preparation of the same conversations, and a
full OpenHermes-size run must stay under 2 GB of memory. Ratios only mean something when the candidates
run on the same rows, the same tokenizer and the same machine at the same time, so one run of this script
generates the data, times every candidate interleaved (A, B, A, B, ...) after warming the tokenizer, and
reports medians.

    python benchmarks/prep_throughput.py [--rows 200000] [--big-rows 1000000] [--out DIR]

Steps:
  1. a deterministic OpenHermes-2.5-shaped JSON array of --rows rows (own generator, no download);
  2. single process: read + convert; render + tokenize + mask; the bare tokenizer on the same texts;
     TRL's SFTTrainer dataset preparation of the same conversations (on a subset: it is slow);
  3. the full `run_prep` (2 worker processes) on a --big-rows file in a fresh child process, with the peak
     RSS of the main process, of the largest worker and of the whole process tree polled every 0.2 s, and
     the main process's own high-water mark (VmHWM);
  4. a Markdown table on stdout and prep_throughput.json in --out.

The tokenizer is the shipped tiny one, a 1,508-token SentencePiece BPE: absolute tokens/s differ from a 32k
Mistral vocabulary, while the ratios are the point.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import yaml

from hermes_pipeline.data_prep.sources import convert, row_id
from hermes_pipeline.data_prep.tokenize import render_sft, tokenize_rendered
from hermes_pipeline.readers import iter_records
from hermes_pipeline.recipe.schema import DataSource
from hermes_pipeline.rows import Reject

ROOT = Path(__file__).resolve().parents[1]
BATCH = 256  # rows per tokenizer call, as the pipeline's workers do (data_prep.pipeline.BATCH_ROWS)
NO_LIMIT = 1 << 31  # no max_seq_len in the single-process runs: every candidate tokenizes every row in full
POLL_SECONDS = 0.2
SEED = 2024
RSS_TARGET_BYTES = 2 * 10**9  # 2 GB, decimal: the stricter reading
RATIO_TARGET_BARE = 0.7
TRL_VARIANTS = {"trl_assistant_only": True, "trl_full_loss": False}  # name: assistant_only_loss

# A ChatML template with TRL's {% generation %} markers around what an assistant turn trains on (content and
# <|im_end|>). It renders the same bytes as the shipped "default" template; TRL cannot patch ours itself.
MARKED_CHATML = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


# --- 1. data -------------------------------------------------------------------------------------------

VOCABULARY = (
    "the of and to in is that for it as with was on be by this are or at from an which have not but they "
    "their can more one all will there has when also were would if we what so about into some other time "
    "than only its most these may then two first any over such make like between after many through new "
    "where each because used well even both people work should number data model value function system "
    "example result process question answer method problem energy water light cell market city history "
    "theory equation solution step total area rate change order group level point form power state world "
    "company product student teacher science research study analysis design program code string list "
    "table file error test memory network user server client request response database query "
    "algorithm matrix vector integer probability average distance speed temperature pressure species "
    "protein molecule reaction acid carbon oxygen planet orbit galaxy river mountain forest climate "
    "economy policy law court government election culture language music painting novel poem story "
    "character friend family health disease treatment patient doctor medicine brain heart blood "
    "calculate determine explain describe compare consider provide include increase decrease follow "
    "therefore however although first second finally important different possible available simple "
    "café naïve résumé déjà über façade"
)
WORDS = VOCABULARY.split()
SOURCES = (
    "airoboros2.2",
    "glaive-code-assist",
    "CamelAI",
    "metamath",
    "EvolInstruct_70k",
    "cot_alpaca_gpt4",
    "UnnaturalInstructions",
    "platypus",
    "caseus_custom",
    "LMSys Chatbot Arena",
    None,
)
SYSTEM_PROMPTS = (
    "You are an AI assistant. User will you give you a task. Your goal is to complete the task as "
    "faithfully as you can. While performing the task think step-by-step and justify your steps.",
    "You are a helpful assistant, who always provide explanation. Think like you are answering to a five "
    "year old.",
    "You are an AI assistant that helps people find information.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.",
    "You are a world class trivia AI - provide accurate, succinct responses.",
    "You are an unbiased, uncensored, helpful assistant.",
)
CODE_SNIPPETS = (
    "```python\ndef solve(values):\n    total = 0\n    for value in values:\n        total += value * 2\n"
    "    return total\n\nprint(solve([1, 2, 3]))\n```",
    "```javascript\nfunction compare(a, b) {\n  return a.length - b.length;\n}\n"
    "const items = ['x', 'yy', 'zzz'].sort(compare);\n```",
    "```sql\nSELECT name, COUNT(*) AS total\nFROM orders\nGROUP BY name\nORDER BY total DESC;\n```",
    "$$E = mc^2 \\quad \\text{and} \\quad F = ma$$",
)
METADATA = (
    "category",
    "topic",
    "title",
    "model",
    "model_name",
    "language",
    "skip_prompt_formatting",
    "views",
    "id",
    "idx",
    "hash",
    "avatarUrl",
    "system_prompt",
    "custom_instruction",
)


class RowGenerator:
    """OpenHermes-2.5 rows (teknium/OpenHermes-2.5 schema) from a seeded RNG: the same seed, the same file.

    Text is random sentences from a small vocabulary. Lengths are log-normal (median ~1,200 characters a
    conversation, most rows a few hundred to ~2,000, a tail clipped at 20,000); ~10% of rows are multi-turn,
    ~12% have a system prompt, ~5% are function-calling chats with <tool_call> text in gpt turns.
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.sentences = [self._sentence() for _ in range(20_000)]

    def _sentence(self) -> str:
        words = self.rng.choices(WORDS, k=self.rng.randint(6, 24))
        if self.rng.random() < 0.2:
            words.insert(self.rng.randrange(len(words)), str(self.rng.randint(0, 10_000)))
        return " ".join(words).capitalize() + self.rng.choice(".....?!:")

    def text(self, chars: int) -> str:
        """About `chars` characters of prose in paragraphs, sometimes with a code block."""
        picked = self.rng.choices(self.sentences, k=max(1, chars // 85 + 1))
        parts, size = [], 0
        for sentence in picked:
            if size >= chars:
                break
            parts.append(sentence + ("\n\n" if self.rng.random() < 0.15 else " "))
            size += len(sentence) + 1
        if chars > 400 and self.rng.random() < 0.15:
            parts.insert(self.rng.randrange(len(parts) + 1), "\n" + self.rng.choice(CODE_SNIPPETS) + "\n")
        return "".join(parts).strip()

    def row(self) -> dict[str, Any]:
        rng = self.rng
        chars = int(min(20_000, max(60, rng.lognormvariate(math.log(1_200), 0.95))))
        kind = rng.random()
        if kind < 0.05:
            turns = self._function_calling(chars)
        else:
            turns = []
            if rng.random() < 0.12:
                turns.append(("system", rng.choice(SYSTEM_PROMPTS)))
            exchanges = rng.randint(2, 4) if kind < 0.15 else 1
            for _ in range(exchanges):
                share = chars / exchanges
                asked = rng.uniform(0.1, 0.5)
                turns += [
                    ("human", self.text(int(share * asked))),
                    ("gpt", self.text(int(share * (1 - asked)))),
                ]
        weighted = rng.random() < 0.3  # some sources mark human turns 0.0 and gpt turns 1.0
        row: dict[str, Any] = {
            "conversations": [
                {"from": who, "value": value, "weight": (1.0 if who == "gpt" else 0.0) if weighted else None}
                for who, value in turns
            ],
            "source": rng.choice(SOURCES),
        }
        row.update(dict.fromkeys(METADATA))
        if rng.random() < 0.2:
            row["category"] = rng.choice(("general", "orca", "coding", "trivia", "roleplay"))
        if rng.random() < 0.05:
            row["id"] = str(uuid.UUID(int=rng.getrandbits(128)))
            row["title"] = self.text(40)
            row["views"] = rng.randint(0, 100_000)
            row["model"] = "gpt-4"
        return row

    def _function_calling(self, chars: int) -> list[tuple[str, str]]:
        rng = self.rng
        names = [f"{rng.choice(WORDS)}_{rng.choice(WORDS)}" for _ in range(rng.randint(1, 3))]
        tools = [
            {
                "type": "function",
                "function": {
                    "name": name,
                    "description": self.text(120),
                    "parameters": {
                        "type": "object",
                        "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
                        "required": ["query"],
                    },
                },
            }
            for name in names
        ]
        call = {"arguments": {"query": self.text(30), "limit": rng.randint(1, 50)}, "name": names[0]}
        result = {"results": [self.text(60) for _ in range(rng.randint(1, 4))]}
        system = (
            "You are a function calling AI model. You are provided with function signatures within "
            "<tools></tools> XML tags. You may call one or more functions to assist with the user query. "
            f"Here are the available tools: <tools> {json.dumps(tools)} </tools> For each function call "
            "return a json object with function name and arguments within <tool_call></tool_call> tags."
        )
        return [
            ("system", system),
            ("human", self.text(max(60, chars // 4))),
            ("gpt", f"<tool_call>\n{json.dumps(call)}\n</tool_call>"),
            ("human", f"<tool_response>\n{json.dumps(result)}\n</tool_response>"),
            ("gpt", self.text(max(80, chars // 2))),
        ]


def write_openhermes_json(path: Path, rows: int, seed: int = SEED) -> int:
    """Write `rows` generated rows as one JSON array, streamed; returns the file size in bytes."""
    generator = RowGenerator(seed)
    with path.open("w", encoding="utf-8") as out:
        out.write("[\n")
        for index in range(rows):
            out.write(("" if index == 0 else ",\n") + json.dumps(generator.row(), ensure_ascii=False))
        out.write("\n]\n")
    return path.stat().st_size


# --- 2. single-process throughput -------------------------------------------------------------------------

T = TypeVar("T")
# A candidate processes rows[part] and returns (seconds of the timed work, tokens it produced).
Candidate = Callable[[slice], tuple[float, int]]


def timed(function: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def batches(items: list[Any], size: int = BATCH) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def read_and_convert(path: Path, source: DataSource) -> list[dict[str, Any]]:
    """What a worker does before rendering: decode each record, give it an id, convert it to a canonical row."""
    rows = []
    for record in iter_records(str(path)):
        if record.data is None:
            raise RuntimeError(f"generated row {record.index} does not decode: {record.error}")
        rows.append(convert(record.data, row_id(record.data, record.index, source.name), source))
    return rows


def render_tokenize_mask(tokenizer: Any, rows: list[dict[str, Any]]) -> int:
    """Ours, as the workers run it: render each row, one tokenizer call per batch, labels from spans."""
    tokens = 0
    bos = tokenizer.bos_token or ""
    for batch in batches(rows):
        rendered = [render_sft(row, "chatml", bos) for row in batch]
        for result in tokenize_rendered(tokenizer, rendered, NO_LIMIT, truncate=False):
            assert not isinstance(result, Reject), result
            tokens += len(result.input_ids)
    return tokens


def bare_encode(tokenizer: Any, texts: list[str]) -> int:
    """Baseline 1: the fast tokenizer's own batch call on exactly the texts we render."""
    return sum(
        sum(map(len, tokenizer(batch, add_special_tokens=False)["input_ids"])) for batch in batches(texts)
    )


def interleaved(candidates: dict[str, Candidate], rows: int, repeats: int, chunk: int) -> dict[str, Any]:
    """Time every candidate on each `chunk`-row slice `repeats` times, taking turns (A, B, B, A, A, B, ...).

    Neighbouring runs share whatever the noisy machine is doing at that moment, so the ratios hold even when
    the absolute speed drifts. A candidate's time is the sum over slices of its median time on the slice.
    """
    medians = dict.fromkeys(candidates, 0.0)
    rounds = {name: [0.0] * repeats for name in candidates}
    tokens = dict.fromkeys(candidates, 0)
    for start in range(0, rows, chunk):
        part = slice(start, min(rows, start + chunk))
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for repeat in range(repeats):
            order = list(candidates) if repeat % 2 == 0 else list(reversed(candidates))
            for name in order:
                seconds, count = candidates[name](part)
                times[name].append(seconds)
                rounds[name][repeat] += seconds
                if repeat == 0:
                    tokens[name] += count
        for name in candidates:
            medians[name] += statistics.median(times[name])
    return {
        name: {
            "rows": rows,
            "tokens": tokens[name],
            "seconds": medians[name],
            "seconds_by_round": [round(s, 2) for s in rounds[name]],
            "rows_per_s": rows / medians[name],
            "tokens_per_s": tokens[name] / medians[name],
        }
        for name in candidates
    }


class TrlPreparation:
    """Baseline 2: TRL's SFTTrainer dataset preparation of the same conversations as a ``messages`` column.

    The entry point is ``SFTTrainer._prepare_dataset``, the method SFTTrainer.__init__ calls on its
    train_dataset; it is called directly so that the timing covers preparation only, not the trainer set-up.
    Two trainers over the tiny model, packing off, ``max_length=None`` (TRL then skips its truncate and
    filter passes and tokenizes every row in full, like ours here), ``dataset_num_proc=None``:
      - assistant_only: ``assistant_only_loss=True`` with MARKED_CHATML, the bytes of our template plus the
        {% generation %} markers TRL needs (with our template as shipped TRL raises: it cannot patch it);
      - full_loss: ``assistant_only_loss=False`` with our shipped template, labels = input_ids.
    """

    def __init__(self, scratch: Path) -> None:
        import datasets  # imported here: heavy, and prep worker processes re-import this file
        from trl import SFTConfig, SFTTrainer

        from hermes_pipeline.tiny import build_tiny_model, load_tiny_tokenizer

        datasets.disable_progress_bars()
        self.Dataset = datasets.Dataset
        self.trainers: dict[str, Any] = {}
        hello = self.dataset(
            [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"}]}]
        )
        for name, assistant_only in TRL_VARIANTS.items():
            tokenizer = load_tiny_tokenizer()
            tokenizer.model_max_length = NO_LIMIT
            if assistant_only:
                tokenizer.chat_template = MARKED_CHATML
            args = SFTConfig(
                output_dir=str(scratch),
                packing=False,
                max_length=None,
                assistant_only_loss=assistant_only,
                dataset_num_proc=None,
                report_to="none",
                use_cpu=True,
            )
            self.trainers[name] = SFTTrainer(
                model=build_tiny_model(), args=args, train_dataset=hello, processing_class=tokenizer
            )

    def dataset(self, rows: list[dict[str, Any]]) -> Any:
        messages = [[{"role": m["role"], "content": m["content"]} for m in row["messages"]] for row in rows]
        return self.Dataset.from_dict({"messages": messages})

    def prepare(self, name: str, rows: list[dict[str, Any]]) -> tuple[float, Any]:
        """Seconds TRL takes to prepare a fresh in-memory Dataset of `rows` (building it is not timed)."""
        dataset = self.dataset(rows)
        trainer = self.trainers[name]
        return timed(
            lambda: trainer._prepare_dataset(
                dataset, trainer.processing_class, trainer.args, False, None, "train"
            )
        )

    def candidate(self, name: str, rows: list[dict[str, Any]]) -> Candidate:
        def run(part: slice) -> tuple[float, int]:
            seconds, prepared = self.prepare(name, rows[part])
            return seconds, sum(map(len, prepared["input_ids"]))

        return run

    def warm(self, texts: list[str], rows: list[dict[str, Any]]) -> None:
        """Fill each tokenizer's word cache and compile the templates before anything is timed."""
        for name, trainer in self.trainers.items():
            trainer.processing_class.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
            self.prepare(name, rows[:BATCH])


def matching_rows(tokenizer: Any, rows: list[dict[str, Any]], prepared: Any) -> int:
    """Rows where TRL's assistant-only input_ids and labels equal ours, token for token."""
    ours: list[Any] = []
    for batch in batches(rows):
        rendered = [render_sft(row, "chatml", tokenizer.bos_token or "") for row in batch]
        ours += tokenize_rendered(tokenizer, rendered, NO_LIMIT, truncate=False)
    return sum(
        mine.input_ids == ids and mine.labels == labels
        for mine, ids, labels in zip(ours, prepared["input_ids"], prepared["labels"], strict=True)
    )


def measure_ours_vs_bare(
    tokenizer: Any, rows: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    """(b) against (c), interleaved over every row, after warming the tokenizer's word cache."""
    texts = [render_sft(row, "chatml", tokenizer.bos_token or "").text for row in rows]
    tokenizer.backend_tokenizer.encode_batch(texts[: args.chunk], add_special_tokens=False)
    pair: dict[str, Candidate] = {
        "ours_render_tokenize_mask": lambda part: timed(lambda: render_tokenize_mask(tokenizer, rows[part])),
        "bare_tokenizer": lambda part: timed(lambda: bare_encode(tokenizer, texts[part])),
    }
    figures = interleaved(pair, len(rows), args.repeats, args.chunk)
    if figures["ours_render_tokenize_mask"]["tokens"] != figures["bare_tokenizer"]["tokens"]:
        raise RuntimeError("ours and the bare tokenizer produced different token counts")
    return figures


def measure_against_trl(
    tokenizer: Any, rows: list[dict[str, Any]], args: argparse.Namespace
) -> tuple[dict[str, Any], int]:
    """(b) against both TRL variants on the first --trl-rows rows, interleaved; and how many of those
    rows TRL's assistant-only preparation tokenized and labelled exactly as ours."""
    subset = rows[: args.trl_rows]
    trl = TrlPreparation(args.out / "trl_scratch")
    trl.warm([render_sft(row, "chatml", tokenizer.bos_token or "").text for row in subset], subset)
    trio: dict[str, Candidate] = {
        "ours_on_trl_subset": lambda part: timed(lambda: render_tokenize_mask(tokenizer, subset[part])),
        **{name: trl.candidate(name, subset) for name in TRL_VARIANTS},
    }
    figures = interleaved(trio, len(subset), args.repeats, len(subset))
    _, prepared = trl.prepare("trl_assistant_only", subset)
    matching = matching_rows(tokenizer, subset, prepared)
    shutil.rmtree(args.out / "trl_scratch", ignore_errors=True)
    return figures, matching


def ratios(throughput: dict[str, Any]) -> dict[str, float]:
    def speed(name: str) -> float:
        return throughput[name]["rows_per_s"]

    return {
        "ours_over_bare": speed("ours_render_tokenize_mask") / speed("bare_tokenizer"),
        "ours_over_trl_assistant_only": speed("ours_on_trl_subset") / speed("trl_assistant_only"),
        "ours_over_trl_full_loss": speed("ours_on_trl_subset") / speed("trl_full_loss"),
    }


# --- 3. memory of a full run_prep ------------------------------------------------------------------------


class RssPoller(threading.Thread):
    """Peak RSS of this process and of its whole process tree (itself plus every descendant), sampled.

    Summing RSS counts pages shared between processes once per process, so the tree figure is an upper
    bound; spawned workers share little.
    """

    def __init__(self, interval: float = POLL_SECONDS) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.process = psutil.Process()
        self.started = time.perf_counter()
        # (seconds, main rss, tree rss, processes below main, largest of them)
        self.samples: list[tuple[float, int, int, int, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            main = self.process.memory_info().rss
            tree, children, largest = main, 0, 0
            for child in self.process.children(recursive=True):
                try:
                    rss = child.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                tree += rss
                children += 1
                largest = max(largest, rss)
            self.samples.append((time.perf_counter() - self.started, main, tree, children, largest))
            self.done.wait(self.interval)

    def stop(self) -> None:
        self.done.set()
        self.join()

    def summary(self) -> dict[str, Any]:
        main = max(self.samples, key=lambda s: s[1])
        tree = max(self.samples, key=lambda s: s[2])
        # The pool's two workers (plus multiprocessing's resource tracker) run while rows stream; then the
        # main process alone shuffles the spool into shards.
        ends = [i for i, sample in enumerate(self.samples) if sample[3] >= 2]
        streaming = self.samples[: ends[-1] + 1] if ends else []
        after = self.samples[len(streaming) :]
        return {
            "samples": len(self.samples),
            "peak_main_rss_bytes": main[1],
            "peak_main_rss_at_s": round(main[0], 1),
            "peak_tree_rss_bytes": tree[2],
            "peak_tree_rss_at_s": round(tree[0], 1),
            "max_processes_in_tree": 1 + max(s[3] for s in self.samples),
            "peak_largest_child_rss_bytes": max(s[4] for s in self.samples),
            "workers_running_until_s": round(streaming[-1][0], 1) if streaming else None,
            "peak_tree_rss_while_streaming_bytes": max((s[2] for s in streaming), default=None),
            "peak_main_rss_while_streaming_bytes": max((s[1] for s in streaming), default=None),
            "peak_main_rss_after_workers_bytes": max((s[1] for s in after), default=None),
        }


def write_memory_recipe(folder: Path, data_file: Path) -> Path:
    """A one-source recipe over the generated file: the tiny tokenizer, 2 workers, the Hermes 2 Pro data
    settings (max_seq_len 4096, overlong rows dropped, 1% validation), decontamination against a small
    generated evaluation set so the workers do that work too. The model section names the Mistral 7B
    config only so that max_seq_len 4096 validates (the tiny model's context is 2048): prep never builds
    the model."""
    from hermes_pipeline.tiny import TINY_TOKENIZER_DIR

    eval_file = folder / "eval_prompts.jsonl"
    generator = RowGenerator(SEED + 1)
    with eval_file.open("w", encoding="utf-8") as out:
        for _ in range(500):
            out.write(json.dumps({"prompt": generator.text(300)}) + "\n")
    recipe = {
        "name": "prep-benchmark",
        "seed": 0,
        "run_dir": str(folder / "run"),
        "model": {
            "init": "random",
            "config": str(ROOT / "configs/models/mistral-7b-v0.1.json"),
            "dtype": "float32",
        },
        "tokenizer": {"name_or_path": str(TINY_TOKENIZER_DIR), "template": "chatml"},
        "data": {
            "max_seq_len": 4096,
            "overlong": "drop",
            "val_fraction": 0.01,
            "num_proc": 2,
            "decontaminate": {"enabled": True, "eval_sets": [str(eval_file)]},
            "sources": [{"name": "openhermes", "kind": "openhermes", "path": str(data_file)}],
        },
        "sft": {"enabled": True, "precision": "fp32", "resources": {"gpus_per_node": 0}},
        "dpo": {"enabled": False},
        "export": {"enabled": False},
        "eval": {"enabled": False},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def memory_child(recipe_path: Path, result_path: Path) -> None:
    """Run in a fresh process: run_prep under the poller, then this process's own figures as JSON."""
    from hermes_pipeline.data_prep.pipeline import run_prep
    from hermes_pipeline.recipe.loader import load_recipe

    recipe = load_recipe(recipe_path)
    poller = RssPoller()
    poller.start()
    seconds, out = timed(lambda: run_prep(recipe, force=True, log=lambda _: None))
    poller.stop()
    report = json.loads((out / "prep_report.json").read_text(encoding="utf-8"))
    totals = report["totals"]
    result = {
        "wall_seconds": seconds,
        "rows_in": totals["rows_in"],
        "rows_out": totals["rows_out"],
        "rejected": totals["rejected"],
        "rejects_by_reason": report["sources"]["openhermes"]["rejects_by_reason"],
        "tokens": totals["tokens"],
        "rows_per_s": totals["rows_in"] / seconds,
        "hwm_self_bytes": high_water_mark(),
        **poller.summary(),
    }
    result_path.write_text(json.dumps(result, indent=2), encoding="utf-8")


def high_water_mark() -> int:
    """This process's peak RSS, from /proc (VmHWM, in kB).

    Not getrusage's ru_maxrss: Linux hands a parent's peak on to the child it starts, across exec, so the
    prep process started by this benchmark (~5 GB by then), or a worker started by the prep process,
    would report its parent's peak whenever that is higher than its own.
    """
    status = Path("/proc/self/status").read_text(encoding="ascii")
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def measure_memory(out: Path, rows: int) -> dict[str, Any]:
    """Generate the big file, run the full prep on it in a fresh child process, then delete it all."""
    folder = out / "memory_run"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    data_file = folder / "openhermes-big.json"
    try:
        generated_in, size = timed(lambda: write_openhermes_json(data_file, rows))
        print(f"memory: generated {rows:,} rows ({size / 1e9:.2f} GB) in {generated_in:.0f}s", flush=True)
        recipe = write_memory_recipe(folder, data_file)
        result_file = folder / "result.json"
        command = [sys.executable, __file__, "--memory-child", str(recipe), str(result_file)]
        subprocess.run(command, check=True, cwd=ROOT)
        result = json.loads(result_file.read_text(encoding="utf-8"))
        return {"file_bytes": size, "bytes_per_row": size / rows, **result}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- 4. report -----------------------------------------------------------------------------------------


def gb(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


def markdown(results: dict[str, Any]) -> str:
    stages = results["throughput"]
    ours, bare = stages["ours_render_tokenize_mask"], stages["bare_tokenizer"]
    subset_ours = stages["ours_on_trl_subset"]
    lines = [
        f"Single process, {results['rows']:,} generated OpenHermes-shaped rows "
        f"({results['file_bytes'] / 1e6:.0f} MB), tiny tokenizer (1,508-token SentencePiece BPE: absolute "
        "tokens/s differ from a 32k Mistral vocabulary; the ratios are the point). Medians.",
        "",
        "| stage | rows | rows/s | tokens/s | ours / this |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]

    def line(label: str, figures: dict[str, Any], reference: dict[str, Any] | None) -> None:
        ratio = f"{reference['rows_per_s'] / figures['rows_per_s']:.2f}x" if reference else ""
        lines.append(
            f"| {label} | {figures['rows']:,} | {figures['rows_per_s']:,.0f} | "
            f"{figures['tokens_per_s']:,.0f} | {ratio} |"
        )

    line("(a) read + convert (iter_records + sources.convert)", stages["read_convert"], None)
    line("(b) ours: render + tokenize + mask", ours, None)
    line("(c) bare tokenizer batch encode, same texts", bare, ours)
    line("(b) ours on the TRL subset", subset_ours, None)
    line("(d) TRL _prepare_dataset, assistant_only_loss", stages["trl_assistant_only"], subset_ours)
    line("(d) TRL _prepare_dataset, full-sequence loss", stages["trl_full_loss"], subset_ours)
    memory = results.get("memory")
    if memory:
        lines += [
            "",
            f"Full run_prep, 2 worker processes, {memory['rows_in']:,} rows "
            f"({memory['file_bytes'] / 1e9:.2f} GB, {memory['bytes_per_row']:,.0f} bytes/row):",
            "",
            "| figure | value |",
            "| --- | ---: |",
            f"| wall time | {memory['wall_seconds']:,.0f} s |",
            f"| rows/s end to end | {memory['rows_per_s']:,.0f} |",
            f"| rows written / rejected | {memory['rows_out']:,} / {memory['rejected']:,} |",
            f"| peak RSS, main process (polled) | {gb(memory['peak_main_rss_bytes'])} |",
            f"| peak RSS, process tree (polled sum) | {gb(memory['peak_tree_rss_bytes'])} |",
        ]
        phases = (
            ("peak RSS while streaming (main + workers)", "peak_tree_rss_while_streaming_bytes"),
            ("peak RSS after the workers exit (shuffle)", "peak_main_rss_after_workers_bytes"),
        )
        lines += [f"| {label} | {gb(memory[key])} |" for label, key in phases if memory.get(key) is not None]
        lines += [
            f"| peak RSS, largest worker (polled) | {gb(memory['peak_largest_child_rss_bytes'])} |",
            f"| VmHWM, main process | {gb(memory['hwm_self_bytes'])} |",
        ]
    lines += ["", "| target | measured | met |", "| --- | ---: | :---: |"]
    for name, target in results["targets"].items():
        value = gb(target["value"]) if name.startswith("peak") else f"{target['value']:.2f}x"
        lines.append(f"| {name} | {value} | {'yes' if target['met'] else 'NO'} |")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """Each target with the measured figure and whether it is met."""
    ratios = results["ratios"]
    met = {
        "ours_over_bare_at_least_0.7": {
            "value": ratios["ours_over_bare"],
            "met": ratios["ours_over_bare"] >= RATIO_TARGET_BARE,
        },
        "faster_than_trl": {
            "value": min(ratios["ours_over_trl_assistant_only"], ratios["ours_over_trl_full_loss"]),
            "met": min(ratios["ours_over_trl_assistant_only"], ratios["ours_over_trl_full_loss"]) > 1,
        },
    }
    if "memory" in results:
        peak = results["memory"]["peak_tree_rss_bytes"]
        met["peak_rss_under_2GB"] = {"value": peak, "met": peak < RSS_TARGET_BYTES}
    return met


def environment() -> dict[str, Any]:
    from importlib.metadata import version

    packages = ("tokenizers", "transformers", "datasets", "trl", "torch", "pyarrow")
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "packages": {name: version(name) for name in packages},
    }


# --- main ----------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows for the single-process figures")
    parser.add_argument(
        "--big-rows", type=int, default=1_000_000, help="rows for the run_prep memory run (0: skip)"
    )
    parser.add_argument("--trl-rows", type=int, default=10_000, help="subset timed against TRL (it is slow)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per candidate and slice")
    parser.add_argument("--chunk", type=int, default=20_000, help="rows per interleaved slice")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"), help="folder for the results")
    parser.add_argument("--memory-child", nargs=2, type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    from hermes_pipeline.tiny import (
        load_tiny_tokenizer,
    )  # imported here: the prep workers re-import this file

    args.out = args.out.resolve()  # the recipe written for the memory run resolves paths from its own folder
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"rows": args.rows, "repeats": args.repeats, "environment": environment()}

    # 1. data
    data_file = args.out / f"openhermes-{args.rows}.json"
    results["file_bytes"] = write_openhermes_json(data_file, args.rows)
    source = DataSource(name="openhermes", kind="openhermes", path=str(data_file))

    # 2. single-process throughput: (a) read + convert, (b) against (c), (b) against (d)
    conversions = [timed(lambda: read_and_convert(data_file, source)) for _ in range(args.repeats)]
    rows = conversions[-1][1]
    data_file.unlink()
    tokenizer = load_tiny_tokenizer()
    tokenizer.model_max_length = NO_LIMIT  # as the workers do: no warning for long rows
    throughput = measure_ours_vs_bare(tokenizer, rows, args)
    print("throughput: ours vs bare done", flush=True)
    seconds = statistics.median(s for s, _ in conversions)
    tokens = throughput["bare_tokenizer"]["tokens"]  # the converted rows' tokens, to compare
    throughput["read_convert"] = {
        "rows": len(rows),
        "tokens": tokens,
        "seconds": seconds,
        "seconds_by_round": [round(s, 2) for s, _ in conversions],
        "rows_per_s": len(rows) / seconds,
        "tokens_per_s": tokens / seconds,
    }
    trl_figures, results["trl_rows_matching_ours"] = measure_against_trl(tokenizer, rows, args)
    results["throughput"] = throughput | trl_figures
    results["ratios"] = ratios(results["throughput"])
    print("throughput: TRL done", flush=True)
    (args.out / "prep_throughput.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    # 3. memory of the full pipeline
    if args.big_rows:
        results["memory"] = measure_memory(args.out, args.big_rows)

    # 4. report
    results["targets"] = targets(results)
    table = markdown(results)
    print(table)
    (args.out / "prep_throughput.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (args.out / "prep_throughput.md").write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
