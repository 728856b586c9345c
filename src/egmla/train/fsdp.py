"""FSDP2 sharding, activation checkpointing and per-block compilation, applied beside the model (torchtitan-style).

The model stays plain PyTorch; these functions rewrap its blocks in place, so parameter names (and therefore
checkpoints) are those of the unwrapped model. Used by the LightningModule's configure_model() under
`trainer=fsdp` and by `egmla-bench train --gpus N`.

Order matters, as in torchtitan: activation checkpointing, then compilation, then sharding.
"""

from __future__ import annotations

import os
import shutil
from functools import partial
from pathlib import Path

import torch

from ..model import Transformer
from ..model.config import check_choice
from .integrity import check_sharded_metadata, safe_torch_load, write_manifest

AC_MODES = ("none", "selective", "full")
COMPILE_SCOPES = ("model", "blocks")
# Attention kernels whose outputs selective checkpointing keeps (whichever backend SDPA picks).
_SDPA_OPS = (
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
)


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """Recompute activations in the backward pass, block by block.

    full: keep only each block's input. selective: keep the outputs of matmuls and attention (the costly
    ops) and recompute the cheap elementwise ones (norms, RoPE, SwiGLU's product, EG-MLA's gate and norms).
    """
    check_choice("train.activation_checkpointing", mode, AC_MODES)
    if mode == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    context_fn = _selective_context if mode == "selective" else None
    for i, block in enumerate(model.blocks):
        kwargs = {"context_fn": context_fn} if context_fn else {}
        model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False, **kwargs)


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default}
    save |= {getattr(aten, name).default for name in _SDPA_OPS if hasattr(aten, name)}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def compile_model(model: Transformer, scope: str) -> None:
    """torch.compile in place (parameter names unchanged). model: one graph for the whole forward, fastest
    (at 120m: experiments/throughput/README.md) but its compile time grows with depth; blocks: each block's
    forward, one graph reused by every layer, compiled in seconds at any depth, and FSDP's hooks stay eager."""
    check_choice("train.compile_scope", scope, COMPILE_SCOPES)
    if scope == "model":
        model.compile()
        return
    for block in model.blocks:
        block.forward = torch.compile(block.forward)


def prepare_model(
    model: Transformer,
    activation_checkpointing: str = "none",
    compile: str | None = None,
    mesh=None,
    precision: str = "32-true",
    reshard_after_forward: bool = True,
    prefetch: int = 0,
) -> None:
    """Everything applied around the plain model, in torchtitan's order: activation checkpointing, compilation
    (`compile`: None, "model" or "blocks"; always per block when sharded), then FSDP2 when a mesh is given.
    The trainer (LanguageModel.configure_model) and egmla-bench train share it."""
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        compile_model(model, "blocks" if mesh is not None else compile)
        model.compile_loss = True  # the fused loss's per-chunk work, where no compiled graph holds it
    if mesh is not None:
        apply_fsdp2(model, mesh, precision, reshard_after_forward, prefetch)


