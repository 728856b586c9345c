"""attention.fused_expand on one EG-MLA layer of the paper's 120M configuration (16 x 2048 tokens, bf16): the
fused op's error and the plain path's against fp32 on the same inputs (k, v and every input gradient), their
forward + backward times (eager and compiled), and the launch settings of the op's two kernels. Needs a GPU;
TRITON_INTERPRET=1 runs a CPU smoke pass on 256 tokens in fp32 (no timings).

    python experiments/throughput/fused_expand.py              # error and time against the plain path
    python experiments/throughput/fused_expand.py --launches   # tokens per program x warps x stages

Results: experiments/throughput/README.md, "EG-MLA's fused expansion".
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os

import torch
import torch.nn.functional as F
import triton

from egmla.config import build_model, compose
from egmla.kernels import gated_expand as ge

NAMES = ["k", "v", "d_latent", "d_emb", "d_k_rope", "d_W_ukv", "d_W_ue", "d_k_weight", "d_k_bias", "d_v_weight",
         "d_v_bias"]  # fmt: skip


def plain(latent, emb, k_rope, w_ukv, w_ue, k_weight, k_bias, v_weight, v_bias, n_heads, d_nope, shared,
          activation, norm, eps):  # fmt: skip
    """gated_expand's function as LatentAttention._attend_expanded computes it, with the layer's settings."""
    n = latent.shape[0]
    k_nope, v = (latent @ w_ukv.t()).view(n, n_heads, -1).split([d_nope, w_ukv.shape[0] // n_heads - d_nope], -1)
    g = {"none": lambda x: x, "sigmoid": torch.sigmoid, "silu": F.silu}[activation](emb @ w_ue.t())
    g_k, g_v = (g, g) if shared else g.view(n, n_heads, -1).split([d_nope, v.shape[-1]], dim=-1)

    def normalise(x, weight, bias):
        if norm == "layernorm":
            return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
        return F.rms_norm(x, x.shape[-1:], weight, eps) if norm == "rmsnorm" else x

    k = torch.cat([normalise(k_nope * g_k.reshape(k_nope.shape), k_weight, k_bias),
                   k_rope[:, None].expand(n, n_heads, -1)], dim=-1)  # fmt: skip
    return k, normalise(v * g_v.reshape(v.shape), v_weight, v_bias)


class Layer:
    """Random inputs, the first layer's weights and output gradients at the op's shapes."""

    def __init__(self, tokens: int, device: torch.device, dtype: torch.dtype):
        cfg = compose(["model=120m", "attention=egmla"])
        attn = build_model(cfg).blocks[0].attn.to(device)
        self.device = device
        self.dims = dict(H=cfg.model.n_heads, DN=attn.d_nope, DV=attn.d_v, DR=attn.d_rope, DC=attn.d_c,
                         GD=attn.gate.up.in_features)  # fmt: skip
        torch.manual_seed(0)

        def randn(*shape):
            return torch.randn(*shape, device=device).to(dtype).requires_grad_()

        self.inputs = [randn(tokens, attn.d_c), randn(tokens, self.dims["GD"]), randn(tokens, attn.d_rope),
                       attn.wkv_b.weight.detach().to(dtype).requires_grad_(),
                       attn.gate.up.weight.detach()[: attn.gate.width].to(dtype).requires_grad_()]  # fmt: skip
        # norm parameters off their init, so that their gradients are checked too
        norms = (attn.k_norm.weight, attn.k_norm.bias, attn.v_norm.weight, attn.v_norm.bias)
        self.inputs += [(p.detach().float() + 0.1 * torch.randn_like(p.float())).requires_grad_() for p in norms]
        a = cfg.attention
        self.options = (cfg.model.n_heads, attn.d_nope, a.gate_kv == "shared", a.gate_activation, a.gate_norm,
                        attn.k_norm.eps)  # fmt: skip
        d = self.dims
        self.grads = (torch.randn(tokens, d["H"], d["DN"] + d["DR"], device=device, dtype=dtype),
                      torch.randn(tokens, d["H"], d["DV"], device=device, dtype=dtype))  # fmt: skip

    def step(self, fn) -> list[torch.Tensor]:
        """Forward + backward of fn; (k, v, every input's gradient) in fp32."""
        for t in self.inputs:
            t.grad = None
        k, v = fn(*self.inputs, *self.options)
        torch.autograd.backward((k, v), self.grads)
        return [k.float(), v.float()] + [t.grad.float() for t in self.inputs]


def fp32(*args):
    return plain(*[a.float() if torch.is_tensor(a) else a for a in args])


def autocast(*args):  # bf16 matmuls and fp32 norms, as the model runs under autocast
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return plain(*args)


def milliseconds(fn, n: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def compare(layer: Layer, interpret: bool) -> None:
    reference = layer.step(fp32)
    fused = layer.step(ge.gated_expand)
    plain_path = (lambda *a: plain(*a)) if interpret else autocast
    ours = layer.step(plain_path)
    print("relative error against fp32 on the same inputs:   fused   plain")
    for name, f, p, r in zip(NAMES, fused, ours, reference, strict=True):
        scale = r.norm().clamp_min(1e-12)
        print(f"  {name:12s} {((f - r).norm() / scale).item():36.1e} {((p - r).norm() / scale).item():7.1e}")
    if interpret:
        return
    print("forward + backward of one layer, ms:")
    paths = {"plain, eager": autocast, "plain, compiled": torch.compile(autocast), "fused, eager": ge.gated_expand,
             "fused, compiled": torch.compile(ge.gated_expand)}  # fmt: skip
    for label, fn in paths.items():
        print(f"  {label:16s} {milliseconds(functools.partial(layer.step, fn)):7.3f}", flush=True)


def launches(layer: Layer, interpret: bool) -> None:
    """Each kernel alone at tokens per program x warps x pipeline stages; the op launches BLOCK_N on 4 warps and
    3 stages (Triton's defaults)."""
    latent, emb, k_rope, w_ukv, w_ue, kw, kb, vw, vb = (t.detach() for t in layer.inputs)
    h, shared, act, norm, eps = layer.options[0], layer.options[2], layer.options[3], layer.options[4], layer.options[5]
    d, n = layer.dims, latent.shape[0]
    consts = dict(H=h, DN=d["DN"], DV=d["DV"], DC=d["DC"], GD=d["GD"], SHARED=shared, ACT_KIND=ge.ACT[act],
                  NORM_KIND=ge.NORM[norm], UPCAST=ge.UPCAST)  # fmt: skip
    dk, dv = (g.detach()[..., : d["DN"]] if i == 0 else g for i, g in enumerate(layer.grads))

    def empty(*shape, dtype=latent.dtype):
        return torch.empty(*shape, dtype=dtype, device=latent.device)

    def forward(block, warps, stages):
        k, v = empty(n, h, d["DN"] + d["DR"]), empty(n, h, d["DV"])
        ge._gated_expand_fwd[(h * triton.cdiv(n, block),)](
            latent, emb, k_rope, w_ukv, w_ue, kw, kb, vw, vb, k, v, n, eps,
            latent.stride(0), emb.stride(0), k_rope.stride(0), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            DR=d["DR"], BLOCK=block, num_warps=warps, num_stages=stages, **consts,
        )  # fmt: skip
        return torch.cat([k.flatten(), v.flatten()])

    def backward(block, warps, stages):
        tiles = triton.cdiv(n, block)
        d_kv, d_g = empty(n, w_ukv.shape[0]), empty(n, w_ue.shape[0])
        d_norm = empty(tiles * h, 2 * d["DN"] + 2 * d["DV"], dtype=torch.float32)
        ge._gated_expand_bwd[(h * tiles,)](
            latent, emb, w_ukv, w_ue, kw, kb, vw, vb, dk, dv, d_kv, d_g, d_norm, n, eps,
            latent.stride(0), emb.stride(0), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            BLOCK=block, num_warps=warps, num_stages=stages, **consts,
        )  # fmt: skip
        return torch.cat([d_kv.flatten(), d_g.flatten(), d_norm.sum(0)])

    for name, kernel in (("forward", forward), ("backward", backward)):
        reference = kernel(ge.BLOCK_N, 4, 3).float()
        for block, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3)):
            if interpret and (block > 64 or warps > 2 or stages > 1):
                continue
            run = functools.partial(kernel, block, warps, stages)
            out = run()
            us = float("nan") if interpret else 1000 * milliseconds(run)
            error = ((out.float() - reference).norm() / reference.norm()).item()
            print(f"  {name:8s} {block:3d} tokens, {warps} warps, {stages} stages: {us:8.1f} us  err {error:.1e}",
                  flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launches", action="store_true", help="time each kernel at several launch settings")
    args = parser.parse_args()
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    device = torch.device("cpu" if interpret else "cuda")
    layer = Layer(256 if interpret else 16 * 2048, device, torch.float32 if interpret else torch.bfloat16)
    (launches if args.launches else compare)(layer, interpret)


if __name__ == "__main__":
    main()
