"""The bundled tiny Vision data: generated (a rerun is byte-identical), every answer is in its picture, and
prep keeps every row, the <fn_call> ones validated against their schemas."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image
from prep_support import ROOT, prep, write_recipe

sys.path.insert(0, str(ROOT / "scripts"))
import make_tiny_vision_data as generator

DATA = ROOT / "data" / "tiny-vision"


def test_the_bundled_files_are_the_generators_output(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_tiny_vision_data.py"), "--out-dir", str(tmp_path)],
        check=True,
    )
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    bundled = sorted(p.relative_to(DATA) for p in DATA.rglob("*") if p.is_file() and p.name != "README.md")
    assert made == bundled
    assert all(filecmp.cmp(tmp_path / p, DATA / p, shallow=False) for p in made)


def test_each_answer_is_in_its_picture() -> None:
    """Every box holds one shape of the stated colour (its centre pixel), nothing else is coloured, and the
    held-out pictures never repeat a training layout."""
    train = generator.pictures("train", generator.TRAIN_PER_KIND, seed=1)
    held_out = generator.pictures("eval", generator.EVAL_PER_KIND, seed=2)
    assert not {p.boxes for p in train} & {p.boxes for p in held_out}
    for picture in (*train, *held_out):
        image = Image.open(DATA / "images" / picture.name).convert("RGB")
        assert len(picture.boxes) == picture.count
        for left, top, right, bottom in picture.boxes:
            centre = ((left + right) // 2, (top + 2 * bottom) // 3)  # inside a triangle too
            assert image.getpixel(centre) == generator.COLOURS[picture.colour], picture.name
        # PIL fills shapes without antialiasing: the stated colour and white, nothing else
        assert {colour for _, colour in image.getcolors()} == {
            generator.COLOURS[picture.colour],
            (255, 255, 255),
        }, picture.name


def test_prep_keeps_every_row(tmp_path: Path) -> None:
    vision = {
        "tower_config": str(ROOT / "configs/models/tiny-siglip.json"),
        "tower_init": "random",
        "projector_pretrain": {"precision": "fp32", "resources": {"gpus_per_node": 0}},
    }
    sources = [
        {
            "name": "captions",
            "kind": "llava",
            "path": str(DATA / "captions.json"),
            "image_root": str(DATA / "images"),
            "stage": "projector",
        },
        {
            "name": "instruct",
            "kind": "llava",
            "path": str(DATA / "instruct.json"),
            "image_root": str(DATA / "images"),
        },
        {
            "name": "fn_call",
            "kind": "llava",
            "path": str(DATA / "fn_call.json"),
            "image_root": str(DATA / "images"),
        },
    ]
    tokenizer = {"name_or_path": str(ROOT / "hermes_pipeline/assets/tiny_tokenizer"), "template": "vicuna_v1"}
    _, report = prep(write_recipe(tmp_path, sources, vision=vision, tokenizer=tokenizer))
    for name in ("captions", "instruct", "fn_call"):
        stats = report["sources"][name]
        assert (
            stats["rows_out"] == stats["rows_in"] == len(json.loads((DATA / f"{name}.json").read_text()))
        ), stats
