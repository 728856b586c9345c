"""Streamed, tokenized, packed training batches with rank/worker sharding, a windowed shuffle and exact resume.

Pipeline (one DataLoader worker of one data-parallel rank; nothing is shared between processes):

    source rows (fixed order) -> holdout filter -> shard filter -> tokenize (chunks) -> EOS -> pack into blocks
    -> windowed shuffle -> batches {"input_ids": LongTensor[batch, seq_len + 1], "state": position after it}

Source. `SourceSpec` names a `datasets` source, opened with `streaming=True` and read in its fixed order (never
shuffled by `datasets`), so the same source always yields the same document sequence. Local files use a builder
("json", "parquet", "text") and `data_files`; online users give a hub id (e.g. "nvidia/Nemotron-ClimbMix", whose
rows hold GPT-2 ids in `tokens`: `token_field="tokens"`, nothing is re-tokenized). Rows are read as Arrow batches
and only this shard's rows are converted to Python and tokenized.

Holdout. Single-split sources (ClimbMix) get a validation set by document index: with `holdout_every=h`, source
document j is validation iff j % h == 0; training sees the others. Indices below count documents after this filter.

Sharding. With W DataLoader workers per rank there are world_size * W shards; the worker playing role r on rank
`rank` owns shard rank * W + r and document i belongs to shard i % (world_size * W). Every shard reads the whole
row stream but skips other shards' documents before tokenizing, so shards are disjoint and together cover the
stream exactly, and no process needs to know what the others did.

Packing. Each document's ids + [eos] are appended to a running buffer that is cut into non-overlapping blocks of
seq_len + 1 tokens (inputs = block[:-1], targets = block[1:]); the remainder (the carry, < seq_len + 1 tokens)
continues into the next document, and across epochs. Pre-tokenized documents that already end in eos get no
second one: one eos between documents, whether a source stores it or not.

Windowed shuffle. Blocks are collected into windows; a window closes at the first document boundary where it
holds >= shuffle_window blocks (a window always starts on a document boundary, so its start is described by a
document count and a short carry; one long document can make it a little larger than shuffle_window). A window
is permuted by a generator seeded from (seed, rank, role, epoch, window_index) and yielded in that order. At the
end of the source the partial window is yielded too. shuffle_window 0 or 1: no shuffle.

Epochs. loop=True (training) restarts the source with epoch + 1 forever; window_index restarts at 0 and the carry
continues. loop=False (validation) makes one pass; its final partial batch is yielded (drop_last=True drops it).

Exact resume. Each batch carries the state of its role AFTER that batch: the window being consumed
(epoch, window_index, docs_at_window_start = source rows read in this epoch when it began, carry_at_window_start),
and blocks_done_in_window. A window fully consumed is reported as the start of the next one. To resume, a role
re-opens the source, skips docs_at_window_start rows (no tokenizing), restores the carry, rebuilds the window,
applies the same permutation, skips blocks_done_in_window blocks, and continues. Because every input of a
window is fixed by the source order and its start, the resumed stream is bit-identical to the uninterrupted one.

The carry in a batch is one string of space-separated ids; a saved position (`StreamPosition.state_dict()`) holds
it as a list of ints. Lightning's move to the device walks every element of a list, a tuple or bytes, in the
training process, on every batch: up to seq_len ints once the first window is used up, which cost the loop 2-3%
of its speed (experiments/throughput/README.md, "The drop after step 256"). The DataLoader would turn a numpy
array into a tensor bound for the GPU. A string is one leaf for both.

DataLoader order. With an infinite stream, DataLoader(batch_size=None, in_order=True) delivers batches from its
workers round-robin (0, 1, ..., W - 1, 0, ...). After k batches were consumed the next one must come from role
k % W, and a fresh DataLoader starts with worker 0; so worker w plays role (k + w) % W and resumes from that
role's saved state. `StreamPosition` records, in the training process, the state of every batch actually
trained on (not the prefetched ones) and produces the `resume` dict; each data-parallel rank has its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .rows import bad_rows, file_patterns, local_matches

__all__ = ["PackedBatches", "SourceSpec", "StreamPosition", "open_documents"]

# Local builders whose data_files are checked on disk before `datasets` sees them.
LOCAL_BUILDERS = ("json", "parquet", "text", "csv", "arrow")
MISSING_DATA_HINT = (
    "run `make data` (data=embedded) or `make data-code` (data=code) to build the local corpus, "
    "or point data.data_files at existing files"
)
ROWS_PER_READ = 1024  # Arrow rows read at a time (all shards read every row; only their own get converted)
DOCS_PER_ENCODE = 64  # documents tokenized per encode_batch call

# Keys of a batch state describing a role's position, and the settings a resume must match.
POSITION_KEYS = (
    "role",
    "epoch",
    "window_index",
    "docs_at_window_start",
    "carry_at_window_start",
    "blocks_done_in_window",
)
SETTING_KEYS = ("rank", "world_size", "num_workers", "seq_len", "batch_size", "seed", "shuffle_window", "holdout_every")


class Tokenizer(Protocol):
    eos_id: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


# ----------------------------------------------------------------------------------------------------- source


@dataclass(frozen=True)
class SourceSpec:
    """Where documents come from: a `datasets` builder with local data_files, or a hub dataset id (`path`)."""

    path: str | None = None
    name: str | None = None
    data_files: dict | str | list | None = None
    split: str = "train"
    text_field: str | None = "text"
    token_field: str | None = None  # pre-tokenized sources: the field holding token ids (wins over text_field)
    builder: str | None = None

    def __post_init__(self):
        if not (self.builder or self.path):
            raise ValueError("SourceSpec needs builder= (json | parquet | text, with data_files=) or path= (a hub id)")
        if not (self.token_field or self.text_field):
            raise ValueError("SourceSpec needs text_field= (text to tokenize) or token_field= (pre-tokenized ids)")

    @property
    def field(self) -> str:
        return self.token_field or self.text_field

    @property
    def pretokenized(self) -> bool:
        return bool(self.token_field)


def check_local_files(spec: SourceSpec) -> None:
    """Fail in one line, naming the path and the fix, if a local data file or glob matches nothing."""
    if spec.builder not in LOCAL_BUILDERS:
        return
    patterns = file_patterns(spec.data_files)
    if not patterns:
        raise FileNotFoundError(f"the {spec.builder} source has no data_files: {MISSING_DATA_HINT}")
    for pattern in patterns:
        if "://" not in pattern and not local_matches(pattern):
            raise FileNotFoundError(f"data file not found: {pattern}: {MISSING_DATA_HINT}")


def _load(spec: SourceSpec, field_only: bool = True):
    """The source as a streaming `datasets.IterableDataset` of Arrow batches (only the needed field by default)."""
    check_local_files(spec)
    import datasets  # deferred: importing datasets costs ~1 s

    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)  # bad_rows() says it
    target = spec.builder or spec.path
    try:
        ds = datasets.load_dataset(target, name=spec.name, data_files=spec.data_files, split=spec.split, streaming=True)
    except Exception as exc:  # offline hub, unknown dataset or split: one line instead of a deep traceback
        detail = " ".join(str(exc).split()) or type(exc).__name__
        message = f"cannot open dataset {target!r} (split {spec.split!r}): {detail}"
        if isinstance(exc, FileNotFoundError):
            raise FileNotFoundError(f"{message}: {MISSING_DATA_HINT}") from None
        raise (ConnectionError if isinstance(exc, ConnectionError | TimeoutError) else ValueError)(message) from None
    columns = ds.column_names
    if columns is not None and spec.field not in columns:
        kind = "token_field" if spec.pretokenized else "text_field"
        raise ValueError(f"{kind}={spec.field!r} is not a column of {target!r}: it has {columns}")
    if columns is not None and field_only:
        ds = ds.select_columns([spec.field])
    return ds.with_format("arrow")


def _arrow_batches(source, spec: SourceSpec):
    """Arrow tables of rows in source order. `.iter()` (not `iter(ds)`) so that `datasets` does not split the
    files among DataLoader workers itself: our shards are by document index."""
    for table in source.iter(batch_size=ROWS_PER_READ):
        if spec.field not in table.column_names:
            where = spec.builder or spec.path
            raise ValueError(f"field {spec.field!r} missing from {where!r}: it has {table.column_names}")
        column = table.column(spec.field)
        text = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
        if column.null_count or not (spec.pretokenized or text):  # a missing or null text, a number, an object
            raise bad_rows(spec)
        yield table


def open_documents(spec: SourceSpec) -> Iterator[dict]:
    """The source's rows as dicts, in its fixed order (streamed; local files need no network)."""
    for table in _arrow_batches(_load(spec, field_only=False), spec):
        yield from table.to_pylist()


