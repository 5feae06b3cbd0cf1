"""Checks that span sections of a recipe: combinations that validate field by field but cannot run.

Each check yields ``(key.path, message)`` pairs; the loader turns them into one-line errors.
"""

from __future__ import annotations

import difflib
import json
import numbers
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hermes_pipeline.errors import UserError
from hermes_pipeline.recipe.limits import shown
from hermes_pipeline.recipe.schema import (
    DPO_SOURCE_KINDS,
    GGUF_TYPES,
    Optimization,
    Recipe,
    TrainStage,
)

Problem = tuple[str, str]


def check_recipe(recipe: Recipe) -> list[Problem]:
    checks = (
        _check_sources,
        _check_stage_inputs,
        _check_tokenizer,
        _check_training_modes,
        _check_deepspeed,
        _check_model_merge,
        _check_context,
        _check_export,
        _check_eval,
        _check_vision,
        _check_not_built,
    )
    return [problem for check in checks for problem in check(recipe)]


def training_stages(recipe: Recipe) -> dict[str, TrainStage]:
    """The enabled stages that train the language model, in run order."""
    return {name: stage for name, stage in (("sft", recipe.sft), ("dpo", recipe.dpo)) if stage.enabled}


def optimization_stages(recipe: Recipe) -> dict[str, Optimization]:
    """Every stage that runs an optimizer, by stage name, in run order: Vision's projector pre-training
    (settings in ``vision.projector_pretrain``, see ``settings_key``) comes first."""
    stages: dict[str, Optimization] = {}
    if recipe.vision is not None:
        stages["projector"] = recipe.vision.projector_pretrain
    stages.update(training_stages(recipe))
    return stages


def settings_key(stage: str) -> str:
    """The recipe key of a training stage's settings: ``projector`` -> vision.projector_pretrain."""
    return "vision.projector_pretrain" if stage == "projector" else stage


def stage_settings(recipe: Recipe, stage: str) -> Optimization:
    """How a training stage (projector, sft or dpo) optimizes."""
    if stage == "projector":
        if recipe.vision is None:
            raise UserError("the projector stage trains a Vision model; this recipe has no vision section")
        return recipe.vision.projector_pretrain
    return getattr(recipe, stage)


def _check_sources(recipe: Recipe) -> Iterator[Problem]:
    sources = recipe.data.sources
    for name, count in Counter(s.name for s in sources).items():
        if count > 1:
            yield "data.sources", f"source name {shown(name)} is used {count} times; names must be unique"
    for i, source in enumerate(sources):
        key = f"data.sources[{i}]"
        if source.mode is not None and source.kind != "function_calling":
            yield f"{key}.mode", "only function_calling sources have a mode (verbatim or canonical)"
        if source.filters is not None and source.kind != "distilabel_orca_dpo":
            yield f"{key}.filters", "only distilabel_orca_dpo sources take filters"
        if source.kind == "llava" and source.image_root is None:
            yield (
                f"{key}.image_root",
                "llava sources need image_root, the folder their image paths are relative to",
            )
        if source.kind != "llava" and source.image_root is not None:
            yield f"{key}.image_root", "only llava sources have images"
        if source.stage in ("sft", "projector") and source.kind in DPO_SOURCE_KINDS:
            yield f"{key}.stage", f"{source.kind} holds preference pairs; it can only feed dpo"
        if source.stage == "dpo" and source.kind not in DPO_SOURCE_KINDS:
            yield (
                f"{key}.stage",
                f"{source.kind} has no rejected answers; dpo needs one of {', '.join(DPO_SOURCE_KINDS)}",
            )
    used = {s.used_by for s in sources}
    for stage in ("sft", "dpo"):
        if getattr(recipe, stage).enabled and stage not in used:
            yield (
                f"{stage}.enabled",
                f"{stage} is enabled but no data source feeds it (data.sources[*].stage)",
            )


