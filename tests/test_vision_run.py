"""The tiny Vision recipe end to end, as `hermes-pipeline run configs/recipes/tiny-vision.yaml` runs it: the
projector stage trains the projector alone, visual instruction tuning leaves the tower as it was, the
packaged folder is what AutoProcessor and the LLaVA class load (and reads pictures into the ids prep trained
on), the GGUF + mmproj pair answers in llama-server as transformers does, and the <fn_call> eval on held-out
pictures rises over the untrained model."""

from __future__ import annotations

import base64
import json
import shutil
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_support import ROOT, cli
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from hermes_pipeline.errors import UserError
from hermes_pipeline.llama_server import free_port
from hermes_pipeline.merge import mmproj
from hermes_pipeline.merge.gguf_check import GgufCheckFailed
from hermes_pipeline.merge.llava import probe_inputs
from hermes_pipeline.merge.llava_gguf import (
    IMAGE_FEATURES_TOLERANCE,
    LOGPROB_TOLERANCE,
    transformers_reference,
    verify_llava_gguf,
)
from hermes_pipeline.merge.serve import serve
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


def test_gguf_and_mmproj_answer_in_llama_server_as_transformers_does(vision_run: Path) -> None:
    """Each language-model file was checked with the mmproj in llama-server: the probe is as many tokens as
    transformers reads, the image features and first-token log-probabilities agree, and the f16 pair's
    greedy reply is transformers' greedy reply word for word."""
    folder = vision_run / "gguf"
    assert sorted(p.name for p in folder.glob("*.gguf")) == [
        "mmproj-tiny-vision-f16.gguf",
        "tiny-vision-Q8_0.gguf",
        "tiny-vision-f16.gguf",
    ]
    reports = {r["gguf_type"]: r for r in json.loads((folder / "verification.json").read_text())}
    final = vision_run / "final"
    processor = AutoProcessor.from_pretrained(final)
    inputs = probe_inputs(processor)
    for report in reports.values():
        assert report["problems"] == [] and report["prompt_tokens"] == inputs["input_ids"].shape[1]
        assert report["image_features_relative_difference"] <= IMAGE_FEATURES_TOLERANCE
    f16 = reports["f16"]
    assert max(f16["max_logprob_difference"], f16["chat_max_logprob_difference"]) <= LOGPROB_TOLERANCE
    model = LlavaForConditionalGeneration.from_pretrained(final)
    out = model.generate(**inputs, max_new_tokens=128, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    # The tokenizer's decoder drops the space that opens the answer; llama.cpp keeps it.
    assert f16["reply"].strip() == processor.decode(out, skip_special_tokens=True).strip()


def test_mmproj_with_another_normalization_fails_verification(vision_run: Path, tmp_path: Path) -> None:
    """The converter's own default without --image-mean/--image-std is CLIP's normalization; an mmproj
    written with it reads every picture differently from the packaged processor and must not ship."""
    final, copy = vision_run / "final", tmp_path / "final"
    shutil.copytree(final, copy)
    config = json.loads((copy / "processor_config.json").read_text())
    config["image_processor"] |= {
        "image_mean": [0.4815, 0.4578, 0.4082],
        "image_std": [0.2686, 0.2613, 0.2758],
    }
    (copy / "processor_config.json").write_text(json.dumps(config))
    mmproj.write_mmproj(copy, tmp_path / "mmproj.gguf", log=lambda _: None)
    lm = vision_run / "gguf" / "tiny-vision-f16.gguf"
    with pytest.raises(GgufCheckFailed, match="image features differ from transformers'"):
        verify_llava_gguf(lm, tmp_path / "mmproj.gguf", final, "f16", transformers_reference(final))


def test_mmproj_export_without_the_converter_names_the_setup_command(
    vision_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mmproj, "converter_path", lambda: tmp_path / "missing.py")
    with pytest.raises(UserError, match="run `hermes-pipeline setup mmproj-converter`"):
        mmproj.write_mmproj(vision_run / "final", tmp_path / "mmproj.gguf")


def test_serve_answers_a_picture_with_the_mmproj(vision_run: Path) -> None:
    """`serve` on the run starts llama-server with the mmproj beside the GGUF; a chat request with a held-out
    picture (the README's form: the picture, then the question after a newline) gets transformers' answer."""
    row = json.loads((ROOT / "data" / "tiny-vision" / "eval.json").read_text())[0]
    picture = ROOT / "data" / "tiny-vision" / "images" / row["image"]
    question = "What colour are the shapes?"
    url = f"data:image/png;base64,{base64.b64encode(picture.read_bytes()).decode()}"
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": f"\n{question}"}]
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 32}
    answers, logs = [], []

    def ask(base: str) -> None:
        request = urllib.request.Request(
            f"{base}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answers.append(json.loads(response.read())["choices"][0]["message"]["content"])

    port = free_port()
    serve(
        vision_run, port=port, gguf_type="f16", log=logs.append, until=lambda: ask(f"http://127.0.0.1:{port}")
    )
    assert "with mmproj-tiny-vision-f16.gguf" in logs[0]
    final = vision_run / "final"
    processor = AutoProcessor.from_pretrained(final)
    text = processor.apply_chat_template(
        [{"role": "user", "content": f"<image>\n{question}"}], tokenize=False, add_generation_prompt=True
    )
    with Image.open(picture) as image:
        inputs = processor(
            images=[image.convert("RGB")], text=[text], add_special_tokens=False, return_tensors="pt"
        )
    model = LlavaForConditionalGeneration.from_pretrained(final)
    out = model.generate(**inputs, max_new_tokens=32, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert [a.strip() for a in answers] == [processor.decode(out, skip_special_tokens=True).strip()]


def test_eval_after_export_answers_as_transformers_did_after_sft(vision_run: Path) -> None:
    """The eval after export runs the f16 GGUF with its mmproj in llama-server on the same held-out rows:
    its answers are the sft model's in transformers, row for row, but for one f16 near-tie at most (all 36
    agree as measured; a prompt that carries BOS twice changes two)."""

    def answers(after: str) -> list[str]:
        path = vision_run / "eval" / after / "vision_function_calling" / "predictions.jsonl"
        return [json.loads(line)["output"].strip() for line in path.read_text().splitlines()]

    sft, export = answers("sft"), answers("export")
    assert len(sft) == len(export) == 36
    assert sum(a == b for a, b in zip(sft, export, strict=True)) >= 35


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
