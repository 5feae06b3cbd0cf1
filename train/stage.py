"""A training stage (SFT, DPO, or Vision's projector pre-training), from the recipe to a verified model in
the run directory.

Read top to bottom, it is the whole stage: check inputs, configure the trainer, load the model and the
shards prep wrote, resume from the newest sealed checkpoint, train, evaluate, save into a temporary folder,
check the saved model against the one in memory, rename it into place, and write the manifest last.
Every rank runs this function; only rank 0 writes files outside the trainer's own saving.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainingArguments
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from hermes_pipeline.chat_format.tokens import save_tokenizer
from hermes_pipeline.disk import check_free_space, full_disk_in_one_line
from hermes_pipeline.errors import StageInterrupted, UserError
from hermes_pipeline.locks import stage_lock
from hermes_pipeline.models import MODEL_SUBDIR, is_adapter, load_model, load_trained, whole_weights
from hermes_pipeline.recipe.checks import stage_settings
from hermes_pipeline.recipe.schema import DpoStage, Optimization, Recipe, SftStage, TrainStage
from hermes_pipeline.rundir import (
    MANIFEST,
    file_fingerprint,
    is_complete,
    output_damage,
    stage_dir,
    write_manifest,
)
from hermes_pipeline.stages import stage_fingerprint
from hermes_pipeline.train.callbacks import (
    CheckFreeSpace,
    MetricsLog,
    SealCheckpoints,
    StopOnSignal,
    mean_loss,
    trainable_bytes,
)
from hermes_pipeline.train.checkpoints import (
    FinishedResume,
    checkpoint_step,
    checkpoints,
    latest_complete,
    remove_unusable,
)
from hermes_pipeline.train.data import load_split
from hermes_pipeline.train.launch import barrier, is_main_process, launched
from hermes_pipeline.train.model import lora_config, record_adapter_base, starting_point, upstream_manifest
from hermes_pipeline.train.plots import write_plots
from hermes_pipeline.train.probe import PROBE_ROWS, logits, probe_batch, run_facts
from hermes_pipeline.train.tracking import configure_wandb, run_name

if TYPE_CHECKING:
    from hermes_pipeline.train.vision_trainer import HermesVisionTrainer

StageName = Literal["projector", "sft", "dpo"]
# Saved weights must reproduce the in-memory model's logits this closely (fp32 reload of the same weights).
VERIFY_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 5e-2}


class HermesSFTTrainer(FinishedResume, SFTTrainer):
    """TRL's SFTTrainer, resuming a finished run without a step past its end."""


class HermesDPOTrainer(FinishedResume, DPOTrainer):
    """TRL's DPOTrainer over prep's shards, which already hold prompt_ids, chosen_ids and rejected_ids.

    TRL would tokenize conversations itself; ours were rendered by the Hermes template (tools and earlier
    turns included) and tokenized once by data_prep, so its preparation step is skipped.
    """

    def _prepare_dataset(self, dataset: Dataset, *args: Any, **kwargs: Any) -> Dataset:
        return dataset


def check_ready(recipe: Recipe, name: StageName) -> None:
    """What must hold before a stage starts, checked once before any process is launched."""
    stage = stage_settings(recipe, name)
    if isinstance(stage, TrainStage) and not stage.enabled:
        raise UserError(f"{name}.enabled is false in this recipe; nothing to train")
    prep = stage_dir(recipe, "prep")
    if not (prep / MANIFEST).is_file():
        raise UserError(f"{prep}: no finished data prep; run `hermes-pipeline prep` with this recipe first")
    upstream = upstream_manifest(recipe, name)
    if upstream is not None and not upstream.is_file():
        raise UserError(
            f"{name} starts from the {upstream.parent.name} stage's model, which has not finished; run it first"
        )


def run_train(recipe: Recipe, name: StageName, force: bool = False, log: Any = print) -> Path:
    """Train the stage, or skip it when its sealed model matches; the main process holds the stage's lock
    throughout, so a second command on the same stage stops in one line."""
    out = stage_dir(recipe, name)
    with stage_lock(out) if is_main_process() else nullcontext(), full_disk_in_one_line(out):
        return _run_train(recipe, name, force, log)


@dataclass
class Trained:
    """A finished training run, on the main process: its model saved in ``partial``, the logits the trained
    model gave on ``probe`` (which the saved one must reproduce) and what the run measured."""

    partial: Path
    tokenizer: PreTrainedTokenizerBase
    probe: dict[str, torch.Tensor]  # the model's keyword inputs
    expected: torch.Tensor
    facts: dict[str, Any]  # train.probe.run_facts
    resume: Path | None
    tokens_before: int


