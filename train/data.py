"""The tokenized, masked shards data_prep wrote, opened as datasets for the trainers.

Training never re-tokenizes: the ids and labels prep produced are exactly what reaches the loss, on every
rank. Shards are memory-mapped through a datasets cache inside the run directory.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, load_dataset

from hermes_pipeline.errors import UserError

# Prep's column names -> the names TRL's trainers read.
COLUMNS = {
    "projector": {"input_ids": "input_ids", "labels": "labels"},
    "sft": {"input_ids": "input_ids", "labels": "labels"},
    "dpo": {
        "prompt_input_ids": "prompt_ids",
        "chosen_input_ids": "chosen_ids",
        "rejected_input_ids": "rejected_ids",
    },
}


def shard_files(prep: Path, stage: str, split: str) -> list[str]:
    return sorted(str(p) for p in (prep / stage).glob(f"{split}-*.parquet"))


def load_split(prep: Path, stage: str, split: str, cache_dir: Path, images: bool = False) -> Dataset | None:
    """One split of a stage's shards with the trainer's column names, and each row's image paths for a
    Vision stage; None when prep wrote no such split."""
    files = shard_files(prep, stage, split)
    if not files:
        if split == "train":
            raise UserError(
                f"{prep / stage}: no {split} shards; run `hermes-pipeline prep` for this recipe first"
            )
        return None
    return load_files(files, stage, cache_dir, images)


def load_files(files: list[str], stage: str, cache_dir: Path, images: bool = False) -> Dataset:
    """Shard files of one stage as a dataset with the trainer's column names (and no other column: TRL
    takes an ``images`` column for a sign of a vision model)."""
    columns = COLUMNS[stage] | ({"images": "images"} if images else {})
    dataset = load_dataset("parquet", data_files=files, split="train", cache_dir=str(cache_dir))
    dataset = dataset.select_columns(list(columns))
    return dataset.rename_columns({k: v for k, v in columns.items() if k != v})
