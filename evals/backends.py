"""Three ways to turn rendered prompts into answers: transformers, llama.cpp on a GGUF file, an OpenAI-style server.

Every backend receives the same prompt text, built by our own template (``evals.generate.eval_prompt``), so a
score difference between backends is a difference in the model or the engine, never in the prompt. Each
backend stops at ``<|im_end|>`` and returns the assistant text it generated, without the prompt.

Sampling is the published setting by default (temperature 0.1) with a fixed seed; temperature 0 is greedy.
Only temperature shapes the distribution: top-k, top-p and min-p are switched off in every engine, because
their defaults differ (transformers keeps the top 50, llama.cpp the top 40 and min-p 0.05) and would make
the same model score differently per backend.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hermes_pipeline.chat_format.tokens import IM_END
from hermes_pipeline.errors import UserError


@dataclass(frozen=True)
class Sampling:
    """How answers are drawn; the same settings mean the same thing in every backend."""

    temperature: float = 0.1
    seed: int = 0
    max_new_tokens: int = 512
    batch_size: int = 8  # prompts per forward pass (transformers) or requests in flight (HTTP)


@dataclass(frozen=True)
class Prompt:
    """One eval prompt in both forms a backend may need; both say the same thing."""

    text: str  # rendered by our template, ending in the assistant generation header
    messages: list[dict[str, str]]  # the same turns as chat messages, our system prompt first


class Backend(Protocol):
    def generate(self, prompts: list[Prompt]) -> list[str]:
        """One answer per prompt, in order."""
        ...


class TransformersBackend:
    """Batched generation with left padding, so every prompt's last token sits at the same position."""

    def __init__(self, model: Any, tokenizer: Any, sampling: Sampling):
        if tokenizer.eos_token != IM_END:
            raise UserError(
                f"the model's tokenizer ends turns with {tokenizer.eos_token!r}, not {IM_END}: "
                "evaluate a model prepared by this pipeline (or a Hermes model)"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.sampling = sampling

    @classmethod
    def load(cls, ref: str, sampling: Sampling) -> TransformersBackend:
        """A model directory or Hub id, in its saved dtype, on the GPU when there is one."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(ref)
            model = AutoModelForCausalLM.from_pretrained(ref, dtype="auto")
        except OSError as error:
            raise UserError(f"model {ref}: cannot load ({str(error).splitlines()[0]})") from None
        return cls(model.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer, sampling)

    def generate(self, prompts: list[Prompt]) -> list[str]:
        return seeded_batches([prompt.text for prompt in prompts], self.sampling, self._batch)

    def _batch(self, prompts: list[str]) -> list[str]:
        import torch

        self.tokenizer.padding_side = "left"
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(
                **encoded,
                max_new_tokens=self.sampling.max_new_tokens,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                **sampling_options(self.sampling),
            )
        eos = self.tokenizer.eos_token_id
        return [
            self.tokenizer.decode(until_eos(row, eos))
            for row in out[:, encoded["input_ids"].shape[1] :].tolist()
        ]


def seeded_batches(
    items: list[Any], sampling: Sampling, batch: Callable[[list[Any]], list[str]]
) -> list[str]:
    """``batch`` over ``items`` in slices of ``sampling.batch_size``, under the sampling seed, so a sampled
    eval answers the same on every run."""
    import torch

    size = sampling.batch_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sampling.seed)
        return [answer for at in range(0, len(items), size) for answer in batch(items[at : at + size])]


def sampling_options(sampling: Sampling) -> dict[str, Any]:
    """``generate``'s sampling arguments: greedy at temperature 0, else plain temperature sampling."""
    if sampling.temperature > 0:
        return {"do_sample": True, "temperature": sampling.temperature, "top_k": 0, "top_p": 1.0}
    return {"do_sample": False}


def until_eos(tokens: list[int], eos: int) -> list[int]:
    """An answer's tokens before its EOS: a finished row is padded after it while the batch goes on."""
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


class LlamaCppBackend:
    """llama.cpp through llama-cpp-python, one prompt at a time (its Python API runs one sequence)."""

    def __init__(self, gguf: str | Path, sampling: Sampling, n_ctx: int = 0):
        """``n_ctx`` 0 takes the context length the GGUF was trained with."""
        try:
            from llama_cpp import Llama
        except ImportError:
            raise UserError(
                "a .gguf model needs llama-cpp-python: pip install 'hermes-pipeline[gguf]'"
            ) from None
        if not Path(gguf).is_file():
            raise UserError(f"model {gguf}: no such GGUF file")
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, seed=sampling.seed, verbose=False)
        self.sampling = sampling
        from hermes_pipeline.models import gguf_bos_text

        self.bos_text = gguf_bos_text(self.llm)

    def generate(self, prompts: list[Prompt]) -> list[str]:
        return [self._complete(prompt.text) for prompt in prompts]

    def _complete(self, prompt: str) -> str:
        result = self.llm.create_completion(
            prompt.removeprefix(self.bos_text),
            max_tokens=self.sampling.max_new_tokens,
            temperature=self.sampling.temperature,
            top_k=0,
            top_p=1.0,
            min_p=0.0,
            repeat_penalty=1.0,
            stop=[IM_END],
            seed=self.sampling.seed,
        )
        return result["choices"][0]["text"]


