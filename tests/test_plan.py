"""The plan: stage order, batch arithmetic, parameter counts and the memory estimate's behaviour."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hermes_pipeline.cli import main
from hermes_pipeline.memory import GIB, TrainShape, ZeroSettings, estimate_memory, largest_layer_parameters
from hermes_pipeline.model_info import count_parameters, load_model_config
from hermes_pipeline.plan import build_plan
from hermes_pipeline.recipe.loader import load_recipe
from hermes_pipeline.recipe.schema import LoraSection, ModelSection
from hermes_pipeline.stages import recipe_stages

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "recipes"
MODELS = ROOT / "configs" / "models"


def _config(name: str):
    return load_model_config(ModelSection(init="random", config=str(MODELS / name)))


@pytest.mark.parametrize(
    ("config", "parameters"), [("mistral-7b-v0.1.json", 7_241_732_096), ("llama-3-8b.json", 8_030_261_248)]
)
def test_parameter_counts_match_the_published_models(config: str, parameters: int) -> None:
    assert count_parameters(_config(config)).total == parameters


def test_lora_parameter_count_is_exact() -> None:
    config = _config("tiny-mistral.json")
    h, kv, inter, layers, r = 256, 128, 768, 2, 8
    per_layer = r * ((h + h) + (h + kv) * 2 + (h + h) + (h + inter) * 2 + (inter + h))
    assert count_parameters(config, LoraSection(r=r)).lora == layers * per_layer
    only_attention = LoraSection(r=r, target_modules=["q_proj", "v_proj"])
    assert count_parameters(config, only_attention).lora == layers * r * ((h + h) + (h + kv))


def test_tiny_plan_stages_and_batch_arithmetic() -> None:
    recipe = load_recipe(RECIPES / "tiny.yaml")
    plan = build_plan(recipe)
    assert [s.name for s in plan.stages] == [s.name for s in recipe_stages(recipe, "RECIPE")]  # run's order
    stages = {s.name: s for s in plan.stages}
    sft, dpo = stages["sft"].training, stages["dpo"].training
    assert (sft.global_batch, sft.tokens_per_step) == (1, 768)
    assert (dpo.global_batch, dpo.tokens_per_step) == (2, 2 * 2 * 768)
    assert sft.memory.overhead == 0, "a CPU run has no CUDA context to pay for"


def test_world_size_and_accumulation_multiply_the_batch() -> None:
    overrides = [
        "sft.resources.nodes=4",
        "sft.resources.gpus_per_node=8",
        "sft.resources.processes_per_node=null",
        "sft.gradient_accumulation_steps=3",
    ]
    (sft,) = (
        s.training
        for s in build_plan(load_recipe(RECIPES / "tiny.yaml", overrides)).stages
        if s.name == "sft"
    )
    assert (sft.world_size, sft.global_batch) == (32, 1 * 3 * 32)


def test_merge_runs_before_the_stage_that_starts_from_it() -> None:
    plan = build_plan(load_recipe(RECIPES / "hermes-2-theta-llama-3-8b.yaml"))
    names = [s.name for s in plan.stages]
    assert names.index("merge") < names.index("dpo")


def test_lora_is_folded_into_the_base_when_packaging_and_trains_only_adapters() -> None:
    pretrained = ["model.init=pretrained", "model.name_or_path=mistralai/Mistral-7B-v0.1"]
    plan = build_plan(load_recipe(RECIPES / "tiny.yaml", ["sft.mode=lora", *pretrained]))
    stages = {s.name: s for s in plan.stages}
    assert "folds the sft adapters into the base" in stages["package"].summary
    sft = stages["sft"].training
    assert 0 < sft.trainable_parameters < plan.total_parameters / 2


def _shape(**changes) -> TrainShape:
    base = {
        "mode": "full",
        "precision": "bf16",
        "optimizer": "adamw_torch",
        "micro_batch_size": 1,
        "seq_len": 4096,
        "gradient_checkpointing": True,
        "world_size": 8,
        "zero": ZeroSettings(),
    }
    return TrainShape(**{**base, **changes})


def _memory(config: str = "mistral-7b-v0.1.json", **changes):
    model_config = _config(config)
    return estimate_memory(model_config, count_parameters(model_config, LoraSection()), _shape(**changes))


def test_zero_stages_shard_what_they_promise() -> None:
    plain, z1, z2, z3 = (_memory(zero=ZeroSettings(stage=s)) for s in range(4))
    parameters = count_parameters(_config("mistral-7b-v0.1.json")).total
    fp32_gradients = parameters * 4 / 8  # DeepSpeed's optimizer steps on an fp32 copy of its gradient shard
    # without DeepSpeed everything stays bf16; DeepSpeed adds fp32 master weights to Adam's moments
    assert plain.weights == plain.gradients == parameters * 2 and plain.optimizer == parameters * 4
    assert z1.optimizer == parameters * 12 / 8 and z1.weights == plain.weights
    assert z1.gradients == plain.gradients + fp32_gradients
    assert z2.gradients == plain.gradients / 8 + fp32_gradients and z2.weights == plain.weights
    assert z3.weights == plain.weights / 8 and z3.gradients == fp32_gradients
    assert z3.largest_layer > 0 and z2.largest_layer == plain.largest_layer == 0
    offloaded = _memory(zero=ZeroSettings(stage=3, offload_optimizer=True, offload_params=True))
    assert offloaded.optimizer == offloaded.gradients == offloaded.weights == 0
    assert offloaded.largest_layer == z3.largest_layer


def _deepspeed_model_states(config, stage: int, nodes: int, gpus: int, offload: bool, offload_params: bool):
    """DeepSpeed's own per-GPU estimate, in bytes, with the largest layer found by its own walk of the model."""
    zero2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    zero3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    total = count_parameters(config).total
    if stage == 2:
        return zero2.estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=offload)[1]
    with torch.device("meta"):
        largest = zero3.model_to_params(AutoModelForCausalLM.from_config(config))[1]
    assert largest == largest_layer_parameters(config)
    return zero3.estimate_zero3_model_states_mem_needs(
        total, largest, gpus, nodes, cpu_offload=offload, cpu_offload_params=offload_params
    )[1]


