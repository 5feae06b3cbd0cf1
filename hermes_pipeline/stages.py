"""Every stage kind, declared once, and the stages a recipe runs, in order.

A declaration says where a stage writes in the run directory, which recipe keys its output depends on and
what it produces. `run`, `slurm submit`, `plan`, the eval stages and the model card all take the stage list
from ``recipe_stages``; each stage's fingerprint is derived from its declared keys (``stage_fingerprint``),
so changing an eval setting never re-runs prep or training, and changing what a stage reads always re-runs
it. What a stage reads from other stages is recorded separately, as the hashes of their manifests.

Adding a stage kind: one entry in ``STAGE_KINDS``, its place in ``recipe_stages``, its command in the CLI,
and its module, whose entry point runs under ``rundir.run_stage``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hermes_pipeline.disk import full_disk_in_one_line
from hermes_pipeline.locks import stage_lock
from hermes_pipeline.recipe.checks import training_stages
from hermes_pipeline.recipe.schema import Recipe, Resources
from hermes_pipeline.rundir import (
    MANIFEST,
    hash_mismatch,
    is_complete,
    output_damage,
    run_dir,
    staged_output,
    write_manifest,
)

# Recipe keys that change no stage's output, wherever they appear: how big and how long the jobs are.
NOT_OUTPUT = frozenset({"resources"})
# Read by every stage but part of no fingerprint: where the run directory is (moving it re-runs all).
LOCATION = frozenset({"name", "run_dir"})
EVAL_POINTS = ("base", "sft", "dpo", "merge", "package", "export")


@dataclass(frozen=True)
class StageKind:
    """One kind of stage. ``reads`` are dotted recipe keys; a section's name covers all of it, and ""
    covers the whole recipe."""

    name: str
    folder: str  # in the run directory; "{after}" is filled in for eval stages
    reads: tuple[str, ...]
    produces: str


STAGE_KINDS: dict[str, StageKind] = {
    kind.name: kind
    for kind in (
        StageKind(
            "prep",
            "prep",
            # The eval sets are read for decontamination only.
            (
                "seed",
                "data",
                "tokenizer",
                "model.name_or_path",
                "model.trust_remote_code",
                "eval.enabled",
                "eval.suites",
                "eval.function_calling_sets",
                "eval.json_mode_set",
            ),
            "tokenized and masked shards per training stage, the prepared tokenizer, report and rejects",
        ),
        StageKind(
            "merge",
            "merge",
            ("seed", "merge.models", "tokenizer.pad_embeddings_to_multiple_of", "package.max_shard_size"),
            "the mergekit merge of merge.models, with the Hermes tokenizer and templates",
        ),
        StageKind(
            "projector",
            "projector",
            ("seed", "vision", "model", "tokenizer.pad_embeddings_to_multiple_of", "data.max_seq_len"),
            "the Vision projector trained alone on captions (tower and LLM frozen), checkpoints, metrics",
        ),
        StageKind(
            "sft",
            "sft",
            ("seed", "sft", "vision", "model", "tokenizer.pad_embeddings_to_multiple_of", "data.max_seq_len"),
            "the supervised fine-tuned model (a LoRA adapter, or a LLaVA model for Vision), checkpoints, "
            "metrics and curves",
        ),
        StageKind(
            "dpo",
            "dpo",
            ("seed", "dpo", "model", "tokenizer.pad_embeddings_to_multiple_of", "data.max_seq_len"),
            "the preference-tuned model (or LoRA adapter), checkpoints, metrics and curves",
        ),
        StageKind(
            "package",
            "final",
            (
                "package.max_shard_size",
                "package.temperature",
                "package.top_p",
                "package.repetition_penalty",
                "merge.lora_base",
                "merge.models",
                "sft.enabled",
                "sft.mode",
                "dpo.enabled",
                "dpo.mode",
                "tokenizer.pad_embeddings_to_multiple_of",
                "tokenizer.template",
                "vision",
            ),
            "the downloadable model: safetensors shards, EOS <|im_end|> and both chat templates "
            "(Vision: a LLaVA folder with its processor, Vicuna v1, EOS </s>)",
        ),
        StageKind(
            "export",
            "gguf",
            ("export.gguf_types", "model.trust_remote_code"),
            "GGUF files, each verified against the package and served by llama-server",
        ),
        StageKind(
            "eval",
            "eval/{after}",
            (
                "seed",
                "model",
                "tokenizer.pad_embeddings_to_multiple_of",
                "eval.suites",
                "eval.backend",
                "eval.endpoint",
                "eval.function_calling_sets",
                "eval.json_mode_set",
                "eval.vision_function_calling_set",
                "eval.vision_image_root",
                "vision",
                "eval.temperature",
                "eval.max_new_tokens",
                "eval.batch_size",
                "eval.limit",
            ),
            "function-calling, JSON-mode and lm-eval results for one point of the pipeline",
        ),
        StageKind(
            "card",
            "card",
            ("",),  # the card shows the whole recipe
            "the model card (README.md) in final/, from the run's reports, curves and eval results",
        ),
    )
}


@dataclass(frozen=True)
class Stage:
    """One stage of one recipe's run."""

    name: str  # unique within a run: job name and log name
    kind: str  # a key of STAGE_KINDS
    command: tuple[str, ...]  # arguments after ``hermes-pipeline``, the recipe path included
    folder: Path  # where the stage writes; finished when its MANIFEST.json matches
    resources: Resources
    needs: tuple[str, ...] = ()  # the stages whose outputs it reads


