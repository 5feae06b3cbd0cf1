"""axolotl's own virtual environment, made on first use: its pins (transformers, TRL, peft) differ from ours.

The environment holds axolotl (with its DeepSpeed extra) on the same torch release as ours, and this
project linked in without dependencies, so axolotl's processes can import the plugin that seals
checkpoints and logs metrics exactly as the TRL path does (``hermes_pipeline.train.axolotl_plugin``). It
lives under the user's cache by default; ``HERMES_AXOLOTL_ENV`` moves it, e.g. onto storage every node of a
cluster sees. A second run finds it ready and only checks that it links this checkout (relinking it when
another checkout used it last).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import hermes_pipeline
from hermes_pipeline.errors import UserError
from hermes_pipeline.locks import stage_lock

AXOLOTL_VERSION = "0.19.0"
ENV_VARIABLE = "HERMES_AXOLOTL_ENV"
READY = ".hermes-pipeline.json"


def env_dir() -> Path:
    """Where axolotl's environment is: ``$HERMES_AXOLOTL_ENV``, else the user's cache."""
    default = Path("~/.cache/hermes-pipeline") / f"axolotl-{AXOLOTL_VERSION}"
    return Path(os.environ.get(ENV_VARIABLE) or default).expanduser().absolute()


def env_python(folder: Path) -> Path:
    return folder / "bin" / "python"


def project_root() -> Path:
    """This checkout, which the environment links; the backend needs an install from source."""
    root = Path(hermes_pipeline.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise UserError(
            "the axolotl backend needs hermes-pipeline installed from its source checkout "
            "(pip install -e .); this one is installed as a package"
        )
    return root


def ensure_env(folder: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """axolotl's environment, made (several minutes, about 4 GB, once) or relinked to this checkout as
    needed; returns its Python. One process at a time does it; the others wait and find it ready."""
    folder = folder or env_dir()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with stage_lock(folder, wait=True):  # others wait, then find it ready
        wanted = _wanted()
        if _ready(folder) != wanted:
            log(
                f"setting up axolotl {AXOLOTL_VERSION} in its own environment at {folder} "
                f"(once; several minutes and about 4 GB; progress in {_log_path(folder)})"
            )
            _install(folder, wanted["torch"])
            (folder / READY).write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
        if _linked(folder) != str(project_root()):
            _pip(folder, "--no-deps", "--no-build-isolation", "--editable", str(project_root()))
    return env_python(folder)


def is_ready(folder: Path | None = None) -> bool:
    """Whether axolotl's environment has been made (without checking its torch, which needs torch here)."""
    ready = _ready(folder or env_dir())
    return ready is not None and ready.get("axolotl") == AXOLOTL_VERSION


def _wanted() -> dict[str, str]:
    import torch

    return {"axolotl": AXOLOTL_VERSION, "torch": torch.__version__.split("+")[0]}


def _ready(folder: Path) -> dict[str, str] | None:
    try:
        return json.loads((folder / READY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _linked(folder: Path) -> str | None:
    """The checkout the environment imports this project from, or None (isolated: not the working folder)."""
    probe = (
        "import pathlib, hermes_pipeline; print(pathlib.Path(hermes_pipeline.__file__).resolve().parents[1])"
    )
    done = subprocess.run(
        [env_python(folder), "-I", "-c", probe], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() if done.returncode == 0 else None


def _install(folder: Path, torch_version: str) -> None:
    """A fresh environment: torch first at our release (the index decides CPU or CUDA), then axolotl."""
    (folder / READY).unlink(missing_ok=True)
    _run(folder, [sys.executable, "-m", "venv", "--clear", str(folder)])
    _pip(folder, "--upgrade", "pip")
    _pip(folder, f"torch=={torch_version}")
    _pip(folder, f"axolotl[deepspeed]=={AXOLOTL_VERSION}", f"torch=={torch_version}")


def _pip(folder: Path, *args: str) -> None:
    _run(folder, [str(env_python(folder)), "-m", "pip", "install", "--progress-bar", "off", *args])


def _log_path(folder: Path) -> Path:
    return folder.with_name(f"{folder.name}.setup.log")  # beside it: `venv --clear` empties the folder


def _run(folder: Path, command: list[str]) -> None:
    log_path = _log_path(folder)
    with log_path.open("a", encoding="utf-8") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise UserError(
            f"setting up axolotl's environment failed at `{' '.join(command[-2:])}`; see {log_path}, then "
            f"run `hermes-pipeline setup axolotl` again"
        )
