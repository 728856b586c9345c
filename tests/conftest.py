"""Shared fixtures: small model configurations of every attention variant (built without Hydra), and a small
jsonl corpus with the overrides, runner and log reader of the tests that train through the real conf/ tree."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from egmla.kernels import triton_available
from egmla.model import AttentionConfig, ModelConfig, Transformer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Common English words for small synthetic corpora (the tests that train write a few jsonl documents of them).
WORDS = "the of and to in that it is was he for on are as with his they at be this from have or by one".split()  # noqa: SIM905


needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def triton_interpreted(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    """`python args...` in a fresh process under the Triton CPU interpreter, with tests/ importable."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def run_under_triton_interpreter(code: str, timeout: int) -> None:
    """Run `code`, a script that prints "ok" once its checks pass, under the Triton CPU interpreter; fail with
    the end of its stderr otherwise."""
    done = triton_interpreted(["-c", textwrap.dedent(code)], timeout)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def load_script(relative: str):
    """A script of the repository (e.g. experiments/throughput/frozen_tables.py) imported as a module."""
    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def words(line: str) -> list[str]:
    """A list of plain words (command-line arguments, column names) written as one string."""
    return line.split()


def write_jsonl(path: Path, texts: Iterable[str]) -> None:
    """One {"text": ...} document per line, as data=local reads them."""
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in texts)


def offline_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess: this one's, with the model hub and datasets offline."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small jsonl corpus: 300 training and 40 validation documents of random words."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for name, n in (("train", 300), ("val", 40)):
        texts = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) for _ in range(n))
        write_jsonl(root / f"{name}.jsonl", (f"{name} document {i}: {text}." for i, text in enumerate(texts)))
    return root


def overrides(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    """egmla-train overrides for the tiny byte-level model on `corpus`: 6 steps, validation every 3."""
    return [
        "model=tiny",
        "model.vocab_size=257",
        "data=local",
        f"data.data_files.train={corpus / 'train.jsonl'}",
        f"data.data_files.validation={corpus / 'val.jsonl'}",
        "data.tokenizer=bytes",
        "data.seq_len=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.shuffle_window=8",
        f"run_dir={run_dir}",
        "train.max_steps=6",
        "train.val_every=3",
        "train.val_batches=2",
        "train.log_every=1",
        "train.ckpt_every=2",
        "optim.warmup_steps=2",
        *extra,
    ]


def run_training(args: list[str], callbacks=None) -> dict:
    """egmla-train in this process (compose, prepare, train); returns results.json's content."""
    from egmla import compose
    from egmla.train.main import prepare, train

    return train(prepare(compose(args)), callbacks=callbacks)


def train_losses(run_dir: Path) -> dict[int, float]:
    """train/loss by step from every csv/version_N/metrics.csv of a run (a resume writes a new version)."""
    out = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            out |= {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}
    return out


# name -> attention knobs; covers every variant and every open EG-MLA choice at least once.
VARIANTS = {
    "mha": dict(variant="mha"),
    "gqa": dict(variant="gqa", n_kv_heads=2),
    "mqa": dict(variant="mqa"),
    "mla": dict(variant="mla"),
    "mla_absorbed": dict(variant="mla", absorb=True),
    "mla_q_lora": dict(variant="mla", q_lora_rank=24),
    "egmla": dict(variant="egmla"),
    "egmla_shared_sigmoid_rms": dict(variant="egmla", gate_kv="shared", gate_activation="sigmoid", gate_norm="rmsnorm"),
    "egmla_silu_rope_grouped": dict(
        variant="egmla", gate_activation="silu", gate_norm="none", gate_rope_key=True, gate_group_size=2
    ),
    "egmla_latent": dict(variant="egmla", gate_on="latent"),
    "egmla_latent_absorbed": dict(variant="egmla", gate_on="latent", absorb=True, gate_rope_key=True),
    "egmla_gate_off": dict(variant="egmla", gate_enabled=False),
    "egmla_add": dict(variant="egmla", gate_combine="add"),
    "egmla_add_latent_absorbed": dict(
        variant="egmla", gate_on="latent", gate_combine="add", absorb=True, gate_rope_key=True
    ),
    "egmla_vector": dict(variant="egmla", gate_norm_scope="vector"),
    "egmla_identity_silu": dict(variant="egmla", gate_init="identity", gate_activation="silu"),
}


def small_config(variant: str = "mha", n_layers: int = 3, **model) -> ModelConfig:
    """A model small enough for exhaustive CPU checks; `variant` is a key of VARIANTS or raw knobs."""
    knobs = dict(VARIANTS[variant]) if isinstance(variant, str) else dict(variant)
    knobs.setdefault("kv_lora_rank", 16)
    knobs.setdefault("qk_nope_head_dim", 8)
    knobs.setdefault("qk_rope_head_dim", 8)
    knobs.setdefault("v_head_dim", 8)
    knobs.setdefault("gate_dim", 12)
    defaults = dict(vocab_size=97, n_layers=n_layers, d_model=32, n_heads=4, ffn_hidden=64, max_seq_len=64)
    return ModelConfig(**(defaults | model), attention=AttentionConfig(**knobs))


def small_model(variant: str = "mha", seed: int = 0, **model) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(small_config(variant, **model)).eval()


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param
