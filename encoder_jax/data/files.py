"""Readers of local text files: UTF-8 checked lines, documents, and CSV/TSV tables.

Every error names the file and line (bad bytes, a missing column, a runaway cell).
"""

from __future__ import annotations

import csv
import gzip
import os
from typing import Iterator, Mapping

from encoder_jax import errors

MAX_CELL_CHARS = 2 ** 24  # a CSV cell longer than this is an error (csv's default: 131072)
csv.field_size_limit(max(csv.field_size_limit(), MAX_CELL_CHARS))


def checked_lines(path: str) -> Iterator[str]:
    """Yields the lines of a (gzipped) UTF-8 file; names file and line on bad bytes."""
    if not os.path.isfile(path):
        raise errors.MissingFileError(f"data file {path!r} does not exist")
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        for number, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise errors.DataError(f"data file {path!r} is not UTF-8 at line {number}: {e.reason}") from None


def read_documents(path: str, file_format: str) -> Iterator[str]:
    """Documents of a plain-text file: one per line, per blank-line block, or per <doc>."""
    if file_format == "lines":
        for line in checked_lines(path):
            if line.strip():
                yield line.strip()
        return
    block: list[str] = []
    for line in checked_lines(path):
        stripped = line.strip()
        if file_format == "wikiextractor":
            if stripped.startswith("<doc"):
                block = []
            elif stripped.startswith("</doc>"):
                if block:
                    yield "\n".join(block)
                block = []
            elif stripped:
                block.append(stripped)
            continue
        if stripped:
            block.append(stripped)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def read_table(path: str, delimiter: str, columns: Mapping[str, str | int],
               has_header: bool) -> Iterator[dict[str, str]]:
    """Rows of a CSV/TSV as {field: cell}; `columns` maps output field -> header name or index.

    A column spec "1,2" (names or indices) gives those cells joined by a space.
    """
    reader = csv.reader(checked_lines(path), delimiter=delimiter,
                        quoting=csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE)
    try:
        yield from _table_rows(reader, path, columns, has_header)
    except csv.Error as e:  # e.g. a cell past MAX_CELL_CHARS: usually a quote that never closes
        raise errors.DataError(f"data file {path!r} line {reader.line_num}: {e} (an unclosed \" quote "
                               f"reads the rest of the file as one cell)") from None


def _table_rows(reader, path: str, columns: Mapping[str, str | int],
                has_header: bool) -> Iterator[dict[str, str]]:
    header = next(reader, None) if has_header else None
    if has_header and header is None:
        return
    index: dict[str, list[int]] = {}
    for field, spec in columns.items():
        index[field] = []
        for column in (spec.split(",") if isinstance(spec, str) and "," in spec else [spec]):
            column = column.strip() if isinstance(column, str) else column
            if isinstance(column, int) or (isinstance(column, str) and column.isdigit()):
                index[field].append(int(column))
            elif header is not None and column in header:
                index[field].append(header.index(column))
            else:
                raise errors.DataError(
                    f"data file {path!r} has no column {column!r} (for field {field!r}); "
                    f"columns: {header if header else 'no header, use an integer index'}")
    width = max(max(cols) for cols in index.values()) + 1
    for line_number, row in enumerate(reader, 2 if has_header else 1):
        if not row:
            continue
        if len(row) < width:
            raise errors.DataError(f"data file {path!r} row {line_number} has {len(row)} columns, "
                                   f"needs {width}")
        yield {field: " ".join(row[i] for i in cols) for field, cols in index.items()}
