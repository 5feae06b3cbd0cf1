"""Disk space: refuse a write that cannot finish, and say in one line when a disk fills anyway.

A full disk in the middle of a multi-gigabyte save wastes the hours before it, so the stages that write
large files (checkpoints, packaged shards, GGUF files) check the free space first. Anything else that meets
a full disk (prep's shards, a log, a write the estimate missed) reaches the CLI as ``no_space_left``'s line.
Either way nothing looks finished: stages write under ``.partial`` and seal last.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hermes_pipeline.errors import UserError

# errno for a full disk and for an exhausted quota (the usual limit on a cluster's shared storage).
_FULL = {errno.ENOSPC, errno.EDQUOT}
# Libraries that report a failed write in their own words: safetensors quotes the OS message; torch.save
# reports only that its stream failed, which counts when the disk it wrote to is indeed (almost) full.
_OS_MESSAGE = "No space left on device"
_TORCH_WRITE_FAILED = ("file write failed", "iostream error", "unexpected pos")
_ALMOST_FULL = 1 << 20


class NoSpace(UserError):
    """A disk too full for what a stage must write."""


def free_bytes(target: Path) -> int:
    """Free space on the file system that holds ``target`` (or would hold it: the nearest existing parent)."""
    probe = target
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def check_free_space(
    target: Path, needed_bytes: int, then: str = "free some space or write elsewhere", what: str = ""
) -> None:
    """Refuse to start a write of about ``needed_bytes`` (of ``what``) under ``target`` that the disk cannot
    take."""
    free = free_bytes(target)
    if free < needed_bytes:
        subject = f"{what} " if what else ""
        raise NoSpace(
            f"{target}: {subject}needs about {_size(needed_bytes)} but only {_size(free)} is free there; {then}"
        )


@contextmanager
def full_disk_in_one_line(folder: Path) -> Iterator[None]:
    """Turn a full disk met while writing ``folder`` into ``NoSpace``; any other error passes unchanged."""
    try:
        yield
    except Exception as exc:
        if (error := no_space_left(exc, folder)) is not None:
            raise error from exc
        raise


def no_space_left(exc: BaseException, where: Path | None = None) -> NoSpace | None:
    """The one-line error for an exception caused by a full disk (anywhere in its chain), else None.

    ``where`` is the folder the command was writing, used when the exception names no file."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        filename = getattr(current, "filename", None)
        full = isinstance(current, OSError) and current.errno in _FULL
        if full or _OS_MESSAGE in str(current) or _torch_write_failed(current, where):
            folder = Path(filename).parent if filename else where
            place = f"{folder}: " if folder else ""
            free = f" ({_size(free_bytes(folder))} free now)" if folder else ""
            return NoSpace(
                f"{place}the disk is full{free}; nothing was marked finished: free some space there "
                "(or point run_dir elsewhere) and run the same command again"
            )
        current = current.__cause__ or current.__context__
    return None


def _torch_write_failed(exc: BaseException, where: Path | None) -> bool:
    failed = any(words in str(exc) for words in _TORCH_WRITE_FAILED)
    return failed and where is not None and free_bytes(where) < _ALMOST_FULL


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
