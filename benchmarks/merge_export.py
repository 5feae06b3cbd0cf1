"""Peak memory and wall time of the LoRA merge, a SLERP model merge and the GGUF export on a ~1 GB model.

Why: the merge stage must handle 70B models on nodes whose RAM is a fraction of the model, so the LoRA merge
streams one shard at a time; the target is a peak RSS of at most 1.5x the largest shard plus the adapter.
peft's merge_and_unload (whole model in memory) is measured beside it as the baseline. Each measurement runs
in a fresh process, so one peak does not hide another; RSS is sampled every 20 ms from /proc (total, and the
anonymous part alone: memory-mapped shard pages count towards RSS but are page cache the kernel can drop).

    python benchmarks/merge_export.py [--hidden 2048] [--layers 8] [--shard-size 300MB] [--out DIR] [--json PATH]

Steps, all on generated weights (nothing is downloaded):
  1. a Llama-shaped bf16 model (default hidden 2048, 8 layers, vocabulary 32,064: about 1.07 GB in shards of
     --shard-size), a second one with other weights, and a rank-16 LoRA adapter on every linear layer that
     also saves the LM head whole (as our LoRA training does);
  2. LoRA merge, streamed (merge.lora.merge_adapters) against peft's merge_and_unload + save_pretrained;
  3. SLERP of the two models through mergekit (merge.models.merge_models);
  4. GGUF: llama.cpp's converter to f16, then llama.cpp's quantizer to Q4_K_M.
Verification (reloading the whole model to compare logits) is not part of these figures: it is a separate
pass that needs the model in memory by design.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VOCAB = 32064


def _rss_kib() -> tuple[int, int]:
    fields = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmRSS"].split()[0]), int(fields["RssAnon"].split()[0])


def measured(work: Callable[[], None]) -> dict[str, float]:
    """Run ``work`` here, sampling RSS, and return wall time and peaks above the starting RSS (in MB)."""
    start_total, start_anon = _rss_kib()
    peaks = [start_total, start_anon]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            total, anon = _rss_kib()
            peaks[0], peaks[1] = max(peaks[0], total), max(peaks[1], anon)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    work()
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    return {
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(peaks[0] / 1024),
        "peak_anon_mb": round(peaks[1] / 1024),
        "baseline_rss_mb": round(start_total / 1024),
        "added_rss_mb": round((peaks[0] - start_total) / 1024),
        "added_anon_mb": round((peaks[1] - start_anon) / 1024),
    }


def build_inputs(folder: Path, hidden: int, layers: int, shard_size: str) -> None:
    """Two models and an adapter, written tensor by tensor (this process never holds a whole model)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hermes_pipeline.chat_format.tokens import save_tokenizer
    from hermes_pipeline.merge.shards import parse_size, write_shards
    from hermes_pipeline.tiny import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    config = LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.6875),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    for seed, name in ((1, "base"), (2, "other")):
        out = folder / name
        out.mkdir()
        generator = torch.Generator().manual_seed(seed)

        def tensors(generator: torch.Generator = generator) -> object:
            for key, shape in shapes.items():
                if key.endswith("norm.weight"):
                    yield key, torch.ones(shape, dtype=torch.bfloat16)
                else:
                    yield key, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

        write_shards(tensors(), out, parse_size(shard_size))
        config.save_pretrained(out)
        save_tokenizer(tokenizer, out)
    write_adapter(folder / "adapter", shapes, folder / "base")
    save_tokenizer(tokenizer, folder / "adapter")


