"""Commands a stage or `run` starts as children: they stop when asked and never outlive their parent.

A preemption (SIGUSR1 before a time limit, SIGTERM) reaches the parent; passed on, it lets a training
child save a checkpoint and exit for requeue. A parent killed outright (SIGKILL, the OOM killer) cannot pass
anything on, so the kernel kills the child with it: work nobody waits for would otherwise go on writing
into the run directory beside the next attempt.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
from collections.abc import Mapping, Sequence

# SLURM sends USR1 ahead of the time limit when asked (--signal=B:USR1@300); TERM comes with preemption.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_PR_SET_PDEATHSIG = 1


def run_child(command: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run ``command`` to its end and return its exit status, passing the stop signals on to it."""
    child = subprocess.Popen(list(command), env=env, preexec_fn=_die_with_parent)
    previous = {number: signal.signal(number, lambda n, _: child.send_signal(n)) for number in STOP_SIGNALS}
    try:
        return child.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _die_with_parent() -> None:
    """In the child, before it executes: the kernel sends it SIGKILL when its parent dies (Linux)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
