"""The fused EG-MLA decode's algorithm and the decode benchmark's bookkeeping (CPU; the Triton kernel itself is
checked against the unfused path by `egmla-bench decode` on a GPU, and here under the Triton interpreter when
triton is installed)."""

from __future__ import annotations

import csv

import pytest
import torch

from conftest import needs_triton, run_under_triton_interpreter, small_model, words
from egmla import accounting, kernels
from egmla.bench import decode as bench
from egmla.bench import main
from egmla.config import compose, model_config
from egmla.kernels import reference

# EG-MLA gating the content, over the open choices the fused decode serves (activation, norm, shared gate,
# gated RoPE key, tables shared by layers).
CONTENT_GATED = ["egmla", "egmla_shared_sigmoid_rms", "egmla_silu_rope_grouped"]


def _decode_steps(model, ids, prefill: int):
    """Prefill `prefill` tokens, then decode the rest one token at a time; the logits of every decode step."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    model(ids[:, :prefill], cache)
    return torch.cat([model(ids[:, t : t + 1], cache) for t in range(prefill, ids.shape[1])], dim=1)


@pytest.mark.parametrize("variant", CONTENT_GATED)
@pytest.mark.parametrize("gate_source", ["table", "embedding"])
def test_reference_algorithm_matches_unfused_decode(variant, gate_source):
    """Tiles of 4 tokens in splits of 8: contexts 9..15 end mid-tile and mid-split; batch 3; float64."""
    launch = kernels.LaunchOptions(block_s=4, split_tokens=8)
    model = small_model(variant).double()
    torch.manual_seed(5)
    ids = torch.randint(0, 97, (3, 16))
    unfused = _decode_steps(model, ids, prefill=9)
    assert model.enable_fused_decode(gate_source, launch=launch) == "reference"
    fused = _decode_steps(model, ids, prefill=9)
    torch.testing.assert_close(fused, unfused, rtol=1e-10, atol=1e-12)
    model.enable_fused_decode(None)
    torch.testing.assert_close(_decode_steps(model, ids, prefill=9), unfused, rtol=0, atol=0)


def _dense_attention(attn, gate_table, q_nope, q_rope, latent, k_rope, ids):
    """Softmax attention of one query per sequence with K/V expanded, gated and normalised for every token."""
    b, s, _ = latent.shape
    kv = attn.wkv_b(latent).view(b, s, attn.n_heads, attn.d_nope + attn.d_v)
    g = attn.gate(gate_table(ids))[0].view(b, s, attn.n_heads, attn.d_nope + attn.d_v)
    k = attn.k_norm(kv[..., : attn.d_nope] * g[..., : attn.d_nope])
    v = attn.v_norm(kv[..., attn.d_nope :] * g[..., attn.d_nope :])
    score = torch.einsum("bhd,bshd->bhs", q_nope, k) + torch.einsum("bhr,bsr->bhs", q_rope, k_rope)
    return torch.einsum("bhs,bshv->bhv", torch.softmax(score * attn.scale, dim=-1), v)


@pytest.mark.parametrize("context", [1, 7, 16, 37])
@pytest.mark.parametrize("block_s, split_tokens", [(4, None), (8, 8), (16, 40)])
def test_reference_tiles_and_splits_match_dense_attention(context, block_s, split_tokens):
    model = small_model("egmla").double()
    attn, table = model.blocks[1].attn, model.gate_table(1)
    attn.enable_fused_decode("table", table)
    torch.manual_seed(context)
    b, h = 2, attn.n_heads
    q_nope, q_rope = torch.randn(b, h, attn.d_nope).double(), torch.randn(b, h, attn.d_rope).double()
    latent, k_rope = torch.randn(b, context, attn.d_c).double(), torch.randn(b, context, attn.d_rope).double()
    ids = torch.randint(0, 97, (b, context), dtype=torch.int32)
    expected = _dense_attention(attn, table, q_nope, q_rope, latent, k_rope, ids)
    got = reference.decode_attention(
        q_nope, q_rope, latent, k_rope, ids, attn.fused_decode.weights, block_s=block_s, split_tokens=split_tokens
    )
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", CONTENT_GATED)
def test_gate_table_equals_recomputed_gate(variant):
    model = small_model(variant)
    ids = torch.randint(0, 97, (4, 9))
    for i, block in enumerate(model.blocks):
        weights = block.attn.decode_weights(model.gate_table(i))
        rows = kernels.build_gate_rows(weights, chunk=10)  # chunks end mid-vocabulary
        recomputed = block.attn.gate(model.gate_table(i)(ids))[0]
        torch.testing.assert_close(rows[ids], recomputed, rtol=1e-6, atol=1e-6)


def test_fused_decode_leaves_training_forward_and_checkpoint_alone():
    model = small_model("egmla")
    ids = torch.randint(0, 97, (2, 12))
    logits, keys = model(ids), set(model.state_dict())
    model.enable_fused_decode("table")
    assert set(model.state_dict()) == keys  # the gate table is not a parameter or buffer of the model
    assert model.blocks[0].attn.fused_decode.weights.gate_rows.shape == (97, 4 * (8 + 8))
    assert torch.equal(model(ids), logits)


@pytest.mark.parametrize("variant", ["mla", "egmla_latent"])
def test_fused_decode_refuses_layers_it_cannot_serve(variant):
    with pytest.raises(ValueError, match="gating the K/V content only"):
        small_model(variant).enable_fused_decode("table")


def test_triton_backend_refuses_odd_dimensions():
    if not kernels.triton_available():
        pytest.skip("triton is not installed")
    with pytest.raises(ValueError, match="powers of two >= 16; attention.qk_nope_head_dim=8"):
        model = small_model("egmla")
        model.blocks[0].attn.enable_fused_decode("table", model.gate_table(0), backend="triton")


# --- benchmark bookkeeping --------------------------------------------------------------------------------
def test_us_per_seq_layer_and_tokens_per_second():
    assert bench.us_per_seq_layer(step_ms=6.0, batch=32, n_layers=12) == pytest.approx(15.625)  # 6000 us / 384


def test_max_batch_in_budget_120m_at_16k():
    """By hand, bf16, 16,384 tokens, 40 GiB = 42,949,672,960 B: MHA keeps 12 x 2 x 768 x 2 B = 36,864 B per
    token (603,979,776 B per sequence: 71 fit); EG-MLA kv64 keeps 12 x (64 + 64) x 2 B of latent and RoPE key
    plus a 4 B token id = 3,076 B per token (50,397,184 B: 852 fit); MLA kv256 7,680 B (125,829,120 B: 341)."""

    def fits(*overrides):
        return bench.max_batch_in_budget(model_config(compose(["model=120m", *overrides])), 16384, 40.0)

    assert fits("attention=mha") == 71
    assert fits("attention=egmla") == 852
    assert fits("attention=mla") == 341
    assert fits("attention=egmla") >= 10 * fits("attention=mha")  # the target
    assert bench.max_batch_in_budget(model_config(compose(["model=120m", "attention=mha"])), 16384, 0.5) == 0


def test_expand_variants():
    assert bench.expand_variants(["mha", "egmla_fused"], "both") == ["mha", "egmla_fused", "egmla_fused_emb"]
    assert bench.expand_variants(["egmla_fused"], "embedding") == ["egmla_fused_emb"]
    assert bench.expand_variants(["egmla_fused"], "table") == ["egmla_fused"]


TINY = [
    *words(
        "--size tiny --set model.vocab_size=257 model.n_layers=2 --batch 2 "
        "--steps 1 --warmup 0 --prefill-chunk 16 --block-s 8"
    )
]
# KV bytes per token of the tiny model (2 layers, d_model 128, 4 heads; MLA kv 64, EG-MLA kv 16, RoPE 16),
# in fp32 (the CPU benchmark's dtype), by hand from the table in docs/paper.md.
TINY_KV_BYTES = {
    "mha": 2 * 2 * 128 * 4,
    "gqa": 2 * 2 * 2 * 32 * 4,
    "mqa": 2 * 2 * 32 * 4,
    "mla_absorbed": 2 * (64 + 16) * 4,
    "egmla_latent_absorbed": 2 * (16 + 16) * 4,
    "egmla": 2 * (16 + 16) * 4,
    "egmla_fused_reference": 2 * (16 + 16) * 4,
    "egmla_fused_emb_reference": 2 * (16 + 16) * 4,
}


def _rows(path):
    with open(path) as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_bench_decode_rows_every_variant(tmp_path, capsys):
    """Context 21 (prefill chunks of 16 + 5), a CPU run of every variant; at 0.01 GiB the budget fits 1,342
    sequences of 21 tokens of MHA's 4,096 B (and 10,000+ of EG-MLA), so the max-batch run is capped at 3."""
    out = tmp_path / "decode.csv"
    argv = [
        "decode",
        *TINY,
        *words("--context 21 --budget-gib 0.01 --max-batch-run 3 --variants"),
        *bench.DEFAULT_VARIANTS,
        "--csv",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "the fused kernel matches the unfused path" in printed and "x MHA" in printed
    columns, rows = _rows(out)
    assert (
        columns
        == bench.CSV_COLUMNS
        == [
            *words(
                "variant size context batch card cache_bytes_measured "
                "cache_bytes_analytic step_ms tok_per_s max_batch_in_budget budget_gib "
                "us_per_seq_layer date commit"
            )
        ]
    )
    assert [(r["variant"], r["batch"]) for r in rows] == [(v, b) for v in TINY_KV_BYTES for b in ("2", "3")]
    for r in rows:
        batch, step_ms = int(r["batch"]), float(r["step_ms"])
        expected = batch * 21 * TINY_KV_BYTES[r["variant"]]
        assert int(r["cache_bytes_measured"]) == int(r["cache_bytes_analytic"]) == expected
        assert float(r["us_per_seq_layer"]) == pytest.approx(step_ms * 1e3 / (batch * 2))
        assert float(r["tok_per_s"]) == pytest.approx(batch * 1e3 / step_ms)
        per_sequence = 21 * (
            TINY_KV_BYTES[r["variant"]] + (4 if "egmla_f" in r["variant"] or r["variant"] == "egmla" else 0)
        )
        assert int(r["max_batch_in_budget"]) == int(0.01 * 2**30) // per_sequence
        assert r["card"] == "cpu" and r["size"] == "tiny" and r["budget_gib"] == "0.01"


def test_bench_refuses_a_fused_result_that_does_not_match(tmp_path, monkeypatch, capsys):
    exact = reference.decode_attention
    monkeypatch.setattr(reference, "decode_attention", lambda *a, **k: exact(*a, **k) * 1.05)
    out = tmp_path / "decode.csv"
    argv = ["decode", *TINY, "--context", "12", "--variants", "egmla_fused", "--csv", str(out)]
    assert main(argv) == 1
    assert "does not match the unfused path" in capsys.readouterr().err
    assert not out.exists()


def test_bench_refuses_heads_per_program_that_does_not_divide_the_heads(tmp_path, capsys):
    out = tmp_path / "decode.csv"
    argv = ["decode", *TINY, *words("--context 12 --variants mha egmla_fused --heads-per-program 3 --csv"), str(out)]
    assert main(argv) == 2
    assert "--heads-per-program 3 must be a power of two dividing the model's 4 heads" in capsys.readouterr().err
    assert out.read_text().count("\n") == 2  # header and the mha row measured before the refusal are kept


def test_bench_refuses_cache_bytes_off_the_formula(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(accounting, "kv_bytes_per_token", lambda cfg, dtype="bf16": 1)
    out = tmp_path / "decode.csv"
    assert main(["decode", *TINY, "--context", "12", "--variants", "mqa", "--csv", str(out)]) == 1
    assert "measured cache bytes" in capsys.readouterr().err
    assert not out.exists()


# --- the Triton kernel under the interpreter (skipped where triton is not installed, as in CI) -------------
INTERPRETED = """
import torch
from conftest import small_model
from egmla.kernels import egmla_decode, reference

knobs = dict(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, gate_dim=16)
for variant in ({"variant": "egmla"}, {"variant": "egmla", "gate_kv": "shared", "gate_activation": "sigmoid",
                                        "gate_norm": "rmsnorm"}, {"variant": "egmla", "gate_norm": "none",
                                        "gate_activation": "silu", "gate_rope_key": True}):
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        model = small_model(variant | knobs).to(dtype)
        attn, table = model.blocks[0].attn, model.gate_table(0)
        for source in ("table", "embedding"):
            attn.enable_fused_decode(source, table, backend="triton")
            w = attn.fused_decode.weights
            torch.manual_seed(0)
            b, s, h = 3, 45, attn.n_heads
            q_nope, q_rope = torch.randn(b, h, 16).to(dtype), torch.randn(b, h, 16).to(dtype)
            latent = torch.randn(b, s + 3, 32).to(dtype)[:, :s]  # views of a longer cache, as in decoding
            k_rope = torch.randn(b, s + 3, 16).to(dtype)[:, :s]
            ids = torch.randint(0, 97, (b, s + 3), dtype=torch.int32)[:, :s]
            args = (q_nope, q_rope, latent, k_rope, ids, w)
            want = reference.decode_attention(*args).double()
            for block_s, split, heads in ((None, None, None), (16, None, 1), (16, 16, 2), (32, 64, 4)):
                got = egmla_decode.decode_attention(*args, block_s=block_s, split_tokens=split,
                                                    heads_per_program=heads).double()
                error = ((got - want).norm() / want.norm()).item()
                assert error < tolerance, (variant, dtype, source, block_s, split, heads, error)
try:
    egmla_decode.decode_attention(*args, heads_per_program=3)
    raise SystemExit("3 heads per program of 4 heads was not refused")
except ValueError as exc:
    assert "heads_per_program=3" in str(exc), exc
print("ok")
"""


@needs_triton
def test_triton_kernel_under_the_interpreter_matches_the_reference():
    run_under_triton_interpreter(INTERPRETED, timeout=300)


def test_zipf_ids_are_text_like_and_in_range():
    """--ids zipf: P(id) ~ 1 / (id + 1) over GPT-2's vocabulary: the 500 lowest ids (1%) carry about
    H(500) / H(50,257) = 6.79 / 11.4 = 60% of the tokens (uniform: 1%); every id is valid; seeded."""
    vocab, n = 50257, 200_000
    ids = bench.sample_ids(vocab, (4, n // 4), "zipf", torch.Generator().manual_seed(0), "cpu")
    assert ids.shape == (4, n // 4) and ids.min() >= 0 and ids.max() < vocab
    assert (ids < 500).float().mean().item() == pytest.approx(6.793 / 11.402, abs=0.01)
    again = bench.sample_ids(vocab, (4, n // 4), "zipf", torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(ids, again)
    uniform = bench.sample_ids(vocab, (n,), "uniform", torch.Generator().manual_seed(0), "cpu")
    assert (uniform < 500).float().mean().item() == pytest.approx(500 / vocab, abs=0.003)


def test_bench_decode_with_zipf_ids(tmp_path):
    out = tmp_path / "decode.csv"
    argv = ["decode", *TINY, *words("--context 21 --ids zipf --variants egmla egmla_fused --csv"), str(out)]
    assert main(argv) == 0
    _, rows = _rows(out)
    assert [r["variant"] for r in rows] == ["egmla", "egmla_fused_reference", "egmla_fused_emb_reference"]
