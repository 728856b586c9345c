"""Our attention modules against independent implementations from Hugging Face `transformers`.

The other tests check that our variants agree with each other (GQA with all heads is MHA, absorbed decode is
expanded decode, ...); that cannot catch a mistake that all of them share, such as a wrong RoPE layout, a
wrong softmax scale, a transposed head split or a misplaced norm. Here each module is compared, given the
same weights, against code we did not write:

* MLA (`LatentAttention`, variant "mla", with and without the low-rank query) against `DeepseekV3Attention`
  with `rope_interleave=False` (our RoPE is the rotate-half layout), default RoPE (no YaRN, so the softmax
  scale is 1/sqrt(qk_nope + qk_rope)), no biases, eager attention and an explicit causal mask. The weight
  map is q_proj -> wq | q_a_proj, q_a_layernorm, q_b_proj -> wq_a, q_norm, wq_b; kv_a_proj_with_mqa ->
  wkv_a; kv_a_layernorm -> kv_norm; kv_b_proj -> wkv_b; o_proj -> wo, and it must cover every parameter of
  both modules. The cached decode path (plain and weight-absorbed), fed prefill, a chunk and single tokens,
  must reproduce the reference's full-sequence output as well.
* MHA / GQA / MQA (`GroupedQueryAttention`) against `LlamaAttention` with num_key_value_heads = our KV heads
  and the same head_dim and rope_theta (q/k/v/o_proj -> wq/wk/wv/wo).

Weights are redrawn at unit scale (Linear ~ N(0, 1/fan_in), norm gains ~ 1 + N(0, 0.01)) so that outputs
and attention logits are O(1): the default 0.02 init makes the softmax nearly uniform and the outputs tiny,
which would let an absolute tolerance pass almost anything. Everything runs in float64 on CPU, offline
(modules are built from configs, nothing is downloaded). The reference computes its RMSNorm and softmax in
float32 (observed error ~3e-7), hence tolerances of 1e-5 rather than float64 round-off; perturbing any one
copied weight element by 1e-3 fails every test that uses it.
"""

from __future__ import annotations

import pytest
import torch
import transformers.models.deepseek_v3.modeling_deepseek_v3 as deepseek
import transformers.models.llama.modeling_llama as llama
from torch import nn

from egmla.model import AttentionConfig, LayerCache, ModelConfig, Transformer

DTYPE = torch.float64
B, T = 2, 7
D_MODEL, N_HEADS, VOCAB, MAX_LEN = 64, 4, 97, 32
THETA = 5000.0  # not the default 10000, so a theta that failed to reach either side would show
EPS = 1e-6  # transformers builds DeepSeek's q_a/kv_a norms with eps 1e-6 whatever rms_norm_eps says
TOL = dict(rtol=1e-5, atol=1e-5)


def _rope_kwargs() -> dict:
    """rope_theta as transformers >= 5 takes it."""
    return {"rope_parameters": {"rope_type": "default", "rope_theta": THETA}}


