"""Read the rows of a source data set, one Record at a time, without letting a bad row stop the run.

A source is a local file (.json as one array or as JSON lines, .jsonl, .parquet), a local folder (saved with
`datasets`' save_to_disk, or holding such files), or a Hub data set id read in streaming mode. Every row
comes back numbered, including the ones that could not be decoded, so that a run can account for them:
rows in = rows read + read errors, and nothing disappears silently.

Memory stays bounded by the largest row plus a read buffer whatever the size of the source: OpenHermes-2.5
is a single ~1.9 GB JSON array, so loading it whole is not an option.
"""

from __future__ import annotations

import codecs
import itertools
import json
import re
import sys
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from hermes_pipeline.errors import UserError
from hermes_pipeline.recipe.schema import HUB_ID

# Bytes read from a JSON array at a time. Reading 1 MiB is no faster, and one emoji makes the decoded
# window 4 bytes a character: 256 KiB keeps the reader near 2 MB where 1 MiB takes near 10 MB.
CHUNK_SIZE = 1 << 18
BATCH_ROWS = 1024  # rows per Arrow batch: a few MB for chat rows
TRUNCATED = "truncated JSON at end of file"
NOT_AN_OBJECT = "not a JSON object"
INVALID_UTF8 = "invalid UTF-8"

_ACCEPTED = (
    "a .json file (one array or JSON lines), a .jsonl or .parquet file, a folder of such files, "
    "a folder written by datasets' save_to_disk, or a Hub data set id (owner/name)"
)
_WHITESPACE = re.compile(r"[ \t\n\r]*")
# Decoding with errors="surrogateescape" turns each invalid byte into one of these lone surrogates;
# valid UTF-8 can never produce them, and a JSON escape such as "\udc80" stays six ASCII characters.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
# A decode error this close to the end of the buffer may only mean the value continues in the next chunk.
_INCOMPLETE_MARGIN = 32
# A number decoded from "12" may be the start of "12.5e3": it is complete only once other text follows.
_NUMBER_CHARS = re.compile(r"[0-9.eE+-]*")
# What the bracket count of `_JsonText.extent` looks at: a bracket or the start of a string; inside a string,
# an escape (skipped whole, so an escaped quote does not end it) or its end.
_BRACKET_OR_QUOTE = re.compile(r'[\[\]{}"]')
_ESCAPE_OR_QUOTE = re.compile(r'\\.|"', re.DOTALL)
_DECODER = json.JSONDecoder()

Row = tuple[dict[str, Any] | None, str | None]


@dataclass(frozen=True)
class Record:
    """One row of a source: its data, or why it could not be decoded."""

    index: int  # 0-based position in the source, stable from run to run; bad rows are counted too
    data: dict[str, Any] | None  # the raw row; None when it could not be decoded
    error: str | None  # short reason when data is None


def iter_records(path: str, *, config_name: str | None = None, split: str = "train") -> Iterator[Record]:
    """Records of a local file or folder, or of a Hub data set (`config_name` and `split` pick its part).

    The source is resolved before the first row is read, so a wrong path fails at once with a UserError.
    `split` also picks the split of a folder saved from a DatasetDict; `config_name` only applies to the Hub.
    """
    return _numbered(_source_rows(path, config_name, split))


def iter_json_array(path: str | Path, *, chunk_size: int = CHUNK_SIZE) -> Iterator[Record]:
    """Records of a file holding one JSON array, streamed `chunk_size` bytes at a time."""
    return _numbered(_json_array_rows(Path(path), chunk_size))


def _numbered(rows: Iterable[Row]) -> Iterator[Record]:
    for index, (data, error) in enumerate(rows):
        yield Record(index, data, error)


def _source_rows(path: str, config_name: str | None, split: str) -> Iterator[Row]:
    local = Path(path)
    if local.is_dir():
        return _folder_rows(local, split)
    if local.is_file():
        return _file_rows(local)
    if HUB_ID.fullmatch(path) and local.suffix.lower() not in _FILE_READERS:
        return _hub_rows(path, config_name, split)
    raise UserError(f"{path}: no such file or folder, and not a Hub data set id; expected {_ACCEPTED}")


def _file_rows(path: Path) -> Iterator[Row]:
    reader = _FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; expected {_ACCEPTED}")
    return reader(path)


def _object_row(value: Any) -> Row:
    return (value, None) if isinstance(value, dict) else (None, NOT_AN_OBJECT)


