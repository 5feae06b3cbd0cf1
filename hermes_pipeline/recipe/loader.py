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
from hermes_pipeline.recipe.limits import INT_BITS, MAX_BYTES, MAX_DEPTH, MAX_VALUES, capped, cut, shown
from hermes_pipeline.recipe.schema import Recipe

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}")
# YAML 1.1 reads 1e-5 as a string; recipes are full of learning rates written that way.
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$")
# Keys shown as written in an error; any other key is shown quoted and escaped, so a user sees the invisible
# or look-alike character that makes it unknown.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")
# Locations pydantic adds for the branches of a union (list[str], literal['all-linear']) and for dict keys
# ([key]); the user never wrote them.
_SCHEMA_TAG = re.compile(r"[a-z-]*\[.*\]")
_PREP_FIELDS = ("path", "image_root")


class _RecipeYamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """SafeLoader (on libyaml when PyYAML has it: fast, and nesting capped at 1000 levels) that rejects
    duplicate keys (PyYAML silently keeps the last), reads 1e-5 as a float, and refuses what would make the
    steps after it hang or crash: a document too deep or too large once its aliases expand, an integer beyond
    64 bits, a value no Python type holds (a 13th month)."""

    def construct_document(self, node: yaml.Node) -> Any:
        _measure(node, 1, {})
        return super().construct_document(node)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except ValueError as exc:
            raise _marked(cut(str(exc)), node) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                raise _marked("a list or mapping cannot be a key", key_node)
            if key in seen:
                raise _marked(f"key {shown(key)} appears twice in one mapping", key_node)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            value = super().construct_yaml_int(node)
            if value.bit_length() <= INT_BITS:
                return value
        except ValueError:  # Python reads at most 4300 digits
            pass
        raise _marked(
            f"integer of {len(node.value)} characters is out of range; integers fit in 64 bits", node
        )

    def construct_undefined(self, node: yaml.Node) -> Any:
        raise _marked(f"unknown tag {shown(node.tag)}; a recipe holds plain values", node)


_RecipeYamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
_RecipeYamlLoader.add_constructor("tag:yaml.org,2002:int", _RecipeYamlLoader.construct_yaml_int)
_RecipeYamlLoader.add_constructor(None, _RecipeYamlLoader.construct_undefined)


def _marked(problem: str, node: yaml.Node) -> yaml.MarkedYAMLError:
    return yaml.constructor.ConstructorError(None, None, problem, node.start_mark)


def _measure(node: yaml.Node, depth: int, known: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """``(values, levels)`` of ``node`` once its aliases expand; refuses more than MAX_VALUES or MAX_DEPTH.

    An alias is the very node it names, so each node is measured once (``known``): the time taken grows with
    the file, not with the expansion. An alias inside the node it names never ends; the depth limit stops it.
    """
    if id(node) not in known:
        if depth > MAX_DEPTH:
            raise _too_deep(node)
        values, levels = 1, 1
        for child in _children(node):
            child_values, child_levels = _measure(child, depth + 1, known)
            values, levels = values + child_values, max(levels, child_levels + 1)
            if values > MAX_VALUES:
                raise _marked(
                    f"more than {MAX_VALUES} keys and values, counting what aliases stand for", node
                )
        known[id(node)] = values, levels
    values, levels = known[id(node)]
    if depth + levels - 1 > MAX_DEPTH:
        raise _too_deep(node)
    return values, levels


def _too_deep(node: yaml.Node) -> yaml.MarkedYAMLError:
    return _marked(f"nested more than {MAX_DEPTH} levels deep, counting what aliases stand for", node)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_RecipeYamlLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise RecipeError([f"{where}: invalid YAML: {exc.problem or exc.context}"]) from None
    except yaml.reader.ReaderError as exc:
        # Its position counts bytes with libyaml and characters without; the first place the character
        # occurs is the place either way, since the reader stops at the first unacceptable character.
        where = f"{source}:{_line_column(text, text.index(chr(exc.character)))}"
        raise RecipeError([f"{where}: invalid YAML: character U+{exc.character:04X}: {exc.reason}"]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([f"{source}: invalid YAML: {cut(str(exc))}"]) from None
    except RecursionError:  # PyYAML's own parser, without libyaml, composes nested nodes recursively
        raise RecipeError([f"{source}: invalid YAML: nested too deeply"]) from None


def _line_column(text: str, at: int) -> str:
    line = text.count("\n", 0, at) + 1
    column = at - text.rfind("\n", 0, at)
    return f"{line}:{column}"


def _read_text(path: Path) -> str:
    """The file as text, refused early when it is too large to be a recipe, binary, or not UTF-8."""
    with path.open("rb") as handle:
        data = handle.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise RecipeError([f"{path}: larger than {MAX_BYTES // 1024} KiB; a recipe is a short YAML file"])
    if b"\0" in data:
        raise RecipeError([f"{path}: binary, not a YAML recipe (a NUL byte at byte offset {data.index(0)})"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RecipeError(
            [
                f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at byte offset {exc.start}, line {line}); "
                "save the recipe as UTF-8"
            ]
        ) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None, strict: bool = False) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError listing every problem found.

    A data source path naming an unset variable is printed as a note on stderr, or is a problem when
    ``strict``: the variable may be set where prep runs (a cluster job), and prep refuses to start without it.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"{path}: recipe file not found"])
    raw = parse_yaml(_read_text(path), str(path))
    if not isinstance(raw, dict):
        raise RecipeError([f"{path}: a recipe is a YAML mapping of sections (name, model, data, sft, ...)"])
    overridden = apply_overrides(raw, overrides or [], str(path))
    raw, unset = _expand(raw)
    prep_paths = {parts for parts, _ in unset if _is_prep_path(parts)}
    needed_now = [(_dotted(parts), name) for parts, name in unset if parts not in prep_paths]
    if needed_now:
        lines = [_line(str(path), key, _not_set(name), overridden) for key, name in needed_now]
        raise RecipeError(capped(lines, str(path)))
    # A prep path keeps its ${VAR} text, which no path check can pass: it is validated as the recipe file
    # (which exists) and then set back.
    kept = _stand_in_for_prep_paths(raw, prep_paths, str(path.resolve()))
    try:
        recipe = Recipe.model_validate(raw, context={"base_dir": path.resolve().parent})
    except ValidationError as exc:
        raise RecipeError(capped(format_validation_errors(exc, str(path), overridden), str(path))) from None
    recipe = _set_prep_paths(recipe, kept)
    problems = [_line(str(path), key, message, overridden) for key, message in check_recipe(recipe)]
    notes = [
        _line(str(path), key, f"${{{name}}} is not set; needed when prep runs", overridden)
        for key, name in _unset_prep_paths(recipe)
    ]
    if strict:
        problems += notes
    if problems:
        raise RecipeError(capped(problems, str(path)))
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
        for field in _PREP_FIELDS
        for match in _ENV.finditer(getattr(source, field) or "")
    ]