# ----------------------------------------------------------------------------------------------------- positions


@dataclass
class _WindowStart:
    """Where a window begins: everything needed to rebuild it."""

    epoch: int
    window_index: int
    docs: int  # source rows read in this epoch before the window's first document
    carry: list[int]  # leftover tokens at that moment (< seq_len + 1)

    @classmethod
    def from_state(cls, state: dict | None) -> tuple[_WindowStart, int]:
        if state is None:
            return cls(0, 0, 0, []), 0
        start = cls(
            int(state["epoch"]),
            int(state["window_index"]),
            int(state["docs_at_window_start"]),
            _ints(state["carry_at_window_start"]),
        )
        return start, int(state["blocks_done_in_window"])

    @cached_property
    def carry_text(self) -> str:
        """The carry as a batch state holds it (built once per window, not once per batch)."""
        return " ".join(map(str, self.carry))


# Where each resume setting comes from, for the fix in the refusal message.
SETTING_SOURCES = {
    "rank": "load each rank's own saved position (one StreamPosition per rank)",
    "world_size": "train on the same number of devices x nodes",
    "seed": "use the same seed",
}


def _resume_error(key: str, saved: Any, now: Any) -> ValueError:
    fix = SETTING_SOURCES.get(key, f"set data.{key}={saved}")
    return ValueError(
        f"cannot resume the data stream with {key}={now!r}: it was saved with {key}={saved!r}; "
        f"{fix}, or start the stream afresh (resume=None)"
    )


