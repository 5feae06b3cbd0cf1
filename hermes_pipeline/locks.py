"""One writer per stage: a second command on a stage that is being written stops in one line.

Without it, two runs on one run directory race: the second removes the first's ``.partial`` folder and
one of them ends in a traceback. The lock is an ``flock`` on a hidden file beside the stage folder, so the
kernel drops it when its holder exits or dies (a crash, ``kill -9``, a SLURM requeue): there is never a
stale lock to clear by hand. The file names the holder (host, PID, SLURM job) for the message the second
starter gets. On a shared filesystem the lock holds across nodes where the filesystem supports ``flock``
(NFSv4, Lustre mounted with ``-o flock``, GPFS).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hermes_pipeline.errors import UserError


def lock_file(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.lock")


@contextmanager
def stage_lock(folder: Path, wait: bool = False) -> Iterator[None]:
    """Hold ``folder``'s lock for the body; a UserError naming the holder when another process has it,
    or, with ``wait``, once that process lets it go."""
    path = lock_file(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a process that did not say who it is"
            raise UserError(
                f"{folder}: another command is writing this stage ({holder}); wait for it to end or stop "
                "it, then run again"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(_holder() + "\n")
        handle.flush()
        yield


def _holder() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    return (
        f"PID {os.getpid()} on {socket.gethostname()}{f', SLURM job {job}' if job else ''}, since {started}"
    )
