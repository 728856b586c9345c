"""A decoder-only transformer whose attention is any of the variants; ids reach every attention layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import LaunchOptions
from .attention import LatentAttention, build_attention
from .cache import DecodeCache, LayerCache
from .config import ModelConfig
from .layers import RMSNorm, Rotary, SwiGLU
from .loss import linear_cross_entropy, padded_vocab
from .sampling import sample_next_token


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = build_attention(cfg, rotary)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x, ids, start=0, cache=None, context_ids=None, gate_table=None):
        x = x + self.attn(self.attn_norm(x), ids, start, cache, context_ids, gate_table)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        a = cfg.attention
        rotary = Rotary(a.qk_rope_head_dim if cfg.is_latent else cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # EG-MLA's per-layer token tables live here, not in the blocks, so adjacent layers can share one.
        self.gate_tables = nn.ModuleList(nn.Embedding(cfg.vocab_size, a.gate_dim) for _ in range(cfg.n_gate_tables))
        self.blocks = nn.ModuleList(Block(cfg, rotary) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.compile_loss = False  # torch.compile the fused loss's per-chunk work (set by fsdp.prepare_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, init_std), residual output projections scaled by 1/sqrt(2 * n_layers).

        Gate tables are N(0, 1) and their up-projection N(0, 1/gate_dim), so g = W_ue e starts at unit scale;
        with gate_init=identity the tables' first column is 1 and g starts as the combine's identity (1 or 0).
        """
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo", "w_down")) else 1.0
                if name.endswith("gate.up"):
                    nn.init.normal_(module.weight, std=module.in_features**-0.5)
                else:
                    nn.init.normal_(module.weight, std=std * scale)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=1.0 if name.startswith("gate_tables") else std)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        if self.cfg.has_gate and self.cfg.attention.gate_init == "identity":
            for table in self.gate_tables:
                table.weight[:, 0] = 1.0
            for block in self.blocks:
                block.attn.gate.init_identity_()

    def gate_table(self, layer: int) -> nn.Embedding | None:
        return self.gate_tables[layer // self.cfg.attention.gate_group_size] if self.cfg.has_gate else None

    def forward(
        self,
        ids: torch.Tensor,
        cache: DecodeCache | None = None,
        targets: torch.Tensor | None = None,
        reduction: str = "mean",
        last_only: bool = False,
    ) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, vocab]. With a cache, ids continue the cached context.

        With targets [B, T] (-100: ignored), the fp32 cross-entropy loss instead, `reduction` "mean", "sum" or
        "none" (each target's, [B, T], without gradients), fused with the output head (egmla.model.loss): the full
        logits never exist. With last_only, the logits
        of the last position alone [B, 1, vocab]: what prefilling a prompt needs (a 16K-token prompt's full
        logits would be 1.6 GB per sequence in bf16)."""
        if targets is not None and cache is not None:
            raise ValueError("targets and a decode cache were both given: the loss is for full sequences, drop one")
        if targets is not None and last_only:
            raise ValueError("targets and last_only were both given: the loss needs every position, drop one")
        start = cache.length if cache is not None else 0
        context_ids = None
        if cache is not None:
            end = start + ids.shape[1]
            if end > cache.capacity:
                raise ValueError(f"decode cache holds {cache.capacity} tokens; {end} were asked for")
            if cache.ids is not None:
                cache.ids[:, start:end] = ids
                context_ids = cache.ids[:, :end]
        x = self.embed(ids)
        for i, block in enumerate(self.blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            x = block(x, ids, start, layer_cache, context_ids, self.gate_table(i))
        if cache is not None:
            cache.length = start + ids.shape[1]
        if targets is not None:
            return linear_cross_entropy(
                self.norm(x), self.lm_head.weight, targets, reduction, compile=self.compile_loss
            )
        return self.output_head(self.norm(x[:, -1:] if last_only else x))

    def enable_fused_decode(
        self, gate_source: str | None, backend: str = "auto", launch: LaunchOptions | None = None
    ) -> str | None:
        """Switch every EG-MLA layer to the fused decode (egmla.kernels; None switches back); returns the backend
        used. Call it after moving the model to its device and dtype: the gate table is built where the weights are.
        """
        layers = [(i, b.attn) for i, b in enumerate(self.blocks) if isinstance(b.attn, LatentAttention)]
        if gate_source is None:
            for _, attn in layers:
                attn.enable_fused_decode(None)
            return None
        if not layers:
            raise ValueError("the fused decode serves EG-MLA gating the K/V content only; this model has no such layer")
        for i, attn in layers:
            attn.enable_fused_decode(gate_source, self.gate_table(i), backend, launch)
        return layers[0][1].fused_decode.backend

    def output_head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [..., vocab_size]. The weight gets zero rows for the matmul where padded_vocab says so (a large
        vocabulary, to a multiple of 64), sliced off after."""
        vocab = self.cfg.vocab_size
        rows = padded_vocab(vocab, h.numel() // h.shape[-1])
        if rows == vocab:
            return self.lm_head(h)
        weight = F.pad(self.lm_head.weight, (0, 0, 0, rows - vocab))
        return F.linear(h, weight)[..., :vocab]

    def new_cache(self, batch: int, capacity: int, dtype=None, device=None) -> DecodeCache:
        """An empty decode cache for `capacity` tokens, in the model's dtype and device by default."""
        weight = self.embed.weight
        dtype, device = dtype or weight.dtype, device or weight.device
        layers = [LayerCache(b.attn.cache_spec(), batch, capacity, dtype, device) for b in self.blocks]
        return DecodeCache(layers, batch, capacity, self.cfg.keeps_ids, device)

    @torch.no_grad()
    def generate(
        self, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None
    ) -> torch.Tensor:
        """Continue ids [B, T] by max_new_tokens using the decode cache; greedy at temperature 0.

        Returns [B, T + max_new_tokens].
        """
        if max_new_tokens <= 0:
            return ids
        cache = self.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
        logits = self(ids, cache, last_only=True)[:, -1]
        out = [ids]
        for step in range(max_new_tokens):
            next_id = sample_next_token(logits, temperature, top_k)[:, None]
            out.append(next_id)
            if step + 1 < max_new_tokens:
                logits = self(next_id, cache)[:, -1]
        return torch.cat(out, dim=1)
