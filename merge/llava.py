"""Packaging a Hermes 2 Vision model: a transformers LLaVA folder with its processor, as users load it.

``AutoProcessor`` loads the image processor and the tokenizer (Vicuna v1 as its chat template, ``<image>``
one special token, EOS ``</s>``) and writes each ``<image>`` as one token per patch, the expansion prep
trained with; ``LlavaForConditionalGeneration`` loads the weights. Before the folder is renamed into place
the packaged pair answers a probe picture with exactly the logits of the stage's model, and every place
generation reads its stop from says ``</s>`` (``package.check_stops``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    ProcessorMixin,
)
from transformers.utils import CHAT_TEMPLATE_FILE

from hermes_pipeline.chat_format.templates import VICUNA_TEMPLATE, template_source
from hermes_pipeline.chat_format.tokens import IMAGE_TOKEN, save_tokenizer
from hermes_pipeline.errors import UserError
from hermes_pipeline.merge.shards import iter_tensors, write_shards
from hermes_pipeline.recipe.schema import Recipe
from hermes_pipeline.vision import recipe_processor

PROBE_QUESTION = f"{IMAGE_TOKEN}\nWhat is in the picture?"


def write_llava(recipe: Recipe, source: Path, folder: Path, shard_bytes: int) -> None:
    """The stage's LLaVA model re-sharded into ``folder``, with its processor and tokenizer."""
    assert recipe.vision is not None
    write_shards(iter_tensors(source), folder, shard_bytes)
    shutil.copyfile(source / "config.json", folder / "config.json")
    tokenizer = AutoTokenizer.from_pretrained(source)
    processor = recipe_processor(recipe.vision, tokenizer)
    processor.save_pretrained(folder)
    # Over the processor's copy: ours keeps the SentencePiece model and the added tokens llama.cpp reads. It
    # also removes template files (a text model's named templates live in tokenizer_config.json), so the
    # processor's template, which `processor.apply_chat_template` reads, is written back.
    save_tokenizer(tokenizer, folder)
    (folder / CHAT_TEMPLATE_FILE).write_text(processor.chat_template, encoding="utf-8")


def probe_picture(processor: ProcessorMixin) -> Image.Image:
    """A fixed picture (a colour gradient) at the tower's input size, so no engine resamples it."""
    size = processor.image_processor.size
    side = size.get("height") or size.get("shortest_edge") or 224
    gradient = Image.linear_gradient("L").resize((side, side))
    return Image.merge("RGB", (gradient, gradient.rotate(90), gradient.rotate(180)))


def probe_prompt(processor: ProcessorMixin) -> str:
    """The probe question in the packaged template, BOS written as text and ``<image>`` where it goes."""
    return processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROBE_QUESTION}], tokenize=False, add_generation_prompt=True
    )


def probe_inputs(processor: ProcessorMixin) -> dict[str, torch.Tensor]:
    """The probe picture and question made into ids and pixels by ``processor``."""
    return processor(
        images=[probe_picture(processor)],
        text=[probe_prompt(processor)],
        add_special_tokens=False,
        return_tensors="pt",
    )


@torch.no_grad()
def verify_same_llava(source: Path, packaged: Path, processor: ProcessorMixin) -> float:
    """The packaged model, read through the packaged ``processor``, must give the stage's model's logits
    exactly on the probe picture: re-sharding changes no weight, and the processor fills every image token."""
    inputs = probe_inputs(processor)
    expected = LlavaForConditionalGeneration.from_pretrained(source, dtype="auto").eval()(**inputs).logits
    actual = LlavaForConditionalGeneration.from_pretrained(packaged, dtype="auto").eval()(**inputs).logits
    difference = float((expected.float() - actual.float()).abs().max())
    if difference != 0.0:
        raise UserError(f"{packaged}: packaged logits differ from {source} by {difference:.3g}; not shipped")
    return difference


def check_llava(folder: Path, processor: ProcessorMixin) -> None:
    """What a Vision model's users depend on beyond its stop token: Vicuna v1 as the packaged ``processor``'s
    chat template, and the processor writing an image as the tokens the model's config expects."""
    tokenizer = processor.tokenizer
    vicuna = template_source(VICUNA_TEMPLATE)
    if tokenizer.chat_template != vicuna or processor.chat_template != vicuna:
        raise UserError(f"{folder}: the processor's or the tokenizer's chat template is not Vicuna v1")
    config = AutoConfig.from_pretrained(folder)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    written = probe_inputs(processor)["input_ids"][0].tolist().count(image_id)
    if written != config.image_seq_length or image_id != config.image_token_id:
        raise UserError(
            f"{folder}: the processor writes {written} image tokens (id {image_id}); the model expects "
            f"{config.image_seq_length} (id {config.image_token_id})"
        )
