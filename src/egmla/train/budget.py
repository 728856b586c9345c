"""Token budgets: how long a run is, in tokens, and how big its optimizer steps are, in tokens.

`train.max_tokens` (null: `train.max_steps` counts) and `train.global_batch_tokens` (null: data.batch_size x
data.seq_len x world size x trainer.accumulate_grad_batches) make one command train the same tokens with the same
global batch on 1, 8 or 64 GPUs: only the gradient accumulation follows the world size.

    accumulation = global_batch_tokens / (data.batch_size x data.seq_len x world size)     must divide
    max_steps    = floor(max_tokens / global batch)                                          rounded down

Rounded down, a run never trains past its budget and falls short of it by less than one optimizer step (50B at
524,288 tokens a step: 95,367 steps, 226,304 tokens short); results.json records the tokens actually trained.
The derived values are written into the config (train.max_steps, trainer.accumulate_grad_batches), so the
Trainer, the learning-rate schedule, validation and checkpoint intervals, config.yaml and --print-config all see
the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..model import ConfigError


@dataclass(frozen=True)
class Budget:
    batch_size: int  # sequences per rank per micro-batch (data.batch_size)
    seq_len: int
    world_size: int  # trainer.devices x trainer.num_nodes; 0 when no GPU is visible to count them
    accumulation: int  # 0 when the world size is not known here
    max_steps: int
    global_batch_tokens: int  # tokens per optimizer step over all ranks (0: not known here)
    max_tokens: int | None = None  # the budget asked for (None: the run is given in steps)

    @property
    def tokens(self) -> int:
        """What the run trains: max_steps global batches."""
        return self.max_steps * self.global_batch_tokens

    def describe(self) -> list[str]:
        """The derivation, as comment lines for --print-config."""
        b, s, g = self.batch_size, self.seq_len, self.global_batch_tokens
        if not g:
            return ["# global batch: not known here (trainer.devices counts GPUs and none is visible)"]
        if self.world_size < 1:
            batch = (
                f"# global batch: {g:,} tokens per step; accumulation = {g:,} / (data.batch_size {b} x "
                f"data.seq_len {s} x the GPUs found at launch)"
            )
        else:
            batch = (
                f"# global batch: data.batch_size {b} x data.seq_len {s} x world size {self.world_size} x "
                f"accumulation {self.accumulation} = {g:,} tokens per step"
            )
        if self.max_tokens is None:
            return [batch, f"# budget: train.max_steps {self.max_steps:,} -> {self.tokens:,} tokens"]
        short = self.max_tokens - self.tokens
        rounded = f" (rounded down to whole steps: {short:,} short)" if short else ""
        return [
            batch,
            f"# budget: train.max_tokens {self.max_tokens:,} / {g:,} -> {self.max_steps:,} steps = "
            f"{self.tokens:,} tokens{rounded}",
        ]


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def world_size(trainer: Mapping[str, Any]) -> int:
    """trainer.devices x trainer.num_nodes as Lightning counts them: devices -1 or "auto" on a GPU accelerator
    are the visible CUDA devices (0 if none), "auto" on the CPU one process, a list or "0,1" its length."""
    devices, accelerator = trainer.get("devices", 1), str(trainer.get("accelerator", "cpu"))
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and cuda_device_count() > 0)
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto":
            devices = -1 if gpu else 1
        elif text.lstrip("-").isdigit():
            devices = int(text)
        else:  # "0,1": device indices
            devices = [part for part in text.split(",") if part.strip()]
    if hasattr(devices, "__len__"):  # a list (or ListConfig) of device indices
        count = len(devices)
    elif devices == -1 and gpu:
        count = cuda_device_count()
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        count = devices
    else:
        raise ConfigError(
            f"trainer.devices={devices!r} is invalid for trainer.accelerator={accelerator}: expected a number of "
            "devices >= 1" + (", -1 or auto (every GPU)" if gpu else "")
        )
    nodes = trainer.get("num_nodes", 1)
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        raise ConfigError(f"trainer.num_nodes={nodes!r} is invalid: expected an integer >= 1")
    return count * nodes


def token_count(key: str, value: Any) -> int | None:
    """A token count from the config: null, an integer, or a float that is one (5.0e10)."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"train.{key}={value!r} is invalid: expected a positive number of tokens or null")
    return value


