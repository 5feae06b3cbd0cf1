"""GGUF export: llama.cpp's own converter writes f16 (or f32/bf16), llama.cpp's quantizer the rest.

Every file is written under a temporary name, verified against the packaged model (merge/gguf_check.py)
and only then renamed; the whole folder appears only when every requested type passed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hermes_pipeline.disk import check_free_space
from hermes_pipeline.errors import UserError
from hermes_pipeline.merge.gguf_check import CONVERTER_TYPES, GgufReport, reference_of, verify_gguf
from hermes_pipeline.merge.llava_gguf import LlavaGgufReport, verify_llava_files
from hermes_pipeline.merge.server_check import sampling_defaults
from hermes_pipeline.merge.shards import model_bytes
from hermes_pipeline.models import is_llava
from hermes_pipeline.recipe.schema import GGUF_TYPES, Recipe
from hermes_pipeline.remote_code import refuse_custom_code
from hermes_pipeline.rundir import (
    MANIFEST,
    file_fingerprint,
    stage_dir,
    staged_output,
)
from hermes_pipeline.stages import run_stage

GGUF = "gguf"
# llama.cpp's quantize accepts these short names for its medium K-quant mixes.
ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}
# Llama-3's pre-tokenizer regex opens with its case-insensitive contractions group.
LLAMA_BPE_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"


def file_name(name: str, gguf_type: str) -> str:
    """llama.cpp's naming: 16/32-bit types in lower case, quantised types in upper case."""
    kind = ALIASES.get(gguf_type.lower(), gguf_type.lower())
    return f"{name}-{kind if kind in CONVERTER_TYPES else kind.upper()}.gguf"


def export_gguf(
    model_dir: Path,
    out_dir: Path,
    types: list[str],
    name: str,
    log: Callable[[str], None] = print,
    trust_remote_code: bool = False,
) -> list[GgufReport] | list[LlavaGgufReport]:
    """Convert ``model_dir`` to every type in ``types``, verify each file, and publish ``out_dir``."""
    with staged_output(out_dir) as partial:
        return write_gguf_files(model_dir, partial, types, name, log, trust_remote_code)


def write_gguf_files(
    model_dir: Path,
    folder: Path,
    types: list[str],
    name: str,
    log: Callable[[str], None] = print,
    trust_remote_code: bool = False,
) -> list[GgufReport] | list[LlavaGgufReport]:
    """Every requested type in ``folder`` (a staging folder), each verified, and verification.json.

    llama.cpp's converter loads some tokenizers with remote code allowed, so a folder naming code of its
    own is refused here unless ``trust_remote_code``."""
    refuse_custom_code(model_dir, trust_remote_code)
    unknown = [t for t in types if t.lower() not in GGUF_TYPES]
    if unknown:
        raise UserError(f"unknown GGUF type {unknown[0]!r}; known: {', '.join(GGUF_TYPES)}")
    types = list(dict.fromkeys(ALIASES.get(t.lower(), t.lower()) for t in types))
    check_free_space(folder.parent, int(model_bytes(model_dir) * (0.6 * len(types) + 0.6)))
    files = _write_types(model_dir, folder, types, name, log)
    if is_llava(model_dir):  # a Vision package: each language model is checked with the mmproj
        reports: list[GgufReport] | list[LlavaGgufReport] = verify_llava_files(
            model_dir, folder, files, name, log
        )
    else:
        reports = _verify_text_files(model_dir, files)
    reference, reference_type = files[0]
    if reference_type not in types:
        reference.unlink()
    (folder / "verification.json").write_text(
        json.dumps([r.as_dict() for r in reports], indent=2) + "\n", encoding="utf-8"
    )
    for report in reports:
        log(f"export: {report.summary()}")
    return reports


def _write_types(
    model_dir: Path, folder: Path, types: list[str], name: str, log: Callable[[str], None]
) -> list[tuple[Path, str]]:
    """Every requested type as a file in ``folder``, the converter's reference first: f16 unless only
    other 16/32-bit types were asked for (then the first of them; f16 when only quantized ones were, kept
    as the quantizer's source and the others' reference)."""
    converted = [t for t in types if t in CONVERTER_TYPES]
    reference_type = "f16" if "f16" in types or not converted else converted[0]
    files = []
    for gguf_type in [reference_type, *(t for t in types if t != reference_type)]:
        target = folder / file_name(name, gguf_type)
        if gguf_type in CONVERTER_TYPES:
            log(f"export: converting {model_dir} to {target.name} with llama.cpp's converter")
            convert(model_dir, target, gguf_type, log)
        else:
            log(f"export: quantizing to {target.name}")
            quantize(files[0][0], target, gguf_type)
        files.append((target, gguf_type))
    return files


def _verify_text_files(model_dir: Path, files: list[tuple[Path, str]]) -> list[GgufReport]:
    """The converted file against the HF model's logits, each other file against the converted one's."""
    (reference, reference_type), *others = files
    reports = [verify_gguf(reference, model_dir, reference_type, None)]
    scores = reference_of(reference, model_dir)
    return reports + [verify_gguf(path, model_dir, gguf_type, scores) for path, gguf_type in others]