@pytest.mark.parametrize(
    ("config", "stage", "nodes", "gpus", "offload", "offload_params"),
    [
        ("mistral-7b-v0.1.json", 3, 2, 8, False, False),  # Hermes 2 Pro SFT
        ("llama-3-8b.json", 3, 1, 8, False, False),  # Hermes 2 Theta DPO
        ("llama-3-8b.json", 3, 1, 8, True, False),
        ("llama-3-8b.json", 3, 4, 8, True, True),
        ("mistral-7b-v0.1.json", 2, 1, 8, False, False),
        ("mistral-7b-v0.1.json", 2, 2, 4, True, False),
        ("tiny-llama.json", 3, 1, 2, False, False),
    ],
)
def test_model_states_match_deepspeeds_estimator(
    config: str, stage: int, nodes: int, gpus: int, offload: bool, offload_params: bool
) -> None:
    zero = ZeroSettings(stage=stage, offload_optimizer=offload, offload_params=offload_params)
    ours = _memory(config=config, zero=zero, world_size=nodes * gpus)
    states = ours.weights + ours.gradients + ours.optimizer + ours.largest_layer
    expected = _deepspeed_model_states(_config(config), stage, nodes, gpus, offload, offload_params)
    assert states == pytest.approx(expected, abs=2)  # DeepSpeed truncates to whole bytes


def test_shipped_recipes_model_states_in_gib() -> None:
    """The figures DeepSpeed's estimators print (as "GB": bytes / 2**30) for the two ZeRO-3 recipes."""
    for recipe, stage, expected in (
        ("hermes-2-pro-mistral-7b.yaml", "sft", 8.08),
        ("hermes-2-theta-llama-3-8b.yaml", "dpo", 18.78),
    ):
        (memory,) = (
            s.training.memory for s in build_plan(load_recipe(RECIPES / recipe)).stages if s.name == stage
        )
        states = memory.weights + memory.gradients + memory.optimizer + memory.largest_layer
        assert round(states / GIB, 2) == expected


