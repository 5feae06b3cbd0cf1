"""A training stage through axolotl: the stage contract on our side, the training loop on axolotl's.

Every rank of the stage (one process, or torchrun's workers, on one node or under srun on many) runs
``train_with_axolotl``. The main rank claims the checkpoints, removes unsealed ones and writes the run's
inputs into ``<stage>/axolotl/``: the starting model, the data as axolotl reads it, the probe and the
config. Then every rank starts axolotl's trainer in axolotl's environment as its child, with the
launcher's rank variables, so axolotl's processes form the distributed job that torchrun set up. Our
process holds no process group of its own. The child dies with it (a kill of the stage kills the
training), and the stop signals SLURM sends before a time limit reach it through us.

When axolotl has saved the model, the main rank moves it into ``model.partial`` and hands it to the
stage's usual check: reloaded, it must reproduce the logits the plugin recorded from the trained model in
memory.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer

from hermes_pipeline.axolotl_env import ensure_env
from hermes_pipeline.chat_format.tokens import save_tokenizer
from hermes_pipeline.children import run_child
from hermes_pipeline.errors import StageInterrupted, UserError
from hermes_pipeline.models import is_adapter, load_model
from hermes_pipeline.recipe.schema import Recipe, TrainStage
from hermes_pipeline.rundir import stage_dir
from hermes_pipeline.train.axolotl_config import EXPECTED, FACTS, FAILURE, PROBE, axolotl_config
from hermes_pipeline.train.checkpoints import latest_complete, remove_unusable
from hermes_pipeline.train.data import load_split, shard_files
from hermes_pipeline.train.launch import is_main_process
from hermes_pipeline.train.model import chat_token_ids, starting_point
from hermes_pipeline.train.stage import (
    StageName,
    Trained,
    claim_checkpoints,
    model_partial,
    probe_rows,
    tokens_seen,
)
from hermes_pipeline.train.tracking import configure_wandb, run_name

CONFIG = "config.yaml"
READY = "ready.json"  # written by the main rank once the inputs are in place, naming the attempt
# What axolotl's final save writes into its output_dir that is the model (tokenizer files come from prep).
MODEL_FILES = ("config.json", "generation_config.json", "adapter_config.json")
MODEL_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "adapter_model*.safetensors")


def train_with_axolotl(
    recipe: Recipe, name: StageName, fingerprint: str, inputs: dict[str, str], force: bool, log: Any
) -> Trained | None:
    out = stage_dir(recipe, name)
    work = out / "axolotl"
    python = ensure_env(log=log)
    main = is_main_process()
    if main:
        claim_checkpoints(out, fingerprint, inputs, force)
        for folder, reason in remove_unusable(out / "checkpoints"):
            log(f"{name}: removed {folder.name}: {reason}")
        resume = latest_complete(out / "checkpoints")
        if resume is not None:
            log(f"{name}: resuming from {resume.name}")
        tokenizer = write_inputs(recipe, name, work, python, fresh=resume is None)
        (work / READY).write_text(json.dumps({"attempt": _attempt(), "resume": str(resume or "")}) + "\n")
        tokens_before = tokens_seen(resume)  # read now: the checkpoint may be rotated away during training
    else:
        resume = _wait_ready(work)
    command = [str(python), "-m", "axolotl.cli.train", str(work / CONFIG)]
    if resume is not None:
        command.append(f"--resume_from_checkpoint={resume}")
    code = run_child(command, env={**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"})
    if code == StageInterrupted.exit_code:
        raise StageInterrupted(
            f"{name}: stopped by a signal after saving a checkpoint; run the same command again to resume"
        )
    if code != 0:
        if (work / FAILURE).is_file():
            raise UserError((work / FAILURE).read_text(encoding="utf-8").strip())
        raise RuntimeError(
            f"{name}: axolotl exited with status {code}; its output is above, its config is {work / CONFIG}"
        )
    if not main:
        return None
    partial = _collect_model(out)
    probe = {"input_ids": torch.tensor(json.loads((work / PROBE).read_text(encoding="utf-8")))}
    expected = load_file(str(work / EXPECTED))["logits"]
    facts = json.loads((work / FACTS).read_text(encoding="utf-8"))
    return Trained(partial, tokenizer, probe, expected, facts, resume, tokens_before)


def write_inputs(recipe: Recipe, name: StageName, work: Path, python: Path, fresh: bool) -> Any:
    """The starting model, the data, the probe and the config, in ``work``; returns prep's tokenizer.

    A fresh run starts from an empty ``work``: axolotl reuses its prepared dataset by the config's hash, not
    the data's, so an old one would outlive a new prep. A resumed run keeps the starting model and the data
    it began with (its checkpoints were claimed by this recipe and these inputs)."""
    out, prep = stage_dir(recipe, name), stage_dir(recipe, "prep")
    if fresh:
        shutil.rmtree(work, ignore_errors=True)
    for stale in (CONFIG, EXPECTED, FACTS, FAILURE, READY):
        (work / stale).unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(prep / "tokenizer")
    model_dir = _starting_model(recipe, name, tokenizer, work / "start")
    train = [Path(f) for f in shard_files(prep, name, "train")]
    val = [Path(f) for f in shard_files(prep, name, "val")]
    if name == "sft":  # pre-tokenized rows, in the exact columns axolotl takes them in
        train, val = _sft_files(train, work / "data"), _sft_files(val, work / "data")
    cache = out / "cache"
    column = "input_ids" if name == "sft" else "prompt_ids"
    probe_split = load_split(prep, name, "val", cache)
    if probe_split is None:
        probe_split = load_split(prep, name, "train", cache)
    (work / PROBE).write_text(json.dumps(probe_rows(probe_split, column).tolist()) + "\n", encoding="utf-8")
    report_to = configure_wandb(recipe, out)
    wandb = None
    if report_to:
        wandb = {
            "wandb_project": os.environ["WANDB_PROJECT"],
            "wandb_name": run_name(recipe, name),
            "wandb_mode": os.environ["WANDB_MODE"],
        }
    config = axolotl_config(
        recipe, name, model_dir, train, val, out / "checkpoints", chat_token_ids(tokenizer), wandb
    )
    header = (
        f"# axolotl config for the {name} stage of recipe {recipe.name}, written by hermes-pipeline.\n"
        f"# To rerun by hand: {python.parent / 'axolotl'} train {work / CONFIG}\n"
    )
    (work / CONFIG).write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return tokenizer


def _starting_model(recipe: Recipe, name: StageName, tokenizer: Any, folder: Path) -> Path:
    """A folder axolotl can load the stage's starting weights from.

    A full model another stage of this run wrote is used as it is. Anything else (a base model built from
    config or from the Hub, a LoRA stage's adapter) is loaded the way the TRL path loads it (embeddings
    grown for the chat tokens, EOS and pad set, adapters merged) and saved once, so both backends start
    from the same weights."""
    stage: TrainStage = getattr(recipe, name)
    source = starting_point(recipe, name)
    if stage.init_from in ("sft", "merge") and source is not None and not is_adapter(Path(source)):
        return Path(source)
    if (folder / "config.json").is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model = load_model(recipe, stage, tokenizer, source)
    model.save_pretrained(partial)
    save_tokenizer(tokenizer, partial)
    partial.rename(folder)
    return folder


def _sft_files(shards: list[Path], folder: Path) -> list[Path]:
    """Prep's SFT shards with exactly the columns axolotl's pre-tokenized route reads; a mask of ones,
    since rows are never padded here (with packing, axolotl builds the attention from position ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for shard in shards:
        table = pq.read_table(shard, columns=["input_ids", "labels"])
        ones = pa.array(
            [[1] * len(ids) for ids in table.column("input_ids").to_pylist()], pa.list_(pa.int8())
        )
        table = table.append_column("attention_mask", ones).select(["input_ids", "attention_mask", "labels"])
        target = folder / shard.name
        pq.write_table(table, target)
        written.append(target)
    return written


def _collect_model(out: Path) -> Path:
    """Move the model axolotl saved among the checkpoints into ``model.partial``."""
    source, partial = out / "checkpoints", model_partial(out)
    shutil.rmtree(partial, ignore_errors=True)  # left by an attempt killed before its rename
    partial.mkdir(parents=True)
    found = [source / n for n in MODEL_FILES if (source / n).is_file()]
    found += [p for pattern in MODEL_PATTERNS for p in source.glob(pattern)]
    if not any(p.suffix == ".safetensors" for p in found):
        raise RuntimeError(f"axolotl finished but saved no weights in {source}")
    for path in found:
        path.replace(partial / path.name)
    return partial


def _attempt() -> str:
    """This launch, the same on every rank: torchrun's run id and restart count."""
    return f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}:{os.environ.get('TORCHELASTIC_RESTART_COUNT', '')}"


def _wait_ready(work: Path) -> Path | None:
    """On the other ranks: wait until the main rank has written this attempt's inputs."""
    while True:
        try:
            ready = json.loads((work / READY).read_text(encoding="utf-8"))
            if ready["attempt"] == _attempt():
                return Path(ready["resume"]) if ready["resume"] else None
        except (OSError, ValueError):
            pass
        time.sleep(1)
