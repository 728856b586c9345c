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

from egmla.bench.timing import cuda_milliseconds
from egmla.config import build_model, compose
from egmla.kernels import gated_expand as ge

NAMES = [
    "k",
    "v",
    "d_latent",
    "d_emb",
    "d_k_rope",
    "d_W_ukv",
    "d_W_ue",
    "d_k_weight",
    "d_k_bias",
    "d_v_weight",
    "d_v_bias",
]


class Layer:
    """The first EG-MLA layer of the 120M model (fp32 weights, norm parameters moved off their init so that their
    gradients are checked too), random inputs rounded to `dtype` (held in fp32 leaves, so that the fp32
    reference keeps its gradients unrounded) and random output gradients."""

    def __init__(self, tokens: int, device: torch.device, dtype: torch.dtype):
        cfg = compose(["model=120m", "attention=egmla"])
        torch.manual_seed(0)
        self.attn = attn = build_model(cfg).blocks[0].attn.to(device)
        self.norms = [attn.k_norm.weight, attn.k_norm.bias, attn.v_norm.weight, attn.v_norm.bias]
        with torch.no_grad():
            for p in self.norms:
                p.add_(0.1 * torch.randn_like(p))
        self.device, self.dtype = device, dtype

        def randn(*shape):
            return torch.randn(1, *shape, device=device).to(dtype).float().requires_grad_()

        self.latent, self.emb, self.k_rope = (
            randn(tokens, attn.d_c),
            randn(tokens, attn.gate.up.in_features),
            randn(tokens, attn.d_rope),
        )
        self.grads = (
            torch.randn(1, tokens, attn.n_heads, attn.d_nope + attn.d_rope, device=device, dtype=dtype),
            torch.randn(1, tokens, attn.n_heads, attn.d_v, device=device, dtype=dtype),
        )

    def leaves(self) -> list[torch.Tensor]:
        """What each path's gradients are compared on, in NAMES order after k and v (W_ue: the whole gate
        up-projection, which is the content's gate without a gated RoPE key)."""
        a = self.attn
        return [self.latent, self.emb, self.k_rope, a.wkv_b.weight, a.gate.up.weight, *self.norms]

    def fp32(self):
        """The model's plain path in fp32."""
        return self.attn.expand(self.latent, self.k_rope, self.attn.gate(self.emb)[0])

    def plain(self):
        """The model's plain path as it trains: under bf16 autocast (bf16 matmuls, fp32 norms) on a GPU."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return self.fp32()

    def fused(self):
        """The model's fused path (attention.fused_expand=true), under the same autocast."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return self.attn.expand_fused(self.latent, self.k_rope, self.emb)

    def step(self, path) -> list[torch.Tensor]:
        """Forward + backward of a path; (k, v, every leaf's gradient) in fp32."""
        for t in self.leaves():
            t.grad = None
        k, v = path()
        torch.autograd.backward((k, v), self.grads)
        return [k.float(), v.float()] + [t.grad.float() for t in self.leaves()]


def compare(layer: Layer, interpret: bool) -> None:
    reference = layer.step(layer.fp32)
    fused, plain = layer.step(layer.fused), layer.step(layer.plain)
    print("relative error against fp32 on the same inputs:   fused   plain")
    for name, f, p, r in zip(NAMES, fused, plain, reference, strict=True):
        scale = r.norm().clamp_min(1e-12)
        print(f"  {name:12s} {((f - r).norm() / scale).item():36.1e} {((p - r).norm() / scale).item():7.1e}")
    if interpret:
        return
    print("forward + backward of one layer, ms:")
    paths = {
        "plain, eager": layer.plain,
        "plain, compiled": torch.compile(layer.plain),
        "fused, eager": layer.fused,
        "fused, compiled": torch.compile(layer.fused),
    }
    for label, path in paths.items():
        print(f"  {label:16s} {cuda_milliseconds(functools.partial(layer.step, path), 20, warmup=3):7.3f}", flush=True)


def launches(layer: Layer, interpret: bool) -> None:
    """Each kernel alone at tokens per program x warps x pipeline stages; the op launches BLOCK_N on 4 warps and
    3 stages (Triton's defaults)."""
    a, dtype = layer.attn, layer.dtype
    latent, emb, k_rope = (t.detach()[0].to(dtype) for t in (layer.latent, layer.emb, layer.k_rope))
    w_ukv, w_ue = a.wkv_b.weight.detach().to(dtype), a.gate.up.weight.detach()[: a.gate.width].to(dtype)
    weights = (w_ukv, w_ue, *(p.detach() for p in layer.norms))
    options = (a.n_heads, a.d_nope, a.gate_kv == "shared", a.gate.activation_kind, a.gate_norm, a.k_norm.eps)
    dk, dv = layer.grads[0][0, ..., : a.d_nope], layer.grads[1][0]

    def forward(block, warps, stages):
        k, v = ge.launch_forward(latent, emb, k_rope, *weights, *options, block, num_warps=warps, num_stages=stages)
        return torch.cat([k.flatten(), v.flatten()])

    def backward(block, warps, stages):
        d_kv, d_g, d_norm = ge.launch_backward(
            dk, dv, latent, emb, *weights, *options, block, num_warps=warps, num_stages=stages
        )
        return torch.cat([d_kv.flatten(), d_g.flatten(), d_norm.sum(0)])

    for name, kernel in (("forward", forward), ("backward", backward)):
        reference = kernel(ge.BLOCK_N, 4, 3).float()
        for block, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3)):
            if interpret and (block > 64 or warps > 2 or stages > 1):
                continue
            run = functools.partial(kernel, block, warps, stages)
            out = run()
            us = float("nan") if interpret else 1000 * cuda_milliseconds(run, 20, warmup=3)
            error = ((out.float() - reference).norm() / reference.norm()).item()
            print(
                f"  {name:8s} {block:3d} tokens, {warps} warps, {stages} stages: {us:8.1f} us  err {error:.1e}",
                flush=True,
            )


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
