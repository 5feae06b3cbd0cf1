"""An estimate of GPU memory per device for a training stage, before anything is launched.

The point is to catch a recipe that cannot fit (or wastes most of the card) before it waits a day in the
queue. Assumptions, stated once:
  - without DeepSpeed, full fine-tuning keeps weights, gradients and Adam's two moments all in the
    model's dtype (model.dtype), with no fp32 master copy (the Trainer's optimizers step on the weights
    themselves): 8 bytes per parameter for bf16 weights (6 with 8-bit Adam), 16 for fp32. On an H200 a
    1.1B bf16 model's whole step peaked at 16.9 GiB with flex attention, where master weights and fp32
    moments alone would have taken 12.3 GiB (benchmarks/gpu_check.py, BENCHMARKS.md);
  - full fine-tuning in mixed precision under DeepSpeed ZeRO counts the model states as DeepSpeed's own
    estimators do (``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_model_states_mem_needs``;
    matched here so that ``plan`` needs no DeepSpeed, and checked against them in the tests): 18 bytes per
    parameter: fp32 master weights and Adam's two fp32 moments (12; 6 with 8-bit Adam), fp32 gradients
    (4) and 16-bit weights (2). ZeRO-3 shards all 18 across
    the world size and gathers the largest layer whole (4 bytes per parameter); ZeRO-2 keeps the 16-bit
    weights whole and also shards the 16-bit gradients (2 more); ZeRO-1, which DeepSpeed gives no
    estimator, is ZeRO-2 with the 16-bit gradients whole. DeepSpeed prints its figures as "GB"; they are
    bytes / 2**30, GiB, like ours;
  - otherwise (fp32, LoRA) ZeRO-1 shards optimizer states, ZeRO-2 also gradients, ZeRO-3 also weights;
  - offloading the optimizer moves gradients and optimizer states off the GPU, offloading parameters
    (ZeRO-3) the weights too;
  - LoRA adapters, their gradients and optimizer states are fp32; QLoRA's frozen base is NF4 with double
    quantization (about 0.52 bytes per parameter) except embeddings and head, which stay 16-bit. LoRA's
    dropout (when above 0) keeps, for each adapted module, a dropped-out copy of the module's input and a
    1-byte mask for the backward pass. On the H200 a QLoRA step (1.1B, dropout 0.05) peaked 6.7 GiB above
    the full run's activations plus the NF4 base; these copies count 9.0 GiB, the whole estimate 5% over;
  - activations follow a Llama/Mistral block with fused (flash/SDPA) attention: with gradient
    checkpointing, one saved hidden state per layer plus one layer's full activations; logits in fp32
    with their gradient; DPO runs chosen and rejected together (twice the tokens);
  - on a GPU, a fixed 2 GiB covers the CUDA context, communication buffers and allocator slack; on a CPU
    the estimate is the process's memory for the same items.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import PretrainedConfig

from hermes_pipeline.model_info import ParameterCounts

GIB = 1024**3
FIXED_OVERHEAD = 2 * GIB
NF4_BYTES_PER_PARAM = 0.52


@dataclass(frozen=True)
class ZeroSettings:
    stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False


@dataclass(frozen=True)
class TrainShape:
    """What the estimate needs to know about a training stage."""

    mode: str  # full | lora | qlora | frozen (only a small module outside the LLM trains)
    precision: str  # bf16 | fp16 | fp32
    optimizer: str
    micro_batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    world_size: int
    zero: ZeroSettings
    weight_bytes: int = 2  # bytes per weight as the model is loaded (model.dtype)
    lora_dropout: bool = False  # LoRA's dropout is above 0: each adapted module keeps a copy of its input
    on_gpu: bool = True
    dpo_reference: bool = False  # a frozen reference copy lives on the device (full-parameter DPO)
    pairs: bool = False  # DPO: chosen and rejected in one forward


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    largest_layer: float  # ZeRO-3 gathers each layer's full 16-bit weights and gradients while it runs
    activations: float
    reference_model: float
    overhead: float
    vision: float = 0.0  # a Vision model's frozen tower and its projector's training states

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    def as_gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 2) for k, v in {**asdict(self), "total": self.total}.items()}


def estimate_memory(
    config: PretrainedConfig, counts: ParameterCounts, shape: TrainShape, vision: float = 0.0
) -> MemoryEstimate:
    """Bytes per device for one training stage; ``vision`` is what ``vision_states`` adds for a Vision model."""
    world, zero = shape.world_size, shape.zero
    activation_bytes = 4 if shape.precision == "fp32" else 2
    if shape.mode == "full" and shape.precision != "fp32" and zero.stage >= 1:
        weights, grads, optimizer, largest_layer = _deepspeed_model_states(config, counts.total, shape)
    else:
        weights, grads, optimizer = _model_states(counts, shape)
        largest_layer = 0.0
    if zero.offload_optimizer:
        grads = optimizer = 0
    if zero.offload_params:
        weights = 0
    reference = (
        counts.total * shape.weight_bytes / (world if zero.stage >= 3 else 1) if shape.dpo_reference else 0
    )
    return MemoryEstimate(
        weights=weights,
        gradients=grads,
        optimizer=optimizer,
        largest_layer=largest_layer,
        activations=_activations(config, counts, shape, activation_bytes),
        reference_model=reference,
        overhead=FIXED_OVERHEAD if shape.on_gpu else 0,
        vision=vision,
    )


def vision_states(tower_parameters: int, projector_parameters: int, shape: TrainShape) -> float:
    """Bytes a Vision model adds on each device: the frozen tower's weights and the projector with its
    gradients and Adam's two moments, all in the model's dtype. Neither is sharded here (an over-estimate
    under ZeRO-3: a SigLIP-400M tower is 0.77 GiB in bf16). The tower runs without a graph (nothing of it
    trains), and image tokens are counted in the sequence like any other token."""
    return (tower_parameters + 4 * projector_parameters) * shape.weight_bytes


def _model_states(counts: ParameterCounts, shape: TrainShape) -> tuple[float, float, float]:
    """Weights, gradients and optimizer states in bytes outside DeepSpeed's accounting: everything in the
    model's dtype for full training, fp32 adapters otherwise."""
    if shape.mode == "full":
        weights = grads = counts.total * shape.weight_bytes
        optimizer = counts.total * (2 if "8bit" in shape.optimizer else 2 * shape.weight_bytes)
    else:
        trainable = counts.lora
        frozen = counts.total
        if shape.mode == "qlora":
            weights = (frozen - counts.embedding) * NF4_BYTES_PER_PARAM + counts.embedding * 2
        else:
            weights = frozen * shape.weight_bytes
        weights += trainable * 4
        grads = trainable * 4
        optimizer = trainable * 8
    world, stage = shape.world_size, shape.zero.stage
    return (
        weights / (world if stage >= 3 else 1),
        grads / (world if stage >= 2 else 1),
        optimizer / (world if stage >= 1 else 1),
    )