def _run_train(recipe: Recipe, name: StageName, force: bool, log: Any) -> Path:
    check_ready(recipe, name)
    stage = stage_settings(recipe, name)
    out = stage_dir(recipe, name)
    prep = stage_dir(recipe, "prep")
    source = starting_point(recipe, name)
    fingerprint = stage_fingerprint(recipe, name)
    inputs = _inputs(prep, source, upstream_manifest(recipe, name))
    if not force and is_complete(out, fingerprint, inputs):
        log(f"{name}: up to date in {out} (use --force to redo)")
        return out
    if (damage := output_damage(out)) is not None:
        log(f"{name}: {damage}; training again from the newest sound checkpoint")
    started = time.time()
    if isinstance(stage, TrainStage) and stage.backend == "axolotl":
        from hermes_pipeline.train.axolotl_run import train_with_axolotl

        trained = train_with_axolotl(recipe, name, fingerprint, inputs, force, log)
    else:
        trained = _train_in_process(recipe, name, source, fingerprint, inputs, force, log)
    if trained is not None:
        _seal_model(recipe, name, trained, source, started, fingerprint, inputs, log)
    barrier()
    return out


def _train_in_process(
    recipe: Recipe,
    name: StageName,
    source: str | None,
    fingerprint: str,
    inputs: dict[str, str],
    force: bool,
    log: Any,
) -> Trained | None:
    """Train in this process (one rank of many under a launcher) with TRL, or transformers' Trainer for
    Vision, and save into ``model.partial``; the main process gets what ``_seal_model`` needs, the others
    None."""
    stage = stage_settings(recipe, name)
    out = stage_dir(recipe, name)
    checkpoint_dir = out / "checkpoints"
    args = training_args(recipe, name)
    if stage.deepspeed and launched():
        import deepspeed

        # ZeRO-3 partitions weights while they load, before the Trainer would bring DeepSpeed up.
        deepspeed.init_distributed(dist_backend=args.ddp_backend or "nccl")
    if args.process_index == 0:
        claim_checkpoints(out, fingerprint, inputs, force)
    barrier()

    trainer, stopper = build_trainer(recipe, name, args, source)
    train_set, val_set = trainer.train_dataset, trainer.eval_dataset

    if args.process_index == 0:
        for folder, reason in remove_unusable(checkpoint_dir):
            log(f"{name}: removed {folder.name}: {reason}")
    barrier()
    resume = latest_complete(checkpoint_dir)
    if resume is not None:
        log(f"{name}: resuming from {resume.name}")
    # Read now: the checkpoint may be rotated away while training goes on.
    tokens_before = tokens_seen(resume)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stopper.stopped_at is not None:
        raise StageInterrupted(
            f"{name}: stopped by a signal at step {stopper.stopped_at} after saving a checkpoint; "
            "run the same command again to resume"
        )
    eval_metrics = trainer.evaluate() if val_set is not None else {}

    partial = model_partial(out)
    probe_set = train_set if val_set is None else val_set
    if recipe.vision is not None:
        from hermes_pipeline.train.vision_trainer import vision_probe

        probe = vision_probe(trainer, probe_set)
    else:
        probe = {"input_ids": probe_rows(probe_set, "input_ids" if name == "sft" else "prompt_ids")}
    expected = logits(trainer.model, probe)
    check_free_space(
        out,
        trainable_bytes(trainer.model),
        then="free some space there and run the same command again: it resumes from the last checkpoint",
        what="the trained model",
    )
    trainer.save_model(str(partial))
    if args.process_index != 0:
        return None
    facts = run_facts(trainer, result.metrics, eval_metrics)
    return Trained(partial, trainer.processing_class, probe, expected, facts, resume, tokens_before)


def _seal_model(
    recipe: Recipe,
    name: StageName,
    trained: Trained,
    source: str | None,
    started: float,
    fingerprint: str,
    inputs: dict[str, str],
    log: Any,
) -> None:
    """Check the saved model against the trained one, rename it into place, write the summary and the
    manifest last. Runs on the main process only."""
    stage = stage_settings(recipe, name)
    out = stage_dir(recipe, name)
    final, partial = out / MODEL_SUBDIR, trained.partial
    save_tokenizer(trained.tokenizer, partial)
    if is_adapter(partial):
        record_adapter_base(partial, source)
    with whole_weights():
        reloaded = load_trained(recipe, loading_rules(recipe, name), partial, trained.tokenizer)
    difference = float((logits(reloaded, trained.probe) - trained.expected).abs().max())
    if not difference <= VERIFY_TOLERANCE[stage.precision]:  # NaN fails too
        raise RuntimeError(
            f"{name}: the saved model's logits differ from the trained model's by {difference}"
        )
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    plots = write_plots(out / "metrics.jsonl", name, out / "plots")
    summary = _summary(trained, started, difference, final, plots)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_manifest(
        out,
        fingerprint,
        inputs,
        started,
        extra={"summary": summary},
        skip=("checkpoints", "cache", "wandb", "axolotl"),
    )
    log(_format_summary(name, summary))


