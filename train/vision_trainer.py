"""The Vision stages' trainer: transformers' Trainer over a LLaVA model and prep's Vision shards.

Stage 1 (``projector``) starts from the recipe's language model, its frozen tower and a new projector, and
trains the projector alone on captions; stage 2 (``sft``) starts from stage 1's model and trains projector and
language model on visual instructions. The tower never trains. TRL's SFTTrainer is not used: it would
re-tokenize conversations through a processor, and prep has already written every row's ids and labels, with
each image as the tokens its features fill; a batch needs only padding and pixels (``VisionBatches``).
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments

from hermes_pipeline.models import load_model
from hermes_pipeline.recipe.schema import Recipe
from hermes_pipeline.train.checkpoints import FinishedResume
from hermes_pipeline.train.probe import PROBE_ROWS
from hermes_pipeline.train.vision_batches import VisionBatches
from hermes_pipeline.vision import image_processor, start_llava, tower_config, train_parts


class HermesVisionTrainer(FinishedResume, Trainer):
    """transformers' Trainer, resuming a finished run without a step past its end."""


def vision_trainer(
    recipe: Recipe,
    name: str,
    args: TrainingArguments,
    source: str | None,
    tokenizer: PreTrainedTokenizerBase,
    train_set: Dataset,
    val_set: Dataset | None,
    callbacks: list[TrainerCallback],
) -> HermesVisionTrainer:
    """The trainer of a Vision stage: ``source`` is the language model for the projector stage, the projector
    stage's LLaVA model for sft."""
    assert recipe.vision is not None
    if name == "projector":
        model = start_llava(recipe, tokenizer, source)
    else:
        model = load_model(recipe, recipe.sft, tokenizer, source)
    train_parts(model, projector_only=name == "projector")
    return HermesVisionTrainer(
        model=model,
        args=args,
        data_collator=batches(recipe, tokenizer),
        train_dataset=train_set,
        eval_dataset=val_set,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def batches(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> VisionBatches:
    """The collator: prep's rows padded, their pictures made into the tower's pixel values."""
    assert recipe.vision is not None
    images = image_processor(recipe.vision, tower_config(recipe.vision))
    return VisionBatches(tokenizer.pad_token_id, images, recipe.vision.image_aspect_ratio == "pad")


def vision_probe(trainer: HermesVisionTrainer, dataset: Dataset) -> dict[str, Any]:
    """Whole rows, pictures included, batched by the trainer's collator: a cut row would leave image tokens
    without their features."""
    rows = [dataset[index] for index in range(min(PROBE_ROWS, len(dataset)))]
    batch = trainer.data_collator(rows)
    return {key: value for key, value in batch.items() if key != "labels"}
