"""How big a recipe may be, and how much of a bad value an error echoes back.

A recipe is a few kilobytes of hand-written YAML. These bounds sit far above any real one and far below
what makes parsing, validating or reporting slow, so a hostile or mangled file ends in a few short lines
within a second instead of a hang, a traceback or megabytes of output.
"""

from __future__ import annotations

import reprlib

MAX_BYTES = 256 * 1024
# Levels of mappings and lists, and values in all, counted after aliases expand: an alias costs what it
# stands for, so ten aliases of ten aliases of ... cannot grow a small file into a billion values.
MAX_DEPTH = 32
MAX_VALUES = 10_000
# Integers are what torch, Arrow and numpy take: 64-bit signed.
INT_BITS = 63
MAX_PROBLEMS = 20
SHOWN_CHARS = 80


def cut(text: str) -> str:
    """``text``, or its start and its length when longer than SHOWN_CHARS."""
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} chars)"


def shown(value: object) -> str:
    """A value as an error echoes it: its repr, so invisible characters show as escapes, cut. Only the start
    of a long string is repr'd, and only the first few items of a list or mapping (reprlib), so echoing a
    value costs no more than echoing a short one, whatever it holds."""
    if isinstance(value, str):
        return f"{value[:SHOWN_CHARS]!r}... ({len(value)} chars)" if len(value) > SHOWN_CHARS else repr(value)
    return cut(reprlib.repr(value))


def capped(lines: list[str], source: str) -> list[str]:
    """The first MAX_PROBLEMS lines and a count of the rest: the first few are what a user fixes first."""
    if len(lines) <= MAX_PROBLEMS:
        return lines
    return [*lines[:MAX_PROBLEMS], f"{source}: ... and {len(lines) - MAX_PROBLEMS} more problems"]