def build_trainer(
    recipe: Recipe, name: StageName, args: TrainingArguments, source: str | None
) -> tuple[SFTTrainer | HermesDPOTrainer | HermesVisionTrainer, StopOnSignal]:
    """The trainer for a stage (TRL's for text, transformers' for Vision), over prep's tokenizer and shards,
    with our callbacks attached."""
    prep = stage_dir(recipe, "prep")
    out = stage_dir(recipe, name)
    tokenizer = AutoTokenizer.from_pretrained(prep / "tokenizer")
    cache = out / "cache"
    stopper = StopOnSignal()
    images = recipe.vision is not None
    train_set = load_split(prep, name, "train", cache, images)
    val_set = load_split(prep, name, "val", cache, images)
    callbacks = [SealCheckpoints(tokenizer), stopper, CheckFreeSpace(), MetricsLog(out / "metrics.jsonl")]
    if recipe.vision is not None:
        # Imported here: LLaVA's and SigLIP's modules take seconds to import, which only Vision needs.
        from hermes_pipeline.train.vision_trainer import vision_trainer

        trainer = vision_trainer(recipe, name, args, source, tokenizer, train_set, val_set, callbacks)
        return trainer, stopper
    stage: TrainStage = getattr(recipe, name)
    kwargs: dict[str, Any] = {
        "model": load_model(recipe, stage, tokenizer, source),
        "args": args,
        "train_dataset": train_set,
        "eval_dataset": val_set,
        "processing_class": tokenizer,
        "callbacks": callbacks,
        "peft_config": lora_config(stage, tokenizer) if stage.mode != "full" else None,
    }
    if name == "sft":
        return HermesSFTTrainer(**kwargs), stopper
    assert isinstance(stage, DpoStage)
    ref_model = None
    if stage.mode == "full" and not stage.precompute_ref_log_probs:
        ref_model = load_model(recipe, stage, tokenizer, source)  # a frozen copy of the starting weights
    return HermesDPOTrainer(ref_model=ref_model, **kwargs), stopper


def _inputs(prep: Path, source: str | None, upstream: Path | None) -> dict[str, str]:
    """What the stage consumed: prep's manifest (which hashes every shard) and the starting model, by its
    stage's manifest when another stage made it, else by name."""
    inputs = {"prep": file_fingerprint(prep / MANIFEST)}
    if upstream is not None:
        inputs["init"] = file_fingerprint(upstream)
    elif source is not None:
        inputs["init"] = source
    return inputs


def claim_checkpoints(out: Path, fingerprint: str, inputs: dict[str, str], force: bool) -> None:
    """Tie the stage's checkpoints to this recipe, so a changed recipe never silently resumes someone
    else's run; ``force`` starts the stage over."""
    checkpoint_dir = out / "checkpoints"
    owner = checkpoint_dir / "OWNER.json"
    claim = {"fingerprint": fingerprint, "inputs": inputs}
    if force:
        shutil.rmtree(out, ignore_errors=True)
    elif (not owner.is_file() and checkpoints(checkpoint_dir)) or (
        owner.is_file() and json.loads(owner.read_text(encoding="utf-8")) != claim
    ):
        raise UserError(
            f"{checkpoint_dir} holds checkpoints of a different recipe or input; "
            "re-run with --force to start this stage over"
        )
    (out / MANIFEST).unlink(missing_ok=True)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    owner.write_text(json.dumps(claim, indent=2) + "\n", encoding="utf-8")


