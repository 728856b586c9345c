"""Checkpoints that cannot run code or rot silently: tensors and plain data only on load, and a sha256 per file.

A single-file checkpoint X carries its digest in X.sha256; a sharded one (a folder) lists every file's digest in
checksums.sha256 inside it. Both are in `sha256sum` format, so `sha256sum -c` checks them too."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import torch

from ..model import ConfigError

MANIFEST = "checksums.sha256"
_CHUNK = 1 << 24


class HashingWriter:
    """A write-only file wrapper that hashes the bytes as they go out: the digest costs no second read."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _refused(path: Path, exc: Exception) -> ConfigError:
    found = re.search(r"(?:unsupported|unsupported global:) GLOBAL ([\w.]+)", str(exc), re.IGNORECASE)
    what = f" ({found.group(1)})" if found else ""
    return ConfigError(
        f"checkpoint {path} holds code or objects other than tensors and plain data{what}: refused to load it "
        "(it was not written by egmla training; load only checkpoints you trust)"
    )


def safe_torch_load(path: Path, **kwargs) -> Any:
    """torch.load with weights_only=True: a pickled object that would run code is refused in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "unsupported global" in str(exc).lower():
            raise _refused(Path(path), exc) from None
        raise


# torch.distributed.checkpoint pickles its .metadata with plain pickle: these are the only globals it holds.
_DCP_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_DTYPES = {name for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == _DCP_METADATA or (module, name) in _DCP_GLOBALS or (module == "torch" and name in _DTYPES):
            found = super().find_class(module, name)
            if module != _DCP_METADATA or (isinstance(found, type) and found.__module__ == _DCP_METADATA):
                return found  # the metadata module's own dataclasses and enums, not what it imports
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def check_sharded_metadata(folder: Path) -> None:
    """Refuse a sharded checkpoint whose .metadata (read by torch with plain pickle) holds anything but its own
    metadata classes."""
    path = folder / ".metadata"
    try:
        with open(path, "rb") as f:
            _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):
            raise _refused(path, exc) from None
        raise


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_checksum(path: Path, digest: str) -> None:
    """The digest of a single-file checkpoint, beside it (written after the file, so a file never has a stale
    one: a crash between the two leaves a checkpoint without a checksum, which loads with a warning)."""
    _write_atomic(sidecar(path), f"{digest}  {path.name}\n")


def write_manifest(folder: Path) -> None:
    """The digest of every file of a sharded checkpoint folder, in checksums.sha256 inside it."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    lines = [f"{file_digest(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    _write_atomic(folder / MANIFEST, "".join(lines))


def _expected(path: Path) -> dict[Path, str] | None:
    """{file: digest} recorded for a checkpoint (a link is followed to its target); None when none was written."""
    target = path.resolve()
    record = target / MANIFEST if target.is_dir() else sidecar(target)
    if not record.is_file():
        return None
    base = target if target.is_dir() else target.parent
    expected = {}
    for line in record.read_text().splitlines():
        digest, _, name = line.partition("  ")
        expected[base / name] = digest
    return expected


def verify_checksum(path: Path) -> bool:
    """Compare a checkpoint's bytes with its recorded sha256: a mismatch is a one-line ConfigError. False for a
    checkpoint without one (written before checksums existed): warn_unverified() once it has loaded."""
    path = Path(path)
    expected = _expected(path)
    if expected is None:
        return False
    target = path.resolve()
    if target.is_dir():
        on_disk = {p for p in target.rglob("*") if p.is_file() and p.name != MANIFEST}
        if on_disk != set(expected):
            raise _corrupt(path, "files differ from its checksums.sha256")
    for file, digest in expected.items():
        if not file.is_file() or file_digest(file) != digest:
            raise _corrupt(path, "checksum mismatch" + (f" in {file.name}" if target.is_dir() else ""))
    return True


def warn_unverified(path: Path) -> None:
    print(
        f"egmla: warning: checkpoint {path} has no checksum (written by an older egmla): loaded it unverified",
        file=sys.stderr,
    )


def _corrupt(path: Path, why: str) -> ConfigError:
    return ConfigError(
        f"checkpoint {path} is corrupt: {why}; resume from an earlier one with resume=PATH or resume=last_good"
    )
