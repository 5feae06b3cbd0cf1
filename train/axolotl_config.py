"""The axolotl config for a training stage: the recipe's settings, pointed at the tokens prep wrote.

The stage writes it into its folder (``axolotl/config.yaml``), kept and readable: a user can rerun it with
``axolotl train`` from axolotl's environment. Both backends train on the same rows:

- SFT reads prep's shards rewritten as pre-tokenized parquet (exactly ``input_ids``, ``attention_mask`` and
  ``labels``, no ``type:``), so axolotl applies no prompt strategy and adds no BOS or EOS; with
  ``excess_length_strategy: raise`` it never drops a row without a word.
- DPO reads prep's pair shards through our plugin (axolotl has no route for tokenized pairs), so multi-turn
  prompts and tool calls reach the loss exactly as prep rendered them.

Facts checked against axolotl 0.19.0 (transformers 5.16.1, TRL 1.9.0):

- its validation drops unknown keys without a word; ``axolotl_validate.py`` lists them, and the tests
  check every shipped recipe's config has none;
- on CPU, packing keeps rows apart only with ``attn_implementation: sdpa`` and ``sdpa_varlen: false``
  (its varlen kernel is CUDA-only);
- ``bf16: auto`` turns fp16 on when no bf16 GPU is found, so precision is always spelled out;
- ``seed`` has no applied default, and an unseeded merge shuffles rows differently on every run;
- ``save_total_limit`` falls back to 4 when unset;
- its dataloaders drop the last, smaller batch unless told not to, and its packing sampler always does
  (the plugin's trainer turns that off).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hermes_pipeline.recipe.schema import DpoStage, LoraSection, Recipe, SftStage, TrainStage

PLUGIN = "hermes_pipeline.train.axolotl_plugin.HermesPlugin"
TRAINERS = {
    "sft": "hermes_pipeline.train.axolotl_plugin.HermesAxolotlTrainer",
    "dpo": "hermes_pipeline.train.axolotl_plugin.HermesAxolotlDPOTrainer",
}
# Files in the stage's axolotl/ folder: the probe the stage writes before the run; then, from the plugin,
# the trained model's logits on it, what the run measured, or a one-line failure (a full disk, say).
PROBE = "probe.json"
EXPECTED = "expected_logits.safetensors"
FACTS = "facts.json"
FAILURE = "failure.txt"
_SCHEDULERS = {"cosine_with_min_lr": "cosine"}  # axolotl's cosine takes its floor from cosine_min_lr_ratio


def axolotl_config(
    recipe: Recipe,
    name: str,
    model_dir: Path,
    train_files: list[Path],
    val_files: list[Path],
    out: Path,
    new_token_ids: list[int],
    wandb: dict[str, str] | None,
) -> dict[str, Any]:
    """The config for stage ``name`` starting from ``model_dir`` (which holds the tokenizer prep used),
    training on ``train_files``, evaluating on ``val_files`` and writing checkpoints to ``out``."""
    stage: SftStage | DpoStage = getattr(recipe, name)
    config: dict[str, Any] = {
        "base_model": str(model_dir),
        "tokenizer_config": str(model_dir),
        "plugins": [PLUGIN],
        "trainer_cls": TRAINERS[name],
        "datasets": [_dataset(path, name) for path in train_files],
        "dataset_prepared_path": str(out.parent / "axolotl" / "prepared"),
        "shuffle_merged_datasets": False,  # prep shuffled with the recipe's seed; keep its order
        "excess_length_strategy": "raise",
        "val_set_size": 0,
        "sequence_len": recipe.data.max_seq_len,
        "attn_implementation": recipe.model.attn_implementation,
        "seed": recipe.seed,
        "micro_batch_size": stage.micro_batch_size,
        "eval_batch_size": stage.micro_batch_size,
        "gradient_accumulation_steps": stage.gradient_accumulation_steps,
        "learning_rate": stage.learning_rate,
        "lr_scheduler": _SCHEDULERS.get(stage.lr_scheduler, stage.lr_scheduler),
        "warmup_ratio": stage.warmup_ratio,
        "optimizer": stage.optimizer,
        "weight_decay": stage.weight_decay,
        "max_grad_norm": stage.max_grad_norm,
        "bf16": stage.precision == "bf16",
        "fp16": stage.precision == "fp16",
        "tf32": False,
        "gradient_checkpointing": stage.gradient_checkpointing,
        "output_dir": str(out),
        "save_strategy": "steps",
        "save_steps": stage.save_steps,
        "save_total_limit": stage.save_total_limit,
        "logging_steps": stage.logging_steps,
        "dataset_num_proc": recipe.data.num_proc,
        "dataloader_num_workers": 0,
        "dataloader_drop_last": False,  # axolotl's default drops the last, smaller batch
    }
    if val_files:
        # Evaluated once, after training, by the plugin (as the TRL path does). No eval_strategy: set to
        # anything, even "no", axolotl also evaluates before the first step (and again on every resume).
        config["test_datasets"] = [_dataset(path, name) for path in val_files]
    if isinstance(stage, DpoStage):
        config |= {
            "rl": "dpo",
            "rl_beta": stage.beta,
            "dpo_loss_type": [stage.loss_type],
            "precompute_ref_log_probs": stage.precompute_ref_log_probs,
        }
    elif stage.packing:
        # Packed in prep's (already shuffled) order, the same bins every epoch: axolotl's random packing
        # fixes each epoch's batch count from the first packing and silently drops the rows a later
        # epoch's packing does not fit (1 and 8 of the tiny recipe's 4,983 rows in epochs 2 and 3).
        # Evaluation runs unpacked, so every validation row counts.
        config |= {
            "sample_packing": True,
            "sample_packing_sequentially": True,
            "curriculum_sampling": True,
            "eval_sample_packing": False,
            "sdpa_varlen": False,
        }
    if stage.lr_scheduler == "cosine_with_min_lr":
        config["cosine_min_lr_ratio"] = 0.1  # the TRL path's min_lr_rate
    if stage.max_steps:
        config["max_steps"] = stage.max_steps
    config["num_epochs"] = stage.num_epochs
    if stage.deepspeed:
        config["deepspeed"] = str(Path(stage.deepspeed).resolve())
    if stage.mode != "full":
        config |= _lora(stage, new_token_ids)
    config |= wandb or {"wandb_mode": "disabled"}
    return config


def _dataset(path: Path, name: str) -> dict[str, Any]:
    if name == "sft":
        return {"path": str(path), "ds_type": "parquet", "split": "train"}
    return {"path": str(path), "split": "train"}  # read by our plugin, not by axolotl's DPO strategies


def _lora(stage: TrainStage, new_token_ids: list[int]) -> dict[str, Any]:
    """The adapter keys; the chat tokens' embedding rows and the LM head train as on the TRL path."""
    lora = stage.lora or LoraSection()
    keys: dict[str, Any] = {
        "adapter": "qlora" if stage.mode == "qlora" else "lora",
        "lora_r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
    }
    if lora.target_modules == "all-linear":
        keys["lora_target_linear"] = True
    else:
        keys["lora_target_modules"] = list(lora.target_modules)
    if lora.train_new_tokens:
        keys["peft_trainable_token_indices"] = {"embed_tokens": new_token_ids}
        keys["lora_modules_to_save"] = ["lm_head"]
    if stage.mode == "qlora":
        keys["load_in_4bit"] = True
    return keys
