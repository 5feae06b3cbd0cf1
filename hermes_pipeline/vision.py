"""A LLaVA model assembled from a separate vision tower and language model (Hermes 2 Vision: a SigLIP tower
on OpenHermes-2.5-Mistral-7B), as transformers' own ``LlavaForConditionalGeneration``.

Why transformers' class rather than LLaVA's code: it is what users load and serve (AutoProcessor, vLLM,
llama.cpp's converters read its layout), and it takes any vision and text sub-configs. The recipe's
``vision`` section maps onto its config: ``select_layer`` is ``vision_feature_layer``; SigLIP has no CLS
token, so every patch becomes an image token (``vision_feature_select_strategy: full``); ``mlp2x_gelu`` is
its two-layer projector with GELU. The tower is frozen in every stage.

Assembly moves the given modules into the LLaVA model (nothing is copied, so a 7B language model is never
held twice); only the projector is new, initialized from the recipe's seed.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    SiglipImageProcessorPil,
)
from transformers.image_processing_utils import BaseImageProcessor
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from hermes_pipeline.chat_format.templates import VICUNA_TEMPLATE, template_source
from hermes_pipeline.chat_format.tokens import IMAGE_TOKEN
from hermes_pipeline.errors import UserError
from hermes_pipeline.model_info import config_from_file
from hermes_pipeline.models import load_model
from hermes_pipeline.recipe.schema import Recipe, VisionSection

# LLaVA-1.5's projector, the one transformers' LLaVA class builds.
PROJECTOR_ACT = {"mlp2x_gelu": "gelu"}


def tower_config(vision: VisionSection) -> PretrainedConfig:
    """The tower's vision config: ``vision.tower_config`` if given, else the checkpoint's (the vision half
    of a whole SigLIP or CLIP config). SigLIP's pooling head is dropped: LLaVA reads hidden states only."""
    try:
        if vision.tower_config:
            config = config_from_file(vision.tower_config)
        else:
            config = AutoConfig.from_pretrained(vision.tower)
    except (OSError, ValueError, KeyError) as exc:
        source = vision.tower_config or vision.tower
        raise UserError(
            f"cannot read the vision tower's config {source} ({str(exc).splitlines()[0]}); "
            "set vision.tower_config to a local config.json"
        ) from None
    config = getattr(config, "vision_config", config)
    if hasattr(config, "vision_use_head"):
        config.vision_use_head = False
    return config