def _randomize(module: nn.Module, seed: int = 0) -> None:
    """Unit-scale weights: matrices ~ N(0, 1/fan_in), vectors (norm gains) ~ 1 + N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            p.copy_(noise * p.shape[1] ** -0.5 if p.ndim == 2 else 1 + 0.1 * noise)


def _copy_weights(ours: nn.Module, ref: nn.Module, names: dict[str, str]) -> None:
    """Copy our parameters onto the reference's; the map must cover both modules' parameters exactly."""
    ours_p, ref_p = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert set(names) == set(ours_p), f"unmapped: {set(ours_p) ^ set(names)}"
    assert set(names.values()) == set(ref_p), f"unmapped reference: {set(ref_p) ^ set(names.values())}"
    with torch.no_grad():
        for a, b in names.items():
            assert ours_p[a].shape == ref_p[b].shape, f"{a} {list(ours_p[a].shape)} vs {b} {list(ref_p[b].shape)}"
            ref_p[b].copy_(ours_p[a])


def _causal_mask(t: int) -> torch.Tensor:
    """The additive mask eager attention adds to the logits: 0 on and below the diagonal, -inf above."""
    allowed = torch.ones(t, t, dtype=torch.bool).tril()
    return torch.zeros(t, t, dtype=DTYPE).masked_fill(~allowed, float("-inf")).expand(B, 1, t, t)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D_MODEL, generator=gen, dtype=DTYPE)
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    positions = torch.arange(T).expand(B, T)
    return x, ids, positions


def _our_attention(attention: AttentionConfig) -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        n_layers=1,
        d_model=D_MODEL,
        n_heads=N_HEADS,
        ffn_hidden=32,
        max_seq_len=MAX_LEN,
        rope_theta=THETA,
        norm_eps=EPS,
        attention=attention,
    )
    attn = Transformer(cfg).to(DTYPE).eval().blocks[0].attn
    _randomize(attn)
    return attn


def _assert_meaningful(out: torch.Tensor) -> None:
    """Guard against a vacuous comparison: the outputs are O(1), far above the tolerance."""
    assert out.std() > 0.1, f"output std {out.std():.3g} is too small for atol {TOL['atol']} to mean anything"


# --- MLA vs DeepseekV3Attention -------------------------------------------------------------------------


def _mla_pair(q_lora_rank: int | None, absorb: bool = False):
    attention = AttentionConfig(
        variant="mla",
        kv_lora_rank=32,
        q_lora_rank=q_lora_rank,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,  # != qk_nope_head_dim, so swapping the K/V split of wkv_b would show
        absorb=absorb,
    )
    ours = _our_attention(attention)
    config = deepseek.DeepseekV3Config(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_HEADS,
        kv_lora_rank=attention.kv_lora_rank,
        q_lora_rank=q_lora_rank,
        qk_nope_head_dim=attention.qk_nope_head_dim,
        qk_rope_head_dim=attention.qk_rope_head_dim,
        v_head_dim=attention.v_head_dim,
        max_position_embeddings=MAX_LEN,
        rms_norm_eps=EPS,
        rope_interleave=False,
        attention_bias=False,
        attention_dropout=0.0,
        attn_implementation="eager",
        **_rope_kwargs(),
    )
    ref = deepseek.DeepseekV3Attention(config, layer_idx=0).to(DTYPE).eval()
    names = {"wkv_a.weight": "kv_a_proj_with_mqa.weight", "kv_norm.weight": "kv_a_layernorm.weight"}
    names |= {"wkv_b.weight": "kv_b_proj.weight", "wo.weight": "o_proj.weight"}
    if q_lora_rank is None:
        names["wq.weight"] = "q_proj.weight"
    else:
        names |= {"wq_a.weight": "q_a_proj.weight", "q_norm.weight": "q_a_layernorm.weight"}
        names["wq_b.weight"] = "q_b_proj.weight"
    _copy_weights(ours, ref, names)

    norms = [(ours.kv_norm, ref.kv_a_layernorm)]
    if q_lora_rank is not None:
        norms.append((ours.q_norm, ref.q_a_layernorm))
    for our_norm, ref_norm in norms:
        assert our_norm.eps == ref_norm.variance_epsilon == config.rms_norm_eps
    assert ours.scale == pytest.approx(ref.scaling)
    return ours, ref, config


def _mla_reference(ref, config, x, positions) -> torch.Tensor:
    cos, sin = deepseek.DeepseekV3RotaryEmbedding(config)(x, positions)
    with torch.no_grad():
        out, _ = ref(x, (cos, sin), _causal_mask(x.shape[1]))
    return out


@pytest.mark.parametrize("q_lora_rank", [None, 24], ids=["q_full", "q_lora"])
def test_mla_matches_deepseek_v3_attention(q_lora_rank):
    ours, ref, config = _mla_pair(q_lora_rank)
    x, ids, positions = _inputs()

    # The RoPE tables first: a mismatch here localises a failure of the full comparison below.
    cos, sin = deepseek.DeepseekV3RotaryEmbedding(config)(x, positions)
    torch.testing.assert_close(ours.rotary.cos[:T].expand(B, T, -1), cos, rtol=0, atol=0)
    torch.testing.assert_close(ours.rotary.sin[:T].expand(B, T, -1), sin, rtol=0, atol=0)

    expected = _mla_reference(ref, config, x, positions)
    with torch.no_grad():
        out = ours(x, ids)
    _assert_meaningful(expected)
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("absorb", [False, True], ids=["expanded", "absorbed"])
@pytest.mark.parametrize("q_lora_rank", [None, 24], ids=["q_full", "q_lora"])
def test_mla_cached_decode_matches_deepseek_v3_attention(q_lora_rank, absorb):
    """Prefill 3 tokens, then a chunk of 2, then single tokens through a LayerCache, with absorb on or off:
    the concatenated outputs are the reference's output for the whole sequence."""
    ours, ref, config = _mla_pair(q_lora_rank, absorb=absorb)
    assert ours.absorb is absorb
    x, ids, positions = _inputs()
    expected = _mla_reference(ref, config, x, positions)

    cache = LayerCache(ours.cache_spec(), B, T, DTYPE, x.device)
    spans = [(0, 3), (3, 5), (5, 6), (6, 7)]
    with torch.no_grad():
        out = torch.cat([ours(x[:, a:b], ids[:, a:b], a, cache, ids[:, :b]) for a, b in spans], dim=1)
    torch.testing.assert_close(out, expected, **TOL)


# --- MHA / GQA / MQA vs LlamaAttention ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "n_kv_heads", "head_dim"),
    [("mha", None, None), ("gqa", 2, None), ("gqa", 1, None), ("mqa", None, None), ("gqa", 2, 24)],
    ids=["mha", "gqa2", "gqa1", "mqa", "gqa2_head24"],
)
def test_gqa_matches_llama_attention(variant, n_kv_heads, head_dim):
    ours = _our_attention(AttentionConfig(variant=variant, n_kv_heads=n_kv_heads, head_dim=head_dim))
    expected_kv = {"mha": N_HEADS, "mqa": 1}.get(variant, n_kv_heads)
    assert ours.n_kv_heads == expected_kv
    assert ours.head_dim == (head_dim or D_MODEL // N_HEADS)
    config = llama.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        intermediate_size=32,
        num_attention_heads=N_HEADS,
        num_key_value_heads=ours.n_kv_heads,
        head_dim=ours.head_dim,
        max_position_embeddings=MAX_LEN,
        attention_bias=False,
        attention_dropout=0.0,
        attn_implementation="eager",
        **_rope_kwargs(),
    )
    ref = llama.LlamaAttention(config, layer_idx=0).to(DTYPE).eval()
    names = {f"w{n}.weight": f"{n}_proj.weight" for n in ("q", "k", "v", "o")}
    _copy_weights(ours, ref, names)

    x, ids, positions = _inputs()
    cos, sin = llama.LlamaRotaryEmbedding(config)(x, positions)
    torch.testing.assert_close(ours.rotary.cos[:T].expand(B, T, -1), cos, rtol=0, atol=0)
    with torch.no_grad():
        expected, _ = ref(x, (cos, sin), _causal_mask(T))
        out = ours(x, ids)
    _assert_meaningful(expected)
    torch.testing.assert_close(out, expected, **TOL)
