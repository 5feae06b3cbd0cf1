"""Merge LoRA adapters into their base, one tensor at a time, and prove the result equals the PEFT model.

peft's ``merge_and_unload`` needs the whole model in memory; here each base tensor is read, changed by
every adapter in the chain (LoRA ``W + s·BA``, trained token rows, replaced modules) and written to a shard,
so the peak stays near one shard plus the adapters. The math is peft's; the verification runs peft itself.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from hermes_pipeline.chat_format.tokens import padded_rows
from hermes_pipeline.errors import UserError
from hermes_pipeline.merge.probes import max_difference, probe_ids, probe_logits
from hermes_pipeline.merge.shards import iter_tensors, model_bytes, tensor_names, write_shards
from hermes_pipeline.models import ADAPTER_BASE, ADAPTER_CONFIG, is_adapter
from hermes_pipeline.recipe.schema import Recipe

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Merged logits must equal the PEFT model's this closely, by the base's dtype.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-1, torch.float16: 5e-2}
DELTA_ROWS = 1024


@dataclass
class Adapter:
    """One saved peft LoRA adapter, held whole (adapters are small), keyed by the base tensor it changes."""

    folder: Path
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)  # A, B, scale
    token_rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # ids, rows
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)

    def apply(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name in self.replaced:
            weight = self.replaced[name].to(weight.dtype)
        if name in self.lora:
            weight = _add_delta(weight, *self.lora[name])
        if name in self.token_rows:
            ids, rows = self.token_rows[name]
            weight = weight.index_copy(0, ids, rows.to(weight.dtype))
        return weight

    def rows(self, name: str) -> int | None:
        """How many rows this adapter expects ``name`` to have, when it replaces it outright."""
        return self.replaced[name].shape[0] if name in self.replaced else None


def _add_delta(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + scale·BA`` in fp32, a block of rows at a time: a full-size fp32 copy of a large matrix would
    cost more memory than the shard being written."""
    merged = torch.empty_like(weight)
    a = a.float()
    for start in range(0, weight.shape[0], DELTA_ROWS):
        rows = slice(start, start + DELTA_ROWS)
        merged[rows] = (weight[rows].float() + (b[rows].float() @ a) * scale).to(weight.dtype)
    return merged


def load_adapter(folder: Path) -> Adapter:
    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    _check_supported(folder, config)
    weights = load_file(folder / ADAPTER_WEIGHTS)
    adapter = Adapter(folder)
    for key, tensor in weights.items():
        module = key.removeprefix(PEFT_PREFIX)
        if ".lora_A." in module or ".lora_embedding_A" in module:
            path = re.sub(r"\.lora_(embedding_)?A(\.weight)?$", "", module)
            b_key = key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
            rank = tensor.shape[0]
            a, b = tensor, weights[b_key]
            if ".lora_embedding_A" in module:  # stored as (r, vocab) and (dim, r); delta is (vocab, dim)
                a, b = weights[b_key].T, tensor.T
            adapter.lora[f"{path}.weight"] = (a, b, _scale(config, path, rank))
        elif module.endswith(".token_adapter.trainable_tokens_delta"):
            path = module.removesuffix(".token_adapter.trainable_tokens_delta")
            adapter.token_rows[f"{path}.weight"] = (torch.tensor(_token_ids(config, path)), tensor)
        elif (
            ".lora_B." not in module
            and ".lora_embedding_B" not in module
            and ".original_module." not in module
        ):
            adapter.replaced[_saved_module_name(module)] = tensor
    return adapter


def _saved_module_name(key: str) -> str:
    """The base tensor a whole saved module replaces: peft stores trained copies (``modules_to_save``) and,
    when the vocabulary was resized, the resized embedding under wrapper names."""
    for wrapper in (
        ".modules_to_save.default.",
        ".modules_to_save.",
        ".token_adapter.base_layer.",
        ".base_layer.",
    ):
        key = key.replace(wrapper, ".")
    return key


def _check_supported(folder: Path, config: dict) -> None:
    if config.get("peft_type") != "LORA":
        raise UserError(f"{folder}: a {config.get('peft_type')} adapter; only LoRA adapters can be merged")
    for key in ("use_dora", "lora_bias", "fan_in_fan_out"):
        if config.get(key):
            raise UserError(f"{folder}: adapters with {key} are not merged here; use peft's merge_and_unload")


def _scale(config: dict, module: str, rank: int) -> float:
    from peft.utils.other import get_pattern_key

    alpha = config["lora_alpha"]
    if config.get("alpha_pattern"):
        key = get_pattern_key(config["alpha_pattern"].keys(), module)
        alpha = config["alpha_pattern"].get(key, alpha)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _token_ids(config: dict, module: str) -> list[int]:
    indices = config["trainable_token_indices"]
    if isinstance(indices, list):
        return indices
    for suffix, ids in indices.items():
        if module == suffix or module.endswith(f".{suffix}"):
            return ids
    raise UserError(f"adapter trains token rows of {module} but its config lists no indices for it")


