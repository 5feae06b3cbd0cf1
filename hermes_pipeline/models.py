"""Loading the models stages share: a stage's saved output, the recipe's base model, and the rules every
model here follows (embeddings grown for the Hermes tokens, EOS ``<|im_end|>``, pad never EOS).

Training loads its starting point with these, and merge and the evals load what a stage saved the same
way, so a model is never loaded two different ways.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from hermes_pipeline.chat_format.tokens import IM_END, VICUNA_EOS, padded_rows
from hermes_pipeline.errors import UserError
from hermes_pipeline.model_info import load_model_config
from hermes_pipeline.recipe.schema import Recipe, TrainStage

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_BASE = "adapter_base.json"
# Where each stage leaves the model the next one starts from.
MODEL_SUBDIR = "model"


def load_model(
    recipe: Recipe, stage: TrainStage, tokenizer: PreTrainedTokenizerBase, source: str | None
) -> PreTrainedModel:
    """Load (or build) the starting weights, grow the embeddings for the tokenizer, and set EOS and pad.

    A LoRA stage's output as the starting point is merged into its base first, so the next stage trains
    the merged weights.
    """
    if source is None:
        config = load_model_config(recipe.model)
        config._attn_implementation = recipe.model.attn_implementation
        with whole_weights(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[recipe.model.dtype])
    elif is_adapter(Path(source)):
        model = load_trained(recipe, stage, Path(source), tokenizer).merge_and_unload()
    else:
        # ZeRO-3's partitioned loading (zero.Init) leaves NaN weights with DeepSpeed's CPU accelerator, so
        # CPU runs load whole weights and let DeepSpeed partition them; GPU runs load straight into partitions.
        with whole_weights() if not torch.cuda.is_available() else nullcontext():
            model = _from_pretrained(source, _load_kwargs(recipe, stage, source))
    fit_embeddings(model, tokenizer, recipe.tokenizer.pad_embeddings_to_multiple_of)
    set_stop_tokens(model, tokenizer, stop_token(recipe))
    return model


def load_trained(
    recipe: Recipe, stage: TrainStage, folder: Path, tokenizer: PreTrainedTokenizerBase
) -> PreTrainedModel:
    """A training stage's saved output as it was in memory: a full model, or its base with the adapter.

    An adapter's base is what its stage started from (recorded in ``adapter_base.json``), which may itself
    be an earlier stage's adapter merged into its own base: DPO-LoRA after SFT-LoRA trains on
    base + SFT adapter, not on the base that peft's adapter_config names.
    """
    if not is_adapter(folder):
        return _from_pretrained(str(folder), _load_kwargs(recipe, stage, str(folder)))
    from peft import PeftModel

    record = folder / ADAPTER_BASE
    if record.is_file():
        base_source = json.loads(record.read_text(encoding="utf-8"))["base"]
    else:
        base_source = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))[
            "base_model_name_or_path"
        ]
    base = load_model(recipe, stage, tokenizer, base_source)
    return PeftModel.from_pretrained(base, str(folder))


def is_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


def _load_kwargs(recipe: Recipe, stage: TrainStage, source: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[recipe.model.dtype],
        "attn_implementation": recipe.model.attn_implementation,
        "trust_remote_code": recipe.model.trust_remote_code,
        "revision": recipe.model.revision if source == recipe.model.name_or_path else None,
    }
    if stage.mode == "qlora":
        kwargs["quantization_config"] = _four_bit(stage)
    return kwargs


def is_llava(folder: str | Path) -> bool:
    """Whether a local model folder holds a LLaVA model (a Vision stage's output) rather than a causal LM."""
    config = Path(folder) / "config.json"
    return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("model_type") == "llava"


def _from_pretrained(source: str, kwargs: dict[str, Any]) -> PreTrainedModel:
    model_class = AutoModelForImageTextToText if is_llava(source) else AutoModelForCausalLM
    try:
        return model_class.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise UserError(f"model {source}: cannot load ({str(exc).splitlines()[0]})") from None


def _four_bit(stage: TrainStage) -> Any:
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("mode qlora needs bitsandbytes: pip install 'hermes-pipeline[qlora]'") from None

    compute = torch.bfloat16 if stage.precision == "bf16" else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,
    )


def fit_embeddings(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int
) -> int:
    """Grow the embeddings to hold every token, rounded up to a multiple; returns how many rows were added.

    New rows (input and output) start at the mean of the existing ones rather than transformers' random
    draw around it: every new token then starts as an "average" token, the least surprising choice, and
    the result does not depend on the random state.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return 0
    target_rows = padded_rows(len(tokenizer), pad_to_multiple_of)
    model.resize_token_embeddings(target_rows, mean_resizing=False)
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    for layer in {id(layer): layer for layer in layers if layer is not None}.values():
        with _gathered(layer.weight), torch.no_grad():
            layer.weight[rows:] = layer.weight[:rows].mean(dim=0, keepdim=True)
    return target_rows - rows


@contextmanager
def whole_weights() -> Iterator[None]:
    """Build or load a model whole on this rank even while a ZeRO-3 run is configured.

    Under ZeRO-3 transformers creates empty partitions and leaves a model built from config uninitialised
    (weights from a checkpoint are loaded into the partitions, but there is none here); and a model loaded
    by one rank alone must not join the other ranks' collectives. DeepSpeed partitions a whole model when
    the Trainer starts it, so a random init (small by nature) and the saved-model check use this.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    active = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = active


def _gathered(weight: torch.nn.Parameter) -> Any:
    if not is_deepspeed_zero3_enabled():
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([weight], modifier_rank=0)


def stop_token(recipe: Recipe) -> str:
    """Where the recipe's answers end: ``<|im_end|>`` in ChatML, ``</s>`` in Vicuna v1 (Hermes 2 Vision)."""
    return VICUNA_EOS if recipe.tokenizer.template == "vicuna_v1" else IM_END


def set_stop_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, eos: str = IM_END) -> None:
    """EOS is ``eos`` everywhere a generator looks, and pad is the tokenizer's (never EOS)."""
    if tokenizer.eos_token != eos:
        hint = "set tokenizer.add_chat_tokens" if eos == IM_END else "set tokenizer.template: vicuna_v1"
        raise UserError(f"tokenizer EOS is {tokenizer.eos_token!r}, not {eos}; {hint}")
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        if tokenizer.bos_token_id is not None:
            config.bos_token_id = tokenizer.bos_token_id


def gguf_bos_text(llm: Any) -> str:
    """BOS as text for a llama.cpp model: llama.cpp adds it to every prompt itself, so a template's own BOS
    must come off before a rendered prompt goes in."""
    return llm.detokenize([llm.token_bos()], special=True).decode()
