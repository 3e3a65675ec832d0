"""Read tabular files (tsv, csv, jsonl, parquet) into rows, with errors that name the file and the line.

Lines are the file's physical lines, as an editor shows them (the header is line 1; a quoted CSV field that spans
lines moves the count on by as many). Text files are UTF-8, with or without a byte-order mark.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ftkit.errors import DataError, first_line

# Each row carries the line it came from, so errors can point at it.
LINE = "__line__"
SUFFIX_FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def detect_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: cannot tell the format from the suffix; set format: tsv|csv|jsonl|parquet")
    return fmt


def read_rows(path: Path, fmt: str = "auto") -> tuple[list[str], list[dict]]:
    """Return (columns, rows); each row records its line (the header is line 1, as an editor shows it)."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    fmt = detect_format(path, fmt)
    columns, rows = READERS[fmt](path)
    if not rows:
        where = "after the header" if fmt in ("tsv", "csv") else "in it"
        raise DataError(f"{path}: no data rows {where}; a data file needs at least one example")
    return columns, rows


def read_text(path: Path) -> str:
    """The file as UTF-8 text (a byte-order mark is dropped), or an error naming the line of the first byte that is
    not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not UTF-8 (byte 0x{data[err.start]:02x}); save the file as UTF-8 "
                        f"(e.g. iconv -f latin1 -t utf-8)") from None


def _read_delimited(path: Path, delimiter: str, quoting: int) -> tuple[list[str], list[dict]]:
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: the file is empty (a header line is expected)")
        header = [h.strip() for h in header]
        _check_unique(header, f"{path}: line 1")
        rows, line_no = [], reader.line_num + 1  # the physical line the next record starts on
        for fields in reader:
            start, line_no = line_no, reader.line_num + 1
            if not fields:
                continue
            if len(fields) != len(header):
                raise DataError(f"{path}: line {start} has {len(fields)} fields, the header has {len(header)}")
            rows.append({LINE: start, **dict(zip(header, fields))})
    except csv.Error as err:
        raise DataError(f"{path}: line {reader.line_num}: {err}") from None
    return header, rows


def _check_unique(header: list[str], where: str) -> None:
    seen = set()
    for name in header:
        if name in seen:
            raise DataError(f"{where}: column '{name}' appears twice; give every column its own name")
        seen.add(name)


def _read_tsv(path):
    # GLUE's TSVs are unquoted: a quote character is text, not a delimiter.
    return _read_delimited(path, "\t", csv.QUOTE_NONE)


def _read_csv(path):
    return _read_delimited(path, ",", csv.QUOTE_MINIMAL)


def _read_jsonl(path: Path):
    rows, columns = [], []
    for line_no, line in enumerate(read_text(path).split("\n"), start=1):  # JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=lambda pairs: _unique_keys(pairs, path, line_no))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {line_no} is not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {line_no} is not a JSON object")
        for key in row:
            if key not in columns:
                columns.append(key)
        rows.append({LINE: line_no, **row})
    return columns, rows


def _unique_keys(pairs: list, path: Path, line_no: int) -> dict:
    row = {}
    for key, value in pairs:
        if key in row:
            raise DataError(f"{path}: line {line_no}: key '{key}' appears twice in one object")
        row[key] = value
    return row


def _read_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow's errors for a file that is not parquet or is damaged
        message = first_line(err)
        raise DataError(f"{path}: not a readable parquet file ({message})") from None
    _check_unique(list(table.column_names), str(path))
    rows = [{LINE: i, **row} for i, row in enumerate(table.to_pylist(), start=1)]
    return list(table.column_names), rows


READERS = {"tsv": _read_tsv, "csv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet}