def adapter_chain(adapter: Path, base: str | None = None) -> tuple[str, list[Path]]:
    """The base model and the adapters to apply to it, oldest first.

    An adapter trained on top of another stage's adapter (DPO-LoRA after SFT-LoRA) records that in
    ``adapter_base.json``; the chain follows it down to a plain model.
    """
    chain = [adapter]
    source = base if base is not None else _recorded_base(adapter)
    while source is not None and is_adapter(Path(source)):
        chain.insert(0, Path(source))
        source = _recorded_base(Path(source))
    if source is None:
        raise UserError(f"{adapter}: the adapter does not say which model it was trained on; pass --base")
    return source, chain


def _recorded_base(adapter: Path) -> str | None:
    record = adapter / ADAPTER_BASE
    if record.is_file():
        return json.loads(record.read_text(encoding="utf-8"))["base"]
    return json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")


def local_model_dir(ref: str) -> Path:
    """A local folder for a model reference (a folder, or a Hub id resolved through the local cache)."""
    if Path(ref).is_dir():
        return Path(ref)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as exc:
        raise UserError(f"cannot find model {ref!r} locally or on the Hub ({type(exc).__name__})") from None


def _meta_model(config_dir: Path) -> PreTrainedModel:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))


def embedding_names(config_dir: Path) -> tuple[str, str | None]:
    """Names of the input-embedding and LM-head weights, read off the architecture (not guessed)."""
    model = _meta_model(config_dir)
    names = {id(module): name for name, module in model.named_modules()}
    head = model.get_output_embeddings()
    tied = getattr(model.config, "tie_word_embeddings", False)
    input_name = f"{names[id(model.get_input_embeddings())]}.weight"
    return input_name, None if head is None or tied else f"{names[id(head)]}.weight"


def quantized_names(config_dir: Path) -> set[str]:
    """The weights a QLoRA base holds in 4 bits: every linear layer but the LM head (transformers' rule)."""
    model = _meta_model(config_dir)
    head = model.get_output_embeddings()
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }


def four_bit_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a QLoRA run computed with it: NF4 with double quantisation, dequantised again."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    packed, state = quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    return dequantize_4bit(packed, state).to(weight.dtype)


def target_rows(
    tokenizer_size: int, base_rows: int, adapters: list[Adapter], head: str | None, multiple: int
) -> int:
    """The embedding rows the adapters were trained with: the LM head an adapter saved whole says it
    exactly; otherwise the training stage's rule (grow to the tokenizer, rounded up to ``multiple``)."""
    for adapter in reversed(adapters):
        rows = adapter.rows(head) if head else None
        if rows is not None:
            return rows
    if tokenizer_size <= base_rows:
        return base_rows
    return padded_rows(tokenizer_size, multiple)


