"""Training throughput: SFT packed against padded, DPO with and without precomputed reference log-probs.

Why: the SFT stage packs rows (TRL's best-fit-decreasing packing, padding-free batches) because padding is
compute spent on nothing, and the DPO stage can precompute the reference model's log-probs once instead of
running the reference forward on every step. Both are claims about speed that tests cannot show, and the
issue sets a target for the first: packed SFT must train at least 2x the real (non-pad) tokens/s of padded
SFT. Ratios only mean something when the candidates run on the same rows, the same model and the same
machine at the same time, and this machine is shared: its speed swings several-fold within a minute. So one
run of this script generates the data, builds each trainer the way train/stage.py does, and trains the
candidates of each comparison in turns, one optimizer step each (see Baton), after untimed warm-up steps.

    python benchmarks/train_throughput.py [--steps 20] [--max-lens 1024] [--threads N] [--json PATH]

Steps:
  1. SFT: synthetic pre-tokenized rows (input_ids + labels, as prep writes them) with an OpenHermes-2.5-like
     length spread; TRL's SFTTrainer packed (packing=True, packing_strategy="bfd", padding_free=True) and
     padded (packing=False, padding_free=False) on the tiny CPU model in fp32, at micro batch 4 for both
     (the recipe's micro_batch_size means rows when padded and packed sequences when packed, so this is what
     flipping `packing` in a recipe changes) and, since the padding-free path on CPU pays for the length of
     the concatenated row, also packed at micro batch 1 (one max_len sequence, about as many real tokens a
     step as 4 padded rows);
  2. DPO: synthetic prompt/chosen/rejected id triples; the pipeline's HermesDPOTrainer with a reference model
     in memory, against precompute_ref_log_probs=True, and the one-off precompute pass taking turns too;
  3. a Markdown table on stdout (progress goes to stderr) and, with --json, every step's figures.

Absolute figures belong to the tiny model on a CPU (hidden 256, 2 layers, vocabulary 1,536), where attention
is a large share of a step; a 7B model on a GPU with varlen flash attention spends its time differently.
Timed work runs in worker threads, each set to --threads torch threads (default: every CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

SEED = 2024
# Ordinary tokens of the tiny tokenizer: 0-2 are <unk>, <s> and </s> (the pad), 1500 and up the chat tokens.
FIRST_ID, LAST_ID = 3, 1499

# SFT row lengths, counted as tokens of a 32k Mistral-style vocabulary (the ids themselves come from the
# tiny one): log-normal with median 250 and sigma 0.9, so mean ~340 after clipping, p90 ~790, and ~6% of rows
# clipped at max_len 1024. The shape is meant to be OpenHermes-2.5's: most rows a single short-to-medium
# exchange, a long tail of multi-turn, code and tool-use rows. It is an assumption chosen to resemble that
# distribution, not a fit to the real data (nothing is downloaded). Clipping stands for prep's
# overlong: truncate (the tiny recipe's setting).
SFT_MEDIAN, SFT_SIGMA, SFT_MIN = 250, 0.9, 16
PROMPT_SHARE = 0.3  # the first 30% of each row (system + user turns) is masked with -100, the rest trains
# DPO lengths, Orca-DPO-pairs-like (a system prompt and a question, a longer chosen answer, a shorter rejected
# one); again an assumption, not a fit. The prompt keeps at most half of max_len; answers are clipped so that
# prompt + answer fits max_len, as the DPO collator would truncate them.
DPO_PROMPT = (150, 0.8)
DPO_CHOSEN = (200, 0.7)
DPO_REJECTED = (140, 0.7)
DPO_MIN = 8
# Optimizer settings from configs/recipes/tiny.yaml; they do not change the cost of a step.
SFT_LR, DPO_LR, DPO_BETA = 1e-3, 5e-5, 0.1
TARGET_RATIO = 2.0
T = TypeVar("T")


@dataclass(frozen=True)
class SftSetting:
    """One SFT candidate: packed or padded, its micro batch (packed sequences or rows) and max_len."""

    packed: bool
    micro_batch: int
    max_len: int

    @property
    def name(self) -> str:
        kind = "packed" if self.packed else "padded"
        return f"{kind} mb{self.micro_batch} @{self.max_len}"

    @property
    def key(self) -> str:
        return self.name.replace(" ", "-").replace("@", "")


# --- 1. data -------------------------------------------------------------------------------------------


def lognormal_length(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return int(min(high, max(low, rng.lognormvariate(math.log(median), sigma))))


def token_ids(rng: random.Random, count: int) -> list[int]:
    """Uniform ordinary token ids: which ids they are changes nothing in the cost of a step."""
    return [rng.randint(FIRST_ID, LAST_ID) for _ in range(count)]


def sft_rows(seed: int, count: int, max_len: int) -> list[dict[str, list[int]]]:
    """Rows as prep writes them: input_ids, and labels with the prompt share masked (-100)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        ids = token_ids(rng, lognormal_length(rng, SFT_MEDIAN, SFT_SIGMA, SFT_MIN, max_len))
        masked = int(len(ids) * PROMPT_SHARE)
        rows.append({"input_ids": ids, "labels": [-100] * masked + ids[masked:]})
    return rows


