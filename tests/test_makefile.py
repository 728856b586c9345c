"""make BIN=dir runs the targets with an existing environment instead of creating .venv."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)


def test_make_with_bin_uses_that_environment_and_creates_no_venv(tmp_path):
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    bin_dir.mkdir()
    (bin_dir / "egmla-bench").write_text("#!/bin/sh\n")
    (bin_dir / "egmla-bench").chmod(0o755)
    done = make("setup", f"BIN={bin_dir}", f"VENV={venv}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not venv.exists()
    planned = make("-n", "bench", f"BIN={bin_dir}", "THROUGHPUT_CSV=out.csv").stdout
    assert f"{bin_dir}/egmla-bench train --size 120m --seq 2048 --batch 16 --csv out.csv" in planned


def test_make_with_a_bin_without_egmla_says_so(tmp_path):
    done = make("bench", f"BIN={tmp_path}", f"VENV={tmp_path / 'venv'}")
    assert done.returncode != 0
    assert f"BIN={tmp_path} has no egmla-bench: pip install egmla into that environment" in done.stdout
    assert not (tmp_path / "venv").exists()
