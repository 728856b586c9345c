"""Token budgets (train.max_tokens, train.global_batch_tokens): the same steps and global batch on any number of
devices, one-line errors for combinations that cannot work, and the derived values everywhere they are used:
--print-config, the Trainer, the learning-rate schedule and results.json."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from conftest import offline_env, overrides, run_training
from egmla import ConfigError, compose
from egmla.train import budget
from egmla.train.budget import apply_budget, derive, world_size
from egmla.train.main import main
from egmla.train.schedule import lr_multiplier

PAPER = {"max_tokens": 50_000_000_000, "global_batch_tokens": 524_288}  # conf/experiment/table1_120m.yaml


@pytest.mark.parametrize("world", [1, 2, 8, 16])
def test_the_same_budget_gives_the_same_steps_and_global_batch_on_any_world_size(world):
    b = derive(batch_size=16, seq_len=2048, world=world, max_steps=1, **PAPER)
    assert b.accumulation == 16 // world  # 524,288 = 16 x 2048 x world x accumulation
    assert b.accumulation * 16 * 2048 * world == b.global_batch_tokens == 524_288
    assert b.max_steps == 95_367 == 50_000_000_000 // 524_288  # rounded down
    assert 50_000_000_000 - 524_288 < b.tokens == 95_367 * 524_288 <= 50_000_000_000


def test_without_a_global_batch_the_tokens_set_the_steps():
    # global batch null: data.batch_size x seq_len x world x accumulation, as before; only the steps are derived
    one, two = (derive(4, 32, world, max_steps=6, accumulate=2, max_tokens=1000) for world in (1, 2))
    assert (one.global_batch_tokens, one.max_steps) == (256, 3) and (two.global_batch_tokens, two.max_steps) == (512, 1)
    assert derive(4, 32, 2, max_steps=6).max_steps == 6  # no budget: max_steps as given


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (dict(world=64), "not a multiple of data.batch_size x data.seq_len x world size = 16 x 2048 x 64 = 2,097,152"),
        (dict(world=64), "train.global_batch_tokens=524288 is not a multiple of data.batch_size x data.seq_len x"),
        (dict(world=64), ": set data.batch_size=4, or train.global_batch_tokens to a multiple of 2,097,152"),
        (dict(world=3), "= 16 x 2048 x 3 = 98,304: set train.global_batch_tokens to a multiple of 98,304"),
        (dict(world=8, accumulate=4), "trainer.accumulate_grad_batches=4 contradicts train.global_batch_tokens=524288"),
        (dict(world=8, max_tokens=100_000), "train.max_tokens=100000 is less than one optimizer step of 524,288"),
    ],
)
def test_combinations_that_cannot_work_are_one_line_errors(args, message):
    kwargs = PAPER | {"batch_size": 16, "seq_len": 2048, "max_steps": 1} | args
    with pytest.raises(ConfigError) as info:
        derive(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("value", [0, -5, 1.5, "many", True])
def test_token_counts_must_be_positive_integers(value):
    cfg = compose(["trainer=cpu", f"train.max_tokens={value}"])
    with pytest.raises(ConfigError, match=r"train.max_tokens=.* is invalid: expected a positive number of tokens"):
        apply_budget(cfg)


def test_world_size_counts_devices_as_lightning_does(monkeypatch):
    monkeypatch.setattr(budget, "cuda_device_count", lambda: 4)
    gpu = {"accelerator": "gpu", "num_nodes": 2}
    assert world_size(gpu | {"devices": -1}) == world_size(gpu | {"devices": "auto"}) == 8  # 4 GPUs x 2 nodes
    assert world_size(gpu | {"devices": [0, 1]}) == world_size(gpu | {"devices": "0,1"}) == 4
    assert world_size({"accelerator": "cpu", "devices": "auto"}) == 1 and world_size({"devices": "3"}) == 3
    with pytest.raises(ConfigError, match="trainer.devices=-1 is invalid for trainer.accelerator=cpu"):
        world_size({"accelerator": "cpu", "devices": -1})
    monkeypatch.setattr(budget, "cuda_device_count", lambda: 0)
    assert world_size(gpu | {"devices": -1}) == 0  # nothing to count here
    with pytest.raises(ConfigError, match="trainer.devices=-1 finds no GPU here .* set trainer.devices=N"):
        apply_budget(compose(["experiment=table1_120m"]))


@pytest.mark.parametrize(("devices", "accumulation"), [(1, 16), (2, 8), (8, 2)])
def test_the_paper_overlays_train_50b_tokens_in_the_same_steps_on_any_gpu_count(devices, accumulation):
    for experiment in ("table1_120m", "table1_120m/egmla_kv64", "scaling"):
        cfg = compose([f"experiment={experiment}", f"trainer.devices={devices}"])
        b = apply_budget(cfg)
        per_gpu = cfg.data.batch_size * cfg.data.seq_len
        assert cfg.train.max_steps == b.max_steps == 95_367
        assert cfg.trainer.accumulate_grad_batches == b.accumulation == 524_288 // (per_gpu * devices)
        assert b.global_batch_tokens == 524_288 and b.tokens == 95_367 * 524_288
        if experiment != "scaling":
            assert b.accumulation == accumulation
        assert apply_budget(cfg) == b  # applying twice changes nothing (prepare() runs after --print-config's)
    demo = compose(["experiment=demo_tiny"])
    steps = demo.train.max_steps
    apply_budget(demo)
    assert demo.train.max_steps == steps and demo.trainer.accumulate_grad_batches == 1  # a run given in steps
    assert demo.train.ckpt_every * 4 <= steps  # an interrupted demo trial resumes from a checkpoint mid-way


def test_print_config_shows_the_derived_steps_and_accumulation(capsys, monkeypatch):
    assert main(["--print-config", "experiment=table1_120m", "trainer.devices=8"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 95367\n" in out and "accumulate_grad_batches: 2\n" in out
    assert "max_tokens: 50000000000\n" in out and "global_batch_tokens: 524288\n" in out
    assert "# global batch: data.batch_size 16 x data.seq_len 2048 x world size 8 x accumulation 2 = 524,288" in out
    assert "-> 95,367 steps = 49,999,773,696 tokens (rounded down to whole steps: 226,304 short)" in out
    # trainer.devices=-1 where no GPU is visible: the steps are still known, the accumulation is left to the launch
    monkeypatch.setattr(budget, "cuda_device_count", lambda: 0)
    assert main(["--print-config", "experiment=table1_120m"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 95367\n" in out and "x the GPUs found at launch" in out
    assert main(["--print-config", "experiment=table1_120m", "trainer.devices=64"]) == 2
    assert "set data.batch_size=4" in capsys.readouterr().err


def lr_by_step(run_dir) -> dict[int, float]:
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        return {int(row["step"]): float(row["lr"]) for row in csv.DictReader(f) if row.get("lr")}


BUDGET = ["train.max_tokens=1000", "train.global_batch_tokens=256", "optim.warmup_steps=1"]  # 3 steps of 256


def test_a_budget_run_trains_its_steps_and_records_them(corpus, tmp_path):
    """One process, micro-batches of 4 x 32 = 128 tokens: accumulation 2, 3 steps (768 of the 1000 tokens)."""
    import lightning as L

    class Count(L.Callback):
        batches = 0

        def on_train_batch_end(self, *args):
            self.batches += 1

    count = Count()
    results = run_training(overrides(corpus, tmp_path / "run", *BUDGET), callbacks=[count])
    assert count.batches == 6  # 3 optimizer steps x 2 micro-batches
    train = results["train"]
    assert (train["steps"], train["tokens"], train["devices"]) == (3, 768, 1)
    assert (train["max_tokens"], train["global_batch_tokens"], train["accumulation"]) == (1000, 256, 2)
    assert results["config"]["train"]["max_steps"] == 3 and results["config"]["trainer"]["accumulate_grad_batches"] == 2
    assert json.loads((tmp_path / "run" / "results.json").read_text())["train"] == train
    # the schedule runs over the derived 3 steps (cosine from step 1 to the end), not train.max_steps' 6
    expected = {s: 1e-3 * lr_multiplier(s, 3, 1, "cosine", 0.1) for s in range(3)}
    assert lr_by_step(tmp_path / "run") == pytest.approx(expected, rel=1e-6)


def test_two_processes_train_the_same_budget_and_a_resume_on_one_is_refused(corpus, tmp_path, capsys):
    """Two CPU ranks (gloo) take one micro-batch each per step: no accumulation, the same 3 steps of 256 tokens.
    Their checkpoint holds two data positions, so resuming it on one device fails in one line, before training."""
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    args = overrides(corpus, tmp_path / "run", *ddp, *BUDGET)
    command = [sys.executable, "-m", "egmla.train", *args]
    done = subprocess.run(command, env=offline_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    train = json.loads((tmp_path / "run" / "results.json").read_text())["train"]
    assert (train["steps"], train["tokens"], train["devices"]) == (3, 768, 2)
    assert (train["max_tokens"], train["global_batch_tokens"], train["accumulation"]) == (1000, 256, 1)

    one = overrides(corpus, tmp_path / "run", *BUDGET, "resume=last")
    assert main(one) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "was trained on 2 ranks, this run has 1" in err and "resume with 2" in err