def write_adapter(folder: Path, shapes: dict, base: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from hermes_pipeline.train.model import record_adapter_base

    folder.mkdir()
    generator = torch.Generator().manual_seed(3)
    weights, targets = {}, set()
    for name, shape in shapes.items():
        if ".layers." in name and len(shape) == 2:
            module = name.removesuffix(".weight")
            targets.add(module.rsplit(".", 1)[-1])
            weights[f"base_model.model.{module}.lora_A.weight"] = torch.randn(
                16, shape[1], generator=generator
            ).to(torch.bfloat16)
            weights[f"base_model.model.{module}.lora_B.weight"] = (
                torch.randn(shape[0], 16, generator=generator) * 0.01
            ).to(torch.bfloat16)
    weights["base_model.model.lm_head.weight"] = (
        torch.randn(shapes["lm_head.weight"], generator=generator) * 0.02
    ).to(torch.bfloat16)
    save_file(weights, folder / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "modules_to_save": ["lm_head"],
        "bias": "none",
        "base_model_name_or_path": str(base),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    record_adapter_base(folder, str(base))


def run_case(case: str, folder: Path, shard_size: str) -> dict[str, float]:
    """One measurement, in this (fresh) process."""
    import torch

    from hermes_pipeline.merge.shards import parse_size

    torch.set_num_threads(os.cpu_count() or 1)
    out = folder / f"out-{case}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    if case == "lora_streamed":
        from hermes_pipeline.merge.lora import merge_adapters

        return measured(
            lambda: merge_adapters(str(folder / "base"), [folder / "adapter"], out, parse_size(shard_size))
        )
    if case == "lora_peft":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        def peft_merge() -> None:
            model = AutoModelForCausalLM.from_pretrained(folder / "base", dtype=torch.bfloat16)
            merged = PeftModel.from_pretrained(model, str(folder / "adapter")).merge_and_unload()
            merged.save_pretrained(out, max_shard_size=shard_size)

        return measured(peft_merge)
    if case == "slerp":
        from hermes_pipeline.merge.models import merge_models
        from hermes_pipeline.recipe.schema import ModelMerge

        spec = ModelMerge.model_validate(
            {
                "method": "slerp",
                "models": [{"model": str(folder / "base")}, {"model": str(folder / "other")}],
                "base_model": str(folder / "base"),
                "parameters": {"t": 0.5},
                "dtype": "bfloat16",
            }
        )
        return measured(lambda: merge_models(spec, out / "model", 64, shard_size, 0))
    if case == "gguf_f16":
        from hermes_pipeline.merge.gguf import convert

        return measured(lambda: convert(folder / "base", out / "model-f16.gguf", "f16", log=lambda _: None))
    if case == "gguf_q4_k_m":
        from hermes_pipeline.merge.gguf import convert, quantize

        source = folder / "model-f16.gguf"
        if not source.is_file():
            convert(folder / "base", source, "f16", log=lambda _: None)
        return measured(lambda: quantize(source, out / "model-Q4_K_M.gguf", "q4_k_m"))
    raise ValueError(case)


CASES = ("lora_streamed", "lora_peft", "slerp", "gguf_f16", "gguf_q4_k_m")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shard-size", default="300MB")
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()

    folder = args.out or Path(tempfile.mkdtemp(prefix="merge-bench-"))
    if args.case:  # a child process: one measurement, printed as JSON
        print(json.dumps(run_case(args.case, folder, args.shard_size)))
        return
    from hermes_pipeline.merge.shards import shard_files

    print(f"building inputs in {folder}", file=sys.stderr)
    build_inputs(folder, args.hidden, args.layers, args.shard_size)
    largest = max(p.stat().st_size for p in shard_files(folder / "base")) / 1e6
    adapter = (folder / "adapter" / "adapter_model.safetensors").stat().st_size / 1e6
    model = sum(p.stat().st_size for p in shard_files(folder / "base")) / 1e6
    results = {}
    for case in CASES:
        print(f"measuring {case}", file=sys.stderr)
        command = [
            sys.executable,
            __file__,
            "--case",
            case,
            "--out",
            str(folder),
            "--shard-size",
            args.shard_size,
        ]
        line = (
            subprocess.run(command, check=True, capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        results[case] = json.loads(line)
    target = 1.5 * largest + adapter
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model_mb": round(model),
        "largest_shard_mb": round(largest),
        "adapter_mb": round(adapter),
        "target_mb": round(target),
        "results": results,
    }
    print(
        f"model {model:,.0f} MB in shards of <= {largest:,.0f} MB; adapter {adapter:,.0f} MB; target {target:,.0f} MB"
    )
    print("| run | wall s | peak RSS MB | added RSS MB | added anon MB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for case, r in results.items():
        print(
            f"| {case} | {r['wall_s']} | {r['peak_rss_mb']:,} | {r['added_rss_mb']:,} | {r['added_anon_mb']:,} |"
        )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if args.out is None:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