class OpenAIBackend:
    """Any OpenAI-compatible server (vLLM, llama.cpp's server, TGI), with the standard library's HTTP client.

    A URL ending in ``/chat/completions`` gets messages: our system prompt (the tools or the schema, built by
    our prompt builder) followed by the eval prompt, which a ChatML server renders to our exact text. Any
    other URL is the API base (``http://host:port/v1``) or its ``/completions`` route and gets the rendered
    prompt itself, which leaves the server no room to render differently.
    """

    def __init__(self, endpoint: str, model: str | None, sampling: Sampling, timeout_s: float = 600.0):
        if not endpoint.startswith(("http://", "https://")):
            raise UserError(f"--endpoint {endpoint}: give an http(s) URL, e.g. http://localhost:8000/v1")
        url = endpoint.rstrip("/")
        self.chat = url.endswith("/chat/completions")
        self.url = url if url.endswith("/completions") else f"{url}/completions"
        self.model = model
        self.sampling = sampling
        self.timeout_s = timeout_s

    def generate(self, prompts: list[Prompt]) -> list[str]:
        """Answers in order, ``batch_size`` requests in flight at once."""
        with ThreadPoolExecutor(max_workers=self.sampling.batch_size) as pool:
            return list(pool.map(self._answer, prompts))

    def _answer(self, prompt: Prompt) -> str:
        body = self.request_body(prompt)
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                reply = json.load(response)
        except (urllib.error.URLError, TimeoutError, ValueError) as error:
            raise UserError(f"--endpoint {self.url}: request failed ({error})") from None
        choice = reply["choices"][0]
        return choice["message"]["content"] if self.chat else choice["text"]

    def request_body(self, prompt: Prompt) -> dict[str, Any]:
        body: dict[str, Any] = {
            "max_tokens": self.sampling.max_new_tokens,
            "temperature": self.sampling.temperature,
            "top_p": 1.0,
            "seed": self.sampling.seed,
            "stop": [IM_END],
        }
        if self.model:
            body["model"] = self.model
        return body | ({"messages": prompt.messages} if self.chat else {"prompt": prompt.text})


def open_backend(model: str | None, endpoint: str | None, sampling: Sampling) -> Backend:
    """The backend a command line names: ``--endpoint`` (MODEL is then the served model's name, if the
    server wants one), a ``.gguf`` file, or a model directory or Hub id for transformers."""
    if endpoint is not None:
        return OpenAIBackend(endpoint, model, sampling)
    if model is None:
        raise UserError(
            "give MODEL (a model directory, a .gguf file or a Hub id), --endpoint URL or --predictions FILE"
        )
    if model.endswith(".gguf"):
        return LlamaCppBackend(model, sampling)
    return TransformersBackend.load(model, sampling)
