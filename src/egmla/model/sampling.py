"""The next-token rule shared by Transformer.generate and the lm-eval adapter's generate_until."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_next_token(
    logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token id per row, logits [B, vocab] -> [B]: the argmax at temperature <= 0, else drawn from
    softmax(logits / temperature), restricted to the top_k largest logits when top_k is set (ties with the k-th
    kept)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator).squeeze(-1)