def _is_prep_path(parts: tuple[Any, ...]) -> bool:
    """``data.sources[N].path`` or ``.image_root``: the data source paths prep reads when it runs, the one place
    a variable may still be unset at load time."""
    return (
        len(parts) == 4
        and parts[:2] == ("data", "sources")
        and isinstance(parts[2], int)
        and parts[3] in _PREP_FIELDS
    )


def _stand_in_for_prep_paths(
    raw: dict[str, Any], keys: set[tuple[Any, ...]], stand_in: str
) -> dict[tuple[int, str], str]:
    """Put ``stand_in`` at each data source path among ``keys``; return the text each held, by (index, field)."""
    kept: dict[tuple[int, str], str] = {}
    for _, _, index, field in keys:
        source = raw["data"]["sources"][index]
        kept[index, field] = source[field]
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
        raise RecipeError([f"{source}: {_dotted(parts)}: {_not_set(name)}" for parts, name in unset])
    return expanded


def _expand(raw: Any) -> tuple[Any, list[tuple[tuple[Any, ...], str]]]:
    """``raw`` with its variables expanded, and ``(key parts, variable)`` for each unset one, left as written.

    Key paths are kept as parts, not text, so a key holding dots or brackets cannot pass for another key."""
    unset: list[tuple[tuple[Any, ...], str]] = []

    def expand(node: Any, parts: tuple[Any, ...]) -> Any:
        if isinstance(node, dict):
            return {k: expand(v, (*parts, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [expand(v, (*parts, i)) for i, v in enumerate(node)]
        if isinstance(node, str):
            return _ENV.sub(lambda m: _lookup(m, parts, unset), node)
        return node

    return expand(raw, ()), unset


def _lookup(match: re.Match[str], parts: tuple[Any, ...], unset: list[tuple[tuple[Any, ...], str]]) -> str:
    name, default = match.group(1), match.group(3)
    value = os.environ.get(name) or default
    if value is None:
        unset.append((parts, name))
        return match.group(0)
    return value


def _not_set(name: str) -> str:
    name = cut(name)
    return f"environment variable {name} is not set; export it or write ${{{name}:-default}}"


def _split(key: str) -> list[str]:
    return [p for p in re.split(r"\.|\[([0-9]+)\]", key) if p]


def _is_index(part: object) -> bool:
    """A list index: an int, or ASCII digits (``"²".isdigit()`` is true, and int() refuses it)."""
    if isinstance(part, str):
        return part.isascii() and part.isdigit()
    return isinstance(part, int) and not isinstance(part, bool)


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
        label = f"--set {cut(item)}"
        parts = _split(key.strip())
        if not sep or not parts:
            raise RecipeError([f"{label}: expected KEY=VALUE, e.g. --set sft.learning_rate=1e-5"])
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, label, _dotted(parts[: depth + 1]))
        _assign(node, parts[-1], parse_yaml(text, label), label)
        done.add(_dotted(parts))
    return done


def _child(node: Any, part: str, label: str, where: str) -> Any:
    if isinstance(node, list) and _is_index(part) and int(part) < len(node):
        child = node[int(part)]
    elif isinstance(node, dict):
        child = node.setdefault(part, {})
    else:
        child = None
    if not isinstance(child, (dict, list)):
        raise RecipeError([f"{label}: {where} is not a section or list that can hold keys"])
    return child


def _assign(node: Any, part: str, value: Any, label: str) -> None:
    if isinstance(node, list) and _is_index(part) and int(part) < len(node):
        node[int(part)] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise RecipeError([f"{label}: cannot set {_dotted([part])} here"])


def _dotted(parts: typing.Sequence[Any]) -> str:
    """``a.b[0].c``; a key that is not plain ASCII is shown quoted, escaped and cut."""
    out = ""
    for part in parts:
        if _is_index(part):
            out += f"[{part}]"
        else:
            name = cut(part) if isinstance(part, str) and _PLAIN_KEY.fullmatch(part) else shown(part)
            out += f".{name}" if out else name
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
        loc = [part for part in error["loc"] if isinstance(part, int) or not _SCHEMA_TAG.fullmatch(part)]
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
        return f"{shown(got)} is not allowed; use one of: {ctx['expected']}"
    message = error["msg"].removeprefix("Value error, ")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"):
        message = message.replace("Input should be", "must be")
    elif kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{message.replace('Input should be', 'expected')} (got {shown(got)})"
    if isinstance(got, (str, int, float)):
        return f"{message} (got {shown(got)})"
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
