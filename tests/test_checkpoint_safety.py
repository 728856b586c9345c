"""Checkpoints cannot run code when loaded, and damage inside their tensor data is caught: every loader (the
resume check, Lightning's resume, egmla-eval's loader, the sharded-folder loader) refuses a crafted pickle in one
line without running it, and a flipped byte against the sha256 written with the checkpoint."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import overrides, run_training
from egmla import ConfigError, compose
from egmla.config import model_config
from egmla.eval.load import load_run
from egmla.train.checkpoint import AtomicCheckpointIO, check_checkpoint, resolve_resume
from egmla.train.fsdp import load_sharded_weights, sharded_checkpoint_metadata
from egmla.train.integrity import verify_checksum, write_manifest
from egmla.train.main import main


class Payload:
    """What an attacker pickles: unpickling it would run a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus) -> Path:
    """A finished 4-step tiny run: checkpoints at steps 2 and 4, last.ckpt linking to step 4."""
    root = tmp_path_factory.mktemp("ckpt_safety")
    run_training(overrides(corpus, root / "run", "train.max_steps=4"))
    return root / "run"


@pytest.fixture
def copy(run, tmp_path) -> Path:
    """A copy of the run that a test may damage (links kept as links)."""
    shutil.copytree(run, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def _args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return overrides(corpus, run_dir, "train.max_steps=4", *extra)


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("egmla-train: error: "), err
    return err[0]


# --- code inside a checkpoint ----------------------------------------------------------------------------


def _crafted(run_dir: Path, marker: Path) -> Path:
    """A checkpoint that looks like ours (real weights, model config) with a payload beside them."""
    real = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    path = run_dir / "checkpoints" / "crafted.ckpt"
    torch.save({**real, "hyper_parameters": Payload(marker)}, path)
    return path


def _refused(message: str, path: Path) -> None:
    assert str(path) in message and "holds code or objects other than tensors" in message
    assert "posix.system" in message and "\n" not in message


def test_a_crafted_checkpoint_is_refused_by_every_loader_without_running(corpus, copy, tmp_path, capsys):
    marker = tmp_path / "ran"
    Payload(marker).__reduce__()  # the payload works when unpickled unsafely (checked last, below)
    crafted = _crafted(copy, marker)
    mcfg = model_config(compose(_args(corpus, copy)))

    with pytest.raises(ConfigError) as check:
        check_checkpoint(crafted, mcfg)  # the resume check
    _refused(str(check.value), crafted)
    _refused(_one_line_error(capsys, _args(corpus, copy, f"resume={crafted}")), crafted)
    with pytest.raises(ConfigError) as resume:
        AtomicCheckpointIO().load_checkpoint(crafted)  # what Lightning's trainer.fit(ckpt_path=...) calls
    _refused(str(resume.value), crafted)
    with pytest.raises(ConfigError) as evaluation:
        load_run(copy, checkpoint=crafted)  # egmla-eval and lm_eval --model egmla
    _refused(str(evaluation.value), crafted)
    assert not marker.exists()

    torch.load(crafted, weights_only=False)  # the reference: the old way of loading runs the payload
    assert marker.exists()


def test_a_raw_pickle_in_place_of_a_checkpoint_is_never_unpickled(corpus, copy, tmp_path):
    marker = tmp_path / "ran"
    path = copy / "checkpoints" / "raw.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
    mcfg = model_config(compose(_args(corpus, copy)))
    for load in (lambda: check_checkpoint(path, mcfg), lambda: load_run(copy, checkpoint=path)):
        with pytest.raises(ConfigError, match=str(path)):
            load()
    assert not marker.exists()


def _sharded(folder: Path, state_dict: dict) -> Path:
    """A sharded checkpoint as trainer=fsdp writes it: torch.distributed.checkpoint shards + Lightning's meta.pt."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

    _save_state_dict({"state_dict": state_dict}, storage_writer=FileSystemWriter(str(folder)), no_dist=True)
    torch.save({"global_step": 4}, folder / "meta.pt")
    return folder


def test_a_sharded_checkpoint_with_code_in_its_metadata_is_refused(tmp_path):
    marker = tmp_path / "ran"
    folder = _sharded(tmp_path / "sharded.ckpt", {"w": torch.arange(6.0)})
    assert sharded_checkpoint_metadata(folder)["global_step"] == 4  # a clean folder loads
    assert torch.equal(load_sharded_weights(folder)["w"], torch.arange(6.0))

    torch.save({"global_step": Payload(marker)}, folder / "meta.pt")
    with pytest.raises(ConfigError) as meta:
        sharded_checkpoint_metadata(folder)
    _refused(str(meta.value), folder / "meta.pt")

    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))  # read by torch with plain pickle
    for load in (sharded_checkpoint_metadata, load_sharded_weights):
        with pytest.raises(ConfigError) as dcp:
            load(folder)
        _refused(str(dcp.value), folder / ".metadata")
    assert not marker.exists()


# --- damage inside tensor data ------------------------------------------------------------------------------


def _flip_inside_largest_tensor(path: Path, n: int = 16) -> None:
    """Invert n bytes in the middle of the checkpoint's largest tensor storage (the zip entry's data)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    header = info.header_offset
    start = header + 30 + int.from_bytes(data[header + 26 : header + 28], "little")
    start += int.from_bytes(data[header + 28 : header + 30], "little") + info.file_size // 2
    data[start : start + n] = bytes(b ^ 0xFF for b in data[start : start + n])
    path.write_bytes(bytes(data))


