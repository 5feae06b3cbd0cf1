"""The plan: stage order, batch arithmetic, parameter counts and the memory estimate's behaviour."""

import json
from pathlib import Path

import pytest

from hermes_pipeline.cli import main
from hermes_pipeline.memory import GIB, TrainShape, ZeroSettings, estimate_memory
from hermes_pipeline.model_info import count_parameters, load_model_config
from hermes_pipeline.plan import build_plan
from hermes_pipeline.recipe.loader import load_recipe
from hermes_pipeline.recipe.schema import LoraSection, ModelSection

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
    plan = build_plan(load_recipe(RECIPES / "tiny.yaml"))
    assert [s.name for s in plan.stages] == ["prep", "sft", "dpo", "package", "export", "eval"]
    sft, dpo = plan.stages[1].training, plan.stages[2].training
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
    sft = build_plan(load_recipe(RECIPES / "tiny.yaml", overrides)).stages[1].training
    assert (sft.world_size, sft.global_batch) == (32, 1 * 3 * 32)


def test_merge_runs_before_the_stage_that_starts_from_it() -> None:
    plan = build_plan(load_recipe(RECIPES / "hermes-2-theta-llama-3-8b.yaml"))
    names = [s.name for s in plan.stages]
    assert names.index("merge_models") < names.index("dpo")


def test_lora_adds_a_merge_stage_and_trains_only_adapters() -> None:
    pretrained = ["model.init=pretrained", "model.name_or_path=mistralai/Mistral-7B-v0.1"]
    plan = build_plan(load_recipe(RECIPES / "tiny.yaml", ["sft.mode=lora", *pretrained]))
    assert "merge_lora" in [s.name for s in plan.stages]
    sft = plan.stages[1].training
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


def _memory(**changes):
    config = _config("mistral-7b-v0.1.json")
    return estimate_memory(config, count_parameters(config, LoraSection()), _shape(**changes))


def test_zero_stages_shard_what_they_promise() -> None:
    plain, z1, z2, z3 = (_memory(zero=ZeroSettings(stage=s)) for s in range(4))
    assert z1.optimizer == plain.optimizer / 8 and z1.gradients == plain.gradients
    assert z2.gradients == plain.gradients / 8 and z2.weights == plain.weights
    assert z3.weights == plain.weights / 8
    offloaded = _memory(zero=ZeroSettings(stage=3, offload_optimizer=True, offload_params=True))
    assert offloaded.optimizer == 0 and offloaded.weights == 0


def test_full_7b_without_sharding_does_not_fit_an_80gb_card() -> None:
    assert _memory().total > 80 * GIB  # 16 bytes per parameter for weights, grads and Adam alone
    assert _memory(zero=ZeroSettings(stage=3)).total < 80 * GIB


def test_adapters_and_quantisation_shrink_the_footprint() -> None:
    full, lora, qlora = _memory(), _memory(mode="lora"), _memory(mode="qlora")
    assert qlora.weights < lora.weights
    assert lora.gradients + lora.optimizer < (full.gradients + full.optimizer) / 100
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