def derive(
    batch_size: int,
    seq_len: int,
    world: int,
    max_steps: int,
    accumulate: int = 1,
    max_tokens: int | None = None,
    global_batch_tokens: int | None = None,
) -> Budget:
    """Optimizer steps and gradient accumulation for a run of `world` ranks (see the module docstring)."""
    per_step = batch_size * seq_len * world  # one micro-batch on every rank
    accumulation = accumulate
    if global_batch_tokens is not None:
        if global_batch_tokens % per_step:
            raise ConfigError(_not_a_multiple(global_batch_tokens, batch_size, seq_len, world))
        accumulation = global_batch_tokens // per_step
        if accumulate not in (1, accumulation):  # 1 is every trainer's default: it means "not set"
            raise ConfigError(
                f"trainer.accumulate_grad_batches={accumulate} contradicts train.global_batch_tokens="
                f"{global_batch_tokens}, which needs {accumulation} on {world} ranks: leave the accumulation at 1 "
                "(it is derived) or set train.global_batch_tokens=null"
            )
    global_batch = per_step * accumulation
    return Budget(
        batch_size, seq_len, world, accumulation, _steps(max_tokens, global_batch, max_steps), global_batch, max_tokens
    )


def _steps(max_tokens: int | None, global_batch: int, max_steps: int) -> int:
    if max_tokens is None:
        return max_steps
    if max_tokens < global_batch:
        raise ConfigError(
            f"train.max_tokens={max_tokens} is less than one optimizer step of {global_batch:,} tokens: raise it "
            "or lower train.global_batch_tokens"
        )
    return max_tokens // global_batch


def _not_a_multiple(global_batch: int, batch_size: int, seq_len: int, world: int) -> str:
    per_step = batch_size * seq_len * world
    fits = [b for b in range(batch_size - 1, 0, -1) if global_batch % (b * seq_len * world) == 0]
    fix = f"set data.batch_size={fits[0]}, or " if fits else "set "
    return (
        f"train.global_batch_tokens={global_batch} is not a multiple of data.batch_size x data.seq_len x world "
        f"size = {batch_size} x {seq_len} x {world} = {per_step:,}: {fix}train.global_batch_tokens to a multiple "
        f"of {per_step:,}"
    )


def apply_budget(cfg, launch: bool = True) -> Budget:
    """Derive the run's steps and accumulation from its token budget and write them into `cfg` (train.max_steps,
    trainer.accumulate_grad_batches). Without train.max_tokens or train.global_batch_tokens nothing changes.

    launch=False (--print-config): where no GPU is visible to count trainer.devices=-1, fill in what does not
    depend on it (the steps of a global batch given in tokens) instead of failing."""
    t, d = cfg.train, cfg.data
    max_tokens = token_count("max_tokens", t.max_tokens)
    global_batch = token_count("global_batch_tokens", t.global_batch_tokens)
    accumulate = cfg.trainer.accumulate_grad_batches
    if max_tokens is None and global_batch is None:  # nothing to derive: Lightning judges trainer.devices itself
        try:
            world = world_size(cfg.trainer)
        except ConfigError:
            world = 0
        per_step = d.batch_size * d.seq_len * world * accumulate
        return Budget(d.batch_size, d.seq_len, world, accumulate, t.max_steps, per_step)
    world = world_size(cfg.trainer)
    if world < 1:
        if launch or global_batch is None:
            raise ConfigError(
                f"trainer.devices={cfg.trainer.devices} finds no GPU here to derive the token budget's "
                "accumulation from: set trainer.devices=N, the GPUs the run will use"
            )
        t.max_steps = _steps(max_tokens, global_batch, t.max_steps)
        return Budget(d.batch_size, d.seq_len, 0, 0, t.max_steps, global_batch, max_tokens)
    budget = derive(d.batch_size, d.seq_len, world, t.max_steps, accumulate, max_tokens, global_batch)
    t.max_steps = budget.max_steps
    cfg.trainer.accumulate_grad_batches = budget.accumulation
    return budget
