"""The fixed batch that checks a saved model against the one that was trained, and what a run measured.

Light on purpose: the axolotl backend's plugin (train/axolotl_plugin.py) imports it inside axolotl's own
environment, so both backends compute the expected logits and the run's figures the same way.
"""

from __future__ import annotations

import resource
from typing import Any

import torch

PROBE_ROWS = 2
PROBE_TOKENS = 64


def probe_batch(rows: list[list[int]]) -> torch.Tensor:
    """The first tokens of the first rows, cut to one width: the same batch on every rank."""
    rows = [row[:PROBE_TOKENS] for row in rows[:PROBE_ROWS]]
    width = min(len(r) for r in rows)
    return torch.tensor([r[:width] for r in rows])


@torch.no_grad()
def logits(model: torch.nn.Module, probe: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's fp32 logits on ``probe`` (its keyword inputs: ids, and pixels for a Vision model), in eval
    mode (no dropout), leaving its mode as it was."""
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    out = model(**{key: value.to(device) for key, value in probe.items()}).logits.float().cpu()
    model.train(was_training)
    return out


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_facts(
    trainer: Any, train_metrics: dict[str, float], eval_metrics: dict[str, float]
) -> dict[str, Any]:
    """What a finished ``train()`` call measured, from the trainer that ran it.

    ``train_runtime`` covers this process only, so a resumed run's speed counts only the tokens it saw.
    """
    return {
        "steps": trainer.state.global_step,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "train_runtime_s": round(train_metrics.get("train_runtime", 0.0), 2),
        "world_size": trainer.args.world_size,
        "peak_memory_gib": round(peak_memory_gib(), 3),
        "eval": eval_metrics,
    }
