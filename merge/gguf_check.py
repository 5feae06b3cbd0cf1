"""Check a GGUF file against the packaged model it was made from, with llama.cpp itself doing the reading.

The classic ways a Hermes GGUF breaks: EOS/EOT not ``<|im_end|>`` (generation never stops), the tool_use
template dropped (servers do not parse tool calls), ``<|im_end|>`` split into pieces, a tokenizer that
tokenizes differently from the original, and weights that no longer compute the same function. Last, the
file is served by llama.cpp's own server (merge/server_check.py), the engine users run it with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from hermes_pipeline.chat_format.tokens import IM_END
from hermes_pipeline.errors import UserError
from hermes_pipeline.merge.probes import CONVERSATIONS, probe_ids, probe_logits, probe_texts
from hermes_pipeline.merge.server_check import check_served
from hermes_pipeline.models import gguf_bos_text

# The types llama.cpp's converter writes; the others are quantized from one of them.
CONVERTER_TYPES = ("f32", "f16", "bf16")
# f16 logits may differ from the Hugging Face model's by this much relative to the largest logit
# (half-precision weights and a different kernel order).
F16_RELATIVE_TOLERANCE = 2e-2
MIN_TOP1_AGREEMENT = 0.9
REPLY_TOKENS = 128


class GgufCheckFailed(UserError):
    """A GGUF that is not the packaged model; the export fails rather than ship it."""


@dataclass
class GgufReport:
    file: str
    gguf_type: str
    eos_token_id: int
    vocab_size: int
    logits_relative_difference: float | None = None
    top1_agreement: float | None = None
    reply: str = ""
    server: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        parity = (
            f"logits within {self.logits_relative_difference:.2%} of the HF model"
            if self.logits_relative_difference is not None
            else f"top-1 agreement with the reference {self.top1_agreement:.1%}"
        )
        served = f"{self.server.get('templates_rendered', 0)} prompts rendered and tool calls parsed by llama-server"
        return f"{self.file}: verified ({parity}; stops at {IM_END}; {served})"


class Reference(NamedTuple):
    """The converted file's logits on the probes, computed once for all the files quantised from it."""

    name: str
    scores: list[np.ndarray]


def reference_of(path: Path, model_dir: Path) -> Reference:
    return Reference(path.name, gguf_logits(load(path), probe_ids(AutoTokenizer.from_pretrained(model_dir))))


