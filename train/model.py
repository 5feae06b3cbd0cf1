"""Where a training stage starts from and how its adapters are set up; loading itself is in
hermes_pipeline.models, shared with merge and the evals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from hermes_pipeline.chat_format.tokens import CHAT_TOKENS
from hermes_pipeline.models import ADAPTER_BASE, MODEL_SUBDIR
from hermes_pipeline.recipe.schema import LoraSection, Recipe, TrainStage
from hermes_pipeline.rundir import MANIFEST, stage_dir


def starting_point(recipe: Recipe, name: str) -> str | None:
    """The directory or Hub id a training stage loads; None means the recipe's base model built from its
    config. A Vision recipe's projector stage starts from the language model (sft.init_from), its sft from
    the projector stage's LLaVA model."""
    if recipe.vision is not None and name == "sft":
        return str(stage_dir(recipe, "projector") / MODEL_SUBDIR)
    ref = (recipe.sft if name == "projector" else getattr(recipe, name)).init_from
    if ref in ("sft", "merge"):
        return str(stage_dir(recipe, ref) / MODEL_SUBDIR)
    if ref == "base":
        return recipe.model.name_or_path if recipe.model.init == "pretrained" else None
    return ref


def upstream_manifest(recipe: Recipe, name: str) -> Path | None:
    """The manifest of the stage whose output this stage starts from; None when it starts from a model."""
    if recipe.vision is not None:
        return stage_dir(recipe, "projector") / MANIFEST if name == "sft" else None
    ref = getattr(recipe, name).init_from
    return stage_dir(recipe, ref) / MANIFEST if ref in ("sft", "merge") else None


def record_adapter_base(folder: Path, source: str | None) -> None:
    """Write down what an adapter was trained on top of, for the next stage and for merging."""
    (folder / ADAPTER_BASE).write_text(json.dumps({"base": source}, indent=2) + "\n", encoding="utf-8")


def chat_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the Hermes tokens: with LoRA these embedding rows train although the matrix is frozen."""
    return sorted(tokenizer.convert_tokens_to_ids(list(CHAT_TOKENS)))


def lora_config(stage: TrainStage, tokenizer: PreTrainedTokenizerBase) -> Any:
    """peft's LoRA config for a lora/qlora stage, with the output side of the new tokens trainable too.

    The chat tokens' input-embedding rows train through peft's trainable tokens. Their output rows cannot:
    TRL's fused LM head reads ``lm_head.weight`` directly, which would bypass a row-wise delta, so the
    whole LM head trains instead (peft's ``modules_to_save``) and is saved with the adapter.
    """
    from peft import LoraConfig

    lora = stage.lora or LoraSection()
    trainable, heads = None, None
    if lora.train_new_tokens:
        trainable = {"embed_tokens": chat_token_ids(tokenizer)}
        heads = ["lm_head"]
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        trainable_token_indices=trainable,
        modules_to_save=heads,
    )