def stage_fingerprint(recipe: Recipe, kind: str) -> str:
    """A hash of exactly the recipe keys ``kind`` reads, resources and time limits left out."""
    return fingerprint_of(recipe.model_dump(mode="json"), kind)


def fingerprint_of(dumped: dict[str, Any], kind: str) -> str:
    """``stage_fingerprint`` of a dumped recipe."""
    kept = without_resources(dumped)
    relevant = {key: read_key(kept, key) for key in sorted(STAGE_KINDS[kind].reads)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def without_resources(dumped: Any) -> Any:
    """A dumped recipe (or part of one) without its ``resources`` blocks, at any depth."""
    if isinstance(dumped, dict):
        return {k: without_resources(v) for k, v in dumped.items() if k not in NOT_OUTPUT}
    if isinstance(dumped, list):
        return [without_resources(v) for v in dumped]
    return dumped


def read_key(dumped: dict[str, Any], key: str) -> Any:
    """The value at a dotted key of a dumped recipe; None where a section is absent."""
    value: Any = dumped
    for part in filter(None, key.split(".")):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def recipe_stages(
    recipe: Recipe, recipe_path: str, overrides: list[str] | tuple[str, ...] = ()
) -> list[Stage]:
    """Every enabled stage of ``recipe`` in run order.

    Model merging comes before training because a stage may start from the merged model (Hermes 2 Θ runs
    DPO on the merge); packaging (which merges LoRA adapters) comes after the last training stage. An eval
    listed in ``eval.after`` runs right after the stage it names; the model card comes last, once every
    result it reports exists.
    """
    tail = (recipe_path, *(arg for override in overrides for arg in ("--set", override)))

    def stage(
        name: str, kind: str, command: tuple[str, ...], resources: Resources, needs: tuple[str, ...] = ()
    ):
        folder = run_dir(recipe) / STAGE_KINDS[kind].folder
        return Stage(name, kind, (*command, *tail), folder, resources, needs)

    stages = [stage("prep", "prep", ("prep",), recipe.data.resources)]
    merged = recipe.merge.enabled and recipe.merge.models is not None
    if merged:
        stages.append(stage("merge", "merge", ("merge", "models"), recipe.merge.resources))
    if recipe.vision is not None:
        pretrain = recipe.vision.projector_pretrain
        stages.append(stage("projector", "projector", ("train", "projector"), pretrain.resources, ("prep",)))
    for name, train in training_stages(recipe).items():
        start = (train.init_from,) if train.init_from in ("sft", "merge") else ()
        if recipe.vision is not None:
            start = ("projector",)  # visual instruction tuning starts from the pre-trained projector
        stages.append(stage(name, name, ("train", name), train.resources, ("prep", *start)))
    producers = [s.name for s in stages if s.kind in ("merge", "sft", "dpo")]
    if recipe.merge.enabled:
        stages.append(
            stage("package", "package", ("package",), recipe.merge.resources, tuple(producers[-1:]))
        )
        if recipe.export.enabled:
            stages.append(
                stage("export", "export", ("export", "gguf"), recipe.export.resources, ("package",))
            )
    stages = _with_evals(recipe, stages, tail)
    if recipe.merge.enabled:
        shown = tuple(s.name for s in stages if s.kind in ("prep", "sft", "dpo", "package", "export", "eval"))
        stages.append(stage("card", "card", ("card",), recipe.merge.resources, shown))
    return stages


def _with_evals(recipe: Recipe, stages: list[Stage], tail: tuple[str, ...]) -> list[Stage]:
    if not recipe.eval.enabled:
        return stages
    ordered: list[Stage] = []
    for stage in stages:
        ordered.append(stage)
        after = "base" if stage.kind == "prep" else stage.kind
        if after in recipe.eval.after:
            ordered.append(
                Stage(
                    f"eval_{after}",
                    "eval",
                    ("eval", "stage", "--after", after, *tail),
                    eval_dir(recipe, after),
                    recipe.eval.resources,
                    (stage.name,),
                )
            )
    return ordered


def eval_dir(recipe: Recipe, after: str) -> Path:
    return run_dir(recipe) / STAGE_KINDS["eval"].folder.format(after=after)


def run_stage(
    recipe: Recipe,
    kind: str,
    folder: Path,
    inputs: dict[str, str],
    body: Callable[[Path], dict[str, Any] | None],
    force: bool = False,
    log: Callable[[str], Any] = print,
    skip: tuple[str, ...] = (),
) -> bool:
    """Run one stage under the contract: skip it when its manifest matches this recipe's fingerprint for
    ``kind`` and ``inputs`` (the hashes of what it reads from other stages); otherwise run ``body`` on a
    fresh ``<folder>.partial`` (it writes and verifies its outputs there and may return manifest extras),
    rename that into place, and write the manifest last. Returns whether the stage ran.

    Training stages do not use it: their checkpoints must survive a crash in the stage folder, so they
    seal their model folder themselves, with the same fingerprint, inputs and manifest. Either way the
    stage's lock is held throughout, so a second command on the same stage stops instead of racing."""
    fingerprint = stage_fingerprint(recipe, kind)
    with stage_lock(folder):
        if not force and is_complete(folder, fingerprint, inputs):
            log(f"{kind}: {folder} is up to date; skipped (--force to redo)")
            return False
        if (damage := output_damage(folder)) is not None:
            log(f"{kind}: {damage}; redoing the stage")
        started = time.time()
        with full_disk_in_one_line(folder), staged_output(folder) as partial:
            extra = body(partial)
        write_manifest(folder, fingerprint, inputs, started, extra=extra, skip=skip)
    return True


def verify_outputs(stages: list[Stage], log: Callable[[str], Any] = print) -> list[str]:
    """Hash every output of every finished stage against its manifest; a stage whose outputs changed
    loses its manifest, so the next run redoes it (a training stage from its last sealed checkpoint).
    Returns the names of the stages unmarked."""
    redo = []
    for stage in stages:
        if not (stage.folder / MANIFEST).is_file():
            continue
        with stage_lock(stage.folder):
            damage = output_damage(stage.folder) or hash_mismatch(stage.folder)
            if damage is None:
                log(f"{stage.name}: every output matches its manifest")
                continue
            (stage.folder / MANIFEST).unlink()
        log(f"{stage.name}: {damage}; no longer counts as finished, the next run redoes it")
        redo.append(stage.name)
    return redo