def _reason(error: ValueError | RecursionError) -> str:
    detail = error.msg if isinstance(error, json.JSONDecodeError) else _decoder_refusal(error)
    return f"invalid JSON: {detail}"


# --- JSON text ---------------------------------------------------------------------------------------


def _json_rows(path: Path) -> Iterator[Row]:
    """A .json file is an array when its first non-whitespace character is "[", JSON lines otherwise."""
    if _starts_with_bracket(path):
        return _json_array_rows(path, CHUNK_SIZE)
    return _json_lines_rows(path)


def _starts_with_bracket(path: Path) -> bool:
    with path.open("rb") as stream:
        head = stream.read(len(codecs.BOM_UTF8)).removeprefix(codecs.BOM_UTF8)
        while not (head := head.lstrip()):
            head = stream.read(4096)
            if not head:
                return False
    return head.startswith(b"[")


def _json_lines_rows(path: Path) -> Iterator[Row]:
    """One object per line; blank lines are not rows. A broken last line without its newline is truncated."""
    with path.open("rb") as stream:
        for number, line in enumerate(stream):
            if number == 0:
                line = line.removeprefix(codecs.BOM_UTF8)
            if line.strip():
                yield _json_line_row(line)


def _json_line_row(line: bytes) -> Row:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, INVALID_UTF8
    try:
        return _object_row(json.loads(text))
    except (ValueError, RecursionError) as error:
        return None, _reason(error) if line.endswith(b"\n") else TRUNCATED


