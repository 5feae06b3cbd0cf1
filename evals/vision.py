"""Hermes 2 Vision's function calling, scored: an image and a ``<fn_call>`` request (a JSON schema) in, a JSON
object out.

A row is LLaVA-shaped (``image``, ``conversations``) with each field's right answer in ``reference``. The
prompt is the row's turns up to its last answer, rendered by the model's own chat template and made into
ids and pixels by its processor, so the eval reads the picture the way a user's code would. An answer
passes when it parses, follows the request's schema and every field equals the reference (JSON mode's rule,
``scoring.score_json_mode``); each field's exact-match rate is reported beside it, so a model that has the
format but not yet the picture shows where it stands.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlavaForConditionalGeneration, ProcessorMixin

from hermes_pipeline.chat_format.tokens import FN_CALL, IMAGE_TOKEN
from hermes_pipeline.errors import UserError
from hermes_pipeline.evals.backends import Sampling, sampling_options, seeded_batches, until_eos
from hermes_pipeline.evals.generate import PREDICTIONS_FILE, load_eval_rows
from hermes_pipeline.evals.predictions import RESULTS_FILE
from hermes_pipeline.evals.scoring import (
    EvalRowError,
    Verdict,
    aggregate,
    same_value,
    score_json_mode,
)
from hermes_pipeline.llama_server import LlamaServer
from hermes_pipeline.vision import png_base64, read_picture

SPEAKERS = {"human": "user", "gpt": "assistant", "system": "system"}


@dataclass(frozen=True)
class FnCallRow:
    """One eval row, read: the prompt's messages, its picture, the request's schema and the answer."""

    messages: list[dict[str, str]]
    image: Path
    schema: dict[str, Any]
    reference: dict[str, Any]


def read_row(row: dict[str, Any], image_root: Path) -> FnCallRow:
    """The row's prompt (every turn before its last answer), picture, schema and reference; EvalRowError
    names what is wrong with a row that cannot be scored."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not all(
        isinstance(t, dict) and t.get("from") in SPEAKERS and isinstance(t.get("value"), str) for t in turns
    ):
        raise EvalRowError("conversations is not a list of {from, value} turns")
    messages = [{"role": SPEAKERS[t["from"]], "content": t["value"]} for t in turns]
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages or messages[-1]["role"] != "user":
        raise EvalRowError("no user turn to answer")
    request = messages[-1]["content"].removeprefix(f"{IMAGE_TOKEN}\n")
    if not request.startswith(FN_CALL):
        raise EvalRowError(f"the last user turn does not open with {FN_CALL}")
    try:
        schema = json.loads(request.removeprefix(FN_CALL))
    except ValueError:
        raise EvalRowError(f"the {FN_CALL} schema is not JSON") from None
    reference = row.get("reference")
    if not isinstance(reference, dict):
        raise EvalRowError("reference (each field's right answer) is not a JSON object")
    image = row.get("image")
    if not isinstance(image, str) or not (image_root / image).is_file():
        raise EvalRowError(f"image {image!r} is not a file under {image_root}")
    if sum(message["content"].count(IMAGE_TOKEN) for message in messages) != 1:
        raise EvalRowError(f"the prompt must hold one {IMAGE_TOKEN}")
    return FnCallRow(messages, image_root / image, schema, reference)


def score_fn_call(row: FnCallRow, output: str) -> Verdict:
    """Passes when the answer parses, follows the schema and equals the reference field by field."""
    return score_json_mode({"schema": row.schema, "completion": row.reference}, output)


def field_matches(verdict: Verdict, reference: dict[str, Any]) -> dict[str, bool]:
    """Per field of the reference: did the answer give exactly that value."""
    answer = verdict.parsed if isinstance(verdict.parsed, dict) else {}
    return {key: key in answer and same_value(answer[key], value) for key, value in reference.items()}


