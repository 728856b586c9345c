"""`egmla-train` as a Hydra application (egmla.train.main.cli): -m sweeps, --cfg, --help, one-line errors, and
the same config and run name as compose() gives for the same overrides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import offline_env, overrides
from egmla import compose
from egmla.config import config_dir

CLI = "from egmla.train.cli import cli; cli()"


def egmla_train(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """The console script's entry point in a fresh process, started in `cwd`."""
    env = offline_env()
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + ":" + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_multirun_trains_each_job_into_its_own_run_dir(corpus, tmp_path):
    base = [o for o in overrides(corpus, tmp_path / "unused") if not o.startswith("run_dir=")]
    runs = tmp_path / "runs"
    done = egmla_train(["-m", *base, f"run_dir={runs}/${{run_name}}", "attention=mha,mla"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for choice in ("mha", "mla"):
        expected = compose([*base, f"attention={choice}"]).run_name
        results = json.loads((runs / expected / "results.json").read_text())
        assert results["run_name"] == expected and results["train"]["steps"] == 6
        assert results["config"]["attention"]["variant"] == choice
    assert len(list(runs.iterdir())) == 2
    # Hydra itself writes only the sweep's config, under multirun/ (git-ignored): no logs, no .hydra/, no outputs/
    assert {p.name for p in tmp_path.iterdir()} == {"runs", "multirun"}
    assert [p.name for p in tmp_path.glob("multirun/**/*") if p.is_file()] == ["multirun.yaml"]


def test_single_run_has_compose_run_name_with_knob_tag(corpus, tmp_path):
    args = [*overrides(corpus, tmp_path / "run"), "attention=egmla", "attention.gate_on=latent"]
    done = egmla_train(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["run_name"] == compose(args).run_name
    assert results["run_name"].endswith("-lat")
    assert {p.name for p in tmp_path.iterdir()} == {"run"}  # nothing of Hydra's own


def test_cfg_job_prints_the_composed_config(tmp_path):
    done = egmla_train(["--cfg", "job", "attention=mla", "model=120m"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    expected = OmegaConf.to_container(compose(["attention=mla", "model=120m"]), resolve=False)
    assert yaml.safe_load(done.stdout) == expected
    assert not list(tmp_path.iterdir())


def test_help_lists_config_groups_and_options(tmp_path):
    done = egmla_train(["--help"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for group in ("attention", "model", "trainer", "data"):
        options = ", ".join(sorted(p.stem for p in (config_dir() / group).glob("*.yaml")))
        assert f"{group}: {options}" in lines, group
    assert "--multirun,-m : Run multiple jobs with the configured launcher and sweeper" in lines


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["attention=nope"], "no config 'attention/nope'"),
        (["-m", "attention=mha,nope"], "no config 'attention/nope'"),
        (["attention=mha,mla"], "add -m (--multirun) to egmla-train"),
        (["optim.lr=-1"], "optim.lr=-1 is invalid"),
        (["hydra/launcher=nope"], "no config 'hydra/launcher/nope'"),
        (["-m", "--cfg", "job"], "give only one of -m (--multirun), --run, --cfg and --info"),
    ],
)
def test_bad_value_is_one_line_exit_2_nothing_written(tmp_path, args, expected):
    done = egmla_train([*args, f"run_dir={tmp_path}/run"], cwd=tmp_path)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr
    assert err[0].startswith("egmla-train: error: ") and expected in err[0], err[0]
    assert not list(tmp_path.iterdir())


def test_multirun_reports_a_failed_job_and_runs_the_next(tmp_path):
    done = egmla_train(["-m", "optim.lr=-1,-2", f"run_dir={tmp_path}/run"], cwd=tmp_path)
    assert done.returncode == 2
    assert [line for line in done.stdout.splitlines() if line.startswith("egmla-train: job ")] == [
        "egmla-train: job 0: optim.lr=-1 run_dir=" + str(tmp_path / "run"),
        "egmla-train: job 1: optim.lr=-2 run_dir=" + str(tmp_path / "run"),
    ]
    assert [line.split(" is invalid")[0] for line in done.stderr.strip().splitlines()] == [
        "egmla-train: error: optim.lr=-1",
        "egmla-train: error: optim.lr=-2",
    ]
    assert {p.name for p in tmp_path.iterdir()} == {"multirun"}


def test_print_config_is_kept(tmp_path):
    done = egmla_train(["--print-config", "attention=egmla", "attention.gate_on=latent"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"run_name: {compose(['attention=egmla', 'attention.gate_on=latent']).run_name}" in done.stdout


def test_submitit_launcher_is_selectable(tmp_path):
    done = egmla_train(["--cfg", "hydra", "hydra/launcher=submitit_slurm"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "SlurmLauncher" in yaml.safe_load(done.stdout)["hydra"]["launcher"]["_target_"]
