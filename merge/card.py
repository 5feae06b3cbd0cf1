"""The card stage: the model card (README.md in the Hugging Face format) of the packaged model.

Everything in it is read from the run directory — prep's report, each stage's summary and curves, the eval
results — so the card describes the run that made these weights, not the recipe's intentions. It is its own
stage, the last of a run, so that results measured after packaging (evals of the package and of the GGUF)
reach the card without any stage rewriting another's sealed output: the card is rendered into
runs/<name>/card/ and published as final/README.md (with its curves in final/curves/), files that
package's manifest leaves out.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from hermes_pipeline.chat_format.tokens import FN_CALL, IMAGE_TOKEN
from hermes_pipeline.errors import UserError
from hermes_pipeline.merge.probes import CONVERSATIONS
from hermes_pipeline.recipe.checks import optimization_stages, training_stages
from hermes_pipeline.recipe.schema import HUB_ID, Recipe
from hermes_pipeline.rundir import MANIFEST, file_fingerprint, run_dir, stage_dir
from hermes_pipeline.stages import recipe_stages, run_stage, without_resources

CURVES = "curves"
CARD = "README.md"
# What the card stage publishes into the packaged model's folder; package's manifest leaves these out.
PUBLISHED = (CARD, CURVES)


def run_card(recipe: Recipe, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Render the card from what the run left behind and publish it into final/; skipped when neither the
    recipe nor any result it shows has changed."""
    final = stage_dir(recipe, "final")
    if not (final / MANIFEST).is_file():
        raise UserError(f"{final} is not packaged yet; run `hermes-pipeline package RECIPE` first")
    stages = {stage.name: stage for stage in recipe_stages(recipe, "RECIPE")}
    shown = [stages[name].folder / MANIFEST for name in stages["card"].needs]
    inputs = {
        str(path.parent.relative_to(run_dir(recipe))): file_fingerprint(path)
        for path in shown
        if path.is_file()
    }

    def render(partial: Path) -> None:
        write_card(recipe, partial, AutoTokenizer.from_pretrained(final))
        for name in PUBLISHED:
            _publish(partial / name, final / name)

    out = stage_dir(recipe, "card")
    if run_stage(recipe, "card", out, inputs, render, force or not (final / CARD).is_file(), log):
        log(f"card: {final / CARD}")
    return out


def _publish(source: Path, target: Path) -> None:
    """Copy a file or folder into final/ under a temporary name, then rename it into place."""
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    if source.is_dir():
        shutil.copytree(source, staging)
        shutil.rmtree(target, ignore_errors=True)
    elif source.is_file():
        shutil.copyfile(source, staging)
    else:
        shutil.rmtree(target, ignore_errors=True)
        return
    os.replace(staging, target)


