"""The plan of a recipe: its stages in run order, batch arithmetic, and memory per device for each training stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hermes_pipeline.memory import (
    GIB,
    MemoryEstimate,
    TrainShape,
    ZeroSettings,
    estimate_memory,
    vision_states,
)
from hermes_pipeline.model_info import count_parameters, load_model_config
from hermes_pipeline.recipe.checks import stage_settings, training_stages, zero_settings
from hermes_pipeline.recipe.loader import recipe_hash
from hermes_pipeline.recipe.schema import LoraSection, Optimization, Recipe, Resources, TrainStage
from hermes_pipeline.stages import STAGE_KINDS, recipe_stages


@dataclass
class TrainingPlan:
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    global_batch: int  # micro batch x accumulation x world size, in sequences (DPO: pairs)
    tokens_per_step: int  # upper bound: every sequence at max_seq_len (exact when packing)
    trainable_parameters: int
    zero_stage: int
    memory: MemoryEstimate
    gpu_memory_gib: float
    on_gpu: bool


@dataclass
class StagePlan:
    name: str
    summary: str
    resources: Resources | None = None
    training: TrainingPlan | None = None


@dataclass
class Plan:
    recipe: str
    recipe_hash: str
    run_dir: str
    total_parameters: int
    stages: list[StagePlan] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "recipe_hash": self.recipe_hash,
            "run_dir": self.run_dir,
            "total_parameters": self.total_parameters,
            "stages": [_stage_dict(s) for s in self.stages],
        }


def build_plan(recipe: Recipe) -> Plan:
    """The recipe's stages as `run` and `slurm submit` will execute them (hermes_pipeline.stages)."""
    config = load_model_config(recipe.model)
    total = count_parameters(config).total
    plan = Plan(recipe.name, recipe_hash(recipe), recipe.run_dir or f"runs/{recipe.name}", total)
    trainers = training_stages(recipe)
    for stage in recipe_stages(recipe, "RECIPE"):
        if stage.kind == "prep":
            plan.stages.append(_prep(recipe))
        elif stage.kind == "merge":
            plan.stages.append(_model_merge(recipe))
        elif stage.kind in ("projector", "sft", "dpo"):
            plan.stages.append(_training(recipe, stage.kind, stage_settings(recipe, stage.kind), config))
        elif stage.kind == "package":
            adapters = [name for name, s in trainers.items() if s.mode != "full"]
            folded = (
                f"; folds the {'/'.join(adapters)} adapters into the base ({recipe.merge.lora_base} weights)"
            )
            summary = "safetensors shards, tokenizer with both templates" + (folded if adapters else "")
            plan.stages.append(StagePlan("package", summary, stage.resources))
        elif stage.kind == "export":
            types = ", ".join(recipe.export.gguf_types)
            summary = (
                f"GGUF {types} + f16 mmproj, each pair verified in llama-server on a probe picture"
                if recipe.vision
                else f"GGUF {types}, each verified in llama-server"
            )
            plan.stages.append(StagePlan("export", summary, stage.resources))
        elif stage.kind == "eval":
            ev = recipe.eval
            engine = ev.backend
            if stage.folder.name == "export":  # the GGUF, whatever backend the other points use
                engine = "llama-server, with the mmproj" if recipe.vision else "llama.cpp"
            summary = f"{', '.join(ev.suites)} on the model after {stage.folder.name} ({engine})"
            plan.stages.append(StagePlan(stage.name, summary, stage.resources))
        else:
            plan.stages.append(StagePlan(stage.name, STAGE_KINDS[stage.kind].produces, stage.resources))
    return plan


def _prep(recipe: Recipe) -> StagePlan:
    data = recipe.data
    kinds = ", ".join(f"{s.name} ({s.kind})" for s in data.sources)
    summary = (
        f"{len(data.sources)} sources: {kinds}; max_seq_len {data.max_seq_len}, overlong rows {data.overlong}"
    )
    return StagePlan("prep", summary, data.resources)


def _model_merge(recipe: Recipe) -> StagePlan:
    merge = recipe.merge.models
    assert merge is not None
    models = " + ".join(m.model for m in merge.models)
    return StagePlan("merge", f"mergekit {merge.method}: {models}", recipe.merge.resources)


