"""PNG curves from metrics.jsonl: people would rather look at a curve than read numbers."""

from __future__ import annotations

import json
from pathlib import Path

# Panels per stage: (file name, title, metric keys drawn together).
LOSS_PANELS = [
    ("loss", "training loss", ["loss", "eval_loss"]),
    ("learning_rate", "learning rate", ["learning_rate"]),
]
PANELS = {
    "projector": LOSS_PANELS,
    "sft": LOSS_PANELS,
    "dpo": [
        ("loss", "DPO loss", ["loss", "eval_loss"]),
        ("learning_rate", "learning rate", ["learning_rate"]),
        ("rewards", "implicit rewards", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
        ("accuracy", "reward accuracy", ["rewards/accuracies", "eval_rewards/accuracies"]),
    ],
}


def read_metrics(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_plots(metrics_path: Path, stage: str, out_dir: Path) -> list[Path]:
    """One PNG per panel that has data; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, title, keys in PANELS[stage]:
        series = {key: [(r["step"], r[key]) for r in records if key in r] for key in keys}
        series = {key: points for key, points in series.items() if points}
        if not series:
            continue
        figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
        for key, points in series.items():
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker="o" if len(points) < 3 else None, label=key)
        axes.set(title=f"{stage}: {title}", xlabel="step")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        path = out_dir / f"{name}.png"
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written
