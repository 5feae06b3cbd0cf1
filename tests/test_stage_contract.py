"""The stage contract: fingerprints derived from what each stage kind declares it reads.

Every leaf key of the recipe schema is changed in turn; exactly the stage kinds that read it must get a new
fingerprint, and a key that no stage reads (other than the card, which shows the whole recipe) must be one
of the few that decide which stages exist or where they run. A new schema key that no stage declares fails
here until a declaration says who reads it.
"""

from __future__ import annotations

import ast
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from train_support import ROOT

from hermes_pipeline.recipe.loader import load_recipe
from hermes_pipeline.recipe.schema import Recipe
from hermes_pipeline.stages import LOCATION, NOT_OUTPUT, STAGE_KINDS, fingerprint_of, recipe_stages

TINY = ROOT / "configs" / "recipes" / "tiny.yaml"
# Keys no stage computes with: which stages a recipe has, what the card says, where metrics go and where
# the cluster settings are.
STRUCTURE = {
    "merge.enabled", "export.enabled", "eval.after", "description", "package.license",
    "tracking.wandb_project", "tracking.wandb_run_name", "tracking.mode", "cluster.site_config",
}  # fmt: skip
# The Vision recipe is refused by validate until its stages exist.
NOT_BUILT = ("vision",)


def _leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every leaf key of the schema: sub-sections are walked (optional ones too), lists and dicts are leaves."""
    found = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        sections = [t for t in _types(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        found += _leaves(sections[0], f"{path}.") if sections else [path]
    return found


def _types(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _types(arg)]
    if typing.get_origin(annotation) is typing.Annotated:
        return _types(typing.get_args(annotation)[0])
    return [annotation]


def _with(dumped: dict[str, Any], key: str, changed: bool) -> dict[str, Any]:
    """A copy of ``dumped`` where ``key`` exists (absent sections created), its value changed or not."""
    copy = _deep_copy(dumped)
    node = copy
    *parents, last = key.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = ["a changed value", node.get(last)] if changed else node.get(last)
    return copy


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    return list(value) if isinstance(value, list) else value


def _readers(key: str) -> set[str]:
    """The stage kinds whose declarations cover ``key`` (a section name covers its keys)."""
    if NOT_OUTPUT & set(key.split(".")):
        return set()
    return {
        kind.name
        for kind in STAGE_KINDS.values()
        if any(read == "" or key == read or key.startswith(read + ".") for read in kind.reads)
    }


LEAVES = _leaves(Recipe)


@pytest.fixture(scope="module")
def dumped() -> dict[str, Any]:
    return load_recipe(TINY).model_dump(mode="json")


@pytest.mark.parametrize("key", LEAVES)
def test_changing_a_key_changes_exactly_its_readers_fingerprints(dumped: dict[str, Any], key: str) -> None:
    before = {kind: fingerprint_of(_with(dumped, key, changed=False), kind) for kind in STAGE_KINDS}
    after = {kind: fingerprint_of(_with(dumped, key, changed=True), kind) for kind in STAGE_KINDS}
    assert {kind for kind in STAGE_KINDS if before[kind] != after[kind]} == _readers(key)


def test_every_key_is_read_by_a_stage_or_says_why_not() -> None:
    unread = [
        key
        for key in LEAVES
        if _readers(key) <= {"card"}
        and not NOT_OUTPUT & set(key.split("."))
        and key not in STRUCTURE | LOCATION
        and not key.startswith(NOT_BUILT)
    ]
    assert unread == []


def _rerun(dumped: dict[str, Any], key: str) -> set[str]:
    """The stages of the tiny run that a change of ``key`` re-runs: those whose fingerprint changes, and
    every stage that reads their outputs."""
    recipe = load_recipe(TINY)
    stages = recipe_stages(recipe, str(TINY))
    before, after = _with(dumped, key, changed=False), _with(dumped, key, changed=True)
    rerun = {s.name for s in stages if fingerprint_of(before, s.kind) != fingerprint_of(after, s.kind)}
    for stage in stages:  # in run order, so upstream re-runs are known first
        if rerun & set(stage.needs):
            rerun.add(stage.name)
    return rerun


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("eval.batch_size", {"eval_base", "eval_sft", "eval_dpo", "card"}),
        ("merge.lora_base", {"package", "export", "card"}),
        ("sft.learning_rate", {"sft", "eval_sft", "dpo", "eval_dpo", "package", "export", "card"}),
        ("package.temperature", {"package", "export", "card"}),
        ("export.gguf_types", {"export", "card"}),
        ("description", {"card"}),
        ("sft.resources.time", set()),
        ("dpo.resources.nodes", set()),
    ],
)
def test_what_a_change_re_runs(dumped: dict[str, Any], key: str, expected: set[str]) -> None:
    assert _rerun(dumped, key) == expected


STAGE_PACKAGES = ("data_prep", "train", "merge", "evals", "slurm")


@pytest.mark.parametrize("package", STAGE_PACKAGES)
def test_a_stage_package_imports_the_core_never_another_stage(package: str) -> None:
    """What two stages share lives in the core (hermes_pipeline), so stages stay independent."""
    others = {f"hermes_pipeline.{other}" for other in STAGE_PACKAGES if other != package}
    found = []
    for path in sorted((ROOT / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [module or ""]
            found += [f"{path.name}: {name}" for name in names if any(name.startswith(o) for o in others)]
    assert found == []


def _attributes_read(files: list[Path]) -> set[str]:
    """Every attribute name the code in ``files`` reads (``x.name``), from its syntax tree."""
    return {
        node.attr
        for path in files
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute)
    }


def test_every_key_is_read_by_some_code_outside_the_recipe_package() -> None:
    """A key the schema accepts and no code reads is an option silently ignored (``data.dedup: false``
    deduplicated all the same). The recipe package itself (schema, checks) does not count: validating a
    key is not acting on it. Keys are matched by their last name, so this catches a key nothing reads at
    all; which stage reads it is the fingerprint tests' business."""
    recipe_package = ROOT / "hermes_pipeline" / "recipe"
    files = [
        path
        for folder in ("hermes_pipeline", *STAGE_PACKAGES)
        for path in (ROOT / folder).rglob("*.py")
        if recipe_package not in path.parents
    ]
    read = _attributes_read(files)
    unread = [key for key in LEAVES if key.rsplit(".", 1)[-1] not in read and not key.startswith(NOT_BUILT)]
    assert unread == []