def merged_tensors(
    base_dir: Path, adapters: list[Adapter], rows: int, grown: tuple[str, ...], dequantized: set[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Base tensors with every adapter applied in order; embedding matrices first grow to ``rows`` with
    new rows set to the mean of the old ones, as the training stage grew them, and the ``dequantized``
    weights first go through the 4-bit round trip their QLoRA adapter was trained against."""
    for name, tensor in iter_tensors(base_dir):
        if name in dequantized:
            tensor = four_bit_roundtrip(tensor)
        if name in grown and tensor.shape[0] < rows:
            mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
            tensor = torch.cat([tensor, mean.expand(rows - tensor.shape[0], -1)])
        for adapter in adapters:
            tensor = adapter.apply(name, tensor)
        yield name, tensor


def unused_keys(base_dir: Path, adapters: list[Adapter]) -> list[str]:
    """Adapter tensors that match no base tensor: merging would silently drop them."""
    names = set(tensor_names(base_dir))
    return [
        f"{a.folder.name}:{name}"
        for a in adapters
        for name in (*a.lora, *a.token_rows, *a.replaced)
        if name not in names
    ]


def merge_adapters(
    base: str,
    chain: list[Path],
    out_dir: Path,
    max_shard_bytes: int,
    pad_to_multiple_of: int = 64,
    dequantize: bool = False,
) -> None:
    """Write base + adapters as safetensors shards and a config into ``out_dir`` (weights only).

    ``dequantize``: merge into the dequantised 4-bit base a QLoRA adapter was trained against, rather than
    the original 16-bit weights (which the adapter never saw, but which lose nothing to quantisation)."""
    base_dir = local_model_dir(base)
    adapters = [load_adapter(folder) for folder in chain]
    missing = unused_keys(base_dir, adapters)
    if missing:
        raise UserError(f"adapter tensors match nothing in {base}: {', '.join(missing[:3])}; wrong --base?")
    embed, head = embedding_names(base_dir)
    config = AutoConfig.from_pretrained(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(chain[-1])
    rows = target_rows(len(tokenizer), config.vocab_size, adapters, head, pad_to_multiple_of)
    grown = (embed,) if head is None else (embed, head)
    four_bit = quantized_names(base_dir) if dequantize else set()
    write_shards(merged_tensors(base_dir, adapters, rows, grown, four_bit), out_dir, max_shard_bytes)
    config.vocab_size = rows
    config.save_pretrained(out_dir)


def peft_model(
    base: str, chain: list[Path], pad_to_multiple_of: int = 64, dequantize: bool = False
) -> PreTrainedModel:
    """The reference: what training had in memory, built by peft itself from the same files."""
    from peft import PeftModel

    from hermes_pipeline.models import fit_embeddings

    model = AutoModelForCausalLM.from_pretrained(local_model_dir(base), dtype="auto")
    if dequantize:
        state = model.state_dict()
        with torch.no_grad():
            for name in quantized_names(local_model_dir(base)):
                state[name].copy_(four_bit_roundtrip(state[name]))
    fit_embeddings(model, AutoTokenizer.from_pretrained(chain[-1]), pad_to_multiple_of)
    for folder in chain[:-1]:
        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    return PeftModel.from_pretrained(model, str(chain[-1]))


def verify_merge(
    base: str, chain: list[Path], merged_dir: Path, pad_to_multiple_of: int = 64, dequantize: bool = False
) -> float:
    """Logits of the merged model against the PEFT model on the probe prompts; also checks that trained
    token rows arrived exactly. Returns the largest logit difference; raises when out of tolerance."""
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    prompts = probe_ids(tokenizer)
    reference = peft_model(base, chain, pad_to_multiple_of, dequantize)
    expected = probe_logits(reference, prompts)
    del reference
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype="auto")
    difference = max_difference(expected, probe_logits(merged, prompts))
    tolerance = TOLERANCE.get(merged.dtype, 1e-1)
    if not difference <= tolerance:
        raise UserError(
            f"{merged_dir}: merged logits differ from the PEFT model's by {difference:.3g} "
            f"(tolerance {tolerance}); the merge is wrong, do not ship it"
        )
    state = merged.state_dict()
    for name, (ids, rows) in load_adapter(chain[-1]).token_rows.items():
        if not torch.equal(state[name][ids], rows.to(state[name].dtype)):
            raise UserError(f"{merged_dir}: trained rows of {name} were lost in the merge")
    return difference


def merged_size(base: str) -> int:
    return model_bytes(local_model_dir(base))


def write_merged_model(
    base: str,
    chain: list[Path],
    out_dir: Path,
    max_shard_bytes: int,
    pad_to_multiple_of: int = 64,
    dequantize: bool = False,
) -> float:
    """A complete merged model folder (weights, config, tokenizer, generation config), verified before it
    is renamed into place. Returns the largest logit difference from the PEFT model."""
    from hermes_pipeline.chat_format.tokens import save_tokenizer
    from hermes_pipeline.disk import check_free_space
    from hermes_pipeline.rundir import staged_output

    check_free_space(out_dir.parent, int(1.1 * merged_size(base)))
    with staged_output(out_dir) as partial:
        merge_adapters(base, chain, partial, max_shard_bytes, pad_to_multiple_of, dequantize)
        save_tokenizer(AutoTokenizer.from_pretrained(chain[-1]), partial)
        if (chain[-1] / "generation_config.json").is_file():
            shutil.copyfile(chain[-1] / "generation_config.json", partial / "generation_config.json")
        difference = verify_merge(base, chain, partial, pad_to_multiple_of, dequantize)
    print(f"merge lora: {out_dir} (logits within {difference:.2g} of the PEFT model)")
    return difference


def run_merge_lora(recipe: Recipe) -> Path:
    """The recipe form: the last training stage's adapter, merged into runs/<name>/<stage>/merged."""
    from hermes_pipeline.merge.shards import parse_size
    from hermes_pipeline.models import MODEL_SUBDIR
    from hermes_pipeline.recipe.checks import training_stages
    from hermes_pipeline.rundir import stage_dir

    stages = list(training_stages(recipe))
    adapter = stage_dir(recipe, stages[-1]) / MODEL_SUBDIR if stages else None
    if adapter is None or not is_adapter(adapter):
        raise UserError("merge lora: the recipe's last training stage did not save a LoRA adapter")
    base, chain = adapter_chain(adapter)
    out = adapter.parent / "merged"
    write_merged_model(
        base,
        chain,
        out,
        parse_size(recipe.package.max_shard_size),
        recipe.tokenizer.pad_embeddings_to_multiple_of,
        dequantize_base(recipe),
    )
    return out


def dequantize_base(recipe: Recipe) -> bool:
    """Whether the recipe's adapters merge into the dequantised 4-bit base: only QLoRA stages have one."""
    from hermes_pipeline.recipe.checks import training_stages

    qlora = any(stage.mode == "qlora" for stage in training_stages(recipe).values())
    return qlora and recipe.merge.lora_base == "dequantized"