def verify_gguf(path: Path, model_dir: Path, gguf_type: str, reference: Reference | None) -> GgufReport:
    """Every check on one file; raises GgufCheckFailed listing each problem found.

    ``reference`` is None for the file converted from the model (compared with the HF model's logits);
    for quantised files it is that file's, and the top-1 token must agree at most positions.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    metadata = read_metadata(path)
    problems = metadata_problems(metadata, tokenizer, model_dir)
    if problems:  # the probes need both templates and the right tokens: stop at the first layer of faults
        raise GgufCheckFailed(f"{path.name}: " + "; ".join(problems))
    llm = load(path)
    problems += vocab_problems(llm, tokenizer)
    report = GgufReport(path.name, gguf_type, metadata["eos_token_id"], len(metadata["tokens"]))
    prompts = probe_ids(tokenizer)
    scores = gguf_logits(llm, prompts)
    if reference is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        expected = [t.numpy() for t in probe_logits(model, prompts)]
        report.logits_relative_difference = relative_difference(expected, scores)
        if not report.logits_relative_difference <= F16_RELATIVE_TOLERANCE:
            problems.append(
                f"logits differ from the Hugging Face model's by {report.logits_relative_difference:.2%} "
                f"of their range (tolerance {F16_RELATIVE_TOLERANCE:.0%})"
            )
    else:
        report.top1_agreement = top1_agreement(reference.scores, scores)
        if report.top1_agreement < MIN_TOP1_AGREEMENT:
            problems.append(
                f"top-1 token agrees with {reference.name} at {report.top1_agreement:.1%} of positions "
                f"(needs {MIN_TOP1_AGREEMENT:.0%})"
            )
    report.reply, stopped = reply(llm, probe_texts(tokenizer)[0])
    if not stopped:
        problems.append(f"a greedy reply did not end at {IM_END} within {REPLY_TOKENS} tokens")
    served = check_served(path, model_dir, tokenizer)
    report.server = served.as_dict()
    report.problems = problems + served.problems
    if report.problems:
        raise GgufCheckFailed(f"{path.name}: " + "; ".join(report.problems))
    return report


def read_metadata(path: Path) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(path)

    def value(key: str) -> Any:
        found = reader.get_field(key)
        return None if found is None else found.contents()

    keys = gguf.Keys.Tokenizer
    return {
        "eos_token_id": value(keys.EOS_ID),
        "eot_token_id": value(keys.EOT_ID),
        "bos_token_id": value(keys.BOS_ID),
        "pad_token_id": value(keys.PAD_ID),
        "chat_template": value(keys.CHAT_TEMPLATE),
        "chat_template_tool_use": value(keys.CHAT_TEMPLATE_N.format(name="tool_use")),
        "tokens": value(keys.LIST),
        "token_types": value(keys.TOKEN_TYPE),
    }


def metadata_problems(
    metadata: dict[str, Any], tokenizer: PreTrainedTokenizerBase, model_dir: Path
) -> list[str]:
    import gguf
    from transformers import AutoConfig

    end = tokenizer.convert_tokens_to_ids(IM_END)
    problems = []
    if metadata["eos_token_id"] != end:
        problems.append(f"tokenizer.ggml.eos_token_id is {metadata['eos_token_id']}, not {IM_END} ({end})")
    if metadata["eot_token_id"] not in (None, end):
        problems.append(f"tokenizer.ggml.eot_token_id is {metadata['eot_token_id']}, not {IM_END} ({end})")
    for key in ("bos_token_id", "pad_token_id"):
        expected = getattr(tokenizer, key)
        if expected is not None and metadata[key] != expected:
            problems.append(f"tokenizer.ggml.{key} is {metadata[key]}, the tokenizer says {expected}")
    templates = tokenizer.chat_template if isinstance(tokenizer.chat_template, dict) else {}
    if metadata["chat_template"] != templates.get("default"):
        problems.append("tokenizer.chat_template is not the packaged default template")
    if metadata["chat_template_tool_use"] != templates.get("tool_use"):
        problems.append("tokenizer.chat_template.tool_use is not the packaged tool_use template")
    # llama.cpp (and vLLM) switch to the Hermes 2 Pro tool-call parser when the template contains <tool_call>.
    if "<tool_call>" not in (metadata["chat_template_tool_use"] or ""):
        problems.append("the tool_use template has no <tool_call>: servers would not parse Hermes tool calls")
    rows = AutoConfig.from_pretrained(model_dir).vocab_size
    tokens, types = metadata["tokens"] or [], metadata["token_types"] or []
    if len(tokens) != rows:
        problems.append(f"the GGUF vocabulary has {len(tokens)} tokens; the model has {rows} embedding rows")
    hf_tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    differ = [i for i, token in enumerate(hf_tokens) if i < len(tokens) and tokens[i] != token]
    if differ:
        i = differ[0]
        problems.append(
            f"{len(differ)} token strings differ from the tokenizer's, e.g. id {i}: {tokens[i]!r}"
        )
    for token_id in sorted(special_ids(tokenizer)):
        if token_id < len(types) and types[token_id] != gguf.TokenType.CONTROL:
            problems.append(f"special token {hf_tokens[token_id]!r} ({token_id}) is not a control token")
    return problems


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return ids | {tokenizer.convert_tokens_to_ids(IM_END)}


def load(path: Path) -> Any:
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=2048, logits_all=True, verbose=False, seed=0)


def vocab_problems(llm: Any, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """llama.cpp must tokenize like the original, keep every special token whole, and stop at <|im_end|>."""
    import llama_cpp

    problems = []
    end = tokenizer.convert_tokens_to_ids(IM_END)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    if not llama_cpp.llama_vocab_is_eog(vocab, end):
        problems.append(f"llama.cpp does not treat {IM_END} as end of generation")
    for token_id in sorted(special_ids(tokenizer)):
        text = tokenizer.convert_ids_to_tokens(token_id)
        pieces = llm.tokenize(text.encode(), add_bos=False, special=True)
        if pieces != [token_id]:
            problems.append(f"llama.cpp splits {text!r} into {pieces}")
    for text, expected in zip(probe_texts(tokenizer), probe_ids(tokenizer), strict=True):
        if llm.tokenize(text.encode(), add_bos=False, special=True) != expected:
            problems.append("llama.cpp tokenizes the probe prompts differently from the tokenizer")
            break
    rendered = llama_chat_render(llm, CONVERSATIONS[1][0])
    ours = tokenizer.apply_chat_template(CONVERSATIONS[1][0], tokenize=False, add_generation_prompt=True)
    if rendered != ours.removeprefix(tokenizer.bos_token or ""):  # llama.cpp adds BOS when tokenizing
        problems.append("llama.cpp's built-in rendering of the default template differs from the tokenizer's")
    return problems


def llama_chat_render(llm: Any, messages: list[dict]) -> str:
    """How llama.cpp itself renders a chat with the file's default template (it recognises ChatML)."""
    import ctypes

    import llama_cpp

    template = llm.metadata["tokenizer.chat_template"].encode()
    array = (llama_cpp.llama_chat_message * len(messages))(
        *(llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages)
    )
    buffer = ctypes.create_string_buffer(8192)
    length = llama_cpp.llama_chat_apply_template(template, array, len(messages), True, buffer, len(buffer))
    return buffer.raw[: max(length, 0)].decode()


def gguf_logits(llm: Any, prompts: list[list[int]]) -> list[np.ndarray]:
    outputs = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        outputs.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    return outputs


def relative_difference(expected: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """Largest logit difference as a fraction of the largest logit magnitude (NaN stays NaN and fails)."""
    scale = max(float(np.abs(e).max()) for e in expected)
    return max(float(np.abs(a - e).max()) for e, a in zip(expected, actual, strict=True)) / scale


def top1_agreement(reference: list[np.ndarray], actual: list[np.ndarray]) -> float:
    agree = sum(int((r.argmax(-1) == a.argmax(-1)).sum()) for r, a in zip(reference, actual, strict=True))
    return agree / sum(len(r) for r in reference)


def reply(llm: Any, prompt: str) -> tuple[str, bool]:
    """A greedy reply to a rendered prompt and whether it stopped at end of generation (not at the token
    limit). llama.cpp puts BOS in front of the prompt itself, so the template's own BOS is taken off."""
    llm.reset()
    result = llm.create_completion(
        prompt.removeprefix(gguf_bos_text(llm)), max_tokens=REPLY_TOKENS, temperature=0.0
    )
    choice = result["choices"][0]
    return choice["text"], choice["finish_reason"] == "stop" and IM_END not in choice["text"]
