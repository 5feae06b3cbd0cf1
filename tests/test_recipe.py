"""Recipe validation: shipped recipes pass, broken ones fail with one line naming the key, exit code 2."""

import os
import random
import re
import subprocess
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from hermes_pipeline.cli import main
from hermes_pipeline.errors import RecipeError
from hermes_pipeline.recipe.loader import load_recipe, recipe_hash
from hermes_pipeline.recipe.schema import Recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "recipes"
VISION = RECIPES / "nous-hermes-2-vision-mistral-7b.yaml"
TEXT_RECIPES = ["hermes-2-pro-mistral-7b", "nous-hermes-2-mistral-7b-dpo", "hermes-2-theta-llama-3-8b"]
HERMES_RECIPES = [*TEXT_RECIPES, VISION.stem]
TINY = RECIPES / "tiny.yaml"
TINY_VISION = RECIPES / "tiny-vision.yaml"


@pytest.mark.parametrize("name", [*TEXT_RECIPES, "tiny", "tiny-vision"])
def test_shipped_recipes_validate_on_a_fresh_machine(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("HERMES_IMAGE_ROOT", raising=False)
    assert main(["validate", "--strict", str(RECIPES / f"{name}.yaml")]) == 0
    out, err = capsys.readouterr()
    assert "valid" in out and err == ""


def test_vision_recipe_validates_and_names_the_image_folders_it_needs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cluster's image folders come from $HERMES_IMAGE_ROOT: unset, validate passes with a note per
    source and `prep` is where they must exist."""
    monkeypatch.delenv("HERMES_IMAGE_ROOT", raising=False)
    assert main(["validate", str(VISION)]) == 0
    notes = capsys.readouterr().err.splitlines()
    assert notes == [
        f"note: {VISION}: data.sources[{i}].image_root: ${{HERMES_IMAGE_ROOT}} is not set; needed when prep runs"
        for i in range(3)
    ]


PACKING_REFUSAL = (
    f"{TINY_VISION}: sft.packing: rows with images are not packed; set sft.packing: false (from --set)"
)


@pytest.mark.parametrize(
    "command",
    [["plan"], ["prep"], ["run"], ["slurm", "submit", "--dry-run"]],
    ids=["plan", "prep", "run", "slurm-submit"],
)  # fmt: skip
def test_every_entry_point_refuses_what_is_not_built(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each command loads the recipe through the same checks, before any stage, script or job exists."""
    monkeypatch.chdir(tmp_path)
    at = 2 if command[0] == "slurm" else 1
    refused = [*command[:at], str(TINY_VISION), *command[at:], "--set", "sft.packing=true"]
    assert main(refused) == 2
    assert capsys.readouterr().err.splitlines()[0] == PACKING_REFUSAL
    assert list(tmp_path.iterdir()) == []


def test_every_shipped_recipe_is_tested() -> None:
    assert {p.stem for p in RECIPES.glob("*.yaml")} == {*HERMES_RECIPES, "tiny", "tiny-vision"}


@pytest.mark.parametrize("name", HERMES_RECIPES)
def test_every_recipe_value_says_where_it_comes_from(name: str) -> None:
    """A reproduction recipe must say which values are published and which are our own choice."""
    unmarked = []
    for number, line in enumerate((RECIPES / f"{name}.yaml").read_text().splitlines(), 1):
        body = line.split(" #", 1)[0]
        if line.lstrip().startswith("#") or not re.search(r":\s*\S", body):
            continue
        if not re.search(r"#\s*(published:|ours\b)", line):
            unmarked.append(f"{number}: {line.strip()}")
    assert not unmarked, "values without a 'published:' or 'ours:' comment:\n" + "\n".join(unmarked)


def _tiny() -> dict:
    return yaml.safe_load((RECIPES / "tiny.yaml").read_text())


def _set(path: str, value: object) -> Callable[[dict], None]:
    def mutate(raw: dict) -> None:
        *parents, last = path.split(".")
        node = raw
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[int(last) if last.isdigit() else last] = value

    return mutate


def _drop(path: str) -> Callable[[dict], None]:
    def mutate(raw: dict) -> None:
        *parents, last = path.split(".")
        node = raw
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        del node[last]

    return mutate


def _add_source(**source: object) -> Callable[[dict], None]:
    return lambda raw: raw["data"]["sources"].append(source)


SLERP_THREE = {
    "method": "slerp",
    "models": [{"model": "a/b"}, {"model": "c/d"}, {"model": "e/f"}],
    "base_model": "a/b",
    "parameters": {"t": 0.5},
}


# (id, mutation of tiny.yaml, expected key path, expected words in the message)
def _pretrained(raw: dict) -> None:
    """LoRA and QLoRA adapt trained weights: start from a Hub model (its config stays the local file)."""
    _set("model.init", "pretrained")(raw)
    _set("model.name_or_path", "mistralai/Mistral-7B-v0.1")(raw)


BROKEN: list[tuple[str, Callable[[dict], None], str, str]] = [
    ("unknown top-level key", _set("sftt", {"learning_rate": 1e-5}), "sftt", "did you mean 'sft'"),
    ("unknown nested key", _set("sft.learning_rat", 1e-5), "sft.learning_rat", "did you mean 'learning_rate'"),
    ("wrong type", _set("sft.micro_batch_size", "four"), "sft.micro_batch_size", "expected a valid integer"),
    ("out of range", _set("sft.learning_rate", -1), "sft.learning_rate", "greater than 0"),
    ("unknown choice", _set("sft.mode", "qlra"), "sft.mode", "'full', 'lora' or 'qlora'"),
    ("missing section", _drop("data"), "data", "required key is missing"),
    ("missing data file", _set("data.sources.0.path", "../../data/tiny/nope.json"), "data.sources[0].path", "no such local path"),
    ("missing deepspeed file", _set("sft.deepspeed", "../deepspeed/zero9.json"), "sft.deepspeed", "no such file"),
    ("dpo with nothing to start from", lambda r: (_set("sft.enabled", False)(r), _set("eval.after", ["dpo"])(r)), "dpo.init_from", "sft is disabled"),
    ("slerp of three models", _set("merge.models", SLERP_THREE), "merge.models.models", "exactly two models (got 3)"),
    ("sequence beyond context", _set("data.max_seq_len", 4096), "data.max_seq_len", "beyond the model's context of 2048"),
    ("unknown gguf type", _set("export.gguf_types", ["f16", "Q4_K_MM"]), "export.gguf_types[1]", "did you mean 'q4_k_m'"),
    ("qlora without GPUs", lambda r: (_pretrained(r), _set("sft.mode", "qlora")(r), _set("sft.precision", "bf16")(r)), "sft.mode", "qlora needs GPUs"),
    ("flex attention on CPU", _set("model.attn_implementation", "flex_attention"), "model.attn_implementation", "flex_attention has no backward pass on a CPU, where sft and dpo train (resources.gpus_per_node 0); use sdpa"),
    ("qlora in fp32", lambda r: (_pretrained(r), _set("sft.mode", "qlora")(r), _set("sft.resources.gpus_per_node", 1)(r)), "sft.precision", "qlora computes in bf16 or fp16"),
    ("lora on a model built from config", _set("sft.mode", "lora"), "sft.mode", "needs mode full"),
    ("lora settings on a full fine-tune", _set("sft.lora", {"r": 8}), "sft.lora", "only used when mode is lora"),
    ("duplicate source name", _add_source(name="openhermes", kind="openhermes", path="../../data/tiny/openhermes.json"), "data.sources", "used 2 times"),
    ("mode on a json_mode source", _set("data.sources.2.mode", "canonical"), "data.sources[2].mode", "only function_calling"),
    ("eval after a disabled stage", _set("dpo.enabled", False), "eval.after", "dpo is disabled"),
    ("gguf eval without export", lambda r: (_set("export.enabled", False)(r), _set("eval.backend", "llama_cpp")(r)), "eval.backend", "enable export"),
    ("bad slurm time", _set("sft.resources.time", "25 hours"), "sft.resources.time", "should match pattern"),
    ("random init without config", _drop("model.config"), "model", "needs model.config"),
    ("slerp t out of range", _set("merge.models", {**SLERP_THREE, "models": SLERP_THREE["models"][:2], "parameters": {"t": 1.5}}), "merge.models.parameters.t", "between 0 and 1"),
    ("images on a text source", _set("data.sources.0.image_root", "../../data"), "data.sources[0].image_root", "only llava sources"),
    ("dequantized merge without qlora", _set("merge.lora_base", "dequantized"), "merge.lora_base", "no stage uses mode qlora"),
    ("random init without tokenizer", _drop("tokenizer.name_or_path"), "tokenizer.name_or_path", "needs a tokenizer"),
    ("missing starting model", _set("dpo.init_from", "./no-such-model"), "dpo.init_from", "no such local path"),
    ("sft data fed to dpo", _set("data.sources.0.stage", "dpo"), "data.sources[0].stage", "has no rejected answers"),
    ("projector data", _set("data.sources.0.stage", "projector"), "data.sources[0].stage", "projector trains a Vision model's projector; add a vision section or remove this source"),
    ("vision eval without vision", _set("eval.suites", ["vision_function_calling"]), "eval.suites", "vision_function_calling evaluates a Vision model; this recipe has no vision section"),
    ("axolotl on CPU processes", lambda raw: (_set("sft.backend", "axolotl")(raw), _set("sft.resources.processes_per_node", 2)(raw)), "sft.resources", "axolotl trains in several processes only on GPUs, and this asks for 2 CPU processes; use one process on CPU, or backend trl"),
]  # fmt: skip


def _write(tmp_path: Path, raw: object) -> Path:
    """Write a recipe where tiny.yaml's relative paths still resolve (the repo's folders linked in)."""
    recipe_dir = tmp_path / "configs" / "recipes"
    recipe_dir.mkdir(parents=True, exist_ok=True)
    for linked in ("configs/models", "configs/deepspeed", "data", "hermes_pipeline"):
        target = tmp_path / linked
        if not target.exists():
            target.symlink_to(ROOT / linked)
    path = recipe_dir / "broken.yaml"
    if isinstance(raw, bytes):
        path.write_bytes(raw)
    else:
        path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


# What a Vision recipe cannot run yet, or runs only one way, each refused by its key in one line.
VISION_BROKEN = [
    ("chatml template", _set("tokenizer.template", "chatml"), "tokenizer.template", "Hermes 2 Vision speaks Vicuna v1"),
    ("packed image rows", _set("sft.packing", True), "sft.packing", "rows with images are not packed"),
    ("axolotl", _set("sft.backend", "axolotl"), "sft.backend", "the Vision stages train with trl"),
    ("gguf eval", _set("eval.backend", "llama_cpp"), "eval.backend", "a Vision model is evaluated in transformers, and in llama-server after export"),
    ("text eval suite", _set("eval.suites", ["json_mode"]), "eval.suites", "json_mode evaluates ChatML text models"),
    ("eval rows without images", _drop("eval.vision_image_root"), "eval.vision_function_calling_set", "and eval.vision_image_root"),
    ("no caption source", _set("data.sources.0.stage", "sft"), "vision.projector_pretrain", "no data source feeds it"),
    ("no visual instruction stage", lambda raw: (_set("sft.enabled", False)(raw), _set("eval.after", ["base"])(raw)), "sft.enabled", "a Vision recipe's second stage"),
]  # fmt: skip


CASES = [(TINY, *case) for case in BROKEN] + [(TINY_VISION, *case) for case in VISION_BROKEN]


@pytest.mark.parametrize(("base", "case", "mutate", "key", "words"), CASES, ids=[c[1] for c in CASES])
def test_broken_recipe_gives_one_line(
    base: Path,
    case: str,
    mutate: Callable[[dict], None],
    key: str,
    words: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    raw = yaml.safe_load(base.read_text())
    mutate(raw)
    path = _write(tmp_path, raw)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, f"expected one line, got:\n{err}"
    assert err.startswith(f"{path}: {key}: "), err
    assert words in err


def test_every_problem_gets_its_own_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = _tiny()
    raw["data"]["sources"].append(
        {"name": "pics", "kind": "llava", "path": "../../data/tiny/openhermes.json"}
    )
    raw["sft"]["learning_rate"] = 0
    path = _write(tmp_path, raw)
    assert main(["validate", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": ")[1] for line in lines] == ["sft.learning_rate"]
    raw["sft"]["learning_rate"] = 1e-3
    path = _write(tmp_path, raw)
    assert main(["validate", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    pics = len(raw["data"]["sources"]) - 1
    assert [line.split(": ")[1] for line in lines] == [
        f"data.sources[{pics}].image_root",
        f"data.sources[{pics}].kind",
    ]


def test_broken_cases_are_distinct() -> None:
    assert len({key + words for _, _, key, words in BROKEN}) == len(BROKEN) >= 15


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("name: x\nmodel: [unclosed\n", "invalid YAML"),
        ("name: a\nname: b\n", "key 'name' appears twice"),
        ("- just\n- a list\n", "a recipe is a YAML mapping"),
    ],
)
def test_unreadable_recipe_gives_one_line(
    text: str, words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, text)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err and err.startswith(str(path))


def test_invalid_deepspeed_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ds.json").write_text("{not json")
    raw = _tiny()
    raw["sft"]["deepspeed"] = str(tmp_path / "ds.json")
    path = _write(tmp_path, raw)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "sft.deepspeed:" in err and "not valid JSON" in err


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"[1, 2]", "has no zero_optimization.stage"),
        (b'{"zero_optimization": "3"}', "has no zero_optimization.stage"),
        (b'{"zero_optimization": {"stage": true}}', "has no zero_optimization.stage"),
        (b'{"zero_optimization": {"stage": 7}}', "DeepSpeed knows 0, 1, 2 and 3"),
        (b'{"zero_optimization": {"stage": 3, "offload_optimizer": "cpu"}}', "must be an object"),
        (b'{"zero_optimization": {"stage": 3, "offload_param": [1]}}', "must be an object"),
        (b"[" * 100_000 + b"]" * 100_000, "nests deeper than the JSON reader follows"),
        (b'{"a": "\xff\xfe"}', "is not UTF-8 text"),
        (b" " * (2 << 20), "a DeepSpeed config is a few kB of JSON"),
    ],
)
def test_hostile_deepspeed_config_is_one_line(
    content: bytes, words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ds.json").write_bytes(content)
    raw = _tiny()
    raw["sft"]["deepspeed"] = str(tmp_path / "ds.json")
    path = _write(tmp_path, raw)
    assert main(["validate", str(path)]) == 2
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "sft.deepspeed:" in err and words in err, err[-2000:]


def test_cli_exits_2_without_traceback(tmp_path: Path) -> None:
    raw = _tiny()
    raw["sft"]["learning_rate"] = -1
    path = _write(tmp_path, raw)
    result = subprocess.run(
        [sys.executable, "-m", "hermes_pipeline.cli", "validate", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"{path}: sft.learning_rate: must be greater than 0 (got -1)"
    assert "Traceback" not in result.stderr


_REFUSE_BEFORE_THE_STACK = """
import sys
from hermes_pipeline.cli import main

commands = [["prep"], ["train", "sft"], ["package"], ["card"], ["export", "gguf"], ["eval", "stage", "--after", "sft"],
            ["plan"], ["verify"], ["run"]]
codes = [main([*command, sys.argv[1]]) for command in commands]
print(codes, sorted(name for name in ("torch", "transformers", "datasets", "llama_cpp") if name in sys.modules))
"""


def test_every_stage_command_refuses_a_bad_recipe_before_loading_torch(tmp_path: Path) -> None:
    """A typo in a recipe is one line in a fraction of a second, not after seconds of imports."""
    raw = _tiny()
    raw["seed"] = True
    path = _write(tmp_path, raw)
    result = subprocess.run(
        [sys.executable, "-c", _REFUSE_BEFORE_THE_STACK, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == f"{[2] * 9} []", result.stdout + result.stderr[-2000:]


def test_missing_recipe_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "no/such/recipe.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "no/such/recipe.yaml: recipe file not found"


def test_override_changes_the_value_and_the_hash() -> None:
    base = load_recipe(RECIPES / "tiny.yaml")
    changed = load_recipe(RECIPES / "tiny.yaml", ["sft.learning_rate=1e-5", "data.sources[1].mode=canonical"])
    assert changed.sft.learning_rate == 1e-5
    assert changed.data.sources[1].mode == "canonical"
    assert recipe_hash(changed) != recipe_hash(base)
    assert recipe_hash(load_recipe(RECIPES / "tiny.yaml")) == recipe_hash(base)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("sft.learning_rate=-1", "sft.learning_rate: must be greater than 0 (got -1) (from --set)"),
        ("sft.nope=1", "sft.nope: unknown key"),
        ("sft.learning_rate", "--set sft.learning_rate: expected KEY=VALUE"),
        ("seed.x=1", "--set seed.x=1: seed is not a section"),
        ("export.gguf_types=[f16, q9]", "export.gguf_types[1]: 'q9' is not a llama.cpp GGUF type"),
    ],
)
def test_bad_override_gives_one_line(override: str, expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(RECIPES / "tiny.yaml", [override])
    assert len(info.value.lines) == 1
    assert expected in info.value.lines[0]


def _with_unset_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tiny.yaml with its first source read from ${HERMES_TEST_DATA}, which is not set."""
    monkeypatch.delenv("HERMES_TEST_DATA", raising=False)
    raw = _tiny()
    raw["data"]["sources"][0]["path"] = "${HERMES_TEST_DATA}/openhermes.json"
    raw["run_dir"] = str(tmp_path / "run")
    return _write(tmp_path, raw)


def test_unset_variable_in_a_data_path_is_a_note_until_prep_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The variable may be set where prep runs (a cluster job), so validate and plan only note it."""
    path = _with_unset_data_folder(tmp_path, monkeypatch)
    line = f"{path}: data.sources[0].path: ${{HERMES_TEST_DATA}} is not set; needed when prep runs"
    for command in ("validate", "plan"):
        assert main([command, str(path)]) == 0
        assert capsys.readouterr().err == f"note: {line}\n"
    assert main(["validate", "--strict", str(path)]) == 2
    assert capsys.readouterr().err == f"{line}\n"
    monkeypatch.setenv("HERMES_TEST_DATA", str(ROOT / "data" / "tiny"))
    assert load_recipe(path).data.sources[0].path == str(ROOT / "data" / "tiny" / "openhermes.json")
    assert capsys.readouterr().err == ""


def test_prep_refuses_a_data_path_whose_variable_is_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hermes_pipeline.data_prep.pipeline import run_prep

    recipe = load_recipe(_with_unset_data_folder(tmp_path, monkeypatch))
    with pytest.raises(RecipeError) as info:
        run_prep(recipe, log=lambda _: None)
    assert info.value.lines == [
        "data.sources[0].path: ${HERMES_TEST_DATA} is not set; export it before prep runs"
    ]
    assert not (tmp_path / "run").exists()


def test_unset_variable_outside_the_data_paths_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No stage checks these when it runs: a DeepSpeed config or a run directory must be known now."""
    monkeypatch.delenv("HERMES_TEST_DS", raising=False)
    with pytest.raises(RecipeError) as info:
        load_recipe(RECIPES / "tiny.yaml", ["sft.deepspeed=${HERMES_TEST_DS}/zero3.json"])
    assert info.value.lines == [
        f"{RECIPES / 'tiny.yaml'}: sft.deepspeed: environment variable HERMES_TEST_DS is not set; "
        "export it or write ${HERMES_TEST_DS:-default} (from --set)"
    ]


def test_relative_paths_resolve_against_the_recipe_folder() -> None:
    recipe = load_recipe(RECIPES / "tiny.yaml")
    assert recipe.data.sources[0].path == str(ROOT / "data" / "tiny" / "openhermes.json")
    assert recipe.model.config == str(ROOT / "configs" / "models" / "tiny-mistral.json")


def test_hub_ids_stay_hub_ids() -> None:
    recipe = load_recipe(RECIPES / "hermes-2-pro-mistral-7b.yaml")
    assert recipe.model.name_or_path == "mistralai/Mistral-7B-v0.1"
    assert recipe.data.sources[1].path == "NousResearch/hermes-function-calling-v1"


TINY_TEXT = TINY.read_text()


def _tiny_with(old: str, new: str) -> str:
    assert old in TINY_TEXT, old
    return TINY_TEXT.replace(old, new, 1)


def _alias_bomb(levels: int) -> str:
    """Billion laughs: each level lists the one before ten times, so nine levels stand for 10**9 values."""
    lines = ["bomb:", "  l0: &l0 [" + ", ".join(["lol"] * 10) + "]"]
    lines += [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return TINY_TEXT + "\n".join(lines) + "\n"


# (id, recipe file contents, words in the one line it ends in)
HOSTILE: list[tuple[str, str | bytes, str]] = [
    ("binary", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "binary, not a YAML recipe (a NUL byte at byte offset 8)"),
    ("not UTF-8", _tiny_with("Tiny end", "Tiny \xe9nd").encode("latin-1"), "not UTF-8 text (byte 0xe9 at byte offset"),
    ("control character", _tiny_with("seed: 0", "seed: \x04"), "invalid YAML: character U+0004: control characters are not allowed"),
    ("larger than a recipe", TINY_TEXT + "#" * 300_000 + "\n", "larger than 256 KiB; a recipe is a short YAML file"),
    ("nested thousands deep", "x: " + "[" * 5000 + "]" * 5000 + "\n" + TINY_TEXT, "nest"),
    ("nested past the limit", TINY_TEXT + "x: " + "[" * 40 + "]" * 40 + "\n", "nested more than 32 levels deep"),
    ("alias bomb", _alias_bomb(9), "more than 10000 keys and values, counting what aliases stand for"),
    ("alias inside itself", TINY_TEXT + "x: &x [*x]\n", "nested more than 32 levels deep"),
    ("5000-digit integer", _tiny_with("seed: 0", "seed: " + "7" * 5000), "integer of 5000 characters is out of range"),
    ("integer beyond 64 bits", _tiny_with("seed: 0", f"seed: {2**64}"), "integer of 20 characters is out of range"),
    ("unknown tag", _tiny_with("seed: 0", "seed: !!python/object/apply:os.system [ls]"), "unknown tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("impossible date", _tiny_with("seed: 0", "seed: 2024-13-45"), "invalid YAML: month must be in 1..12"),
    ("list as a key", TINY_TEXT + "? [a, b]\n: 1\n", "a list or mapping cannot be a key"),
    ("zero-width space in a key", _tiny_with("seed: 0", "se\u200bed: 0"), "'se\\u200bed': unknown key; did you mean 'seed'?"),
    ("boolean for an integer", _tiny_with("micro_batch_size: 1", "micro_batch_size: true"), "sft.micro_batch_size: expected a valid integer (got True)"),
    ("boolean for a number", _tiny_with("num_epochs: 3", "num_epochs: yes"), "sft.num_epochs: expected a valid number (got True)"),
    ("not a number", _tiny_with("learning_rate: 2e-3", "learning_rate: .nan"), "sft.learning_rate: must be a finite number (got nan)"),
    ("a 200 KB value", _tiny_with("name: tiny", "name: " + "x/" * 100_000), f"(got {'x/' * 40!r}... (200000 chars))"),
]  # fmt: skip


# What counts as a hang (an alias bomb ran for minutes), not a speed check: on an idle machine each of these
# answers in 0.2 to 0.7 s, but a test suite on busy cores must not fail on time alone.
HANG_S = 10


@pytest.mark.parametrize(("case", "contents", "words"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_recipe_ends_in_one_line_without_hanging(
    case: str,
    contents: str | bytes,
    words: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _write(tmp_path, contents)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    started = time.perf_counter()
    assert main(["validate", str(path)]) == 2
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(str(path)) and words in err, err[:500]
    assert len(err) < 400
    assert elapsed < HANG_S
    assert list(work.iterdir()) == []


def test_at_most_20_problems_then_a_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, TINY_TEXT + "".join(f"junk{i}: 1\n" for i in range(1000)))
    assert main(["validate", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[1] for line in lines[:20]] == [f"junk{i}" for i in range(20)]
    assert lines[20:] == [f"{path}: ... and 980 more problems"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("..=1", "--set ..=1: expected KEY=VALUE"),
        ("data.sources.²=1", "--set data.sources.²=1: cannot set '²' here"),
        ("seed=" + "9" * 5000, f"--set seed={'9' * 75}... (5005 chars):1:1: invalid YAML: integer of 5000 characters"),
        ("name=" + "x" * 100_000, f"name: not a folder name; use letters, digits, '_', '.' and '-', starting with a letter, digit or '_', at most 100 characters (got {'x' * 80!r}... (100000 chars)) (from --set)"),
    ],
    ids=["no key", "not an index", "huge integer", "huge value"],
)  # fmt: skip
def test_hostile_override_gives_one_short_line(override: str, expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(RECIPES / "tiny.yaml", [override])
    assert len(info.value.lines) == 1 and len(info.value.lines[0]) < 400
    assert expected in info.value.lines[0]


def _sections(model: type[BaseModel] = Recipe) -> set[type[BaseModel]]:
    """Every section model reachable from ``model``, itself included."""
    found = {model}
    for field in model.model_fields.values():
        for arg in [field.annotation, *typing.get_args(field.annotation)]:
            for inner in [arg, *typing.get_args(arg)]:
                if isinstance(inner, type) and issubclass(inner, BaseModel) and inner not in found:
                    found |= _sections(inner)
    return found


def _accepts_true(annotation: object) -> bool:
    try:
        TypeAdapter(annotation).validate_python(True)
    except ValidationError:
        return False
    return True


def test_yaml_true_is_never_read_as_a_number() -> None:
    """YAML reads true, yes and on as booleans, and pydantic would take one for 1 in an integer or a float."""
    accepted = [
        f"{model.__name__}.{name}"
        for model in _sections()
        for name, field in model.model_fields.items()
        if field.annotation is not bool and _accepts_true(field.rebuild_annotation())
    ]
    assert len(_sections()) > 15 and accepted == []


@pytest.mark.parametrize("name", ["..", ".", "a/b", ".hidden", "-x", "x" * 101, "tiny\n"])
def test_run_name_is_one_folder_name(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """runs/<name> is the default run directory: `..` would put every stage's output in the working folder."""
    raw = _tiny()
    raw["name"] = name
    path = _write(tmp_path, raw)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["prep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{path}: name: not a folder name; ") and err.count("\n") == 1
    assert list(work.iterdir()) == []


def test_run_names_people_use_are_kept() -> None:
    for name in ("tiny", "Hermes-2-Pro_Mistral-7B.v2", "été", "x" * 100):
        assert load_recipe(TINY, [f"name={name}"]).name == name


def _in_a_work_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder holding a link to /usr, with $HOME in tmp_path."""
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    (work / "usr-link").symlink_to("/usr")
    return work


@pytest.mark.parametrize(
    "run_dir",
    ["/", "/etc/../etc", "/usr/lib/hermes", "/proc/self/run", "/dev", "${HOME}", "${HOME}/", "~", "~/", "../" * 40, "usr-link/run", "/tmp"],
)  # fmt: skip
def test_run_dir_cannot_be_a_system_folder(
    run_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every stage replaces its subfolder of the run directory (prep/, sft/, merge/) whole."""
    work = _in_a_work_folder(tmp_path, monkeypatch)
    raw = _tiny()
    raw["run_dir"] = run_dir
    path = _write(tmp_path, raw)
    assert main(["prep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{path}: run_dir: resolves to ") and err.count("\n") == 1
    assert "a system or shared folder; use a folder of your own" in err
    assert [p.name for p in work.iterdir()] == ["usr-link"]


@pytest.mark.parametrize(
    "run_dir",
    ["runs/x", "../elsewhere/run", "${HOME}/runs/x", "~/runs/x", "TMP/scratch/me/run", "/tmp/hermes-run", "/dev/shm/hermes-run", "/var/tmp/me/run"],
)  # fmt: skip
def test_run_dir_may_be_any_folder_of_ones_own(
    run_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cluster users point run_dir at shared scratch, node-local scratch or a path relative to the job's folder."""
    _in_a_work_folder(tmp_path, monkeypatch)
    run_dir = run_dir.replace("TMP", str(tmp_path))
    assert load_recipe(TINY, [f"run_dir={run_dir}"]).run_dir == os.path.expanduser(
        os.path.expandvars(run_dir)
    )


_VALUE_LINE = re.compile(r"^( *)(\w+): (\S.*)$", re.MULTILINE)
_ODD_VALUES = [
    "true", "no", "~", "[]", "{}", "[1, 2]", "-1", "0", "1.5", "9" * 25, "9" * 5000, "0x" + "f" * 40, ".inf",
    ".nan", "2024-13-45", "!!python/name:os.system", "'" + "z" * 5000 + "'", "*nope", "&a [*a]",
    "[" * 40 + "]" * 40, "'\u200b'", "..", "/", "/etc", "${HERMES_TEST_UNSET}", "{a: &b [*b]}",
]  # fmt: skip
_ODD_CHARACTERS = ["\u200b", "\u00a0", "\u0430", "\u202e", "\ufeff", "\U0001f600", ".", " ", "[0]", "²", "\x1b"]  # fmt: skip
_ODD_OVERRIDES = [
    "..=1", "a.²=1", "seed=" + "9" * 5000, "name=" + "x" * 100_000, "sft=[", "data.sources.9.path=x", "=1",
    "sft.learning_rate", "data.sources[0]=&a [*a]", "eval.after=[\u200b]",
]  # fmt: skip


def _mutant(rng: random.Random) -> tuple[bytes, list[str]]:
    """tiny.yaml broken one random way, with an odd --set now and then."""
    lines = list(_VALUE_LINE.finditer(TINY_TEXT))
    line = rng.choice(lines)
    indent, key, _ = line.groups()
    at = rng.randrange(len(TINY_TEXT))
    i = rng.randrange(len(key) + 1)
    text = rng.choice(
        [
            lambda: TINY_TEXT.replace(line.group(0), f"{indent}{key}: {rng.choice(_ODD_VALUES)}", 1),
            lambda: TINY_TEXT.replace(
                line.group(0), f"{indent}{key[:i]}{rng.choice(_ODD_CHARACTERS)}{key[i:]}: 1", 1
            ),
            lambda: TINY_TEXT[:at],
            lambda: _alias_bomb(rng.randint(2, 9)),
            lambda: "x: " + "[" * rng.choice([33, 900, 1001, 5000]) + "]" * 5000 + "\n" + TINY_TEXT,
            lambda: TINY_TEXT + "".join(f"junk{n}: 1\n" for n in range(rng.choice([3, 30, 3000]))),
        ]
    )()
    data = text.encode()
    if rng.random() < 0.15:
        data = data[:at] + rng.randbytes(rng.randint(1, 8)) + data[at:]
    return data, [rng.choice(_ODD_OVERRIDES)] if rng.random() < 0.15 else []


def _load(path: Path, overrides: list[str]) -> tuple[list[str], float]:
    """The problem lines (none when valid) and the seconds it took."""
    started = time.perf_counter()
    try:
        load_recipe(path, overrides)
        lines = []
    except RecipeError as exc:
        lines = exc.lines
    return lines, time.perf_counter() - started


def test_hundreds_of_hostile_recipes_end_in_a_few_short_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random ways to break tiny.yaml: each is valid or refused in at most 21 short lines, without hanging,
    writing nothing; a few are run through the command line too, where no traceback may show."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    load_recipe(TINY)  # the first valid recipe loads torch for the model config
    rng = random.Random(7)
    refused = []
    for _ in range(300):
        data, overrides = _mutant(rng)
        path = _write(tmp_path, data)
        lines, seconds = _load(path, overrides)
        assert len(lines) <= 21 and all(len(line) < 700 and "\n" not in line for line in lines), lines
        assert seconds < HANG_S, (seconds, data[:200], overrides)
        if lines and not overrides:
            refused.append(data)
    assert 150 < len(refused) < 300 and list(work.iterdir()) == []
    for data in refused[:: len(refused) // 5][:5]:
        path = _write(tmp_path, data)
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "hermes_pipeline.cli", "validate", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert time.perf_counter() - started < HANG_S
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert 1 <= len(result.stderr.splitlines()) <= 21 and list(work.iterdir()) == []