class _Undecodable(Exception):
    """The text at the mark is not a JSON value, for certain: more input would not help."""

    def __init__(self, reason: str, at: int, whole: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.at = at  # where decoding failed, relative to the mark
        # The decoder refused the value as a whole (too deep, a number too long): ``at`` is then where the
        # value ends (0 when it never closes), since the decoder does not say where inside it failed.
        self.whole = whole

    def value_end(self, text: _JsonText) -> int | None:
        """Where a wholly refused value ends when an element bound("," or "]") follows it, else None."""
        if self.whole and self.at and text.peek(self.at)[0] in (",", "]", ""):
            return self.at
        return None


class _JsonText:
    """The decoded text of a binary file seen through a window that is refilled in chunks.

    The mark is the first character not consumed yet; positions given and returned are relative to it, so
    they survive a refill, which drops the text before the mark. The window therefore holds the unconsumed
    value plus about one chunk.

    A chunk holding invalid UTF-8 is decoded with errors="surrogateescape" so that an invalid byte spoils
    only the row it is in (see `has_escaped_bytes`) instead of the whole decode.
    """

    def __init__(self, stream: BinaryIO, chunk_size: int):
        self._stream = stream
        self._chunk_size = chunk_size
        self._undecoded = stream.read(len(codecs.BOM_UTF8)).removeprefix(codecs.BOM_UTF8)
        self._escapes: list[int] = []  # where invalid bytes are, in characters from the start of the file
        self._text = ""
        self._mark = 0  # index of the mark in _text
        self.offset = 0  # characters from the start of the file to the mark
        self.last_char = ""  # the last non-whitespace character read so far
        self.eof = False

    def advance(self, count: int) -> None:
        self._mark += count
        self.offset += count

    def peek(self, at: int = 0) -> tuple[str, int]:
        """The first non-whitespace character at or after `at`, and its position; "" at end of file."""
        while True:
            index = _WHITESPACE.match(self._text, self._mark + at).end()
            if index < len(self._text):
                return self._text[index], index - self._mark
            at = index - self._mark
            if not self._refill():
                return "", at

    def find(self, char: str, at: int) -> int | None:
        """Position of the next `char` at or after `at`, or None at end of file; moves the mark past text
        searched in vain, so that skipping a long broken region does not hold it in memory."""
        while (index := self._text.find(char, self._mark + at)) < 0:
            self.advance(len(self._text) - self._mark)
            at = 0
            if not self._refill():
                return None
        return index - self._mark

    def decode(self) -> tuple[Any, int]:
        """The JSON value at the mark and its length, reading more text until it is complete.

        A value may continue in the next chunk when its decode failed near the end of the window or inside
        a string still open, or when only number characters follow it: read more and decode it again,
        reading twice as much each time so that a huge row costs a linear amount of work.
        """
        while True:
            try:
                value, end = _DECODER.raw_decode(self._text, self._mark)
            except json.JSONDecodeError as error:
                if self.eof or not self._may_continue(error):
                    raise _Undecodable(error.msg, error.pos - self._mark) from None
            except (ValueError, RecursionError) as error:  # e.g. an integer too long, nesting too deep
                # The decoder does not say where: the whole value failed, so resynchronising starts after it.
                raise _Undecodable(_decoder_refusal(error), self.extent(), whole=True) from None
            else:
                if self.eof or _NUMBER_CHARS.match(self._text, end).end() < len(self._text):
                    return value, end - self._mark
            self._refill(at_least=len(self._text) - self._mark)

    def extent(self) -> int:
        """The length of the bracketed value at the mark, found by counting brackets outside strings: no
        recursion, so any depth. 0 when the value is not bracketed or the file ends before it closes."""
        if self.peek()[0] not in ("[", "{"):
            return 0
        depth, at = 0, 0
        while True:
            found = _BRACKET_OR_QUOTE.search(self._text, self._mark + at)
            if found is None:
                if not self._refill(at_least=len(self._text) - self._mark):
                    return 0
                continue
            at = found.end() - self._mark
            if found.group() == '"':
                if (string_end := self._string_end(at)) is None:
                    return 0
                at = string_end
            elif found.group() in "[{":
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    return at

    def _string_end(self, at: int) -> int | None:
        """The position just after the closing quote of a string whose text starts at `at`; None at end
        of file. An escape is matched whole, so an escaped quote does not end the string."""
        while True:
            found = _ESCAPE_OR_QUOTE.search(self._text, self._mark + at)
            if found is None:
                if not self._refill(at_least=len(self._text) - self._mark):
                    return None
                continue
            at = found.end() - self._mark
            if found.group() == '"':
                return at

    def has_escaped_bytes(self, length: int) -> bool:
        """Whether the `length` characters from the mark came from invalid UTF-8."""
        return any(self.offset <= at < self.offset + length for at in self._escapes)

    def _may_continue(self, error: json.JSONDecodeError) -> bool:
        if error.msg.startswith("Unterminated string"):  # reported at the opening quote, far from the end
            return True
        return error.pos >= len(self._text) - _INCOMPLETE_MARGIN

    def _refill(self, at_least: int = 0) -> bool:
        if self.eof:
            return False
        chunk = self._stream.read(max(self._chunk_size, at_least))
        self.eof = not chunk
        rest, self._text = self._text[self._mark :], ""  # let the old window go before the new one is built
        self._escapes = [at for at in self._escapes if at >= self.offset]
        text = self._decode(chunk, start=self.offset + len(rest))
        self.last_char = text.rstrip(" \t\n\r")[-1:] or self.last_char
        self._text = rest + text
        self._mark = 0
        return True

    def _decode(self, chunk: bytes, start: int) -> str:
        """Decode strictly first: valid text is the common case, and a strict decode tells for free whether
        any byte is invalid, where searching each row for escaped bytes took a fifth of the read time.
        A sequence cut at the end of the chunk waits for the next one."""
        data = self._undecoded + chunk
        try:
            text, used = codecs.utf_8_decode(data, "strict", self.eof)
        except UnicodeDecodeError:
            text, used = codecs.utf_8_decode(data, "surrogateescape", self.eof)
            self._escapes += [start + found.start() for found in _ESCAPED_BYTE.finditer(text)]
        self._undecoded = data[used:]
        return text


def _decoder_refusal(error: ValueError | RecursionError) -> str:
    """Why the decoder refused a value, in terms of the row rather than of Python's internals."""
    if isinstance(error, RecursionError):
        return f"nested more than about {sys.getrecursionlimit()} levels deep"
    return str(error).split(";")[0]  # Python's digit limit goes on to name an interpreter setting


def _json_array_rows(path: Path, chunk_size: int) -> Iterator[Row]:
    """The elements of one JSON array, streamed, with recovery from broken regions.

    Not ijson: it stops for good at the first syntax error or invalid UTF-8 byte, so a single bad row
    would end the run (or force a restart at an offset it cannot give), and it has no way to mark one row
    as invalid UTF-8 and go on. json.JSONDecoder.raw_decode over a refilled text window gives per-row
    control at C speed.
    """
    with path.open("rb") as stream:
        text = _JsonText(stream, chunk_size)
        char, at = text.peek()
        if char != "[":
            raise UserError(f"{path}: not a JSON array (it starts with {char or 'nothing'!r})")
        text.advance(at + 1)
        yield from _array_elements(text)


def _array_elements(text: _JsonText) -> Iterator[Row]:
    """Each element is a value followed by "," or "]"; a trailing comma is tolerated."""
    while True:
        char, at = text.peek()
        if char == "]":
            text.advance(at + 1)
            if text.peek()[0]:
                yield None, "invalid JSON: data after the closing ']'"
            return
        if char == "":
            yield None, TRUNCATED
            return
        text.advance(at)
        try:
            value, length = text.decode()
            row = (None, INVALID_UTF8) if text.has_escaped_bytes(length) else _object_row(value)
        except _Undecodable as failure:
            if (end := failure.value_end(text)) is None:
                found_next = yield from _skip_broken_region(text, failure)
                if not found_next:
                    return
                continue
            row, length = (None, f"invalid JSON: {failure.reason}"), end  # one row, and the next is intact
        yield row
        char, at = text.peek(length)
        text.advance(at)
        if char == ",":
            text.advance(1)
        elif char not in ("]", ""):
            found_next = yield from _skip_broken_region(
                text, _Undecodable("expected ',' or ']' after an element", 0)
            )
            if not found_next:
                return


def _skip_broken_region(text: _JsonText, failure: _Undecodable) -> Generator[Row, None, bool]:
    """Move the mark to the next element that decodes, yielding one error Row for the text skipped;
    False when the rest of the file was skipped.

    A candidate is a "{" that decodes to an object reaching past the point where decoding failed, and that
    is followed by "," or "]". The reach test is what keeps us from stopping on a nested object of the
    broken row: the broken row read fine up to the failure, so anything it contains ends before it.
    """
    start = text.offset
    failed_at = start + failure.at
    search_from = 0
    while (found := text.find("{", search_from)) is not None:
        text.advance(found)
        search_from = 1
        try:
            value, length = text.decode()
        except _Undecodable as refused:
            # A row the decoder refuses whole is still a row: stop on it, and the caller rejects it alone.
            if (end := refused.value_end(text)) is None or text.offset + end <= failed_at:
                continue
            value, length = {}, end
        reaches_past = text.offset + length > failed_at
        if isinstance(value, dict) and reaches_past and text.peek(length)[0] in (",", "]", ""):
            if text.offset > start:
                yield None, f"invalid JSON: {failure.reason}"
            return True
    yield None, f"invalid JSON: {failure.reason}" if text.last_char == "]" else TRUNCATED
    return False


# --- Arrow -------------------------------------------------------------------------------------------


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow as pa  # imported here: the optional "data" extra, and only Arrow sources need it
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{path}: not a readable Parquet file ({error})") from None
    with parquet:
        yield from _batch_rows(parquet.iter_batches(batch_size=BATCH_ROWS))


def _batch_rows(batches: Iterable[Any]) -> Iterator[Row]:
    """Rows of Arrow record batches or tables, one batch in memory at a time."""
    for batch in batches:
        for row in batch.to_pylist():
            yield row, None


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _saved_dataset_rows(folder: Path, split: str) -> Iterator[Row]:
    """A folder from save_to_disk: a DatasetDict gives the `split` asked for, a lone Dataset all its rows."""
    import datasets  # imported here: the optional "data" extra, and slow to import

    dataset = datasets.load_from_disk(str(folder))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise UserError(f"{folder}: no split {split!r}; the saved data set has {', '.join(dataset)}")
        dataset = dataset[split]
    return _batch_rows(dataset.with_format("arrow").iter(batch_size=BATCH_ROWS))


def _folder_rows(folder: Path, split: str) -> Iterator[Row]:
    """A saved data set, or the data files directly in the folder in name order, numbered as one source.

    Other files (a README, .gitattributes) are ignored, so a downloaded Hub snapshot folder reads as is.
    """
    if _is_saved_dataset(folder):
        return _saved_dataset_rows(folder, split)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _FILE_READERS)
    if not files:
        raise UserError(f"{folder}: folder holds no .json, .jsonl or .parquet file; expected {_ACCEPTED}")
    return itertools.chain.from_iterable(_file_rows(file) for file in files)


# --- Hub ---------------------------------------------------------------------------------------------


def _hub_rows(repo_id: str, config_name: str | None, split: str) -> Iterator[Row]:
    """Stream the split instead of downloading it: the first rows arrive at once and the disk stays free."""
    import datasets  # imported here: the optional "data" extra, and slow to import

    try:
        dataset = datasets.load_dataset(repo_id, name=config_name, split=split, streaming=True)
    except (OSError, ValueError) as error:  # not found, offline, no such config or split
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{repo_id}: cannot stream this Hub data set ({detail})") from None
    return (_object_row(row) for row in dataset)


_FILE_READERS = {".json": _json_rows, ".jsonl": _json_lines_rows, ".parquet": _parquet_rows}
