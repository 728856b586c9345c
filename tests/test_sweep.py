"""The local sweep runner (egmla-sweep) with a fast fake trainer, and every committed sweeps/*.yaml (dry run)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import offline_env
from egmla import compose, model_config
from egmla.sweep import Runner, load_spec, main, overrides_of, run_sweep, trial_limit

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))

# A stand-in for `python -m egmla.train`: records each call, writes a checkpoint, then either crashes (exit 1)
# or writes results.json with val/loss = (x - 2)^2 + len(opt) + lr. With FAKE_SLEEP=PATH it first writes its PID
# to PATH and sleeps (a long training).
FAKE_TRAINER = r"""
import json, os, sys, time
from pathlib import Path

args = sys.argv[1:]
kv = dict(a.split("=", 1) for a in args)
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(args) + "\n")
if os.environ.get("FAKE_SLEEP"):
    Path(os.environ["FAKE_SLEEP"]).write_text(str(os.getpid()))
    time.sleep(120)
run_dir = Path(kv["run_dir"])
(run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
(run_dir / "checkpoints" / "last.ckpt").write_text("step 3")
crash = os.environ.get("FAKE_CRASH_ON")
if crash and crash in args and "resume" not in kv:
    print("fake-train: error: simulated crash mid-run")
    sys.exit(1)
loss = (float(kv.get("x", 0)) - 2) ** 2 + len(kv.get("opt", "")) + float(kv.get("lr", 0))
results = {"run_name": "fake", "val": {"loss": loss, "bpb": loss / 2}, "resumed": "resume" in kv, "args": args}
(run_dir / "results.json").write_text(json.dumps(results))
"""

FAKE_EVAL = r"""
import json, os, sys
from pathlib import Path

with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(["eval", *sys.argv[1:]]) + "\n")
path = Path(sys.argv[1]) / "results.json"
results = json.loads(path.read_text())
results["eval"] = {"piqa": {"acc": 0.6}}
results["avg_acc"] = 1.0 / (1.0 + results["val"]["loss"])
path.write_text(json.dumps(results))
"""

GRID = {
    "name": "fake_grid",
    "method": "grid",
    "metric": {"name": "val/loss", "goal": "minimize"},
    "command": ["${env}", "${interpreter}", "-m", "egmla.train", "${args_no_hyphens}"],
    "parameters": {"x": {"values": [1, 2, 3]}, "opt": {"values": ["a", "bb"]}, "seed": {"value": 7}},
}


def fake_loss(params: dict) -> float:
    return (float(params.get("x", 0)) - 2) ** 2 + len(str(params.get("opt", ""))) + float(params.get("lr", 0))


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Paths of the fake trainer and evaluator; FAKE_CALLS collects one JSON line per invocation."""
    trainer, evaluator = tmp_path / "fake_train.py", tmp_path / "fake_eval.py"
    trainer.write_text(FAKE_TRAINER)
    evaluator.write_text(FAKE_EVAL)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.delenv("FAKE_CRASH_ON", raising=False)

    class Fake:
        train_cmd = shlex.join([sys.executable, str(trainer)])
        eval_cmd = shlex.join([sys.executable, str(evaluator), "{run_dir}"])

        @staticmethod
        def calls() -> list[list[str]]:
            return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []

    return Fake


