"""SFT throughput of the two training backends, TRL and axolotl, side by side on the tiny recipe.

Why: the axolotl backend trains on the very rows the TRL path trains on (tests/test_axolotl.py), so what
is left to choose between them is speed. Each candidate is the real stage command (`hermes-pipeline train
sft` with `sft.backend` set), on the same prep shards and from the same starting weights, and the two take
turns, `--rounds` times, because this machine's speed swings within minutes.

    python benchmarks/backends.py [--steps 300] [--rounds 2] [--json PATH]

Figures come from each stage's summary.json: real (non-pad) tokens per second of training, start-up and
the final save left out, and the stage's whole wall time (for axolotl, starting its environment's
processes and preparing its dataset too). Packing differs: TRL packs best-fit-decreasing, the axolotl
backend packs in prep's order (see train/axolotl_config.py), so the step counts per epoch differ too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "recipes" / "tiny.yaml"
BACKENDS = ("trl", "axolotl")


def stage(run_dir: Path, *command: str, overrides: tuple[str, ...] = ()) -> None:
    args = [sys.executable, "-m", "hermes_pipeline.cli", *command, str(RECIPE), "--set", f"run_dir={run_dir}"]
    for override in overrides:
        args += ["--set", override]
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared"
        stage(prepared, "prep")
        for round_ in range(args.rounds):
            for backend in BACKENDS:
                run_dir = Path(scratch) / f"{backend}-{round_}"
                shutil.copytree(prepared / "prep", run_dir / "prep")
                print(f"round {round_ + 1}: {backend}", file=sys.stderr)
                settings = (
                    f"sft.backend={backend}",
                    f"sft.max_steps={args.steps}",
                    f"sft.save_steps={args.steps}",
                )
                stage(run_dir, "train", "sft", overrides=settings)
                summary = json.loads((run_dir / "sft" / "summary.json").read_text())
                results.append({"round": round_ + 1, "backend": backend, **summary})
                shutil.rmtree(run_dir)
    print(f"SFT, tiny recipe, {args.steps} steps per run, {args.rounds} rounds in turns\n")
    print("| backend | tokens/s (each round) | median | training s | stage wall s | tokens seen |")
    print("|---|---:|---:|---:|---:|---:|")
    medians = {}
    for backend in BACKENDS:
        mine = [r for r in results if r["backend"] == backend]
        speeds = [float(r["tokens_per_second"]) for r in mine]
        medians[backend] = statistics.median(speeds)
        print(
            f"| {backend} | {', '.join(f'{s:,.0f}' for s in speeds)} | {medians[backend]:,.0f} "
            f"| {statistics.median(float(r['train_runtime_s']) for r in mine):.1f} "
            f"| {statistics.median(float(r['wall_time_s']) for r in mine):.1f} | {mine[0]['tokens_seen']:,} |"
        )
    print(f"\naxolotl / TRL, median tokens/s: {medians['axolotl'] / medians['trl']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
