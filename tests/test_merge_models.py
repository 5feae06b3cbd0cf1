"""Model merging through mergekit on two tiny parents: the interpolation ends, a weighted average, and the
Hermes side's chat tokens, templates and embeddings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hermes_pipeline.chat_format.templates import hermes_templates
from hermes_pipeline.chat_format.tokens import CHAT_TOKENS, save_tokenizer
from hermes_pipeline.merge.models import merge_models
from hermes_pipeline.recipe.schema import ModelMerge
from hermes_pipeline.tiny import build_tiny_model, load_tiny_tokenizer

# mergekit refills the rows past the vocabulary (padding to a multiple of 64); no token ever uses them.
VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def parents(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folders = []
    for seed in (1, 2):
        folder = tmp_path_factory.mktemp(f"parent{seed}")
        build_tiny_model(seed=seed).save_pretrained(folder)
        save_tokenizer(load_tiny_tokenizer(), folder)
        folders.append(folder)
    return folders[0], folders[1]


def _merged(parents: tuple[Path, Path], tmp_path: Path, **spec: object) -> dict[str, torch.Tensor]:
    hermes, other = parents
    merge = ModelMerge.model_validate(
        {
            "models": [{"model": str(hermes)}, {"model": str(other)}],
            "base_model": str(hermes),
            "dtype": "float32",
            **spec,
        }
    )
    merge_models(merge, tmp_path / "out", pad_to_multiple_of=64, shard_size="5GB", seed=0)
    return _weights(tmp_path / "out")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights a token can reach: embedding and LM-head rows cut at the tokenizer's size."""
    size = len(load_tiny_tokenizer())
    state = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    return {name: t[:size] if name in VOCAB_ROWS else t for name, t in state.items()}


def _chat_ids() -> list[int]:
    return load_tiny_tokenizer().convert_tokens_to_ids(list(CHAT_TOKENS))


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_slerp_ends_return_a_parent(parents: tuple[Path, Path], tmp_path: Path, t: float) -> None:
    merged = _merged(parents, tmp_path, method="slerp", parameters={"t": t})
    parent = _weights(parents[int(t)])
    hermes = _weights(parents[0])
    chat = _chat_ids()
    for name, tensor in parent.items():
        expected = tensor.clone()
        if name in VOCAB_ROWS:  # the chat tokens' rows (input and output) come from the Hermes side
            expected[chat] = hermes[name][chat]
        assert torch.equal(merged[name], expected), name


def test_linear_is_the_weighted_average(parents: tuple[Path, Path], tmp_path: Path) -> None:
    hermes, other = parents
    merge = {
        "method": "linear",
        "models": [
            {"model": str(hermes), "parameters": {"weight": 0.25}},
            {"model": str(other), "parameters": {"weight": 0.75}},
        ],
    }
    merged = _merged(parents, tmp_path, **merge)
    a, b = _weights(hermes), _weights(other)
    chat = _chat_ids()
    for name in a:
        expected = 0.25 * a[name] + 0.75 * b[name]
        if name in VOCAB_ROWS:
            expected[chat] = a[name][chat]
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_merged_model_keeps_hermes_templates_and_generates(
    parents: tuple[Path, Path], tmp_path: Path
) -> None:
    _merged(
        parents,
        tmp_path,
        method="slerp",
        parameters={"t": [{"filter": "self_attn", "value": [0.0, 0.5]}, {"value": 0.3}]},
    )
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.chat_template == hermes_templates()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert output.shape[1] == prompt["input_ids"].shape[1] + 5 or tokenizer.eos_token_id in output[0].tolist()
