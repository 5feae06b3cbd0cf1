"""The packaged model: shards with an index, EOS everywhere, both templates, the model card, the manifest,
and nothing that looks finished after a failure."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from peft import get_peft_model
from train_support import small_recipe_dict, write_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from hermes_pipeline.chat_format.templates import hermes_templates
from hermes_pipeline.chat_format.tokens import IM_END, save_tokenizer
from hermes_pipeline.errors import UserError
from hermes_pipeline.merge.card import run_card
from hermes_pipeline.merge.package import check_packaged, run_package
from hermes_pipeline.merge.probes import probe_ids, probe_logits
from hermes_pipeline.merge.shards import INDEX, shard_files
from hermes_pipeline.recipe.loader import load_recipe
from hermes_pipeline.recipe.schema import LoraSection, SftStage
from hermes_pipeline.rundir import MANIFEST, file_fingerprint, is_complete, write_manifest
from hermes_pipeline.stages import stage_fingerprint
from hermes_pipeline.tiny import build_tiny_model, load_tiny_tokenizer
from hermes_pipeline.train.model import lora_config, record_adapter_base


def _recipe(tmp_path: Path, **changes: object):
    raw = small_recipe_dict(tmp_path / "run")
    raw["dpo"] = {"enabled": False}
    raw["package"] = {"max_shard_size": "3MB", "license": "apache-2.0"}
    raw.update(changes)
    return load_recipe(write_recipe(tmp_path, raw))


def _finished_stage(folder: Path, model: torch.nn.Module) -> None:
    """What a finished training stage leaves: its model folder and a manifest."""
    model.save_pretrained(folder / "model")
    save_tokenizer(load_tiny_tokenizer(), folder / "model")
    write_manifest(folder, "test", {}, time.time())


def test_package_writes_the_downloadable_model(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    source = build_tiny_model(seed=4)
    _finished_stage(tmp_path / "run" / "sft", source)
    final = run_package(recipe, log=lambda _: None)

    assert len(shard_files(final)) > 1 and (final / INDEX).is_file()
    tokenizer = AutoTokenizer.from_pretrained(final)
    end = tokenizer.convert_tokens_to_ids(IM_END)
    assert tokenizer.eos_token == IM_END and tokenizer.chat_template == hermes_templates()
    assert json.loads((final / "config.json").read_text())["eos_token_id"] == end
    generation = json.loads((final / "generation_config.json").read_text())
    assert generation["eos_token_id"] == end and generation["temperature"] == 0.8 and generation["do_sample"]

    packaged = AutoModelForCausalLM.from_pretrained(final)
    prompts = probe_ids(tokenizer)
    for ours, theirs in zip(probe_logits(packaged, prompts), probe_logits(source, prompts), strict=True):
        assert torch.equal(ours, theirs)

    manifest = json.loads((final / MANIFEST).read_text())
    files = {str(p.relative_to(final)) for p in final.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert set(manifest["outputs"]) == files
    assert all(manifest["outputs"][name] == file_fingerprint(final / name) for name in files)


def test_package_is_skipped_when_done_and_redone_with_force(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    _finished_stage(tmp_path / "run" / "sft", build_tiny_model(seed=4))
    run_package(recipe, log=lambda _: None)
    messages: list[str] = []
    run_package(recipe, log=messages.append)
    assert "up to date" in messages[0]
    messages.clear()
    run_package(recipe, force=True, log=messages.append)
    assert not any("up to date" in m for m in messages)


def test_a_failed_check_leaves_nothing_that_looks_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _recipe(tmp_path)
    _finished_stage(tmp_path / "run" / "sft", build_tiny_model(seed=4))

    def broken(folder: Path) -> None:
        raise UserError("check failed on purpose")

    monkeypatch.setattr("hermes_pipeline.merge.package.check_packaged", broken)
    with pytest.raises(UserError):
        run_package(recipe, log=lambda _: None)
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "final.partial").exists()


def test_check_catches_a_wrong_eos(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    _finished_stage(tmp_path / "run" / "sft", build_tiny_model(seed=4))
    final = run_package(recipe, log=lambda _: None)
    path = final / "generation_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"eos_token_id": 2}))
    with pytest.raises(UserError, match=r"generation_config\.json eos_token_id is 2"):
        check_packaged(final)


def test_an_adapter_is_merged_into_its_base_when_packaged(tmp_path: Path) -> None:
    base_dir = tmp_path / "base"
    build_tiny_model(seed=6).save_pretrained(base_dir)
    save_tokenizer(load_tiny_tokenizer(), base_dir)
    recipe = _recipe(tmp_path, model={"name_or_path": str(base_dir), "dtype": "float32"})
    stage = SftStage(mode="lora", lora=LoraSection(r=4, alpha=8, dropout=0.0))
    # peft draws lora_A at random: seeded, the merge's logit difference is the same on every run (one draw
    # in a CI run, left to the test order's RNG state, reached 2.9e-4).
    torch.manual_seed(0)
    adapter = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), lora_config(stage, load_tiny_tokenizer())
    )
    with torch.no_grad():
        for parameter in adapter.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05)
    _finished_stage(tmp_path / "run" / "sft", adapter)
    record_adapter_base(tmp_path / "run" / "sft" / "model", str(base_dir))

    final = run_package(recipe, log=lambda _: None)
    assert not (final / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(final)
    expected = adapter.merge_and_unload().state_dict()
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
    assert json.loads((final / MANIFEST).read_text())["logits_max_abs_diff"] < 1e-4


def test_the_card_stage_publishes_the_card_without_touching_the_package(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, eval={"after": ["sft", "package"]})
    _finished_stage(tmp_path / "run" / "sft", build_tiny_model(seed=4))
    final = run_package(recipe, log=lambda _: None)
    sealed = (final / MANIFEST).read_bytes()
    run_card(recipe, log=lambda _: None)
    card = (final / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "apache-2.0" and "sft" in front["tags"]
    assert "<tools>" in card and "## Recipe" in card and "resources:" not in card

    # An eval that finishes after packaging re-renders the card, and only the card.
    _finished_eval(tmp_path / "run" / "eval" / "package", {"accuracy": 0.9125, "ci95": [0.83, 0.96], "n": 80})
    logs: list[str] = []
    run_card(recipe, log=logs.append)
    assert "| package | function_calling | 0.912 | 0.830 to 0.960 | 80 |" in (final / "README.md").read_text()
    assert (final / MANIFEST).read_bytes() == sealed
    assert is_complete(final, stage_fingerprint(recipe, "package"), json.loads(sealed)["inputs"])
    run_card(recipe, log=logs.append)
    assert "up to date" in logs[-1]


def _finished_eval(folder: Path, result: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"function_calling": result}))
    write_manifest(folder, "test", {}, time.time())
