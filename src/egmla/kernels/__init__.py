"""Fused decode for EG-MLA gating the K/V content: one new token attends over the cached latent without
writing the expanded K/V (egmla_decode.py, Triton), and the same algorithm in PyTorch (reference.py).

    model = build_model(cfg).to(device, dtype)
    model.enable_fused_decode("table")      # or "embedding"; None turns it off; backend=..., launch=LaunchOptions()
    model(next_ids, cache)                  # decode steps (T == 1) now use the fused path

Each such layer then holds one FusedDecode: the gate source, the backend, the layer's weights as the kernel
reads them (DecodeWeights, handed out by the layer's decode_weights) and the launch options. This package
imports nothing of egmla outside it: the model imports it, never the reverse.

Gate sources: "table" precomputes G = act(W_ue E) for the whole vocabulary once per layer (vocab x
n_h * (d_nope + d_v) per layer, reported apart from the KV cache) and gathers its rows by token id; "embedding"
gathers E's rows and recomputes the gate inside the kernel. Backends: "triton" (GPU, or the CPU interpreter
under TRITON_INTERPRET=1), "reference" (PyTorch, any device), "auto" (triton on CUDA when importable, else
reference). Triton is imported only when its backend runs. Both serve the multiplicative gate with per-head
norms (gate_combine=multiply, gate_norm_scope=head); the layer refuses the others.

For training, gated_expand.py fuses EG-MLA's gate, per-head norms and K/V expansion of full forwards into one
Triton kernel (forward and backward); LatentAttention uses it with attention.fused_expand=true.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass

import torch

from . import reference
from .reference import DecodeWeights

GATE_SOURCES = ("table", "embedding")
BACKENDS = ("auto", "triton", "reference")
FALLBACK = "decode with the unfused path (do not enable the fused decode)"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _check_choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{key}={value!r} is invalid: expected one of {', '.join(valid)}")


def is_power_of_two(value: int, minimum: int = 1) -> bool:
    """value is a power of two >= minimum (Triton tiles need such widths)."""
    return value >= minimum and not value & (value - 1)


def resolve_backend(backend: str, device: torch.device) -> str:
    _check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    return backend


def check_heads_per_program(heads: int, n_heads: int, label: str) -> None:
    """Raise a one-line ValueError unless `heads` (the kernel's heads per program) is a power of two dividing
    n_heads; `label` names the setting in the message."""
    if n_heads % heads or not is_power_of_two(heads):
        raise ValueError(f"{label} must be a power of two dividing the model's {n_heads} heads")


def check_triton(w: DecodeWeights, gate_source: str) -> None:
    """Raise a one-line ValueError when the Triton backend cannot serve these weights (the message names the
    model's config key of a width the kernel's tiles cannot take)."""
    if not triton_available():
        raise ValueError(f"the Triton backend needs triton installed; use backend='reference' or {FALLBACK}")
    dims = {
        "qk_nope_head_dim": w.d_nope,
        "v_head_dim": w.d_v,
        "qk_rope_head_dim": w.d_rope,
        "kv_lora_rank": w.w_ukv.shape[2],
    }
    if gate_source == "embedding":
        dims["gate_dim"] = w.embedding.shape[1]
    for key, value in dims.items():
        if not is_power_of_two(value, 16):
            raise ValueError(f"the Triton fused decode needs powers of two >= 16; attention.{key}={value}: {FALLBACK}")
    if w.w_ukv.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton backend runs on CUDA (or on CPU under TRITON_INTERPRET=1); {FALLBACK}")


@torch.no_grad()
def build_gate_rows(w: DecodeWeights, chunk: int = 8192) -> torch.Tensor:
    """G = act(W_ue E) for every vocabulary row [V, gate width], in the weights' dtype (RoPE-key gate left out:
    it is applied before caching)."""
    table = w.embedding
    rows = torch.empty(table.shape[0], w.gate_width, dtype=table.dtype, device=table.device)
    for i in range(0, table.shape[0], chunk):
        rows[i : i + chunk] = reference.gate_from_embedding(table[i : i + chunk], w, table.dtype)
    return rows


@dataclass(frozen=True)
class LaunchOptions:
    """How the fused decode runs; None: the default. block_s: context tokens per tile (Triton: by gate source;
    reference: 32); split_tokens: tokens per split (Triton: a heuristic; reference: one split); num_warps,
    num_stages, heads_per_program: the Triton launch (by gate source; the reference ignores them)."""

    block_s: int | None = None
    split_tokens: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    heads_per_program: int | None = None


class FusedDecode:
    """One layer's fused decode: gate source, backend, weights as the kernel reads them, launch options.

    weights come from the layer (views of its parameters plus, for the table source, the gate table built here
    once); `backend` "auto" resolves on the weights' device. Called with one new token's queries per sequence
    and the cache: fused(q_nope [B, H, d_nope], q_rope [B, H, d_rope], latent [B, S, d_c], k_rope [B, S, d_rope],
    ids [B, S]) -> the attention output [B, H, d_v].
    """

    def __init__(
        self, weights: DecodeWeights, gate_source: str, backend: str = "auto", launch: LaunchOptions | None = None
    ):
        _check_choice("gate_source", gate_source, GATE_SOURCES)
        self.backend = resolve_backend(backend, weights.w_ukv.device)
        self.launch = launch or LaunchOptions()
        if self.backend == "triton":
            check_triton(weights, gate_source)
        heads = self.launch.heads_per_program
        if heads:
            check_heads_per_program(heads, weights.n_heads, f"fused EG-MLA decode: heads_per_program={heads}")
        if gate_source == "table":
            weights = dataclasses.replace(weights, gate_rows=build_gate_rows(weights), embedding=None, w_ue=None)
        self.gate_source, self.weights = gate_source, weights
        if self.backend == "triton":  # the launch keywords, fixed per layer (not rebuilt every decode step)
            self._options = dataclasses.asdict(self.launch)
        else:
            self._options = {"block_s": self.launch.block_s or 32, "split_tokens": self.launch.split_tokens}

    @property
    def table_bytes(self) -> int:
        """Bytes of the per-vocabulary gate table (0 for the embedding source)."""
        rows = self.weights.gate_rows
        return 0 if rows is None else rows.numel() * rows.element_size()

    def __call__(self, q_nope, q_rope, latent, k_rope, ids) -> torch.Tensor:
        if self.backend == "triton":
            from . import egmla_decode  # imports triton

            return egmla_decode.decode_attention(q_nope, q_rope, latent, k_rope, ids, self.weights, **self._options)
        return reference.decode_attention(q_nope, q_rope, latent, k_rope, ids, self.weights, **self._options)

    def __repr__(self) -> str:
        return f"FusedDecode(gate_source={self.gate_source!r}, backend={self.backend!r}, launch={self.launch})"