def image_token_count(config: PretrainedConfig) -> int:
    """Image tokens one image takes in the language model's sequence: one per patch (strategy full)."""
    return (config.image_size // config.patch_size) ** 2


def vision_parameters(vision: VisionSection, text_hidden_size: int) -> tuple[int, int]:
    """The tower's and the projector's parameter counts, from configs alone (the tower built on the meta
    device): what ``plan`` adds to a Vision stage's memory."""
    config = tower_config(vision)
    with torch.device("meta"):
        tower = AutoModel.from_config(config)
    projector = (config.hidden_size + 1) * text_hidden_size + (text_hidden_size + 1) * text_hidden_size
    return sum(p.numel() for p in tower.parameters()), projector


def load_tower(vision: VisionSection, dtype: torch.dtype, seed: int) -> PreTrainedModel:
    """The frozen vision tower: built from its config (seeded) or loaded from the checkpoint's vision half."""
    config = tower_config(vision)
    if vision.tower_init == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tower = AutoModel.from_config(config, dtype=dtype)
    else:
        tower = AutoModel.from_pretrained(vision.tower, config=config, dtype=dtype)
    return tower.requires_grad_(False)


def llava_config(
    text: PretrainedConfig, tower: PretrainedConfig, vision: VisionSection, image_token_id: int
) -> LlavaConfig:
    if vision.projector not in PROJECTOR_ACT:
        raise UserError(
            f"vision.projector: {vision.projector} is not built; transformers' LLaVA class has the two-layer "
            "projector only (mlp2x_gelu)"
        )
    return LlavaConfig(
        vision_config=tower,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=image_token_count(tower),
        projector_hidden_act=PROJECTOR_ACT[vision.projector],
        vision_feature_layer=vision.select_layer,
        vision_feature_select_strategy="full",
        tie_word_embeddings=text.tie_word_embeddings,
    )


def assemble(
    language_model: PreTrainedModel,
    tower: PreTrainedModel,
    vision: VisionSection,
    image_token_id: int,
    seed: int,
) -> LlavaForConditionalGeneration:
    """The LLaVA model around ``language_model`` (a causal LM whose embeddings already hold the image token)
    and ``tower``, with a new projector."""
    config = llava_config(language_model.config, tower.config, vision, image_token_id)
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    llava.model.vision_tower = tower.requires_grad_(False)
    llava.model.language_model = language_model.get_decoder()
    llava.lm_head = language_model.get_output_embeddings()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = LlavaMultiModalProjector(config)
    llava.model.multi_modal_projector = projector.to(language_model.dtype)
    llava.generation_config = language_model.generation_config
    return llava


def start_llava(
    recipe: Recipe, tokenizer: PreTrainedTokenizerBase, source: str | None
) -> LlavaForConditionalGeneration:
    """Where a Vision recipe starts (the projector stage, and the eval's "base"): the language model loaded as
    every stage loads it (embeddings grown for the tokenizer, EOS ``</s>``), its frozen tower, a new projector."""
    assert recipe.vision is not None
    language_model = load_model(recipe, recipe.sft, tokenizer, source)
    tower = load_tower(recipe.vision, language_model.dtype, recipe.seed)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return assemble(language_model, tower, recipe.vision, image_id, recipe.seed)


def train_parts(llava: LlavaForConditionalGeneration, projector_only: bool) -> None:
    """LLaVA's trainable parts: the projector alone in stage 1, projector and LLM in stage 2; never the tower."""
    llava.requires_grad_(not projector_only)
    llava.model.vision_tower.requires_grad_(False)
    llava.model.multi_modal_projector.requires_grad_(True)


def image_processor(vision: VisionSection, config: PretrainedConfig) -> BaseImageProcessor:
    """The tower's image processor: the checkpoint's own, or for a tower built from config SigLIP's
    (resized to the tower's image size, mean and std 0.5)."""
    if vision.tower_init == "pretrained":
        return AutoImageProcessor.from_pretrained(vision.tower)
    return SiglipImageProcessorPil(size={"height": config.image_size, "width": config.image_size})


def build_processor(
    tokenizer: PreTrainedTokenizerBase, images: BaseImageProcessor, config: PretrainedConfig
) -> LlavaProcessor:
    """What AutoProcessor loads from the packaged model: the image processor, the tokenizer, and Vicuna v1
    as the chat template. It writes each ``<image>`` as one token per patch, as prep does."""
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        image_token=IMAGE_TOKEN,
        chat_template=template_source(VICUNA_TEMPLATE),
    )


def recipe_processor(vision: VisionSection, tokenizer: PreTrainedTokenizerBase) -> LlavaProcessor:
    """``build_processor`` for the recipe's tower: what prep's rows were made for, before a package exists."""
    config = tower_config(vision)
    return build_processor(tokenizer, image_processor(vision, config), config)


def read_picture(path: str | Path, mean: list[float], pad: bool) -> Image.Image:
    """A picture as the tower sees it in training and in the eval: RGB, and with ``pad``
    (``image_aspect_ratio: pad``) centred on a square of the processor's mean colour."""
    with Image.open(path) as image:
        picture = image.convert("RGB")
    return pad_to_square(picture, mean) if pad else picture


def pad_to_square(image: Image.Image, mean: list[float]) -> Image.Image:
    """LLaVA-1.5's ``image_aspect_ratio: pad``: the image centred on a square of the processor's mean colour,
    so that resizing to the tower's square input keeps its proportions."""
    image = image.convert("RGB")
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new("RGB", (side, side), tuple(int(channel * 255) for channel in mean))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def png_base64(picture: Image.Image) -> str:
    """A picture as clients send it to llama-server: PNG bytes, base64 (lossless, so both engines see the
    same pixels)."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
