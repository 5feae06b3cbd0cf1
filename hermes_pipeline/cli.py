"""The ``hermes-pipeline`` command. User mistakes end as one line per problem on stderr and exit code 2.

Each command imports its stage inside its handler, so ``--help`` answers without loading torch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence

from hermes_pipeline import __version__
from hermes_pipeline.errors import StageInterrupted, UserError


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. configs/recipes/tiny.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set sft.learning_rate=1e-5 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hermes-pipeline",
        description="Fine-tune chat models the Hermes 2 way: prep, SFT, DPO, merge, GGUF.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser("validate", help="check a recipe and report every problem, one line each")
    _add_recipe_arguments(validate)
    validate.set_defaults(handler=_validate)

    plan = commands.add_parser(
        "plan", help="show stages, batch sizes, tokens per step and GPU memory per device"
    )
    _add_recipe_arguments(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(handler=_plan)

    prep = commands.add_parser(
        "prep", help="convert, mix, tokenize and mask the recipe's data into the run directory"
    )
    _add_recipe_arguments(prep)
    prep.add_argument("--force", action="store_true", help="redo the stage even if a finished one matches")
    prep.add_argument(
        "--inspect",
        type=int,
        default=0,
        metavar="N",
        help="then print N rows per stage with trained spans marked",
    )
    prep.set_defaults(handler=_prep)

    train = commands.add_parser(
        "train",
        help="run a training stage (sft or dpo) on prep's shards; resumes from the newest complete checkpoint",
    )
    train.add_argument("stage", choices=["sft", "dpo"])
    _add_recipe_arguments(train)
    train.add_argument("--force", action="store_true", help="discard checkpoints and outputs; start over")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser(
        "eval", help="score function calling and JSON mode as the Hermes 2 Pro card does"
    )
    kinds = evaluate.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, what in (("function-calling", "tool calls"), ("json-mode", "JSON answers")):
        scorer = kinds.add_parser(kind, help=f"score {what} produced elsewhere (--predictions)")
        scorer.add_argument(
            "--predictions",
            required=True,
            metavar="FILE",
            help="JSONL of eval rows in their Hub schema plus `output`, the model's raw assistant text",
        )
        scorer.add_argument(
            "--out", required=True, metavar="DIR", help="where samples, results and DPO pairs go"
        )
        if kind == "function-calling":
            scorer.add_argument(
                "--lenient",
                action="store_true",
                help="also report a separate number that accepts Python-dict calls (the default is strict JSON)",
            )
        scorer.set_defaults(handler=_eval)

    run = commands.add_parser("run", help="run every enabled stage of a recipe in order: prep, sft, dpo")
    _add_recipe_arguments(run)
    run.set_defaults(handler=_run)
    return parser


def _validate(args: argparse.Namespace) -> None:
    from hermes_pipeline.recipe.loader import load_recipe, recipe_hash

    recipe = load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: valid (recipe {recipe.name}, hash {recipe_hash(recipe)})")


def _plan(args: argparse.Namespace) -> None:
    from hermes_pipeline.plan import build_plan, format_plan
    from hermes_pipeline.recipe.loader import load_recipe

    plan = build_plan(load_recipe(args.recipe, args.overrides))
    print(json.dumps(plan.as_dict(), indent=2) if args.json else format_plan(plan))


def _prep(args: argparse.Namespace) -> None:
    from data_prep.inspect import inspect_rows
    from data_prep.pipeline import run_prep
    from hermes_pipeline.recipe.loader import load_recipe

    out = run_prep(load_recipe(args.recipe, args.overrides), force=args.force)
    if args.inspect:
        print(inspect_rows(out, args.inspect, color=sys.stdout.isatty()))


def _train(args: argparse.Namespace) -> None:
    from hermes_pipeline.recipe.loader import load_recipe
    from train.launch import configure_devices, relaunch_command
    from train.stage import check_ready, run_train

    recipe = load_recipe(args.recipe, args.overrides)
    stage = getattr(recipe, args.stage)
    configure_devices(stage.resources, args.stage)
    check_ready(recipe, args.stage)
    command = relaunch_command(stage.resources, sys.argv[1:])
    if command is not None:
        sys.exit(subprocess.call(command))

    run_train(recipe, args.stage, force=args.force)


def _eval(args: argparse.Namespace) -> None:
    from evals.predictions import format_results, score_predictions

    kind = args.kind.replace("-", "_")
    results = score_predictions(args.predictions, kind, args.out, lenient=getattr(args, "lenient", False))
    print(format_results(results))


def _run(args: argparse.Namespace) -> None:
    """Each training stage runs as its own command, so it can start one process per device and frees its
    memory before the next stage."""
    from data_prep.pipeline import run_prep
    from hermes_pipeline.recipe.checks import training_stages
    from hermes_pipeline.recipe.loader import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    run_prep(recipe)
    overrides = [arg for override in args.overrides for arg in ("--set", override)]
    for name in training_stages(recipe):
        command = [sys.executable, "-m", "hermes_pipeline.cli", "train", name, args.recipe, *overrides]
        code = subprocess.call(command)
        if code != 0:
            sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (UserError, StageInterrupted) as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
