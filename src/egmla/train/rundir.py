"""What a run directory records about where it ran: git commit, package versions, machine, command."""

from __future__ import annotations

import csv
import json
import os
import platform
import socket
import subprocess
from datetime import UTC, date, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("egmla", "torch", "lightning", "hydra-core", "omegaconf", "datasets", "tokenizers", "tiktoken", "wandb")


def is_rank_zero() -> bool:
    """True in the launching process; False in the extra ranks that Lightning, torchrun or SLURM start."""
    return all(int(os.environ.get(var, 0)) == 0 for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def git_commit() -> dict[str, Any]:
    """The commit of the checkout this code runs from (None outside git) and whether it had local changes.

    EGMLA_GIT_COMMIT, when set, wins: a copy of the tree shipped to another machine may carry a stale .git."""
    if os.environ.get("EGMLA_GIT_COMMIT"):
        return {"commit": os.environ["EGMLA_GIT_COMMIT"], "dirty": None}
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict[str, Any]:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "gpus": gpus,
    }


def environment(argv: list[str], short: bool = False) -> dict[str, Any]:
    env = {"git": git_commit(), "machine": machine(), "date": datetime.now(UTC).isoformat(timespec="seconds")}
    if not short:
        env |= {"command": " ".join(argv), "versions": _versions()}
    return env


def bench_stamp() -> dict[str, str]:
    """The date and short commit a benchmark row records (computed once per run, not per row)."""
    return {"date": date.today().isoformat(), "commit": (git_commit()["commit"] or "")[:12]}


def append_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Append rows to a CSV (keys outside `columns` ignored), writing the header when the file is new."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (temp file + rename), so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
