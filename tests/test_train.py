"""Training end to end on the CPU through the real conf/ tree: every size x variant trains, a stopped run
resumes onto the exact batches and losses of an uninterrupted one, the same seed repeats itself, and bad
inputs fail in one line without touching checkpoints already written."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import offline_env, overrides, run_training, train_losses
from egmla import ConfigError, compose
from egmla.train.main import main, prepare


class BatchRecorder(L.Callback):
    """Records (step, sha1 of the batch's token ids, loss) for every trained batch."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        digest = hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest()[:12]
        self.rows.append((trainer.global_step, digest, round(float(outputs["loss"]), 6)))


class Crash(L.Callback):
    """Simulates a crash (after the step's checkpoint was written) once `at_step` optimizer steps are done."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("attention", ["mha", "gqa", "mqa", "mla", "egmla"])
def test_tiny_every_variant_trains_and_writes_results(corpus, tmp_path, attention):
    results = run_training(overrides(corpus, tmp_path / "run", f"attention={attention}"))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["train"]["steps"] == 6 and saved["train"]["tokens"] == 6 * 4 * 32
    assert saved["config"]["attention"]["variant"] == attention
    assert saved["data"] == {"name": "local", "fingerprint": None}
    assert saved["kv"]["bytes_per_token"] == results["kv"]["bytes_per_token"] > 0
    assert set(saved["params"]) == {"non_embedding", "embedding", "gate_tables", "total"}
    assert (saved["params"]["gate_tables"] > 0) == (attention == "egmla")
    assert 0 < saved["val"]["loss"] < 6 and 0 < saved["val"]["bpb"] < 9
    assert saved["train"]["tok_per_s"] > 0 and saved["git"]["commit"]
    assert saved["train"]["checkpoint_s"] > 0  # the last checkpoint was written, and timed apart
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "environment.json").is_file()


@pytest.mark.parametrize("attention", ["mha", "gqa", "mqa", "mla", "egmla"])
def test_120m_every_variant_trains_a_step(corpus, tmp_path, attention):
    small = ["data.seq_len=16", "data.batch_size=1", "train.max_steps=1", "train.val_batches=1", "train.ckpt_every=100"]
    args = overrides(corpus, tmp_path / "run", "model=120m", f"attention={attention}", *small)
    args.remove("model.vocab_size=257")  # the paper's GPT-2 vocabulary; byte ids fit inside it
    results = run_training(args)
    assert results["train"]["steps"] == 1 and results["val"]["loss"] > 0
    assert results["config"]["model"]["d_model"] == 768


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_on_the_same_batches_andtrain_losses(corpus, tmp_path, workers):
    extra = [f"data.num_workers={workers}", "train.max_steps=8", "train.ckpt_every=3"]
    straight = BatchRecorder()
    run_training(overrides(corpus, tmp_path / "straight", *extra), callbacks=[straight])

    first = BatchRecorder()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(overrides(corpus, tmp_path / "resumed", *extra), callbacks=[first, Crash(at_step=5)])
    second = BatchRecorder()
    results = run_training(overrides(corpus, tmp_path / "resumed", *extra, "resume=last"), callbacks=[second])

    # The crash came after step 5, the last checkpoint is step 3: steps 4-5 are trained again, identically.
    assert first.rows == straight.rows[:5]
    assert second.rows == straight.rows[3:]
    assert results["train"]["resumed_from"].endswith("last.ckpt") and results["train"]["steps"] == 8
    expected = json.loads((tmp_path / "straight" / "results.json").read_text())["val"]["loss"]
    assert results["val"]["loss"] == pytest.approx(expected, rel=1e-6)


def test_same_seed_same_loss_curve(corpus, tmp_path):
    a = run_training(overrides(corpus, tmp_path / "a"))
    b = run_training(overrides(corpus, tmp_path / "b"))
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b") and len(train_losses(tmp_path / "a")) == 6
    assert a["val"]["loss"] == b["val"]["loss"]
    run_training(overrides(corpus, tmp_path / "c", "seed=7"))
    assert train_losses(tmp_path / "c") != train_losses(tmp_path / "a")


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.ckpt"))}


@pytest.fixture
def trained(corpus, tmp_path) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run_training(overrides(corpus, tmp_path / "run", "train.max_steps=4"))
    return tmp_path / "run"


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("egmla-train: error: "), err
    return err[0]


def test_bad_inputs_fail_in_one_line_and_keep_checkpoints(corpus, trained, capsys):
    before = _snapshot(trained / "checkpoints")
    assert set(before) == {"last.ckpt", "step0000002.ckpt", "step0000004.ckpt"}
    base = overrides(corpus, trained, "train.max_steps=4")

    missing = _error(capsys, [*base, "resume=last", "data.data_files.train=/nowhere/train.jsonl"])
    assert "data file not found: /nowhere/train.jsonl" in missing
    assert "no config 'attention/bogus'" in _error(capsys, [*base, "attention=bogus"])
    assert "already has checkpoints" in _error(capsys, base)  # a new run never overwrites an old one
    assert "was trained with a different model" in _error(capsys, [*base, "attention=mla", "resume=last"])
    assert "no checkpoint at" in _error(capsys, [*base, f"resume={trained / 'missing.ckpt'}"])

    corrupt = trained / "checkpoints" / "corrupt.ckpt"
    corrupt.write_bytes((trained / "checkpoints" / "last.ckpt").read_bytes()[:1000])  # truncated
    assert "is unreadable" in _error(capsys, [*base, f"resume={corrupt}"])
    corrupt.unlink()

    # NaN/inf loss: a learning rate that blows the weights up, resumed from the finished run (no periodic
    # checkpoint falls before the failure, so every file must stay byte-identical).
    nan_run = [
        *base,
        "resume=last",
        "train.max_steps=30",
        "train.ckpt_every=100",
        "optim.lr=1e30",
        "optim.grad_clip=0",
        "optim.warmup_steps=1",
    ]
    message = _error(capsys, nan_run)
    assert "training loss is" in message and f"resume={trained / 'checkpoints' / 'step0000004.ckpt'} " in message
    assert _snapshot(trained / "checkpoints") == before


def test_invalid_training_settings_are_config_errors(corpus, tmp_path):
    for extra, text in [
        (["optim.schedule=linear"], "optim.schedule='linear' is invalid"),
        (["train.max_steps=0"], "train.max_steps=0 is invalid"),
        (["data.seq_len=512"], "data.seq_len=512 exceeds model.max_seq_len=256"),
        (["model.vocab_size=100"], "model.vocab_size=100 is smaller than tokenizer 'bytes'"),
        (["train.activation_checkpointing=some"], "train.activation_checkpointing='some' is invalid"),
        (["train.compile_scope=layers"], "train.compile_scope='layers' is invalid"),
        (["train.fused_loss=yes"], "train.fused_loss='yes' is invalid"),
        (["trainer.strategy=deepspeed"], "trainer.strategy='deepspeed' is invalid"),
        (["attention=egmla", "attention.fused_expand=true"], "attention.fused_expand=true runs on CUDA GPUs"),
    ]:
        with pytest.raises(ConfigError, match=text.replace("(", r"\(").replace("[", r"\[")):
            prepare(compose(overrides(corpus, tmp_path / "x", *extra)))
    assert not (tmp_path / "x").exists()  # nothing written for a refused selection


def test_weight_decay_skips_norms_embeddings_and_gate_tables(corpus, tmp_path):
    from egmla.train.module import LanguageModel

    cfg = compose(overrides(corpus, tmp_path, "attention=egmla"))
    prepared = prepare(cfg)
    module = LanguageModel(prepared.settings.model, prepared.settings.optim, 10, torch.ones(257))
    decay, no_decay = module.configure_optimizers()["optimizer"].param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "embed.weight" in no_decay_names and "gate_tables.0.weight" in no_decay_names
    assert all(n.endswith(("norm.weight", "norm.bias", ".weight")) for n in no_decay_names)
    assert all(names[id(p)].endswith(".weight") and p.ndim == 2 for p in decay["params"])
    assert "blocks.0.attn.wq.weight" in {names[id(p)] for p in decay["params"]}


def test_two_process_ddp_trains_and_resumes(corpus, tmp_path):
    """Two CPU ranks (gloo) through the real command line: each rank's data position is saved, and a resume
    continues both. Lightning re-launches the command once per extra rank, so this runs as a subprocess."""
    import subprocess
    import sys

    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    args = overrides(corpus, tmp_path / "run", *ddp, "train.max_steps=4", "train.ckpt_every=2")
    env = offline_env()
    first = subprocess.run([sys.executable, "-m", "egmla.train", *args], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    ranks = ckpt["StreamDataModule"]["ranks"]
    assert len(ranks) == 2 and ranks[0] != ranks[1]  # each rank's own position
    assert all(r["batches_consumed"] == 4 for r in ranks)

    again = [*args, "resume=last", "train.max_steps=6"]
    second = subprocess.run([sys.executable, "-m", "egmla.train", *again], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train"]["steps"] == 6 and results["train"]["devices"] == 2
    assert results["train"]["tokens"] == 6 * 2 * 4 * 32


def test_wandb_logger_is_offline_without_a_key_and_grouped_by_experiment(corpus, tmp_path, monkeypatch):
    from egmla.train.main import _logger

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a wandb key
    cfg = compose(overrides(corpus, tmp_path / "run", "logger=wandb", "experiment_name=table1_120m"))
    logger = _logger(cfg, tmp_path / "run")
    init = logger._wandb_init  # what wandb.init will receive (the run starts lazily)
    assert init["mode"] == "offline" and init["group"] == "table1_120m" and init["project"] == "egmla"
    assert init["name"] == cfg.run_name and init["dir"] == str(tmp_path / "run")
    no_group = _logger(compose(overrides(corpus, tmp_path / "run", "logger=wandb")), tmp_path / "run")
    assert no_group._wandb_init["group"] == cfg.run_name  # no experiment: the run's own name


def test_last_checkpoint_holds_the_final_step(corpus, tmp_path):
    run_training(overrides(corpus, tmp_path / "run", "train.max_steps=5", "train.ckpt_every=2"))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 5


def test_the_final_checkpoint_is_written_after_fit_moved_the_model(corpus, tmp_path, monkeypatch):
    """On a GPU, Lightning's teardown moves the module to the CPU when fit ends, before the final step's checkpoint
    is written (max_steps not a multiple of ckpt_every), while the last batch stays on the GPU: the save-time check
    must not run the model then (it did, and the run died after training). Simulated: teardown also moves that
    batch to the meta device, where running the model on it fails."""
    from lightning.pytorch.strategies import Strategy

    teardown = Strategy.teardown

    def teardown_and_strand_the_batch(strategy):
        teardown(strategy)
        module = strategy.lightning_module
        module._last_ids = module._last_ids.to("meta")

    monkeypatch.setattr(Strategy, "teardown", teardown_and_strand_the_batch)
    run_training(overrides(corpus, tmp_path / "run", "train.max_steps=5", "train.ckpt_every=2"))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 5


def test_last_checkpoint_links_to_the_newest_instead_of_a_second_write(corpus, tmp_path):
    """Each checkpoint is written once (a 1.2B one takes a minute); last.ckpt is a link to the newest, and a
    resume that finds the link dangling (a stop between the write and the link) takes the newest checkpoint."""
    from egmla.train.checkpoint import resolve_resume

    folder = tmp_path / "run" / "checkpoints"
    run_training(
        overrides(corpus, tmp_path / "run", "train.max_steps=4", "train.ckpt_every=2", "train.keep_checkpoints=1")
    )
    last = folder / "last.ckpt"
    assert last.is_symlink() and last.resolve() == (folder / "step0000004.ckpt").resolve()
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step0000004.ckpt", "step0000004.ckpt.sha256"]
    assert torch.load(last, weights_only=False)["global_step"] == 4
    last.unlink()
    last.symlink_to("step0000002.ckpt")  # removed already
    assert resolve_resume("last", tmp_path / "run") == folder / "step0000004.ckpt"


def test_checkpoint_writes_are_left_out_of_throughput_windows():
    """A 1.2B sharded checkpoint takes as long as ~150 steps: it must not pass for slow training."""
    import time
    from types import SimpleNamespace

    from egmla.train.perf import Throughput

    meter = Throughput(flops_per_token=1e9, tokens_per_batch=1000, log_every=2)
    trainer = SimpleNamespace(world_size=1, global_step=0, fit_loop=SimpleNamespace(_should_accumulate=lambda: False))
    module = SimpleNamespace(device=torch.device("cpu"), log=lambda *args, **kwargs: None)

    def step(save_seconds=0.0):
        meter.on_train_batch_start(trainer, module, None, 0)
        time.sleep(0.01)
        trainer.global_step += 1
        meter.on_train_batch_end(trainer, module, None, None, 0)
        if save_seconds:  # ModelCheckpoint runs after the other callbacks' on_train_batch_end
            meter.on_save_checkpoint(trainer, module, {})
            time.sleep(save_seconds)

    for save in (0, 0.3, 0, 0, 0, 0.3):  # saves at steps 2 (closing window 1) and 6 (the last step)
        step(save)
    meter.on_train_end(trainer, module)
    assert [tokens for tokens, _ in meter.windows] == [2000, 2000, 2000]
    assert all(seconds < 0.15 for _, seconds in meter.windows), meter.windows
    assert 0.6 <= meter.checkpoint_seconds < 0.9


def test_time_between_batches_is_measured_without_checkpoint_writes():
    """perf/between_batches: a data loader taking 20 ms a batch beside 10 ms steps shows as ~2/3 of each window; a
    checkpoint write between two batches counts neither there nor in the window."""
    import time
    from types import SimpleNamespace

    from egmla.train.perf import Throughput

    meter = Throughput(flops_per_token=1e9, tokens_per_batch=1000, log_every=2)
    trainer = SimpleNamespace(world_size=1, global_step=0, fit_loop=SimpleNamespace(_should_accumulate=lambda: False))
    logged = []
    module = SimpleNamespace(device=torch.device("cpu"), log=lambda name, value, **kwargs: logged.append((name, value)))
    for i in range(6):
        meter.on_train_batch_start(trainer, module, None, i)
        time.sleep(0.01)
        trainer.global_step += 1
        meter.on_train_batch_end(trainer, module, None, None, i)
        if i == 2:
            meter.on_save_checkpoint(trainer, module, {})
            time.sleep(0.3)
        time.sleep(0.02)  # fetching the next batch
    meter.on_train_end(trainer, module)
    assert len(meter.between_batches) == 3 and all(seconds < 0.1 for seconds in meter.between_batches)
    # windows 2-3: 20 ms + 40 ms of waits in 100 ms (the wait right after a save is taken for part of the save: its
    # end is seen only at the next batch, as in the windows)
    assert 0.45 < meter.steady_share(meter.between_batches) < 0.75
    shares = [value for name, value in logged if name == "perf/between_batches"]
    assert len(shares) == 3 and shares[2] > max(shares[:2])  # windows 1-2 hold one counted wait, window 3 two


def test_time_in_the_garbage_collector_is_measured_per_window():
    """perf/garbage_collection: a full collection inside a step is counted in that step's window, and the meter
    stops listening to the collector when training ends or fails."""
    import gc
    import time
    from types import SimpleNamespace

    from egmla.train.perf import Throughput

    meter = Throughput(flops_per_token=1e9, tokens_per_batch=1000, log_every=1)
    trainer = SimpleNamespace(world_size=1, global_step=0, fit_loop=SimpleNamespace(_should_accumulate=lambda: False))
    module = SimpleNamespace(device=torch.device("cpu"), log=lambda *args, **kwargs: None)
    meter.on_train_start(trainer, module)
    for collect in (False, True, False):
        meter.on_train_batch_start(trainer, module, None, 0)
        if collect:
            junk = [[i] for i in range(200_000)]  # objects for a full collection to walk
            start = time.perf_counter()
            gc.collect()
            took = time.perf_counter() - start
            del junk
        trainer.global_step += 1
        meter.on_train_batch_end(trainer, module, None, None, 0)
    meter.on_train_end(trainer, module)
    assert len(meter.garbage_collection) == 3
    assert took * 0.9 <= meter.garbage_collection[1] <= meter.windows[1][1]
    gc.collect()
    assert meter._time_gc not in gc.callbacks and len(meter.garbage_collection) == 3
    assert meter.steady_share(meter.garbage_collection) == pytest.approx(
        sum(meter.garbage_collection[1:]) / sum(seconds for _, seconds in meter.windows[1:])
    )
    meter.on_train_start(trainer, module)  # a second fit listens again; a save's collections are the save's
    meter.on_train_batch_start(trainer, module, None, 0)
    trainer.global_step += 1
    meter.on_train_batch_end(trainer, module, None, None, 0)
    meter.on_save_checkpoint(trainer, module, {})  # ModelCheckpoint, after the window has closed
    junk = [[i] for i in range(200_000)]
    gc.collect()
    del junk
    meter.on_train_batch_start(trainer, module, None, 0)
    trainer.global_step += 1
    meter.on_train_batch_end(trainer, module, None, None, 0)
    assert len(meter.garbage_collection) == 5 and meter.garbage_collection[-1] < took / 4
    meter.on_exception(trainer, module, RuntimeError("stopped"))  # a run that fails stops listening too
    assert meter._time_gc not in gc.callbacks


def test_mfu_uses_the_peak_seen_during_training():
    """MFU must not depend on where the module sits after fit (Lightning moves it back to the CPU)."""
    from egmla.train.perf import Throughput

    meter = Throughput(flops_per_token=1e9, tokens_per_batch=1000, log_every=1)
    meter.peak_flops_total = 1e15
    meter.windows = [(1000, 10.0), (4000, 2.0), (6000, 3.0)]  # the first window (compilation) is left out
    assert meter.steady_tok_per_s == 2000.0
    assert meter.steady_mfu == 1e9 * 2000.0 / 1e15
    meter.peak_flops_total = None  # CPU: no agreed peak
    assert meter.steady_mfu is None


def _all_finite(checkpoint: Path) -> bool:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_a_diverged_model_is_never_checkpointed(corpus, tmp_path, capsys):
    """lr=1e6 with a checkpoint every step: the run stops in one line, and no checkpoint holds non-finite
    weights (the finiteness checks run at log points and saves only, never as a per-step host sync)."""
    run = tmp_path / "run"
    base = overrides(corpus, run, "train.ckpt_every=1", "train.log_every=3")
    message = _error(capsys, [*base, "optim.lr=1e6", "optim.grad_clip=0", "optim.warmup_steps=1"])
    assert ("blew up" in message or "training loss is" in message) and "no checkpoint was written" in message
    assert all(_all_finite(path) for path in sorted((run / "checkpoints").glob("step*.ckpt")))


def test_the_advice_after_a_blow_up_works_when_followed(corpus, trained, capsys):
    """A healthy 4-step run resumed with lr=1e6 and a checkpoint every step: the first update blows the weights up
    to large but finite values whose loss goes non-finite a step later. The stop's advice, followed (the usual
    lr, resume from what it names), trains on to the end with finite losses; resume=last twice keeps to last.ckpt."""
    base = overrides(corpus, trained, "train.max_steps=12", "train.ckpt_every=1")
    message = _error(capsys, [*base, "resume=last", "optim.lr=1e6", "optim.grad_clip=0"])
    advice = re.search(r"lower optim.lr or raise optim.warmup_steps, then .*resume=([^\s),]+)", message)
    results = run_training([*base, f"resume={advice.group(1)}"])
    assert results["train"]["steps"] == 12 and math.isfinite(results["val"]["loss"])
    assert all(math.isfinite(loss) for loss in train_losses(trained).values())
    assert (trained / "checkpoints" / "last.ckpt").resolve().name == "step0000012.ckpt"


@pytest.mark.parametrize("fused", [True, False])
def test_validation_bpb_leaves_out_zero_byte_targets_and_loss_keeps_them(fused):
    """val/bpb: nats of the targets that stand for bytes / ln 2 / their bytes; EOS (no bytes) counts only in
    val/loss. Checked against per-token cross-entropy of the model's full logits, over two batches."""
    import torch.nn.functional as F

    from egmla.config import model_config
    from egmla.train.module import LanguageModel

    cfg = compose(["model=tiny", "attention=egmla", "model.vocab_size=257"])
    token_bytes = torch.ones(257)
    token_bytes[200:256] = 3  # some multi-byte tokens
    token_bytes[256] = 0  # EOS
    torch.manual_seed(0)
    module = LanguageModel(model_config(cfg), dict(cfg.optim), 10, token_bytes, fused_loss=fused)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 257, (3, 41), generator=g) for _ in range(2)]
    for ids in batches:
        ids[:, ::7] = 256  # documents end every 7 tokens
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader([{"input_ids": ids} for ids in batches], batch_size=None)
    trainer.validate(module, loader, verbose=False)

    with torch.no_grad():
        nats = torch.cat(
            [
                F.cross_entropy(
                    module.model(ids[:, :-1]).double().flatten(0, 1), ids[:, 1:].flatten(), reduction="none"
                )
                for ids in batches
            ]
        )
    nbytes = torch.cat([token_bytes[ids[:, 1:]].flatten() for ids in batches]).double()
    has_bytes = nbytes > 0
    assert 0 < (~has_bytes).sum() < nats.numel()
    expected_bpb = (nats[has_bytes].sum() / math.log(2) / nbytes.sum()).item()
    old_bpb = (nats.sum() / math.log(2) / nbytes.sum()).item()  # EOS nats against no bytes
    assert module.last_val["tokens"] == nats.numel()
    assert module.last_val["loss"] == pytest.approx(nats.mean().item(), rel=1e-5)
    assert module.last_val["bpb"] == pytest.approx(expected_bpb, rel=1e-5)
    assert abs(old_bpb - expected_bpb) > 0.05 * expected_bpb


