"""One GPU check of the training path: attention kernels, packing, memory against `plan`, DPO, QLoRA, and
packed loss, in a single call of a few minutes.

Why: GPU time comes in short lent slots, so everything the pipeline claims about training on a GPU is
measured in one run, through the code a stage runs (hermes_pipeline/models.py builds the model, train/data.py
opens prep's shards, train/stage.py configures TRL's trainers), and written down as JSON. A part that cannot run
here is recorded as skipped with its reason, a part that breaks as failed with its error, and no figure that
was not measured is printed.

    python benchmarks/gpu_check.py [--out runs/gpu_check]    # one GPU: 434 s on an H200 (BENCHMARKS.md)
    python benchmarks/gpu_check.py --runs qlora              # only some runs (sft, dpo, qlora)
    python benchmarks/gpu_check.py --tiny [--out DIR]         # what CI runs: seconds on a 2-core CPU

Each run is printed and the JSON rewritten as soon as it ends, so that a call stopped at the end of its GPU
slot keeps what it measured; runs not started by --deadline seconds (default 420) are skipped, saying so.

Parts (JSON key, then what it measures):
  a_sft_attention  SFT steps of a 1.1B Llama-shaped model (TinyLlama-1.1B's shape, random init, bf16,
                   max_len 4096, packed rows, no activation checkpointing) with each attention path that
                   keeps packed rows apart (flash_attention_2, sdpa, flex_attention), Liger kernels off and
                   on. Tokens/s, and MFU: model FLOPs over measured step time against the bf16 peak of a
                   large torch.matmul measured in the same run (the matmul_peak entry). Model FLOPs follow
                   PaLM's count: 6 x matmul weights x real tokens, plus attention 12 x layers x heads x
                   head_dim x the sum of each row's length squared (rows packed together do not attend to
                   each other, so their scores are not counted);
  b_packing        packed against padded SFT (sdpa, the same micro batch, the same rows) in real (non-pad)
                   tokens/s. Rows are synthetic, with seeded log-normal lengths meant to resemble OpenHermes-2.5
                   (train_throughput.py's generator: median 250 tokens, sigma 0.9), not the real data;
  c_memory         each run's peak GPU memory (torch.cuda.max_memory_allocated) beside `plan`'s estimate for
                   the same recipe (the estimate adds a fixed 2 GiB for the CUDA context and allocator slack,
                   which max_memory_allocated does not see);
  d_dpo            DPO steps with a reference model in memory and with precomputed reference log-probs (that
                   trainer's build time includes the precompute pass);
  e_qlora          QLoRA steps: the same model saved, reloaded as a bitsandbytes NF4 base with LoRA adapters;
  f_packed_loss    per attention path, the loss of rows packed into one padding-free row against their loss as
                   a padded batch, on the fresh model before training, every token labelled. In fp32 a
                   leak across a row boundary shows (dropping the position ids moved the tiny model's loss
                   by 1.2e-4, against 1e-5 allowed); a random-init model barely uses its context, so in
                   bf16, with its looser tolerance, a leak may hide: read relative_difference too.

--tiny runs the same parts with the shipped tiny Llama config and tokenizer, short rows and two steps a run
(one untimed) on whatever device is there; on a CPU (fp32) the parts that need a GPU are skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from train_throughput import dpo_pairs, prepare, quiet, sft_rows
from transformers import AutoTokenizer, TrainerCallback
from transformers.utils import is_flash_attn_2_available

from hermes_pipeline.chat_format.tokens import save_tokenizer
from hermes_pipeline.memory import GIB
from hermes_pipeline.models import load_model
from hermes_pipeline.plan import build_plan
from hermes_pipeline.recipe.loader import load_recipe
from hermes_pipeline.recipe.schema import Recipe
from hermes_pipeline.rundir import stage_dir
from hermes_pipeline.tiny import load_tiny_tokenizer
from hermes_pipeline.train.data import COLUMNS
from hermes_pipeline.train.model import starting_point
from hermes_pipeline.train.stage import build_trainer, training_args

ROOT = Path(__file__).resolve().parents[1]
# The base every run's recipe overrides: its data sources are never read (the shards are written here).
BASE_RECIPE = ROOT / "configs" / "recipes" / "tiny.yaml"
TINY_LLAMA = ROOT / "configs" / "models" / "tiny-llama.json"
# TinyLlama-1.1B's shape on top of the tiny Llama config: a Llama block with grouped-query attention and a
# 32k vocabulary, large enough to keep an H100 busy, small enough that a run builds in seconds.
ONE_B = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}
SEED = 2024
# Relative difference allowed between packed and padded loss: summation order only in fp32; bf16 kernels
# round differently for a padded batch than for one long row.
LOSS_TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}
MATMUL_SIZE = 8192
PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "accelerate",
    "peft",
    "datasets",
    "deepspeed",
    "liger-kernel",
    "bitsandbytes",
    "flash-attn",
)
# Runs a call may choose (--runs): a, b and f come from the same SFT runs.
GROUPS = ("sft", "dpo", "qlora")
PARTS = ("a_sft_attention", "b_packing", "c_memory", "d_dpo", "e_qlora", "f_packed_loss")


@dataclass(frozen=True)
class Scale:
    """How big the check is: the 1B GPU run, or --tiny."""

    model: dict[str, Any]  # overrides on the tiny Llama config
    max_len: int
    micro_batch: int  # SFT packed sequences (padded: rows) per step
    dpo_micro_batch: int  # pairs per step
    warmup: int  # untimed steps per run (CUDA warm-up, flex attention's compilation)
    steps: int  # timed steps per run
    loss_rows: int  # rows in the packed-loss check


FULL = Scale(ONE_B, max_len=4096, micro_batch=2, dpo_micro_batch=2, warmup=3, steps=8, loss_rows=8)
TINY = Scale({}, max_len=256, micro_batch=2, dpo_micro_batch=2, warmup=1, steps=1, loss_rows=4)


# --- 1. inputs: a model config, and shards laid out as prep writes them ------------------------------------


def write_inputs(work: Path, scale: Scale) -> list[dict[str, list[int]]]:
    """The model config and a finished-looking prep folder (tokenizer, SFT and DPO shards); returns the SFT
    rows, enough that no run repeats one (rows average about 375 tokens; 300 leaves a margin)."""
    config = json.loads(TINY_LLAMA.read_text(encoding="utf-8")) | scale.model
    (work / "model_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    prep = work / "run" / "prep"
    save_tokenizer(load_tiny_tokenizer(), prep / "tokenizer")
    steps = scale.warmup + scale.steps
    rows = sft_rows(SEED, max(32, 2 * steps * scale.micro_batch * scale.max_len // 300), scale.max_len)
    pairs = dpo_pairs(SEED, steps * scale.dpo_micro_batch, scale.max_len)
    prep_names = {trainer: prep_name for prep_name, trainer in COLUMNS["dpo"].items()}
    for stage, table in (("sft", rows), ("dpo", [{prep_names[k]: v for k, v in p.items()} for p in pairs])):
        (prep / stage).mkdir(parents=True)
        Dataset.from_list(table).to_parquet(prep / stage / "train-00000-of-00001.parquet")
    return rows


def make_recipe(work: Path, scale: Scale, on_gpu: bool, *overrides: str) -> Recipe:
    """The tiny recipe turned into this check's: the model, sequence length, precision and steps, one
    process (a GPU if there is one), no tracking, nothing saved; `overrides` change a run's settings."""
    precision, dtype = ("bf16", "bfloat16") if on_gpu else ("fp32", "float32")
    settings = [
        f"run_dir={work / 'run'}",
        f"model.config={work / 'model_config.json'}",
        f"model.dtype={dtype}",
        f"data.max_seq_len={scale.max_len}",
        "tracking.mode=disabled",
        "dpo.init_from=base",
    ]
    for stage, micro_batch in (("sft", scale.micro_batch), ("dpo", scale.dpo_micro_batch)):
        settings += [
            f"{stage}.precision={precision}",
            f"{stage}.micro_batch_size={micro_batch}",
            f"{stage}.gradient_accumulation_steps=1",
            f"{stage}.max_steps={scale.warmup + scale.steps}",
            f"{stage}.gradient_checkpointing=false",
            f"{stage}.resources.gpus_per_node={int(on_gpu)}",
            f"{stage}.resources.processes_per_node=1",
        ]
    return load_recipe(BASE_RECIPE, [*settings, *overrides])