def test_full_7b_model_states_follow_the_weights_dtype_without_deepspeed() -> None:
    parameters = count_parameters(_config("mistral-7b-v0.1.json")).total
    for weight_bytes, per_parameter in ((2, 8), (4, 16)):  # weights, gradients and Adam's two moments
        memory = _memory(weight_bytes=weight_bytes)
        assert memory.weights + memory.gradients + memory.optimizer == parameters * per_parameter
    assert _memory(weight_bytes=4).total > 80 * GIB > _memory(weight_bytes=2).total
    assert _memory(weight_bytes=4, zero=ZeroSettings(stage=3)).total < 80 * GIB


def test_lora_dropout_keeps_a_copy_of_each_adapted_input() -> None:
    """A dropped-out copy (2 bytes in bf16) and its mask (1 byte) per input feature of every adapted module,
    for every token; with gradient checkpointing one layer's share."""
    counts = count_parameters(_config("mistral-7b-v0.1.json"), LoraSection())
    tokens = 4096
    for checkpointing, layers in ((False, 32), (True, 1)):
        plain = _memory(mode="qlora", gradient_checkpointing=checkpointing)
        dropped = _memory(mode="qlora", gradient_checkpointing=checkpointing, lora_dropout=True)
        per_layer = counts.lora_inputs // 32
        assert dropped.activations - plain.activations == tokens * layers * per_layer * 3


def test_adapters_and_quantisation_shrink_the_footprint() -> None:
    full, lora, qlora = _memory(), _memory(mode="lora"), _memory(mode="qlora")
    assert qlora.weights < lora.weights
    assert lora.gradients + lora.optimizer < (full.gradients + full.optimizer) / 50
    assert qlora.total < lora.total < full.total


def test_dpo_reference_and_pairs_cost_memory() -> None:
    sft = _memory()
    dpo = _memory(dpo_reference=True, pairs=True)
    assert dpo.reference_model == sft.weights
    assert dpo.activations == 2 * sft.activations


def test_checkpointing_reduces_activations() -> None:
    assert (
        _memory(gradient_checkpointing=True).activations
        < _memory(gradient_checkpointing=False).activations / 5
    )


def test_plan_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(RECIPES / "tiny.yaml"), "--json", "--set", "sft.micro_batch_size=8"]) == 0
    plan = json.loads(capsys.readouterr().out)
    sft = next(s for s in plan["stages"] if s["name"] == "sft")
    assert sft["training"]["global_batch"] == 8
    assert sft["training"]["fits"] is True


def test_plan_text_names_the_batch_and_memory(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(RECIPES / "hermes-2-pro-mistral-7b.yaml")]) == 0
    out = capsys.readouterr().out
    assert "global batch 128 = 2 micro batch x 4 accumulation x 16 world size" in out
    assert "ZeRO stage 3" in out and "GPU memory/device" in out


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_shipped_recipe_plans_on_a_fresh_machine(
    recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No image folders, no Hub: every recipe plans (the Vision recipe notes the folders prep will need)."""
    monkeypatch.delenv("HERMES_IMAGE_ROOT", raising=False)
    assert main(["plan", str(recipe)]) == 0
    out, err = capsys.readouterr()
    assert out.strip()
    assert all(line.startswith("note: ") and "HERMES_IMAGE_ROOT" in line for line in err.splitlines())


def test_vision_plan_counts_the_tower_and_the_projector(capsys: pytest.CaptureFixture[str]) -> None:
    """SigLIP-400M's vision half is 413M parameters (0.77 GiB in bf16), the projector 21.5M; stage 1 trains
    the projector alone, stage 2 the projector and the LLM."""
    assert main(["plan", str(RECIPES / "nous-hermes-2-vision-mistral-7b.yaml")]) == 0
    out = capsys.readouterr().out
    projector, sft = out.split("  2. projector")[1].split("  3. sft")
    assert "trainable 21,504,000 parameters" in projector and "vision 0.93)" in projector
    assert "trainable 7,263,236,096 parameters" in sft and "vision 0.93)" in sft