def test_a_run_prints_neither_the_litlogger_tip_nor_the_leafspec_warning(corpus, tmp_path):
    import subprocess
    import sys

    args = overrides(corpus, tmp_path / "run", "train.max_steps=2", "train.val_every=2", "train.ckpt_every=2")
    done = subprocess.run(
        [sys.executable, "-m", "egmla.train", *args], env=offline_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "litlogger" not in done.stderr and "LeafSpec" not in done.stderr, done.stderr
    assert "GPU available" not in done.stderr and "TPU available" not in done.stderr
    assert "`Trainer.fit` stopped: `max_steps=2` reached." in done.stderr  # Lightning's other messages stay


def test_quiet_lightning_filters_those_notices_alone(caplog):
    import logging
    import warnings

    from egmla.train.quiet import quiet_lightning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning()
        leafspec = "`isinstance(treespec, LeafSpec)` is deprecated"
        warnings.warn(f"{leafspec}, use `isinstance(treespec, TreeSpec)` instead.", FutureWarning, stacklevel=1)
        warnings.warn(f"{leafspec} (another category)", UserWarning, stacklevel=1)
        warnings.warn("some other deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [
        "`isinstance(treespec, LeafSpec)` is deprecated (another category)",
        "some other deprecation",
    ]
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        log.info("💡 Tip: For seamless cloud logging, try installing [litlogger](https://pypi.org/project/litlogger/)")
        log.info("💡 Tip: For seamless cloud uploads, try installing [litmodels](https://pypi.org/project/litmodels/)")
        log.info("GPU available: True (cuda), used: True")
        log.info("TPU available: False, using: 0 TPU cores")
        log.info("`Trainer.fit` stopped: `max_steps=2` reached.")
        logging.getLogger("lightning.pytorch.accelerators.cuda").info("LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]")
    assert [r.getMessage()[:30] for r in caplog.records] == [
        "💡 Tip: For seamless cloud uplo",
        "`Trainer.fit` stopped: `max_st",
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize("trainer", ["gpu", "ddp", "fsdp"])
def test_a_gpu_trainer_without_a_gpu_is_one_line_and_writes_nothing(corpus, tmp_path, capsys, trainer):
    message = _error(capsys, [*overrides(corpus, tmp_path / "run"), f"trainer={trainer}"])
    assert "no visible CUDA GPU: use trainer=cpu" in message
    assert not (tmp_path / "run").exists()


def test_a_resume_keeps_the_evaluations_already_written(corpus, trained):
    """results.json of a run evaluated at step 4, resumed to step 6 without eval=: the step-4 accuracies stay in
    the file (earlier_evals, with their step), and none is presented as step 6's."""
    path = trained / "results.json"
    results = json.loads(path.read_text())
    results |= {"eval": {"piqa_offline": {"acc": 0.61}}, "avg_acc": 0.61, "eval_splits": {"piqa_offline": "val"}}
    path.write_text(json.dumps(results))
    resumed = run_training(overrides(corpus, trained, "train.max_steps=6", "resume=last"))
    assert resumed["train"]["steps"] == 6 and "eval" not in resumed and "avg_acc" not in resumed
    assert resumed["earlier_evals"] == [
        {"steps": 4, "eval": {"piqa_offline": {"acc": 0.61}}, "avg_acc": 0.61, "eval_splits": {"piqa_offline": "val"}}
    ]
    again = run_training(overrides(corpus, trained, "train.max_steps=8", "resume=last"))
    assert again["earlier_evals"] == resumed["earlier_evals"]  # kept once, not lost by a second resume


def test_output_to_a_file_is_one_line_per_log_interval(corpus, tmp_path):
    """Not a terminal (a sweep's log, a batch job): no bar redraws, a line every train.log_every steps and one per
    validation, each with the logged loss."""
    import subprocess
    import sys

    args = overrides(corpus, tmp_path / "run", "train.log_every=2")
    done = subprocess.run(
        [sys.executable, "-m", "egmla.train", *args], env=offline_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stdout + done.stderr
    steps = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["2/6", "4/6", "6/6"]
    assert all("train/loss=" in line for line in steps)
    assert sum(line.startswith("validation at step") and "val/loss=" in line for line in done.stdout.splitlines()) >= 2
