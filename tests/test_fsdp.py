"""FSDP2 (trainer=fsdp) on 2 CPU processes (gloo), and activation checkpointing, through the real conf/ tree.

Lightning re-launches the command once per extra rank, so the distributed runs are subprocesses.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from conftest import offline_env, overrides, train_losses
from egmla import build_model, compose
from egmla.train.fsdp import apply_activation_checkpointing, compile_model, is_sharded_checkpoint

FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "attention=egmla"]
# One shard per rank, the metadata of both, and every file's sha256.
SHARDED_FILES = [".metadata", "__0_0.distcp", "__1_0.distcp", "checksums.sha256", "meta.pt"]


def egmla_train(args: list[str], torchrun: bool = False) -> None:
    """egmla-train in a subprocess: Lightning starts the second rank itself, or torchrun starts both."""
    env = offline_env()
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    done = subprocess.run([*launcher, "-m", "egmla.train", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_fsdp2_trains_saves_sharded_checkpoints_and_resumes_exactly(corpus, tmp_path):
    """Stopped at step 4 and resumed to 6, a 2-rank FSDP2 run ends where an uninterrupted one does: same losses,
    same weights (read back from the sharded checkpoints by the evaluation loader, in one process). The
    uninterrupted run is launched by torchrun, the others by Lightning: the same command serves both."""
    from torch.distributed.checkpoint import FileSystemReader

    from egmla.eval.load import load_run

    # A constant learning rate after warm-up: stopping at step 4 of a 4-step run is then step 4 of a 6-step one.
    common = [*FSDP, "train.ckpt_every=2", "train.keep_checkpoints=1", "optim.schedule=constant"]
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    egmla_train(overrides(corpus, stopped, *common, "train.max_steps=4"))
    last = stopped / "checkpoints" / "last.ckpt"
    assert is_sharded_checkpoint(last)
    assert sorted(p.name for p in last.iterdir()) == SHARDED_FILES
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["last.ckpt", "step0000004.ckpt"]
    # Every weight, gate tables included, and its optimizer moments are split by rows over the two ranks.
    metadata = FileSystemReader(str(last)).read_metadata().state_dict_metadata
    for name in ("model.gate_tables.0.weight", "model.embed.weight", "model.blocks.1.attn.wkv_b.weight"):
        for key in (f"state_dict.{name}", f"optimizer_0.state.{name}.exp_avg"):
            chunks = metadata[key].chunks
            assert len(chunks) == 2 and chunks[0].sizes[0] + chunks[1].sizes[0] == metadata[key].size[0], key

    egmla_train(overrides(corpus, stopped, *common, "train.max_steps=6", "resume=last"))
    egmla_train(overrides(corpus, straight, *common, "train.max_steps=6"), torchrun=True)
    resumed, reference = train_losses(stopped), train_losses(straight)
    assert sorted(resumed) == sorted(reference) == list(range(6))
    assert resumed == pytest.approx(reference, rel=1e-5, abs=1e-6)
    results = json.loads((stopped / "results.json").read_text())
    assert results["train"]["steps"] == 6 and results["train"]["devices"] == 2
    assert results["val"]["loss"] == pytest.approx(json.loads((straight / "results.json").read_text())["val"]["loss"])

    # Float rounding apart: torchrun sets OMP_NUM_THREADS=1, so CPU kernels sum in another order.
    a, _, _ = load_run(stopped)
    b, _, _ = load_run(straight)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_fsdp_refuses_in_training_evaluation(corpus, tmp_path, capsys):
    from egmla.train.main import main

    assert main(overrides(corpus, tmp_path / "run", *FSDP, "eval=offline")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "egmla-eval" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_changes_neither_the_loss_nor_the_gradients(mode):
    cfg = compose(["model=tiny", "attention=egmla", "model.vocab_size=97"])
    torch.manual_seed(0)
    plain = build_model(cfg)
    checkpointed = build_model(cfg)
    checkpointed.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(checkpointed, mode)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())  # checkpoints keep their keys
    ids = torch.randint(0, 97, (2, 24))
    losses = []
    for model in (plain, checkpointed):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    grads = dict(plain.named_parameters())
    for name, p in checkpointed.named_parameters():
        ref = grads[name.replace("_checkpoint_wrapped_module.", "")]
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiling_in_place_keeps_names_and_function(scope, monkeypatch):
    """Either compile scope leaves parameter names (checkpoint keys) and the logits as they were.
    (Dynamo's eager backend: the graphs are captured as on a GPU, without the CPU's slow code generation.)"""
    from functools import partial

    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="eager"))
    cfg = compose(["model=tiny", "attention=egmla", "model.vocab_size=97"])
    plain = build_model(cfg)
    compiled = build_model(cfg)
    compiled.load_state_dict(plain.state_dict())
    compile_model(compiled, scope)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    ids = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(compiled(ids), plain(ids))
    assert (scope == "blocks") == all("forward" in vars(block) for block in compiled.blocks)


CLIP_SCRIPT = """
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from egmla import build_model, compose
from egmla.train.fsdp import apply_fsdp2, clip_grad_norm_

