"""Generation backends: the prompt every backend sees, transformers against its own generate, an OpenAI-style
server started here, and llama.cpp on the tiny model converted to GGUF."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from hermes_pipeline.chat_format.templates import render
from hermes_pipeline.chat_format.tokens import IM_END, save_tokenizer
from hermes_pipeline.chat_format.tool_calls import render_tool_calls
from hermes_pipeline.errors import UserError
from hermes_pipeline.evals.backends import (
    LlamaCppBackend,
    OpenAIBackend,
    Sampling,
    TransformersBackend,
    open_backend,
)
from hermes_pipeline.evals.generate import eval_prompt, evaluate, load_eval_rows
from hermes_pipeline.evals.scoring import expected_calls
from hermes_pipeline.tiny import build_tiny_model, load_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FC_SET = ROOT / "data" / "tiny" / "func_calling_eval.jsonl"
JSON_SET = ROOT / "data" / "tiny" / "json_mode_eval.jsonl"
GREEDY = Sampling(temperature=0.0, seed=0, max_new_tokens=12, batch_size=4)


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return build_tiny_model(seed=3), load_tiny_tokenizer()


@pytest.fixture(scope="module")
def prompts() -> list[Any]:
    """Prompts of different lengths, so a batch really is left-padded."""
    fc = [eval_prompt(row, "function_calling") for row in load_eval_rows(str(FC_SET), 3)]
    return [*fc, *(eval_prompt(row, "json_mode") for row in load_eval_rows(str(JSON_SET), 2))]


# --- The prompt ---------------------------------------------------------------------------------------


def test_function_calling_prompt_is_the_tool_use_rendering_and_its_chat_form_says_the_same() -> None:
    row = load_eval_rows(str(FC_SET), 1)[0]
    prompt = eval_prompt(row, "function_calling")
    tools = json.loads(row["tools"])
    assert prompt.text == render(row["prompt"], tools=tools, add_generation_prompt=True)
    assert prompt.text.endswith("<|im_start|>assistant\n") and "<tools>" in prompt.text
    # A ChatML server given the messages renders our text: the system turn carries our tool prompt.
    assert render(prompt.messages, add_generation_prompt=True) == prompt.text


def test_json_mode_prompt_is_the_default_rendering() -> None:
    row = load_eval_rows(str(JSON_SET), 1)[0]
    prompt = eval_prompt(row, "json_mode")
    assert prompt.messages == row["prompt"]
    assert prompt.text == render(row["prompt"], add_generation_prompt=True)


# --- transformers -------------------------------------------------------------------------------------


def test_greedy_answer_is_what_model_generate_returns(tiny: tuple[Any, Any], prompts: list[Any]) -> None:
    model, tokenizer = tiny
    ids = tokenizer(prompts[0].text, return_tensors="pt")
    expected = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = TransformersBackend(model, tokenizer, GREEDY).generate(prompts[:1])[0]
    assert answer == tokenizer.decode(expected[0, ids["input_ids"].shape[1] :])
    assert answer and IM_END not in answer


def test_batched_answers_equal_one_by_one(tiny: tuple[Any, Any], prompts: list[Any]) -> None:
    backend = TransformersBackend(*tiny, GREEDY)
    assert len({len(p.text) for p in prompts}) > 1
    assert backend.generate(prompts) == [backend.generate([p])[0] for p in prompts]


def test_sampling_is_fixed_by_the_seed(tiny: tuple[Any, Any], prompts: list[Any]) -> None:
    def sample(seed: int) -> list[str]:
        return TransformersBackend(*tiny, Sampling(temperature=1.0, seed=seed, max_new_tokens=12)).generate(
            prompts
        )

    before = torch.random.get_rng_state()
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert torch.equal(torch.random.get_rng_state(), before), "the caller's random state is left alone"


def test_tokenizer_that_does_not_end_turns_with_im_end_is_refused(tiny: tuple[Any, Any]) -> None:
    tokenizer = load_tiny_tokenizer()
    tokenizer.eos_token = "</s>"
    with pytest.raises(UserError, match="<\\|im_end\\|>"):
        TransformersBackend(tiny[0], tokenizer, GREEDY)


def test_model_directory_on_the_command_line(tmp_path: Path, tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "model")
    save_tokenizer(tokenizer, tmp_path / "model")
    backend = open_backend(str(tmp_path / "model"), None, GREEDY)
    assert isinstance(backend, TransformersBackend)
    prompt = eval_prompt(load_eval_rows(str(FC_SET), 1)[0], "function_calling")
    assert backend.generate([prompt]) == TransformersBackend(model, tokenizer, GREEDY).generate([prompt])
    with pytest.raises(UserError, match="cannot load"):
        open_backend(str(tmp_path / "missing"), None, GREEDY)


# --- OpenAI-compatible server --------------------------------------------------------------------------


class _Server:
    """Answers /v1/completions and /v1/chat/completions with the expected tool call for the prompt's tools
    (the first function the prompt offers, with the expected arguments), or nonsense, per ``wrong``."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers  # rendered prompt -> the answer to give
        self.bodies: list[dict[str, Any]] = []

    def handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append({"path": self.path, **body})
                if self.path == "/v1/completions":
                    reply = {"choices": [{"text": server.answers[body["prompt"]]}]}
                elif self.path == "/v1/chat/completions":
                    text = render(body["messages"], add_generation_prompt=True)
                    reply = {"choices": [{"message": {"role": "assistant", "content": server.answers[text]}}]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture()
def server() -> Iterator[tuple[str, _Server]]:
    """The first 6 eval rows: the even ones get the expected call, the odd ones a reply with no call."""
    rows = load_eval_rows(str(FC_SET), 6)
    answers = {
        eval_prompt(row, "function_calling").text: (
            render_tool_calls(expected_calls(row["completion"])) if i % 2 == 0 else "I cannot help."
        )
        for i, row in enumerate(rows)
    }
    state = _Server(answers)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), state.handler())
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", state
    httpd.shutdown()
    thread.join()


