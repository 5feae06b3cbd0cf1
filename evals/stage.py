"""The eval stage: the recipe's eval suites on the model one stage left behind, into ``runs/<name>/eval/<after>/``.

``after`` names the model: ``base`` the recipe's starting model (a random init is rebuilt from its config
with the recipe seed, as training builds it), ``sft``/``dpo``/``merge`` that stage's ``model`` folder,
``package`` the packaged model in ``final/``, ``export`` the f16 GGUF in ``gguf/``, run by llama.cpp (a
Vision model's with its mmproj, in llama-server).

The folder holds one subfolder per suite (``function_calling/<set>/`` per function-calling set,
``json_mode/``, ``gpt4all/`` ...) with that suite's own files, and ``results.json``, the summary the model
card is built from::

    {"function_calling": {"accuracy": 0.91, "ci95": [0.85, 0.95], "n": 115}, "gpt4all": {...}, ...}

``accuracy`` is a fraction in [0, 1] (for lm-eval suites, the cards' suite average), ``ci95`` its 95%
interval and ``n`` the number of samples scored. Function-calling sets are pooled into one number.
MANIFEST.json is written last; a stage whose manifest matches the recipe's eval settings and the model's
own manifest is skipped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hermes_pipeline.errors import UserError
from hermes_pipeline.evals.backends import (
    Backend,
    LlamaCppBackend,
    OpenAIBackend,
    Sampling,
    TransformersBackend,
)
from hermes_pipeline.evals.generate import eval_set_name, evaluate
from hermes_pipeline.evals.harness import SUITES, run_suites
from hermes_pipeline.evals.scoring import wilson_interval
from hermes_pipeline.llama_server import MMPROJ_PREFIX, find_mmproj, running_server
from hermes_pipeline.models import MODEL_SUBDIR, load_model, load_trained
from hermes_pipeline.recipe.schema import Recipe, SftStage
from hermes_pipeline.rundir import (
    MANIFEST,
    file_fingerprint,
    run_dir,
    stage_dir,
)
from hermes_pipeline.stages import eval_dir, run_stage

RESULTS_FILE = "results.json"
# The folder each point's model lives in, relative to the run directory; "base" is built, not read.
MODEL_FOLDERS = {
    "sft": f"sft/{MODEL_SUBDIR}",
    "dpo": f"dpo/{MODEL_SUBDIR}",
    "merge": f"merge/{MODEL_SUBDIR}",
    "package": "final",
}
# The stage whose manifest vouches for that model.
PRODUCERS = {
    "base": "prep",
    "sft": "sft",
    "dpo": "dpo",
    "merge": "merge",
    "package": "final",
    "export": "gguf",
}


def run_eval_stage(
    recipe: Recipe, after: str, force: bool = False, log: Callable[[str], Any] = print
) -> Path:
    """Evaluate the model ``after`` left behind with every suite in ``eval.suites``; returns the folder."""
    if after not in PRODUCERS:
        raise UserError(f"--after {after}: pick one of {', '.join(PRODUCERS)}")
    producer = stage_dir(recipe, PRODUCERS[after]) / MANIFEST
    if not producer.is_file():
        raise UserError(f"eval after {after}: {producer.parent} has not finished; run that stage first")
    out = eval_dir(recipe, after)

    def evaluate_model(partial: Path) -> dict[str, Any]:
        summary = _run_suites(recipe, after, partial, log)
        (partial / RESULTS_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        for suite, result in summary.items():
            low, high = result["ci95"]
            log(
                f"eval after {after}: {suite} {result['accuracy']:.1%} "
                f"(95% CI {low:.1%} - {high:.1%}, n={result['n']})"
            )
        return {"after": after, "results": summary}

    inputs = {"model": file_fingerprint(producer), **_set_inputs(recipe)}
    run_stage(recipe, "eval", out, inputs, evaluate_model, force, log)
    return out


def _set_inputs(recipe: Recipe) -> dict[str, str]:
    """Local eval files by content, Hub sets by name: editing a local set re-runs the eval."""
    sets = [*recipe.eval.function_calling_sets, recipe.eval.json_mode_set]
    if recipe.eval.vision_function_calling_set is not None:
        sets.append(recipe.eval.vision_function_calling_set)
    return {f"set:{ref}": file_fingerprint(ref) if Path(ref).is_file() else ref for ref in sets}


def _run_suites(recipe: Recipe, after: str, out: Path, log: Callable[[str], Any]) -> dict[str, Any]:
    ev = recipe.eval
    generated = [suite for suite in ev.suites if suite in ("function_calling", "json_mode")]
    harness = {name: SUITES[name] for name in ev.suites if name in SUITES}
    summary: dict[str, Any] = {}
    model = tokenizer = None
    if generated:
        backend = _backend(recipe, after)
        if isinstance(backend, TransformersBackend):
            model, tokenizer = backend.model, backend.tokenizer
        if "function_calling" in generated:
            folder = out / "function_calling"
            sets = [
                evaluate(backend, "function_calling", ref, folder / _folder_name(ref), ev.limit)
                for ref in ev.function_calling_sets
            ]
            summary["function_calling"] = _pooled([result["strict"] for result in sets])
        if "json_mode" in generated:
            result = evaluate(backend, "json_mode", ev.json_mode_set, out / "json_mode", ev.limit)
            summary["json_mode"] = _pooled([result["strict"]])
    if "vision_function_calling" in ev.suites:
        summary["vision_function_calling"] = _vision_function_calling(recipe, after, out)
    if harness and after == "export":
        log(f"eval after export: lm-eval suites ({', '.join(harness)}) run on transformers models; skipped")
    elif harness:
        if model is None:
            model, tokenizer = _transformers_model(recipe, after)
        results = run_suites(model, harness, tokenizer, ev.batch_size, ev.limit, seed=recipe.seed)
        for name, result in results.items():
            (out / name).mkdir()
            (out / name / RESULTS_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
            summary[name] = {"accuracy": result["score"], "ci95": result["ci95"], "n": result["n"]}
    return summary


def _vision_function_calling(recipe: Recipe, after: str, out: Path) -> dict[str, Any]:
    """Hermes 2 Vision's <fn_call> on the LLaVA model ``after`` left behind, read through its processor."""
    from hermes_pipeline.evals.vision import LlamaServerGenerator, LlavaGenerator, evaluate_fn_call

    ev, vision = recipe.eval, recipe.vision
    assert ev.vision_function_calling_set and ev.vision_image_root and vision, "validate checks these"
    sampling = Sampling(ev.temperature, recipe.seed, ev.max_new_tokens, ev.batch_size)
    pad = vision.image_aspect_ratio == "pad"

    def evaluate_with(generator: LlavaGenerator | LlamaServerGenerator) -> dict[str, Any]:
        folder = out / "vision_function_calling"
        result = evaluate_fn_call(
            generator, ev.vision_function_calling_set, Path(ev.vision_image_root), folder, ev.limit
        )
        return {**_pooled([result["strict"]]), "fields": result["fields"]}

    if after == "export":  # the f16 GGUF with its mmproj in llama-server, read through the packaged processor
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(run_dir(recipe) / MODEL_FOLDERS["package"])
        gguf = _f16_gguf(recipe)
        mmproj = find_mmproj(gguf)
        if mmproj is None:
            raise UserError(f"eval after export: no mmproj file beside {gguf}; run export again with --force")
        with running_server(gguf, extra=["--mmproj", str(mmproj), "--parallel", "1"]) as server:
            return evaluate_with(LlamaServerGenerator(server, processor, sampling, pad))
    model, processor = _llava(recipe, after)
    return evaluate_with(LlavaGenerator(model, processor, sampling, pad))