def with_attention(recipe: Recipe, attention: str) -> Recipe:
    """The recipe with another attention path. model_copy skips validation: the schema offers sdpa,
    flash_attention_2 and eager, and flex_attention (which also keeps packed rows apart) is not a recipe
    option yet."""
    model = recipe.model.model_copy(update={"attn_implementation": attention})
    return recipe.model_copy(update={"model": model})


# --- 2. measuring ------------------------------------------------------------------------------------------


def synchronized_time() -> float:
    """Wall time once the GPU's queue is drained, so that a step's time includes its own kernels."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class StepClock(TrainerCallback):
    """The end time of every optimizer step; a step's time runs from the previous step's end (or the start
    of training), so it includes fetching and collating its batch."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        self.ends = [synchronized_time()]

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.ends.append(synchronized_time())


def matmul_peak_tflops() -> float:
    """The bf16 matmul throughput this GPU reaches on a large square product: the denominator of MFU."""
    a, b = (torch.randn(MATMUL_SIZE, MATMUL_SIZE, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        torch.matmul(a, b)
    repeats = 30
    started = synchronized_time()
    for _ in range(repeats):
        torch.matmul(a, b)
    seconds = synchronized_time() - started
    return 2 * MATMUL_SIZE**3 * repeats / seconds / 1e12


def model_flops(model: torch.nn.Module, batch: dict[str, int]) -> float:
    """Training FLOPs of one step by PaLM's count (see the module docstring); embeddings are lookups."""
    config = model.config
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention_width = config.num_attention_heads * config.head_dim
    attention = 12 * config.num_hidden_layers * attention_width * batch["attention_scores_needed"]
    return 6 * matmul_weights * batch["real_tokens"] + attention


def train_timed(trainer: Any, warmup: int, peak_tflops: float | None) -> dict[str, Any]:
    """Train the trainer's max_steps and report the steps after `warmup`: speed, MFU, peak memory."""
    batches: list[dict[str, int]] = []
    prepare(trainer, batches)
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    seconds = [end - start for start, end in zip(clock.ends, clock.ends[1:], strict=False)]
    timed = list(zip(seconds, batches, strict=False))[warmup:]  # the loader may collate one batch ahead
    total = sum(s for s, _ in timed)
    real = sum(b["real_tokens"] for _, b in timed)
    positions = sum(b["positions"] for _, b in timed)
    record: dict[str, Any] = {
        "timed_steps": len(timed),
        "step_seconds": [round(s, 4) for s, _ in timed],
        "tokens_per_s": positions / total,
        "real_tokens_per_s": real / total,
        "padding_fraction": 1 - real / positions,
    }
    if peak_tflops is not None:
        flops = sum(model_flops(trainer.model, b) for _, b in timed)
        record["model_tflops_per_s"] = flops / total / 1e12
        record["mfu"] = flops / total / 1e12 / peak_tflops
    if torch.cuda.is_available():
        record["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / GIB
    return record


def packed_loss_check(trainer: Any, rows: list[dict[str, list[int]]], tolerance: float) -> dict[str, Any]:
    """Loss of `rows` as one padding-free row (the trainer's own collator) against the same rows as a
    padded batch (that collator with padding_free off, as packing: false builds it)."""
    examples = [{"input_ids": row["input_ids"], "labels": row["input_ids"]} for row in rows]
    batches = {"packed": trainer.data_collator(examples)}
    batches["padded"] = replace(trainer.data_collator, padding_free=False)(examples)
    trainer.model.eval()  # the metrics TRL logs while computing a loss go to its eval bucket
    with torch.no_grad():
        losses = {
            name: float(trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch)))
            for name, batch in batches.items()
        }
    trainer.model.train()
    difference = abs(losses["packed"] - losses["padded"]) / abs(losses["padded"])
    return {
        "packed_loss": losses["packed"],
        "padded_loss": losses["padded"],
        "relative_difference": difference,
        "tolerance": tolerance,
        "equal": difference <= tolerance,
    }


def plan_gib(recipe: Recipe, stage: str) -> dict[str, float]:
    """`plan`'s memory estimate for this recipe's stage, in GiB, term by term."""
    planned = next(s for s in build_plan(recipe).stages if s.name == stage)
    assert planned.training is not None
    return planned.training.memory.as_gib()


def release() -> None:
    """Free what the last run left, so that the next one's peak memory is its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def attempt(measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One measurement. A failure is recorded (its error's first line) rather than raised, so that one
    broken kernel does not cost the other parts their share of the GPU slot."""
    release()
    try:
        return {"status": "measured", **measure()}
    except Exception as error:
        traceback.print_exc()
        first_line = next(iter(str(error).splitlines()), "")
        return {"status": "failed", "reason": f"{type(error).__name__}: {first_line}"}
    finally:
        release()


def skipped(reason: str) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason}


