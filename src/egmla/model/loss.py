"""The output head fused with the cross-entropy loss, chunk by chunk over tokens (the idea of Liger-Kernel's
fused linear cross-entropy and of "cut cross-entropy", in plain PyTorch): the full [tokens, vocab] logits never
exist, and the forward pass also computes the gradients, so the backward pass only scales them."""

from __future__ import annotations

import functools

import torch


def padded_vocab(vocab_size: int, rows: int) -> int:
    """Rows of the output head's weight for a matmul over `rows` tokens. A large vocabulary is padded with zero
    rows to a multiple of 64: GPT-2's 50,257-wide logit rows are misaligned for tensor-core GEMMs. Not when
    padding would cost over 1% more work, nor for a few rows (decode steps), where copying the padded weight
    would cost more than it saves."""
    pad = -vocab_size % 64
    if pad * 100 > vocab_size or rows < 1024:
        return vocab_size
    return vocab_size + pad


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    chunk_tokens: int = 8192,
    ignore_index: int = -100,
    compile: bool = False,
) -> torch.Tensor:
    """Cross-entropy of the logits h @ weight.T against targets, an fp32 scalar (fp64 for fp64 inputs);
    h [..., d], weight [vocab, d], targets [...]. The same value and gradients as
    F.cross_entropy((h @ weight.T).float().flatten(0, -2), targets.flatten(), reduction=reduction).

    Under autocast the matmuls run in the autocast dtype, else in h's; softmax and loss in fp32; the weight's
    gradient accumulates in fp32. Memory: a chunk's logits and their gradient, chunk_tokens x padded vocab x
    4 bytes in bf16 when the elementwise work is compiled (8192 x 50,304: 1.6 GB), 3-4x that eager (fp32
    temporaries); kept for the backward pass: the gradients, of h's size and vocab x d in fp32.
    compile: torch.compile the per-chunk elementwise work, for when this function itself runs eagerly.
    reduction "none": each target's loss, shaped like targets (0 where ignored), without gradients (evaluation).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r} is not supported: use 'mean', 'sum' or 'none'")
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    need_h = torch.is_grad_enabled() and h.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad
    if reduction == "none":
        if need_h or need_w:
            raise ValueError("reduction='none' computes no gradients: call it under torch.no_grad()")
        with torch.autocast(device_type, enabled=False):
            return _token_losses(h, weight, targets, chunk_tokens, ignore_index, dtype)
    if not (need_h or need_w):
        with torch.autocast(device_type, enabled=False):
            loss, *_ = _forward(h, weight, targets, chunk_tokens, ignore_index, dtype, compile, False, False)
        return loss * _scale(targets, ignore_index, reduction, loss.dtype)
    return _LinearCrossEntropy.apply(
        h, weight, targets, reduction, chunk_tokens, ignore_index, dtype, compile, need_h, need_w
    )


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, reduction, chunk_tokens, ignore_index, dtype, compile, need_h, need_w):
        with torch.autocast(h.device.type, enabled=False):
            loss, grad_h, grad_w = _forward(
                h, weight, targets, chunk_tokens, ignore_index, dtype, compile, need_h, need_w
            )
            scale = _scale(targets, ignore_index, reduction, loss.dtype)
        ctx.save_for_backward(grad_h, grad_w, scale)
        ctx.h_shape, ctx.w_shape, ctx.w_dtype = h.shape, weight.shape, weight.dtype
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, scale = ctx.saved_tensors
        scale = grad_loss * scale
        if grad_h is not None:
            grad_h = (grad_h * scale).view(ctx.h_shape)
        if grad_w is not None:
            grad_w = (grad_w[: ctx.w_shape[0]] * scale).to(ctx.w_dtype)  # without the padding rows
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def _scale(targets, ignore_index: int, reduction: str, dtype) -> torch.Tensor:
    """What the summed loss is multiplied by: 1 / (valid targets) for the mean, 1 for the sum."""
    if reduction == "sum":
        return torch.ones((), dtype=dtype, device=targets.device)
    return 1 / (targets != ignore_index).sum().to(dtype)


def _head(h, weight, dtype):
    """h as [tokens, d] in `dtype`, and the output head's (weight, bias) for a matmul over them: the weight padded
    with zero rows where padded_vocab says so, with a bias of -inf that leaves them out of the softmax."""
    vocab, d = weight.shape
    hc = h.reshape(-1, d).to(dtype)
    rows = padded_vocab(vocab, hc.shape[0])
    w, bias = weight.to(dtype), None
    if rows > vocab:
        w = weight.new_zeros((rows, d), dtype=dtype)
        w[:vocab] = weight
        bias = torch.zeros(rows, dtype=dtype, device=w.device)
        bias[vocab:] = float("-inf")
    return hc, w, bias


def _token_losses(h, weight, targets, chunk_tokens, ignore_index, dtype):
    """Each target's loss (0 where ignored), shaped like targets; fp32 (fp64 for fp64 inputs)."""
    hc, w, bias = _head(h, weight, dtype)
    flat = targets.reshape(-1)
    out = torch.zeros(flat.shape, dtype=torch.promote_types(dtype, torch.float32), device=h.device)
    for start in range(0, hc.shape[0], chunk_tokens):
        end = start + chunk_tokens
        x = hc[start:end]
        logits = (x @ w.T if bias is None else torch.addmm(bias, x, w.T)).to(out.dtype)
        valid = flat[start:end] != ignore_index
        target = flat[start:end].masked_fill(~valid, 0)[:, None]
        out[start:end] = (logits.logsumexp(-1, keepdim=True) - logits.gather(-1, target)).squeeze(-1) * valid
    return out.view(targets.shape)


