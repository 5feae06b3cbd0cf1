"""``hermes-pipeline package``: the model users download, in runs/<name>/final/.

The last stage's output (a full model, or an adapter merged into its base here) is written as safetensors
shards with an index, with EOS = ``<|im_end|>`` in config, generation_config and tokenizer, both named chat
templates, a model card, and a manifest with every file's hash. Before it is renamed into place it is
reloaded and checked against the model it came from.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerBase,
)

from hermes_pipeline.chat_format.templates import TEMPLATE_NAMES, hermes_templates
from hermes_pipeline.chat_format.tokens import IM_END, VICUNA_EOS, save_tokenizer
from hermes_pipeline.disk import check_free_space
from hermes_pipeline.errors import UserError
from hermes_pipeline.merge.card import PUBLISHED
from hermes_pipeline.merge.lora import (
    adapter_chain,
    dequantize_base,
    merge_adapters,
    merged_size,
    verify_merge,
)
from hermes_pipeline.merge.probes import max_difference, probe_ids, probe_logits
from hermes_pipeline.merge.shards import iter_tensors, model_bytes, parse_size, write_shards
from hermes_pipeline.models import MODEL_SUBDIR, is_adapter
from hermes_pipeline.recipe.checks import training_stages
from hermes_pipeline.recipe.schema import PackageSection, Recipe
from hermes_pipeline.rundir import (
    MANIFEST,
    file_fingerprint,
    stage_dir,
)
from hermes_pipeline.stages import run_stage

FINAL = "final"


def final_source(recipe: Recipe) -> Path:
    """The output of the recipe's last model-producing stage."""
    stages = list(training_stages(recipe))
    if stages:
        return stage_dir(recipe, stages[-1]) / MODEL_SUBDIR
    if recipe.merge.models is not None:
        return stage_dir(recipe, "merge") / MODEL_SUBDIR
    raise UserError("nothing to package: the recipe enables no training stage and no merge.models")


def run_package(recipe: Recipe, force: bool = False, log: Callable[[str], None] = print) -> Path:
    source = final_source(recipe)
    upstream = source.parent / MANIFEST
    if not upstream.is_file():
        raise UserError(f"{source.parent} has not finished; run its stage first (hermes-pipeline run RECIPE)")
    out = stage_dir(recipe, FINAL)
    adapter = is_adapter(source)
    base, chain = adapter_chain(source) if adapter else (None, [])
    shard_bytes = parse_size(recipe.package.max_shard_size)

    def package(partial: Path) -> dict[str, Any]:
        check_free_space(out.parent, int(1.1 * (merged_size(base) if base else model_bytes(source))))
        if recipe.vision is not None:
            difference = _package_llava(recipe, source, partial, shard_bytes)
        else:
            difference = _package_text(recipe, source, partial, shard_bytes, base, chain, log)
        log(f"package: {out} (logits within {difference:.2g} of {source})")
        return {"source": str(source), "logits_max_abs_diff": difference}

    inputs = {"model": file_fingerprint(upstream)}
    run_stage(recipe, "package", out, inputs, package, force, log, skip=PUBLISHED)  # PUBLISHED: the card's
    return out


def _package_text(
    recipe: Recipe,
    source: Path,
    folder: Path,
    shard_bytes: int,
    base: str | None,
    chain: list[Path],
    log: Callable[[str], None],
) -> float:
    """A text model (adapters merged into their base first), with EOS <|im_end|> and both templates."""
    multiple = recipe.tokenizer.pad_embeddings_to_multiple_of
    if base is not None:
        log(f"package: merging {len(chain)} adapter(s) into {base}, shard by shard")
        merge_adapters(base, chain, folder, shard_bytes, multiple, dequantize_base(recipe))
    else:
        write_shards(iter_tensors(source), folder, shard_bytes)
        shutil.copyfile(source / "config.json", folder / "config.json")
    tokenizer = AutoTokenizer.from_pretrained(source)
    save_tokenizer(tokenizer, folder)
    write_generation_settings(folder, tokenizer, recipe.package)
    if base is not None:
        difference = verify_merge(base, chain, folder, multiple, dequantize_base(recipe))
    else:
        difference = verify_same_model(source, folder)
    check_packaged(folder)
    return difference


def _package_llava(recipe: Recipe, source: Path, folder: Path, shard_bytes: int) -> float:
    """A Vision model: the LLaVA folder with its processor, checked as AutoProcessor users load it."""
    from transformers import AutoProcessor

    from hermes_pipeline.merge.llava import check_llava, verify_same_llava, write_llava

    write_llava(recipe, source, folder, shard_bytes)
    write_generation_settings(folder, AutoTokenizer.from_pretrained(folder), recipe.package)
    processor = AutoProcessor.from_pretrained(folder)  # as users load it
    difference = verify_same_llava(source, folder, processor)
    check_stops(folder, VICUNA_EOS)
    check_llava(folder, processor)
    return difference


def write_generation_settings(
    folder: Path, tokenizer: PreTrainedTokenizerBase, package: PackageSection
) -> None:
    """EOS, pad and BOS in config.json and a generation_config.json with the recipe's sampling defaults."""
    config = AutoConfig.from_pretrained(folder)
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if tokenizer.bos_token_id is not None:
        ids["bos_token_id"] = tokenizer.bos_token_id
    for key, value in ids.items():
        setattr(config, key, value)
    config.save_pretrained(folder)
    GenerationConfig(
        **ids,
        do_sample=True,
        temperature=package.temperature,
        top_p=package.top_p,
        repetition_penalty=package.repetition_penalty,
    ).save_pretrained(folder)


def verify_same_model(source: Path, packaged: Path) -> float:
    """Re-sharding must not change a single logit."""
    prompts = probe_ids(AutoTokenizer.from_pretrained(packaged))
    expected = probe_logits(AutoModelForCausalLM.from_pretrained(source, dtype="auto"), prompts)
    actual = probe_logits(AutoModelForCausalLM.from_pretrained(packaged, dtype="auto"), prompts)
    difference = max_difference(expected, actual)
    if difference != 0.0:
        raise UserError(f"{packaged}: packaged logits differ from {source} by {difference:.3g}; not shipped")
    return difference


def check_packaged(folder: Path) -> None:
    """What a downloader's generation depends on: every EOS is <|im_end|>, and both templates are there."""
    tokenizer = check_stops(folder, IM_END)
    templates = tokenizer.chat_template if isinstance(tokenizer.chat_template, dict) else {}
    expected = hermes_templates()
    for name in TEMPLATE_NAMES:
        if templates.get(name) != expected[name]:
            raise UserError(
                f"{folder}: the tokenizer's {name!r} chat template is missing or not the Hermes one"
            )


def check_stops(folder: Path, eos: str) -> PreTrainedTokenizerBase:
    """Every place generation reads its stop from (tokenizer, config, generation config) says ``eos``;
    returns the packaged tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    end = tokenizer.convert_tokens_to_ids(eos)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    generation = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    places = {
        "tokenizer eos_token": tokenizer.eos_token_id,
        "config.json eos_token_id": config.get("eos_token_id"),
        "generation_config.json eos_token_id": generation.get("eos_token_id"),
    }
    for place, value in places.items():
        if value != end and value != [end]:
            raise UserError(f"{folder}: {place} is {value}, not {eos} ({end}); generation would not stop")
    return tokenizer
