"""Facts about the recipe's model (context length, parameter counts) read from its config, never its weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from hermes_pipeline.errors import UserError
from hermes_pipeline.recipe.schema import LoraSection, ModelSection


def load_model_config(model: ModelSection) -> PretrainedConfig:
    """The model's config: ``model.config`` if given, else the local directory's or the Hub's config.json."""
    source = model.config or model.name_or_path
    try:
        if model.config:
            return config_from_file(model.config)
        return AutoConfig.from_pretrained(
            source, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0]
        raise UserError(
            f"cannot read the config of {source} ({reason}); set model.config to a local config.json"
        ) from None


def config_from_file(path: str) -> PretrainedConfig:
    config_dict = json.loads(Path(path).read_text(encoding="utf-8"))
    if "model_type" not in config_dict:
        raise ValueError("config.json has no model_type")
    return AutoConfig.for_model(**config_dict)


def context_length(config: PretrainedConfig) -> int:
    return int(config.max_position_embeddings)


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    embedding: int  # input embeddings + untied output head
    lora: int  # trainable LoRA parameters for the given LoRA settings, 0 without LoRA
    lora_inputs: int = 0  # the input features of every adapted module, summed over the model


def count_parameters(config: PretrainedConfig, lora: LoraSection | None = None) -> ParameterCounts:
    """Exact counts from a model built on the meta device: no memory, no download, any architecture."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        embedding += head.weight.numel()
    adapted = _adapted_modules(model, lora) if lora else []
    return ParameterCounts(
        total=total,
        embedding=embedding,
        lora=sum(lora.r * (m.in_features + m.out_features) for m in adapted) if lora else 0,
        lora_inputs=sum(m.in_features for m in adapted),
    )


def _adapted_modules(model: torch.nn.Module, lora: LoraSection) -> list[torch.nn.Linear]:
    head = model.get_output_embeddings()
    return [
        module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and module is not head
        and (lora.target_modules == "all-linear" or name.rsplit(".", 1)[-1] in lora.target_modules)
    ]
