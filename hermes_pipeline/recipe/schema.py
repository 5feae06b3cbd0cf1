"""The recipe schema: one YAML file describes every stage of a run.

Each option has exactly one place. Types, ranges and unknown keys are checked here by pydantic; checks that
span sections (a DPO stage with nothing to start from, a sequence length beyond the model's context) live
in ``checks.py``. Local paths are resolved against the recipe file's folder and must exist.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, model_validator
from pydantic.types import AllowInfNan, Strict

from hermes_pipeline.recipe.limits import shown

# llama.cpp's converter writes f32/f16/bf16/q8_0 itself; the rest come from its quantizer (tools/quantize).
# MXFP4_MOE (MoE only) and COPY (no quantization) are left out on purpose.
GGUF_TYPES = (
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q1_0", "q2_0",
    "q2_k", "q2_k_s", "q3_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k", "q4_k_s", "q4_k_m",
    "q5_k", "q5_k_s", "q5_k_m", "q6_k", "tq1_0", "tq2_0",
    "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m",
    "iq4_nl", "iq4_xs",
)  # fmt: skip

# TRL's DPOConfig.loss_type values.
DPO_LOSS_TYPES = Literal[
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]  # fmt: skip

SFT_SOURCE_KINDS = ("openhermes", "sharegpt", "function_calling", "json_mode", "llava")
DPO_SOURCE_KINDS = ("orca_dpo_pairs", "distilabel_orca_dpo", "ultrafeedback_binarized", "dpo_messages")
EVAL_SUITES = Literal[
    "function_calling", "json_mode", "vision_function_calling", "gpt4all", "agieval", "bigbench", "truthfulqa"
]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SLURM_TIME = re.compile(r"^(\d+-)?\d{1,3}:\d{2}:\d{2}$")
MEMORY = re.compile(r"^\d+[KMGT]?$")
STAGE_OUTPUTS = ("base", "sft", "merge")
# One folder name, never . or .. nor hidden, and short enough for any file system.
RUN_NAME = re.compile(r"\w[\w.-]{0,99}")
# A run directory may not lie inside these: the system's own files and its virtual file systems.
SYSTEM_TREES = ("/bin", "/boot", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/sbin", "/sys", "/usr")
# A run directory may lie inside these but not be one of them (nor the user's home): their subfolders belong
# to others. /dev/shm and /tmp hold node-local scratch, /home and /mnt shared file systems.
SHARED_ROOTS = ("/", "/dev", "/home", "/media", "/mnt", "/opt", "/root", "/run", "/srv", "/tmp", "/var")
# A name ending like a data file is a local file the user meant, never a Hub repository.
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow")


def _resolve(value: str | Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir", Path.cwd())
    path = Path(os.path.expanduser(value))  # unlike Path.expanduser, leaves ~nosuchuser as written
    return path if path.is_absolute() else (Path(base) / path).resolve()


def _exists(path: Path) -> bool:
    """False, not an error, where the system cannot look a path up (a name too long): it names nothing."""
    try:
        return path.exists()
    except OSError:
        return False


def _existing_path(value: str, info: ValidationInfo) -> str:
    path = _resolve(value, info)
    if not _exists(path):
        raise ValueError(f"no such file or directory: {shown(str(path))}")
    return str(path)


def _hub_id_or_path(value: str, info: ValidationInfo) -> str:
    """A Hub id (``owner/name``) stays as it is; anything else is a local path that must exist."""
    path = _resolve(value, info)
    if _exists(path):
        return str(path)
    if (
        HUB_ID.match(value)
        and not value.startswith((".", "/", "~"))
        and not value.endswith(DATA_FILE_SUFFIXES)
    ):
        return value
    raise ValueError(f"not a Hub id (owner/name) and no such local path: {shown(str(path))}")


def _stage_or_model(value: str, info: ValidationInfo) -> str:
    """``base``, ``sft`` or ``merge`` name another stage's output; anything else is a model to start from."""
    return value if value in STAGE_OUTPUTS else _hub_id_or_path(value, info)


def _run_name(value: str) -> str:
    """The default run directory is runs/<name>: a name that is one plain folder name keeps it inside runs/."""
    if not RUN_NAME.fullmatch(value):
        raise ValueError(
            "not a folder name; use letters, digits, '_', '.' and '-', starting with a letter, digit or '_', "
            "at most 100 characters"
        )
    return value