def _llava(recipe: Recipe, after: str) -> tuple[Any, Any]:
    """The LLaVA model and its processor: the packaged ones as users load them after package; before, the
    stage's model with the processor built from prep's tokenizer and the tower's image processor."""
    import torch
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    from hermes_pipeline.vision import recipe_processor, start_llava

    assert recipe.vision is not None
    if after == "package":
        folder = run_dir(recipe) / MODEL_FOLDERS["package"]
        processor = AutoProcessor.from_pretrained(folder)
        model = LlavaForConditionalGeneration.from_pretrained(folder)
    else:
        tokenizer = AutoTokenizer.from_pretrained(stage_dir(recipe, "prep") / "tokenizer")
        processor = recipe_processor(recipe.vision, tokenizer)
        if after == "base":
            source = recipe.model.name_or_path if recipe.model.init == "pretrained" else None
            model = start_llava(recipe, tokenizer, source)
        else:
            model = load_trained(
                recipe, SftStage(mode="full"), run_dir(recipe) / MODEL_FOLDERS[after], tokenizer
            )
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), processor


def _folder_name(ref: str) -> str:
    return eval_set_name(ref).replace("/", "__")


def _pooled(rates: list[dict[str, Any]]) -> dict[str, Any]:
    passed, total = sum(rate["passed"] for rate in rates), sum(rate["total"] for rate in rates)
    if total == 0:
        return {"accuracy": None, "ci95": None, "n": 0}
    return {"accuracy": passed / total, "ci95": list(wilson_interval(passed, total)), "n": total}


def _backend(recipe: Recipe, after: str) -> Backend:
    ev = recipe.eval
    sampling = Sampling(ev.temperature, recipe.seed, ev.max_new_tokens, ev.batch_size)
    if after == "export":
        return LlamaCppBackend(_f16_gguf(recipe), sampling)
    if ev.backend == "openai":
        if ev.endpoint is None:
            raise UserError("eval.backend is openai but eval.endpoint is not set; give the server's URL")
        return OpenAIBackend(ev.endpoint, None, sampling)
    if ev.backend == "llama_cpp":
        raise UserError(f"eval.backend llama_cpp runs the exported GGUF; evaluate after export, not {after}")
    model, tokenizer = _transformers_model(recipe, after)
    return TransformersBackend(model, tokenizer, sampling)


def _f16_gguf(recipe: Recipe) -> Path:
    """The exported f16 language model (a Vision run's mmproj beside it is f16 too, and not it)."""
    found = sorted(
        path
        for path in (run_dir(recipe) / "gguf").glob("*.gguf")
        if "f16" in path.name.lower() and not path.name.startswith(MMPROJ_PREFIX)
    )
    if not found:
        raise UserError(
            f"eval after export: no f16 GGUF in {run_dir(recipe) / 'gguf'}; run export with f16 in export.gguf_types"
        )
    return found[0]


def _transformers_model(recipe: Recipe, after: str) -> tuple[Any, Any]:
    """The model in full precision, as its stage saved it, on the GPU when there is one.

    A LoRA stage's adapter is applied to the base it trained on, the way the next stage would load it.
    """
    import torch
    from transformers import AutoTokenizer

    full = SftStage(mode="full")  # load whole weights; no stage setting shapes loading otherwise
    if after == "base":
        tokenizer = AutoTokenizer.from_pretrained(stage_dir(recipe, "prep") / "tokenizer")
        source = recipe.model.name_or_path if recipe.model.init == "pretrained" else None
        model = load_model(recipe, full, tokenizer, source)
    else:
        folder = run_dir(recipe) / MODEL_FOLDERS[after]
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = load_trained(recipe, full, folder, tokenizer)
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer
