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
# Shipped for the issue that builds its stages; refused until then.
VISION = RECIPES / "nous-hermes-2-vision-mistral-7b.yaml"
TEXT_RECIPES = ["hermes-2-pro-mistral-7b", "nous-hermes-2-mistral-7b-dpo", "hermes-2-theta-llama-3-8b"]
HERMES_RECIPES = [*TEXT_RECIPES, VISION.stem]
TINY = RECIPES / "tiny.yaml"
VISION_REFUSAL = [
    f"{VISION}: vision: the Vision stages (projector pre-training, visual instruction tuning) are not built "
    "yet; remove the vision section to train text only",
    *(
        f"{VISION}: data.sources[{i}].kind: llava feeds the Vision stages, which are not built yet; "
        "remove this source to train text only"
        for i in range(3)
    ),
]


@pytest.mark.parametrize("name", [*TEXT_RECIPES, "tiny"])
def test_shipped_recipes_validate_on_a_fresh_machine(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("HERMES_IMAGE_ROOT", raising=False)
    assert main(["validate", "--strict", str(RECIPES / f"{name}.yaml")]) == 0
    out, err = capsys.readouterr()
    assert "valid" in out and err == ""


def test_vision_recipe_is_refused_until_its_stages_exist(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused whether or not its image folders are set: `run` would otherwise train text-only SFT on rows
    holding a literal <image>."""
    monkeypatch.delenv("HERMES_IMAGE_ROOT", raising=False)
    assert main(["validate", str(VISION)]) == 2
    assert capsys.readouterr().err.splitlines() == VISION_REFUSAL


@pytest.mark.parametrize(
    ("command", "recipe", "refusal"),
    [
        (["plan"], VISION, VISION_REFUSAL[0]),
        (["prep"], VISION, VISION_REFUSAL[0]),
        (["run"], VISION, VISION_REFUSAL[0]),
        (["slurm", "submit", "--dry-run"], VISION, VISION_REFUSAL[0]),
        (["train", "sft", "--set", "sft.backend=axolotl"], TINY, f"{TINY}: sft.backend: axolotl is not built yet; use trl (from --set)"),
        (["slurm", "submit", "--dry-run", "--set", "dpo.backend=axolotl"], TINY, f"{TINY}: dpo.backend: axolotl is not built yet; use trl (from --set)"),
    ],
    ids=["plan", "prep", "run", "slurm-submit", "train-axolotl", "slurm-submit-axolotl"],
)  # fmt: skip
def test_every_entry_point_refuses_what_is_not_built(
    command: list[str],
    recipe: Path,
    refusal: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each command loads the recipe through the same checks, before any stage, script or job exists."""
    monkeypatch.delenv("HERMES_IMAGE_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    at = 2 if command[0] in ("slurm", "train") else 1
    assert main([*command[:at], str(recipe), *command[at:]]) == 2
    assert capsys.readouterr().err.splitlines()[0] == refusal
    assert list(tmp_path.iterdir()) == []


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
    ("vision section", _set("vision", {"tower": "google/siglip-so400m-patch14-384", "projector_pretrain": {}}), "vision", "the Vision stages (projector pre-training, visual instruction tuning) are not built yet; remove the vision section to train text only"),
    ("projector data", _set("data.sources.0.stage", "projector"), "data.sources[0].stage", "projector feeds the Vision stages, which are not built yet; remove this source to train text only"),
    ("axolotl sft", _set("sft.backend", "axolotl"), "sft.backend", "axolotl is not built yet; use trl"),
    ("axolotl dpo", _set("dpo.backend", "axolotl"), "dpo.backend", "axolotl is not built yet; use trl"),
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