# ----------------------------------------------------------------------------------------------------- dataset


class PackedBatches(IterableDataset):
    """Whole batches of packed token blocks: use `DataLoader(ds, batch_size=None, num_workers=W)`.

    Each item is {"input_ids": LongTensor[batch_size, seq_len + 1], "state": dict}; the trainer takes
    inputs = input_ids[:, :-1], targets = input_ids[:, 1:] and feeds "state" to a `StreamPosition`.
    `num_workers` (optional) is the DataLoader's worker count, for checking `resume` at construction; it is
    checked again when iteration starts either way.
    """

    def __init__(
        self,
        source: SourceSpec,
        tokenizer: Tokenizer,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_window: int = 256,
        loop: bool = True,
        holdout_every: int | None = None,
        holdout_role: Literal["train", "val"] = "train",
        resume: dict | None = None,
        drop_last: bool = False,
        num_workers: int | None = None,
    ):
        super().__init__()
        _check_positive(seq_len=seq_len, batch_size=batch_size, world_size=world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is invalid: expected 0 <= rank < world_size={world_size}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} is invalid: expected an integer >= 0")
        if shuffle_window < 0:
            raise ValueError(f"shuffle_window={shuffle_window} is invalid: expected >= 0 (0: no shuffle)")
        if holdout_every is not None and holdout_every < 2:
            raise ValueError(f"holdout_every={holdout_every} is invalid: expected null or an integer >= 2")
        if holdout_role not in ("train", "val"):
            raise ValueError(f"holdout_role={holdout_role!r} is invalid: expected 'train' or 'val'")
        self.source, self.tokenizer = source, tokenizer
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_window, self.loop, self.drop_last = shuffle_window, loop, drop_last
        self.holdout_every, self.holdout_role = holdout_every, holdout_role
        self.resume = resume if resume and resume.get("batches_consumed", 0) > 0 else None
        self._check_resume(num_workers)
        _load(source)  # fail here, in one line, on missing files, an unreachable dataset or a missing field

    # --- settings -----------------------------------------------------------------------------------------

    @property
    def block_len(self) -> int:
        return self.seq_len + 1

    def _settings(self, num_workers: int) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": num_workers,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle_window": self.shuffle_window,
            "holdout_every": self.holdout_every,
        }

    def _check_resume(self, num_workers: int | None) -> None:
        now = self._settings(num_workers)
        if num_workers is None:  # not known yet: checked when iteration starts
            del now["num_workers"]
        check_resume(self.resume, now)

    # --- documents ----------------------------------------------------------------------------------------

    def _doc_indices(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For source row numbers: which rows this split keeps, and their document index after the holdout."""
        h = self.holdout_every
        if h is None:
            return np.ones(rows.shape, dtype=bool), rows
        if self.holdout_role == "val":
            return rows % h == 0, rows // h
        return rows % h != 0, rows - rows // h - 1

    def _documents(self, source, skip: int, shard: int, num_shards: int) -> Iterator[tuple[int, list[int]]]:
        """(source row number, token ids) of this shard's documents from row `skip` on, in source order."""
        try:
            yield from self._read(source, skip, shard, num_shards)
        except (pa.ArrowException, UnicodeDecodeError) as exc:  # malformed JSON, bytes that are not UTF-8
            raise bad_rows(self.source, exc) from None

    def _read(self, source, skip: int, shard: int, num_shards: int) -> Iterator[tuple[int, list[int]]]:
        base = 0
        for table in _arrow_batches(source, self.source):
            n = table.num_rows
            if base + n <= skip:
                base += n
                continue
            rows = np.arange(max(skip, base), base + n)
            keep, index = self._doc_indices(rows)
            mine = rows[keep & (index % num_shards == shard)]
            if mine.size:
                values = table.column(self.source.field).take(mine - base).to_pylist()
                for start in range(0, len(values), DOCS_PER_ENCODE):
                    chunk = values[start : start + DOCS_PER_ENCODE]
                    ids = self._encode(chunk)
                    yield from zip(mine[start : start + DOCS_PER_ENCODE].tolist(), ids, strict=True)
            base += n

    def _encode(self, values: list) -> list[list[int]]:
        if self.source.pretokenized:
            return [v or [] for v in values]
        return self.tokenizer.encode_batch([v or "" for v in values])

    # --- windows ------------------------------------------------------------------------------------------

    def _windows(
        self, source, start: _WindowStart, shard: int, num_shards: int
    ) -> Iterator[tuple[_WindowStart, np.ndarray, _WindowStart]]:
        """(window start, blocks [n, seq_len + 1] in source order, start of the next window), from `start` on."""
        target, length, eos = max(1, self.shuffle_window), self.block_len, self.tokenizer.eos_id
        while self.loop or start.epoch == 0:
            buffer, pieces, count, seen = list(start.carry), [], 0, False
            for row, ids in self._documents(source, start.docs, shard, num_shards):
                seen = True
                buffer.extend(ids)
                if not ids or ids[-1] != eos:
                    buffer.append(eos)
                if len(buffer) < length:
                    continue
                cut = len(buffer) // length * length
                pieces.append(np.asarray(buffer[:cut], dtype=np.int64).reshape(-1, length))
                del buffer[:cut]
                count += cut // length
                if count >= target:  # close the window at this document boundary
                    following = _WindowStart(start.epoch, start.window_index + 1, row + 1, _ints(buffer))
                    yield start, np.concatenate(pieces), following
                    start, pieces, count = following, [], 0
            following = _WindowStart(start.epoch + 1, 0, 0, _ints(buffer))  # the carry continues into next epoch
            if count:
                yield start, np.concatenate(pieces), following
            if not seen and start.docs == 0 and self.loop:
                raise ValueError(
                    f"shard {shard} of {num_shards} (rank {self.rank}) has no documents: the source has fewer "
                    f"documents than world_size x num_workers = {num_shards}; use fewer workers or more data"
                )
            start = following

    def _permutation(self, role: int, start: _WindowStart, n: int) -> np.ndarray:
        if self.shuffle_window <= 1:
            return np.arange(n)
        key = [self.seed, self.rank, role, start.epoch, start.window_index]
        return np.random.default_rng(key).permutation(n)

    # --- batches ------------------------------------------------------------------------------------------

    def _state(self, role: int, start: _WindowStart, blocks_done: int, settings: dict) -> dict[str, Any]:
        return {
            "role": role,
            "epoch": start.epoch,
            "window_index": start.window_index,
            "docs_at_window_start": start.docs,
            "carry_at_window_start": start.carry_text,
            "blocks_done_in_window": blocks_done,
            **settings,
        }

    def _batches(self, windows, skip_blocks: int, role: int, settings: dict) -> Iterator[dict[str, Any]]:
        pending: list[np.ndarray] = []
        following = None
        for start, blocks, following in windows:
            order = self._permutation(role, start, len(blocks))
            for j in range(skip_blocks, len(blocks)):
                pending.append(blocks[order[j]])
                if len(pending) == self.batch_size:
                    done = j + 1
                    state = (
                        self._state(role, following, 0, settings)
                        if done == len(blocks)
                        else self._state(role, start, done, settings)
                    )
                    yield {"input_ids": torch.from_numpy(np.stack(pending)), "state": state}
                    pending = []
            skip_blocks = 0
        if pending and not self.drop_last:  # only reached without looping
            yield {"input_ids": torch.from_numpy(np.stack(pending)), "state": self._state(role, following, 0, settings)}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        num_workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
        if info is not None:
            _reset_fsspec_after_fork()
        self._check_resume(num_workers)
        consumed = self.resume["batches_consumed"] if self.resume else 0
        role = (consumed + worker_id) % num_workers
        saved = self.resume.get("roles", {}).get(str(role)) if self.resume else None
        start, skip_blocks = _WindowStart.from_state(saved)
        shard, num_shards = self.rank * num_workers + role, self.world_size * num_workers
        windows = self._windows(_load(self.source), start, shard, num_shards)
        yield from self._batches(windows, skip_blocks, role, self._settings(num_workers))


def check_resume(resume: dict | None, settings: dict[str, Any]) -> None:
    """Raise a one-line ValueError when a saved stream position (`resume`, a StreamPosition state) was written
    with other settings than `settings` (SETTING_KEYS; a key absent from either is not compared)."""
    if not resume or resume.get("batches_consumed", 0) <= 0:
        return
    for key in SETTING_KEYS:
        if key in resume and key in settings and resume[key] != settings[key]:
            raise _resume_error(key, resume[key], settings[key])


class StreamPosition:
    """The training process's record of the stream: update() with the state of each batch trained on;
    state_dict() is the `resume` argument of PackedBatches (JSON-serialisable), one per data-parallel rank."""

    def __init__(self):
        self.batches_consumed = 0
        self.roles: dict[str, dict] = {}
        self.settings: dict[str, Any] = {}

    def update(self, state: dict) -> None:
        workers = int(state["num_workers"])
        expected = self.batches_consumed % workers
        if int(state["role"]) != expected:
            raise RuntimeError(
                f"batch {self.batches_consumed} came from worker role {state['role']}, expected {expected}: the "
                "DataLoader must deliver batches in order (in_order=True) and every batch must be recorded"
            )
        self.roles[str(int(state["role"]))] = {key: state[key] for key in POSITION_KEYS}
        self.settings = {key: state[key] for key in SETTING_KEYS}
        self.batches_consumed += 1

    def state_dict(self) -> dict[str, Any]:
        roles = {role: _copy_state(s) for role, s in self.roles.items()}
        return {"batches_consumed": self.batches_consumed, **self.settings, "roles": roles}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches_consumed = int(state["batches_consumed"])
        self.settings = {key: state[key] for key in SETTING_KEYS if key in state}
        self.roles = {str(role): dict(s) for role, s in state.get("roles", {}).items()}


# ----------------------------------------------------------------------------------------------------- helpers


def _copy_state(state: dict) -> dict:
    return dict(state, carry_at_window_start=_ints(state["carry_at_window_start"]))


def _ints(tokens: str | list) -> list[int]:
    """Token ids as Python ints, from a list or from a batch state's carry string."""
    return [int(t) for t in (tokens.split() if isinstance(tokens, str) else tokens)]


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r} is invalid: expected an integer >= 1")


def _reset_fsspec_after_fork() -> None:
    """A forked worker must not reuse the parent's fsspec event loop (hangs with remote files)."""
    try:
        import fsspec.asyn

        fsspec.asyn.reset_lock()
    except (ImportError, AttributeError):
        pass
