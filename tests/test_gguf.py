"""GGUF export through llama.cpp's converter and quantizer, and the verifier that guards every file."""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from hermes_pipeline.chat_format.tokens import IM_END, IM_START, prepare_tokenizer, save_tokenizer
from hermes_pipeline.errors import UserError
from hermes_pipeline.llama_server import free_port
from hermes_pipeline.merge.gguf import export_gguf, file_name, is_llama3_tokenizer
from hermes_pipeline.merge.gguf_check import GgufCheckFailed, load, read_metadata, reply
from hermes_pipeline.merge.package import write_generation_settings
from hermes_pipeline.merge.probes import SERVED_CONVERSATIONS, probe_texts
from hermes_pipeline.merge.serve import serve
from hermes_pipeline.merge.server_check import forced_call_request, sampling_defaults
from hermes_pipeline.recipe.schema import PackageSection
from hermes_pipeline.tiny import build_tiny_model, load_tiny_tokenizer, tiny_model_config

pytestmark = pytest.mark.slow

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _teach_to_stop(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> None:
    """A few seconds of training so the first probe gets a short reply ending in <|im_end|>: a random model
    would never stop, and the verifier insists that the exported file does."""
    prompt = tokenizer(probe_texts(tokenizer)[0], add_special_tokens=False)["input_ids"]
    answer = tokenizer(f"Hi.{IM_END}", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + answer])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(40):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, folder: Path) -> Path:
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    write_generation_settings(folder, tokenizer, PackageSection())
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = load_tiny_tokenizer()
    model = build_tiny_model(seed=5)
    _teach_to_stop(model, tokenizer)
    return _save(model, tokenizer, tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def exported(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "gguf"
    export_gguf(model_dir, out, ["f16", "q8_0", "q4_k_m"], "tiny", log=lambda _: None)
    return out


def test_export_writes_every_type_and_records_the_checks(exported: Path) -> None:
    names = sorted(p.name for p in exported.iterdir())
    assert names == ["tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf", "tiny-f16.gguf", "verification.json"]
    reports = {r["gguf_type"]: r for r in json.loads((exported / "verification.json").read_text())}
    assert reports["f16"]["logits_relative_difference"] <= 0.02
    assert reports["q8_0"]["top1_agreement"] >= 0.9 and reports["q4_k_m"]["top1_agreement"] >= 0.9
    assert all(not r["problems"] for r in reports.values())
    for report in reports.values():  # every file was served by llama-server and passed its checks there
        served = report["server"]
        assert served["supports_tools"] and served["supports_tool_calls"]
        assert served["templates_rendered"] == len(SERVED_CONVERSATIONS)
        assert served["tool_call_format"] == "peg-native"
        assert [call["name"] for call in served["tool_calls"]] == ["set_units"]
        assert served["sampling"]["repeat_penalty"] == pytest.approx(PackageSection().repetition_penalty)


def test_gguf_carries_the_packaged_sampling_defaults(exported: Path, model_dir: Path) -> None:
    """llama-server and LM Studio start from general.sampling.*; transformers' defaults fill what
    generation_config.json leaves out, and the repetition penalty covers the whole context as there."""
    import gguf

    reader = gguf.GGUFReader(exported / "tiny-Q8_0.gguf")
    stored = {
        key.removeprefix("general.sampling."): field.contents()
        for key, field in reader.fields.items()
        if key.startswith("general.sampling.")
    }
    package = PackageSection()
    assert stored == pytest.approx(
        {
            "temp": package.temperature,
            "top_p": package.top_p,
            "top_k": 50,
            "min_p": 0.0,
            "penalty_repeat": package.repetition_penalty,
            "penalty_last_n": -1,
        }
    )
    assert sampling_defaults(model_dir) == pytest.approx(stored)


def test_serve_answers_a_tools_request_with_parsed_tool_calls(exported: Path) -> None:
    """A client's request while `serve` runs: the assistant turn is prefilled up to the enum argument (the
    tiny model does not call tools by itself); llama.cpp completes it under its grammar and parses it."""
    answers = []

    def ask(url: str) -> None:
        body = forced_call_request("Fahrenheit please.")
        request = urllib.request.Request(
            f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answers.append(json.loads(response.read())["choices"][0])

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    report = serve(exported, port=port, gguf_type="q4_k_m", log=lambda _: None, until=lambda: ask(url))
    assert report.tool_call_format == "peg-native" and report.supports_tools
    assert answers[0]["finish_reason"] == "tool_calls"
    (call,) = answers[0]["message"]["tool_calls"]
    assert call["function"]["name"] == "set_units"
    assert json.loads(call["function"]["arguments"])["unit"] in ("celsius", "fahrenheit")


def test_a_template_llama_cpp_cannot_run_fails_the_export(model_dir: Path, tmp_path: Path) -> None:
    """`| default` on a mapping renders in Python's Jinja (and so in transformers) but not in llama.cpp's
    engine, where every request with tools then fails: the export must refuse such a file."""
    line = "{%- set params = params if params is defined and params is not none else {} -%}"

    def python_only(config: dict) -> dict:
        for entry in config["chat_template"]:
            if entry["name"] == "tool_use":
                assert line in entry["template"]
                entry["template"] = entry["template"].replace(
                    line, "{%- set params = params | default({}, true) -%}"
                )
        return config

    out = tmp_path / "gguf"
    with pytest.raises(GgufCheckFailed, match="llama-server"):
        export_gguf(_edited(model_dir, tmp_path, python_only), out, ["f16"], "tiny", log=lambda _: None)
    assert not out.exists() and not list(tmp_path.glob("gguf*"))


def test_where_llama_cpp_and_transformers_tokenize_alike(exported: Path, model_dir: Path) -> None:
    """The GGUF is written with add_space_prefix=false so that ChatML prompts tokenize exactly as in
    transformers (no space after <|im_start|>). The price: raw text at the very start of a prompt, with no
    special token before it and no leading space, gets no "▁" in llama.cpp, where transformers adds one.
    Every prompt a chat template renders starts with a special token, so chat never meets it."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llm = load(exported / "tiny-f16.gguf")

    def both(text: str) -> tuple[list[int], list[int]]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids, llm.tokenize(text.encode(), add_bos=False, special=True)

    for text in (
        f"{IM_START}user\nHello world{IM_END}\n{IM_START}assistant\n",
        " Hello world",
        "<tool_call>\nHello world",
        *probe_texts(tokenizer),
    ):
        ours, theirs = both(text)
        assert ours == theirs, text
    ours, theirs = both("Hello world")
    assert ours != theirs and ours == both(" Hello world")[0]


def test_gguf_metadata_carries_eos_templates_and_control_tokens(exported: Path, model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    metadata = read_metadata(exported / "tiny-Q4_K_M.gguf")
    end = tokenizer.convert_tokens_to_ids(IM_END)
    assert metadata["eos_token_id"] == end
    assert metadata["chat_template"] == tokenizer.chat_template["default"]
    assert metadata["chat_template_tool_use"] == tokenizer.chat_template["tool_use"]
    assert len(metadata["tokens"]) == json.loads((model_dir / "config.json").read_text())["vocab_size"]
    assert metadata["token_types"][end] == 3  # llama.cpp's CONTROL


def test_quantised_file_generates_a_reply_that_stops(exported: Path, model_dir: Path) -> None:
    text, stopped = reply(
        load(exported / "tiny-Q4_K_M.gguf"), probe_texts(AutoTokenizer.from_pretrained(model_dir))[0]
    )
    assert stopped and text.strip() == "Hi."


def _edited(model_dir: Path, tmp_path: Path, edit: Callable[[dict], dict]) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(model_dir, folder)
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return folder


@pytest.mark.parametrize("ships", ["an auto_map tokenizer", "a Python module"])
def test_a_folder_that_ships_code_is_refused_before_anything_runs(
    model_dir: Path, tmp_path: Path, ships: str
) -> None:
    """llama.cpp's converter loads some tokenizers with remote code allowed: without the opt-in, the
    folder's code must never be imported."""
    marker = tmp_path / "ran"

    def custom_tokenizer(config: dict) -> dict:
        if ships == "a Python module":
            return config
        return config | {"auto_map": {"AutoTokenizer": [None, "tokenization_own.OwnTokenizer"]}}

    folder = _edited(model_dir, tmp_path, custom_tokenizer)
    (folder / "tokenization_own.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    out = tmp_path / "gguf"
    with pytest.raises(
        UserError, match=r"would run as code here; if you trust it, set model\.trust_remote_code"
    ):
        export_gguf(folder, out, ["f16"], "tiny", log=lambda _: None)
    assert not marker.exists() and not out.exists() and not list(tmp_path.glob("gguf*"))


def test_a_wrong_eos_fails_the_export_and_leaves_nothing(model_dir: Path, tmp_path: Path) -> None:
    def wrong_eos(config: dict) -> dict:
        return config | {"eos_token": "</s>"}

    folder = _edited(model_dir, tmp_path, wrong_eos)
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        path.write_text(json.dumps(json.loads(path.read_text()) | {"eos_token_id": 2}))
    out = tmp_path / "gguf"
    with pytest.raises(GgufCheckFailed, match="eos_token_id is 2, not <\\|im_end\\|>"):
        export_gguf(folder, out, ["f16"], "tiny", log=lambda _: None)
    assert not out.exists() and not list(tmp_path.glob("gguf*"))


def test_a_lost_tool_use_template_fails_the_export(model_dir: Path, tmp_path: Path) -> None:
    def default_only(config: dict) -> dict:
        templates = {t["name"]: t["template"] for t in config["chat_template"]}
        return config | {"chat_template": templates["default"]}

    with pytest.raises(GgufCheckFailed, match="tool_use"):
        export_gguf(
            _edited(model_dir, tmp_path, default_only), tmp_path / "gguf", ["f16"], "tiny", log=lambda _: None
        )


def _bpe_model(folder: Path, split: str) -> Path:
    """A tiny byte-level BPE model (a Llama-3-style tokenizer when ``split`` is Llama-3's pattern)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [
        "You are a helpful assistant. Hello! Who are you? What is the weather in Paris? Write one sentence.",
        "The sea is calm and blue. I can call tools and answer in JSON with the schema you give me.",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|begin_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>")
    prepare_tokenizer(wrapped)
    config = tiny_model_config("llama", tokenizer=wrapped)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    _teach_to_stop(model, wrapped)
    return _save(model, wrapped, folder)


def test_llama3_bpe_tokenizer_unknown_to_the_converter_maps_to_llama_bpe(tmp_path: Path) -> None:
    folder = _bpe_model(tmp_path / "llama3", LLAMA3_SPLIT)
    assert is_llama3_tokenizer(folder)
    messages: list[str] = []
    export_gguf(folder, tmp_path / "gguf", ["f16"], "bpe", log=messages.append)
    assert any("llama-bpe" in m for m in messages)
    assert (tmp_path / "gguf" / file_name("bpe", "f16")).is_file()


def test_other_unknown_bpe_tokenizer_is_a_one_line_error(tmp_path: Path) -> None:
    folder = _bpe_model(tmp_path / "gpt2ish", GPT2_SPLIT)
    assert not is_llama3_tokenizer(folder)
    with pytest.raises(UserError, match="does not know this BPE pre-tokenizer") as failure:
        export_gguf(folder, tmp_path / "gguf", ["f16"], "bpe", log=lambda _: None)
    assert "\n" not in str(failure.value)
