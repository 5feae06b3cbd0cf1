"""Generate the bundled sample pictures and rows in data/tiny-vision/ for the tiny Vision recipe.

Each picture is 64x64 pixels: one to three shapes of one kind (circle, square, triangle) and one colour
(red, green, blue, yellow) on white, so that every question has one answer and that answer is in the
picture. The rows are in LLaVA's JSON shape (``id``, ``image``, ``conversations`` of from/value, the image
tag in the first human turn), as LLaVA-Pretrain, LVIS-Instruct4V and ShareGPT4V publish them:

- captions.json: one caption a picture behind one of LLaVA-Pretrain's kind of brief instructions (projector
  pre-training renders only the image and the caption);
- instruct.json: two or three questions a picture (how many, what colour, what shape) with short answers;
- fn_call.json: Hermes 2 Vision's function calling, the user turn ``<fn_call>`` and a JSON schema, the answer
  a JSON object under it;
- eval.json: held-out pictures (positions and sizes no training picture has) asked the same questions, with
  the reference answer of each field.

Seeded: a rerun writes byte-identical files.

    python scripts/make_tiny_vision_data.py [--out-dir data/tiny-vision]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
TRAIN_PER_KIND = 8  # pictures per (shape, colour, count): 36 kinds x 8 = 288
EVAL_PER_KIND = 1
CAPTION_ASKS = (
    "Describe the picture briefly.",
    "Give a short caption for this image.",
    "What does the image show? Answer in a few words.",
)
SCHEMA = {
    "type": "object",
    "properties": {
        "shape": {"type": "string", "description": "The kind of shape in the picture.", "enum": list(SHAPES)},
        "colour": {"type": "string", "description": "The colour of the shapes.", "enum": list(COLOURS)},
        "count": {"type": "integer", "description": "How many shapes there are.", "minimum": 1, "maximum": 3},
    },
    "required": ["shape", "colour", "count"],
}


@dataclass(frozen=True)
class Picture:
    name: str
    shape: str
    colour: str
    count: int
    boxes: tuple[tuple[int, int, int, int], ...]  # left, top, right, bottom of each shape

    @property
    def caption(self) -> str:
        return f"{COUNT_WORDS[self.count]} {self.colour} {self.shape}{'s' if self.count > 1 else ''}"

    @property
    def fields(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "count": self.count}


def layout(rng: random.Random, count: int, held_out: bool) -> tuple[tuple[int, int, int, int], ...]:
    """Non-overlapping boxes on a 3x3 grid of 21-pixel cells: training pictures use even sizes, held-out
    pictures odd ones, so no eval picture repeats a training one."""
    cells = rng.sample(list(itertools.product(range(3), range(3))), count)
    boxes = []
    for column, row in cells:
        side = rng.choice((13, 15, 17) if held_out else (12, 14, 16))
        left = column * 21 + rng.randint(0, 21 - side)
        top = row * 21 + rng.randint(0, 21 - side)
        boxes.append((left, top, left + side, top + side))
    return tuple(boxes)


def draw(picture: Picture) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), "white")
    pen = ImageDraw.Draw(image)
    fill = COLOURS[picture.colour]
    for left, top, right, bottom in picture.boxes:
        if picture.shape == "circle":
            pen.ellipse((left, top, right, bottom), fill=fill)
        elif picture.shape == "square":
            pen.rectangle((left, top, right, bottom), fill=fill)
        else:
            pen.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=fill)
    return image


def pictures(split: str, per_kind: int, seed: int) -> list[Picture]:
    rng = random.Random(seed)
    made = []
    for shape, colour, count in itertools.product(SHAPES, COLOURS, COUNT_WORDS):
        for copy in range(per_kind):
            name = f"{split}/{shape}-{colour}-{count}-{copy}.png"
            made.append(Picture(name, shape, colour, count, layout(rng, count, held_out=split == "eval")))
    rng.shuffle(made)
    return made


def row(picture: Picture, index: int, turns: list[tuple[str, str]]) -> dict[str, Any]:
    conversations = []
    for position, (question, answer) in enumerate(turns):
        value = f"<image>\n{question}" if position == 0 else question
        conversations += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return {"id": f"{Path(picture.name).stem}-{index}", "image": picture.name, "conversations": conversations}


def questions(picture: Picture) -> list[tuple[str, str]]:
    plural = picture.count > 1
    return [
        (
            "How many shapes are in the picture?",
            f"There {'are' if plural else 'is'} {COUNT_WORDS[picture.count]}.",
        ),
        ("What colour are they?" if plural else "What colour is it?", f"{picture.colour.capitalize()}."),
        (
            "What shape are they?" if plural else "What shape is it?",
            f"{'They are' if plural else 'It is a'} {picture.shape}{'s' if plural else ''}.",
        ),
    ]


def fn_call(picture: Picture) -> tuple[str, str]:
    return f"<fn_call>{json.dumps(SCHEMA, indent=2)}", json.dumps(picture.fields, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "data" / "tiny-vision")
    out = parser.parse_args().out_dir
    train, held_out = pictures("train", TRAIN_PER_KIND, seed=1), pictures("eval", EVAL_PER_KIND, seed=2)
    for picture in (*train, *held_out):
        path = out / "images" / picture.name
        path.parent.mkdir(parents=True, exist_ok=True)
        draw(picture).save(path, optimize=True)
    rng = random.Random(3)
    files = {
        "captions.json": [row(p, 0, [(rng.choice(CAPTION_ASKS), p.caption)]) for p in train],
        "instruct.json": [row(p, 1, questions(p)[: rng.choice((2, 3))]) for p in train],
        "fn_call.json": [row(p, 2, [fn_call(p)]) for p in train],
        "eval.json": [{**row(p, 3, [fn_call(p)]), "reference": p.fields} for p in held_out],
    }
    for name, rows in files.items():
        (out / name).write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(train)} training and {len(held_out)} held-out pictures in {out}")


if __name__ == "__main__":
    main()