def _training(recipe: Recipe, name: str, stage: Optimization, config: Any) -> StagePlan:
    res = stage.resources
    world = res.world_size
    zero = ZeroSettings(*zero_settings(stage.deepspeed)) if stage.deepspeed else ZeroSettings()
    seq_len = recipe.data.max_seq_len
    is_dpo = name == "dpo"
    # The projector stage trains none of the LLM's weights: count it like an adapter run with no adapters.
    mode = stage.mode if isinstance(stage, TrainStage) else "frozen"
    lora = (stage.lora or LoraSection()) if mode in ("lora", "qlora") else None
    counts = count_parameters(config, lora)
    shape = TrainShape(
        mode=mode,
        precision=stage.precision,
        optimizer=stage.optimizer,
        micro_batch_size=stage.micro_batch_size,
        seq_len=seq_len,
        gradient_checkpointing=stage.gradient_checkpointing,
        world_size=world,
        zero=zero,
        weight_bytes=4 if recipe.model.dtype == "float32" else 2,
        lora_dropout=lora is not None and lora.dropout > 0,
        on_gpu=res.gpus_per_node > 0,
        dpo_reference=is_dpo and mode == "full" and not getattr(stage, "precompute_ref_log_probs", False),
        pairs=is_dpo,
    )
    global_batch = stage.micro_batch_size * stage.gradient_accumulation_steps * world
    tower, projector = _vision_parameters(recipe, config)
    training = TrainingPlan(
        micro_batch_size=stage.micro_batch_size,
        gradient_accumulation_steps=stage.gradient_accumulation_steps,
        world_size=world,
        global_batch=global_batch,
        tokens_per_step=global_batch * seq_len * (2 if is_dpo else 1),
        trainable_parameters=(counts.total if mode == "full" else counts.lora) + projector,
        zero_stage=zero.stage,
        memory=estimate_memory(config, counts, shape, vision_states(tower, projector, shape)),
        gpu_memory_gib=res.gpu_memory_gib,
        on_gpu=shape.on_gpu,
    )
    origin = (
        f"{stage.backend} {mode}, from {stage.init_from}"
        if isinstance(stage, TrainStage)
        else "projector only"
    )
    summary = f"{origin}, {stage.precision}, lr {stage.learning_rate:g} {stage.lr_scheduler}, {stage.num_epochs:g} epoch(s)"
    return StagePlan(name, summary, res, training)


def _vision_parameters(recipe: Recipe, config: Any) -> tuple[int, int]:
    """A Vision model's tower and projector parameters; none for a text model."""
    if recipe.vision is None:
        return 0, 0
    from hermes_pipeline.vision import vision_parameters

    return vision_parameters(recipe.vision, config.hidden_size)


def format_plan(plan: Plan) -> str:
    lines = [
        f"recipe {plan.recipe} (hash {plan.recipe_hash}), run dir {plan.run_dir}",
        f"model: {plan.total_parameters / 1e9:.3g}B parameters"
        if plan.total_parameters >= 1e8
        else f"model: {plan.total_parameters / 1e6:.3g}M parameters",
        "stages:",
    ]
    for i, stage in enumerate(plan.stages, 1):
        lines.append(f"  {i}. {stage.name:<25} {stage.summary}")
        if stage.resources is not None:
            lines.append(f"     {'':<25} resources: {_resources(stage.resources)}")
        if stage.training is not None:
            lines.extend(f"     {'':<25} {line}" for line in _training_lines(stage.training))
    return "\n".join(lines)


def _resources(res: Resources) -> str:
    gpus = f"{res.gpus_per_node} GPU/node" if res.gpus_per_node else "CPU only"
    return f"{res.nodes} node(s), {gpus}, {res.cpus_per_task} CPUs, time {res.time}"


def _training_lines(t: TrainingPlan) -> list[str]:
    mem = t.memory.as_gib()
    fits = "fits" if mem["total"] <= t.gpu_memory_gib else "DOES NOT FIT"
    parts = ", ".join(f"{k} {v:g}" for k, v in mem.items() if k != "total" and v)
    where = "GPU memory/device" if t.on_gpu else "memory/process (CPU)"
    return [
        f"global batch {t.global_batch} = {t.micro_batch_size} micro batch x {t.gradient_accumulation_steps} "
        f"accumulation x {t.world_size} world size; tokens/step <= {t.tokens_per_step:,}",
        f"trainable {t.trainable_parameters:,} parameters, ZeRO stage {t.zero_stage}",
        f"{where} ~ {mem['total']:g} GiB ({parts}) - {fits} in {t.gpu_memory_gib:g} GiB",
    ]


def _stage_dict(stage: StagePlan) -> dict[str, Any]:
    out: dict[str, Any] = {"name": stage.name, "summary": stage.summary}
    if stage.resources is not None:
        out["resources"] = stage.resources.model_dump()
    if stage.training is not None:
        t = stage.training
        out["training"] = {
            "micro_batch_size": t.micro_batch_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "world_size": t.world_size,
            "global_batch": t.global_batch,
            "tokens_per_step": t.tokens_per_step,
            "trainable_parameters": t.trainable_parameters,
            "zero_stage": t.zero_stage,
            "memory_gib": t.memory.as_gib(),
            "gpu_memory_gib": t.gpu_memory_gib,
            "fits": t.memory.total <= t.gpu_memory_gib * GIB,
        }
    return out
