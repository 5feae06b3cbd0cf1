"""Helpers shared by the prep tests: small recipes over the fixture files in their Hub schemas."""

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from hermes_pipeline.data_prep.pipeline import run_prep
from hermes_pipeline.recipe.loader import load_recipe
from hermes_pipeline.recipe.schema import DPO_SOURCE_KINDS, Recipe

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "sources"
TEXT_SOURCES = [
    {"name": "openhermes", "kind": "openhermes", "path": "openhermes.json"},
    {"name": "fc_verbatim", "kind": "function_calling", "path": "function_calling.jsonl", "mode": "verbatim"},
    {
        "name": "fc_canonical",
        "kind": "function_calling",
        "path": "function_calling.jsonl",
        "mode": "canonical",
    },
    {"name": "json_mode", "kind": "json_mode", "path": "json_mode.jsonl"},
    {"name": "orca", "kind": "orca_dpo_pairs", "path": "orca_dpo_pairs.jsonl"},
    {"name": "distilabel", "kind": "distilabel_orca_dpo", "path": "distilabel.jsonl"},
    {"name": "ultrafeedback", "kind": "ultrafeedback_binarized", "path": "ultrafeedback.jsonl"},
    {"name": "dpo_messages", "kind": "dpo_messages", "path": "dpo_messages.jsonl"},
]


def write_recipe(tmp_path: Path, source_list: list[dict[str, Any]], **sections: Any) -> Recipe:
    """A small recipe over fixture files, its run directory inside tmp_path; SFT and DPO on when fed."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    stages = {s.get("stage") or ("dpo" if s["kind"] in DPO_SOURCE_KINDS else "sft") for s in source_list}
    data = {
        "max_seq_len": 1024,
        "num_proc": 1,
        "val_fraction": 0.2,
        "sources": [
            {**s, "path": str(FIXTURES / s["path"]) if not Path(s["path"]).is_absolute() else s["path"]}
            for s in source_list
        ],
        **sections.pop("data", {}),
    }
    raw = {
        "name": "fixture",
        "seed": 3,
        "run_dir": str(tmp_path / "run"),
        "model": {
            "init": "random",
            "config": str(ROOT / "configs/models/tiny-mistral.json"),
            "dtype": "float32",
        },
        "tokenizer": {"name_or_path": str(ROOT / "hermes_pipeline/assets/tiny_tokenizer")},
        "data": data,
        "sft": {"enabled": "sft" in stages, "precision": "fp32", "resources": {"gpus_per_node": 0}},
        "dpo": {
            "enabled": "dpo" in stages,
            "init_from": "base",
            "precision": "fp32",
            "resources": {"gpus_per_node": 0},
        },
        "export": {"enabled": False},
        "eval": {"enabled": False},
        **sections,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    if "vision" in sections:
        # These recipes carry only what prep reads: the schema checks them, but the whole-recipe checks of a
        # Vision run (unpacked sft, its eval rows) are tiny-vision.yaml's, tested in test_recipe.py.
        return Recipe.model_validate(raw, context={"base_dir": tmp_path})
    return load_recipe(path)


def prep(recipe: Recipe, **kwargs: Any) -> tuple[Path, dict[str, Any]]:
    out = run_prep(recipe, log=lambda _: None, **kwargs)
    return out, json.loads((out / "prep_report.json").read_text())


def rows(out: Path, stage: str) -> list[dict[str, Any]]:
    return [r for shard in sorted((out / stage).glob("*.parquet")) for r in pq.read_table(shard).to_pylist()]
