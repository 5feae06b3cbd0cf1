"""The small pieces of the training stage: embeddings, checkpoints, launch, tracking, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_support import small_recipe_dict, write_recipe
from transformers import TrainerControl, TrainerState, TrainingArguments

from hermes_pipeline.chat_format.tokens import IM_END
from hermes_pipeline.errors import UserError
from hermes_pipeline.models import fit_embeddings, set_stop_tokens
from hermes_pipeline.recipe.loader import load_recipe
from hermes_pipeline.recipe.schema import Resources
from hermes_pipeline.tiny import build_tiny_model, load_tiny_tokenizer, tiny_model_config
from hermes_pipeline.train.callbacks import MetricsLog
from hermes_pipeline.train.checkpoints import (
    SEAL,
    TRAINER_STATE,
    checkpoints,
    latest_complete,
    remove_unusable,
    seal,
)
from hermes_pipeline.train.launch import configure_devices, relaunch_command
from hermes_pipeline.train.tracking import configure_wandb, wandb_mode


def test_new_embedding_rows_start_at_the_mean_of_the_old_ones() -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = load_tiny_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_model_config(vocab_size=1500))  # no room for chat tokens
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    added = fit_embeddings(model, tokenizer, pad_to_multiple_of=64)
    assert added == 1536 - 1500 and model.get_input_embeddings().weight.shape[0] == 1536
    for layer, old in ((model.get_input_embeddings(), old_in), (model.get_output_embeddings(), old_out)):
        weight = layer.weight.detach()
        assert torch.equal(weight[:1500], old)
        torch.testing.assert_close(weight[1500:], old.mean(dim=0, keepdim=True).expand(36, -1))


def test_a_model_with_room_for_every_token_is_left_alone() -> None:
    model = build_tiny_model()
    assert fit_embeddings(model, load_tiny_tokenizer(), pad_to_multiple_of=64) == 0


def test_stop_tokens_are_im_end_everywhere_and_pad_is_not_eos() -> None:
    tokenizer, model = load_tiny_tokenizer(), build_tiny_model()
    model.config.eos_token_id = model.generation_config.eos_token_id = 2
    set_stop_tokens(model, tokenizer)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert model.config.eos_token_id == model.generation_config.eos_token_id == im_end
    assert (
        model.config.pad_token_id == model.generation_config.pad_token_id == tokenizer.pad_token_id != im_end
    )


def _checkpoint(folder: Path, step: int, sealed: bool) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"w" * 64)
    (path / TRAINER_STATE).write_text(json.dumps({"global_step": step}))
    if sealed:
        seal(path, step)
    return path


def test_only_sound_sealed_checkpoints_are_resumed_and_the_others_are_removed(tmp_path: Path) -> None:
    old_seal = _checkpoint(tmp_path, 5, sealed=False)
    (old_seal / SEAL).write_text("5\n")  # a seal from before seals listed sizes: still resumable
    sound = _checkpoint(tmp_path, 10, sealed=True)
    truncated = _checkpoint(tmp_path, 15, sealed=True)
    with (truncated / "model.safetensors").open("r+b") as shard:
        shard.truncate(10)
    stateless = _checkpoint(tmp_path, 20, sealed=True)
    (stateless / TRAINER_STATE).unlink()
    cut_off = _checkpoint(tmp_path, 25, sealed=False)
    (tmp_path / "checkpoint-notes").mkdir()
    assert remove_unusable(tmp_path) == [
        (truncated, "model.safetensors has 10 bytes where 64 were sealed"),
        (stateless, f"{TRAINER_STATE} is missing"),
        (cut_off, "cut off before it was complete"),
    ]
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-10"]
    assert latest_complete(tmp_path) == sound
    assert latest_complete(tmp_path / "missing") is None


def test_one_process_runs_in_place_and_several_relaunch_under_torchrun(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert relaunch_command(Resources(gpus_per_node=0), ["train", "sft", "r.yaml"]) is None
    command = relaunch_command(Resources(gpus_per_node=0, processes_per_node=2), ["train", "sft", "r.yaml"])
    assert command is not None
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert command[-3:] == ["train", "sft", "r.yaml"]
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert relaunch_command(Resources(gpus_per_node=0, processes_per_node=2), ["train"]) is None
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(UserError, match="slurm submit"):
        relaunch_command(Resources(nodes=2), ["train"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_asking_for_gpus_on_a_cpu_machine_names_the_setting() -> None:
    with pytest.raises(UserError, match=r"sft.resources.gpus_per_node=0"):
        configure_devices(Resources(gpus_per_node=8), "sft")


def test_wandb_goes_online_only_with_a_key_and_never_prompts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = small_recipe_dict(tmp_path / "run")
    raw["tracking"] = {"wandb_project": "p", "mode": "auto"}
    recipe = load_recipe(write_recipe(tmp_path, raw))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode(recipe) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wandb_mode(recipe) == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    online = recipe.model_copy(update={"tracking": recipe.tracking.model_copy(update={"mode": "online"})})
    with pytest.raises(UserError, match="WANDB_API_KEY"):
        configure_wandb(online, tmp_path)
    no_project = recipe.model_copy(
        update={"tracking": recipe.tracking.model_copy(update={"wandb_project": None})}
    )
    assert wandb_mode(no_project) == "disabled"


def test_a_resumed_run_drops_metrics_logged_after_its_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)))
    state = TrainerState(global_step=4, is_world_process_zero=True)
    log = MetricsLog(path)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    log.on_train_begin(args, state, TrainerControl())
    state.global_step = 5
    log.on_log(args, state, TrainerControl(), logs={"loss": 0.5})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_lora_on_a_model_built_from_config_is_refused(tmp_path: Path) -> None:
    raw = small_recipe_dict(tmp_path / "run")
    raw["sft"]["mode"] = "lora"
    with pytest.raises(UserError, match=r"sft.mode: lora adapts trained weights"):
        load_recipe(write_recipe(tmp_path, raw))