def mixed_precision(precision: str):
    """FSDP2's MixedPrecisionPolicy for a Lightning precision string: bf16-mixed -> bf16 compute, fp32 grads."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()  # parameters' own dtype (fp32 for 32-true, bf16 for bf16-true)


def apply_fsdp2(
    model: Transformer, mesh, precision: str = "bf16-mixed", reshard_after_forward: bool = True, prefetch: int = 0
) -> None:
    """Shard every block, then the root: token embedding, EG-MLA's gate tables, final norm and tied head.

    The gate tables are sharded by rows like the token embedding, in the root unit: gathered once per step
    rather than one unit per layer, which keeps FSDP's hooks out of the compiled blocks (a hook inside a block
    breaks its graph) and halves the number of collectives of a 48-layer EG-MLA.
    prefetch > 0: each block also starts gathering the next `prefetch` blocks (backward: the previous ones)
    instead of leaving it to FSDP2's implicit one-ahead prefetch, which needs the CPU to run ahead.
    """
    from torch.distributed.fsdp import fully_shard

    shard = partial(fully_shard, mesh=mesh, mp_policy=mixed_precision(precision))
    for i, block in enumerate(model.blocks):
        # The last block's parameters are needed again at once by the backward pass: keep them gathered.
        shard(block, reshard_after_forward=reshard_after_forward and i < len(model.blocks) - 1)
    shard(model, reshard_after_forward=False)
    blocks = list(model.blocks)
    for i, block in enumerate(blocks if prefetch > 0 else []):
        block.set_modules_to_forward_prefetch(blocks[i + 1 : i + 1 + prefetch])
        block.set_modules_to_backward_prefetch(blocks[max(0, i - prefetch) : i][::-1])


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a tensor sharded by FSDP2 (a DTensor), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Clip by the global gradient norm and return it (before clipping).

    Gradients sharded by FSDP2 (DTensors split by rows over one mesh dimension) are handled through their local
    shards: fused norms of this rank's pieces, one all-reduce of the sum of squares, fused multiplies; the same
    result as torch's DTensor path without dispatching each of hundreds of DTensors through DTensor twice."""
    from torch.distributed.tensor import DTensor, Shard

    parameters = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in parameters]
    sharded = bool(grads) and all(
        isinstance(g, DTensor) and g.device_mesh.ndim == 1 and isinstance(g.placements[0], Shard) for g in grads
    )
    if not sharded:
        total = torch.nn.utils.get_total_norm(grads, foreach=True)
        if isinstance(total, DTensor):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach=True)
        return total
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g.to_local())
    squares = sum(torch.stack(torch._foreach_norm(group)).float().square().sum() for group in by_dtype.values())
    torch.distributed.all_reduce(squares, group=grads[0].device_mesh.get_group())  # the shards are disjoint
    total = squares.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for dtype, group in by_dtype.items():
        torch._foreach_mul_(group, coef.to(dtype))
    return total


def fsdp2_strategy(**kwargs):
    """Lightning's ModelParallelStrategy as pure FSDP2: every rank of every node is one data-parallel shard."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    class FSDP2Strategy(ModelParallelStrategy):
        def setup_environment(self) -> None:
            self._data_parallel_size = self.num_nodes * self.num_processes
            self._tensor_parallel_size = 1
            super().setup_environment()

        def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
            """Write the shards into a temporary folder, then swap it in: a crash never leaves a torn checkpoint."""
            path = Path(self.broadcast(str(filepath)))
            tmp = path.with_name(path.name + ".tmp")
            if self.global_rank == 0 and tmp.exists():
                shutil.rmtree(tmp)
            self.barrier()
            super().save_checkpoint(checkpoint, tmp, storage_options)
            self.barrier()
            if self.global_rank == 0:
                write_manifest(tmp)  # every shard's sha256, checked on every load
                swap_in(tmp, path)
            self.barrier()

    return FSDP2Strategy(save_distributed_checkpoint=True, **kwargs)


def swap_in(folder: Path, path: Path) -> None:
    """Put a complete checkpoint folder at `path`, replacing what is there: a folder, a file, or a link (last.ckpt
    links to the newest step's folder; the link is replaced, never what it points to)."""
    old = path.with_name(path.name + ".old")
    if path.is_symlink() or path.exists():
        os.replace(path, old)
    os.replace(folder, path)
    if old.is_symlink() or old.is_file():
        old.unlink()
    elif old.is_dir():
        shutil.rmtree(old)


def is_sharded_checkpoint(path: Path) -> bool:
    """A distributed (sharded) checkpoint: a folder with torch.distributed.checkpoint's .metadata."""
    return path.is_dir() and (path / ".metadata").is_file()


def load_sharded_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full model state_dict of a sharded checkpoint, on the CPU, in one process (optimizer states skipped)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    check_sharded_metadata(path)
    state: dict = {}
    planner = _EmptyStateDictLoadPlanner(keys={"state_dict"})
    _load_state_dict(state, storage_reader=FileSystemReader(str(path)), planner=planner, no_dist=True)
    return state["state_dict"]


def sharded_checkpoint_metadata(path: Path) -> dict:
    """Everything of a sharded checkpoint but the tensors (Lightning's meta.pt: step, loops, callbacks, config)."""
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    check_sharded_metadata(path)
    return safe_torch_load(path / _METADATA_FILENAME)
