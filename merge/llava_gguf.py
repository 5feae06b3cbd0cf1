"""GGUF export of a Hermes 2 Vision (LLaVA) package: the language model through llama.cpp's converter, the
tower and projector as an mmproj file (merge/mmproj.py), each pair verified in llama-server before the
folder is published.

The check is the one a user's first request makes: llama-server loads the language model with ``--mmproj``,
reads a fixed probe picture and question, and its first answer token's log-probabilities must match
transformers' LLaVA model reading the same picture through the packaged processor. It runs the two ways
users send pictures: the raw completion route with the server's media marker where ``<image>`` stands, and
the OpenAI chat route (a picture part, then the question with LLaVA's newline in front); the prompt must be
as many tokens as transformers reads, every image token included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, ProcessorMixin

from hermes_pipeline.chat_format.tokens import IMAGE_TOKEN
from hermes_pipeline.llama_server import LlamaServer, running_server
from hermes_pipeline.merge.gguf_check import CONVERTER_TYPES, GgufCheckFailed, read_metadata
from hermes_pipeline.merge.llava import PROBE_QUESTION, probe_inputs, probe_picture, probe_prompt
from hermes_pipeline.merge.mmproj import mmproj_name, write_mmproj
from hermes_pipeline.merge.server_check import VERIFY_SERVER_ARGS
from hermes_pipeline.vision import png_base64

# The mmproj's image features (llama.cpp's tower and projector) against transformers', as a fraction of the
# features' largest magnitude: the f16 mmproj measured 0.07% and 0.13% on the tiny tower; the CLIP
# normalization the converter falls back to without --image-mean/--image-std measured 81%.
IMAGE_FEATURES_TOLERANCE = 1e-2
# Largest difference of a first-token log-probability (over llama.cpp's top tokens) from transformers'.
# f16 weights and f16 mmproj measured 0.0014 and 0.0021 nats on the tiny model; 16-bit and 32-bit files
# must stay within this, quantized ones must keep transformers' top token.
LOGPROB_TOLERANCE = 0.1
TOP_TOKENS = 8
REPLY_TOKENS = 128


@dataclass
class LlavaGgufReport:
    file: str
    mmproj: str
    gguf_type: str
    image_features_relative_difference: float = float("nan")
    prompt_tokens: int = 0
    max_logprob_difference: float = float("nan")  # raw completion route
    chat_max_logprob_difference: float = float("nan")  # OpenAI chat route
    reply: str = ""
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.file} + {self.mmproj}: verified in llama-server on a probe picture ({self.prompt_tokens} "
            f"prompt tokens as in transformers; first-token log-probabilities within "
            f"{max(self.max_logprob_difference, self.chat_max_logprob_difference):.4f} nats)"
        )


def verify_llava_files(
    model_dir: Path, folder: Path, files: list[tuple[Path, str]], name: str, log: Callable[[str], None]
) -> list[LlavaGgufReport]:
    """Write the mmproj beside the language-model ``files`` (path, type) and check each with it."""
    mmproj = folder / mmproj_name(name)
    write_mmproj(model_dir, mmproj, log)
    reference = transformers_reference(model_dir)
    return [verify_llava_gguf(path, mmproj, model_dir, gguf_type, reference) for path, gguf_type in files]


class Reference(NamedTuple):
    """What the packaged model makes of the probe in transformers, computed once for every file."""

    prompt_tokens: int
    logprobs: torch.Tensor  # of the first answer token
    image_features: np.ndarray  # the projector's output, one row per image token


@torch.no_grad()
def transformers_reference(model_dir: Path) -> Reference:
    """The probe through the packaged processor and model, in fp32."""
    inputs = probe_inputs(AutoProcessor.from_pretrained(model_dir))
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    logits = model(**inputs).logits[0, -1].float()
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"])
    # transformers 5.24 returns a BaseModelOutputWithPooling whose pooler_output holds the projected features.
    image_features = getattr(features, "pooler_output", features)[0].numpy()
    return Reference(inputs["input_ids"].shape[1], torch.log_softmax(logits, dim=-1), image_features)


def verify_llava_gguf(
    lm: Path, mmproj: Path, model_dir: Path, gguf_type: str, reference: Reference
) -> LlavaGgufReport:
    """Every check on one language-model file with the mmproj; raises GgufCheckFailed listing each
    problem found."""
    processor = AutoProcessor.from_pretrained(model_dir)
    report = LlavaGgufReport(lm.name, mmproj.name, gguf_type)
    problems = metadata_problems(lm, model_dir, processor)
    if problems:
        raise GgufCheckFailed(f"{lm.name}: " + "; ".join(problems))
    report.image_features_relative_difference = image_features_difference(
        lm, mmproj, probe_picture(processor), reference.image_features
    )
    if not report.image_features_relative_difference <= IMAGE_FEATURES_TOLERANCE:
        problems.append(
            f"{mmproj.name}'s image features differ from transformers' by "
            f"{report.image_features_relative_difference:.2%} of their range "
            f"(tolerance {IMAGE_FEATURES_TOLERANCE:.0%})"
        )
    quantized = gguf_type not in CONVERTER_TYPES
    best = int(reference.logprobs.argmax())
    with running_server(lm, extra=["--mmproj", str(mmproj), *VERIFY_SERVER_ARGS]) as server:
        if not server.get("/props").get("modalities", {}).get("vision"):
            raise GgufCheckFailed(f"{lm.name}: llama-server loaded {mmproj.name} without vision")
        for route, (tokens, top) in {
            "completion": completion_route(server, processor),
            "chat": chat_route(server, processor),
        }.items():
            if tokens != reference.prompt_tokens:
                problems.append(
                    f"the {route} route reads the probe as {tokens} tokens; "
                    f"transformers reads {reference.prompt_tokens}"
                )
            difference = max(abs(lp - float(reference.logprobs[token])) for token, lp in top.items())
            if route == "completion":
                report.max_logprob_difference, report.prompt_tokens = difference, tokens
            else:
                report.chat_max_logprob_difference = difference
            first = max(top, key=top.get)
            if first != best:
                problems.append(f"the {route} route's first token is {first}, not {best}")
            elif not quantized and difference > LOGPROB_TOLERANCE:
                problems.append(
                    f"the {route} route's first-token log-probabilities differ from transformers' by "
                    f"{difference:.3f} nats (tolerance {LOGPROB_TOLERANCE})"
                )
        report.reply, stopped = reply(server, processor)
        if not stopped:
            problems.append(f"a greedy reply to the probe did not stop within {REPLY_TOKENS} tokens")
    report.problems = problems
    if problems:
        raise GgufCheckFailed(f"{lm.name}: " + "; ".join(problems))
    return report


def image_features_difference(lm: Path, mmproj: Path, picture: Image.Image, expected: np.ndarray) -> float:
    """llama.cpp's image features for ``picture`` (its own preprocessing, tower and projector, through
    llama-cpp-python's libmtmd) against ``expected``, as a fraction of the latter's largest magnitude. The
    language model only tells libmtmd the embedding width."""
    import ctypes

    from llama_cpp import Llama, llama_model_n_embd
    from llama_cpp import mtmd_cpp as mtmd
    from llama_cpp._logger import llama_log_callback

    llm = Llama(model_path=str(lm), n_ctx=256, verbose=False)
    mtmd.mtmd_log_set(llama_log_callback, None)  # llama-cpp-python's logger: quiet unless verbose
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.n_threads = False, False, 2
    context = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
    data = picture.tobytes()
    bitmap = mtmd.mtmd_bitmap_init(
        picture.width, picture.height, (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    )
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        marker = mtmd.mtmd_default_marker()
        text = mtmd.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
        if mtmd.mtmd_tokenize(
            context, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1
        ):
            raise GgufCheckFailed(f"{mmproj.name}: llama.cpp could not read the probe picture")
        every = [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]
        image = next(
            c for c in every if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE
        )
        if mtmd.mtmd_encode_chunk(context, image):
            raise GgufCheckFailed(f"{mmproj.name}: llama.cpp could not encode the probe picture")
        rows = mtmd.mtmd_input_chunk_get_n_tokens(image)
        width = llama_model_n_embd(llm.model)
        actual = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(context), shape=(rows * width,))
        actual = actual.reshape(rows, width).copy()
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(context)
        llm.close()
    if actual.shape != expected.shape:
        raise GgufCheckFailed(
            f"{mmproj.name}: llama.cpp makes {rows} image tokens of {width}; transformers {expected.shape[0]} "
            f"of {expected.shape[1]}"
        )
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def metadata_problems(lm: Path, model_dir: Path, processor: ProcessorMixin) -> list[str]:
    """What llama.cpp reads from the file besides weights: the stop token, BOS, the Vicuna v1 template and
    the vocabulary (``<image>`` included, though llama.cpp writes images through the mmproj)."""
    metadata = read_metadata(lm)
    tokenizer = processor.tokenizer
    problems = []
    for key in ("eos_token_id", "bos_token_id"):
        if metadata[key] != getattr(tokenizer, key):
            problems.append(
                f"tokenizer.ggml.{key} is {metadata[key]}, the tokenizer says {getattr(tokenizer, key)}"
            )
    if metadata["chat_template"] != tokenizer.chat_template:
        problems.append("tokenizer.chat_template is not the packaged Vicuna v1 template")
    rows = AutoConfig.from_pretrained(model_dir).text_config.vocab_size
    if len(metadata["tokens"] or []) != rows:
        problems.append(
            f"the GGUF vocabulary has {len(metadata['tokens'] or [])} tokens; the model has {rows}"
        )
    elif metadata["tokens"][tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)] != IMAGE_TOKEN:
        problems.append(f"the GGUF vocabulary does not hold {IMAGE_TOKEN} at the tokenizer's id")
    return problems


def completion_route(server: LlamaServer, processor: ProcessorMixin) -> tuple[int, dict[int, float]]:
    """The probe as a raw prompt: the packaged template's text with the server's media marker for
    ``<image>`` (llama.cpp puts BOS in front itself). Returns the prompt length and the top tokens."""
    prompt = server.media_prompt(
        probe_prompt(processor), processor.tokenizer.bos_token, [_picture(processor)]
    )
    body = {"prompt": prompt, "cache_prompt": False}
    answer = server.post("/completion", {**body, "n_predict": 1, "n_probs": TOP_TOKENS, "temperature": 0})
    top = answer["completion_probabilities"][0]["top_logprobs"]
    return answer["tokens_evaluated"], {t["id"]: t["logprob"] for t in top}


def chat_route(server: LlamaServer, processor: ProcessorMixin) -> tuple[int, dict[int, float]]:
    """The probe as an OpenAI chat request: the picture part, then the question after LLaVA's newline (the
    server joins parts with nothing between them)."""
    answer = server.post(
        "/v1/chat/completions",
        {**chat_request(processor), "max_tokens": 1, "logprobs": True, "top_logprobs": TOP_TOKENS},
    )
    top = answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    return answer["usage"]["prompt_tokens"], {t["id"]: t["logprob"] for t in top}


def chat_request(processor: ProcessorMixin) -> dict[str, Any]:
    question = PROBE_QUESTION.removeprefix(IMAGE_TOKEN)
    url = f"data:image/png;base64,{_picture(processor)}"
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, "cache_prompt": False}


def reply(server: LlamaServer, processor: ProcessorMixin) -> tuple[str, bool]:
    """A greedy reply on the chat route and whether it ended at end of generation (``</s>``)."""
    answer = server.post("/v1/chat/completions", {**chat_request(processor), "max_tokens": REPLY_TOKENS})
    choice = answer["choices"][0]
    return choice["message"]["content"], choice["finish_reason"] == "stop"


def _picture(processor: ProcessorMixin) -> str:
    return png_base64(probe_picture(processor))