def _check_stage_inputs(recipe: Recipe) -> Iterator[Problem]:
    for name, stage in training_stages(recipe).items():
        ref = stage.init_from
        if ref == "sft" and (name != "dpo" or not recipe.sft.enabled):
            why = "sft is disabled" if name == "dpo" else "a stage cannot start from its own output"
            yield f"{name}.init_from", f"'sft' but {why}; use base, merge or a model path"
        elif ref == "merge" and recipe.merge.models is None:
            yield f"{name}.init_from", "'merge' but merge.models is not set; use base, sft or a model path"


def _check_tokenizer(recipe: Recipe) -> Iterator[Problem]:
    if recipe.model.init == "random" and recipe.tokenizer.name_or_path is None:
        yield (
            "tokenizer.name_or_path",
            "a model built from config (init: random) needs a tokenizer named here",
        )


def _check_training_modes(recipe: Recipe) -> Iterator[Problem]:
    qlora_used = False
    for name, stage in training_stages(recipe).items():
        if stage.mode != "full" and stage.init_from == "base" and recipe.model.init == "random":
            yield (
                f"{name}.mode",
                f"{stage.mode} adapts trained weights; a model built from config (init: random) needs mode full",
            )
        if stage.mode == "full" and stage.lora is not None:
            yield f"{name}.lora", "only used when mode is lora or qlora; remove it or change the mode"
        if stage.mode == "qlora":
            qlora_used = True
            if stage.precision == "fp32":
                yield f"{name}.precision", "qlora computes in bf16 or fp16, not fp32"
            if stage.resources.gpus_per_node == 0:
                yield f"{name}.mode", f"qlora needs GPUs (bitsandbytes); {name}.resources.gpus_per_node is 0"
        per_node = stage.resources.processes_per_node
        if per_node and stage.resources.gpus_per_node and per_node > stage.resources.gpus_per_node:
            yield f"{name}.resources.processes_per_node", "more processes than GPUs on a node"
    on_cpu = [name for name, stage in training_stages(recipe).items() if stage.resources.gpus_per_node == 0]
    if recipe.model.attn_implementation == "flex_attention" and on_cpu:
        yield (
            "model.attn_implementation",
            f"flex_attention has no backward pass on a CPU, where {' and '.join(on_cpu)} train "
            "(resources.gpus_per_node 0); use sdpa",
        )
    if recipe.merge.lora_base == "dequantized" and not qlora_used:
        yield "merge.lora_base", "'dequantized' only applies to QLoRA adapters; no stage uses mode qlora"


# A DeepSpeed config is a few kB; anything near this is not one.
DEEPSPEED_MAX_BYTES = 1 << 20


