"""Can the training data stream keep up? Time egmla-train's train DataLoader, as a run's config.yaml builds it,
consumed at a GPU's pace: how long each `next()` waits, and how long Lightning's move of the batch to the device
walks it in the training process (measured here with the CPU as the device: the walk without the copy), per group
of batches. No GPU and no model: the stream alone (needs the run's data on disk, e.g. `make data-code`).

    python experiments/throughput/loader_pace.py experiments/throughput/loop_runs/509b7da/mha/config.yaml \\
        --pace-ms 70 --batches 600          # MHA's step time on an H200; 600 batches span two shuffle windows

A worker builds a whole shuffle window (data.shuffle_window blocks) before it yields from it, so the waits to look
at are those where the workers' windows run out (every shuffle_window / batch_size x num_workers batches); the
first window is built before timing starts, as during a compiled run's first steps.
"""

from __future__ import annotations

import argparse
import time

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import OmegaConf

from egmla.train.datamodule import StreamDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a run's config.yaml (its data and seed sections are used)")
    parser.add_argument("--workers", type=int, help="data.num_workers (default: the config's)")
    parser.add_argument("--pace-ms", type=float, default=70.0, help="the consumer's time per batch, ms")
    parser.add_argument("--batches", type=int, default=600, help="batches to time")
    parser.add_argument("--group", type=int, default=32, help="batches per printed line")
    parser.add_argument("--head-start", type=float, default=5.0, help="seconds the workers get first (compilation)")
    args = parser.parse_args()
    if args.batches < 1 or args.group < 1:
        parser.error("--batches and --group must be at least 1")
    cfg = OmegaConf.load(args.config)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    if args.workers is not None:
        data["num_workers"] = args.workers
    batches = iter(StreamDataModule(data, seed=cfg.seed).train_dataloader())
    start = time.perf_counter()
    next(batches)
    print(
        f"first batch after {time.perf_counter() - start:.1f} s; {data['num_workers']} workers, "
        f"shuffle_window {data['shuffle_window']}, batch {data['batch_size']} x {data['seq_len']}"
    )
    time.sleep(args.head_start)
    waits, moves = [], []
    for _ in range(args.batches):
        start = time.perf_counter()
        batch = next(batches)
        waits.append(time.perf_counter() - start)
        start = time.perf_counter()
        move_data_to_device(batch, torch.device("cpu"))
        moves.append(time.perf_counter() - start)
        time.sleep(args.pace_ms / 1000)
    for first in range(0, len(waits), args.group):
        group, move = waits[first : first + args.group], moves[first : first + args.group]
        print(
            f"batches {first + 1:5d}-{first + len(group):5d}: wait mean {1000 * sum(group) / len(group):7.2f} ms, "
            f"max {1000 * max(group):7.1f} ms; move mean {1000 * sum(move) / len(move):6.3f} ms"
        )
    print(
        f"all: {1000 * sum(waits):.0f} ms of waits in {len(waits)} batches "
        f"({sum(waits) / (sum(waits) + len(waits) * args.pace_ms / 1000):.1%} of the time); "
        f"moves {1000 * sum(moves) / len(moves):.3f} ms a batch"
    )


if __name__ == "__main__":
    main()