def training_args(recipe: Recipe, name: StageName) -> TrainingArguments:
    """Trainer settings from the recipe. Create them before the model: under ZeRO-3 they make
    transformers partition the weights while loading instead of materialising them on every rank."""
    stage: Optimization = stage_settings(recipe, name)
    out = stage_dir(recipe, name)
    on_cpu = not torch.cuda.is_available()
    common: dict[str, Any] = {
        "output_dir": str(out / "checkpoints"),
        "seed": recipe.seed,
        "data_seed": recipe.seed,
        "per_device_train_batch_size": stage.micro_batch_size,
        "per_device_eval_batch_size": stage.micro_batch_size,
        "gradient_accumulation_steps": stage.gradient_accumulation_steps,
        "learning_rate": stage.learning_rate,
        "lr_scheduler_type": stage.lr_scheduler,
        "lr_scheduler_kwargs": {"min_lr_rate": 0.1} if stage.lr_scheduler == "cosine_with_min_lr" else None,
        "warmup_steps": stage.warmup_ratio,  # a float below 1 is a fraction of the total steps
        "num_train_epochs": stage.num_epochs,
        "max_steps": stage.max_steps or -1,
        "optim": stage.optimizer,
        "weight_decay": stage.weight_decay,
        "max_grad_norm": stage.max_grad_norm,
        "bf16": stage.precision == "bf16",
        "fp16": stage.precision == "fp16",
        "gradient_checkpointing": stage.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "deepspeed": stage.deepspeed,
        "save_strategy": "steps",
        "save_steps": stage.save_steps,
        "save_total_limit": stage.save_total_limit,
        "logging_steps": stage.logging_steps,
        "logging_first_step": True,
        "eval_strategy": "no",
        "include_num_input_tokens_seen": "non_padding",
        "report_to": configure_wandb(recipe, out),
        "run_name": run_name(recipe, name),
        "use_cpu": on_cpu,
        "ddp_backend": "gloo" if on_cpu and launched() else None,
        "dataloader_num_workers": 0,
    }
    if recipe.vision is not None:
        # Prep's rows go to the collator whole: their image paths are a column no model argument names.
        return TrainingArguments(remove_unused_columns=False, **common)
    common["max_length"] = recipe.data.max_seq_len
    if name == "sft":
        assert isinstance(stage, SftStage)
        # Packed rows keep their own position ids and attention never crosses a row boundary: varlen
        # flash attention on GPU, a block-diagonal mask derived from the position ids with SDPA/eager.
        return SFTConfig(packing=stage.packing, packing_strategy="bfd", padding_free=stage.packing, **common)
    assert isinstance(stage, DpoStage)
    return DPOConfig(
        beta=stage.beta,
        loss_type=[stage.loss_type],
        precompute_ref_log_probs=stage.precompute_ref_log_probs,
        **common,
    )


def loading_rules(recipe: Recipe, name: StageName) -> TrainStage:
    """The section whose loading rules (full weights, adapter or 4-bit) load a stage's model: its own, and
    for the projector stage Vision's sft section (validate keeps a Vision recipe to full weights)."""
    return recipe.sft if name == "projector" else getattr(recipe, name)


def model_partial(out: Path) -> Path:
    """Where a stage's model is saved before it is checked and renamed into place."""
    return out / f"{MODEL_SUBDIR}.partial"


def probe_rows(dataset: Dataset, column: str) -> torch.Tensor:
    """A fixed batch of real token ids (the same on every rank) for checking the saved weights."""
    return probe_batch([dataset[i][column] for i in range(min(PROBE_ROWS, len(dataset)))])


def tokens_seen(checkpoint: Path | None) -> int:
    """The tokens trained on up to ``checkpoint``, by its trainer state."""
    if checkpoint is None:
        return 0
    return int(json.loads((checkpoint / "trainer_state.json").read_text())["num_input_tokens_seen"])


def _summary(
    trained: Trained, started: float, difference: float, final: Path, plots: list[Path]
) -> dict[str, Any]:
    facts = trained.facts
    runtime = facts["train_runtime_s"]
    tokens_per_second = (facts["tokens_seen"] - trained.tokens_before) / runtime if runtime else None
    return {
        "steps": facts["steps"],
        "resumed_from_step": checkpoint_step(trained.resume) if trained.resume else None,
        "tokens_seen": facts["tokens_seen"],
        "tokens_per_second": round(tokens_per_second, 1) if tokens_per_second else None,
        "train_runtime_s": runtime,
        "wall_time_s": round(time.time() - started, 2),
        "peak_memory_gib": facts["peak_memory_gib"],
        "world_size": facts["world_size"],
        "train_loss": mean_loss(final.parent / "metrics.jsonl"),
        "eval": facts["eval"],
        "saved_logits_max_abs_diff": difference,
        "model": str(final),
        "plots": [str(p) for p in plots],
    }


def _format_summary(name: StageName, summary: dict[str, Any]) -> str:
    lines = [
        f"{name}: done in {summary['wall_time_s']:.0f} s, {summary['steps']} steps on {summary['world_size']} "
        f"process(es)",
        f"  tokens seen {summary['tokens_seen']:,} ({summary['tokens_per_second']} tokens/s), "
        f"peak memory {summary['peak_memory_gib']:.2f} GiB per process",
    ]
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        if key in summary["eval"]:
            lines.append(f"  {key}: {summary['eval'][key]:.4f}")
    lines.append(f"  model: {summary['model']}")
    lines.append(f"  curves: {', '.join(summary['plots']) or 'none'}")
    return "\n".join(lines)
