"""Site settings: everything about one cluster that a recipe must not hard-code.

A recipe travels between clusters; the partition, account, modules, environment and cache folders do not.
They live in a small YAML file named by the recipe (``cluster.site_config``) or by ``HERMES_SITE_CONFIG``,
validated here with the same one-line-per-problem messages as a recipe. ``${VAR}`` in a value is expanded
when the jobs are submitted, so ``/scratch/${USER}`` names the submitting user's folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from hermes_pipeline.errors import RecipeError, UserError
from hermes_pipeline.recipe.loader import expand_env, format_validation_errors, parse_yaml
from hermes_pipeline.recipe.schema import Recipe

SITE_CONFIG_ENV = "HERMES_SITE_CONFIG"


def _matching(pattern: str, expected: str) -> AfterValidator:
    def check(value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise ValueError(expected)
        return value

    return AfterValidator(check)


# One line of text: a value that ends up inside a single #SBATCH line or a single shell word.
OneLine = Annotated[str, _matching(r"[^\n\r]+", "expected one non-empty line")]
SbatchOption = Annotated[
    str, _matching(r"--?[A-Za-z][^\n\r]*", "expected an sbatch option such as --exclusive, without #SBATCH")
]
EnvName = Annotated[
    str, _matching(r"[A-Za-z_][A-Za-z0-9_]*", "not a variable name (letters, digits and _, no leading digit)")
]


class SiteConfig(BaseModel):
    """How jobs run on one cluster. Every field is optional: the empty config uses the cluster defaults."""

    model_config = ConfigDict(extra="forbid")

    partition: OneLine | None = None
    account: OneLine | None = None
    qos: OneLine | None = None
    constraint: OneLine | None = None
    # Extra sbatch options, one per #SBATCH line, e.g. "--exclusive" or "--mail-type=FAIL".
    sbatch: list[SbatchOption] = []
    modules: list[OneLine] = []  # `module load` each, in order
    venv: OneLine | None = None  # a virtual environment to activate (its bin/activate is sourced)
    # Shell lines run verbatim before each stage (conda activate, site scripts): site code, not data.
    setup: list[OneLine] = []
    # A command that runs what follows it inside a container, e.g. [apptainer, exec, --nv, image.sif].
    container: list[OneLine] = []
    python: OneLine | None = None  # the interpreter in the job; default: the one that submits
    scratch_dir: OneLine | None = None  # node-local or fast scratch, becomes TMPDIR
    hf_home: OneLine | None = None  # the Hugging Face cache on shared storage, becomes HF_HOME
    # Compute nodes usually have no internet: fill hf_home from a login node, jobs never call the Hub.
    hf_hub_offline: bool = True
    env: dict[EnvName, str] = {}
    # Seconds before the time limit at which a training job is told to checkpoint and requeue itself.
    checkpoint_signal_s: Annotated[int, Field(ge=30, le=3600)] = 300


def site_config_path(recipe: Recipe) -> Path | None:
    """The recipe's own ``cluster.site_config`` first, then ``$HERMES_SITE_CONFIG``; None uses defaults."""
    if recipe.cluster.site_config:
        return Path(recipe.cluster.site_config)
    from_env = os.environ.get(SITE_CONFIG_ENV)
    return Path(from_env) if from_env else None


def load_site_config(path: Path | None) -> SiteConfig:
    if path is None:
        return SiteConfig()
    if not path.is_file():
        raise UserError(f"{path}: site config not found (from cluster.site_config or ${SITE_CONFIG_ENV})")
    raw = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if raw is None:
        return SiteConfig()
    if not isinstance(raw, dict):
        raise RecipeError([f"{path}: a site config is a YAML mapping (partition, account, modules, ...)"])
    try:
        return SiteConfig.model_validate(expand_env(raw, str(path)))
    except ValidationError as exc:
        raise RecipeError(format_validation_errors(exc, str(path), set(), root=SiteConfig)) from None
