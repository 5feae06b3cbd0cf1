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
from hermes_pipeline.train.checkpoints import seal
from hermes_pipeline.train.launch import barrier

# SLURM sends USR1 ahead of the time limit when asked (--signal=B:USR1@300); TERM comes with preemption.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


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


class MetricsLog(TrainerCallback):
    """Every logged value as one JSON line, beside the checkpoints, for plots and for people.

    A resumed run first drops the lines a killed run logged after its last checkpoint, so the file reads as
    one uninterrupted run.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if not state.is_world_process_zero or not self.path.is_file():
            return
        kept = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line and json.loads(line)["step"] <= state.global_step
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
