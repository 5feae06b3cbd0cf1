"""Read and write safetensors checkpoints one tensor at a time.

Merging and packaging a 70B model must not need 140 GB of RAM: tensors are read lazily from whichever shard
holds them and written out in shards of a bounded size, so the peak is about one output shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hermes_pipeline.errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as the Hugging Face Hub counts)."""
    number, unit = text[:-2].strip(), text[-2:].upper()
    if unit not in _UNITS or not number.replace(".", "", 1).isdigit():
        raise UserError(f"shard size {text!r} is not a size like 5GB or 500MB")
    return int(float(number) * _UNITS[unit])


def shard_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a saved model, in index order."""
    index = model_dir / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [model_dir / name for name in dict.fromkeys(weight_map.values())]
    if (model_dir / SINGLE).is_file():
        return [model_dir / SINGLE]
    raise UserError(f"{model_dir}: no {SINGLE} or {INDEX}; save the model with safetensors")


def tensor_names(model_dir: Path) -> list[str]:
    names: list[str] = []
    for file in shard_files(model_dir):
        with safe_open(file, framework="pt") as handle:
            names.extend(handle.keys())
    return names


def iter_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a saved model, one at a time, shard after shard.

    The shard is opened again for each tensor: safetensors memory-maps it, and pages read through an open
    map stay in this process's RSS until it closes, which would add a whole input shard to the peak."""
    for file in shard_files(model_dir):
        with safe_open(file, framework="pt") as handle:
            names = handle.keys()
        for name in names:
            with safe_open(file, framework="pt") as handle:
                tensor = handle.get_tensor(name)
            yield name, tensor


def read_part(model_dir: Path, part: str) -> dict[str, torch.Tensor]:
    """The tensors of one part of a saved model (names holding ``part``, e.g. ``vision_tower.``), keyed by
    the name after it; nothing else is read."""
    tensors = {}
    for file in shard_files(model_dir):
        with safe_open(file, framework="pt") as handle:
            names = handle.keys()
            for name in names:
                if part in name:
                    tensors[name.split(part, 1)[1]] = handle.get_tensor(name)
    return tensors


def model_bytes(model_dir: Path) -> int:
    return sum(file.stat().st_size for file in shard_files(model_dir))


def write_shards(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path, max_shard_bytes: int) -> None:
    """Write tensors into ``model-0000i-of-0000n.safetensors`` files of at most ``max_shard_bytes`` each
    (a single larger tensor gets a shard of its own) and the index that maps every tensor to its file.

    The index is written even for one shard, so every packaged model has the same layout.
    """
    pending: dict[str, torch.Tensor] = {}
    pending_bytes, total = 0, 0
    parts: list[list[str]] = []

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            save_file(pending, out_dir / f"part-{len(parts):05d}.tmp", metadata={"format": "pt"})
            parts.append(list(pending))
            pending, pending_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[name] = tensor.contiguous()
        pending_bytes += size
        total += size
    flush()
    weight_map = {}
    for i, names in enumerate(parts):
        final = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        (out_dir / f"part-{i:05d}.tmp").rename(out_dir / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
