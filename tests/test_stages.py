"""The stage list that both `run` and `slurm submit` execute: order, commands and where each one writes."""

from __future__ import annotations

from train_support import ROOT

from hermes_pipeline.recipe.loader import load_recipe
from hermes_pipeline.stages import recipe_stages

RECIPES = ROOT / "configs" / "recipes"


def test_tiny_runs_evals_around_training_then_packages_and_exports() -> None:
    path = str(RECIPES / "tiny.yaml")
    stages = recipe_stages(load_recipe(path), path, ["sft.learning_rate=1e-4"])
    assert [s.name for s in stages] == [
        "prep", "eval_base", "sft", "eval_sft", "dpo", "eval_dpo", "package", "export", "card",
    ]  # fmt: skip
    sft = stages[2]
    assert sft.command == ("train", "sft", path, "--set", "sft.learning_rate=1e-4")
    assert sft.folder.name == "sft" and sft.resources.processes_per_node == 1
    assert stages[1].command[:4] == ("eval", "stage", "--after", "base")
    assert stages[-3].folder.name == "final" and stages[-2].command[:2] == ("export", "gguf")
    assert stages[-1].needs == (
        "prep",
        "eval_base",
        "sft",
        "eval_sft",
        "dpo",
        "eval_dpo",
        "package",
        "export",
    )


def test_theta_merges_models_before_the_dpo_that_starts_from_the_merge() -> None:
    path = str(RECIPES / "hermes-2-theta-llama-3-8b.yaml")
    names = [s.name for s in recipe_stages(load_recipe(path), path)]
    assert names.index("merge") < names.index("dpo") < names.index("package") < names.index("export")
    assert "sft" not in names


def test_disabled_stages_and_evals_drop_out() -> None:
    path = str(RECIPES / "tiny.yaml")
    recipe = load_recipe(path, ["export.enabled=false", "eval.enabled=false", "dpo.enabled=false"])
    assert [s.name for s in recipe_stages(recipe, path)] == ["prep", "sft", "package", "card"]


def test_vision_pretrains_the_projector_then_tunes_projector_and_llm_from_it() -> None:
    path = str(RECIPES / "tiny-vision.yaml")
    stages = {s.name: s for s in recipe_stages(load_recipe(path), path)}
    order = ["prep", "eval_base", "projector", "sft", "eval_sft", "package", "export", "eval_export", "card"]
    assert list(stages) == order
    assert stages["projector"].command[:2] == ("train", "projector") and stages["projector"].needs == (
        "prep",
    )
    assert stages["sft"].needs == ("prep", "projector")
    assert stages["projector"].resources.processes_per_node == 1  # vision.projector_pretrain.resources