def write_spec(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def state(out: Path) -> dict:
    return json.loads((out / "sweep_state.json").read_text())


def test_grid_runs_every_trial_once_in_its_own_run_dir(tmp_path, fake, capsys):
    out = tmp_path / "out"
    rc = main([str(write_spec(tmp_path, GRID)), "--out", str(out), "--train-cmd", fake.train_cmd])
    assert rc == 0
    trials = state(out)["trials"]
    assert len(trials) == 6 == len(fake.calls())
    assert {(t["params"]["x"], t["params"]["opt"]) for t in trials} == {(x, o) for x in (1, 2, 3) for o in ("a", "bb")}
    for t in trials:
        assert t["status"] == "finished"
        assert t["metric"] == pytest.approx(fake_loss(t["params"]))
        assert Path(t["run_dir"]) == out / t["id"]
        assert (out / t["id"] / "results.json").is_file()
    assert len({t["run_dir"] for t in trials}) == 6
    # each call: the parameters as KEY=VALUE in the spec's order, then run_dir
    first = fake.calls()[0]
    assert first == [*overrides_of(trials[0]["params"]), f"run_dir={out / trials[0]['id']}"]
    assert first[2] == "seed=7"
    text = capsys.readouterr().out
    assert "[1/6] trial-001" in text and "[6/6] trial-006" in text
    assert "best: " in text and "opt=a" in text.split("best: ")[1]  # x=2, opt=a has the lowest loss: 1.0
    assert "6/6 trials finished" in text


def test_crashed_trial_is_rerun_with_resume_and_finished_ones_are_not(tmp_path, fake, monkeypatch, capsys):
    out, spec = tmp_path / "out", str(write_spec(tmp_path, GRID))
    monkeypatch.setenv("FAKE_CRASH_ON", "x=3")
    assert main([spec, "--out", str(out), "--train-cmd", fake.train_cmd]) == 1
    statuses = {t["id"]: t["status"] for t in state(out)["trials"]}
    failed = [i for i, s in statuses.items() if s == "failed"]
    assert len(failed) == 2 and sum(s == "finished" for s in statuses.values()) == 4
    assert "simulated crash" in capsys.readouterr().out  # the child's last line is shown
    assert len(fake.calls()) == 6

    monkeypatch.delenv("FAKE_CRASH_ON")
    assert main([spec, "--out", str(out), "--train-cmd", fake.train_cmd]) == 0
    reruns = fake.calls()[6:]
    assert len(reruns) == 2  # only the failed trials ran again...
    assert all(call[-1] == "resume=last" for call in reruns)  # ...continuing from their checkpoints
    assert {c[-2] for c in reruns} == {f"run_dir={out / i}" for i in failed}
    assert all(t["status"] == "finished" for t in state(out)["trials"])
    assert "(done earlier)" in capsys.readouterr().out

    assert main([spec, "--out", str(out), "--train-cmd", fake.train_cmd]) == 0  # nothing left to do
    assert len(fake.calls()) == 8


def test_a_moved_sweep_folder_continues_where_it_lands(tmp_path, fake, monkeypatch):
    """A sweep folder copied elsewhere (results brought back from a GPU machine) reads its finished trials and
    trains the rest there, not in the run dirs its state recorded at the old place."""
    old, new, spec = tmp_path / "old", tmp_path / "new", str(write_spec(tmp_path, GRID))
    monkeypatch.setenv("FAKE_CRASH_ON", "x=3")
    assert main([spec, "--out", str(old), "--train-cmd", fake.train_cmd]) == 1
    shutil.copytree(old, new)
    shutil.rmtree(old)
    monkeypatch.delenv("FAKE_CRASH_ON")
    assert main([spec, "--out", str(new), "--train-cmd", fake.train_cmd]) == 0
    reruns = fake.calls()[6:]
    assert len(reruns) == 2 and all(c[-2].startswith(f"run_dir={new}/") for c in reruns)
    assert not old.exists()
    assert all(t["status"] == "finished" and Path(t["run_dir"]).parent == new for t in state(new)["trials"])


class Killed(BaseException):
    """Stands for the runner process dying (SIGKILL, power loss): nothing after it runs."""


def test_killed_sweep_resumes_where_it_stopped(tmp_path, fake, monkeypatch):
    """The runner dies while a trial trains (after the trial has left a checkpoint): the rerun skips the
    finished trials, resumes the interrupted one from its checkpoint (resume=last) and runs the rest."""
    out, spec = tmp_path / "out", str(write_spec(tmp_path, GRID))
    argv = [spec, "--out", str(out), "--train-cmd", fake.train_cmd]
    real_run = subprocess.run

    def dies_during_x2(command, **kwargs):
        if "x=2" in command:
            monkeypatch.setenv("FAKE_CRASH_ON", "x=2")  # the child stops mid-run, leaving its checkpoint
            real_run(command, **kwargs)
            raise Killed
        return real_run(command, **kwargs)

    monkeypatch.setattr("egmla.sweep.subprocess.run", dies_during_x2)
    with pytest.raises(Killed):
        main(argv)
    before = state(out)["trials"]
    assert before[-1]["status"] == "running" and all(t["status"] == "finished" for t in before[:-1])
    assert len(fake.calls()) == len(before) < 6

    monkeypatch.setattr("egmla.sweep.subprocess.run", real_run)
    monkeypatch.delenv("FAKE_CRASH_ON")
    assert main(argv) == 0
    after = state(out)["trials"]
    assert len(after) == 6 and all(t["status"] == "finished" for t in after)
    new_calls = fake.calls()[len(before) :]
    assert len(new_calls) == 6 - len(before) + 1  # the interrupted trial and the ones never started
    assert new_calls[0][-2:] == [f"run_dir={out / before[-1]['id']}", "resume=last"]
    assert [t["params"] for t in after[: len(before)]] == [t["params"] for t in before]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # gone meanwhile
        return False


def wait_until(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture
def sleeping_sweep(tmp_path, fake, monkeypatch):
    """A runner subprocess on tmp_path/out whose first trial sleeps; yields (runner, trainer's PID, argv)."""
    out, pid_file = tmp_path / "out", tmp_path / "trainer.pid"
    argv = [str(write_spec(tmp_path, GRID)), "--out", str(out), "--train-cmd", fake.train_cmd]
    env = offline_env(FAKE_SLEEP=str(pid_file))
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    runner = subprocess.Popen(
        [sys.executable, "-m", "egmla.sweep", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert wait_until(lambda: pid_file.is_file() and pid_file.read_text().isdigit(), 60), runner.stderr
        yield runner, int(pid_file.read_text()), argv
    finally:
        runner.kill()
        runner.communicate()
        if pid_file.is_file() and alive(child := int(pid_file.read_text())):
            os.kill(child, signal.SIGKILL)


def test_a_second_sweep_on_the_same_folder_is_refused_in_one_line(sleeping_sweep, fake, capsys):
    runner, _, argv = sleeping_sweep
    out = Path(argv[2])
    before = (out / "sweep_state.json").read_text()
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and not captured.out, captured
    assert err[0].startswith(f"egmla-sweep: error: sweep folder {out} is in use by PID {runner.pid} on ")
    assert len(fake.calls()) == 1  # the first runner's trial only: nothing ran twice
    assert (out / "sweep_state.json").read_text() == before
    assert main([*argv, "--dry-run"]) == 0  # a dry run writes nothing: it needs no lock


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_the_trainer_dies_with_the_runner(sleeping_sweep, how):
    """SIGTERM: the runner stops its child and records the trial; SIGKILL: the kernel sends the child SIGTERM."""
    runner, child, argv = sleeping_sweep
    assert alive(child)
    runner.send_signal(how)
    runner.communicate(timeout=20)
    assert wait_until(lambda: not alive(child), 5), f"trainer {child} outlived the runner ({how.name})"
    if how == signal.SIGTERM:
        assert runner.returncode == 128 + signal.SIGTERM
        trial = state(Path(argv[2]))["trials"][0]
        assert (trial["status"], trial["error"]) == ("running", "interrupted")  # the rerun resumes it


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_random_and_bayes_run_the_requested_number_of_trials(tmp_path, fake, method):
    spec = {
        "method": method,
        "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {"x": {"min": 0.0, "max": 4.0}, "opt": {"values": ["a", "bb"]}},
    }
    out = tmp_path / "out"
    rc = main(
        [
            str(write_spec(tmp_path, spec)),
            "--out",
            str(out),
            "--max-trials",
            "4",
            "--seed",
            "1",
            "--train-cmd",
            fake.train_cmd,
        ]
    )
    assert rc == 0
    trials = state(out)["trials"]
    assert len(trials) == 4 == len(fake.calls())
    for t in trials:
        assert 0.0 <= t["params"]["x"] <= 4.0 and t["params"]["opt"] in ("a", "bb")
        assert t["metric"] == pytest.approx(fake_loss(t["params"]))
    # a larger cap continues the same sweep: 2 more trials, the first 4 untouched
    assert (
        main([str(tmp_path / "spec.yaml"), "--out", str(out), "--max-trials", "6", "--train-cmd", fake.train_cmd]) == 0
    )
    assert len(state(out)["trials"]) == 6 == len(fake.calls())


def test_run_cap_bounds_a_random_sweep_and_no_cap_is_refused(tmp_path, fake, capsys):
    spec = {"method": "random", "run_cap": 3, "parameters": {"x": {"min": 0.0, "max": 1.0}}}
    out = tmp_path / "out"
    assert main([str(write_spec(tmp_path, spec)), "--out", str(out), "--train-cmd", fake.train_cmd]) == 0
    assert len(state(out)["trials"]) == 3
    del spec["run_cap"]
    assert main([str(write_spec(tmp_path, spec, "nocap.yaml")), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-trials" in err[0]


def test_eval_runs_after_training_and_its_metric_is_read(tmp_path, fake, capsys):
    spec = dict(GRID, metric={"name": "avg_acc", "goal": "maximize"})
    spec["parameters"] = {"x": {"values": [1, 2]}}
    path, out = str(write_spec(tmp_path, spec)), tmp_path / "out"
    # trained first without evaluation: the metric (avg_acc) is missing, not 0
    assert main([path, "--out", str(out), "--train-cmd", fake.train_cmd]) == 0
    assert [t["metric"] for t in state(out)["trials"]] == [None, None]
    assert "avg_acc=—" in capsys.readouterr().out
    # then with --eval: finished trials are evaluated, not retrained
    assert main([path, "--out", str(out), "--train-cmd", fake.train_cmd, "--eval", fake.eval_cmd]) == 0
    calls = fake.calls()
    assert [c[0] == "eval" for c in calls] == [False, False, True, True]
    assert calls[2][1] == str(out / "trial-001")
    trials = state(out)["trials"]
    assert [t["metric"] for t in trials] == pytest.approx([0.5, 1.0])  # 1 / (1 + loss), loss = (x - 2)^2
    assert "best: trial-002 avg_acc=1.0000" in capsys.readouterr().out
    assert main([path, "--out", str(out), "--train-cmd", fake.train_cmd, "--eval", fake.eval_cmd]) == 0
    assert len(fake.calls()) == 4  # evaluated once


def test_extra_overrides_follow_the_trial_parameters(tmp_path, fake):
    out = tmp_path / "out"
    spec = dict(GRID, parameters={"x": {"values": [1]}})
    assert (
        main(
            [
                str(write_spec(tmp_path, spec)),
                "--out",
                str(out),
                "--train-cmd",
                fake.train_cmd,
                "--",
                "train.max_steps=5",
                "x=2",
            ]
        )
        == 0
    )
    call = fake.calls()[0]
    assert call == ["x=1", "train.max_steps=5", "x=2", f"run_dir={out / 'trial-001'}"]
    assert state(out)["trials"][0]["metric"] == pytest.approx(0.0)  # the later x=2 wins, as in Hydra


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        ("method: grid\nparameters: {x: {values: [1, 2]\n", "not valid YAML"),
        ("- a\n- b\n", "YAML mapping"),
        ("method: hyperband\nparameters: {x: {values: [1]}}\n", "method='hyperband' is invalid"),
        ("method: grid\n", "'parameters' must be a non-empty mapping"),
        ("method: grid\nparameters: {attention: {parameters: {kv_lora_rank: {values: [1]}}}}\n", "dotted names"),
        ("method: bayes\nparameters: {x: {min: 0.0, max: 1.0}}\n", "needs a metric"),
        ("method: grid\nmetric: {name: loss, goal: up}\nparameters: {x: {values: [1]}}\n", "metric.goal"),
    ],
)
def test_bad_specs_fail_in_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    assert main([str(path), "--out", str(tmp_path / "out"), "--max-trials", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("egmla-sweep: error:") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_state_of_another_spec_is_refused(tmp_path, fake, capsys):
    out = tmp_path / "out"
    assert main([str(write_spec(tmp_path, GRID)), "--out", str(out), "--train-cmd", fake.train_cmd]) == 0
    other = dict(GRID, parameters={"x": {"values": [5]}})
    assert main([str(write_spec(tmp_path, other, "other.yaml")), "--out", str(out)]) == 2
    assert "other parameters" in capsys.readouterr().err


def test_a_grid_that_only_grew_runs_its_new_trials_alone(tmp_path, fake, capsys):
    """Values appended to a grid's parameters (rows added to a study, e.g. second seeds) continue the sweep: the
    finished trials keep their results and ids, only the new points train. Any other change is still refused."""
    out = tmp_path / "out"
    assert main([str(write_spec(tmp_path, GRID)), "--out", str(out), "--train-cmd", fake.train_cmd]) == 0
    before = state(out)["trials"]
    grown = dict(GRID, parameters={**GRID["parameters"], "x": {"values": [1, 2, 3, 4]}})
    spec = write_spec(tmp_path, grown, "grown.yaml")
    assert main([str(spec), "--out", str(out), "--train-cmd", fake.train_cmd]) == 0
    assert "the grid grew by 2 trial(s); the 6 in" in capsys.readouterr().out
    trials = state(out)["trials"]
    assert trials[:6] == before and len(fake.calls()) == 8
    assert [(t["id"], t["params"]["x"], t["status"]) for t in trials[6:]] == [
        ("trial-007", 4, "finished"),
        ("trial-008", 4, "finished"),
    ]
    assert state(out)["parameters"]["x"] == {"values": [1, 2, 3, 4]}
    for changed in ({"values": [2, 1, 3, 4]}, {"values": [1, 2]}):  # reordered, shrunk: another sweep
        other = dict(grown, parameters={**grown["parameters"], "x": changed})
        assert main([str(write_spec(tmp_path, other, "other.yaml")), "--out", str(out)]) == 2
        assert "other parameters" in capsys.readouterr().err
    seed_changed = dict(grown, parameters={**grown["parameters"], "seed": {"value": 8}})
    assert main([str(write_spec(tmp_path, seed_changed, "seed.yaml")), "--out", str(out)]) == 2


# ------------------------------------------------------------------------------------- the committed sweeps

# spec -> (number of trials, the first trial's overrides)
EXPECTED = {
    "table1_120m": (7, ["experiment=table1_120m/mla_base"]),
    "latent_sweep": (
        5,
        [
            "experiment=table1_120m",
            "attention=egmla",
            "experiment_name=latent_sweep",
            "run_name=latent_sweep-${attention.name}",
            "attention.kv_lora_rank=16",
        ],
    ),
    "gate_dim": (
        6,
        [
            "experiment=table1_120m",
            "attention=egmla",
            "attention.kv_lora_rank=64",
            "experiment_name=gate_dim",
            "run_name=gate_dim-${attention.name}",
            "attention.gate_dim=32",
        ],
    ),
    "scaling": (4, ["experiment=scaling", "model=650m", "attention=mla"]),
    "table1_small": (13, ["experiment=table1_small/mla_base"]),
    "scaling_small": (6, ["experiment=scaling_small", "model=1.2b", "attention=mla"]),
    "gate_dim_small": (
        5,
        ["experiment=table1_small/egmla_kv64", "experiment_name=gate_dim_small", "attention.gate_dim=256"],
    ),
    "demo_tiny": (5, ["experiment=demo_tiny", "attention=mha"]),
}


def test_every_committed_sweep_is_listed_here():
    assert {p.stem for p in SWEEPS} == set(EXPECTED)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_committed_sweep_dry_run(path, tmp_path, capsys):
    spec = load_spec(path)
    count, first = EXPECTED[path.stem]
    assert spec.config["name"] == path.stem and spec.metric == "val/loss" and spec.goal == "minimize"
    command = spec.config["command"]  # what `wandb agent` runs
    assert command[:4] == ["${env}", "${interpreter}", "-m", "egmla.train"] and command[-1] == "${args_no_hyphens}"
    out = tmp_path / "out"
    runner = Runner(spec, out, ["python", "-m", "egmla.train"], dry_run=True)
    trials = run_sweep(runner, trial_limit(spec, None))
    assert not out.exists()  # a dry run writes nothing
    assert len(trials) == count
    assert overrides_of(trials[0].params) == first
    text = capsys.readouterr().out
    assert f"[1/{count}] trial-001" in text and f"run_dir={out / 'trial-001'}" in text
    # every trial composes with conf/ and is a distinct configuration with a distinct run name
    configs = [compose(overrides_of(t.params)) for t in trials]
    names = [c.run_name for c in configs]
    assert len(set(names)) == count, names
    for cfg in configs:
        model_config(cfg)  # validates the model and attention
        assert cfg.experiment_name == path.stem


def test_table1_rows_are_the_papers():
    spec = load_spec(ROOT / "sweeps" / "table1_120m.yaml")
    trials = run_sweep(Runner(spec, Path("unused"), ["x"], dry_run=True), 7)
    from egmla import accounting

    kv = {
        t.params["experiment"].split("/")[1]: accounting.kv_elements_per_token(compose(overrides_of(t.params)))
        for t in trials
    }
    assert kv == {
        "mla_base": 3840,
        "egmla_kv256": 3840,
        "egmla_kv64": 1536,
        "egmla_kv16": 960,
        "mha": 18432,
        "gqa": 6144,
        "mqa": 1536,
    }


def test_table1_small_lists_the_study_rows_with_one_recipe():
    """The small study: the paper's rows, the controls (MLA kv64, latent gate, additive tables) and second seeds,
    every row on the same data, tokens and optimizer settings."""
    from egmla import accounting

    spec = load_spec(ROOT / "sweeps" / "table1_small.yaml")
    configs = {
        t.params["experiment"].split("/")[1]: compose(overrides_of(t.params))
        for t in run_sweep(Runner(spec, Path("unused"), ["x"], dry_run=True), 13)
    }
    kv = {row: accounting.kv_elements_per_token(cfg) for row, cfg in configs.items()}
    assert kv == {
        "mla_base": 3840,
        "egmla_kv64": 1536,
        "egmla_kv64_add": 1536,
        "mla_kv64": 1536,
        "egmla_kv64_latent": 1536,
        "egmla_kv16": 960,
        "egmla_kv256": 3840,
        "mha": 18432,
        "mla_base_seed2": 3840,
        "egmla_kv64_seed2": 1536,
        "egmla_kv64_add_seed2": 1536,
        "egmla_kv64_latent_seed2": 1536,
        "mla_kv64_seed2": 1536,
    }
    a = {row: cfg.attention for row, cfg in configs.items()}
    assert a["egmla_kv64_latent"].gate_on == "latent" and a["egmla_kv64"].gate_on == "content"
    assert a["egmla_kv64_add"].gate_combine == "add" and a["egmla_kv64"].gate_combine == "multiply"
    assert a["mla_kv64"].variant == "mla" and a["mla_kv64"].kv_lora_rank == 64
    params = {row: accounting.param_counts(model_config(cfg))["total"] for row, cfg in configs.items()}
    assert params["egmla_kv64_add"] == params["egmla_kv64"] > params["mla_kv64"]  # the control's parameters match
    assert {cfg.seed for cfg in configs.values()} == {1, 2}
    for row, cfg in configs.items():  # a second seed is its first seed's config with seed 2
        if row.endswith("_seed2"):
            first = configs[row.removesuffix("_seed2")]
            names = {"run_name": first.run_name, "run_dir": first.run_dir}
            assert cfg.seed == 2 and dict(cfg, seed=1, **names) == dict(first)
    for cfg in configs.values():  # one recipe: same data, tokens, optimizer
        assert cfg.data.name == "code" and cfg.data.seq_len == 2048 and cfg.model.name == "120m"
        assert cfg.train.max_tokens >= 40_000_000 and cfg.train.global_batch_tokens == 32_768
        assert dict(cfg.optim) == dict(configs["mla_base"].optim) and dict(cfg.train) == dict(configs["mla_base"].train)


def test_scaling_small_trains_every_size_on_the_same_tokens_and_global_batch():
    """MLA-Base and EG-MLA kv64 at three sizes; every row the same tokens in the same global batch whether the node
    has 4 GPUs (as planned) or 1 (accumulation 4): the budget is in tokens, not steps."""
    from egmla.train.budget import apply_budget

    spec = load_spec(ROOT / "sweeps" / "scaling_small.yaml")
    trials = run_sweep(Runner(spec, Path("unused"), ["x"], dry_run=True), 6)
    rows = {(t.params["model"], t.params["attention"]) for t in trials}
    assert rows == {(m, a) for m in ("120m", "650m", "1.2b") for a in ("mla", "egmla")}
    for t in trials:
        for gpus, accumulation in ((4, 1), (1, 4)):
            cfg = compose([*overrides_of(t.params), f"trainer.devices={gpus}"])
            assert cfg.trainer.strategy == "fsdp2" and cfg.data.name == "code"
            budget = apply_budget(cfg)
            assert cfg.train.max_steps == 480 and cfg.trainer.accumulate_grad_batches == accumulation
            assert budget.world_size == gpus and cfg.train.max_tokens == 480 * 131_072 >= 50_000_000
        kv = model_config(compose(overrides_of(t.params))).attention.kv_lora_rank
        assert kv == (256 if t.params["attention"] == "mla" else 64)


def test_time_budget_stops_between_trials_and_the_same_command_continues(tmp_path, fake, monkeypatch, capsys):
    """--time-budget (a GPU time slice): no trial starts once the seconds left are fewer than the longest trial
    took; exit 0, and rerunning the same command runs the rest without repeating any."""
    out, spec = tmp_path / "out", str(write_spec(tmp_path, GRID))
    clock = iter(range(0, 10_000, 40))  # every perf_counter() call advances the clock by 40 s
    monkeypatch.setattr("egmla.sweep.time.perf_counter", lambda: float(next(clock)))
    argv = [spec, "--out", str(out), "--train-cmd", fake.train_cmd, "--time-budget", "300"]
    assert main(argv) == 0
    first = [t for t in state(out)["trials"] if t["status"] == "finished"]
    assert 1 <= len(first) < 6 and len(fake.calls()) == len(first)
    assert "rerun the same command to continue" in capsys.readouterr().out
    while len(fake.calls()) < 6:
        calls = len(fake.calls())
        assert main(argv) == 0 and len(fake.calls()) > calls  # every slice makes progress
    assert all(t["status"] == "finished" for t in state(out)["trials"]) and len(fake.calls()) == 6


def test_a_missing_eval_program_fails_the_trial_in_one_line(tmp_path, fake, capsys):
    out = tmp_path / "out"
    argv = [
        str(write_spec(tmp_path, GRID)),
        "--out",
        str(out),
        "--train-cmd",
        fake.train_cmd,
        "--eval",
        "egmla-no-such-program checkpoint={run_dir}",
        "--max-trials",
        "1",
    ]
    assert main(argv) == 1
    trial = state(out)["trials"][0]
    assert trial["status"] == "eval_failed" and "cannot run 'egmla-no-such-program'" in trial["error"]


def test_own_commands_resolve_beside_the_interpreter(monkeypatch, tmp_path):
    from egmla.sweep import own_program

    (tmp_path / "egmla-eval").write_text("#!/bin/sh\n")
    monkeypatch.setattr("egmla.sweep.sys.executable", str(tmp_path / "python"))
    assert own_program("egmla-eval") == str(tmp_path / "egmla-eval")  # no activated venv needed
    assert own_program("python") == str(tmp_path / "python")
    assert own_program("egmla-other") == "egmla-other" and own_program("/bin/echo") == "/bin/echo"
