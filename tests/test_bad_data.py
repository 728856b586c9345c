"""Bad rows in data=local files (missing, null or non-string text, malformed JSON, bytes that are not UTF-8, a
binary file, an empty validation file) stop egmla-train in one line naming the file, the line and the fix:
before anything is written when the check at start reads them, from inside a DataLoader worker otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import overrides
from egmla.train.main import main

GOOD = [f"document {i}: " + "the of and to in that it is was " * 4 for i in range(300)]


def _file(path: Path, bad: bytes | None, at: int = 5) -> Path:
    """GOOD as JSON lines with `bad` as line at + 1 (None: the file is empty)."""
    lines = [json.dumps({"text": t}).encode() for t in GOOD]
    path.write_bytes(b"" if bad is None else b"\n".join([*lines[:at], bad, *lines[at:]]) + b"\n")
    return path


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("egmla-train: error: "), err
    return err[0]


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        (b'{"other": "x"}', "has no 'text' field"),
        (b'{"text": null}', "'text' is null"),
        (b'{"text": 5}', "'text' is 5, not a string"),
        (b'{"text": "cut off', "is not valid JSON"),
        (b'{"text": "caf\xe9"}', "is not UTF-8 text"),
    ],
)
def test_a_bad_row_is_one_line_naming_file_and_line_before_anything_is_written(corpus, tmp_path, capsys, bad, problem):
    train = _file(tmp_path / "train.jsonl", bad)
    error = _error(capsys, overrides(corpus, tmp_path / "run", f"data.data_files.train={train}"))
    assert f"{train} line 6: {problem}" in error and "fix or delete" in error
    assert not (tmp_path / "run").exists()


def test_a_binary_or_empty_file_is_one_line(corpus, tmp_path, capsys):
    binary = tmp_path / "train.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    error = _error(capsys, overrides(corpus, tmp_path / "run", f"data.data_files.train={binary}"))
    assert f"{binary} line 1: is binary" in error

    empty = _file(tmp_path / "val.jsonl", None)
    error = _error(capsys, overrides(corpus, tmp_path / "run", f"data.data_files.validation={empty}"))
    assert f"{empty} has no documents" in error
    assert not (tmp_path / "run").exists()


def _late(tmp_path: Path, monkeypatch, bad: bytes) -> Path:
    """A training file whose bad line 41 is past what the start check reads and past the first read of rows."""
    import egmla.data.rows
    import egmla.data.stream

    monkeypatch.setattr(egmla.data.rows, "CHECK_BYTES", 1000)
    monkeypatch.setattr(egmla.data.stream, "ROWS_PER_READ", 16)
    return _file(tmp_path / "train.jsonl", bad, at=40)


def _in_workers(corpus: Path, run: Path, train: Path) -> list[str]:
    return overrides(
        corpus,
        run,
        f"data.data_files.train={train}",
        "data.num_workers=2",
        "train.max_steps=200",
        "train.val_every=200",
    )


def test_a_bad_row_past_the_start_check_stops_in_one_line_from_a_worker(corpus, tmp_path, capsys, monkeypatch):
    """The start check reads only the first bytes of a large file: a null text further on is found by the loader
    worker that reaches it, and the run stops in one line naming it; the checkpoints already written stay."""
    train = _late(tmp_path, monkeypatch, b'{"text": null}')
    run = tmp_path / "run"
    error = _error(capsys, _in_workers(corpus, run, train))
    assert f"{train} line 41: 'text' is null" in error and "fix or delete" in error
    assert sorted((run / "checkpoints").glob("step*.ckpt"))  # written before the bad row was met


@pytest.mark.parametrize(("bad", "problem"), [(b'{"text": "cut off', "is not valid JSON"), (b"\xff", "is not UTF-8")])
def test_an_unreadable_row_past_the_start_check_is_one_line_from_a_worker(
    corpus, tmp_path, capsys, monkeypatch, bad, problem
):
    train = _late(tmp_path, monkeypatch, bad)
    error = _error(capsys, _in_workers(corpus, tmp_path / "run", train))
    assert f"{train} line 41: {problem}" in error and "fix or delete" in error
