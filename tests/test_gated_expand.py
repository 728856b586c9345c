"""attention.fused_expand: EG-MLA's gate, norms and K/V expansion in one Triton kernel (forward and backward)
against the model's own PyTorch path, under the Triton CPU interpreter (skipped where triton is not installed,
as in CI); and its refusals, which need no triton."""

from pathlib import Path

import pytest
import torch

from conftest import needs_triton, run_under_triton_interpreter, small_model, triton_interpreted, words
from egmla.model import ConfigError

FUSED = {
    "variant": "egmla",
    "fused_expand": True,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 16,
    "v_head_dim": 16,
    "gate_dim": 16,
}

INTERPRETED = """
import itertools, torch
from conftest import small_model

knobs = dict(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, gate_dim=16)
for kv, act, norm, rope in (("separate", "none", "layernorm", False), ("shared", "sigmoid", "rmsnorm", True),
                            ("separate", "silu", "none", False)):
    variant = {"variant": "egmla", "gate_kv": kv, "gate_activation": act, "gate_norm": norm, "gate_rope_key": rope}
    torch.manual_seed(0)
    plain = small_model(variant | knobs)
    fused = small_model(variant | knobs | {"fused_expand": True})
    fused.load_state_dict(plain.state_dict())
    for block in plain.blocks:  # non-trivial norm parameters, so that their gradients are checked too
        for p in block.attn.parameters():
            p.data.add_(0.1 * torch.randn_like(p))
    fused.load_state_dict(plain.state_dict())
    ids = torch.randint(0, plain.cfg.vocab_size, (2, 21))
    losses = [m(ids[:, :-1], targets=ids[:, 1:]) for m in (plain, fused)]
    for loss in losses:
        loss.backward()
    assert abs(losses[0].item() - losses[1].item()) < 1e-5, (variant, losses)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        # (the key norm's bias gets a zero gradient up to rounding: softmax ignores a shift common to all keys)
        error, scale = (a.grad - b.grad).norm().item(), a.grad.norm().item()
        assert error <= 1e-4 * scale + 1e-7, (variant, name, error, scale)
print("ok")
"""


@needs_triton
def test_fused_expansion_trains_like_the_plain_path_under_the_interpreter():
    run_under_triton_interpreter(INTERPRETED, timeout=600)


def test_fused_expansion_refuses_a_cpu_run_in_one_line(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = small_model(FUSED)
    with pytest.raises(ConfigError, match="set attention.fused_expand=false on a CPU"):
        model(torch.randint(0, model.cfg.vocab_size, (1, 8)))


def test_fused_expansion_needs_powers_of_two_and_is_ignored_by_other_variants():
    with pytest.raises(ConfigError, match="attention.gate_dim=24 is invalid: fused_expand needs powers of two >= 16"):
        small_model(FUSED | {"gate_dim": 24})
    ids = torch.randint(0, 97, (1, 8))
    for attention in ({"variant": "mla"}, {"variant": "mha"}, {"variant": "egmla", "gate_on": "latent"}):
        torch.testing.assert_close(small_model(attention | {"fused_expand": True})(ids), small_model(attention)(ids))


@needs_triton
def test_the_fused_expand_experiment_checks_the_op_against_fp32_under_the_interpreter():
    """experiments/throughput/fused_expand.py: k, v and every input gradient of the fused op against fp32."""
    script = Path(__file__).resolve().parents[1] / "experiments/throughput/fused_expand.py"
    done = triton_interpreted([str(script)], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    assert [row[0] for row in rows] == [
        *words("k v d_latent d_emb d_k_rope d_W_ukv d_W_ue d_k_weight d_k_bias d_v_weight d_v_bias")
    ]
    assert all(float(row[1]) < 1e-5 for row in rows), done.stdout
