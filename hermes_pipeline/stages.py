"""The stages a recipe runs, in order, each as one ``hermes-pipeline`` command.

``hermes-pipeline run`` executes this list on the local machine and ``slurm submit`` turns each entry into a
chained job; both take it from here, so a stage added to the pipeline reaches both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hermes_pipeline.recipe.checks import training_stages
from hermes_pipeline.recipe.schema import Recipe, Resources
from hermes_pipeline.rundir import run_dir, stage_dir

# Names a user can pick from (e.g. ``slurm submit --stages``); every eval stage answers to "eval".
STAGE_KINDS = ("prep", "merge", "sft", "dpo", "package", "export", "eval")


@dataclass(frozen=True)
class Stage:
    name: str  # unique within a run: job name and log name
    kind: str  # one of STAGE_KINDS
    command: tuple[str, ...]  # arguments after ``hermes-pipeline``, the recipe path included
    folder: Path  # where the stage writes; finished when its MANIFEST.json matches
    resources: Resources


def recipe_stages(
    recipe: Recipe, recipe_path: str, overrides: list[str] | tuple[str, ...] = ()
) -> list[Stage]:
    """Every enabled stage of ``recipe`` in run order.

    Model merging comes before training because a stage may start from the merged model (Hermes 2 Θ runs
    DPO on the merge); packaging (which merges LoRA adapters) comes after the last training stage. An eval
    listed in ``eval.after`` runs right after the stage it names.
    """
    tail = (recipe_path, *(arg for override in overrides for arg in ("--set", override)))
    stages = [Stage("prep", "prep", ("prep", *tail), stage_dir(recipe, "prep"), recipe.data.resources)]
    if recipe.merge.enabled and recipe.merge.models is not None:
        stages.append(
            Stage(
                "merge",
                "merge",
                ("merge", "models", *tail),
                stage_dir(recipe, "merge"),
                recipe.merge.resources,
            )
        )
    for name, stage in training_stages(recipe).items():
        stages.append(Stage(name, name, ("train", name, *tail), stage_dir(recipe, name), stage.resources))
    if recipe.merge.enabled:
        stages.append(
            Stage(
                "package", "package", ("package", *tail), stage_dir(recipe, "final"), recipe.merge.resources
            )
        )
    if recipe.merge.enabled and recipe.export.enabled:
        stages.append(
            Stage(
                "export",
                "export",
                ("export", "gguf", *tail),
                stage_dir(recipe, "gguf"),
                recipe.export.resources,
            )
        )
    return _with_evals(recipe, stages, tail)


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
                    run_dir(recipe) / "eval" / after,
                    recipe.eval.resources,
                )
            )
    return ordered