class Record:
    """The check's results as they come: each run is printed as soon as it ends and the JSON rewritten, so
    that a call stopped at its time limit still returns every figure measured before; past the deadline the
    remaining runs are skipped, saying so."""

    def __init__(self, out: Path, header: dict[str, Any], deadline_s: float) -> None:
        self.out, self.header, self.deadline_s = out, header, deadline_s
        self.started = time.perf_counter()
        self.parts: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in PARTS}

    def measure(self, part: str, name: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started
        if elapsed > self.deadline_s:
            return self.skip(
                part, name, f"out of time: {elapsed:.0f} s spent, the deadline is {self.deadline_s:.0f} s"
            )
        return self.put(part, name, attempt(measure))

    def skip(self, part: str, name: str, reason: str) -> dict[str, Any]:
        return self.put(part, name, skipped(reason))

    def put(self, part: str, name: str, entry: dict[str, Any]) -> dict[str, Any]:
        self.parts[part][name] = entry
        print(line(part, name, entry), flush=True)
        self.save(complete=False)
        return entry

    def save(self, complete: bool) -> dict[str, Any]:
        results = {
            **self.header,
            "complete": complete,
            "parts": self.parts,
            "wall_seconds": time.perf_counter() - self.started,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        return results


# --- 3. the runs -------------------------------------------------------------------------------------------


def sft_run(
    recipe: Recipe, liger: bool, warmup: int, peak_tflops: float | None, check: Callable[[Any], Any] | None
) -> dict[str, Any]:
    """One SFT run as train/stage.py builds it (minus checkpoints); `check` looks at the fresh trainer."""
    args = replace(
        training_args(recipe, "sft"), save_strategy="no", disable_tqdm=True, use_liger_kernel=liger
    )
    stage_dir(recipe, "sft").mkdir(parents=True, exist_ok=True)  # for the metrics log
    trainer, _ = build_trainer(recipe, "sft", args, starting_point(recipe, "sft"))
    record: dict[str, Any] = {"packed_loss_check": check(trainer)} if check else {}
    mfu_peak = peak_tflops if recipe.sft.mode == "full" else None  # adapters: 6N does not hold
    return record | train_timed(trainer, warmup, mfu_peak) | {"plan_gib": plan_gib(recipe, "sft")}


def dpo_run(recipe: Recipe, warmup: int) -> dict[str, Any]:
    args = replace(training_args(recipe, "dpo"), save_strategy="no", disable_tqdm=True)
    stage_dir(recipe, "dpo").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    trainer, _ = build_trainer(recipe, "dpo", args, starting_point(recipe, "dpo"))
    build_seconds = time.perf_counter() - started
    pairs = recipe.dpo.micro_batch_size
    timed = train_timed(trainer, warmup, None)
    return {
        "build_seconds": build_seconds,
        "pairs_per_s": pairs * timed["timed_steps"] / sum(timed["step_seconds"]),
        **timed,
        "plan_gib": plan_gib(recipe, "dpo"),
    }


def qlora_run(work: Path, recipe: Callable[..., Recipe], warmup: int) -> dict[str, Any]:
    """QLoRA starts from a saved model (stage.py quantizes while loading it), so the random init is saved
    first; the LoRA settings are the recipe defaults."""
    full = recipe()
    tokenizer = AutoTokenizer.from_pretrained(stage_dir(full, "prep") / "tokenizer")
    load_model(full, full.sft, tokenizer, None).save_pretrained(work / "base")
    qlora = recipe("model.init=pretrained", f"model.name_or_path={work / 'base'}", "sft.mode=qlora")
    return sft_run(qlora, liger=False, warmup=warmup, peak_tflops=None, check=None)


# --- 4. the parts ------------------------------------------------------------------------------------------


def attention_paths(on_gpu: bool) -> dict[str, str | None]:
    """The attention implementations transformers keeps packed rows apart with, each with the reason it
    cannot run here (None: it can), the recipe default first. flash_attention_2 reads the rows' boundaries
    (cu_seq_lens); sdpa and flex_attention get a block-diagonal mask built from the position ids."""
    flash = None
    if not on_gpu:
        flash = "needs CUDA"
    elif not is_flash_attn_2_available():
        flash = "flash_attn is not installed, or does not fit this torch and CUDA"
    flex = (
        None if on_gpu else "FlexAttention has no backward pass on a CPU (torch raises NotImplementedError)"
    )
    return {"sdpa": None, "flex_attention": flex, "flash_attention_2": flash}


def liger_blocker(on_gpu: bool) -> str | None:
    if find_spec("liger_kernel") is None:
        return "liger_kernel is not installed"
    return None if on_gpu else "Liger's Triton kernels need a GPU"


def qlora_blocker(on_gpu: bool) -> str | None:
    if find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    return None if on_gpu else "bitsandbytes' 4-bit training needs CUDA"


def run_parts(work: Path, scale: Scale, on_gpu: bool, record: Record, groups: set[str]) -> None:
    """Every part of the chosen groups (GROUPS), the most telling runs first (a deadline skips the tail).
    Runs are shared: b compares a padded run with a's packed sdpa run, f holds the checks made on a's fresh
    models, c the peak memory of every run beside plan's estimate."""
    peak = None
    if on_gpu:
        matmul = record.measure(
            "a_sft_attention", "matmul_peak", lambda: {"bf16_tflops": matmul_peak_tflops()}
        )
        peak = matmul.get("bf16_tflops")
    else:
        record.skip(
            "a_sft_attention", "matmul_peak", "no CUDA: MFU is measured against a GPU's bf16 matmul peak"
        )

    rows = write_inputs(work, scale)
    recipe = partial(make_recipe, work, scale, on_gpu)
    tolerance = LOSS_TOLERANCE[recipe().sft.precision]
    check = partial(packed_loss_check, rows=rows[: scale.loss_rows], tolerance=tolerance)

    if "sft" in groups:
        sft_parts(record, recipe, scale, on_gpu, peak, check)
    if "dpo" in groups:
        for name, precompute in (("reference model", "false"), ("precomputed", "true")):
            dpo = recipe(f"dpo.precompute_ref_log_probs={precompute}")
            record.measure("d_dpo", name, partial(dpo_run, dpo, scale.warmup))
    if "qlora" in groups:
        reason = qlora_blocker(on_gpu)
        if reason:
            record.skip("e_qlora", "qlora", reason)
        else:
            record.measure("e_qlora", "qlora", partial(qlora_run, work, recipe, scale.warmup))

    runs = ("a_sft_attention", "b_packing", "d_dpo", "e_qlora")
    for name, run in [item for part in runs for item in record.parts[part].items()]:
        if "plan_gib" in run:
            estimate = {"plan_gib": run.pop("plan_gib")}
            entry = (
                {"status": "measured", "peak_gpu_memory_gib": run["peak_gpu_memory_gib"], **estimate}
                if "peak_gpu_memory_gib" in run
                else {**skipped("no CUDA: torch.cuda.max_memory_allocated needs a GPU"), **estimate}
            )
            record.put("c_memory", name, entry)


def sft_parts(
    record: Record,
    recipe: Callable[..., Recipe],
    scale: Scale,
    on_gpu: bool,
    peak: float | None,
    check: Callable[[Any], dict[str, Any]],
) -> None:
    """a, b and f: packed SFT with each attention path, Liger off and on (the packed-loss check on each
    path's fresh model), and the padded run."""

    def sft(attention: str, liger: bool) -> None:
        name = f"packed {attention}" + (" +liger" if liger else "")
        reason = attention_paths(on_gpu)[attention] or (liger_blocker(on_gpu) if liger else None)
        if reason:
            record.skip("a_sft_attention", name, reason)
        else:
            loss_check = None if liger else check
            run = partial(sft_run, with_attention(recipe(), attention), liger, scale.warmup, peak, loss_check)
            record.measure("a_sft_attention", name, run)
        if not liger:
            plain = record.parts["a_sft_attention"][name]
            measured = plain["status"] == "measured"
            loss = {"status": "measured", **plain.pop("packed_loss_check")} if measured else dict(plain)
            record.put("f_packed_loss", attention, loss)

    sft("sdpa", liger=False)
    packed = record.parts["a_sft_attention"]["packed sdpa"]
    keep = ("status", "reason", "real_tokens_per_s", "padding_fraction")
    record.put("b_packing", "packed sdpa", {k: packed[k] for k in keep if k in packed})
    padded = record.measure(
        "b_packing",
        "padded sdpa",
        partial(sft_run, recipe("sft.packing=false"), False, scale.warmup, peak, None),
    )
    if packed["status"] == padded["status"] == "measured":
        ratio = packed["real_tokens_per_s"] / padded["real_tokens_per_s"]
        record.put(
            "b_packing", "packed over padded", {"status": "measured", "real_tokens_per_s_ratio": ratio}
        )
    sft("sdpa", liger=True)
    for attention in ("flex_attention", "flash_attention_2"):
        sft(attention, liger=False)
        sft(attention, liger=True)


# --- 5. report ---------------------------------------------------------------------------------------------


def figures(entry: dict[str, Any]) -> str:
    """The measured figures of one entry, in a few words; only keys that were measured are present."""
    shown = []
    if "bf16_tflops" in entry:
        shown.append(f"{entry['bf16_tflops']:.0f} TFLOP/s bf16 matmul")
    if "real_tokens_per_s" in entry:
        shown.append(f"{entry['real_tokens_per_s']:,.0f} real tokens/s")
    if "padding_fraction" in entry and entry["padding_fraction"] > 0:
        shown.append(f"padding {entry['padding_fraction']:.0%}")
    if "mfu" in entry:
        shown.append(f"MFU {entry['mfu']:.1%}")
    if "pairs_per_s" in entry:
        shown.append(f"{entry['pairs_per_s']:.2f} pairs/s, built in {entry['build_seconds']:.1f} s")
    if "real_tokens_per_s_ratio" in entry:
        shown.append(f"{entry['real_tokens_per_s_ratio']:.2f}x real tokens/s")
    if "peak_gpu_memory_gib" in entry:
        shown.append(f"peak {entry['peak_gpu_memory_gib']:.2f} GiB")
    if "plan_gib" in entry and "peak_gpu_memory_gib" in entry:
        shown.append(f"plan {entry['plan_gib']['total']:.2f} GiB")
    if "relative_difference" in entry:
        verdict = "equal" if entry["equal"] else "NOT EQUAL"
        shown.append(
            f"packed {entry['packed_loss']:.5f} / padded {entry['padded_loss']:.5f}: "
            f"{entry['relative_difference']:.1e} {verdict} (tolerance {entry['tolerance']:.0e})"
        )
    return ", ".join(shown)


def line(part: str, name: str, entry: dict[str, Any]) -> str:
    detail = entry["reason"] if entry["status"] != "measured" else figures(entry)
    return f"{part:<16} {name:<32} {entry['status']:<9} {detail}"


def table(parts: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [f"{'part':<16} {'run':<32} {'status':<9} figures", "-" * 100]
    lines += [line(part, name, entry) for part, entries in parts.items() for name, entry in entries.items()]
    return "\n".join(lines)


def environment(on_gpu: bool) -> dict[str, Any]:
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {
        "device": torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.machine()})",
        "cuda": torch.version.cuda if on_gpu else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "packages": packages,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model, two steps a run (what CI runs)")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="folder for gpu_check.json")
    parser.add_argument(
        "--deadline", type=float, default=420, help="seconds after which the runs not yet started are skipped"
    )
    parser.add_argument(
        "--runs", nargs="+", choices=GROUPS, default=list(GROUPS), help="which runs (default: all)"
    )
    args = parser.parse_args()
    quiet()
    on_gpu = torch.cuda.is_available()
    scale = TINY if args.tiny else FULL
    if args.tiny:
        # A smoke run on a shared 2-core machine: with a second thread, every op of the tiny model waits
        # for the busy core (steps of 3 s instead of 0.15 s, seen here), and its figures are not quoted.
        torch.set_num_threads(1)
    header = {"environment": environment(on_gpu), "scale": {"tiny": args.tiny, **asdict(scale)}}
    record = Record(args.out, header, args.deadline)
    print(f"{header['environment']['device']}: {header['environment']['packages']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        run_parts(Path(folder), scale, on_gpu, record, set(args.runs))
    results = record.save(complete=True)
    failed = [
        f"{part}/{name}"
        for part, entries in record.parts.items()
        for name, entry in entries.items()
        if entry["status"] == "failed" or entry.get("equal") is False
    ]
    print(table(record.parts))
    print(
        f"\n{results['wall_seconds']:.0f} s on {header['environment']['device']}; JSON in {args.out / 'gpu_check.json'}"
    )
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
