"""Decode caches. Each layer's cache holds exactly the tensors that the KV formula counts, nothing expanded.

MHA/GQA/MQA: per-KV-head keys and values. MLA/EG-MLA: the latent and the shared RoPE key.
EG-MLA gating the K/V content must recompute its gate for every context token at each step, so the model
cache also keeps the context's token ids (int32, one per token for all layers), counted apart from KV.
"""

from __future__ import annotations

import torch


class LayerCache:
    """Preallocated buffers [batch, *lead, capacity, dim] for one layer, filled along dim -2."""

    def __init__(self, spec: dict[str, tuple[int, ...]], batch: int, capacity: int, dtype, device):
        # spec: name -> (*lead, dim), e.g. {"k": (n_kv, d_head), "v": (n_kv, d_head)}
        self.buffers = {
            name: torch.zeros(batch, *shape[:-1], capacity, shape[-1], dtype=dtype, device=device)
            for name, shape in spec.items()
        }

    def update(self, start: int, **new: torch.Tensor) -> list[torch.Tensor]:
        """Write the new tokens' entries at [start, start + T) and return views of the whole context."""
        out = []
        for name, value in new.items():
            buf = self.buffers[name]
            end = start + value.shape[-2]
            buf[..., start:end, :] = value
            out.append(buf[..., :end, :])
        return out

    def nbytes(self, length: int | None = None) -> int:
        """Bytes of the stored entries: the first `length` tokens, or the whole allocation."""
        return sum(b[..., :length, :].nbytes if length is not None else b.nbytes for b in self.buffers.values())


class DecodeCache:
    """The per-layer caches of one model plus, when a layer needs them, the context's token ids."""

    def __init__(self, layers: list[LayerCache], batch: int, capacity: int, keep_ids: bool, device):
        self.layers = layers
        self.capacity = capacity
        self.length = 0
        self.ids = torch.zeros(batch, capacity, dtype=torch.int32, device=device) if keep_ids else None

    def kv_bytes(self) -> int:
        """Measured bytes of the KV entries written so far (excludes token ids)."""
        return sum(layer.nbytes(self.length) for layer in self.layers)

    def allocated_kv_bytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def id_bytes(self) -> int:
        """Measured bytes of the kept token ids (0 when no layer needs them)."""
        return 0 if self.ids is None else self.ids[:, : self.length].nbytes
