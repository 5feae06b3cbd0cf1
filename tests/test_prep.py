"""The prep stage end to end on fixtures in the Hub schemas: accounting, masks, mixture decisions, outputs."""

import json
import pickle
import subprocess
import sys
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from prep_support import FIXTURES, ROOT, TEXT_SOURCES, prep, rows, write_recipe
from tokenizers import normalizers
from transformers import AutoTokenizer

from hermes_pipeline.chat_format.templates import render
from hermes_pipeline.chat_format.tokens import IM_END, save_tokenizer
from hermes_pipeline.chat_format.tool_calls import ToolCall, render_tool_calls
from hermes_pipeline.cli import main
from hermes_pipeline.data_prep import pipeline, sources
from hermes_pipeline.data_prep.mixture import Decontaminator, seeded_hash
from hermes_pipeline.data_prep.pipeline import Spool, WorkerPool, load_tokenizer, run_prep
from hermes_pipeline.data_prep.tokenize import IGNORE_INDEX, VICUNA_SYSTEM
from hermes_pipeline.data_prep.workers import Outcome, plain_tokenizer_matches
from hermes_pipeline.readers import iter_records


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return prep(write_recipe(tmp_path_factory.mktemp("text"), TEXT_SOURCES))


def test_every_row_is_accounted_for(text_run: tuple[Path, dict[str, Any]]) -> None:
    out, report = text_run
    rejects = Counter(json.loads(line)["source"] for line in (out / "rejects.jsonl").read_text().splitlines())
    for spec in TEXT_SOURCES:
        stats = report["sources"][spec["name"]]
        assert stats["rows_in"] == sum(1 for _ in iter_records(str(FIXTURES / spec["path"])))
        assert stats["rows_in"] == stats["rows_out"] + stats["rejected"]
        assert stats["rejected"] == sum(stats["rejects_by_reason"].values()) == rejects[spec["name"]]
    written = Counter(r["source"] for stage in ("sft", "dpo") for r in rows(out, stage))
    assert written == Counter({k: v["rows_out"] for k, v in report["sources"].items() if v["rows_out"]})


def test_report_has_lengths_tokens_and_outputs(text_run: tuple[Path, dict[str, Any]]) -> None:
    out, report = text_run
    assert set(report["token_lengths"]) == {"sft", "dpo"}
    assert report["token_lengths"]["sft"]["max"] <= 1024
    assert report["totals"]["tokens"] > report["totals"]["trained_tokens"] > 0
    for stage, splits in report["outputs"].items():
        for split, info in splits.items():
            assert (
                sum(pq.ParquetFile(out / shard).metadata.num_rows for shard in info["shards"]) == info["rows"]
            )
            assert all(shard.startswith(f"{stage}/{split}-") for shard in info["shards"])
    assert (out / "MANIFEST.json").is_file() and (out / "tokenizer" / "tokenizer_config.json").is_file()


def _expected_trained_text(row: dict[str, Any]) -> str:
    """What an SFT row must train on: every weighted assistant turn as the template writes it, plus EOS."""
    texts = []
    for msg in row["messages"]:
        if msg["role"] != "assistant" or msg.get("weight", 1.0) == 0:
            continue
        calls = msg.get("tool_calls")
        body = (
            render_tool_calls([ToolCall(c["name"], c["arguments"]) for c in calls])
            if calls
            else msg["content"]
        )
        texts.append(body + IM_END)
    return "".join(texts)


