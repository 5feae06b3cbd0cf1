"""The LLaVA assembly: transformers' LLaVA class around a SigLIP tower and the tiny Mistral computes exactly
tower -> selected layer -> projector -> the LLM with image features in the image tokens' places."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from prep_support import prep, write_recipe
from transformers import AutoProcessor, SiglipConfig, SiglipModel, SiglipVisionConfig

from hermes_pipeline.chat_format.templates import VICUNA_TEMPLATE, render, template_source
from hermes_pipeline.chat_format.tokens import IMAGE_TOKEN, add_image_token, use_vicuna_v1
from hermes_pipeline.data_prep.tokenize import ImageTokens, render_sft, tokenize_rendered
from hermes_pipeline.errors import UserError
from hermes_pipeline.recipe.schema import VisionSection
from hermes_pipeline.tiny import build_tiny_model, load_tiny_tokenizer
from hermes_pipeline.train.vision_batches import VisionBatches
from hermes_pipeline.vision import (
    assemble,
    build_processor,
    image_processor,
    image_token_count,
    load_tower,
    pad_to_square,
    tower_config,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_SIGLIP = ROOT / "configs" / "models" / "tiny-siglip.json"


def _section(**changes: object) -> VisionSection:
    fields = {"tower_config": str(TINY_SIGLIP), "tower_init": "random", "projector_pretrain": {}}
    return VisionSection.model_validate(fields | changes)


@pytest.fixture(scope="module")
def tiny_llava() -> tuple:
    tokenizer = load_tiny_tokenizer()
    use_vicuna_v1(tokenizer)
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


CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]},
    {"role": "assistant", "content": "Three."},
    {"role": "user", "content": "And their colour?"},
    {"role": "assistant", "content": "Red."},
]


def test_the_vicuna_template_renders_what_prep_trains_on() -> None:
    """The packaged chat template and prep's renderer are two paths to one text: an image part renders as
    prep's <image> line, and the generation prompt stops before the answer's leading space."""
    as_prep = [
        {**m, "content": "<image>\nHow many circles?"} if i == 0 else m for i, m in enumerate(CONVERSATION)
    ]
    trained = render_sft({"messages": as_prep}, "vicuna_v1", "<s>")
    vicuna = template_source(VICUNA_TEMPLATE)
    assert render(CONVERSATION, template=vicuna, bos_token="<s>") == trained.text
    prompt = render(CONVERSATION[:3], template=vicuna, bos_token="<s>", add_generation_prompt=True)
    assert prompt + trained.text[trained.spans[1][0] :] == trained.text


def test_the_processor_writes_images_as_prep_does_and_reloads_with_autoprocessor(
    tiny_llava: tuple, tmp_path: Path
) -> None:
    llava, tokenizer, image_id, _ = tiny_llava
    config = llava.config.vision_config
    processor = build_processor(tokenizer, image_processor(_section(), config), config)
    processor.save_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(processor).__name__ == "LlavaProcessor"
    assert processor.chat_template == processor.tokenizer.chat_template == template_source(VICUNA_TEMPLATE)
    assert processor.tokenizer.eos_token == "</s>" and processor.tokenizer.pad_token == "<unk>"

    text = processor.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    picture = Image.new("RGB", (80, 50), (200, 30, 30))
    batch = processor(text=text, images=[picture], add_special_tokens=False, return_tensors="pt")
    rendered = render_sft(
        {"messages": [{**CONVERSATION[0], "content": "<image>\nHow many circles?"}, *CONVERSATION[1:]]},
        "vicuna_v1",
        tokenizer.bos_token,
    )
    (prepared,) = tokenize_rendered(
        tokenizer, [rendered], 4096, truncate=False, image=ImageTokens(image_id, 16)
    )
    assert batch["input_ids"][0].tolist() == prepared.input_ids
    assert batch["pixel_values"].shape == (1, 3, 64, 64)
    with torch.no_grad():  # the packaged pair runs: image tokens and features agree
        llava(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])


def test_pad_to_square_centres_the_image_on_the_mean_colour() -> None:
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    square = pad_to_square(wide, [0.5, 0.5, 0.5])
    assert square.size == (40, 40)
    assert square.getpixel((0, 0)) == square.getpixel((39, 39)) == (127, 127, 127)
    assert square.getpixel((20, 20)) == (255, 0, 0) and square.getpixel((20, 9)) == (127, 127, 127)
    assert square.getpixel((20, 10)) == (255, 0, 0) and square.getpixel((20, 30)) == (127, 127, 127)
    assert pad_to_square(square, [0.5] * 3).size == (40, 40)


def test_vision_batches_carry_preps_rows_and_their_pictures(tiny_llava: tuple, tmp_path: Path) -> None:
    """Prep's shards hold each row's image paths; the collator pads prep's ids and labels as they are and
    turns the pictures (padded to a square) into the tower's pixel values, which the model takes."""
    llava, tokenizer, image_id, _ = tiny_llava
    data = ROOT / "data" / "tiny-vision"
    rows = json.loads((data / "instruct.json").read_text(encoding="utf-8"))[:3]
    rows.append(
        {
            "id": "text",
            "conversations": [
                {"from": "human", "value": "Name a shape."},
                {"from": "gpt", "value": "A circle."},
            ],
        }
    )
    (tmp_path / "instruct.json").write_text(json.dumps(rows), encoding="utf-8")
    source = {
        "name": "instruct",
        "kind": "llava",
        "path": str(tmp_path / "instruct.json"),
        "image_root": str(data / "images"),
    }
    vision = {"tower_config": str(TINY_SIGLIP), "tower_init": "random", "projector_pretrain": {}}
    prepared_tokenizer = {
        "name_or_path": str(ROOT / "hermes_pipeline/assets/tiny_tokenizer"),
        "template": "vicuna_v1",
    }
    out, _ = prep(write_recipe(tmp_path / "run", [source], vision=vision, tokenizer=prepared_tokenizer))
    shards = sorted((out / "sft").glob("*.parquet"))
    prepared = [row for shard in shards for row in pq.read_table(shard).to_pylist()]
    assert len(prepared) == 4 and sum(bool(row["images"]) for row in prepared) == 3

    wide = tmp_path / "wide.png"  # the bundled pictures are square; one that is not shows the padding
    Image.open(prepared[0]["images"][0]).crop((0, 0, 64, 40)).save(wide)
    prepared[0]["images"] = [str(wide)]
    config = llava.config.vision_config
    processor = image_processor(_section(), config)
    batch = VisionBatches(tokenizer.pad_token_id, processor, pad_square=True)(prepared)
    longest = max(len(row["input_ids"]) for row in prepared)
    for index, row in enumerate(prepared):
        length = len(row["input_ids"])
        assert batch["input_ids"][index, :length].tolist() == row["input_ids"]
        assert batch["labels"][index].tolist() == row["labels"] + [-100] * (longest - length)
        assert batch["attention_mask"][index].sum() == length
    pictures = [Image.open(path).convert("RGB") for row in prepared for path in row["images"]]
    expected = processor([pad_to_square(p, processor.image_mean) for p in pictures], return_tensors="pt")
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"], rtol=0, atol=0)
    assert (batch["input_ids"] == image_id).sum() == 16 * len(pictures)
    loss = llava(**batch).loss
    assert torch.isfinite(loss)
