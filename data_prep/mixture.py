"""Mixture decisions made per row: exact duplicates, evaluation contamination, and sampling by weight.

All three are pure functions of the row and the recipe seed, so a re-run makes the same choices and a row
keeps its fate whatever the order or the number of worker processes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")


def _digest(text: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big"
    )


def normalise(text: str) -> str:
    """Whitespace-insensitive form of a text: duplicates that differ only by spacing are still duplicates."""
    return _SPACE.sub(" ", text).strip()


def dedup_key(row: dict[str, Any]) -> int:
    """A 64-bit hash of the row's normalised conversation (and tools), for exact deduplication across sources."""
    parts = ("messages", "prompt", "chosen", "rejected", "tools", "images")
    payload = {k: row[k] for k in parts if k in row}
    normalised = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return _digest(normalise(normalised))


def seeded_hash(seed: int, *keys: object) -> int:
    """A deterministic 64-bit number for (seed, keys): the recipe seed decides, not the run."""
    return _digest("\x1f".join(map(str, (seed, *keys))))


def unit_interval(seed: int, *keys: object) -> float:
    """A deterministic number in [0, 1) for (seed, keys)."""
    return seeded_hash(seed, *keys) / 2**64


def user_texts(row: dict[str, Any]) -> list[str]:
    """The prompts a row shows the model: user turns of an SFT conversation or of a DPO prompt."""
    messages = row.get("messages") or row.get("prompt") or []
    return [m["content"] for m in messages if m.get("role") == "user"]


def _ngrams(words: list[str], n: int) -> Iterator[int]:
    for i in range(len(words) - n + 1):
        yield _digest(" ".join(words[i : i + n]))


class Decontaminator:
    """Finds training rows whose prompts match an evaluation prompt, exactly or by a shared word n-gram.

    Evaluation prompts shorter than n words can only match exactly. Hashes, not strings, are kept, so the
    index stays small and pickles cheaply into worker processes.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.exact: dict[int, str] = {}
        self.grams: dict[int, str] = {}

    def add(self, eval_set: str, prompts: Iterable[str]) -> int:
        count = 0
        for prompt in prompts:
            self.exact.setdefault(_digest(normalise(prompt).lower()), eval_set)
            for gram in _ngrams(_WORD.findall(prompt.lower()), self.n):
                self.grams.setdefault(gram, eval_set)
            count += 1
        return count

    def match(self, row: dict[str, Any]) -> str | None:
        """The reason a row is contaminated, or None."""
        for text in user_texts(row):
            if (hit := self.exact.get(_digest(normalise(text).lower()))) is not None:
                return f"contaminated: exact match with {hit}"
            for gram in _ngrams(_WORD.findall(text.lower()), self.n):
                if (hit := self.grams.get(gram)) is not None:
                    return f"contaminated: {self.n}-gram overlap with {hit}"
        return None


def eval_prompts(data: dict[str, Any]) -> list[str]:
    """User prompts of an evaluation row in any of the Hub schemas we know (eval sets, DPO, ShareGPT)."""
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list):
        return [
            m["content"]
            for m in prompt
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)
        ]
    for key in ("question", "input", "instruction"):
        if isinstance(data.get(key), str):
            return [data[key]]
    turns = data.get("conversations")
    if isinstance(turns, list):
        return [
            t["value"]
            for t in turns
            if isinstance(t, dict) and t.get("from") == "human" and isinstance(t.get("value"), str)
        ]
    return []
