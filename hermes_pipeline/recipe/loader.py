"""Load a recipe YAML, apply ``--set`` overrides, validate it, and report every problem as one line.

The line format is ``FILE: key.path: what is wrong; what is allowed``, so a user can fix a recipe from the
message alone. Internal bugs still raise normally; only user mistakes become RecipeError.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from hermes_pipeline.errors import RecipeError
from hermes_pipeline.recipe.checks import check_recipe
from hermes_pipeline.recipe.schema import Recipe

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}")
# The data source paths prep reads when it runs: the one place a variable may still be unset at load time.
_PREP_PATH = re.compile(r"data\.sources\[\d+\]\.(path|image_root)")
# YAML 1.1 reads 1e-5 as a string; recipes are full of learning rates written that way.
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$")


class _RecipeYamlLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last) and reads 1e-5 as a float."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_RecipeYamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_RecipeYamlLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise RecipeError([f"{where}: invalid YAML: {exc.problem or exc.context}"]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([f"{source}: invalid YAML: {exc}"]) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None, strict: bool = False) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError listing every problem found.

    A data source path naming an unset variable is printed as a note on stderr, or is a problem when
    ``strict``: the variable may be set where prep runs (a cluster job), and prep refuses to start without it.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"{path}: recipe file not found"])
    raw = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(raw, dict):
        raise RecipeError([f"{path}: a recipe is a YAML mapping of sections (name, model, data, sft, ...)"])
    overridden = apply_overrides(raw, overrides or [], str(path))
    raw, unset = _expand(raw)
    prep_paths = {key for key, _ in unset if _PREP_PATH.fullmatch(key)}
    needed_now = [(key, name) for key, name in unset if key not in prep_paths]
    if needed_now:
        raise RecipeError([_line(str(path), key, _not_set(name), overridden) for key, name in needed_now])
    # A prep path keeps its ${VAR} text, which no path check can pass: it is validated as the recipe file
    # (which exists) and then set back.
    kept = _stand_in_for_prep_paths(raw, prep_paths, str(path.resolve()))
    try:
        recipe = Recipe.model_validate(raw, context={"base_dir": path.resolve().parent})
    except ValidationError as exc:
        raise RecipeError(format_validation_errors(exc, str(path), overridden)) from None
    recipe = _set_prep_paths(recipe, kept)
    problems = [_line(str(path), key, message, overridden) for key, message in check_recipe(recipe)]
    notes = [
        _line(str(path), key, f"${{{name}}} is not set; needed when prep runs", overridden)
        for key, name in _unset_prep_paths(recipe)
    ]
    if strict:
        problems += notes
    if problems:
        raise RecipeError(problems)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return recipe


def check_prep_paths(recipe: Recipe) -> None:
    """Prep's own check, before it reads anything: every data source path is known by now."""
    unset = _unset_prep_paths(recipe)
    if unset:
        raise RecipeError(
            [f"{key}: ${{{name}}} is not set; export it before prep runs" for key, name in unset]
        )


def _unset_prep_paths(recipe: Recipe) -> list[tuple[str, str]]:
    """``(key, variable)`` for each ``${VAR}`` left in a data source path: unset when the recipe was loaded."""
    return [
        (f"data.sources[{i}].{field}", match.group(1))
        for i, source in enumerate(recipe.data.sources)
        for field in ("path", "image_root")
        for match in _ENV.finditer(getattr(source, field) or "")
    ]


def _stand_in_for_prep_paths(
    raw: dict[str, Any], keys: set[str], stand_in: str
) -> dict[tuple[int, str], str]:
    """Put ``stand_in`` at each data source path among ``keys``; return the text each held, by (index, field)."""
    kept: dict[tuple[int, str], str] = {}
    for key in keys:
        index, field = _split(key)[2:]  # data.sources[INDEX].FIELD
        source = raw["data"]["sources"][int(index)]
        kept[int(index), field] = source[field]
        source[field] = stand_in
    return kept


def _set_prep_paths(recipe: Recipe, texts: dict[tuple[int, str], str]) -> Recipe:
    sources = list(recipe.data.sources)
    for (index, field), text in texts.items():
        sources[index] = sources[index].model_copy(update={field: text})
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"sources": sources})})


