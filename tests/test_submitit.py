"""`egmla-train -m hydra/launcher=submitit_local`: the same grid as separate submitit jobs (what
hydra/launcher=submitit_slurm turns into a SLURM job array), each training into its own run dir."""

from __future__ import annotations

import json

from conftest import overrides
from egmla import compose
from test_hydra_app import egmla_train


def test_submitit_local_runs_a_two_job_multirun(corpus, tmp_path):
    base = [o for o in overrides(corpus, tmp_path / "unused") if not o.startswith("run_dir=")]
    runs = tmp_path / "runs"
    args = ["-m", "hydra/launcher=submitit_local", *base, f"run_dir={runs}/${{run_name}}", "attention=mha,mla"]
    done = egmla_train(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for choice in ("mha", "mla"):
        expected = compose([*base, f"attention={choice}"]).run_name
        results = json.loads((runs / expected / "results.json").read_text())
        assert results["config"]["attention"]["variant"] == choice and results["train"]["steps"] == 6
    jobs = list(tmp_path.glob("multirun/*/*/.submitit/*/*_result.pkl"))
    assert len(jobs) == 2  # two submitit jobs, not two runs inside one process


def test_a_failed_submitit_job_fails_the_command(corpus, tmp_path):
    """The job with a missing training file exits 2 in its own process; the command must not exit 0."""
    base = [o for o in overrides(corpus, tmp_path / "runs" / "bad") if not o.startswith("data.data_files.train")]
    args = ["-m", "hydra/launcher=submitit_local", *base, f"data.data_files.train={tmp_path / 'missing.jsonl'}"]
    done = egmla_train(args, cwd=tmp_path)
    assert done.returncode != 0
    assert "exited with status 2" in done.stderr + done.stdout