def dpo_pairs(seed: int, count: int, max_len: int) -> list[dict[str, list[int]]]:
    """Triples as prep writes them for DPO (column names as train/data.py hands them to the trainer)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        prompt = lognormal_length(rng, *DPO_PROMPT, DPO_MIN, max_len // 2)
        room = max_len - prompt
        chosen = lognormal_length(rng, *DPO_CHOSEN, DPO_MIN, room)
        rejected = lognormal_length(rng, *DPO_REJECTED, DPO_MIN, room)
        pairs.append(
            {
                "prompt_ids": token_ids(rng, prompt),
                "chosen_ids": token_ids(rng, chosen),
                "rejected_ids": token_ids(rng, rejected),
            }
        )
    return pairs


def padding_over_pool(rows: list[dict[str, list[int]]], micro_batch: int, seed: int) -> float:
    """Padding fraction of padded micro batches drawn at random from the whole pool (one shuffled epoch).

    The timed steps see only a few batches, so their padding depends on the draw; this is its expectation.
    """
    lengths = [len(row["input_ids"]) for row in rows]
    random.Random(seed).shuffle(lengths)
    batches = [lengths[i : i + micro_batch] for i in range(0, len(lengths), micro_batch)]
    computed = sum(max(batch) * len(batch) for batch in batches)
    return 1 - sum(lengths) / computed


# --- 2. timing -----------------------------------------------------------------------------------------


class Baton:
    """Lets jobs running in threads take turns, one step each, in a fixed schedule.

    Why: this machine is shared, and its speed changes several-fold from one minute to the next when another
    process competes for the cores. Timing candidates one after the other turns that into false ratios;
    taking turns step by step exposes all of them to the same conditions. Only the holder of the baton
    computes, so no two timed steps ever overlap. The schedule alternates direction every cycle
    (A B C, C B A, ...) so that no candidate always follows the same one; a job with fewer turns drops out
    of the later cycles.
    """

    def __init__(self, turns: dict[str, int]) -> None:
        names = list(turns)
        cycles = max(turns.values())
        self.schedule = [
            name
            for cycle in range(cycles)
            for name in (names if cycle % 2 == 0 else names[::-1])
            if cycle < turns[name]
        ]
        self.position = 0
        self.error: BaseException | None = None
        self.condition = threading.Condition()

    def _ready(self, name: str) -> bool:
        return self.error is not None or self.schedule[self.position] == name

    def wait(self, name: str) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self._ready(name))
            if self.error is not None:
                raise RuntimeError("another job failed") from self.error

    def pass_on(self) -> None:
        with self.condition:
            self.position += 1
            self.condition.notify_all()

    def finish(self, name: str, error: BaseException | None = None) -> None:
        """A job is done (or failed): drop its remaining turns and hand the baton on."""
        with self.condition:
            if error is not None and self.error is None:
                self.error = error
            rest = [turn for turn in self.schedule[self.position :] if turn != name]
            self.schedule = self.schedule[: self.position] + rest + [""]  # "" ends the schedule
            self.condition.notify_all()


class Turns:
    """One job's side of the baton: wait for the turn, time the step, hand the baton on.

    A step's time runs from getting the turn to the end of the step, so a training step includes fetching
    and collating its batch (real training cost) and nothing of the other jobs. The process's CPU time over
    the same span says how many cores the step really had (the other jobs are blocked): about the thread
    count on an idle machine, less when another process competes for the cores.
    """

    def __init__(self, name: str, baton: Baton) -> None:
        self.name, self.baton = name, baton
        self.durations: list[tuple[float, float]] = []  # (wall seconds, process CPU seconds)
        self.resumed = (0.0, 0.0)

    def begin(self) -> None:
        self.baton.wait(self.name)
        self.resumed = (time.perf_counter(), time.process_time())

    def end_step(self) -> None:
        wall, cpu = self.resumed
        self.durations.append((time.perf_counter() - wall, time.process_time() - cpu))

    def next_turn(self) -> None:
        self.end_step()
        self.baton.pass_on()
        self.begin()


def turn_callback(turns: Turns) -> Any:
    """A TrainerCallback that makes a trainer take its turn before each optimizer step."""
    from transformers import TrainerCallback

    class TurnTaker(TrainerCallback):
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            turns.begin()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            turns.next_turn()

    return TurnTaker()


def run_in_turns(baton: Baton, jobs: dict[str, Callable[[], Any]], threads: int) -> None:
    """Run every job in its own thread; the jobs take turns through the baton. torch's intra-op thread count
    is set in each thread, as a new thread may not inherit it."""
    import torch

    def run(name: str) -> None:
        torch.set_num_threads(threads)
        try:
            jobs[name]()
        except BaseException as error:
            baton.finish(name, error)
            raise
        baton.finish(name)

    workers = [threading.Thread(target=run, args=(name,), name=name) for name in jobs]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if baton.error is not None:
        raise RuntimeError("a timed job failed; see the traceback above") from baton.error


def train_in_turns(
    trainers: dict[str, Any], steps: int, threads: int
) -> dict[str, list[tuple[float, float]]]:
    """Train every trainer `steps` optimizer steps (its max_steps), one step at a time in turn."""
    baton = Baton(dict.fromkeys(trainers, steps + 1))  # the steps, then what train() does after the last
    turns = {name: Turns(name, baton) for name in trainers}
    for name, trainer in trainers.items():
        trainer.add_callback(turn_callback(turns[name]))
    run_in_turns(baton, {name: trainer.train for name, trainer in trainers.items()}, threads)
    for name, taker in turns.items():
        if len(taker.durations) != steps:
            raise RuntimeError(f"{name}: {len(taker.durations)} steps instead of {steps}")
    return {name: taker.durations for name, taker in turns.items()}


def in_worker(function: Callable[[], T], threads: int) -> T:
    """Run `function` in a fresh thread with `threads` torch threads, in the same conditions as the turns."""
    import torch

    outcome: dict[str, Any] = {}

    def run() -> None:
        torch.set_num_threads(threads)
        try:
            outcome["value"] = function()
        except BaseException as error:
            outcome["error"] = error

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def counting_collator(collator: Callable[[list[Any]], dict[str, Any]], log: list[dict[str, int]]) -> Any:
    """Wrap the trainer's own collator and note what each batch holds; the batch itself is untouched.

    Batches are collated in step order (one batch per step, no gradient accumulation), so log[i] is step i.
    Real tokens are the non-pad positions: the attention mask's sum for padded batches, every position for
    padding-free ones (one concatenated row, no pad). Attention scores count the query x key products of
    each row's full width, per layer and head: SDPA with a padding or block-diagonal mask computes all of
    them. "Needed" counts those of each sequence on its own, what varlen flash attention would compute.
    """

    def collate(examples: list[Any]) -> dict[str, Any]:
        batch = collator(examples)
        ids = batch["input_ids"]
        width = int(ids.shape[1])
        if "cu_seq_lens_q" in batch:
            lengths = batch["cu_seq_lens_q"].diff().long()
        else:
            lengths = batch["attention_mask"].sum(dim=1).long()
        entry = {
            "rows": int(lengths.numel()),
            "positions": int(ids.numel()),
            "real_tokens": int(lengths.sum()),
            "width": width,
            "attention_scores": int(ids.shape[0]) * width * width,
            "attention_scores_needed": int((lengths**2).sum()),
        }
        if "labels" in batch:
            entry["loss_tokens"] = int((batch["labels"][:, 1:] != -100).sum())
        log.append(entry)
        return batch

    return collate


def prepare(trainer: Any, log: list[dict[str, int]]) -> None:
    """Count the trainer's batches, and drop the callback that prints the end-of-training metrics: stdout
    is for the table."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.data_collator = counting_collator(trainer.data_collator, log)


