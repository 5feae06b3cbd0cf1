"""Gather the wheels a GPU machine without a package registry needs to run benchmarks/gpu_check.py and the
training stages, packed within the 64 MiB that may travel to it.

The machine has Python 3.12 with torch 2.11, transformers 5.17, accelerate, peft, pyarrow, pandas and more
(gpu_machine_packages.txt lists them); the wheels are for the rest: the project's own, TRL, DeepSpeed,
datasets, Liger and bitsandbytes, and their dependencies that the machine lacks. Which ones those are is
decided by one pip resolution for the machine's platform (the machine's main packages pinned, ours added):
everything in the resolution that the machine's list does not name is downloaded with --no-deps. Nothing
of torch's is ever downloaded (its CUDA libraries alone are gigabytes).

DeepSpeed publishes only an sdist; it is built here with `DS_BUILD_OPS=0 pip wheel --no-deps deepspeed`, a
pure-Python wheel whose CUDA ops DeepSpeed compiles just in time if a run uses one (ZeRO with the Trainer's
own optimizer, as configs/deepspeed/ sets it up, uses none). The project's wheel is `pip wheel --no-deps .`.

The wheels come near the budget (bitsandbytes' alone is 41 MiB), so what travels is one xz-compressed tar
of them (see pack, 31 MiB with everything), which `make gpu-check` unpacks on the machine. bitsandbytes is the one
optional wheel: if the archive does not fit with it, it is left out and the reason written down (QLoRA is
then skipped there); if the archive does not fit without it, the script fails with one line.

    .venv/bin/python scripts/gather_gpu_wheels.py [--out build/gpu_wheels]

Result: the wheels and manifest.json (each wheel's size, the archive's, what was left out and why) in
--out, and the archive beside it (build/gpu_wheels.tar.xz): the one path to carry to the GPU machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 64 * 2**20
PYTHON = "3.12"
# A glibc 2.28 (or newer) x86_64 machine. pip takes --platform tags literally, so every older tag a wheel
# may carry is named too.
PLATFORMS = ["manylinux2014_x86_64", *(f"manylinux_2_{minor}_x86_64" for minor in range(17, 29))]
TARGET = [
    "--python-version", PYTHON, "--only-binary=:all:", *(arg for tag in PLATFORMS for arg in ("--platform", tag)),
]  # fmt: skip
# What the machine has, pinned to the versions it reports so that our packages resolve against them; the
# machine's whole package list (names only) is in gpu_machine_packages.txt beside this script.
MACHINE_HAS = ["torch==2.11.*", "transformers==5.17.*", "accelerate", "peft"]
MACHINE_PACKAGES = Path(__file__).with_name("gpu_machine_packages.txt")
WANTED = ["trl", "deepspeed", "datasets", "liger-kernel", "bitsandbytes"]
OPTIONAL = ["bitsandbytes"]


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def wanted_requirements() -> dict[str, str]:
    """Each wanted package with the bounds pyproject's extras give it (bare where no extra names it)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]
    bounds = {canonicalize_name(Requirement(line).name): line for lines in extras.values() for line in lines}
    return {name: bounds.get(canonicalize_name(name), name) for name in WANTED}


def resolve(requirements: list[str]) -> list[dict[str, Any]]:
    """pip's resolution of `requirements` for the machine, without installing or downloading anything but
    metadata."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        pip(
            "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
            "--target", str(Path(scratch) / "nowhere"), *TARGET, *requirements,
        )  # fmt: skip
        return json.loads(report.read_text(encoding="utf-8"))["install"]


def machine_packages() -> set[str]:
    """The packages the machine's image holds. Read from its list rather than inferred from what torch and
    transformers require: an inference missed pydantic, which the machine lacks, and the check stopped at
    its first import there."""
    lines = MACHINE_PACKAGES.read_text(encoding="utf-8").splitlines()
    return {canonicalize_name(line) for line in lines if line.strip() and not line.startswith("#")}


def wheel_name(path: Path) -> str:
    return canonicalize_name(path.name.split("-")[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu_wheels", help="the wheels' folder")
    out = parser.parse_args().out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    # 1. the two wheels built here: the project's, and DeepSpeed's from its sdist (no cache: a cached build
    #    would not have seen DS_BUILD_OPS)
    requirements = wanted_requirements()
    pip("wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(ROOT))
    pip(
        "wheel", "--no-deps", "--no-cache-dir", "--quiet", "--wheel-dir", str(out), requirements["deepspeed"],
        env={**os.environ, "DS_BUILD_OPS": "0"},
    )  # fmt: skip
    built = sorted(out.glob("*.whl"))

    # 2. what the machine lacks (the built wheels go in by path, so that no namesake on the index wins), then
    #    download it for the machine's platform
    installs = resolve([*map(str, built), *requirements.values(), *MACHINE_HAS])
    versions = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}
    have = machine_packages() | {wheel_name(path) for path in built}
    fetch = sorted(f"{name}=={v}" for name, v in versions.items() if name not in have)
    pip("download", "--no-deps", "--quiet", "--dest", str(out), *TARGET, *fetch)

    # 3. pack, within the budget: bitsandbytes goes first when everything does not fit
    archive = out.with_name(out.name + ".tar.xz")
    left_out: dict[str, str] = {}
    packed = pack(out, archive)
    for wheel in sorted(out.glob("*.whl")):
        if wheel_name(wheel) in OPTIONAL and packed > BUDGET:
            left_out[wheel.name] = (
                f"with it the archive is {packed / 2**20:.1f} MiB, over {BUDGET / 2**20:.0f} MiB"
            )
            wheel.unlink()
            packed = pack(out, archive)
    sizes = {path.name: path.stat().st_size for path in sorted(out.glob("*.whl"))}
    manifest = {
        "python": PYTHON,
        "platforms": PLATFORMS,
        "machine_has": MACHINE_HAS,
        "wheels": sizes,
        "wheels_bytes": sum(sizes.values()),
        "archive": archive.name,
        "archive_bytes": packed,
        "left_out": left_out,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for file, size in sorted(sizes.items(), key=lambda item: -item[1]):
        print(f"{size / 2**20:8.2f} MiB  {file}")
    for file, reason in left_out.items():
        print(f"left out {file}: {reason}")
    print(
        f"{sum(sizes.values()) / 2**20:8.2f} MiB in {len(sizes)} wheels; {packed / 2**20:.2f} MiB packed in {archive}"
    )
    if packed > BUDGET:
        sys.exit(
            f"gather_gpu_wheels: {archive} is {packed / 2**20:.1f} MiB, over the {BUDGET / 2**20:.0f} MiB budget"
        )


def pack(folder: Path, archive: Path) -> int:
    """Write the wheels into one xz-compressed tar and return its size. Each wheel is re-zipped without
    compression first (still a valid wheel: its RECORD hashes the files, not the zip): a wheel's deflated
    members leave xz nothing to gain, while xz over the raw files takes them to about half a wheel's size."""
    with tarfile.open(archive, "w:xz", preset=6) as tar:
        for wheel in sorted(folder.glob("*.whl")):
            stored = io.BytesIO()
            with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as target:
                for member in source.infolist():
                    target.writestr(member, source.read(member), compress_type=zipfile.ZIP_STORED)
            info = tarfile.TarInfo(f"{folder.name}/{wheel.name}")
            info.size = stored.tell()
            stored.seek(0)
            tar.addfile(info, stored)
    return archive.stat().st_size


if __name__ == "__main__":
    main()
