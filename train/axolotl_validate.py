"""Validate axolotl configs exactly as `axolotl train` would, from inside axolotl's own environment.

Run by that environment's Python (``<env>/bin/python axolotl_validate.py CONFIG...``). Prints one JSON
object per config: the keys axolotl's schema does not know (its validation drops them without a word),
the classes it names that do not import (axolotl skips a plugin that fails to import, also without a
word), and its validation error, if any, on one line.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")

import torch
import yaml
from axolotl.utils.config import validate_config
from axolotl.utils.dict import DictDefault
from axolotl.utils.schemas.config import AxolotlConfigWCapabilities
from axolotl.utils.schemas.datasets import DPODataset, SFTDataset

# The machine a job lands on is not this one: check against a CPU node's capabilities, the strictest.
CAPABILITIES = {
    "bf16": False,
    "fp8": False,
    "tf32": False,
    "n_gpu": 1,
    "n_node": 1,
    "compute_capability": None,
}


def _known(model: type) -> set[str]:
    names = set(model.model_fields)
    names |= {field.alias for field in model.model_fields.values() if field.alias}
    return names


def _missing_class(dotted: str) -> str | None:
    module, _, name = dotted.rpartition(".")
    try:
        getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        return f"{dotted}: {exc}"
    return None


def check(path: str) -> dict[str, object]:
    with open(path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    unknown = sorted(set(raw) - _known(AxolotlConfigWCapabilities))
    dataset_fields = _known(DPODataset if raw.get("rl") else SFTDataset)
    for key in ("datasets", "test_datasets"):
        for i, dataset in enumerate(raw.get(key) or []):
            unknown += [f"{key}[{i}].{field}" for field in sorted(set(dataset) - dataset_fields)]
    classes = [*raw.get("plugins", []), *([raw["trainer_cls"]] if raw.get("trainer_cls") else [])]
    missing = [problem for dotted in classes if (problem := _missing_class(dotted))]
    error = None
    try:
        validate_config(
            DictDefault(raw),
            capabilities=CAPABILITIES,
            env_capabilities={"torch_version": torch.__version__.split("+")[0]},
        )
    except Exception as exc:  # pydantic's ValidationError and axolotl's own ValueErrors alike
        error = " ".join(str(exc).split())
    return {"config": path, "unknown": unknown, "missing": missing, "error": error}


if __name__ == "__main__":
    for config in sys.argv[1:]:
        print(json.dumps(check(config)))
