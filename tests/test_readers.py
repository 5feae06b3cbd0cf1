"""Source readers: every shape reads back its rows, big arrays stream, and bad rows become error Records."""

import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from hermes_pipeline.errors import UserError
from hermes_pipeline.readers import (
    INVALID_UTF8,
    NOT_AN_OBJECT,
    TRUNCATED,
    Record,
    iter_json_array,
    iter_records,
)

CHUNK_SIZES = [7, 64, 4096]
# Escapes, multi-byte characters (2, 3 and 4 bytes) and brackets inside strings: what a chunk boundary
# must not split wrongly. Written with ensure_ascii=True the same text becomes \uXXXX escapes and pairs.
TRICKY_TEXT = 'say "hi" \\ back\\slash\nnew line\ttab é 中文 🙂 \u2028 {"not": "a row"} [1, 2]'


def openhermes_row(i: int, *, size: int = 300) -> dict[str, Any]:
    """A row in the teknium/OpenHermes-2.5 shape; `size` is about the length of the answer."""
    return {
        "conversations": [
            {"from": "system", "value": "You are a helpful assistant.", "weight": None},
            {"from": "human", "value": f"Question {i}: {TRICKY_TEXT}", "weight": None},
            {"from": "gpt", "value": (f"Answer {i}. " * size)[:size], "weight": 1.0},
        ],
        "source": "airoboros2.2",
        "category": "orca" if i % 2 else None,
        "skip_prompt_formatting": False,
        "views": i * 3,
        "idx": None,
        "hash": [i, -i],
    }


def write_array(path: Path, rows: list[Any], *, indent: int | None = 2) -> Path:
    path.write_text(json.dumps(rows, indent=indent, ensure_ascii=False), encoding="utf-8")
    return path


