"""The LLaVA assembly: transformers' LLaVA class around a SigLIP tower and the tiny Mistral computes exactly
tower -> selected layer -> projector -> the LLM with image features in the image tokens' places."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig

from hermes_pipeline.chat_format.tokens import IMAGE_TOKEN, add_image_token
from hermes_pipeline.errors import UserError
from hermes_pipeline.recipe.schema import VisionSection
from hermes_pipeline.tiny import build_tiny_model, load_tiny_tokenizer
from hermes_pipeline.vision import assemble, image_token_count, load_tower, tower_config

ROOT = Path(__file__).resolve().parents[1]
TINY_SIGLIP = ROOT / "configs" / "models" / "tiny-siglip.json"


def _section(**changes: object) -> VisionSection:
    fields = {"tower_config": str(TINY_SIGLIP), "tower_init": "random", "projector_pretrain": {}}
    return VisionSection.model_validate(fields | changes)


@pytest.fixture(scope="module")
def tiny_llava() -> tuple:
    tokenizer = load_tiny_tokenizer()
    image_id = add_image_token(tokenizer)
    language_model = build_tiny_model("mistral", seed=1)
    assert (
        image_id < language_model.get_input_embeddings().num_embeddings
    )  # rows to spare, as for chat tokens
    section = _section(
        select_layer=-3
    )  # not LLaVA's default -2, so that the setting is seen to reach the model
    tower = load_tower(section, torch.float32, seed=2)
    parts = {
        "tower": {k: v.clone() for k, v in tower.state_dict().items()},
        "lm": {k: v.clone() for k, v in language_model.state_dict().items()},
    }
    return assemble(language_model, tower, section, image_id, seed=3), tokenizer, image_id, parts


def test_image_token_is_one_special_token(tiny_llava: tuple) -> None:
    _, tokenizer, image_id, _ = tiny_llava
    ids = tokenizer("<image>\nWhat shape?", add_special_tokens=False).input_ids
    assert ids[0] == image_id and ids.count(image_id) == 1
    assert IMAGE_TOKEN not in tokenizer.decode(ids, skip_special_tokens=True)
    assert add_image_token(tokenizer) == image_id  # idempotent


def test_forward_equals_tower_projector_and_llm_by_hand(tiny_llava: tuple) -> None:
    llava, tokenizer, image_id, parts = tiny_llava
    config = tower_config(_section())
    patches = image_token_count(config)
    assert patches == (64 // 16) ** 2 == llava.config.image_seq_length
    text = tokenizer("Two red circles.", add_special_tokens=False).input_ids
    input_ids = torch.tensor([[tokenizer.bos_token_id, *[image_id] * patches, *text]])
    pixels = torch.randn(
        1, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(4)
    )
    llava.eval()
    with torch.no_grad():
        logits = llava(input_ids=input_ids, pixel_values=pixels).logits

        hidden = llava.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-3]  # every patch
        projector = llava.model.multi_modal_projector
        features = projector.linear_2(torch.nn.functional.gelu(projector.linear_1(hidden)))
        embeddings = llava.model.language_model.embed_tokens(input_ids)
        embeddings[0, 1 : 1 + patches] = features[0]
        by_hand = llava.lm_head(llava.model.language_model(inputs_embeds=embeddings).last_hidden_state)
    torch.testing.assert_close(logits, by_hand, rtol=0, atol=0)

    # the tower and the language model are the given ones, untouched; the tower is frozen
    for name, value in llava.model.vision_tower.state_dict().items():
        assert torch.equal(value, parts["tower"][name]), name
    assert not any(p.requires_grad for p in llava.model.vision_tower.parameters())
    language = {f"model.language_model.{k.removeprefix('model.')}": v for k, v in parts["lm"].items()}
    language["lm_head.weight"] = language.pop("model.language_model.lm_head.weight")
    for name, value in language.items():
        assert torch.equal(llava.state_dict()[name], value), name


def test_the_projector_is_seeded_and_the_other_choice_refused() -> None:
    def projector(seed: int) -> torch.Tensor:
        tower = load_tower(_section(), torch.float32, seed=0)
        llava = assemble(build_tiny_model("mistral", seed=0), tower, _section(), 1, seed=seed)
        return llava.model.multi_modal_projector.linear_1.weight

    assert torch.equal(projector(5), projector(5)) and not torch.equal(projector(5), projector(6))
    tower = load_tower(_section(), torch.float32, seed=0)
    with pytest.raises(UserError, match=r"vision\.projector: linear is not built"):
        assemble(build_tiny_model("mistral"), tower, _section(projector="linear"), 1, seed=0)


def test_a_pretrained_tower_is_the_vision_half_of_a_whole_siglip(tmp_path: Path) -> None:
    """Hub towers are whole SigLIP checkpoints (text and vision); LLaVA takes the vision model alone."""
    vision = SiglipVisionConfig.from_json_file(TINY_SIGLIP)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    whole = SiglipModel(SiglipConfig(text_config=text, vision_config=vision.to_dict()))
    whole.save_pretrained(tmp_path / "siglip")
    tower = load_tower(
        _section(tower=str(tmp_path / "siglip"), tower_init="pretrained", tower_config=None), torch.float32, 0
    )
    assert type(tower).__name__ == "SiglipVisionModel" and not tower.config.vision_use_head
    expected = whole.vision_model.state_dict()
    loaded = tower.state_dict()
    assert set(loaded) == set(expected)
    for name, value in loaded.items():
        assert torch.equal(value, expected[name]), name