def common_args(output_dir: str, micro_batch: int, max_len: int, steps: int, lr: float) -> dict[str, Any]:
    """The settings train/stage.py's training_args gives both stages on a CPU, bar what only a real run
    needs: no checkpoints, no logging, no tracking, and a fixed number of steps."""
    return {
        "output_dir": output_dir,
        "seed": SEED,
        "data_seed": SEED,
        "per_device_train_batch_size": micro_batch,
        "gradient_accumulation_steps": 1,
        "learning_rate": lr,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.05,
        "max_steps": steps,
        "optim": "adamw_torch",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "save_strategy": "no",
        "logging_strategy": "no",
        "eval_strategy": "no",
        "include_num_input_tokens_seen": "non_padding",
        "report_to": "none",
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "max_length": max_len,
    }


def step_records(durations: list[tuple[float, float]], log: list[dict[str, int]]) -> list[dict[str, Any]]:
    return [
        {"seconds": seconds, "cpu_seconds": cpu, **batch}
        for (seconds, cpu), batch in zip(durations, log[: len(durations)], strict=True)
    ]


def run_sft(
    settings: list[SftSetting], rows: list[dict[str, list[int]]], steps: int, threads: int
) -> dict[str, dict[str, Any]]:
    """Build one SFTTrainer per setting over the same rows, each on a fresh tiny model with the same weights,
    and train them `steps` optimizer steps each, taking turns; every step's figures."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from hermes_pipeline.tiny import build_tiny_model, load_tiny_tokenizer

    dataset = Dataset.from_list(rows)
    trainers, logs, built, sequences = {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="sft-bench-") as folder:
        # Creating a config resets accelerate's process-wide state, which trainers built before it then lack:
        # every config is created before any trainer.
        configs = {
            setting.name: SFTConfig(
                packing=setting.packed,
                packing_strategy="bfd",
                padding_free=setting.packed,
                **common_args(
                    str(Path(folder) / setting.key), setting.micro_batch, setting.max_len, steps, SFT_LR
                ),
            )
            for setting in settings
        }
        for setting in settings:
            started = time.perf_counter()
            trainer = SFTTrainer(
                model=build_tiny_model(seed=SEED),
                args=configs[setting.name],
                train_dataset=dataset,
                processing_class=load_tiny_tokenizer(),
            )
            built[setting.name] = time.perf_counter() - started
            sequences[setting.name] = len(trainer.train_dataset)
            logs[setting.name] = []
            prepare(trainer, logs[setting.name])
            trainers[setting.name] = trainer
        durations = train_in_turns(trainers, steps, threads)
    del trainers
    gc.collect()
    return {
        name: {
            "build_seconds": built[name],
            "train_sequences": sequences[name],
            "steps": step_records(durations[name], logs[name]),
        }
        for name in durations
    }


def run_dpo(
    pairs: list[dict[str, list[int]]], micro_batch: int, max_len: int, threads: int
) -> dict[str, Any]:
    """One epoch over `pairs` with the pipeline's HermesDPOTrainer, with and without precompute, in turns.

    The reference is set up as stage.py does: without precompute, a second copy of the starting weights kept
    in memory; with it, none, and TRL runs the policy (still the starting weights) over the train set when
    the trainer is built (`_precompute_ref_logps`: a forward pass per micro batch, then the results cached
    as dataset columns). That one-off pass cannot take turns with the steps of the trainer that runs it, so
    a third job runs it again, over a copy of the pairs (another fingerprint, so not a cache hit), one micro
    batch per turn alongside both trainers' steps. The pass made while building is timed too, on its own.
    """
    from datasets import Dataset
    from trl import DPOConfig

    from hermes_pipeline.tiny import build_tiny_model, load_tiny_tokenizer
    from hermes_pipeline.train.stage import HermesDPOTrainer

    steps = len(pairs) // micro_batch
    dataset = Dataset.from_list(pairs)
    at_build: list[tuple[float, float]] = []  # (wall seconds, process CPU seconds)

    class TimedPrecompute(HermesDPOTrainer):
        def _precompute_ref_logps(self, *args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            result = super()._precompute_ref_logps(*args, **kwargs)
            at_build.append((time.perf_counter() - wall, time.process_time() - cpu))
            return result

    def config(folder: str, name: str, precompute: bool) -> DPOConfig:
        return DPOConfig(
            beta=DPO_BETA,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=precompute,
            **common_args(str(Path(folder) / name), micro_batch, max_len, steps, DPO_LR),
        )

    trainers, logs, built = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as folder:
        # As in run_sft, every config is created before any trainer.
        configs = {
            name: config(folder, name, name != "reference_model")
            for name in ("reference_model", "precomputed", "precompute")
        }
        for name, precompute in (("reference_model", False), ("precomputed", True)):
            started = time.perf_counter()
            args = configs[name]
            trainer = in_worker(
                lambda args=args, precompute=precompute: TimedPrecompute(
                    model=build_tiny_model(seed=SEED),
                    ref_model=None if precompute else build_tiny_model(seed=SEED),
                    args=args,
                    train_dataset=dataset,
                    processing_class=load_tiny_tokenizer(),
                ),
                threads,
            )
            built[name] = time.perf_counter() - started
            logs[name] = []
            prepare(trainer, logs[name])
            trainers[name] = trainer

        batches = -(-len(pairs) // micro_batch)
        baton = Baton(dict.fromkeys(trainers, steps + 1) | {"precompute": batches + 2})
        turns = {name: Turns(name, baton) for name in [*trainers, "precompute"]}
        for name, trainer in trainers.items():
            trainer.add_callback(turn_callback(turns[name]))
        pass_turns = turns["precompute"]

        class PrecomputeInTurns(HermesDPOTrainer):
            """Its precompute pass takes one turn per micro batch, plus one for caching the results; building
            the trainer up to the pass takes a turn of its own, left out of the figures."""

            def _precompute_ref_logps(self, *args: Any, **kwargs: Any) -> Any:
                pass_turns.next_turn()
                result = super()._precompute_ref_logps(*args, **kwargs)
                pass_turns.end_step()
                return result

            def compute_ref_log_probs(self, *args: Any, **kwargs: Any) -> Any:
                result = super().compute_ref_log_probs(*args, **kwargs)
                pass_turns.next_turn()
                return result

        copy = Dataset(dataset.data, fingerprint=f"{dataset._fingerprint}-turns")
        jobs: dict[str, Callable[[], Any]] = {name: trainer.train for name, trainer in trainers.items()}

        def precompute_job() -> None:
            pass_turns.begin()
            PrecomputeInTurns(
                model=build_tiny_model(seed=SEED),
                args=configs["precompute"],
                train_dataset=copy,
                processing_class=load_tiny_tokenizer(),
            )

        jobs["precompute"] = precompute_job
        run_in_turns(baton, jobs, threads)
    del trainers
    gc.collect()
    for name in ("reference_model", "precomputed"):
        if len(turns[name].durations) != steps:
            raise RuntimeError(f"{name}: {len(turns[name].durations)} steps instead of {steps}")
    return {
        name: {
            "build_seconds": built[name],
            "pairs": len(pairs),
            "steps": step_records(turns[name].durations, logs[name]),
        }
        for name in ("reference_model", "precomputed")
    } | {
        "precompute": {
            "pairs": len(pairs),
            "batches": batches,
            "build_turn": {"seconds": pass_turns.durations[0][0], "cpu_seconds": pass_turns.durations[0][1]},
            "in_turns": [{"seconds": wall, "cpu_seconds": cpu} for wall, cpu in pass_turns.durations[1:]],
            "at_build": {"seconds": at_build[0][0], "cpu_seconds": at_build[0][1]},
        }
    }


# --- 3. summaries --------------------------------------------------------------------------------------


def timed_steps(run: dict[str, Any], warmup: int) -> tuple[list[dict[str, Any]], float, dict[str, Any]]:
    """The steps after the warm-up (the first steps allocate optimizer state and caches), their seconds,
    and the timing figures every summary shares."""
    steps = run["steps"][warmup:]
    seconds = sum(s["seconds"] for s in steps)
    common = {
        "timed_steps": len(steps),
        "seconds": seconds,
        "step_seconds_median": statistics.median(s["seconds"] for s in steps),
        "warmup_step_seconds": [round(s["seconds"], 3) for s in run["steps"][:warmup]],
        "cores_used": sum(s["cpu_seconds"] for s in steps) / seconds,
        "build_seconds": round(run["build_seconds"], 2),
    }
    return steps, seconds, common


def summarize_sft(run: dict[str, Any], warmup: int) -> dict[str, Any]:
    steps, seconds, common = timed_steps(run, warmup)
    real = sum(s["real_tokens"] for s in steps)
    positions = sum(s["positions"] for s in steps)
    return {
        **common,
        "rows_per_step": statistics.fmean(s["rows"] for s in steps),
        "positions_per_step": positions / len(steps),
        "real_tokens_per_step": real / len(steps),
        "max_width": max(s["width"] for s in steps),
        "attention_scores_per_step": statistics.fmean(s["attention_scores"] for s in steps),
        "attention_scores_needed_per_step": statistics.fmean(s["attention_scores_needed"] for s in steps),
        "padding_fraction": 1 - real / positions,
        "real_tokens_per_s": real / seconds,
        "real_tokens_per_s_median_step": statistics.median(s["real_tokens"] / s["seconds"] for s in steps),
        "loss_tokens_per_s": sum(s["loss_tokens"] for s in steps) / seconds,
        "rows_per_s": sum(s["rows"] for s in steps) / seconds,
        "train_sequences": run["train_sequences"],
    }


def summarize_dpo(run: dict[str, Any], warmup: int, micro_batch: int) -> dict[str, Any]:
    steps, seconds, common = timed_steps(run, warmup)
    return {
        **common,
        "steps_per_s": len(steps) / seconds,
        "pairs_per_s": len(steps) * micro_batch / seconds,
        "real_tokens_per_step": statistics.fmean(s["real_tokens"] for s in steps),
        "padding_fraction": 1 - sum(s["real_tokens"] for s in steps) / sum(s["positions"] for s in steps),
        "pairs": run["pairs"],
    }


def summarize_precompute(run: dict[str, Any]) -> dict[str, Any]:
    """The one-off pass: every turn of it counts (its first forward is part of the one-off cost)."""
    seconds = sum(s["seconds"] for s in run["in_turns"])
    return {
        "pairs": run["pairs"],
        "batches": run["batches"],
        "seconds": seconds,
        "pairs_per_s": run["pairs"] / seconds,
        "cores_used": sum(s["cpu_seconds"] for s in run["in_turns"]) / seconds,
        "forward_seconds_median": statistics.median(s["seconds"] for s in run["in_turns"][:-1]),
        "caching_seconds": run["in_turns"][-1]["seconds"],
        "at_build_seconds": run["at_build"]["seconds"],
        "at_build_cores_used": run["at_build"]["cpu_seconds"] / run["at_build"]["seconds"],
    }


def sft_comparisons(
    summaries: dict[str, dict[str, Any]], settings: list[SftSetting], pool_padding: dict[str, float]
) -> list[dict[str, Any]]:
    """Each packed candidate against each padded one at the same max_len.

    The ceiling is what removing padding alone could give if a step cost the same per position whether it
    is padding or not: 1 / (1 - padded's padding fraction). Packing cannot beat it by removing padding; it
    falls short of it when packed positions cost more than padded ones (the attention over a concatenated
    row grows with its square). The pool ceiling uses the padding expected over the whole pool instead of
    the few batches timed.
    """
    comparisons = []
    for packed in (s for s in settings if s.packed):
        for padded in (s for s in settings if not s.packed and s.max_len == packed.max_len):
            a, b = summaries[packed.name], summaries[padded.name]
            ratio = a["real_tokens_per_s"] / b["real_tokens_per_s"]
            comparisons.append(
                {
                    "packed": packed.name,
                    "padded": padded.name,
                    "ratio_real_tokens_per_s": ratio,
                    "ratio_loss_tokens_per_s": a["loss_tokens_per_s"] / b["loss_tokens_per_s"],
                    "ratio_median_step_real_tokens_per_s": a["real_tokens_per_s_median_step"]
                    / b["real_tokens_per_s_median_step"],
                    "padding_only_ceiling": 1 / (1 - b["padding_fraction"]),
                    "padding_only_ceiling_pool": 1 / (1 - pool_padding[padded.name]),
                    "meets_2x": ratio >= TARGET_RATIO,
                }
            )
    return comparisons


# --- 4. report -----------------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    env, params = results["environment"], results["parameters"]
    lines = [
        f"Tiny Mistral (hidden {env['model']['hidden_size']}, {env['model']['layers']} layers, vocabulary "
        f"{env['model']['vocab_size']:,}), fp32, attention {env['model']['attention']}, CPU; torch threads "
        f"{env['torch_threads']} "
        f"({env['cpus']} CPUs). Candidates of a table train in turns, one optimizer step each, each in its "
        f"own thread on a fresh model with the same weights (seed {SEED}); {params['warmup']} warm-up steps "
        f"each are not timed. Load average {env['load_average_before'][0]:.2f} before, "
        f"{env['load_average_after'][0]:.2f} after.",
        "",
        f"SFT, {params['sft_steps']} timed steps per candidate over one pool of {params['sft_rows']} synthetic "
        f"rows: log-normal lengths (median {SFT_MEDIAN}, sigma {SFT_SIGMA}, min {SFT_MIN}, clipped at "
        f"max_len), the first {PROMPT_SHARE:.0%} of each row masked.",
        "",
        "| run | rows/step | positions/step | widest row | padding (pool) | attention scores/step | "
        "step s (median) | cores used | real tokens/s | loss tokens/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in results["sft"].items():
        pool = results["sft_pool_padding"].get(name)
        padding = f"{s['padding_fraction']:.1%}" + (f" ({pool:.1%})" if pool is not None else "")
        lines.append(
            f"| {name} | {s['rows_per_step']:.1f} | {s['positions_per_step']:,.0f} | {s['max_width']:,} | "
            f"{padding} | {s['attention_scores_per_step'] / 1e6:,.1f}M | {s['step_seconds_median']:.2f} | "
            f"{s['cores_used']:.2f} | {s['real_tokens_per_s']:,.0f} | {s['loss_tokens_per_s']:,.0f} |"
        )
    lines += [
        "",
        "Padding: pad positions over all positions computed in the timed steps (in brackets, expected over "
        "random batches of the whole pool). Attention scores: query x key products per layer and head, each "
        "row's full width squared (SDPA with a mask computes them all). Cores used: the process's CPU time "
        "over wall time while the step ran. Real tokens: non-pad input tokens; loss tokens: those with a "
        "label. The padding-only ceiling, 1 / (1 - padded's padding), is what removing padding alone gives "
        "if every position costs the same.",
        "",
        "| packed / padded | real tokens/s | loss tokens/s | padding-only ceiling (pool) | >= 2x |",
        "| --- | ---: | ---: | ---: | :---: |",
    ]
    for c in results["sft_comparisons"]:
        lines.append(
            f"| {c['packed']} / {c['padded']} | **{c['ratio_real_tokens_per_s']:.2f}x** | "
            f"{c['ratio_loss_tokens_per_s']:.2f}x | {c['padding_only_ceiling']:.2f}x "
            f"({c['padding_only_ceiling_pool']:.2f}x) | {'yes' if c['meets_2x'] else 'NO'} |"
        )
    dpo = results.get("dpo")
    if dpo:
        ref, pre, once = dpo["reference_model"], dpo["precomputed"], dpo["precompute"]
        pairs = ref["pairs"]
        epoch_ref, epoch_pre = pairs / ref["pairs_per_s"], pairs / pre["pairs_per_s"]
        saved = epoch_ref - epoch_pre
        payback = (
            f"pays for itself after {once['seconds'] / saved:.2f} epochs"
            if saved > 0
            else "never pays for itself here"
        )
        lines += [
            "",
            f"DPO, micro batch {params['dpo_micro_batch']} pairs, max_len {params['dpo_max_len']}, one epoch of "
            f"{pairs} synthetic pairs ({params['dpo_steps']} timed steps): log-normal lengths, prompt median "
            f"{DPO_PROMPT[0]}, chosen {DPO_CHOSEN[0]}, rejected {DPO_REJECTED[0]}. The one-off precompute pass "
            f"takes turns with the steps, one micro batch a turn (all {once['batches']} batches and the caching "
            "counted).",
            "",
            "| run | real tokens/step | step s (median) | cores used | steps/s | pairs/s | one-off precompute |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| reference model in memory | {ref['real_tokens_per_step']:,.0f} | "
            f"{ref['step_seconds_median']:.2f} | {ref['cores_used']:.2f} | {ref['steps_per_s']:.2f} | "
            f"{ref['pairs_per_s']:.2f} | |",
            f"| precompute_ref_log_probs | {pre['real_tokens_per_step']:,.0f} | "
            f"{pre['step_seconds_median']:.2f} | {pre['cores_used']:.2f} | {pre['steps_per_s']:.2f} | "
            f"{pre['pairs_per_s']:.2f} | {once['seconds']:.2f} s for {pairs} pairs ({once['pairs_per_s']:.1f} "
            f"pairs/s, {once['cores_used']:.2f} cores) |",
            "",
            f"Precomputed / reference, training pairs/s: **{pre['pairs_per_s'] / ref['pairs_per_s']:.2f}x**. "
            f"An epoch of these {pairs} pairs: {epoch_ref:.1f} s with the reference model, {epoch_pre:.1f} s "
            f"with precomputed log-probs, {epoch_pre + once['seconds']:.1f} s counting the pass "
            f"({epoch_ref / (epoch_pre + once['seconds']):.2f}x); the pass {payback}. (The same pass timed on "
            f"its own while the trainer was built, outside the turns: {once['at_build_seconds']:.2f} s.)",
        ]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    from importlib.metadata import version

    import torch

    from hermes_pipeline.tiny import build_tiny_model

    config = build_tiny_model(seed=SEED).config
    packages = ("torch", "transformers", "trl", "accelerate", "datasets")
    return {
        "model": {
            "hidden_size": config.hidden_size,
            "layers": config.num_hidden_layers,
            "vocab_size": config.vocab_size,
            "attention": config._attn_implementation,
        },
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "packages": {name: version(name) for name in packages},
    }


# --- main ----------------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every run")
    parser.add_argument("--steps", type=int, default=20, help="timed SFT steps per candidate")
    parser.add_argument(
        "--max-lens", type=int_list, default=[1024], help="SFT max_len values, comma-separated"
    )
    parser.add_argument("--micro-batch", type=int, default=4, help="SFT micro batch, packed and padded")
    parser.add_argument(
        "--extra-packed-micro-batches",
        type=int_list,
        default=[1],
        help="further packed micro batches timed against the padded one (comma-separated; '' for none)",
    )
    parser.add_argument("--sft-rows", type=int, default=512, help="rows in the SFT pool (at least)")
    parser.add_argument("--dpo-steps", type=int, default=16, help="timed DPO steps per candidate")
    parser.add_argument("--dpo-micro-batch", type=int, default=2, help="DPO micro batch, in pairs")
    parser.add_argument("--dpo-max-len", type=int, default=1024, help="DPO max_length")
    parser.add_argument("--no-dpo", action="store_true", help="skip the DPO part")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--json", type=Path, help="also write every step's figures here as JSON")
    return parser.parse_args()


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def quiet() -> None:
    """Progress bars and per-trainer warnings would bury the table; the figures do not depend on them."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's precompute loop reads it
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    # transformers 5 renames gradient_checkpointing; stage.py still passes the old name, and so do we.
    warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> None:
    args = parse_args()
    quiet()
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results: dict[str, Any] = {"environment": environment()}
    results["environment"]["load_average_before"] = os.getloadavg()
    steps = args.warmup + args.steps
    dpo_steps = args.warmup + args.dpo_steps
    # Enough rows that the hungriest candidate never runs out: a packed sequence holds ~max_len / 340 rows.
    hungriest = max(max(args.micro_batch, *args.extra_packed_micro_batches, 1) * m for m in args.max_lens)
    pool = max(args.sft_rows, 2 * steps * hungriest // 340)
    results["parameters"] = {
        "warmup": args.warmup,
        "sft_steps": args.steps,
        "sft_rows": pool,
        "max_lens": args.max_lens,
        "micro_batch": args.micro_batch,
        "extra_packed_micro_batches": args.extra_packed_micro_batches,
        "dpo_steps": args.dpo_steps,
        "dpo_micro_batch": args.dpo_micro_batch,
        "dpo_max_len": args.dpo_max_len,
        "seed": SEED,
    }

    # 1. SFT: one table per max_len, its candidates in turns over the same pool
    sft_runs: dict[str, dict[str, Any]] = {}
    settings: list[SftSetting] = []
    results["sft_pool_padding"] = {}
    for max_len in dict.fromkeys(args.max_lens):
        group = [SftSetting(True, args.micro_batch, max_len), SftSetting(False, args.micro_batch, max_len)]
        extra = dict.fromkeys(mb for mb in args.extra_packed_micro_batches if mb != args.micro_batch)
        group += [SftSetting(True, mb, max_len) for mb in extra]
        rows = sft_rows(SEED, pool, max_len)
        for setting in group:
            if not setting.packed:
                results["sft_pool_padding"][setting.name] = padding_over_pool(rows, setting.micro_batch, SEED)
        runs = run_sft(group, rows, steps, args.threads)
        sft_runs.update(runs)
        settings += group
        for name, run in runs.items():
            progress(f"sft {name}: {steps} steps, {sum(s['seconds'] for s in run['steps']):.1f}s")
    results["sft"] = {name: summarize_sft(run, args.warmup) for name, run in sft_runs.items()}
    results["sft_comparisons"] = sft_comparisons(results["sft"], settings, results["sft_pool_padding"])

    # 2. DPO: with and without precompute, in turns over the same pairs
    if not args.no_dpo:
        pairs = dpo_pairs(SEED, dpo_steps * args.dpo_micro_batch, args.dpo_max_len)
        dpo_runs = run_dpo(pairs, args.dpo_micro_batch, args.dpo_max_len, args.threads)
        results["dpo"] = {"precompute": summarize_precompute(dpo_runs["precompute"])}
        for name in ("reference_model", "precomputed"):
            run = dpo_runs[name]
            progress(f"dpo {name}: {dpo_steps} steps, {sum(s['seconds'] for s in run['steps']):.1f}s")
            results["dpo"][name] = summarize_dpo(run, args.warmup, args.dpo_micro_batch)
        progress(f"dpo precompute pass: {results['dpo']['precompute']['seconds']:.1f}s")
        results["dpo_runs"] = dpo_runs

    results["environment"]["load_average_after"] = os.getloadavg()
    results["wall_seconds"] = time.perf_counter() - started
    results["sft_runs"] = sft_runs
    print(markdown(results))
    print(f"\nWall time {results['wall_seconds']:.0f} s.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
