"""Typed model configuration with validation at construction.

Hyper-parameters live in conf/ (Hydra); code receives these dataclasses. Every inconsistent value raises a
`ConfigError` whose one-line message names the key, the value and what would be valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..kernels import is_power_of_two

VARIANTS = ("mha", "gqa", "mqa", "mla", "egmla")
GATE_ON = ("content", "latent")
GATE_ACTIVATIONS = ("none", "sigmoid", "silu")
GATE_NORMS = ("layernorm", "rmsnorm", "none")
GATE_KV = ("separate", "shared")
GATE_COMBINE = ("multiply", "add")
GATE_INIT = ("normal", "identity")
GATE_NORM_SCOPE = ("head", "vector")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key, the value and what is valid."""


def error_summary(exc: BaseException, limit: int = 160) -> str:
    """'Type: first line of the message', at most `limit` characters: a foreign error inside a one-line one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reject(key: str, value: Any, valid: str) -> None:
    """Raise the one-line ConfigError for a bad value: the key, the value and what is valid."""
    raise ConfigError(f"{key}={value!r} is invalid: {valid}")


def check_int(key: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        reject(key, value, f"expected an integer >= {minimum}")


def check_positive_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        reject(key, value, "expected a positive integer")


def check_choice(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        reject(key, value, f"expected one of {', '.join(valid)}")


@dataclass
class AttentionConfig:
    """One attention variant and its knobs. Fields irrelevant to the chosen variant are ignored.

    variant: mha | gqa | mqa (one implementation with n_kv_heads) | mla | egmla.
    head_dim: MHA/GQA/MQA head width (None: d_model // n_heads).
    n_kv_heads: GQA key/value heads (mha forces n_heads, mqa forces 1).
    kv_lora_rank, q_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim: MLA as in DeepSeek-V2.
    absorb: decode MLA by weight absorption (W_uk folded into the query, W_uv into the output) instead of
        re-expanding K/V from the cached latent. Only MLA and EG-MLA gating the latent can absorb.
    gate_*: EG-MLA's embedding gate; the open choices of the paper with their defaults, and two controls:
        gate_combine=add (the gate added to, not multiplied with, what it gates: same parameters) and
        gate_init=identity (the gate starts as the combine's identity: 1 for multiply, 0 for add).
    fused_expand: EG-MLA gating the content, full forwards (training, evaluation) on a CUDA GPU: gate, normalise
        and expand K/V in one Triton kernel (egmla.kernels.gated_expand) instead of separate matmuls and
        elementwise passes. Same function; dimensions must be powers of two >= 16. Ignored by the other
        variants, so that one setting can serve a sweep or benchmark over all of them. Off by default: it saves
        memory but trains slower in the model (experiments/throughput/README.md, "EG-MLA's fused expansion").
    """

    variant: str = "mha"
    head_dim: int | None = None
    n_kv_heads: int | None = None
    kv_lora_rank: int = 256
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 64
    v_head_dim: int = 64
    absorb: bool = False
    gate_enabled: bool = True  # egmla with the gate off is exactly mla (same parameters, same function)
    gate_dim: int = 256  # width of each per-layer token-embedding table
    gate_on: str = "content"  # content: gate W_ukv c_kv (paper's most likely reading) | latent: gate c_kv
    gate_activation: str = "none"  # none | sigmoid | silu, applied to W_ue e
    gate_norm: str = "layernorm"  # layernorm | rmsnorm | none, per head after gating (over d_c for latent)
    gate_kv: str = "separate"  # separate gates for k_nope and v, or one shared (needs nope == v dims)
    gate_rope_key: bool = False  # also gate the (pre-RoPE) decoupled key
    gate_group_size: int = 1  # adjacent layers sharing one embedding table
    gate_combine: str = "multiply"  # multiply: Norm(W_ukv c_kv * g) | add: Norm(W_ukv c_kv + g) (same parameters)
    gate_init: str = "normal"  # normal: g ~ unit scale | identity: g == 1 (multiply) or 0 (add) at init
    gate_norm_scope: str = "head"  # head: norm per head | vector: one norm over all heads' K, one over V
    fused_expand: bool = False  # EG-MLA gating the content: one Triton kernel for gate, norm and K/V expansion


@dataclass
class ModelConfig:
    """A decoder-only transformer: pre-norm RMSNorm, SwiGLU MLP, RoPE, optional tied embeddings."""

    vocab_size: int = 50257
    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    ffn_hidden: int = 2048
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    attention: AttentionConfig = field(default_factory=AttentionConfig)

    def __post_init__(self) -> None:
        if isinstance(self.attention, dict):
            self.attention = attention_from_dict(self.attention)
        self.validate()

    # --- derived dimensions -------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        """Key/value heads of the MHA/GQA/MQA family."""
        a = self.attention
        if a.variant == "mha":
            return self.n_heads
        if a.variant == "mqa":
            return 1
        return a.n_kv_heads if a.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.attention.head_dim or self.d_model // self.n_heads

    @property
    def is_latent(self) -> bool:
        return self.attention.variant in ("mla", "egmla")

    @property
    def has_gate(self) -> bool:
        return self.attention.variant == "egmla" and self.attention.gate_enabled

    @property
    def gate_width(self) -> int:
        """Width of EG-MLA's gate on what it multiplies: the K/V content (both, or one shared) or the latent."""
        a = self.attention
        if a.gate_on == "latent":
            return a.kv_lora_rank
        if a.gate_kv == "shared":
            return self.n_heads * a.qk_nope_head_dim
        return self.n_heads * (a.qk_nope_head_dim + a.v_head_dim)

    @property
    def keeps_ids(self) -> bool:
        """EG-MLA gating the content recomputes its gate from the context's token ids at every decode step."""
        return self.has_gate and self.attention.gate_on == "content"

    @property
    def vector_norm(self) -> bool:
        """EG-MLA normalises the gated K (and V) content as one vector over all heads (ignored on the latent)."""
        a = self.attention
        return self.has_gate and a.gate_on == "content" and a.gate_norm != "none" and a.gate_norm_scope == "vector"

    @property
    def n_gate_tables(self) -> int:
        return -(-self.n_layers // self.attention.gate_group_size) if self.has_gate else 0

    # --- validation ---------------------------------------------------------------------------------
    def validate(self) -> None:
        for key in ("vocab_size", "n_layers", "d_model", "n_heads", "ffn_hidden", "max_seq_len"):
            check_positive_int(f"model.{key}", getattr(self, key))
        if self.d_model % self.n_heads:
            reject("model.n_heads", self.n_heads, f"must divide model.d_model={self.d_model}")
        if self.rope_theta <= 0:
            reject("model.rope_theta", self.rope_theta, "expected a positive number")
        if not 0 < self.norm_eps < 1:
            reject("model.norm_eps", self.norm_eps, "expected a small positive number such as 1e-6")
        if self.init_std <= 0:
            reject("model.init_std", self.init_std, "expected a positive number such as 0.02")
        a = self.attention
        check_choice("attention.variant", a.variant, VARIANTS)
        if a.variant in ("mha", "gqa", "mqa"):
            self._validate_mha_family()
        else:
            self._validate_latent()

    def _validate_mha_family(self) -> None:
        a = self.attention
        if a.head_dim is not None:
            check_positive_int("attention.head_dim", a.head_dim)
        if self.head_dim % 2:
            reject("attention.head_dim", self.head_dim, "RoPE needs an even head dimension")
        if a.absorb:
            reject("attention.absorb", a.absorb, "weight absorption exists only for mla and egmla (gate_on=latent)")
        if a.variant == "gqa":
            if a.n_kv_heads is None:
                reject("attention.n_kv_heads", None, f"gqa needs a positive divisor of model.n_heads={self.n_heads}")
            check_positive_int("attention.n_kv_heads", a.n_kv_heads)
            if self.n_heads % a.n_kv_heads:
                reject("attention.n_kv_heads", a.n_kv_heads, f"must divide model.n_heads={self.n_heads}")

    def _validate_latent(self) -> None:
        a = self.attention
        check_positive_int("attention.kv_lora_rank", a.kv_lora_rank)
        if a.kv_lora_rank > self.d_model:
            reject("attention.kv_lora_rank", a.kv_lora_rank, f"must be in [1, model.d_model={self.d_model}]")
        if a.q_lora_rank is not None:
            check_positive_int("attention.q_lora_rank", a.q_lora_rank)
        for key in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            check_positive_int(f"attention.{key}", getattr(a, key))
        if a.qk_rope_head_dim % 2:
            reject("attention.qk_rope_head_dim", a.qk_rope_head_dim, "RoPE needs an even dimension")
        if a.variant == "mla" or not a.gate_enabled:
            return  # plain MLA: nothing gate-related to check, and absorption is allowed
        check_positive_int("attention.gate_dim", a.gate_dim)
        check_choice("attention.gate_on", a.gate_on, GATE_ON)
        check_choice("attention.gate_activation", a.gate_activation, GATE_ACTIVATIONS)
        check_choice("attention.gate_norm", a.gate_norm, GATE_NORMS)
        check_choice("attention.gate_kv", a.gate_kv, GATE_KV)
        check_choice("attention.gate_combine", a.gate_combine, GATE_COMBINE)
        check_choice("attention.gate_init", a.gate_init, GATE_INIT)
        check_choice("attention.gate_norm_scope", a.gate_norm_scope, GATE_NORM_SCOPE)
        if a.gate_init == "identity" and a.gate_activation == "sigmoid":
            reject(
                "attention.gate_init",
                a.gate_init,
                "a sigmoid gate never reaches the identity (1 for multiply, 0 for add); "
                "use gate_activation=none or silu, or gate_init=normal",
            )
        check_positive_int("attention.gate_group_size", a.gate_group_size)
        if a.gate_group_size > self.n_layers:
            reject("attention.gate_group_size", a.gate_group_size, f"must be in [1, model.n_layers={self.n_layers}]")
        if a.gate_kv == "shared" and a.gate_on == "content" and a.qk_nope_head_dim != a.v_head_dim:
            reject(
                "attention.gate_kv",
                a.gate_kv,
                f"a shared K/V gate needs qk_nope_head_dim ({a.qk_nope_head_dim}) == v_head_dim "
                f"({a.v_head_dim}); use separate",
            )
        if a.fused_expand and a.gate_on == "content":
            off = "set fused_expand=false"
            if a.gate_combine != "multiply":
                reject("attention.gate_combine", a.gate_combine, f"fused_expand multiplies the gate; {off}")
            if self.vector_norm:
                reject("attention.gate_norm_scope", a.gate_norm_scope, f"fused_expand norms per head; {off}")
            for key in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank", "gate_dim"):
                value = getattr(a, key)
                if not is_power_of_two(value, 16):
                    reject(
                        f"attention.{key}", value, "fused_expand needs powers of two >= 16; or set fused_expand=false"
                    )
        if a.absorb and a.gate_on == "content":
            reject(
                "attention.absorb",
                a.absorb,
                "gating the K/V content blocks weight absorption; use attention.gate_on=latent or absorb=false",
            )


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix}.{key} is not a known key: expected one of {', '.join(sorted(known))}")
    return dict(data)


def attention_from_dict(data: dict[str, Any]) -> AttentionConfig:
    """Build an AttentionConfig from a plain mapping; unknown keys fail with the list of known ones."""
    return AttentionConfig(**_from_dict(AttentionConfig, data, "attention"))


def model_config_from_dicts(model: dict[str, Any], attention: dict[str, Any]) -> ModelConfig:
    """Build and validate a ModelConfig from the `model` and `attention` config groups.

    Keys a config group carries for other consumers (`name`, and `attention_defaults` that conf/attention
    interpolates from) are dropped here.
    """
    model = {k: v for k, v in model.items() if k not in ("name", "attention_defaults")}
    attention = {k: v for k, v in attention.items() if k != "name"}
    return ModelConfig(**_from_dict(ModelConfig, model, "model"), attention=attention_from_dict(attention))