def _deepspeed_model_states(
    config: PretrainedConfig, parameters: int, shape: TrainShape
) -> tuple[float, float, float, float]:
    """Weights, gradients, optimizer states and the gathered largest layer, in bytes, as DeepSpeed's ZeRO
    estimators count them for its mixed-precision optimizer (before offloading)."""
    world, stage = shape.world_size, shape.zero.stage
    moments = 2 if "8bit" in shape.optimizer else 8
    optimizer = parameters * (4 + moments) / world  # fp32 master weights and Adam's two moments
    fp32_grads = parameters * 4 / world
    if stage >= 3:
        return parameters * 2 / world, fp32_grads, optimizer, 4 * largest_layer_parameters(config)
    half_grads = parameters * 2 / (world if stage == 2 else 1)
    return parameters * 2, half_grads + fp32_grads, optimizer, 0.0


def largest_layer_parameters(config: PretrainedConfig) -> int:
    """The most parameters one module holds in a Llama/Mistral model: the embedding (or the untied LM head,
    the same size) or one MLP projection; DeepSpeed's estimator takes the same maximum over modules."""
    hidden = config.hidden_size
    return max(config.vocab_size * hidden, config.intermediate_size * hidden)


def _activations(config: PretrainedConfig, counts: ParameterCounts, shape: TrainShape, element: int) -> float:
    tokens = shape.micro_batch_size * shape.seq_len * (2 if shape.pairs else 1)
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) * hidden // heads
    layers = config.num_hidden_layers
    per_layer = (6 * hidden + 2 * kv + 4 * config.intermediate_size) * element
    if shape.mode in ("lora", "qlora") and shape.lora_dropout:
        per_layer += counts.lora_inputs // layers * (element + 1)
    # Checkpointing keeps each layer's input, plus one layer's activations while it is recomputed.
    blocks = layers * hidden * element + per_layer if shape.gradient_checkpointing else layers * per_layer
    logits = config.vocab_size * (element + 4 + 4)
    return tokens * (blocks + logits)