@pytest.mark.parametrize("route", ["", "/chat/completions"])
def test_openai_endpoint_gets_our_prompt_and_is_scored(
    tmp_path: Path, server: tuple[str, _Server], route: str
) -> None:
    base, state = server
    sampling = Sampling(temperature=0.1, seed=7, max_new_tokens=64, batch_size=3)
    results = evaluate(
        OpenAIBackend(base + route, "hermes", sampling), "function_calling", str(FC_SET), tmp_path, limit=6
    )
    assert results["strict"]["passed"] == 3 and results["strict"]["total"] == 6
    assert results["strict"]["failures"] == {"no_tool_call": 3}
    rows = load_eval_rows(str(FC_SET), 6)
    for body in state.bodies:
        assert (body["stop"], body["temperature"], body["seed"], body["max_tokens"]) == ([IM_END], 0.1, 7, 64)
        assert body["model"] == "hermes"
    if route:
        sent = sorted(json.dumps(body["messages"]) for body in state.bodies)
        assert sent == sorted(json.dumps(eval_prompt(row, "function_calling").messages) for row in rows)
        assert all(body["path"] == "/v1/chat/completions" for body in state.bodies)
    else:
        sent = sorted(body["prompt"] for body in state.bodies)
        assert sent == sorted(eval_prompt(row, "function_calling").text for row in rows)
        assert all(body["path"] == "/v1/completions" for body in state.bodies)
    # The predictions file is kept, so the run can be scored again without the server.
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["output"] for line in lines][1] == "I cannot help."


def test_unreachable_endpoint_is_one_clear_error(tmp_path: Path, server: tuple[str, _Server]) -> None:
    base, _ = server
    backend = OpenAIBackend(base + "/nowhere", None, GREEDY)
    with pytest.raises(UserError, match="request failed"):
        evaluate(backend, "function_calling", str(FC_SET), tmp_path, limit=1)
    with pytest.raises(UserError, match="http"):
        OpenAIBackend("localhost:8000", None, GREEDY)


# --- llama.cpp ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny: tuple[Any, Any]) -> Path:
    """The tiny model converted by the export stage's converter, in f32 so that it computes what torch does."""
    pytest.importorskip("llama_cpp")
    from hermes_pipeline.merge.gguf import convert

    folder = tmp_path_factory.mktemp("gguf")
    model, tokenizer = tiny
    model.save_pretrained(folder / "model")
    save_tokenizer(tokenizer, folder / "model")
    convert(folder / "model", folder / "tiny-f32.gguf", "f32", log=lambda _: None)
    return folder / "tiny-f32.gguf"


@pytest.mark.slow
def test_llama_cpp_answers_as_the_same_weights_do_in_torch(
    tiny_gguf: Path, tiny: tuple[Any, Any], prompts: list[Any]
) -> None:
    """The GGUF sees the tokens transformers sees (one BOS, no space after special tokens) and answers
    token for token as the same weights do in torch."""
    backend = open_backend(str(tiny_gguf), None, GREEDY)
    assert isinstance(backend, LlamaCppBackend)
    model, tokenizer = tiny
    answers = backend.generate(prompts[:2])
    for prompt, answer in zip(prompts[:2], answers, strict=True):
        text = prompt.text.removeprefix(backend.bos_text)
        expected = tokenizer(text)["input_ids"]
        assert backend.llm.tokenize(text.encode(), add_bos=True, special=True) == expected
        ids = torch.tensor([expected])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        assert answer == tokenizer.decode(out[0, ids.shape[1] :])
    assert open_backend(str(tiny_gguf), None, GREEDY).generate(prompts[:2]) == answers


def test_missing_gguf_is_one_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    with pytest.raises(UserError, match="no such GGUF"):
        LlamaCppBackend(tmp_path / "missing.gguf", GREEDY)