def write_card(recipe: Recipe, folder: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Write README.md (and copy the training curves it shows) into ``folder``."""
    sections = [
        _front_matter(recipe),
        f"# {recipe.name}\n\n{recipe.description}".strip(),
        _stages(recipe),
        _mixture(recipe),
        _hyperparameters(recipe),
        _curves(recipe, folder),
        _evals(recipe),
        _vision_prompt_format(recipe, tokenizer) if recipe.vision else _prompt_formats(tokenizer),
        _recipe_text(recipe),
    ]
    text = "\n\n".join(section for section in sections if section) + "\n"
    (folder / "README.md").write_text(text, encoding="utf-8")


def _front_matter(recipe: Recipe) -> str:
    meta: dict[str, Any] = {}
    bases = [m.model for m in recipe.merge.models.models] if recipe.merge.models else []
    if recipe.model.init == "pretrained":
        bases.insert(0, recipe.model.name_or_path)
    hub_bases = list(dict.fromkeys(b for b in bases if HUB_ID.fullmatch(str(b))))
    if hub_bases:
        meta["base_model"] = hub_bases if len(hub_bases) > 1 else hub_bases[0]
    datasets = [s.path for s in recipe.data.sources if HUB_ID.fullmatch(str(s.path))]
    if datasets:
        meta["datasets"] = list(dict.fromkeys(datasets))
    meta["license"] = recipe.package.license
    meta["language"] = ["en"]
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "image-text-to-text" if recipe.vision else "text-generation"
    tags = ["hermes-pipeline"]
    tags += (
        ["llava", "vicuna v1", "function calling"]
        if recipe.vision
        else ["chatml", "function calling", "json mode"]
    )
    tags += [name for name in training_stages(recipe)] + (
        ["merge", "mergekit"] if recipe.merge.models else []
    )
    meta["tags"] = tags
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---"


def _stages(recipe: Recipe) -> str:
    lines = ["## How it was made", "", f"Made with hermes-pipeline, recipe `{recipe.name}`:", ""]
    for stage in recipe_stages(recipe, "RECIPE"):
        lines.append(f"1. `{stage.name}`: `hermes-pipeline {' '.join(stage.command)}`")
    return "\n".join(lines)


def _mixture(recipe: Recipe) -> str:
    report_path = stage_dir(recipe, "prep") / "prep_report.json"
    if not report_path.is_file():
        return ""
    report = json.loads(report_path.read_text(encoding="utf-8"))
    lines = [
        "## Data mixture",
        "",
        "| source | kind | rows in | rows out | rejected | train | val | tokens |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, source in report["sources"].items():
        split = source.get("rows_by_split", {})
        lines.append(
            f"| {name} | {source['kind']} | {source['rows_in']:,} | {source['rows_out']:,} | "
            f"{source['rejected']:,} | {split.get('train', 0):,} | {split.get('val', 0):,} | {source['tokens']:,} |"
        )
    return "\n".join(lines)


HYPERPARAMETERS = (
    "mode",
    "init_from",
    "learning_rate",
    "lr_scheduler",
    "warmup_ratio",
    "num_epochs",
    "max_steps",
    "micro_batch_size",
    "gradient_accumulation_steps",
    "precision",
    "packing",
    "beta",
    "loss_type",
)


def _hyperparameters(recipe: Recipe) -> str:
    stages = optimization_stages(recipe)
    if not stages:
        return ""
    dumped = {name: stage.model_dump(mode="json") for name, stage in stages.items()}
    lines = ["## Hyperparameters", "", f"| | {' | '.join(stages)} |", "| --- |" + " --- |" * len(stages)]
    for key in HYPERPARAMETERS:
        values = [dumped[name].get(key) for name in stages]
        if any(v is not None for v in values):
            lines.append(f"| {key} | " + " | ".join("" if v is None else str(v) for v in values) + " |")
    lines.append(f"| max_seq_len | {' | '.join(str(recipe.data.max_seq_len) for _ in stages)} |")
    for name in stages:
        summary = stage_dir(recipe, name) / "summary.json"
        if summary.is_file():
            facts = json.loads(summary.read_text(encoding="utf-8"))
            lines.append(
                f"\n`{name}`: {facts['steps']} steps, {facts['tokens_seen']:,} tokens seen, "
                f"world size {facts['world_size']}, final train loss {facts.get('train_loss', float('nan')):.4f}."
            )
    return "\n".join(lines)


def _curves(recipe: Recipe, folder: Path) -> str:
    images = []
    for name in optimization_stages(recipe):
        for plot in sorted((stage_dir(recipe, name) / "plots").glob("*.png")):
            target = folder / CURVES / f"{name}_{plot.name}"
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(plot, target)
            images.append(f"![{name} {plot.stem}]({CURVES}/{target.name})")
    return "## Training curves\n\n" + "\n".join(images) if images else ""


def _evals(recipe: Recipe) -> str:
    rows = []
    for results in sorted((run_dir(recipe) / "eval").glob("*/results.json")):
        after = results.parent.name
        for suite, result in json.loads(results.read_text(encoding="utf-8")).items():
            low, high = result.get("ci95", (None, None))
            ci = f"{low:.3f} to {high:.3f}" if low is not None else ""
            rows.append(f"| {after} | {suite} | {result['accuracy']:.3f} | {ci} | {result.get('n', '')} |")
    if not rows:
        return ""
    header = [
        "## Evaluation",
        "",
        "| after | eval | accuracy | 95% CI | samples |",
        "| --- | --- | ---: | --- | ---: |",
    ]
    return "\n".join(header + rows)


def _prompt_formats(tokenizer: PreTrainedTokenizerBase) -> str:
    """Examples rendered by the packaged tokenizer's own templates, so the card cannot drift from them."""
    chat, tools_call = CONVERSATIONS[1], CONVERSATIONS[3]
    json_mode = CONVERSATIONS[4]
    render = tokenizer.apply_chat_template
    parts = [
        "## Prompt format",
        "",
        "ChatML; generation stops at `<|im_end|>` (the EOS in config.json, generation_config.json and the "
        "tokenizer). The tokenizer carries two named templates: `default` and `tool_use`, which "
        "transformers picks when `tools=` is passed.",
        "",
        "### Chat",
        "",
        "```",
        render(chat[0], tokenize=False, add_generation_prompt=True),
        "```",
        "",
        "### Function calling",
        "",
        "The tools go into the system prompt as JSON signatures inside `<tools></tools>`; the model answers "
        "with one `<tool_call>` block per call and reads results from `tool` turns:",
        "",
        "```",
        render(tools_call[0], tools=tools_call[1], tokenize=False, add_generation_prompt=True),
        "```",
        "",
        "### JSON mode",
        "",
        "```",
        render(json_mode[0], tokenize=False, add_generation_prompt=True),
        "```",
    ]
    return "\n".join(parts)


# Hermes 2 Vision's function calling, as its card shows it: <fn_call> and a JSON schema after the image.
FN_CALL_EXAMPLE = {
    "type": "object",
    "properties": {
        "shape": {"type": "string", "enum": ["circle", "square", "triangle"]},
        "count": {"type": "integer"},
    },
    "required": ["shape", "count"],
}


def _vision_prompt_format(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> str:
    """A Vision model's prompts, rendered by the packaged tokenizer's own Vicuna v1 template."""
    render = tokenizer.apply_chat_template
    ask = [{"role": "user", "content": f"{IMAGE_TOKEN}\nWhat is in the picture?"}]
    call = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{FN_CALL}{json.dumps(FN_CALL_EXAMPLE, indent=2)}"}]
    parts = [
        "## Prompt format",
        "",
        "Vicuna v1, as LLaVA writes it (`conv_llava_v1`); generation stops at `</s>` (the EOS in config.json, "
        "generation_config.json and the tokenizer). `<image>` marks where the picture goes: the processor "
        "writes it as one token per patch of the vision tower.",
        "",
        "```",
        render(ask, tokenize=False, add_generation_prompt=True),
        "```",
        "",
        "### Function calling",
        "",
        "The user turn opens with `<fn_call>` and a JSON schema; the answer is a JSON object under it:",
        "",
        "```",
        render(call, tokenize=False, add_generation_prompt=True),
        "```",
        "",
        "### transformers",
        "",
        "```python",
        "from PIL import Image",
        "from transformers import AutoProcessor, LlavaForConditionalGeneration",
        "",
        'processor = AutoProcessor.from_pretrained("MODEL")',
        'model = LlavaForConditionalGeneration.from_pretrained("MODEL")',
        'messages = [{"role": "user", "content": "<image>\\nWhat is in the picture?"}]',
        "text = processor.apply_chat_template(messages, add_generation_prompt=True)",
        'inputs = processor(images=[Image.open("picture.png")], text=[text], add_special_tokens=False, '
        'return_tensors="pt")',
        "answer = model.generate(**inputs, max_new_tokens=256)",
        "print(processor.decode(answer[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))",
        "```",
    ]
    if recipe.vision and recipe.vision.image_aspect_ratio == "pad":
        parts += [
            "",
            "Trained on pictures padded to a square with the processor's mean colour; pad yours the same way.",
        ]
    return "\n".join(parts)


def _recipe_text(recipe: Recipe) -> str:
    """The resolved recipe, with local paths made relative to where the run started (a published card
    should not carry the layout of the machine it was trained on)."""
    dumped = without_resources(recipe.model_dump(mode="json"))  # cluster sizes say nothing about the model
    resolved = yaml.safe_dump(dumped, sort_keys=False, allow_unicode=True)
    return f"## Recipe\n\n```yaml\n{resolved.replace(str(Path.cwd()) + '/', '')}```"
