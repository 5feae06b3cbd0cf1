"""The streaming LoRA merge: equal to peft's own merge, chains of adapters, grown embeddings, trained token
rows, and a verifier that catches a wrong merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from train_support import cli
from transformers import AutoModelForCausalLM

from hermes_pipeline.chat_format.tokens import save_tokenizer
from hermes_pipeline.errors import UserError
from hermes_pipeline.merge.lora import (
    adapter_chain,
    four_bit_roundtrip,
    merge_adapters,
    verify_merge,
    write_merged_model,
)
from hermes_pipeline.merge.shards import INDEX, shard_files
from hermes_pipeline.models import fit_embeddings
from hermes_pipeline.recipe.schema import LoraSection, SftStage
from hermes_pipeline.tiny import build_tiny_model, load_tiny_tokenizer
from hermes_pipeline.train.model import chat_token_ids, lora_config, record_adapter_base

BASE_ROWS = 1472  # fewer rows than the tokenizer needs: the training stage grew them to 1536


def _perturbed_adapter(model: torch.nn.Module, folder: Path, base: str, seed: int) -> None:
    """An adapter as our LoRA training leaves it, with random (non-zero) trained values."""
    tokenizer = load_tiny_tokenizer()
    stage = SftStage(mode="lora", lora=LoraSection(r=4, alpha=8, dropout=0.0))
    peft_model = get_peft_model(model, lora_config(stage, tokenizer))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    record_adapter_base(folder, base)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A base without the chat rows, an SFT adapter on it, and a DPO adapter on base + SFT adapter."""
    root = tmp_path_factory.mktemp("lora")
    base = build_tiny_model(seed=7)
    base.resize_token_embeddings(BASE_ROWS)
    base.save_pretrained(root / "base")
    save_tokenizer(load_tiny_tokenizer(), root / "base")

    model = AutoModelForCausalLM.from_pretrained(root / "base")
    fit_embeddings(model, load_tiny_tokenizer(), 64)
    _perturbed_adapter(model, root / "sft", str(root / "base"), seed=1)
    merged_sft = PeftModel.from_pretrained(fit_and_load(root / "base"), str(root / "sft")).merge_and_unload()
    _perturbed_adapter(merged_sft, root / "dpo", str(root / "sft"), seed=2)
    return root / "base", root / "sft", root / "dpo"


def fit_and_load(folder: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(folder)
    fit_embeddings(model, load_tiny_tokenizer(), 64)
    return model


def test_chain_is_followed_from_the_recorded_bases(chain: tuple[Path, Path, Path]) -> None:
    base, sft, dpo = chain
    assert adapter_chain(dpo) == (str(base), [sft, dpo])


def test_streamed_merge_equals_peft_merge_and_unload(chain: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, sft, dpo = chain
    merge_adapters(str(base), [sft, dpo], tmp_path, max_shard_bytes=1_000_000)
    assert len(shard_files(tmp_path)) > 1 and (tmp_path / INDEX).is_file()
    save_tokenizer(load_tiny_tokenizer(), tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    model = PeftModel.from_pretrained(fit_and_load(base), str(sft)).merge_and_unload()
    theirs = PeftModel.from_pretrained(model, str(dpo)).merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert verify_merge(str(base), [sft, dpo], tmp_path) < 1e-4


def test_trained_token_rows_arrive_and_grown_rows_start_at_the_mean(
    chain: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, sft, _ = chain
    merge_adapters(str(base), [sft], tmp_path, max_shard_bytes=10**9)
    embed = AutoModelForCausalLM.from_pretrained(tmp_path).get_input_embeddings().weight
    original = AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().weight
    chat = chat_token_ids(load_tiny_tokenizer())
    trained = PeftModel.from_pretrained(fit_and_load(base), str(sft)).merge_and_unload()
    assert torch.equal(embed[chat], trained.get_input_embeddings().weight[chat])
    untouched = [i for i in range(BASE_ROWS, embed.shape[0]) if i not in chat]
    assert torch.allclose(embed[untouched], original.mean(dim=0).expand(len(untouched), -1), atol=1e-6)


def test_a_wrong_merge_is_caught(chain: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Negative control: skipping the SFT adapter gives a model the verifier must refuse."""
    base, sft, dpo = chain
    merge_adapters(str(base), [dpo], tmp_path, max_shard_bytes=10**9)
    save_tokenizer(load_tiny_tokenizer(), tmp_path)
    with pytest.raises(UserError, match="merged logits differ"):
        verify_merge(str(base), [sft, dpo], tmp_path)


def test_standalone_command_writes_a_verified_model_and_nothing_on_failure(
    chain: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, _, dpo = chain
    result = cli("merge", "lora", "--adapter", str(dpo), "--out", str(tmp_path / "merged"))
    assert "logits within" in result.stdout
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    wrong = cli(
        "merge",
        "lora",
        "--adapter",
        str(dpo),
        "--base",
        str(tmp_path / "nowhere"),
        "--out",
        str(tmp_path / "x"),
        check=False,
    )
    assert wrong.returncode == 2 and wrong.stderr.strip().count("\n") == 0
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_write_merged_model_leaves_no_output_when_verification_fails(
    chain: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, sft, dpo = chain

    def broken(*args: object, **kwargs: object) -> None:
        raise UserError("verification failed on purpose")

    monkeypatch.setattr("hermes_pipeline.merge.lora.verify_merge", broken)
    with pytest.raises(UserError):
        write_merged_model(str(base), [sft, dpo], tmp_path / "out", 10**9)
    assert list(tmp_path.iterdir()) == []


def test_qlora_adapters_can_merge_into_the_dequantised_base(
    chain: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    pytest.importorskip("bitsandbytes")
    base, sft, _ = chain
    (tmp_path / "original").mkdir()
    (tmp_path / "dequantized").mkdir()
    merge_adapters(str(base), [sft], tmp_path / "original", max_shard_bytes=10**9)
    merge_adapters(str(base), [sft], tmp_path / "dequantized", max_shard_bytes=10**9, dequantize=True)
    for folder in ("original", "dequantized"):
        save_tokenizer(load_tiny_tokenizer(), tmp_path / folder)
    name = "model.layers.0.mlp.down_proj.weight"
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "original").state_dict()[name]
    dequantized = AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized").state_dict()[name]
    base_weight = AutoModelForCausalLM.from_pretrained(base).state_dict()[name]
    torch.testing.assert_close(
        dequantized - original, four_bit_roundtrip(base_weight) - base_weight, rtol=0, atol=1e-6
    )
    assert verify_merge(str(base), [sft], tmp_path / "dequantized", dequantize=True) < 1e-4
    with pytest.raises(UserError, match="merged logits differ"):
        verify_merge(str(base), [sft], tmp_path / "dequantized")
