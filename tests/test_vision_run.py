"""The tiny Vision recipe end to end, as `hermes-pipeline run configs/recipes/tiny-vision.yaml` runs it: the
projector stage trains the projector alone, visual instruction tuning leaves the tower as it was, the
packaged folder is what AutoProcessor and the LLaVA class load (and reads pictures into the ids prep trained
on), and the <fn_call> eval on held-out pictures rises over the untrained model."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_support import ROOT, cli
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from hermes_pipeline.recipe.loader import load_recipe
from hermes_pipeline.rundir import MANIFEST
from hermes_pipeline.stages import recipe_stages, verify_outputs
from hermes_pipeline.vision import pad_to_square, start_llava

RECIPE = ROOT / "configs" / "recipes" / "tiny-vision.yaml"
PROJECTOR = "multi_modal_projector."
TOWER = "vision_tower."


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("vision") / "run"
    cli("run", str(RECIPE), "--set", f"run_dir={run}")
    return run


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _part(name: str) -> str:
    """Which part of a LLaVA model a weight belongs to, whatever prefix the checkpoint writes."""
    return "projector" if PROJECTOR in name else "tower" if TOWER in name else "llm"


def test_run_ends_verified(vision_run: Path) -> None:
    recipe = load_recipe(str(RECIPE), [f"run_dir={vision_run}"])
    stages = recipe_stages(recipe, str(RECIPE))
    assert all((stage.folder / MANIFEST).is_file() for stage in stages)
    assert verify_outputs(stages, log=lambda _: None) == []


def test_projector_stage_trains_the_projector_alone(vision_run: Path) -> None:
    """Every tensor but the projector's is bit-identical to the assembled starting model's."""
    recipe = load_recipe(str(RECIPE), [f"run_dir={vision_run}"])
    tokenizer = AutoTokenizer.from_pretrained(vision_run / "prep" / "tokenizer")
    start = dict(start_llava(recipe, tokenizer, None).state_dict())
    trained = LlavaForConditionalGeneration.from_pretrained(vision_run / "projector" / "model").state_dict()
    assert trained.keys() == start.keys()
    changed = {name for name in start if not torch.equal(start[name], trained[name])}
    assert changed == {name for name in start if _part(name) == "projector"}


def test_instruction_tuning_trains_projector_and_llm_never_the_tower(vision_run: Path) -> None:
    before, after = _weights(vision_run / "projector" / "model"), _weights(vision_run / "sft" / "model")
    assert before.keys() == after.keys()
    unchanged = {_part(name) for name in before if torch.equal(before[name], after[name])}
    changed = {_part(name) for name in before if not torch.equal(before[name], after[name])}
    assert unchanged == {"tower"} and changed == {"projector", "llm"}


def test_packaged_processor_reads_pictures_into_the_ids_prep_trained_on(vision_run: Path) -> None:
    """AutoProcessor on the packaged folder, given a training row's picture and its turns rendered by the
    packaged chat template, gives exactly the ids prep wrote for that row."""
    final = vision_run / "final"
    processor = AutoProcessor.from_pretrained(final)
    shard = sorted((vision_run / "prep" / "sft").glob("train-*.parquet"))[0]
    rows = [r for r in pq.read_table(shard).to_pylist() if r["images"]][:3]
    assert rows
    for row in rows:
        messages = json.loads(row["row"])["messages"]
        text = processor.apply_chat_template(messages, tokenize=False)
        with Image.open(row["images"][0]) as image:
            picture = pad_to_square(image, processor.image_processor.image_mean)
        ids = processor(images=[picture], text=[text], add_special_tokens=False)["input_ids"][0]
        assert list(ids) == row["input_ids"]


def test_packaged_model_stops_at_vicuna_eos(vision_run: Path) -> None:
    final = vision_run / "final"
    processor = AutoProcessor.from_pretrained(final)
    model = LlavaForConditionalGeneration.from_pretrained(final)
    eos = processor.tokenizer.convert_tokens_to_ids("</s>")
    assert processor.tokenizer.eos_token == "</s>" and model.generation_config.eos_token_id == eos
    row = json.loads((ROOT / "data" / "tiny-vision" / "eval.json").read_text())[0]
    question = [{"role": "user", "content": "<image>\nWhat colour are the shapes?"}]
    text = processor.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    with Image.open(ROOT / "data" / "tiny-vision" / "images" / row["image"]) as image:
        inputs = processor(
            images=[image.convert("RGB")], text=[text], add_special_tokens=False, return_tensors="pt"
        )
    out = model.generate(**inputs, max_new_tokens=64, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert out[-1] == eos and len(out) < 64, "the trained model ends its answer with </s> and stops there"


def test_fn_call_eval_rises_over_the_untrained_model(vision_run: Path) -> None:
    """Held-out pictures: the untrained model writes no valid answer; the trained one writes valid JSON under
    the schema and reads the colour from the picture far above chance (one colour in four)."""
    base = json.loads((vision_run / "eval" / "base" / "results.json").read_text())["vision_function_calling"]
    tuned = json.loads((vision_run / "eval" / "sft" / "results.json").read_text())["vision_function_calling"]
    assert base["n"] == tuned["n"] == 36
    assert base["accuracy"] == 0.0 and tuned["accuracy"] > 0.05, tuned
    assert base["fields"]["colour"] <= 0.25 and tuned["fields"]["colour"] >= 0.75, tuned
    card = (vision_run / "final" / "README.md").read_text()
    assert "Vicuna v1" in card and "<fn_call>" in card and "vision_function_calling" in card