def _own_folder(value: str) -> str:
    """Each stage replaces its subfolder of the run directory (prep/, sft/, merge/, ...) wholesale, so the run
    directory must be a folder of the user's own, never the system's or a shared root. A leading ~ is the
    user's home, as in a shell; a relative run_dir is resolved as the stages use it, against the working
    directory, and symlinks are followed."""
    value = os.path.expanduser(value)
    where = Path(value).resolve()
    trees = [Path(tree).resolve() for tree in SYSTEM_TREES]
    roots = [Path(root).resolve() for root in (*SHARED_ROOTS, os.path.expanduser("~"))]
    if where in roots or any(where.is_relative_to(tree) for tree in trees):
        raise ValueError(
            f"resolves to {shown(str(where))}, a system or shared folder; use a folder of your own, "
            "e.g. /scratch/$USER/runs/NAME or runs/NAME"
        )
    return value


# YAML reads `true` as a boolean, which pydantic would take for 1: numbers are strict (an integer still passes
# where a float is expected), and finite.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False)]
LocalPath = Annotated[str, AfterValidator(_existing_path)]
RunName = Annotated[str, AfterValidator(_run_name)]
RunDir = Annotated[str, Field(min_length=1), AfterValidator(_own_folder)]
ModelRef = Annotated[str, AfterValidator(_hub_id_or_path)]
StartingPoint = Annotated[str, AfterValidator(_stage_or_model)]
PositiveInt = Annotated[Int, Field(ge=1)]
LearningRate = Annotated[Float, Field(gt=0, lt=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=False)


class Resources(Section):
    """What one stage asks the cluster for; a CPU-only stage sets gpus_per_node to 0."""

    nodes: PositiveInt = 1
    gpus_per_node: Annotated[Int, Field(ge=0, le=16)] = 8
    processes_per_node: PositiveInt | None = None
    cpus_per_task: PositiveInt = 16
    mem: Annotated[str, Field(pattern=MEMORY.pattern)] | None = None
    time: Annotated[str, Field(pattern=SLURM_TIME.pattern)] = "24:00:00"
    gpu_memory_gib: Annotated[Float, Field(gt=0)] = 80.0

    @property
    def world_size(self) -> int:
        per_node = self.processes_per_node or self.gpus_per_node or 1
        return self.nodes * per_node


class ModelSection(Section):
    """The base model: a Hub id or local directory, or a random init from a config (the tiny recipe)."""

    name_or_path: ModelRef | None = None
    init: Literal["pretrained", "random"] = "pretrained"
    # A config.json with the architecture, read by validate/plan when the model itself is not at hand.
    config: LocalPath | None = None
    revision: str | None = None
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # Packed rows stay apart with sdpa, flash_attention_2 and flex_attention. On an H200 (1.1B, seq 4096)
    # flex_attention trained packed rows 3.8x faster than sdpa, with flash-attn not installed (BENCHMARKS.md).
    attn_implementation: Literal["sdpa", "flash_attention_2", "flex_attention", "eager"] = "sdpa"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _source(self) -> ModelSection:
        if self.init == "random" and self.config is None:
            raise ValueError("init: random needs model.config (a config.json to build the model from)")
        if self.init == "pretrained" and self.name_or_path is None:
            raise ValueError("init: pretrained needs model.name_or_path (a Hub id or a local directory)")
        return self


class TokenizerSection(Section):
    name_or_path: ModelRef | None = None  # defaults to the model's
    add_chat_tokens: bool = True
    pad_embeddings_to_multiple_of: PositiveInt = 64
    template: Literal["chatml", "vicuna_v1"] = "chatml"


class SourceFilters(Section):
    """Row filters for argilla/distilabel-intel-orca-dpo-pairs."""

    exclude_status: list[str] = ["tie"]
    min_chosen_score: Float | None = 8.0
    exclude_in_gsm8k_train: bool = True


class DataSource(Section):
    name: Annotated[str, Field(pattern=r"^[\w.-]+$")]
    kind: Literal[SFT_SOURCE_KINDS + DPO_SOURCE_KINDS]  # type: ignore[valid-type]
    path: ModelRef
    config_name: str | None = None  # the Hub config, e.g. func_calling_singleturn
    split: str = "train"
    mode: Literal["verbatim", "canonical"] | None = None  # function_calling only; default verbatim
    max_rows: PositiveInt | None = None
    weight: Annotated[Float, Field(gt=0, le=100)] = 1.0
    filters: SourceFilters | None = None
    image_root: LocalPath | None = None  # llava only
    stage: Literal["sft", "dpo", "projector"] | None = None  # default from kind

    @property
    def used_by(self) -> str:
        return self.stage or ("dpo" if self.kind in DPO_SOURCE_KINDS else "sft")


class Decontamination(Section):
    enabled: bool = True
    eval_sets: list[ModelRef] = []
    ngram: Annotated[Int, Field(ge=4, le=64)] = 13


class DataSection(Section):
    sources: Annotated[list[DataSource], Field(min_length=1)]
    max_seq_len: Annotated[Int, Field(ge=16)] = 4096
    overlong: Literal["drop", "truncate"] = "drop"
    dedup: bool = True
    decontaminate: Decontamination = Decontamination()
    val_fraction: Annotated[Float, Field(ge=0, lt=0.5)] = 0.01
    num_proc: PositiveInt = 8
    resources: Resources = Resources(gpus_per_node=0, cpus_per_task=32, time="12:00:00")


class LoraSection(Section):
    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: Annotated[Float, Field(ge=0, lt=1)] = 0.05
    target_modules: Literal["all-linear"] | Annotated[list[str], Field(min_length=1)] = "all-linear"
    # New chat tokens must learn their embeddings even when the rest of the embedding matrix is frozen.
    train_new_tokens: bool = True


class Optimization(Section):
    """How a training stage optimizes; names follow transformers' TrainingArguments where one exists."""

    learning_rate: LearningRate = 2e-5
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr"] = (
        "cosine"
    )
    warmup_ratio: Annotated[Float, Field(ge=0, lt=1)] = 0.03
    num_epochs: Annotated[Float, Field(gt=0, le=100)] = 1.0
    max_steps: PositiveInt | None = None
    micro_batch_size: PositiveInt = 1
    gradient_accumulation_steps: PositiveInt = 1
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    gradient_checkpointing: bool = True
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit"] = (
        "adamw_torch"
    )
    weight_decay: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    max_grad_norm: Annotated[Float, Field(gt=0)] = 1.0
    deepspeed: LocalPath | None = None
    save_steps: PositiveInt = 500
    save_total_limit: PositiveInt = 2
    logging_steps: PositiveInt = 10
    resources: Resources = Resources()