def _forward(h, weight, targets, chunk_tokens, ignore_index, dtype, compile, need_h, need_w):
    """Summed loss over the valid targets and, where asked, its gradients w.r.t. h (h's dtype) and the padded
    weight (fp32)."""
    loss_dtype = torch.promote_types(dtype, torch.float32)
    hc, w, bias = _head(h, weight, dtype)
    targets = targets.reshape(-1)
    grad_h = torch.empty(hc.shape, dtype=h.dtype, device=h.device) if need_h else None
    grad_w = torch.zeros(w.shape, dtype=loss_dtype, device=w.device) if need_w else None
    # Inside a compiled graph the chunk's work is fused anyway; reading the lazily built global there would
    # guard on it and recompile the whole graph once it is set.
    chunk_fn = _compiled_chunk() if compile and not torch.compiler.is_compiling() else _chunk
    loss = torch.zeros((), dtype=loss_dtype, device=h.device)
    for start in range(0, hc.shape[0], chunk_tokens):
        end = start + chunk_tokens
        x = hc[start:end]
        logits = x @ w.T if bias is None else torch.addmm(bias, x, w.T)
        chunk_loss, grad = chunk_fn(logits, targets[start:end], ignore_index, need_h or need_w)
        loss = loss + chunk_loss
        if need_h:
            grad_h[start:end] = grad @ w
        if need_w:
            # bf16 partial sums per chunk, accumulated in fp32 (torch.mm's out_dtype is CUDA-only)
            grad_w = grad_w + grad.T @ x
    return loss, grad_h, grad_w


def _chunk(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, grad: bool):
    """Summed loss of a chunk's logits [n, vocab] (fp32), and with `grad` its gradient w.r.t. the logits, in
    their dtype. The elementwise work upcasts to fp32 (fp64 stays); compiled, it fuses into a reduction and a
    pointwise pass."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = targets != ignore_index
    target = targets.masked_fill(~valid, 0)[:, None]
    lse = x.logsumexp(-1, keepdim=True)
    loss = ((lse - x.gather(-1, target)).squeeze(-1) * valid).sum()
    if not grad:
        return loss, None
    dlogits = (x - lse).exp_()  # softmax, minus the one-hot target:
    if torch.compiler.is_compiling():  # as a comparison, fused into the same pass
        onehot = torch.arange(x.shape[-1], device=x.device) == target
        dlogits = torch.where(onehot, dlogits - 1, dlogits)
    else:  # in place: eager, no more [n, vocab] temporaries
        dlogits.scatter_add_(-1, target, torch.full_like(lse, -1.0))
    dlogits *= valid[:, None]
    return loss, dlogits.to(logits.dtype)


@functools.cache
def _compiled_chunk():
    return torch.compile(_chunk)
