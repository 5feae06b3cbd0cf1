"""The run directory: where each stage reads its inputs and writes its outputs, and how it proves it finished.

A stage writes into a ``.partial`` sibling and renames it into place when complete, then writes
MANIFEST.json last (atomically). A stage directory without a manifest, or whose manifest does not match
the current recipe and inputs, is not finished: a crash or a kill never leaves output that looks done.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from hermes_pipeline.recipe.schema import Recipe

MANIFEST = "MANIFEST.json"
KEY_LIBRARIES = ("torch", "transformers", "tokenizers", "datasets", "pyarrow", "trl", "peft", "deepspeed")


def run_dir(recipe: Recipe) -> Path:
    return Path(recipe.run_dir or Path("runs") / recipe.name)


def stage_dir(recipe: Recipe, stage: str) -> Path:
    return run_dir(recipe) / stage


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file, or of every file under a folder (names and contents), read in 1 MiB blocks."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def write_resolved_recipe(recipe: Recipe, recipe_hash: str) -> Path:
    path = run_dir(recipe) / "recipe.resolved.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"recipe_hash": recipe_hash, **recipe.model_dump(mode="json")}
    _atomic_write(path, yaml.safe_dump(body, sort_keys=False, allow_unicode=True))
    return path


def is_complete(directory: Path, fingerprint: str, inputs: dict[str, str]) -> bool:
    """Whether the stage in ``directory`` finished for exactly this fingerprint and these inputs, and its
    outputs are still whole (``output_damage``)."""
    recorded = _manifest(directory)
    return (
        recorded.get("fingerprint") == fingerprint
        and recorded.get("inputs") == inputs
        and output_damage(directory) is None
    )


def output_damage(directory: Path) -> str | None:
    """What is wrong with a finished stage's outputs, or None: every file the manifest lists must still have
    the size it was written with (a truncated shard, a deleted file). Sizes, not hashes: this runs on every
    start of every stage, and reading a 16 GB model again each time would cost minutes."""
    return size_mismatch(directory, _manifest(directory).get("sizes", {}), "written", full_paths=True)


def hash_mismatch(directory: Path) -> str | None:
    """The first output of a finished stage whose content no longer hashes to what its manifest recorded
    (a flipped bit keeps the size), or None. Reads every byte: for ``verify``, not for every start."""
    for name, digest in _manifest(directory).get("outputs", {}).items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if file_fingerprint(path) != digest:
            return f"{path} differs from the sha256 its manifest recorded"
    return None


def size_mismatch(folder: Path, sizes: dict[str, int], recorded: str, full_paths: bool = False) -> str | None:
    """The first file of ``sizes`` (names relative to ``folder``) that is missing or has another size, in
    words (``recorded`` says when the size was taken: "written", "sealed"), or None when all match."""
    for name, size in sizes.items():
        path = folder / name
        shown = path if full_paths else name
        if not path.is_file():
            return f"{shown} is missing"
        if (actual := path.stat().st_size) != size:
            return f"{shown} has {actual} bytes where {size} were {recorded}"
    return None


def _manifest(directory: Path) -> dict[str, Any]:
    """The stage's manifest, or {} when it has none (not finished) or it is unreadable (cut off)."""
    try:
        recorded = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


@contextmanager
def staged_output(directory: Path) -> Iterator[Path]:
    """Yield a fresh ``.partial`` folder; on success it replaces ``directory``, on failure it is removed."""
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)


def write_manifest(
    directory: Path,
    fingerprint: str,
    inputs: dict[str, str],
    started: float,
    extra: dict[str, Any] | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    """Record what went in and what came out; written last, so its presence means the stage finished.

    ``skip`` names top-level folders that are working state rather than output (checkpoints, caches).
    """
    files = [
        p
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST and p.relative_to(directory).parts[0] not in skip
    ]
    manifest = {
        "fingerprint": fingerprint,
        "inputs": inputs,
        "outputs": {str(p.relative_to(directory)): file_fingerprint(p) for p in files},
        "sizes": {str(p.relative_to(directory)): p.stat().st_size for p in files},
        "libraries": _library_versions(),
        "wall_time_s": round(time.time() - started, 2),
        **(extra or {}),
    }
    _atomic_write(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in KEY_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