class TrainStage(Optimization):
    """A stage that trains the language model: SFT or DPO."""

    enabled: bool = True
    backend: Literal["trl", "axolotl"] = "trl"
    # Where the weights come from: base, sft, merge (the merge stage's output) or a Hub id / local dir.
    init_from: StartingPoint = "base"
    mode: Literal["full", "lora", "qlora"] = "full"
    lora: LoraSection | None = None


class SftStage(TrainStage):
    packing: bool = True


class DpoStage(TrainStage):
    init_from: StartingPoint = "sft"
    learning_rate: LearningRate = 5e-7
    beta: Annotated[Float, Field(gt=0, le=10)] = 0.1
    loss_type: DPO_LOSS_TYPES = "sigmoid"
    precompute_ref_log_probs: bool = False


class MergedModel(Section):
    model: ModelRef
    parameters: dict[str, Any] = {}


class ModelMerge(Section):
    """A mergekit merge, passed to mergekit's own library (parameters may be per-layer gradients)."""

    method: Literal["slerp", "linear", "ties", "dare_ties", "task_arithmetic", "model_stock"]
    models: Annotated[list[MergedModel], Field(min_length=1)]
    base_model: ModelRef | None = None
    parameters: dict[str, Any] = {}
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # Where the merged tokenizer comes from: the Hermes side keeps the ChatML tokens and templates.
    tokenizer_source: str = "base"


class MergeSection(Section):
    enabled: bool = True
    # QLoRA adapters: merge into the original 16-bit base, or into the dequantised 4-bit base they trained on.
    lora_base: Literal["original", "dequantized"] = "original"
    models: ModelMerge | None = None
    resources: Resources = Resources(gpus_per_node=0, cpus_per_task=16, time="04:00:00")