def write_lines(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def records(path: str | Path, **kwargs: Any) -> list[tuple[int, Any, str | None]]:
    return [(r.index, r.data, r.error) for r in iter_records(str(path), **kwargs)]


def array_records(data: bytes, tmp_path: Path, chunk_size: int) -> list[tuple[int, Any, str | None]]:
    path = tmp_path / "rows.json"
    path.write_bytes(data)
    return [(r.index, r.data, r.error) for r in iter_json_array(path, chunk_size=chunk_size)]


def good(rows: list[dict[str, Any]]) -> list[tuple[int, Any, None]]:
    return [(i, row, None) for i, row in enumerate(rows)]


ROWS = [openhermes_row(i) for i in range(5)]


# --- shapes ------------------------------------------------------------------------------------------


def test_json_array(tmp_path: Path) -> None:
    path = write_array(tmp_path / "openhermes.json", ROWS)
    assert records(path) == good(ROWS)
    assert next(iter_records(str(path))) == Record(0, ROWS[0], None)


def test_json_array_on_one_line_with_bom(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_bytes(b"\xef\xbb\xbf \n" + json.dumps(ROWS).encode())
    assert records(path) == good(ROWS)


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json"])
def test_json_lines_skip_blank_lines(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("\n" + json.dumps(ROWS[0]) + "\n\n  \n" + json.dumps(ROWS[1]) + "\r\n", encoding="utf-8")
    assert records(path) == good(ROWS[:2])


def test_parquet_reads_every_batch(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    rows = [{"id": str(i), "question": f"q{i}", "chosen": "yes", "rejected": None} for i in range(2500)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "orca.parquet", row_group_size=700)
    assert records(tmp_path / "orca.parquet") == good(rows)


def test_saved_dataset_dict_picks_the_split(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    train, test = ROWS[:3], ROWS[3:]
    splits = {"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))

    assert records(tmp_path / "saved") == good(train)
    assert records(tmp_path / "saved", split="test") == good(test)
    with pytest.raises(UserError, match=r"no split 'validation'.*train, test"):
        iter_records(str(tmp_path / "saved"), split="validation")


def test_saved_single_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert records(tmp_path / "saved") == good(ROWS)


def test_folder_of_files_in_name_order_with_continuing_indexes(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    write_lines(tmp_path / "b.jsonl", ROWS[2:3])
    write_array(tmp_path / "a.json", ROWS[:2])
    pq.write_table(pa.Table.from_pylist([{"x": 1}, {"x": 2}]), tmp_path / "c.parquet")
    (tmp_path / "README.md").write_text("# not data\n")
    assert records(tmp_path) == good([*ROWS[:3], {"x": 1}, {"x": 2}])


def test_hub_id_streams_through_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls: list[tuple[str, dict[str, Any]]] = []

    def fake_load_dataset(path: str, **kwargs: Any) -> list[Any]:
        calls.append((path, kwargs))
        return [{"id": "a"}, "not a row", {"id": "b"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    got = records("NousResearch/hermes-function-calling-v1", config_name="func_calling", split="train")
    assert calls == [
        (
            "NousResearch/hermes-function-calling-v1",
            {"name": "func_calling", "split": "train", "streaming": True},
        )
    ]
    assert got == [(0, {"id": "a"}, None), (1, None, NOT_AN_OBJECT), (2, {"id": "b"}, None)]


def test_hub_failure_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def unreachable(path: str, **kwargs: Any) -> None:
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(UserError, match=r"^owner/name: cannot stream .*OfflineModeIsEnabled\)\)$"):
        iter_records("owner/name")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing.json", r"missing\.json: no such file or folder, and not a Hub data set id"),
        ("missing/rows.jsonl", r"missing/rows\.jsonl: no such file or folder"),
        ("rows.csv", r"rows\.csv: unsupported file type '\.csv'; expected a \.json file"),
        ("empty_folder", r"empty_folder: folder holds no \.json, \.jsonl or \.parquet file"),
    ],
)
def test_bad_paths_are_user_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.csv").write_text("a,b\n")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(UserError, match=message):
        iter_records(name)  # raised before any row is asked for


# --- streaming ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_array(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    rows = [openhermes_row(i, size=i % 97) for i in range(20_000)]
    path = tmp_path_factory.mktemp("big") / "big.json"
    # Every other row as \uXXXX escapes (surrogate pairs for the emoji), the others as raw UTF-8.
    path.write_text(
        "[" + ",".join(json.dumps(row, ensure_ascii=i % 2 == 1) for i, row in enumerate(rows)) + "]",
        encoding="utf-8",
    )
    return path, rows


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_chunk_boundaries_anywhere_in_a_large_array(
    big_array: tuple[Path, list[dict[str, Any]]], chunk_size: int
) -> None:
    path, rows = big_array
    got = list(iter_json_array(path, chunk_size=chunk_size))
    assert len(got) == len(rows)
    assert all(record == Record(i, row, None) for i, (record, row) in enumerate(zip(got, rows, strict=True)))


def test_reading_a_50_mb_array_keeps_memory_small(tmp_path: Path) -> None:
    row = openhermes_row(0, size=2000)
    path = tmp_path / "big.json"
    with path.open("w", encoding="utf-8") as out:
        out.write("[\n" + ",\n".join([json.dumps(row, ensure_ascii=False)] * 22_000) + "\n]")
    assert path.stat().st_size > 50_000_000

    tracemalloc.start()
    try:
        count = sum(1 for record in iter_records(str(path)) if record.error is None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 22_000
    assert peak < 10_000_000


# --- broken rows -------------------------------------------------------------------------------------


def row_bytes(row: dict[str, Any]) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode()


def array_of(*parts: bytes) -> bytes:
    return b"[" + b",\n".join(parts) + b"]"


A, B, C = (row_bytes(openhermes_row(i)) for i in range(3))
ROW_A, ROW_C = openhermes_row(0), openhermes_row(2)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_invalid_utf8_spoils_only_its_row(tmp_path: Path, chunk_size: int) -> None:
    broken = B.replace("é".encode(), b"\xc3\x28\xff", 1)  # a cut sequence, then a byte never valid
    got = array_records(array_of(A, broken, C), tmp_path, chunk_size)
    assert got == [(0, ROW_A, None), (1, None, INVALID_UTF8), (2, ROW_C, None)]


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_truncated_row_in_the_middle_is_one_error_and_no_nested_object_leaks(
    tmp_path: Path, chunk_size: int
) -> None:
    # Cut inside the gpt turn: the system and human turns before the cut are complete objects.
    cut = B[: B.index(b'"Answer') + 10]
    got = array_records(array_of(A, cut + C, A), tmp_path, chunk_size)
    assert got == [
        (0, ROW_A, None),
        (1, None, "invalid JSON: Expecting ',' delimiter"),
        (2, ROW_C, None),
        (3, ROW_A, None),
    ]


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_cut_right_after_a_nested_object(tmp_path: Path, chunk_size: int) -> None:
    cut = B[: B.index(b"}") + 1]  # ends with the complete system turn
    got = array_records(array_of(A, cut + C), tmp_path, chunk_size)
    assert got == [(0, ROW_A, None), (1, None, "invalid JSON: Expecting ',' delimiter"), (2, ROW_C, None)]


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_garbage_between_elements(tmp_path: Path, chunk_size: int) -> None:
    got = array_records(b"[" + A + b" oops }} ]], " + C + b"]", tmp_path, chunk_size)
    assert got == [
        (0, ROW_A, None),
        (1, None, "invalid JSON: expected ',' or ']' after an element"),
        (2, ROW_C, None),
    ]


def test_a_missing_comma_loses_nothing(tmp_path: Path) -> None:
    assert array_records(b"[" + A + b"\n" + C + b"]", tmp_path, 64) == [(0, ROW_A, None), (1, ROW_C, None)]


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize(
    "ending",
    [b"", b",", b',\n{"conversations": [{"from": "human", "val', b",\n{", b",\n  tru"],
    ids=["no-bracket", "comma", "mid-row", "brace", "literal"],
)
def test_truncated_end_gives_one_final_error(tmp_path: Path, chunk_size: int, ending: bytes) -> None:
    got = array_records(b"[" + A + b",\n" + C + ending, tmp_path, chunk_size)
    assert got == [(0, ROW_A, None), (1, ROW_C, None), (2, None, TRUNCATED)]


def test_data_after_the_array_is_reported(tmp_path: Path) -> None:
    got = array_records(array_of(A) + b"\n[" + C + b"]", tmp_path, 64)
    assert got == [(0, ROW_A, None), (1, None, "invalid JSON: data after the closing ']'")]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 64])
def test_non_objects_in_an_array(tmp_path: Path, chunk_size: int) -> None:
    got = array_records(b'[12, {"a": -12.5e+3}, [1, {"b": 2}], "text", null, 3.25]', tmp_path, chunk_size)
    assert got == [(0, None, NOT_AN_OBJECT), (1, {"a": -12500.0}, None)] + [
        (i, None, NOT_AN_OBJECT) for i in range(2, 6)
    ]


def test_garbage_before_the_closing_bracket_is_not_a_truncation(tmp_path: Path) -> None:
    got = array_records(b"[" + A + b", oops ]", tmp_path, 64)
    assert got == [(0, ROW_A, None), (1, None, "invalid JSON: Expecting value")]


def test_json_array_reader_refuses_other_json(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "rows.json", ROWS[:1])
    with pytest.raises(UserError, match=r"rows\.json: not a JSON array \(it starts with '\{'\)"):
        list(iter_json_array(path))


def test_bad_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    lines = [A, b"[1, 2]", b'{"a": 1,}', A.replace("中".encode(), b"\xe4\xb8"), b"7", C, b'{"cut": "he']
    path.write_bytes(b"\n".join(lines))
    assert records(path) == [
        (0, ROW_A, None),
        (1, None, NOT_AN_OBJECT),
        (2, None, "invalid JSON: Expecting property name enclosed in double quotes"),
        (3, None, INVALID_UTF8),
        (4, None, NOT_AN_OBJECT),
        (5, ROW_C, None),
        (6, None, TRUNCATED),
    ]


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize(
    "spoiler",
    [
        # deeper than the decoder recurses, with complete objects inside that a resync could stop on
        b'{"x": ' + b'[{"y": 1}, ' * 3000 + b"0" + b"]" * 3000 + b"}",
        # an integer past Python's 4,300-digit limit inside a row with nested objects
        b'{"conversations": [{"from": "human", "value": "hi"}, {"n": ' + b"9" * 5000 + b"}]}",
        # brackets and escaped quotes inside strings do not count as nesting
        b'{"s": "]} \\" {[", "x": ' + b"[" * 3000 + b'"]]\\"}"' + b"]" * 3000 + b"}",
    ],
    ids=["too-deep", "integer-too-long", "brackets-in-strings"],
)
def test_a_row_the_decoder_refuses_is_one_reject_and_the_rows_after_it_are_read(
    tmp_path: Path, chunk_size: int, spoiler: bytes
) -> None:
    got = array_records(array_of(A, spoiler, C, A), tmp_path, chunk_size)
    assert [(index, data) for index, data, _ in got] == [(0, ROW_A), (1, None), (2, ROW_C), (3, ROW_A)]
    assert got[1][2].startswith("invalid JSON: ")


def test_refusals_name_the_row_problem_not_python_internals(tmp_path: Path) -> None:
    deep = b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    long_number = b'{"n": ' + b"9" * 5000 + b"}"
    for data in (array_of(deep, long_number, A), b"\n".join((deep, long_number, A)) + b"\n"):
        path = tmp_path / ("rows.json" if data.startswith(b"[") else "rows.jsonl")
        path.write_bytes(data)
        got = records(path)
        assert got[0][2].startswith("invalid JSON: nested more than about ")
        assert got[1][2] == (
            "invalid JSON: Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits"
        )
        assert got[2] == (2, ROW_A, None)
