"""Prep on thousands of broken rows: no crash, exact accounting, and the valid rows come out unchanged."""

import copy
import json
import random
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from prep_support import FIXTURES, ROOT, TEXT_SOURCES, prep, write_recipe

from hermes_pipeline.readers import iter_records

MUTATIONS_PER_SOURCE = 150  # 8 sources, so 1,200 mutated rows
HUGE = "x" * 40_000


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location inside a JSON value, so a mutation can hit any depth."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            found += _paths(child, (*prefix, i))
    return found


def _parent(value: Any, path: tuple) -> Any:
    for part in path[:-1]:
        value = value[part]
    return value


KINDS = ("drop", "retype", "huge", "deep", "role", "truncate", "bad_utf8", "not_object")
# What leaves a record's brackets balanced, so inside a JSON array the records after it still read.
WELL_FORMED = ("drop", "retype", "huge", "deep", "role", "not_object")
DEEP = "[" * 5000 + "]" * 5000  # far past any parser's nesting limit
_DEEP_MARK = "\u0000deep\u0000"


def mutate(row: dict[str, Any], rng: random.Random, kinds: tuple[str, ...] = KINDS) -> bytes:
    """One broken JSON record: a key dropped, a value of the wrong type, size or depth, bad bytes, or cut
    short."""
    row = copy.deepcopy(row)
    kind = rng.choice(kinds)
    if kind == "not_object":
        return json.dumps(rng.choice([[row], 42, "row", None])).encode()
    path = rng.choice(_paths(row))
    parent = _parent(row, path)
    if kind == "drop":
        del parent[path[-1]]
    elif kind == "retype":
        parent[path[-1]] = rng.choice([None, 7, 3.5, True, [], {}, "", [None], {"x": []}])
    elif kind == "huge":
        parent[path[-1]] = HUGE
    elif kind == "deep":
        parent[path[-1]] = _DEEP_MARK
    elif kind == "role":
        for p in _paths(row):
            if p[-1] in ("from", "role"):
                _parent(row, p)[p[-1]] = rng.choice(["bot", "gpt4", "", "USER", "function"])
    line = json.dumps(row, ensure_ascii=False).replace(json.dumps(_DEEP_MARK), DEEP).encode()
    if kind == "truncate":
        return line[: rng.randrange(1, len(line))]
    if kind == "bad_utf8":
        cut = rng.randrange(1, len(line))
        return line[:cut] + b"\xff\xfe\xc3" + line[cut:]
    return line


def _write_jsonl(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line.replace(b"\n", b" ") + b"\n" for line in lines))