class LlavaGenerator:
    """Batched generation through the model's processor: the chat template renders each prompt, the
    processor expands ``<image>`` and makes the pixels, and answers end at the tokenizer's EOS."""

    def __init__(
        self, model: LlavaForConditionalGeneration, processor: ProcessorMixin, sampling: Sampling, pad: bool
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.sampling = sampling
        self.pad = pad  # vision.image_aspect_ratio: pad, as in training

    def generate(self, rows: list[FnCallRow]) -> list[str]:
        return seeded_batches(rows, self.sampling, self._batch)

    def _batch(self, rows: list[FnCallRow]) -> list[str]:
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        texts = [
            tokenizer.apply_chat_template(row.messages, tokenize=False, add_generation_prompt=True)
            for row in rows
        ]
        mean = self.processor.image_processor.image_mean
        # The template writes BOS itself, as prep's rendering does.
        inputs = self.processor(
            images=[read_picture(row.image, mean, self.pad) for row in rows],
            text=texts,
            padding=True,
            add_special_tokens=False,
            return_tensors="pt",
        ).to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.sampling.max_new_tokens,
                repetition_penalty=1.0,  # the eval's sampling, not the packaged defaults, at every point
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **sampling_options(self.sampling),
            )
        eos = tokenizer.eos_token_id
        answers = out[:, inputs["input_ids"].shape[1] :].tolist()
        return [tokenizer.decode(until_eos(answer, eos), skip_special_tokens=True) for answer in answers]


class LlamaServerGenerator:
    """The exported GGUF and its mmproj in llama-server, a row at a time on the completion route: the
    packaged template renders the prompt with the server's media marker where ``<image>`` stands (the server
    puts BOS in front itself), and the picture goes as PNG, padded to a square as in training."""

    def __init__(self, server: LlamaServer, processor: ProcessorMixin, sampling: Sampling, pad: bool) -> None:
        self.server = server
        self.processor = processor
        self.sampling = sampling
        self.pad = pad

    def generate(self, rows: list[FnCallRow]) -> list[str]:
        return [self._answer(row) for row in rows]

    def _answer(self, row: FnCallRow) -> str:
        tokenizer = self.processor.tokenizer
        text = tokenizer.apply_chat_template(row.messages, tokenize=False, add_generation_prompt=True)
        picture = read_picture(row.image, self.processor.image_processor.image_mean, self.pad)
        body = {
            "prompt": self.server.media_prompt(text, tokenizer.bos_token, [png_base64(picture)]),
            "n_predict": self.sampling.max_new_tokens,
            "temperature": self.sampling.temperature,
            "seed": self.sampling.seed,
            # The eval's sampling and nothing else, as in the transformers generator.
            **{"top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0, "cache_prompt": False},
        }
        return self.server.post("/completion", body)["content"]


def evaluate_fn_call(
    generator: LlavaGenerator | LlamaServerGenerator,
    data: str,
    image_root: Path,
    out_dir: Path,
    limit: int | None = None,
) -> dict[str, Any]:
    """Answer every row of ``data``, score the answers, write predictions and results; returns the results
    (``strict``: whole answers right, ``fields``: each field's exact-match rate, ``bad_rows``)."""
    raw = load_eval_rows(data, limit)
    if not raw:
        raise UserError(f"eval set {data}: no rows")
    rows: dict[int, FnCallRow] = {}
    bad_rows = []
    for index, row in enumerate(raw):
        try:
            rows[index] = read_row(row, image_root)
        except EvalRowError as error:
            bad_rows.append({"row": index + 1, "reason": str(error)})
    answers = dict(zip(rows, generator.generate(list(rows.values())), strict=True))
    out_dir.mkdir(parents=True, exist_ok=True)
    samples, fields = [], {}
    with (out_dir / PREDICTIONS_FILE).open("w", encoding="utf-8") as predictions:
        for index, row in rows.items():
            verdict = score_fn_call(row, answers[index])
            matches = field_matches(verdict, row.reference)
            for key, matched in matches.items():
                fields.setdefault(key, []).append(matched)
            samples.append(("fn_call", verdict))
            record = {
                **raw[index],
                "output": answers[index],
                "passed": verdict.passed,
                "reason": verdict.reason,
            }
            predictions.write(json.dumps({**record, "fields": matches}, ensure_ascii=False) + "\n")
    results = {
        "strict": aggregate(samples),
        "fields": {key: sum(hits) / len(hits) for key, hits in sorted(fields.items())},
        "bad_rows": bad_rows,
    }
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results
