"""Recipe validation: shipped recipes pass, broken ones fail with one line naming the key, exit code 2."""

import copy
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from hermes_pipeline.cli import main
from hermes_pipeline.errors import RecipeError
from hermes_pipeline.recipe.loader import load_recipe, recipe_hash

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "recipes"
HERMES_RECIPES = [
    "hermes-2-pro-mistral-7b",
    "nous-hermes-2-mistral-7b-dpo",
    "hermes-2-theta-llama-3-8b",
    "nous-hermes-2-vision-mistral-7b",
]


@pytest.fixture
def image_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("llava_pretrain", "lvis", "sharegpt4v"):
        (tmp_path / "images" / name).mkdir(parents=True)
    monkeypatch.setenv("HERMES_IMAGE_ROOT", str(tmp_path / "images"))
    return tmp_path / "images"


@pytest.mark.parametrize("name", [*HERMES_RECIPES, "tiny"])
def test_shipped_recipes_validate(name: str, image_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(RECIPES / f"{name}.yaml")]) == 0
    assert "valid" in capsys.readouterr().out


def test_every_shipped_recipe_is_tested() -> None:
    assert {p.stem for p in RECIPES.glob("*.yaml")} == {*HERMES_RECIPES, "tiny"}


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
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(("case", "mutate", "key", "words"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_recipe_gives_one_line(
    case: str,
    mutate: Callable[[dict], None],
    key: str,
    words: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    raw = copy.deepcopy(_tiny())
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
    assert [line.split(": ")[1] for line in lines] == [f"data.sources[{pics}].image_root", "vision"]


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


def test_recipe_env_variable_must_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HERMES_IMAGE_ROOT", raising=False)
    with pytest.raises(RecipeError) as info:
        load_recipe(RECIPES / "nous-hermes-2-vision-mistral-7b.yaml")
    assert (
        "data.sources[0].image_root: environment variable HERMES_IMAGE_ROOT is not set" in info.value.lines[0]
    )


def test_relative_paths_resolve_against_the_recipe_folder() -> None:
    recipe = load_recipe(RECIPES / "tiny.yaml")
    assert recipe.data.sources[0].path == str(ROOT / "data" / "tiny" / "openhermes.json")
    assert recipe.model.config == str(ROOT / "configs" / "models" / "tiny-mistral.json")


def test_hub_ids_stay_hub_ids(image_root: Path) -> None:
    recipe = load_recipe(RECIPES / "hermes-2-pro-mistral-7b.yaml")
    assert recipe.model.name_or_path == "mistralai/Mistral-7B-v0.1"
    assert recipe.data.sources[1].path == "NousResearch/hermes-function-calling-v1"