def _by_id(out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    prepared = {}
    for shard in out.rglob("*.parquet"):
        for row in pq.read_table(shard).to_pylist():
            prepared[(row["source"], row["id"])] = row
    return prepared


@pytest.mark.slow
def test_mutated_rows_never_crash_and_never_change_valid_output(tmp_path: Path) -> None:
    rng = random.Random(1234)
    clean_specs, fuzz_specs, expected_rows = [], [], {}
    for spec in TEXT_SOURCES:
        originals = [r.data for r in iter_records(str(FIXTURES / spec["path"]))]
        valid = [json.dumps(r, ensure_ascii=False).encode() for r in originals]
        mutated = []
        for n in range(MUTATIONS_PER_SOURCE):
            base = copy.deepcopy(rng.choice(originals))
            for key in ("id", "prompt_id"):
                if key in base:
                    base[key] = f"fuzz-{n}"
            mutated.append(mutate(base, rng))
        name = spec["name"]
        _write_jsonl(tmp_path / f"{name}.clean.jsonl", valid)
        _write_jsonl(tmp_path / f"{name}.fuzz.jsonl", valid + mutated)
        clean_specs.append({**spec, "path": str(tmp_path / f"{name}.clean.jsonl")})
        fuzz_specs.append({**spec, "path": str(tmp_path / f"{name}.fuzz.jsonl")})
        expected_rows[name] = len(valid) + len(mutated)

    clean_out, _ = prep(write_recipe(tmp_path / "clean", clean_specs))
    fuzz_out, report = prep(write_recipe(tmp_path / "fuzz", fuzz_specs))

    rejected_lines = (fuzz_out / "rejects.jsonl").read_text().splitlines()
    for name, count in expected_rows.items():
        stats = report["sources"][name]
        assert stats["rows_in"] == count
        assert stats["rows_out"] + stats["rejected"] == count
        assert sum(1 for line in rejected_lines if json.loads(line)["source"] == name) == stats["rejected"]
    assert report["totals"]["rejected"] >= 1000

    clean, fuzzed = _by_id(clean_out), _by_id(fuzz_out)
    for key, row in clean.items():
        assert fuzzed[key] == row, f"valid row {key} changed when broken rows were added"


@pytest.mark.slow
def test_broken_records_inside_json_arrays_are_rejected_and_the_rest_read(tmp_path: Path) -> None:
    """The published sets are JSON arrays as often as JSON lines: one record too deep, too large or of the
    wrong shape is one reject, and every record after it is read."""
    rng = random.Random(4321)
    specs, expected_rows = [], {}
    for spec in TEXT_SOURCES:
        originals = [r.data for r in iter_records(str(FIXTURES / spec["path"]))]
        records = [json.dumps(r, ensure_ascii=False).encode() for r in originals]
        for _ in range(40):
            at = rng.randrange(len(records) + 1)
            records.insert(at, mutate(rng.choice(originals), rng, WELL_FORMED))
        path = tmp_path / f"{spec['name']}.json"
        path.write_bytes(b"[\n" + b",\n".join(records) + b"\n]\n")
        specs.append({**spec, "path": str(path)})
        expected_rows[spec["name"]] = len(records)

    _, clean = prep(write_recipe(tmp_path / "clean", list(TEXT_SOURCES)))
    out, report = prep(write_recipe(tmp_path / "run", specs))
    rejected_lines = (out / "rejects.jsonl").read_text().splitlines()
    for name, count in expected_rows.items():
        stats = report["sources"][name]
        assert stats["rows_in"] == count, name
        assert stats["rows_out"] >= clean["sources"][name]["rows_out"], f"{name}: valid records lost"
        assert stats["rows_out"] + stats["rejected"] == count, name
        assert sum(1 for line in rejected_lines if json.loads(line)["source"] == name) == stats["rejected"]
    assert any("deep" in json.loads(line)["reason"] for line in rejected_lines)


@pytest.mark.slow
def test_mutated_llava_rows_are_accounted_for(tmp_path: Path) -> None:
    rng = random.Random(99)
    originals = [r.data for r in iter_records(str(FIXTURES / "llava.json")) if r.data]
    mutated = []
    for n in range(MUTATIONS_PER_SOURCE):
        base = {**copy.deepcopy(rng.choice(originals)), "id": f"fuzz-{n}"}
        mutated.append(mutate(base, rng))
    path = tmp_path / "llava.fuzz.jsonl"
    _write_jsonl(path, mutated)
    spec = {
        "name": "pics",
        "kind": "llava",
        "path": str(path),
        "image_root": str(FIXTURES / "images"),
        "stage": "projector",
    }
    vision = {
        "tower_config": str(ROOT / "configs/models/tiny-siglip.json"),  # 16 image tokens an image
        "tower_init": "random",
        "projector_pretrain": {"resources": {"gpus_per_node": 0}},
    }
    tokenizer = {"name_or_path": str(ROOT / "hermes_pipeline/assets/tiny_tokenizer"), "template": "vicuna_v1"}
    out, report = prep(write_recipe(tmp_path / "run", [spec], vision=vision, tokenizer=tokenizer))
    stats = report["sources"]["pics"]
    assert stats["rows_in"] == len(mutated) == stats["rows_out"] + stats["rejected"]
    assert len((out / "rejects.jsonl").read_text().splitlines()) == stats["rejected"]
