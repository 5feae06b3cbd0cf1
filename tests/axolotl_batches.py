"""Run by axolotl's Python (not collected by pytest): what axolotl's trainer feeds the model in one epoch.

``python axolotl_batches.py CONFIG OUT.json`` builds the trainer exactly as `axolotl train CONFIG` does,
walks its training dataloader once and writes every packed row's segments (the rows as they reach the
model: input ids and labels between position-id resets), and, for the first batch, how far each segment's
logits inside the packed batch are from the same segment run alone: zero when no attention crosses rows.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")

import torch
from axolotl.cli.config import load_cfg
from axolotl.common.datasets import load_datasets
from axolotl.train import setup_model_and_trainer


def segments(batch: dict[str, torch.Tensor], pad_id: int) -> list[tuple[list[int], list[int], int, int]]:
    """(ids, labels, start, end) of every row packed into the batch's rows, padding left out."""
    found = []
    for row in range(batch["input_ids"].shape[0]):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        positions = batch["position_ids"][row] if "position_ids" in batch else torch.arange(len(ids))
        starts = (positions == 0).nonzero().flatten().tolist()
        for start, end in zip(starts, [*starts[1:], len(ids)], strict=True):
            piece_ids, piece_labels = ids[start:end].tolist(), labels[start:end].tolist()
            if all(t == pad_id for t in piece_ids) and all(t == -100 for t in piece_labels):
                continue
            found.append((piece_ids, piece_labels, start, end))
    return found


@torch.no_grad()
def cross_row_difference(model: torch.nn.Module, batch: dict[str, torch.Tensor], pad_id: int) -> float:
    model.eval()
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    packed = model(**inputs).logits[0]
    worst = 0.0
    for ids, _, start, end in segments({k: v[:1] for k, v in batch.items()}, pad_id):
        alone = model(input_ids=torch.tensor([ids])).logits[0]
        worst = max(worst, float((packed[start:end] - alone).abs().max()))
    return worst


def main(config: str, out: str) -> None:
    cfg = load_cfg(config)
    trainer, model, tokenizer, _, _ = setup_model_and_trainer(cfg, load_datasets(cfg=cfg))
    pad_id = tokenizer.pad_token_id
    rows, first, batches = [], None, 0
    for batch in trainer.get_train_dataloader():
        first, batches = first or batch, batches + 1
        rows += [[ids, labels] for ids, labels, _, _ in segments(batch, pad_id)]
    result = {
        "rows": rows,
        "batches": batches,
        "batch_keys": sorted(first),
        "cross_row_max_abs_diff": cross_row_difference(model, first, pad_id),
    }
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
