"""The DataModule: streamed, tokenized, packed batches whose position is saved in every checkpoint."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from ..data.rows import check_rows
from ..data.stream import PackedBatches, SourceSpec, StreamPosition, check_resume
from ..data.tokenizer import build_tokenizer
from ..model import ConfigError
from .settings import DataConfig


class StreamDataModule(L.LightningDataModule):
    """Training batches loop over the train source forever (epoch after epoch, reshuffled); validation reads
    the first `val_batches` batches of the held-out source, the same ones every time."""

    def __init__(self, data: DataConfig | Mapping[str, Any], seed: int):
        super().__init__()
        self.cfg = data if isinstance(data, DataConfig) else DataConfig.from_dict(data)
        self.seed = seed
        self.tokenizer = build_tokenizer(self.cfg.tokenizer)
        self.position = StreamPosition()

    def check(self, vocab_size: int) -> None:
        """Fail before anything is written: missing files, an unreachable hub dataset, a missing field, a
        tokenizer the model cannot embed, a bad row among the first of local json/text files (CHECK_BYTES of each
        split, read line by line) or an empty split. Opening each source reads its first rows, nothing more."""
        fingerprint = self.cfg.fingerprint
        if fingerprint and not Path(fingerprint).is_file():  # written last by the build: missing = not built
            raise ConfigError(
                f"data={self.cfg.name}: {fingerprint} not found (the corpus is not built, or its build was "
                "interrupted): run `make data-code`, or set data.fingerprint=null"
            )
        try:
            self._dataset("train", rank=0, world=1)
            self._dataset("val", rank=0, world=1)
            for split in dict.fromkeys([self.cfg.train_split, self.cfg.val_split]):
                check_rows(self._source(split))  # the first rows of local json/text files, one by one
        except (FileNotFoundError, ConnectionError, ValueError) as exc:
            raise ConfigError(f"data={self.cfg.name}: {exc}") from None
        if self.tokenizer.vocab_size > vocab_size:
            raise ConfigError(
                f"model.vocab_size={vocab_size} is smaller than tokenizer {self.cfg.tokenizer!r}'s "
                f"{self.tokenizer.vocab_size} ids: set model.vocab_size={self.tokenizer.vocab_size}"
            )

    def record(self) -> dict[str, Any]:
        """What results.json says about the data: its name and the build's fingerprint (None without one)."""
        path = self.cfg.fingerprint
        fingerprint = json.loads(Path(path).read_text(encoding="utf-8")) if path and Path(path).is_file() else None
        return {"name": self.cfg.name, "fingerprint": fingerprint}

    def _source(self, split: str) -> SourceSpec:
        c = self.cfg
        return SourceSpec(
            path=c.path,
            name=c.config_name,
            data_files=c.data_files,
            split=split,
            text_field=c.text_field,
            token_field=c.token_field,
            builder=c.builder,
        )

    def check_resume(self, ranks: list[dict[str, Any]]) -> None:
        """Refuse, in one line and before anything is written, a checkpoint's data position that these settings
        cannot continue (another data.num_workers, seq_len, ...): the stream itself would refuse it only once
        training has started."""
        saved = next((state for state in ranks if state.get("batches_consumed")), None)
        if saved is None:
            return
        c = self.cfg
        now = {
            "num_workers": max(1, c.num_workers),  # as _dataset passes it
            "seq_len": c.seq_len,
            "batch_size": c.batch_size,
            "seed": self.seed,
            "shuffle_window": c.shuffle_window,
            "holdout_every": c.holdout_every,
        }
        try:
            check_resume(saved, now)  # the settings alone: opening the source again is not needed for that
        except ValueError as exc:
            raise ConfigError(f"resume: {exc}") from None

    def _dataset(self, role: str, rank: int, world: int, resume: dict[str, Any] | None = None) -> PackedBatches:
        c = self.cfg
        train = role == "train"
        if train and resume is None and self.position.batches_consumed:
            resume = self.position.state_dict()
        return PackedBatches(
            self._source(c.train_split if train else c.val_split),
            self.tokenizer,
            seq_len=c.seq_len,
            batch_size=c.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world,
            shuffle_window=c.shuffle_window if train else 0,
            loop=train,
            holdout_every=c.holdout_every,
            holdout_role=role,
            resume=resume,
            num_workers=max(1, c.num_workers),  # the stream counts the main process as one worker
        )

    def _rank_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def _loader(self, role: str) -> DataLoader:
        rank, world = self._rank_world()
        workers = self.cfg.num_workers
        return DataLoader(
            self._dataset(role, rank, world),
            batch_size=None,  # the dataset yields whole batches
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if workers else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    # Each data-parallel rank reads its own shard, so a checkpoint keeps every rank's position. Lightning builds
    # the checkpoint dict on every rank (and writes rank zero's), so all ranks take part in this gather.
    def state_dict(self) -> dict[str, Any]:
        state = self.position.state_dict()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)
            return {"ranks": states}
        return {"ranks": [state]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ranks = state["ranks"]
        rank, world = self._rank_world()
        if len(ranks) != world:
            raise ConfigError(
                f"the checkpoint's data position was saved by {len(ranks)} ranks, this run has "
                f"{world}: resume with the same number of devices"
            )
        self.position.load_state_dict(ranks[rank])
