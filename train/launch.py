"""One command for one CPU process, one GPU, a full node or many nodes.

``hermes-pipeline train sft RECIPE`` run by hand on one node starts itself again under torchrun with one
process per device the stage asks for. Under a launcher (torchrun, accelerate, or the SLURM scripts that
start torchrun on every node) the environment already names this process's rank and nothing is relaunched.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist

from hermes_pipeline.errors import UserError
from hermes_pipeline.recipe.schema import Resources


def launched() -> bool:
    """True inside a process started by a distributed launcher."""
    return "LOCAL_RANK" in os.environ


def is_main_process() -> bool:
    """Global rank 0, or a process no launcher started: the one that owns the stage's lock and seal."""
    return os.environ.get("RANK", "0") == "0"


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def configure_devices(resources: Resources, key: str) -> None:
    """Check the stage's device request against this machine and point DeepSpeed at the right accelerator."""
    gpus = torch.cuda.device_count()
    wanted = resources.processes_per_node or resources.gpus_per_node or 1
    if resources.gpus_per_node and gpus == 0:
        raise UserError(
            f"{key}.resources.gpus_per_node is {resources.gpus_per_node} but this machine has no GPU; "
            f"run on a GPU node or set {key}.resources.gpus_per_node=0 to train on CPU"
        )
    if resources.gpus_per_node and wanted > gpus:
        raise UserError(
            f"{key}.resources asks for {wanted} processes per node but this node has {gpus} GPUs; "
            f"set {key}.resources.gpus_per_node={gpus}"
        )
    if gpus == 0 or not resources.gpus_per_node:
        # DeepSpeed picks its accelerator from this variable; on a CPU node it would otherwise look for CUDA.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def relaunch_command(resources: Resources, argv: Sequence[str]) -> list[str] | None:
    """The torchrun command that starts this command once per device, or None to run in this process."""
    if launched():
        return None
    per_node = resources.processes_per_node or resources.gpus_per_node or 1
    if resources.nodes > 1:
        raise UserError(
            f"this stage asks for {resources.nodes} nodes: submit it with `hermes-pipeline slurm submit`, "
            "or start torchrun on every node yourself"
        )
    if per_node == 1:
        return None
    if not resources.gpus_per_node:
        # torchrun would pin every CPU process to one thread; share the stage's cores out instead.
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, resources.cpus_per_task // per_node)))
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={per_node}",
        "-m",
        "hermes_pipeline.cli",
        *argv,
    ]