def zero_settings(path: str) -> tuple[int, bool, bool]:
    """ZeRO stage and whether optimizer / parameters are offloaded, read from a DeepSpeed JSON config.

    Whatever the file holds, a problem is one ``UserError`` line: the recipe check prints it with the key."""
    file = Path(path)
    try:
        if file.stat().st_size > DEEPSPEED_MAX_BYTES:
            raise UserError(
                f"is over {DEEPSPEED_MAX_BYTES // 1024} KiB; a DeepSpeed config is a few kB of JSON"
            )
        config = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise UserError("is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise UserError("nests deeper than the JSON reader follows") from None
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if isinstance(stage, str) and stage.isdigit():
        stage = int(stage)
    if not isinstance(zero, dict) or type(stage) is not int:
        raise UserError("has no zero_optimization.stage (0, 1, 2 or 3)")
    if stage not in (0, 1, 2, 3):
        raise UserError(f"zero_optimization.stage is {stage}; DeepSpeed knows 0, 1, 2 and 3")
    return stage, _offloaded(zero, "offload_optimizer"), _offloaded(zero, "offload_param")


def _offloaded(zero: dict[str, Any], key: str) -> bool:
    section = zero.get(key, {})
    if section is None:
        return False
    if not isinstance(section, dict):
        raise UserError(f'zero_optimization.{key} must be an object such as {{"device": "cpu"}}')
    return section.get("device", "none") not in ("none", None)


def _check_deepspeed(recipe: Recipe) -> Iterator[Problem]:
    for name, stage in optimization_stages(recipe).items():
        if stage.deepspeed is None:
            continue
        key = f"{settings_key(name)}.deepspeed"
        try:
            zero, _, offload_params = zero_settings(stage.deepspeed)
        except UserError as exc:
            yield key, f"{stage.deepspeed}: {exc}"
            continue
        if offload_params and zero != 3:
            yield key, "offload_param needs ZeRO stage 3"


def _check_model_merge(recipe: Recipe) -> Iterator[Problem]:
    merge = recipe.merge.models
    if merge is None:
        return
    names = [m.model for m in merge.models]
    if merge.method == "slerp":
        if len(names) != 2:
            yield "merge.models.models", f"slerp merges exactly two models (got {len(names)})"
        if merge.base_model not in names:
            yield (
                "merge.models.base_model",
                "slerp needs base_model set to one of its two models (t=0 returns it)",
            )
        if "t" not in merge.parameters:
            yield "merge.models.parameters.t", "slerp needs t (0 = base_model, 1 = the other model)"
        else:
            yield from _check_fraction("merge.models.parameters.t", merge.parameters["t"])
    if merge.method in ("ties", "dare_ties", "task_arithmetic") and merge.base_model is None:
        yield (
            "merge.models.base_model",
            f"{merge.method} needs base_model (the model task vectors are taken from)",
        )
    if merge.method == "linear":
        for i, m in enumerate(merge.models):
            if "weight" not in m.parameters:
                yield (
                    f"merge.models.models[{i}].parameters.weight",
                    "linear merges need a weight for every model",
                )
    uses_trained = [n for n in names if n in ("sft", "dpo")]
    if uses_trained and any(s.init_from == "merge" for s in training_stages(recipe).values()):
        yield (
            "merge.models.models",
            "merges a trained stage's output that itself starts from the merge (a cycle)",
        )


def _check_fraction(key: str, value: object) -> Iterator[Problem]:
    """A merge parameter is a number, a per-layer gradient (list of numbers) or a list of {filter, value}."""
    values = value if isinstance(value, list) else [value]
    for item in values:
        number = item.get("value") if isinstance(item, dict) else item
        numbers_in = number if isinstance(number, list) else [number]
        if not all(isinstance(n, numbers.Real) and 0 <= n <= 1 for n in numbers_in):
            yield (
                key,
                f"expected numbers between 0 and 1, a list of them, or [{{filter, value}}] (got {shown(value)})",
            )
            return


def _check_context(recipe: Recipe) -> Iterator[Problem]:
    # Imported here: model_info loads torch and transformers (seconds), and a recipe refused by its schema
    # should be answered before that.
    from hermes_pipeline.model_info import context_length, load_model_config

    try:
        config = load_model_config(recipe.model)
    except UserError as exc:
        yield "model", str(exc)
        return
    limit = context_length(config)
    if recipe.data.max_seq_len > limit:
        yield "data.max_seq_len", f"{recipe.data.max_seq_len} is beyond the model's context of {limit} tokens"


def _check_export(recipe: Recipe) -> Iterator[Problem]:
    for i, quant in enumerate(recipe.export.gguf_types):
        if quant.lower() not in GGUF_TYPES:
            close = difflib.get_close_matches(quant.lower(), GGUF_TYPES, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            yield (
                f"export.gguf_types[{i}]",
                f"{shown(quant)} is not a llama.cpp GGUF type; {hint}known: {', '.join(GGUF_TYPES)}",
            )


def _check_eval(recipe: Recipe) -> Iterator[Problem]:
    ev = recipe.eval
    if not ev.enabled:
        return
    for point in ev.after:
        if point == "merge" and recipe.merge.models is None:
            yield "eval.after", "evaluates after merge, but the recipe has no merge.models section"
        elif point != "base" and not getattr(recipe, "merge" if point == "package" else point).enabled:
            yield "eval.after", f"evaluates after {point}, but {point} is disabled"
    if ev.backend == "llama_cpp" and not recipe.export.enabled:
        yield "eval.backend", "llama_cpp evaluates the exported GGUF; enable export or use transformers"
    if ev.backend == "openai" and not ev.endpoint:
        yield "eval.endpoint", "backend openai needs the server's base URL, e.g. http://node:8000/v1"


# What a Vision recipe runs: LLaVA's two stages, full weights, on TRL; the rest is refused by name.
VISION_SUITES = ("vision_function_calling",)


def _check_vision(recipe: Recipe) -> Iterator[Problem]:
    """A Vision recipe trains a LLaVA model in Vicuna v1 (projector, then projector + LLM) and evaluates
    its ``<fn_call>`` answers; text-only recipes hold no image rows. What a LLaVA model cannot do here yet
    (adapters, DPO, merging, axolotl, packing) is refused by key instead of run as text."""
    if recipe.vision is None:
        yield from _vision_parts_without_vision(recipe)
        return
    if not any(s.used_by == "projector" for s in recipe.data.sources):
        yield "vision.projector_pretrain", "no data source feeds it; give the caption source stage: projector"
    if recipe.tokenizer.template != "vicuna_v1":
        yield "tokenizer.template", "Hermes 2 Vision speaks Vicuna v1 (LLaVA's conv_llava_v1); set vicuna_v1"
    sft = recipe.sft
    if not sft.enabled:
        yield "sft.enabled", "a Vision recipe's second stage (projector + LLM on visual instructions) is sft"
    if sft.mode != "full":
        yield (
            "sft.mode",
            f"{sft.mode} on a LLaVA model is not built; use full (projector + LLM, as LLaVA-1.5)",
        )
    if sft.backend != "trl":
        yield "sft.backend", "the Vision stages train with trl; axolotl's LLaVA path is not wired here"
    if sft.packing:
        yield "sft.packing", "rows with images are not packed; set sft.packing: false"
    if recipe.dpo.enabled:
        yield "dpo.enabled", "preference tuning of a LLaVA model is not built; set dpo.enabled: false"
    if recipe.merge.models is not None:
        yield "merge.models", "mergekit merges language models; a Vision recipe cannot merge"
    if recipe.eval.enabled:
        text_suites = [suite for suite in recipe.eval.suites if suite not in VISION_SUITES]
        if text_suites:
            yield (
                "eval.suites",
                f"{text_suites[0]} evaluates ChatML text models; a Vision recipe evaluates vision_function_calling",
            )
        elif recipe.eval.vision_function_calling_set is None or recipe.eval.vision_image_root is None:
            yield (
                "eval.vision_function_calling_set",
                "vision_function_calling needs its rows (LLaVA rows with reference) and eval.vision_image_root",
            )
        if recipe.eval.backend != "transformers":
            yield (
                "eval.backend",
                "a Vision model is evaluated in transformers, and in llama-server after export; set transformers",
            )
        if any(point not in ("base", "sft", "package", "export") for point in recipe.eval.after):
            yield "eval.after", "a Vision model is evaluated after base, sft, package or export"


def _vision_parts_without_vision(recipe: Recipe) -> Iterator[Problem]:
    """Image rows, a projector source or the Vision eval in a recipe that builds no Vision model."""
    for i, source in enumerate(recipe.data.sources):
        if source.kind == "llava":
            yield (
                f"data.sources[{i}].kind",
                "llava rows hold images; add a vision section or remove this source",
            )
        elif source.stage == "projector":
            yield (
                f"data.sources[{i}].stage",
                "projector trains a Vision model's projector; add a vision section or remove this source",
            )
    if recipe.eval.enabled and "vision_function_calling" in recipe.eval.suites:
        yield (
            "eval.suites",
            "vision_function_calling evaluates a Vision model; this recipe has no vision section",
        )


def _check_not_built(recipe: Recipe) -> Iterator[Problem]:
    """Refuse what the schema describes but no stage runs yet, before any job starts: an axolotl stage
    would fail only once its job had waited in the queue."""
    for name, stage in training_stages(recipe).items():
        resources = stage.resources
        processes = (resources.processes_per_node or 1) * resources.nodes
        if stage.backend == "axolotl" and not resources.gpus_per_node and processes > 1:
            # axolotl 0.19 puts each rank's model on the device its local rank numbers, a GPU on a CPU node.
            yield (
                f"{name}.resources",
                f"axolotl trains in several processes only on GPUs, and this asks for {processes} CPU "
                "processes; use one process on CPU, or backend trl",
            )
