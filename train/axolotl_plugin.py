"""What the axolotl backend adds inside axolotl's own processes; imported there, never by our stages.

axolotl loads ``HermesPlugin`` from the ``plugins:`` list of the config the stage writes, and the trainer
classes from its ``trainer_cls`` key. Together they give an axolotl run the TRL path's contract:

- the same callbacks: checkpoints sealed when complete, the local metrics log, a checkpoint and a clean
  stop on SIGUSR1/SIGTERM, the free-space check before each save;
- the same resume rule (``FinishedResume``) and, for DPO, the pairs prep tokenized (prompts with their
  earlier turns and tools) handed to the trainer as they are: axolotl has no route for tokenized pairs, and
  TRL would tokenize text again;
- before axolotl saves the model, the logits the trained model gives on the stage's probe and what the run
  measured, written for the stage to check the saved model against (train/axolotl_run.py).

A run stopped by a signal exits with ``StageInterrupted``'s code before axolotl would save the unfinished
model as if it were final.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from axolotl.common.datasets import TrainDatasetMeta
from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer
from axolotl.integrations.base import BasePlugin
from datasets import Dataset
from safetensors.torch import save_file
from transformers import AutoTokenizer

from hermes_pipeline.disk import check_free_space
from hermes_pipeline.errors import StageInterrupted, UserError
from hermes_pipeline.train.axolotl_config import EXPECTED, FACTS, FAILURE, PROBE
from hermes_pipeline.train.callbacks import (
    CheckFreeSpace,
    MetricsLog,
    SealCheckpoints,
    StopOnSignal,
    trainable_bytes,
)
from hermes_pipeline.train.checkpoints import FinishedResume
from hermes_pipeline.train.data import load_files
from hermes_pipeline.train.probe import logits, run_facts


def work_folder(cfg: Any) -> Path:
    """The stage's axolotl/ folder, beside ``checkpoints/`` (axolotl's output_dir)."""
    return Path(cfg.output_dir).parent / "axolotl"


def fail_in_one_line(output_dir: str, error: UserError) -> None:
    """Hand a one-line failure to the stage, which prints it as the TRL path would, and exit."""
    (Path(output_dir).parent / "axolotl" / FAILURE).write_text(f"{error}\n", encoding="utf-8")
    sys.exit(error.exit_code)


class OneLineFailures:
    """A Trainer mixin: a failure with a one-line message (our callbacks' full-disk checks) exits with it."""

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)  # type: ignore[misc]
        except UserError as error:
            fail_in_one_line(self.args.output_dir, error)  # type: ignore[attr-defined]


class HermesAxolotlTrainer(OneLineFailures, FinishedResume, AxolotlTrainer):
    """axolotl's SFT trainer, resuming a finished run without a step past its end, and training the last
    group of packed bins even when it holds fewer than ``micro_batch_size``."""

    def _create_multipack_sampler(self, base_sampler: Any, dataset: Dataset) -> Any:
        sampler = super()._create_multipack_sampler(base_sampler, dataset)
        if sampler.drop_last:  # axolotl fixes it on; count the batches again without the drop
            sampler.drop_last = False
            sampler._batches = None
            sampler._len_across_ranks = None
            len(sampler)
        return sampler


class HermesAxolotlDPOTrainer(OneLineFailures, FinishedResume, AxolotlDPOTrainer):
    """axolotl's DPO trainer over prep's pairs, already tokenized: TRL's preparation step is skipped."""

    def _prepare_dataset(self, dataset: Dataset, *args: Any, **kwargs: Any) -> Dataset:
        return dataset


class HermesPlugin(BasePlugin):
    def __init__(self) -> None:
        super().__init__()
        self.stopper = StopOnSignal()
        self.trainer: Any = None
        self.checked = False

    def load_datasets(self, cfg: Any, preprocess: bool = False) -> TrainDatasetMeta | None:
        """DPO only: prep's pairs as token ids, from the shard files the config lists."""
        if not cfg.rl:
            return None
        cache = work_folder(cfg) / "cache"
        train = load_files([d["path"] for d in cfg.datasets], "dpo", cache)
        val = (
            load_files([d["path"] for d in cfg.test_datasets or []], "dpo", cache)
            if cfg.test_datasets
            else None
        )
        steps = math.ceil(len(train) * cfg.num_epochs / cfg.batch_size)  # as axolotl counts them
        return TrainDatasetMeta(train_dataset=train, eval_dataset=val, total_num_steps=steps)

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list[Any]:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_config)
        metrics = Path(cfg.output_dir).parent / "metrics.jsonl"
        return [SealCheckpoints(tokenizer), self.stopper, CheckFreeSpace(), MetricsLog(metrics)]

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        self.trainer = trainer
        trainer.args.include_num_input_tokens_seen = "non_padding"  # as the TRL path counts

    def post_train(self, cfg: Any, model: Any) -> None:
        """Called right after training, before axolotl saves the model, and again at the very end."""
        if self.checked:
            return
        self.checked = True
        if self.stopper.stopped_at is not None:
            sys.exit(StageInterrupted.exit_code)
        try:
            check_free_space(
                Path(cfg.output_dir),
                trainable_bytes(model),
                then="free some space there and run the same command again: it resumes from the last checkpoint",
                what="the trained model",
            )
        except UserError as error:
            fail_in_one_line(cfg.output_dir, error)
        trainer = self.trainer
        eval_metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
        folder = work_folder(cfg)
        probe = torch.tensor(json.loads((folder / PROBE).read_text(encoding="utf-8")))
        expected = logits(
            model, {"input_ids": probe}
        )  # every rank: under ZeRO-3 the forward pass is collective
        if trainer.is_world_process_zero():
            train_metrics = next((h for h in reversed(trainer.state.log_history) if "train_runtime" in h), {})
            facts = run_facts(trainer, train_metrics, eval_metrics)
            save_file({"logits": expected.contiguous()}, str(folder / EXPECTED))
            (folder / FACTS).write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
