"""Read tabular files (tsv, csv, jsonl, parquet) into rows, with errors that name the file and the row."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ftkit.errors import DataError

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
    return READERS[fmt](path)


def _read_delimited(path: Path, delimiter: str, quoting: int) -> tuple[list[str], list[dict]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: the file is empty (a header line is expected)")
        header = [h.strip() for h in header]
        rows = []
        for line_no, fields in enumerate(reader, start=2):
            if not fields:
                continue
            if len(fields) != len(header):
                raise DataError(f"{path}: line {line_no} has {len(fields)} fields, the header has {len(header)}")
            rows.append({LINE: line_no, **dict(zip(header, fields))})
    return header, rows


def _read_tsv(path):
    # GLUE's TSVs are unquoted: a quote character is text, not a delimiter.
    return _read_delimited(path, "\t", csv.QUOTE_NONE)


def _read_csv(path):
    return _read_delimited(path, ",", csv.QUOTE_MINIMAL)


def _read_jsonl(path: Path):
    rows, columns = [], []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {line_no} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {line_no} is not a JSON object")
            for key in row:
                if key not in columns:
                    columns.append(key)
            rows.append({LINE: line_no, **row})
    return columns, rows


def _read_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.read_table(path)
    rows = [{LINE: i, **row} for i, row in enumerate(table.to_pylist(), start=1)]
    return list(table.column_names), rows


READERS = {"tsv": _read_tsv, "csv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet}
