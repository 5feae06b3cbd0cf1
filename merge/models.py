"""``hermes-pipeline merge models``: the recipe's merge.models section, run by mergekit's own library.

Hermes 2 Θ merges Hermes 2 Pro with Llama-3-Instruct. The Hermes side must win on what makes the model a
Hermes model: its tokenizer (the ChatML and tool tokens, both templates) and the embeddings of those tokens,
which on the other side are untrained reserved rows. The mergekit config says so explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from hermes_pipeline.chat_format.templates import install_templates
from hermes_pipeline.chat_format.tokens import CHAT_TOKENS, save_tokenizer
from hermes_pipeline.errors import UserError
from hermes_pipeline.merge.shards import parse_size
from hermes_pipeline.models import MODEL_SUBDIR
from hermes_pipeline.recipe.schema import ModelMerge, Recipe
from hermes_pipeline.rundir import stage_dir
from hermes_pipeline.stages import run_stage


def mergekit_config(spec: ModelMerge, pad_to_multiple_of: int) -> dict[str, Any]:
    """The mergekit YAML for a recipe merge, with the chat tokens' embeddings taken from the Hermes side."""
    config: dict[str, Any] = {
        "merge_method": spec.method,
        "models": [
            {"model": str(m.model), **({"parameters": m.parameters} if m.parameters else {})}
            for m in spec.models
        ],
        "dtype": spec.dtype,
    }
    if spec.base_model is not None:
        config["base_model"] = str(spec.base_model)
    if spec.parameters:
        config["parameters"] = spec.parameters
    hermes_side = str(spec.base_model) if spec.tokenizer_source == "base" else spec.tokenizer_source
    tokenizer: dict[str, Any] = {"source": spec.tokenizer_source, "pad_to_multiple_of": pad_to_multiple_of}
    if hermes_side not in ("union", "None"):
        tokenizer["tokens"] = {token: {"source": hermes_side, "force": True} for token in CHAT_TOKENS}
    config["tokenizer"] = tokenizer
    return config


def merge_models(
    spec: ModelMerge, out_dir: Path, pad_to_multiple_of: int, shard_size: str, seed: int
) -> None:
    """Run mergekit into ``out_dir`` and give the result the Hermes templates."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(mergekit_config(spec, pad_to_multiple_of))
    options = MergeOptions(
        copy_tokenizer=True,
        lazy_unpickle=True,
        out_shard_size=parse_size(shard_size),
        random_seed=seed,
        quiet=True,
    )
    run_merge(config, str(out_dir), options=options)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        raise UserError(
            f"the merged tokenizer lacks {', '.join(missing)}; set merge.models.tokenizer_source to the "
            "Hermes model (or base, when base_model is the Hermes model)"
        )
    install_templates(tokenizer)
    save_tokenizer(tokenizer, out_dir)


def run_model_merge(recipe: Recipe, force: bool = False, log: Callable[[str], None] = print) -> Path:
    spec = recipe.merge.models
    if spec is None:
        raise UserError("merge models: the recipe has no merge.models section")
    folder = stage_dir(recipe, "merge")

    def merge(partial: Path) -> dict[str, str]:
        log(f"merge: {spec.method} of {', '.join(str(m.model) for m in spec.models)} with mergekit")
        merge_models(
            spec,
            partial / MODEL_SUBDIR,
            recipe.tokenizer.pad_embeddings_to_multiple_of,
            recipe.package.max_shard_size,
            recipe.seed,
        )
        return {"method": spec.method}

    if run_stage(recipe, "merge", folder, {}, merge, force, log):
        log(f"merge: {folder / MODEL_SUBDIR}")
    return folder
