"""Trainer callbacks: sealed checkpoints, a local metrics log, and a clean stop on a preemption signal."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import (
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from hermes_pipeline.chat_format.tokens import save_tokenizer
from hermes_pipeline.children import STOP_SIGNALS
from hermes_pipeline.disk import check_free_space, folder_bytes
from hermes_pipeline.train.checkpoints import checkpoints, seal
from hermes_pipeline.train.launch import barrier


class SealCheckpoints(TrainerCallback):
    """Mark a checkpoint complete once every rank has written its part, and give it our tokenizer files."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        barrier()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            save_tokenizer(self.tokenizer, folder)
            seal(folder, state.global_step)
        barrier()


class CheckFreeSpace(TrainerCallback):
    """Before each checkpoint, check that its folder's disk can take one more of the same size.

    The size is the newest checkpoint's on disk; before the first one, the trainable weights with two
    fp32 optimizer moments each (and DeepSpeed's fp32 master copy). Place it after every callback that may
    ask for a save."""

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not control.should_save:
            return
        folder = Path(args.output_dir)
        previous = checkpoints(folder)
        needed = folder_bytes(previous[-1]) if previous else trainable_bytes(kwargs["model"], 12)
        resume = f"it resumes from {previous[-1].name}" if previous else "it starts over"
        check_free_space(
            folder,
            needed,
            then=f"free some space there and run the same command again: {resume}",
            what=f"checkpoint-{state.global_step}",
        )


def trainable_bytes(model: torch.nn.Module, extra_per_parameter: int = 0) -> int:
    """Bytes of the weights a save writes: every trainable parameter (the whole model when training in
    full, the adapter with LoRA), plus ``extra_per_parameter`` for optimizer state."""
    total = 0
    for parameter in model.parameters():
        if parameter.requires_grad:
            numel = getattr(parameter, "ds_numel", parameter.numel())  # ZeRO-3 leaves each rank a slice
            total += numel * (parameter.element_size() + extra_per_parameter)
    return total


class MetricsLog(TrainerCallback):
    """Every logged value as one JSON line, beside the checkpoints, for plots and for people.

    A resumed run first drops the lines a killed run logged after its last checkpoint, so the file reads as
    one uninterrupted run. The loss is also logged at every save and at the last step: each checkpoint then
    ends a logged interval, so the lines of a resumed run cover every step exactly once and ``mean_loss``
    reads the same whole-run loss as an uninterrupted run's. Place it after any callback that asks for a save.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if not state.is_world_process_zero or not self.path.is_file():
            return
        # The end-of-training line goes too: a run killed after it, before its manifest, writes it again.
        kept = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line
            and (record := json.loads(line))["step"] <= state.global_step
            and "train_loss" not in record
        ]
        self.path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **_: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


class StopOnSignal(TrainerCallback):
    """On SIGUSR1 or SIGTERM, finish the current step, save a checkpoint and stop; the next run resumes.

    The flag is reduced across ranks every step, so a signal that reaches any one process stops all of
    them at the same step.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}

    def _request(self, number: int, frame: object) -> None:
        self.requested = True

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        self._previous = {number: signal.signal(number, self._request) for number in STOP_SIGNALS}

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        flag = torch.tensor(float(self.requested), device=args.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step


def mean_loss(path: Path) -> float | None:
    """The training loss averaged over every step of the run, from the lines ``MetricsLog`` wrote.

    transformers reports the mean over the steps of one ``train()`` call only, which after a resume leaves
    out everything before the checkpoint. Each logged loss is the mean since the previous log, so the
    whole-run mean weights it by the steps it covers.
    """
    total, covered = 0.0, 0
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "loss" in record:
            total += record["loss"] * (record["step"] - covered)
            covered = record["step"]
    return total / covered if covered else None
