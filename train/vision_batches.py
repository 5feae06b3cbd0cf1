"""Batches for the Vision stages: prep's ids and labels, padded as for text, and each row's images, read from
the paths prep wrote beside them, padded to a square when the recipe says so, and made into the tower's
pixel values by its image processor.

Images are read per batch and never stored in the shards: LLaVA-scale sets hold hundreds of gigabytes of
pictures. Prep has already written each image as the tokens its features fill and checked that they fit, so
a batch's image tokens and features always agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.image_processing_utils import BaseImageProcessor

from hermes_pipeline.rows import IGNORE_INDEX
from hermes_pipeline.vision import read_picture


@dataclass(frozen=True)
class VisionBatches:
    pad_id: int
    images: BaseImageProcessor
    pad_square: bool  # vision.image_aspect_ratio: pad

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for index, row in enumerate(rows):
            length = len(row["input_ids"])
            input_ids[index, :length] = torch.tensor(row["input_ids"])
            labels[index, :length] = torch.tensor(row["labels"])
            attention_mask[index, :length] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        mean = self.images.image_mean
        pictures = [read_picture(path, mean, self.pad_square) for row in rows for path in row["images"]]
        if pictures:
            batch["pixel_values"] = self.images(pictures, return_tensors="pt")["pixel_values"]
        return batch
