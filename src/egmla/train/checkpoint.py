"""Checkpoints: atomic writes, and the checks that run before a resume so a bad one fails clearly."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..model import ConfigError, ModelConfig
from ..model.config import error_summary
from .fsdp import is_sharded_checkpoint, sharded_checkpoint_metadata
from .integrity import HashingWriter, safe_torch_load, sidecar, verify_checksum, warn_unverified, write_checksum


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, typically): one line naming it and the last good one."""

    def __init__(self, path: Path, exc: OSError):
        good = saved_checkpoints(path.parent.parent)
        then = f"resume=last ({good[-1]}, the last good checkpoint)" if good else "rerun (no checkpoint was written)"
        super().__init__(f"cannot write checkpoint {path}: {exc.strerror or exc}; free space, then {then}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file, flush it to disk, then rename: a crash never leaves a torn checkpoint. The
    sha256 of the bytes written goes beside it (X.sha256); loads take tensors and plain data only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                writer = HashingWriter(f)
                torch.save(checkpoint, writer)
                f.flush()
                os.fsync(f.fileno())
            sidecar(path).unlink(missing_ok=True)  # a stop before the new one is written: unverified, not "corrupt"
            os.replace(tmp, path)
            write_checksum(path, writer.sha.hexdigest())
        except OSError as exc:  # a full disk, a quota, an I/O error: no partial file stays behind
            tmp.unlink(missing_ok=True)
            raise CheckpointWriteError(path, exc) from None

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return safe_torch_load(Path(path))

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        sidecar(Path(path)).unlink(missing_ok=True)


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def existing_checkpoints(run_dir: Path) -> list[Path]:
    folder = checkpoint_dir(run_dir)
    return sorted(folder.glob("*.ckpt")) if folder.is_dir() else []


def saved_checkpoints(run_dir: Path) -> list[Path]:
    """The step checkpoints written, oldest first, without the last.ckpt link."""
    return [p for p in existing_checkpoints(run_dir) if p.name != "last.ckpt"]


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint a run resumes from: None for a new run (refused if run_dir has checkpoints)."""
    found = existing_checkpoints(run_dir)
    if resume in (None, "", "null"):
        if found:
            raise ConfigError(
                f"run_dir={run_dir} already has checkpoints ({', '.join(p.name for p in found)}): pass resume=last "
                "to continue it, or another run_name for a new run"
            )
        return None
    if resume == "last_good":
        return _newest_intact(saved_checkpoints(run_dir), run_dir)
    path = checkpoint_dir(run_dir) / "last.ckpt" if resume == "last" else Path(resume)
    if resume == "last" and path.is_symlink() and not path.exists():  # a stop between a write and its link
        path = next(reversed(saved_checkpoints(run_dir)), path)  # the newest checkpoint
    if not (path.is_file() or is_sharded_checkpoint(path)):
        hint = f"checkpoints there: {', '.join(p.name for p in found)}" if found else "start without resume"
        raise ConfigError(f"resume={resume}: no checkpoint at {path} ({hint})")
    return path


def _newest_intact(saved: list[Path], run_dir: Path) -> Path:
    """resume=last_good: the newest checkpoint whose checksum holds (one written without a checksum counts)."""
    for path in reversed(saved):
        try:
            verify_checksum(path)
            return path
        except ConfigError as exc:
            print(f"egmla: warning: {exc} (skipped by resume=last_good)", file=sys.stderr)
    raise ConfigError(f"resume=last_good: no intact checkpoint in {checkpoint_dir(run_dir)}: start a new run")


def check_checkpoint(path: Path, model_cfg: ModelConfig) -> dict[str, Any]:
    """Load a checkpoint's metadata and refuse one that is unreadable or was trained with another model.

    A sharded checkpoint (trainer=fsdp: a folder of shards) is checked through its metadata file."""
    sharded = path.is_dir()
    verified = verify_checksum(path)
    try:
        if sharded:
            ckpt = sharded_checkpoint_metadata(path)
            ckpt["state_dict"] = {} if is_sharded_checkpoint(path) else None  # the tensors stay in the shards
        else:
            ckpt = safe_torch_load(path, mmap=True)
    except ConfigError:
        raise
    except Exception as exc:  # a truncated or foreign file: torch raises many different errors
        raise ConfigError(
            f"checkpoint {path} is unreadable ({error_summary(exc)}): "
            "resume from another checkpoint (resume=PATH) or start a new run"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("state_dict") is None:
        raise ConfigError(f"checkpoint {path} is not an egmla training checkpoint (no state_dict)")
    if not verified:
        warn_unverified(path)
    saved = ckpt.get("egmla_model_config")
    current = asdict(model_cfg)
    if saved is not None and saved != current:
        diffs = _differences(saved, current)
        raise ConfigError(
            f"checkpoint {path} was trained with a different model ({'; '.join(diffs[:4])}): resume with the "
            "checkpoint's model and attention overrides, or start a new run"
        )
    return ckpt


def check_world_size(ckpt: dict[str, Any], path: Path, world: int) -> None:
    """Refuse a resume on another number of ranks: each rank's data position is saved apart (world 0: not known
    here, Lightning checks when it loads the position)."""
    ranks = len((ckpt.get("StreamDataModule") or {}).get("ranks") or [])
    if world and ranks and ranks != world:
        raise ConfigError(
            f"checkpoint {path} was trained on {ranks} ranks, this run has {world} (trainer.devices x "
            f"trainer.num_nodes): resume with {ranks} (the data position is kept per rank), or start a new run"
        )


def _differences(saved: dict, current: dict, prefix: str = "model.") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, "attention." if key == "attention" else f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return out
