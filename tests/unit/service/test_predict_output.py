"""``predict``'s output files: CSV and JSONL rows, refusing to clobber, resuming after a kill."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from service.predict_output import (
    CSV_COLUMNS,
    OutputError,
    Row,
    cut_partial_line,
    done_paths,
    format_for,
    open_output,
)

ROWS = [
    Row("a.jpg", ("rose", "tulip"), (0.9, 0.0999999)),
    Row("dir/b, with comma.jpg", ("tulip",), (0.5,)),
    Row("c.jpg", error="c.jpg: not a recognised image"),
]


def test_format_from_suffix_or_flag(tmp_path: Path) -> None:
    assert format_for(Path("x.csv")) == "csv" and format_for(Path("x.JSONL")) == "jsonl"
    assert format_for(Path("x.ndjson")) == "jsonl" and format_for(Path("x.txt"), "csv") == "csv"
    with pytest.raises(OutputError, match="suffix"):
        format_for(Path("x.txt"))
    with pytest.raises(OutputError, match="unknown output format"):
        format_for(Path("x.csv"), "parquet")


def test_csv_layout(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    writer, done = open_output(out, "csv")
    writer.write(ROWS)
    writer.close()
    assert done == set()
    with out.open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows == [
        list(CSV_COLUMNS),
        ["a.jpg", "rose;tulip", "0.900000;0.100000", ""],
        ["dir/b, with comma.jpg", "tulip", "0.500000", ""],
        ["c.jpg", "", "", "c.jpg: not a recognised image"],
    ]


def test_jsonl_layout(tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl"
    writer, _ = open_output(out, "jsonl")
    writer.write(ROWS)
    writer.close()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == [
        {"path": "a.jpg", "labels": ["rose", "tulip"], "scores": [0.9, 0.1]},
        {"path": "dir/b, with comma.jpg", "labels": ["tulip"], "scores": [0.5]},
        {"path": "c.jpg", "error": "c.jpg: not a recognised image"},
    ]


def test_existing_output_needs_resume_or_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    writer, _ = open_output(out, "csv")
    writer.write(ROWS[:1])
    writer.close()
    with pytest.raises(OutputError, match="--resume"):
        open_output(out, "csv")
    writer, done = open_output(out, "csv", overwrite=True)
    writer.close()
    assert done == set() and out.read_text() == ",".join(CSV_COLUMNS) + "\n"
    with pytest.raises(OutputError, match="folder"):
        open_output(tmp_path, "csv")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_resume_cuts_a_half_written_line_and_appends(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"p.{fmt}"
    writer, _ = open_output(out, fmt)
    writer.write(ROWS)
    writer.close()
    whole = out.read_bytes()
    out.write_bytes(whole[:-7])  # killed in the middle of the last row
    writer, done = open_output(out, fmt, resume=True)
    assert done == {"a.jpg", "dir/b, with comma.jpg"}
    writer.write(ROWS[2:])
    writer.close()
    assert out.read_bytes() == whole
    assert list(done_paths(out, fmt)) == [r.path for r in ROWS]


def test_resume_of_a_missing_or_header_only_file(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    writer, done = open_output(out, "csv", resume=True)
    writer.close()
    assert done == set()
    out.write_text("path,lab")  # killed while writing the header
    writer, done = open_output(out, "csv", resume=True)
    writer.write(ROWS[:1])
    writer.close()
    assert done == set() and out.read_text().splitlines()[0] == ",".join(CSV_COLUMNS)


def test_resume_refuses_a_file_that_is_not_ours(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    out.write_text("name,value\nx,1\n")
    with pytest.raises(OutputError, match="not a predict CSV"):
        open_output(out, "csv", resume=True)
    out = tmp_path / "p.jsonl"
    out.write_text('{"path": "a"}\n[1, 2]\n')
    with pytest.raises(OutputError, match="not a predict JSONL row"):
        open_output(out, "jsonl", resume=True)


def test_cut_partial_line_reads_backwards_across_chunks(tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    path.write_bytes(b"row\n" + b"x" * 200_000)
    assert cut_partial_line(path) == 200_000
    assert path.read_bytes() == b"row\n"
    assert cut_partial_line(path) == 0
    path.write_bytes(b"no newline at all")
    cut_partial_line(path)
    assert path.read_bytes() == b""