def test_checkpoints_carry_the_sha256_of_their_bytes(run):
    files = sorted((run / "checkpoints").glob("step*.ckpt"))
    assert [p.name for p in files] == ["step0000002.ckpt", "step0000004.ckpt"]
    for path in files:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert path.with_name(path.name + ".sha256").read_text() == f"{digest}  {path.name}\n"  # sha256sum -c format
    assert verify_checksum(run / "checkpoints" / "last.ckpt")  # a link: its target is checked


def test_flipped_bytes_in_a_tensor_are_refused_by_resume_and_eval(corpus, copy, capsys):
    last = copy / "checkpoints" / "last.ckpt"
    target = copy / "checkpoints" / "step0000004.ckpt"
    assert last.is_symlink() and last.resolve() == target.resolve()
    _flip_inside_largest_tensor(target)
    torch.load(last, weights_only=True)  # the damage is invisible to torch: the file still loads

    error = _one_line_error(capsys, _args(corpus, copy, "resume=last"))
    assert f"checkpoint {last} is corrupt: checksum mismatch; resume from an earlier one with resume=PATH" in error
    with pytest.raises(ConfigError, match="is corrupt: checksum mismatch"):
        load_run(copy)
    load_run(copy, checkpoint="step0000002.ckpt")  # the earlier one is intact

    capsys.readouterr()
    assert resolve_resume("last_good", copy) == copy / "checkpoints" / "step0000002.ckpt"
    assert "step0000004.ckpt is corrupt" in capsys.readouterr().err
    _flip_inside_largest_tensor(copy / "checkpoints" / "step0000002.ckpt")
    with pytest.raises(ConfigError, match="resume=last_good: no intact checkpoint"):
        resolve_resume("last_good", copy)


def test_a_checkpoint_without_a_checksum_loads_with_a_one_line_warning(corpus, copy, capsys):
    for sidecar in (copy / "checkpoints").glob("*.sha256"):
        sidecar.unlink()
    check_checkpoint(copy / "checkpoints" / "last.ckpt", model_config(compose(_args(corpus, copy))))
    load_run(copy)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("has no checksum" in line and "last.ckpt" in line for line in err), err


def test_old_checkpoints_go_with_their_checksums(corpus, tmp_path):
    run_training(overrides(corpus, tmp_path / "run", "train.keep_checkpoints=1"))
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step0000006.ckpt", "step0000006.ckpt.sha256"]


def test_a_sharded_checkpoint_carries_a_manifest_of_its_files(tmp_path):
    folder = _sharded(tmp_path / "sharded.ckpt", {"w": torch.arange(4096.0)})
    assert not verify_checksum(folder)  # none written yet
    write_manifest(folder)
    assert verify_checksum(folder)
    shard = next(folder.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=f"is corrupt: checksum mismatch in {shard.name}"):
        verify_checksum(folder)
    shard.unlink()
    with pytest.raises(ConfigError, match="files differ from its checksums.sha256"):
        verify_checksum(folder)


# --- a full disk ----------------------------------------------------------------------------------------------


def test_a_full_disk_stops_in_one_line_naming_the_last_good_checkpoint(corpus, tmp_path, capsys, monkeypatch):
    """The save of step 4 runs out of space half-way: one line names the checkpoint that could not be written and
    the last good one, the partial .tmp is gone, and resuming as the line says trains on to the end."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if obj.get("global_step") == 4:
            f.write(b"\0" * 4096)  # part of the file reached the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run_dir = tmp_path / "run"
    error = _one_line_error(capsys, overrides(corpus, run_dir))
    folder = run_dir / "checkpoints"
    assert f"cannot write checkpoint {folder / 'step0000004.ckpt'}: No space left on device" in error
    assert f"resume=last ({folder / 'step0000002.ckpt'}, the last good checkpoint)" in error
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step0000002.ckpt", "step0000002.ckpt.sha256"]

    monkeypatch.setattr(torch, "save", real_save)  # space freed
    assert main(overrides(corpus, run_dir, "resume=last")) == 0
    assert json.loads((run_dir / "results.json").read_text())["train"]["steps"] == 6