def convert(model_dir: Path, out_file: Path, gguf_type: str, log: Callable[[str], None] = print) -> None:
    """Run llama.cpp's converter in this process; a Llama-3 tokenizer whose pre-tokenizer the converter does
    not recognise (fine-tunes that changed the tokenizer files) is mapped to llama-bpe, with a message."""
    import gguf
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    logging.getLogger("hf-to-gguf").setLevel(logging.WARNING)
    hparams = ModelBase.load_hparams(model_dir, False)
    try:
        model_class = get_model_class(get_model_architecture(hparams, ModelType.TEXT))
    except NotImplementedError as exc:
        raise UserError(
            f"{model_dir}: llama.cpp's converter does not support this architecture ({exc})"
        ) from None
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16}.get(
        gguf_type, gguf.LlamaFileType.MOSTLY_F16
    )
    partial = out_file.with_name(out_file.name + ".partial")
    # The converter's metadata override (its --metadata option) carries the packaged sampling defaults.
    metadata = out_file.with_name(out_file.name + ".metadata.json")
    metadata.write_text(json.dumps(_sampling_metadata(model_dir)), encoding="utf-8")
    space_prefix = _space_prefix(model_dir)
    try:
        _configured(model_class, False, space_prefix)(
            model_dir, file_type, partial, metadata_override=metadata
        ).write()
    except NotImplementedError as exc:
        if "pre-tokenizer was not recognized" not in str(exc):
            raise
        if not is_llama3_tokenizer(model_dir):
            raise UserError(
                f"{model_dir}: llama.cpp's converter does not know this BPE pre-tokenizer; add it to "
                "convert_hf_to_gguf_update.py upstream or convert with a llama.cpp that knows it"
            ) from None
        log(
            "export: the converter did not recognise this tokenizer's fingerprint (added tokens change it); "
            "it is a Llama-3 tokenizer, so its pre-tokenizer is llama-bpe"
        )
        partial.unlink(missing_ok=True)
        _configured(model_class, True, space_prefix)(
            model_dir, file_type, partial, metadata_override=metadata
        ).write()
    finally:
        metadata.unlink(missing_ok=True)
    os.replace(partial, out_file)


def _configured(model_class: type, llama_bpe: bool, space_prefix: bool | None) -> type:
    """The converter's model class with two facts it cannot see for itself."""

    class Configured(model_class):  # type: ignore[misc, valid-type]
        model_arch = model_class.model_arch

        def get_vocab_base_pre(self, tokenizer: object) -> str:
            return "llama-bpe" if llama_bpe else super().get_vocab_base_pre(tokenizer)

        def set_vocab(self) -> None:
            super().set_vocab()
            if space_prefix is not None:
                self.gguf_writer.add_add_space_prefix(space_prefix)

    return Configured


def _sampling_metadata(model_dir: Path) -> dict[str, float | int]:
    """``general.sampling.*`` keys, so llama-server, LM Studio and llama-cli start from the packaged
    defaults instead of their own (the converter reads only some of generation_config.json's names)."""
    return {f"general.sampling.{name}": value for name, value in sampling_defaults(model_dir).items()}


def _space_prefix(model_dir: Path) -> bool | None:
    """For a SentencePiece vocabulary, whether llama.cpp must put a space before text that follows a
    special token. llama.cpp does by default; tokenizers with Metaspace ``prepend_scheme: first`` do not,
    so ``<|im_start|>user`` would tokenize differently from training. None: the converter already knows."""
    from transformers import AutoTokenizer

    from hermes_pipeline.chat_format.tokens import IM_START

    config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    if not (model_dir / "tokenizer.model").is_file() or config.get("add_prefix_space") is not None:
        return None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pieces = tokenizer.tokenize(f"{IM_START}user")
    return len(pieces) > 1 and pieces[1].startswith("\u2581")


def is_llama3_tokenizer(model_dir: Path) -> bool:
    """A byte-level BPE whose split pattern is Llama-3's (contractions first, digits in groups of three)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    split = next((s for s in steps if s.get("type") == "Split"), None)
    pattern = (split or {}).get("pattern", {}).get("Regex", "")
    byte_level = any(s.get("type") == "ByteLevel" for s in steps)
    return byte_level and pattern.startswith(LLAMA_BPE_SPLIT) and r"\p{N}{1,3}" in pattern


def quantize(source: Path, out_file: Path, gguf_type: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
    params.nthread = os.cpu_count() or 1
    partial = out_file.with_name(out_file.name + ".partial")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params) != 0:
        partial.unlink(missing_ok=True)
        raise UserError(f"llama.cpp could not quantize {source.name} to {gguf_type} (see its log above)")
    os.replace(partial, out_file)


def run_export(recipe: Recipe, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """The recipe stage: export runs/<name>/final to runs/<name>/gguf/, skipped when already done."""
    from hermes_pipeline.merge.package import FINAL

    model_dir = stage_dir(recipe, FINAL)
    upstream = model_dir / MANIFEST
    if not upstream.is_file():
        raise UserError(f"{model_dir} is not packaged yet; run `hermes-pipeline package RECIPE` first")

    def export(partial: Path) -> dict[str, Any]:
        reports = write_gguf_files(
            model_dir, partial, recipe.export.gguf_types, recipe.name, log, recipe.model.trust_remote_code
        )
        return {"verification": [r.as_dict() for r in reports]}

    out = stage_dir(recipe, GGUF)
    run_stage(recipe, "export", out, {"model": file_fingerprint(upstream)}, export, force, log)
    return out