def _trained_runs(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i, (token, label) in enumerate(zip(input_ids, labels, strict=True)):
        if label == IGNORE_INDEX:
            continue
        assert label == token
        if i == 0 or labels[i - 1] == IGNORE_INDEX:
            runs.append([])
        runs[-1].append(token)
    return runs


def test_sft_labels_are_exactly_the_assistant_turns(text_run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = text_run
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    checked = Counter()
    for prepared in rows(out, "sft"):
        row = json.loads(prepared["row"])
        runs = _trained_runs(prepared["input_ids"], prepared["labels"])
        assert all(run[-1] == tokenizer.convert_tokens_to_ids(IM_END) for run in runs), (
            "every turn ends trained on EOS"
        )
        trained = "".join(tokenizer.decode(run, skip_special_tokens=False) for run in runs)
        assert trained == _expected_trained_text(row)
        text = render(row["messages"], tools=row.get("tools"), bos_token=tokenizer.bos_token)
        assert prepared["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
        checked[row["source"]] += 1
    assert set(checked) == {"openhermes", "fc_verbatim", "fc_canonical", "json_mode"}


def test_weight_zero_turns_are_not_trained(text_run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = text_run
    weighted = [
        r for r in rows(out, "sft") if any(m.get("weight") == 0 for m in json.loads(r["row"])["messages"])
    ]
    assert weighted, "the openhermes fixture has a weight-0 turn"
    for prepared in weighted:
        runs = _trained_runs(prepared["input_ids"], prepared["labels"])
        turns = [m for m in json.loads(prepared["row"])["messages"] if m["role"] == "assistant"]
        assert len(runs) == sum(1 for m in turns if m.get("weight", 1.0) != 0)


def test_canonical_function_calling_renders_the_tool_use_template(
    text_run: tuple[Path, dict[str, Any]],
) -> None:
    out, _ = text_run
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    canonical = [r for r in rows(out, "sft") if r["source"] == "fc_canonical"]
    verbatim = [r for r in rows(out, "sft") if r["source"] == "fc_verbatim"]
    assert canonical and verbatim
    for prepared in canonical:
        text = tokenizer.decode(prepared["input_ids"], skip_special_tokens=False)
        if json.loads(prepared["row"]).get("tools"):
            assert "You are a function calling AI model" in text and '{"name": ' in text
    assert all(
        "'arguments'" in tokenizer.decode(r["input_ids"]) for r in verbatim if "<tool_call>" in r["row"]
    )


def test_dpo_rows_split_prompt_and_completions(text_run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = text_run
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    prepared_rows = rows(out, "dpo")
    assert {r["source"] for r in prepared_rows} == {"orca", "distilabel", "ultrafeedback", "dpo_messages"}
    for prepared in prepared_rows:
        row = json.loads(prepared["row"])
        prompt = render(
            row["prompt"], tools=row.get("tools"), add_generation_prompt=True, bos_token=tokenizer.bos_token
        )
        assert tokenizer.decode(prepared["prompt_input_ids"], skip_special_tokens=False) == prompt
        for side in ("chosen", "rejected"):
            ids = prepared[f"{side}_input_ids"]
            assert ids[-1] == eos and eos not in ids[:-1]
            message = row[side][0]
            calls = message.get("tool_calls")
            text = (
                render_tool_calls([ToolCall(c["name"], c["arguments"]) for c in calls])
                if calls
                else message["content"]
            )
            whole = tokenizer(prompt + text + IM_END, add_special_tokens=False)["input_ids"]
            assert prepared["prompt_input_ids"] + ids == whole, "the completion's tokens after the prompt"


def test_a_leading_space_stays_on_the_rejected_answers_first_token(
    text_run: tuple[Path, dict[str, Any]],
) -> None:
    """Intel/orca_dpo_pairs' rejected answers often start with a space: in context it is part of the first
    piece, which an answer without the space never gets (alone, both would start with "▁")."""
    out, _ = text_run
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    (prepared,) = [
        r for r in rows(out, "dpo") if json.loads(r["row"])["rejected"][0]["content"].startswith(" ")
    ]
    chosen, rejected = (
        tokenizer.convert_ids_to_tokens(prepared[f"{side}_input_ids"][0]) for side in ("chosen", "rejected")
    )
    assert rejected.startswith("▁") and not chosen.startswith("▁")


def test_dpo_keeps_multi_turn_context_and_tools(text_run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = text_run
    agentic = [json.loads(r["row"]) for r in rows(out, "dpo") if r["source"] == "dpo_messages"]
    assert any(row.get("tools") and len(row["prompt"]) > 2 for row in agentic)


def test_duplicates_across_sources_are_rejected(tmp_path: Path) -> None:
    again = {"name": "orca_again", "kind": "orca_dpo_pairs", "path": "orca_dpo_pairs.jsonl"}
    _, report = prep(write_recipe(tmp_path, [TEXT_SOURCES[0], TEXT_SOURCES[4], again]))
    stats = report["sources"]["orca_again"]
    assert stats["rows_out"] == 0
    assert stats["rejects_by_reason"] == {"duplicate of a row in orca": report["sources"]["orca"]["rows_out"]}


def test_dedup_false_keeps_duplicates(tmp_path: Path) -> None:
    again = {"name": "orca_again", "kind": "orca_dpo_pairs", "path": "orca_dpo_pairs.jsonl"}
    _, report = prep(write_recipe(tmp_path, [TEXT_SOURCES[0], TEXT_SOURCES[4], again], data={"dedup": False}))
    assert report["sources"]["orca_again"]["rows_out"] == report["sources"]["orca"]["rows_out"] > 0


def test_decontamination_by_exact_match_and_ngram(tmp_path: Path) -> None:
    rows_in = [r.data for r in iter_records(str(FIXTURES / "orca_dpo_pairs.jsonl"))]
    exact = rows_in[0]["question"]
    overlapping = rows_in[1]["question"].split()[:5]
    eval_file = tmp_path / "eval.jsonl"
    eval_rows = [
        {"prompt": [{"role": "user", "content": exact.upper()}], "completion": "{}"},
        {
            "prompt": [{"role": "user", "content": "Tell me: " + " ".join(overlapping) + " please"}],
            "completion": "{}",
        },
    ]
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    decontaminate = {"eval_sets": [str(eval_file)], "ngram": 5}
    recipe = write_recipe(tmp_path, [TEXT_SOURCES[0], TEXT_SOURCES[4]], data={"decontaminate": decontaminate})
    _, report = prep(recipe)
    reasons = report["sources"]["orca"]["rejects_by_reason"]
    assert reasons == {
        "contaminated: exact match with eval.jsonl": 1,
        "contaminated: 5-gram overlap with eval.jsonl": 1,
    }
    assert report["decontamination"]["eval_prompts"] == {"eval.jsonl": 2}


def test_overlong_rows_are_dropped_or_cut_between_turns(tmp_path: Path) -> None:
    multi = [{"name": "fc", "kind": "function_calling", "path": "function_calling.jsonl"}]
    _, dropped = prep(write_recipe(tmp_path / "drop", multi, data={"max_seq_len": 600, "overlong": "drop"}))
    out, cut = prep(write_recipe(tmp_path / "cut", multi, data={"max_seq_len": 600, "overlong": "truncate"}))
    assert dropped["sources"]["fc"]["rejects_by_reason"].get("too long", 0) > 0
    assert cut["sources"]["fc"]["rows_out"] > dropped["sources"]["fc"]["rows_out"]
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    for prepared in rows(out, "sft"):
        ids = prepared["input_ids"]
        assert len(ids) <= 600
        assert ids[-1] == eos or (ids[-2] == eos and tokenizer.decode(ids[-1:]) == "\n"), (
            "cut only after a turn"
        )


def test_same_output_whatever_the_number_of_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "ROWS_PER_SHARD", 4)  # several shards per split from the small fixtures
    one, _ = prep(write_recipe(tmp_path / "one", TEXT_SOURCES))
    two, _ = prep(write_recipe(tmp_path / "two", TEXT_SOURCES, data={"num_proc": 2}))
    shards = sorted(p.relative_to(one) for p in one.rglob("*.parquet"))
    assert shards == sorted(p.relative_to(two) for p in two.rglob("*.parquet"))
    assert len([s for s in shards if s.parts[0] == "sft" and s.name.startswith("train-")]) > 2
    for shard in shards:
        assert (one / shard).read_bytes() == (two / shard).read_bytes(), shard


def test_shards_mix_sources(text_run: tuple[Path, dict[str, Any]]) -> None:
    """The sources are read one after another; the shards must not keep them in that order."""
    out, _ = text_run
    order = [
        r["source"]
        for shard in sorted((out / "sft").glob("train-*"))
        for r in pq.read_table(shard).to_pylist()
    ]
    runs = 1 + sum(a != b for a, b in pairwise(order))
    assert runs > 2 * len(set(order)), order


def _outcome(index: int, source: str) -> Outcome:
    row = {"source": source, "messages": [{"role": "user", "content": str(index)}]}
    return Outcome(index, f"row-{index}", row=row, columns={"input_ids": [1, index], "labels": [-100, index]})


def _spool_shards(folder: Path, outcomes: list[Outcome]) -> dict[str, Any]:
    spool = Spool(folder / "spool", seed=5)
    for outcome in outcomes:
        for copy in range(1 + outcome.index % 2):
            spool.add("sft", "train", outcome, copy)
    return spool.shuffle_into_shards(folder)["sft"]["train"]


@pytest.mark.parametrize("bucket_bits", [6, 3], ids=["buckets-share-shards", "buckets-cut-into-shards"])
def test_spool_shards_are_the_rows_sorted_by_seeded_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bucket_bits: int
) -> None:
    """1,500 rows in 64 buckets of ~23 rows (several to a shard) or 8 of ~190 (each cut into shards)."""
    monkeypatch.setattr(pipeline, "ROWS_PER_SHARD", 60)
    monkeypatch.setattr(pipeline, "BUCKET_BITS", bucket_bits)
    monkeypatch.setattr(pipeline, "SPOOL_FLUSH_ROWS", 100)
    outcomes = [_outcome(i, f"source-{i // 250}") for i in range(1_000)]
    forward = _spool_shards(tmp_path / "forward", outcomes)
    backward = _spool_shards(tmp_path / "backward", outcomes[::-1])
    assert forward["rows"] == backward["rows"] == 1_500
    assert forward["shards"] == backward["shards"]
    for shard in forward["shards"]:
        assert (tmp_path / "forward" / shard).read_bytes() == (tmp_path / "backward" / shard).read_bytes()
    tables = [pq.read_table(tmp_path / "forward" / shard) for shard in forward["shards"]]
    written = [r for table in tables for r in table.to_pylist()]
    assert sorted((r["id"], r["copy"]) for r in written) == sorted(
        (f"row-{o.index}", copy) for o in outcomes for copy in range(1 + o.index % 2)
    )
    keys = [seeded_hash(5, "shuffle", r["source"], r["id"], r["copy"]) for r in written]
    assert keys == sorted(keys), "the shards, in name order, are the rows sorted by key"
    assert max(t.num_rows for t in tables) <= (60 if bucket_bits == 6 else 90)
    assert len(tables) >= 1_500 // 60
    assert not list((tmp_path / "forward" / "spool").iterdir()), "bucket files are removed once written"


def test_finished_prep_is_skipped_until_its_inputs_change(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, TEXT_SOURCES[:1])
    prep(recipe)
    messages: list[str] = []
    run_prep(
        recipe.model_copy(update={"sft": recipe.sft.model_copy(update={"learning_rate": 0.5})}),
        log=messages.append,
    )
    assert messages and "up to date" in messages[0]
    messages.clear()
    run_prep(write_recipe(tmp_path, TEXT_SOURCES[:2]), log=messages.append)
    assert "up to date" not in messages[0]


def test_a_crash_leaves_nothing_that_looks_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = write_recipe(tmp_path, TEXT_SOURCES[:2])
    real = sources.convert

    def exploding(data: dict, row_id: str, source: Any) -> dict:
        if source.name == "fc_verbatim":
            raise RuntimeError("boom")
        return real(data, row_id, source)

    monkeypatch.setattr(sources, "convert", exploding)
    with pytest.raises(RuntimeError):
        run_prep(recipe, log=lambda _: None)
    run = tmp_path / "run"
    assert not (run / "prep").exists() and not (run / "prep.partial").exists()


def test_weights_and_row_caps(tmp_path: Path) -> None:
    spec = TEXT_SOURCES[0]
    _, doubled = prep(write_recipe(tmp_path / "w2", [{**spec, "weight": 2.0}]))
    stats = doubled["sources"]["openhermes"]
    assert stats["repeats_added"] == stats["rows_out"] > 0
    _, capped = prep(write_recipe(tmp_path / "cap", [{**spec, "max_rows": 2}]))
    assert capped["sources"]["openhermes"]["rows_out"] == 2
    _, none = prep(write_recipe(tmp_path / "w0", [{**spec, "weight": 0.0001}]))
    assert none["sources"]["openhermes"]["rejects_by_reason"].get("sampled out by weight", 0) >= 1


def test_llava_rows_render_plain_for_the_projector_and_vicuna_v1_after(tmp_path: Path) -> None:
    images = FIXTURES / "images"
    vision = {
        "tower_config": str(ROOT / "configs/models/tiny-siglip.json"),  # 16 image tokens an image
        "tower_init": "random",
        "projector_pretrain": {"precision": "fp32", "resources": {"gpus_per_node": 0}},
    }
    llava = [
        {
            "name": "captions",
            "kind": "llava",
            "path": "llava.json",
            "image_root": str(images),
            "stage": "projector",
        },
        {"name": "instruct", "kind": "llava", "path": "llava.json", "image_root": str(images)},
    ]
    tokenizer = {"name_or_path": str(ROOT / "hermes_pipeline/assets/tiny_tokenizer"), "template": "vicuna_v1"}
    recipe = write_recipe(tmp_path, llava, vision=vision, tokenizer=tokenizer)
    out, report = prep(recipe)
    assert report["sources"]["captions"]["rows_out"] > 0
    assert report["sources"]["instruct"]["rejects_by_reason"].get("duplicate of a row in captions")
    assert {"missing image", "corrupt image"} <= set(report["sources"]["captions"]["rejects_by_reason"])
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    # answers end with </s>: generation stops there, and padding (masked in labels) is something else
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == tokenizer.unk_token == "<unk>"
    assert "ASSISTANT:" in tokenizer.chat_template and "im_start" not in tokenizer.chat_template
    projector_rows = rows(out, "projector")
    assert any(json.loads(r["row"]).get("images") for r in projector_rows)
    for prepared in projector_rows:  # LLaVA's stage-1 plain format: the image, the caption, a newline
        text = tokenizer.decode(prepared["input_ids"], skip_special_tokens=False)
        caption = json.loads(prepared["row"])["messages"][-1]["content"]
        assert text == f"{tokenizer.bos_token}{'<image>' * 16}{caption}\n"  # as many as the tower's patches
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        trained = [label for label in prepared["labels"] if label != -100]
        assert image_id not in trained and len(trained) == len(
            tokenizer(caption + "\n", add_special_tokens=False).input_ids
        )
    instruct_rows = rows(out, "sft")
    assert instruct_rows
    for prepared in instruct_rows:
        text = tokenizer.decode(prepared["input_ids"], skip_special_tokens=False)
        assert text.startswith(f"{tokenizer.bos_token}{VICUNA_SYSTEM} USER: ") and text.endswith("</s>")
        assert " ASSISTANT: " in text and "</s> USER" not in text


def test_prep_command_and_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe_path = tmp_path / "recipe.yaml"
    write_recipe(tmp_path, TEXT_SOURCES[:1] + TEXT_SOURCES[4:5])
    assert main(["prep", str(recipe_path), "--inspect", "1"]) == 0
    out = capsys.readouterr().out
    assert "=== sft | openhermes" in out and "=== dpo | orca" in out
    assert f"{IM_END}»" in out, "the closing EOS is inside the trained span"
    assert "«<|im_start|>" not in out, "the assistant header is not trained"


def test_bad_source_path_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_recipe(tmp_path, TEXT_SOURCES[:1])
    recipe_path = tmp_path / "recipe.yaml"
    assert main(["prep", str(recipe_path), "--set", "data.sources[0].path=nowhere/at-all.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data.sources[0].path" in err


WORKER_CHECK = """
import pathlib, pickle, sys
args, source, records = pickle.loads(pathlib.Path(sys.argv[1]).read_bytes())
from hermes_pipeline.data_prep.workers import init_worker, process_batch
init_worker(*args)
tokenized = sum(o.columns is not None for o in process_batch(source, records))
print(tokenized, "torch" in sys.modules)
"""


@pytest.mark.parametrize("plain", [True, False])
def test_workers_tokenize_without_torch(tmp_path: Path, plain: bool) -> None:
    """A worker unpickles what the pool sends it and imports only what that needs: with the plain
    tokenizer that is not torch (~0.2 GB a process); the AutoTokenizer fallback still imports it."""
    recipe = write_recipe(tmp_path, TEXT_SOURCES[:1])
    save_tokenizer(load_tokenizer(recipe), tmp_path / "tokenizer")
    source = recipe.data.sources[0]
    job = (
        WorkerPool(recipe, tmp_path, Decontaminator(13), plain, None).args,
        source,
        list(iter_records(source.path)),
    )
    (tmp_path / "job.pickle").write_bytes(pickle.dumps(job))
    result = subprocess.run(
        [sys.executable, "-c", WORKER_CHECK, str(tmp_path / "job.pickle")],
        capture_output=True,
        text=True,
        check=True,
    )
    tokenized, torch_imported = result.stdout.split()
    assert int(tokenized) > 0
    assert torch_imported == str(not plain)


def test_plain_tokenizer_is_used_only_when_it_is_exact(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(write_recipe(tmp_path, TEXT_SOURCES[:1]))
    save_tokenizer(tokenizer, tmp_path / "tokenizer")
    assert plain_tokenizer_matches(tokenizer, tmp_path / "tokenizer")
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert not plain_tokenizer_matches(tokenizer, tmp_path / "tokenizer")