dist.init_process_group("gloo")
cfg = compose(["model=tiny", "attention=egmla", "model.vocab_size=97"])
grads, norms = [], []
for ours in (True, False):
    torch.manual_seed(0)
    model = build_model(cfg)
    apply_fsdp2(model, init_device_mesh("cpu", (2,)), "32-true")
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
    model(ids).square().mean().backward()
    if ours:
        norms.append(clip_grad_norm_(model.parameters(), 0.05))
    else:  # torch's own DTensor path
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).full_tensor()
        torch.nn.utils.clip_grads_with_norm_(list(model.parameters()), 0.05, total)
        norms.append(total)
    grads.append([p.grad.full_tensor() for p in model.parameters()])
torch.testing.assert_close(norms[0], norms[1], rtol=1e-5, atol=0)
assert norms[0] > 0.05  # clipping happened
for a, b in zip(*grads, strict=True):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
dist.destroy_process_group()
"""


def test_clipping_sharded_gradients_matches_torch(tmp_path):
    """Our local-shard clipping == torch's DTensor clipping: same global norm, same clipped gradients."""
    script = tmp_path / "clip.py"
    script.write_text(CLIP_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_new_sharded_checkpoint_replaces_a_link_not_its_target(tmp_path):
    """last.ckpt may link to a step's folder; writing the final step there must keep that step's folder."""
    from egmla.train.fsdp import swap_in

    step = tmp_path / "step0000004.ckpt"
    step.mkdir()
    (step / "shard").write_text("step 4")
    last = tmp_path / "last.ckpt"
    last.symlink_to(step.name)
    for content in ("step 5", "step 6"):  # over the link, then over the folder it became
        new = tmp_path / "last.ckpt.tmp"
        new.mkdir()
        (new / "shard").write_text(content)
        swap_in(new, last)
        assert not last.is_symlink() and (last / "shard").read_text() == content
    assert (step / "shard").read_text() == "step 4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step0000004.ckpt"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args: list[str], launcher: str) -> None:
    """egmla-train as two nodes of one rank each on this host, started the way torchrun or srun starts them."""
    port = free_port()
    procs = []
    for node in (0, 1):
        env = offline_env(OMP_NUM_THREADS="1")  # as torchrun sets it, so that every run sums in the same order
        if launcher == "torchrun":  # the README's multi-node command: c10d rendezvous, one agent per node
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=egmla-test",
            ]
        else:  # what `srun --nodes 2 --ntasks-per-node 1` puts in each task's environment
            cmd = [sys.executable]
            env |= dict(
                SLURM_NTASKS="2",
                SLURM_NTASKS_PER_NODE="1",
                SLURM_NNODES="2",
                SLURM_PROCID=str(node),
                SLURM_LOCALID="0",
                SLURM_NODEID=str(node),
                SLURM_NODELIST="127.0.0.1",
                SLURM_JOB_ID="4242",
                SLURM_JOB_NAME="egmla",
                MASTER_PORT=str(port),
            )
        cmd += ["-m", "egmla.train", *args, "trainer.num_nodes=2", "trainer.devices=1"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]


def test_fsdp2_across_two_nodes_under_torchrun_and_slurm_matches_one_node(corpus, tmp_path):
    """The README's multi-node launches with no code change: two nodes of one rank each (here both on this host)
    train as one node with two ranks does, to the same losses, and write one sharded checkpoint together."""
    common = [*FSDP[:2], "trainer.precision=32-true", "attention=egmla", "train.max_steps=3", "train.ckpt_every=3"]
    egmla_train(overrides(corpus, tmp_path / "one_node", *common, "trainer.devices=2"), torchrun=True)
    reference = train_losses(tmp_path / "one_node")
    assert sorted(reference) == [0, 1, 2]
    for launcher in ("torchrun", "slurm"):
        run_dir = tmp_path / launcher
        two_nodes(overrides(corpus, run_dir, *common), launcher)
        assert train_losses(run_dir) == pytest.approx(reference, rel=1e-6), launcher
        last = run_dir / "checkpoints" / "last.ckpt"
        assert sorted(p.name for p in last.iterdir()) == SHARDED_FILES
        assert json.loads((run_dir / "results.json").read_text())["train"]["devices"] == 2, launcher