class PackageSection(Section):
    """The model users download: how it is sharded, licensed, and how it samples by default."""

    max_shard_size: Annotated[str, Field(pattern=r"^\d+(\.\d+)?\s*[KMGT]B$")] = "5GB"
    license: str = "apache-2.0"
    # generation_config.json: what transformers and servers use when a request sets nothing. The defaults
    # are the Hermes 2 cards' inference example (temperature 0.8, repetition penalty 1.1, no nucleus cut).
    temperature: Annotated[Float, Field(gt=0, le=2)] = 0.8
    top_p: Annotated[Float, Field(gt=0, le=1)] = 1.0
    repetition_penalty: Annotated[Float, Field(ge=1, le=2)] = 1.1


class ExportSection(Section):
    enabled: bool = True
    gguf_types: list[str] = ["f16", "q8_0", "q4_k_m", "q5_k_m"]
    resources: Resources = Resources(gpus_per_node=0, cpus_per_task=16, time="04:00:00")


class EvalSection(Section):
    enabled: bool = True
    # base: the starting model, right after prep (the "before" of a before/after comparison).
    after: list[Literal["base", "sft", "dpo", "merge", "package", "export"]] = ["dpo"]
    suites: list[EVAL_SUITES] = ["function_calling", "json_mode"]
    backend: Literal["transformers", "llama_cpp", "openai"] = "transformers"
    endpoint: str | None = None  # for backend openai
    function_calling_sets: list[ModelRef] = ["NousResearch/func-calling-eval"]
    json_mode_set: ModelRef = "NousResearch/json-mode-eval"
    # Hermes 2 Vision's <fn_call>: LLaVA-shaped rows (image, <fn_call> + schema) with each field's answer in
    # `reference`. Not used for decontamination: every such prompt repeats the same schema, the picture differs.
    vision_function_calling_set: ModelRef | None = None
    vision_image_root: LocalPath | None = None  # the folder that set's image paths are relative to
    temperature: Annotated[Float, Field(ge=0, le=2)] = 0.1
    max_new_tokens: PositiveInt = 512
    batch_size: PositiveInt = 8  # prompts per generation batch, requests in flight, lm-eval batch size
    limit: PositiveInt | None = None  # the first N rows of each set (of each task, for lm-eval suites)
    resources: Resources = Resources(gpus_per_node=1, cpus_per_task=8, time="04:00:00")


class VisionSection(Section):
    """LLaVA-style vision: a frozen tower, a projector trained alone first, then projector + LLM."""

    tower: ModelRef | None = (
        None  # a vision checkpoint (SigLIP, or a whole SigLIP/CLIP of which its vision half)
    )
    # The tower's config.json: what a tower built from config (tower_init: random, the tiny recipe) is built
    # from, and what validate and plan read when the tower is not at hand.
    tower_config: LocalPath | None = None
    tower_init: Literal["pretrained", "random"] = "pretrained"
    projector: Literal["linear", "mlp2x_gelu"] = "mlp2x_gelu"
    select_layer: Int = -2
    image_aspect_ratio: Literal["pad", "square"] = "pad"
    # Stage 1 trains the projector alone on image-caption pairs; the LLM and the tower stay frozen.
    projector_pretrain: Optimization

    @model_validator(mode="after")
    def _tower_source(self) -> VisionSection:
        if self.tower_init == "random" and self.tower_config is None:
            raise ValueError(
                "tower_init: random needs vision.tower_config (a config.json to build the tower from)"
            )
        if self.tower_init == "pretrained" and self.tower is None:
            raise ValueError("tower_init: pretrained needs vision.tower (a Hub id or a local directory)")
        return self


class TrackingSection(Section):
    wandb_project: str | None = None
    wandb_run_name: str | None = None
    # auto: online when WANDB_API_KEY is set, else offline (clusters without egress); never prompts.
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"


class ClusterSection(Section):
    site_config: LocalPath | None = None


class Recipe(Section):
    name: RunName
    description: str = ""
    seed: Annotated[Int, Field(ge=0, le=2**32 - 1)] = 42  # numpy's seeds are 32-bit
    run_dir: RunDir | None = None  # default: runs/<name>
    model: ModelSection
    tokenizer: TokenizerSection = TokenizerSection()
    data: DataSection
    sft: SftStage = SftStage(enabled=False)
    dpo: DpoStage = DpoStage(enabled=False)
    vision: VisionSection | None = None
    merge: MergeSection = MergeSection()
    package: PackageSection = PackageSection()
    export: ExportSection = ExportSection()
    eval: EvalSection = EvalSection()
    tracking: TrackingSection = TrackingSection()
    cluster: ClusterSection = ClusterSection()