def expand_env(raw: Any, source: str) -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in string values: site paths (image folders, scratch)
    differ per cluster, so a shipped recipe names a variable instead of a path. Every variable must be set."""
    expanded, unset = _expand(raw)
    if unset:
        raise RecipeError([f"{source}: {key}: {_not_set(name)}" for key, name in unset])
    return expanded


def _expand(raw: Any) -> tuple[Any, list[tuple[str, str]]]:
    """``raw`` with its variables expanded, and ``(key, variable)`` for each unset one, left as written."""
    unset: list[tuple[str, str]] = []

    def expand(node: Any, key: str) -> Any:
        if isinstance(node, dict):
            return {k: expand(v, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [expand(v, f"{key}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, str):
            return _ENV.sub(lambda m: _lookup(m, key, unset), node)
        return node

    return expand(raw, ""), unset


def _lookup(match: re.Match[str], key: str, unset: list[tuple[str, str]]) -> str:
    name, default = match.group(1), match.group(3)
    value = os.environ.get(name) or default
    if value is None:
        unset.append((key, name))
        return match.group(0)
    return value


def _not_set(name: str) -> str:
    return f"environment variable {name} is not set; export it or write ${{{name}:-default}}"


def _split(key: str) -> list[str]:
    return [p for p in re.split(r"\.|\[(\d+)\]", key) if p]


def recipe_hash(recipe: Recipe) -> str:
    """A short, stable hash of the resolved recipe: stages compare it to decide what must re-run."""
    canonical = json.dumps(recipe.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> set[str]:
    """Apply ``key.path=value`` overrides in place; values are YAML scalars or flow collections.

    Returns the overridden key paths so that errors can say the bad value came from ``--set``.
    """
    done = set()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError([f"--set {item}: expected KEY=VALUE, e.g. --set sft.learning_rate=1e-5"])
        parts = _split(key.strip())
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, item, ".".join(parts[: depth + 1]))
        _assign(node, parts[-1], parse_yaml(text, f"--set {item}"), item)
        done.add(_dotted(parts))
    return done


def _child(node: Any, part: str, item: str, where: str) -> Any:
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        child = node[int(part)]
    elif isinstance(node, dict):
        child = node.setdefault(part, {})
    else:
        child = None
    if not isinstance(child, (dict, list)):
        raise RecipeError([f"--set {item}: {where} is not a section or list that can hold keys"])
    return child


def _assign(node: Any, part: str, value: Any, item: str) -> None:
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        node[int(part)] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise RecipeError([f"--set {item}: cannot set {part} here"])


def _dotted(parts: typing.Sequence[str | int]) -> str:
    out = ""
    for part in parts:
        out += (
            f"[{part}]"
            if isinstance(part, int) or str(part).isdigit()
            else (f".{part}" if out else str(part))
        )
    return out


def _line(source: str, key: str, message: str, overridden: set[str]) -> str:
    origin = " (from --set)" if any(key == o or key.startswith(o + ".") for o in overridden) else ""
    return f"{source}: {key}: {message}{origin}" if key else f"{source}: {message}{origin}"


def format_validation_errors(
    exc: ValidationError, source: str, overridden: set[str], root: type[BaseModel] = Recipe
) -> list[str]:
    """One line per invalid key; ``root`` is the model that was validated (a recipe, a site config)."""
    lines: dict[str, str] = {}
    for error in exc.errors(include_url=False):
        # Union branches add tags such as "literal['all-linear']" to the location; the user never wrote them.
        loc = [part for part in error["loc"] if isinstance(part, int) or re.fullmatch(r"\w+", part)]
        key = _dotted(loc)
        lines.setdefault(key, _line(source, key, _describe(error, loc, root), overridden))
    return list(lines.values())


def _describe(error: dict[str, Any], loc: list[str | int], root: type[BaseModel]) -> str:
    kind, ctx, got = error["type"], error.get("ctx", {}), error.get("input")
    if kind == "extra_forbidden":
        allowed = sorted(_fields_at(loc[:-1], root))
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown key; {hint}allowed keys: {', '.join(allowed)}"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"{got!r} is not allowed; use one of: {ctx['expected']}"
    message = error["msg"].removeprefix("Value error, ")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        message = message.replace("Input should be", "must be")
    elif kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{message.replace('Input should be', 'expected')} (got {got!r})"
    if isinstance(got, (str, int, float, bool)) and not isinstance(got, dict):
        return f"{message} (got {got!r})"
    return message


def _fields_at(loc: list[str | int], root: type[BaseModel]) -> set[str]:
    """The keys allowed at a location, found by walking the schema along it."""
    model = root
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        model = _model_in(annotation) or model
    return set(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found:
            return found
    return None
