"""What reaches the model in a training batch: packed rows that never see each other, and prep's masks."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from train_support import prepared, small_recipe_dict

from hermes_pipeline.train.stage import build_trainer, training_args

IGNORE = -100


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("batches")
    return prepared(folder, small_recipe_dict(folder / "run"))[1]


def _trainer(recipe, packing: bool):
    recipe = recipe.model_copy(update={"sft": recipe.sft.model_copy(update={"packing": packing})})
    trainer, _ = build_trainer(recipe, "sft", training_args(recipe, "sft"), None)
    trainer.model.eval()
    return trainer


def _prep_labels(recipe) -> dict[tuple[int, ...], list[int]]:
    shards = sorted((Path(recipe.run_dir) / "prep" / "sft").glob("train-*.parquet"))
    table = pq.read_table(shards, columns=["input_ids", "labels"]).to_pylist()
    return {tuple(row["input_ids"]): row["labels"] for row in table}


def _segments(batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    ends = [*starts[1:], batch["input_ids"].shape[1]]
    return list(zip(starts, ends, strict=True))


def _row_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE)


@torch.no_grad()
def test_packed_rows_match_rows_run_one_by_one(small) -> None:
    trainer = _trainer(small, packing=True)
    batch = next(iter(trainer.get_train_dataloader()))
    segments = _segments(batch)
    assert len(segments) >= 4, "a packed batch should hold several rows"
    model = trainer.model
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    for start, end in segments:
        ids = batch["input_ids"][0, start:end]
        alone = model(input_ids=ids[None]).logits[0]
        torch.testing.assert_close(packed[start:end], alone, atol=2e-5, rtol=1e-5)
        labels = batch["labels"][0, start:end]
        torch.testing.assert_close(_row_loss(packed[start:end], labels), _row_loss(alone, labels))


@torch.no_grad()
def test_packed_rows_would_differ_if_attention_crossed_rows(small) -> None:
    """The equality above is not vacuous: a plain causal mask over the packed row changes the logits."""
    trainer = _trainer(small, packing=True)
    batch = next(iter(trainer.get_train_dataloader()))
    (_, _), (start, end), *_ = _segments(batch)
    leaky = trainer.model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"]))
    alone = trainer.model(input_ids=batch["input_ids"][:, start:end])
    assert not torch.allclose(leaky.logits[0, start:end], alone.logits[0], atol=1e-3)


@pytest.mark.parametrize("packing", [True, False])
def test_trained_tokens_are_exactly_preps_masked_spans(small, packing: bool) -> None:
    trainer = _trainer(small, packing=packing)
    expected = _prep_labels(small)
    seen = 0
    for batch in trainer.get_train_dataloader():
        if packing:
            rows = [(batch["input_ids"][0, s:e], batch["labels"][0, s:e]) for s, e in _segments(batch)]
        else:
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            rows = [(batch["input_ids"][i, :n], batch["labels"][i, :n]) for i, n in enumerate(lengths)]
        for ids, labels in rows:
            prep_labels = expected[tuple(ids.tolist())]
            assert prep_labels[0] == IGNORE
            assert labels.tolist() == prep_labels
            seen += 1
    assert seen == len(expected)
