"""Rows of local json/text data files checked line by line, so that a bad one is named by its file and line.

`datasets` reads these files in large Arrow blocks: a null or non-string text becomes an empty or JSON-quoted
document without a word, and malformed JSON or bytes that are not UTF-8 fail deep inside it with no line number.
The trainer checks the first CHECK_BYTES of each split's files before anything is written; a bad row further on
is met by a loader worker, which then reads the files from the start to name the first bad line.
"""

from __future__ import annotations

import glob
import json
import os
import reprlib
from pathlib import Path

from ..model import ConfigError

CHECK_BYTES = 32 << 20  # bytes of each split's files checked at the start (all of a smaller file)
CHECKED_BUILDERS = ("json", "text")


class DataError(ConfigError):
    """A data file holds a row that cannot be trained on. One line even when raised in a DataLoader worker, which
    re-raises it in the main process with the worker's whole traceback as the message."""

    def __init__(self, message: str):
        if "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].partition("DataError: ")[2] or message
        super().__init__(message)


def file_patterns(data_files: dict | str | list | None) -> list[str]:
    """Every path or glob of a `data_files` setting (a pattern, a list of them, or a mapping of splits to those)."""
    if data_files is None:
        return []
    if isinstance(data_files, str | os.PathLike):
        return [os.fspath(data_files)]
    if isinstance(data_files, dict):
        return [p for value in data_files.values() for p in file_patterns(value)]
    return [p for value in data_files for p in file_patterns(value)]


def local_matches(pattern: str) -> list[str]:
    """The files a local path or glob (~ expanded) matches; none for a remote URL, which `datasets` resolves."""
    return [] if "://" in pattern else glob.glob(os.path.expanduser(pattern), recursive=True)


def split_files(spec) -> list[Path]:
    """The local files of spec's split, in the order `datasets` reads them (remote ones left out)."""
    files = spec.data_files
    if isinstance(files, dict):
        files = files.get(spec.split)
    return [Path(p) for pattern in file_patterns(files) for p in sorted(local_matches(pattern))]


def _problem(line: bytes, spec) -> str | None:
    """What is wrong with one line of a json (JSON lines) or text file, or None."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"is not UTF-8 text (byte {exc.start + 1})"
    if spec.builder == "text":
        return None
    try:
        row = json.loads(text)
    except ValueError as exc:
        msg, column = getattr(exc, "msg", str(exc)).removesuffix(" at"), getattr(exc, "colno", "?")
        return f"is not valid JSON ({msg} at column {column})"
    field = spec.field
    if not isinstance(row, dict):
        return "is not a JSON object"
    if field not in row:
        key = "token_field" if spec.pretokenized else "text_field"
        return f"has no {field!r} field (or set data.{key} to the field that holds it)"
    value = row[field]
    if value is None:
        return f"{field!r} is null"
    if spec.pretokenized:
        if not (isinstance(value, list) and all(isinstance(v, int) for v in value)):
            return f"{field!r} is {reprlib.repr(value)}, not a list of token ids"
    elif not isinstance(value, str):
        return f"{field!r} is {reprlib.repr(value)}, not a string"
    return None


def _check_file(path: Path, spec, budget: float) -> tuple[int, float, bool]:
    """(rows, bytes read, whole file read) of one file; DataError at its first bad line."""
    read, rows = 0, 0
    with open(path, "rb") as f:
        head = f.read(8192)
        if b"\0" in head:
            raise DataError(
                f"data file {path} line 1: is binary, not {spec.builder} lines: point data.data_files "
                "at JSON lines files (one object per line)"
            )
        if spec.builder == "json" and head.lstrip()[:1] == b"[":  # one JSON array, not JSON lines: not checked
            return 0, 0, False
        f.seek(0)
        for number, line in enumerate(f, 1):
            read += len(line)
            if line.strip():
                rows += 1
                problem = _problem(line, spec)
                if problem:
                    raise DataError(f"data file {path} line {number}: {problem}: fix or delete that line")
            if read >= budget:
                return rows, read, False
    return rows, read, True


def check_rows(spec, limit: float | None = None) -> None:
    """DataError (one line: file, line, fix) at the first bad row within `limit` bytes (CHECK_BYTES) of the split's
    files, or if they were read whole and hold no row at all."""
    if spec.builder not in CHECKED_BUILDERS:
        return
    limit = CHECK_BYTES if limit is None else limit
    files = split_files(spec)
    rows, complete = 0, True
    for path in files:
        n, read, whole = _check_file(path, spec, limit)
        rows, complete, limit = rows + n, complete and whole, limit - read
        if limit <= 0:
            return
    if files and complete and rows == 0:
        names = ", ".join(map(str, files))
        raise DataError(f"data file {names} has no documents: point data.data_files.{spec.split} at files with rows")


def bad_rows(spec, exc: Exception | None = None) -> DataError:
    """The error for bad data met while streaming: the first bad line of the split's files when they are local
    json/text files (read from the start), else what the reader said."""
    try:
        check_rows(spec, limit=float("inf"))
    except DataError as found:
        return found
    what = ", ".join(map(str, split_files(spec))) or spec.path or spec.builder
    detail = " ".join(str(exc).split())[:200] if exc else f"a null or wrongly typed {spec.field!r}"
    return DataError(f"cannot read the {spec.split} data ({what}): {detail}: fix or delete the rows at fault")
