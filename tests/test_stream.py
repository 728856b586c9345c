"""The streamed data pipeline: packing, rank/worker sharding, holdout, windowed shuffle and exact resume."""

from __future__ import annotations

import json
import random
import traceback
from itertools import islice

import pytest
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch.utils.data import DataLoader

from egmla.data.stream import PackedBatches, SourceSpec, StreamPosition, open_documents

EOS = 256


class ByteTokenizer:
    """ids = UTF-8 bytes, EOS = 256: enough to test everything the stream does with a tokenizer."""

    eos_id = EOS

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]


def write_jsonl(path, rows: list[dict], **spec) -> SourceSpec:
    """Write rows as JSON lines and return the source that streams them back."""
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return SourceSpec(builder="json", data_files=str(path), **spec)


def varied_docs(n: int, seed: int = 0) -> list[str]:
    """Documents of 0 to ~60 characters, one of several blocks, each starting with its own index."""
    rng = random.Random(seed)
    docs = [f"<{i}>" + "".join(rng.choice("abcdefgh ") for _ in range(rng.randrange(0, 50))) for i in range(n)]
    docs[3] = ""  # an empty document is just an EOS
    docs[5] = "<5>" + "z" * 70
    return docs


def fixed_docs(n: int, length: int) -> list[str]:
    """Documents of exactly `length` bytes: with EOS, length + 1 tokens each."""
    return [f"d{i:05d}".ljust(length, ".") for i in range(n)]


def doc_ids(blocks: torch.Tensor) -> list[int]:
    """Indices of the fixed-length documents in blocks that hold whole documents (one or more each)."""
    tokens = blocks.reshape(-1).tolist()
    texts = bytes(t for t in tokens if t != EOS).decode()
    return [int(texts[k + 1 : k + 6]) for k in range(0, len(texts), len(fixed_docs(1, 15)[0]))]


def make(source: SourceSpec, **kw) -> PackedBatches:
    args = dict(tokenizer=ByteTokenizer(), seq_len=15, batch_size=3, seed=0, shuffle_window=5, loop=True)
    return PackedBatches(source, **(args | kw))


def ids_of(batches) -> torch.Tensor:
    return torch.cat([b["input_ids"] for b in batches])


def test_blocks_are_documents_plus_eos_cut_in_pieces(tmp_path):
    docs = varied_docs(40)
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    assert [row["text"] for row in open_documents(source)] == docs
    batches = list(make(source, seq_len=7, batch_size=3, shuffle_window=0, loop=False))
    stream = [t for d in docs for t in [*d.encode(), EOS]]
    n = len(stream) // 8
    assert torch.equal(ids_of(batches), torch.tensor(stream[: n * 8]).reshape(n, 8))
    assert all(b["input_ids"].shape == (3, 8) and b["input_ids"].dtype == torch.long for b in batches[:-1])
    assert 1 <= len(batches[-1]["input_ids"]) <= 3  # validation keeps the final partial batch
    assert len(list(make(source, seq_len=7, shuffle_window=0, loop=False, drop_last=True))) == n // 3
    # looping: the next epoch starts again from the first document and the carry continues across the boundary
    looped = ids_of(islice(make(source, seq_len=7, shuffle_window=0), 2 * n // 3 + 2))
    assert torch.equal(looped, torch.tensor((stream * 3)[: len(looped) * 8]).reshape(-1, 8))


def test_pretokenized_source_is_not_retokenized(tmp_path):
    rows = [{"tokens": list(range(i, i + 1 + i % 7)), "text": "ignored"} for i in range(30)]
    source = write_jsonl(tmp_path / "t.jsonl", rows, token_field="tokens")
    stream = [t for row in rows for t in [*row["tokens"], EOS]]
    n = len(stream) // 16
    got = ids_of(make(source, shuffle_window=0, loop=False, drop_last=True))
    assert torch.equal(got, torch.tensor(stream[: len(got) * 16]).reshape(-1, 16)) and len(got) == n // 3 * 3


def test_ranks_and_workers_see_disjoint_documents_covering_the_stream(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in fixed_docs(64, 15)])
    seen = []
    for rank in range(2):  # blocks of 32 tokens = two whole documents; 16 documents per shard
        ds = make(source, seq_len=31, batch_size=2, shuffle_window=0, loop=False, rank=rank, world_size=2)
        per_role = {0: [], 1: []}
        for batch in DataLoader(ds, batch_size=None, num_workers=2):
            per_role[batch["state"]["role"]] += doc_ids(batch["input_ids"])
        for role, ids in per_role.items():
            assert ids == list(range(rank * 2 + role, 64, 4))  # shard rank * W + role, in source order
            seen += ids
    assert sorted(seen) == list(range(64))


def test_holdout_splits_documents_disjointly(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in fixed_docs(30, 15)])
    split = {
        role: doc_ids(ids_of(make(source, shuffle_window=0, loop=False, holdout_every=3, holdout_role=role)))
        for role in ("train", "val")
    }
    assert split["val"] == list(range(0, 30, 3))
    assert split["train"] == [i for i in range(30) if i % 3]
    for rank in range(2):  # shards count training documents after the holdout: 1, 2, 4, 5, 7, ... alternate
        ids = doc_ids(ids_of(make(source, shuffle_window=0, loop=False, holdout_every=3, rank=rank, world_size=2)))
        assert ids == split["train"][rank::2]


def test_same_seed_same_batches_other_seed_other_order(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in varied_docs(60)])
    first, again, other = (ids_of(make(source, seed=seed, loop=False)) for seed in (0, 0, 1))
    plain = ids_of(make(source, shuffle_window=0, loop=False))
    assert torch.equal(first, again)
    assert not torch.equal(first, other) and not torch.equal(first, plain)
    assert sorted(map(tuple, other.tolist())) == sorted(map(tuple, plain.tolist()))  # a permutation of the blocks


def resumed(ds_kwargs: dict, source: SourceSpec, k: int, total: int, num_workers: int) -> list[dict]:
    """Consume k batches, record them, drop the loader, resume from a JSON round trip, take total - k more."""

    def loader(ds):
        return DataLoader(ds, batch_size=None, num_workers=num_workers) if num_workers else ds

    position = StreamPosition()
    first = list(islice(loader(make(source, **ds_kwargs)), k))
    for batch in first:
        position.update(batch["state"])
    saved = json.loads(json.dumps(position.state_dict()))
    restored = StreamPosition()
    restored.load_state_dict(saved)
    assert restored.state_dict() == saved
    rest = list(islice(loader(make(source, resume=saved, **ds_kwargs)), total - k))
    return first + rest


def test_resume_is_exact_at_every_batch_in_process(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in varied_docs(30)])
    kwargs = dict(rank=1, world_size=2)
    total = 40  # about 3 epochs of this rank's shard, windows of >= 5 blocks
    full = list(islice(make(source, **kwargs), total))
    assert full[-1]["state"]["epoch"] >= 2
    for k in range(1, total):
        assert torch.equal(ids_of(resumed(kwargs, source, k, total, num_workers=0)), ids_of(full)), k


def test_resume_with_two_workers_matches_uninterrupted_run(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in varied_docs(60)])
    total = 48
    full = list(islice(DataLoader(make(source), batch_size=None, num_workers=2), total))
    states = [b["state"] for b in full]
    assert [s["role"] for s in states] == [0, 1] * (total // 2)
    # odd k: the resumed loader's worker 0 plays role 1; one k mid-window after crossing a window boundary,
    # one just after the stream crossed an epoch boundary
    k_window = next(
        k for k in range(3, total, 2) if states[k - 1]["window_index"] > 0 and states[k - 1]["blocks_done_in_window"]
    )
    k_epoch = next(k for k in range(1, total, 2) if states[k - 1]["epoch"] > 0)
    for k in (1, k_window, k_epoch):
        assert torch.equal(ids_of(resumed({}, source, k, total, num_workers=2)), ids_of(full)), k


def leaves(batch: dict) -> int:
    """Objects Lightning's move of a batch to the device visits one by one (it recurses into mappings and into
    sequences other than str), counted with the same walker."""
    visited = []
    apply_to_collection(batch, (torch.Tensor, int, float, str, type(None)), visited.append)
    return len(visited)


def test_a_batch_is_a_few_leaves_however_long_the_carry(tmp_path):
    # A carry of up to seq_len ints as a Python list made the training process walk each of them on every batch
    # once the first window was used up (experiments/throughput/README.md, "The drop after step 256").
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in varied_docs(60)])
    batches = list(islice(DataLoader(make(source, seq_len=63), batch_size=None, num_workers=2), 12))
    position, carries = StreamPosition(), []
    for batch in batches:
        position.update(batch["state"])
        role = str(batch["state"]["role"])
        carries.append(len(position.state_dict()["roles"][role]["carry_at_window_start"]))
    assert max(carries) > 8  # some window started with a long carry
    assert max(leaves(b) for b in batches) == 1 + len(batches[0]["state"])  # the ids tensor and one leaf per key


def test_resume_refuses_other_settings(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in varied_docs(20)])
    position = StreamPosition()
    for batch in islice(DataLoader(make(source), batch_size=None, num_workers=2), 3):
        position.update(batch["state"])
    saved = position.state_dict()
    with pytest.raises(ValueError, match=r"num_workers=1.*num_workers=2") as info:
        make(source, resume=saved, num_workers=1)
    assert "\n" not in str(info.value) and "afresh" in str(info.value)
    batches = iter(DataLoader(make(source, resume=saved), batch_size=None, num_workers=1))
    with pytest.raises(ValueError, match="num_workers=2") as info:  # checked again when iteration starts
        next(batches)
    traceback.clear_frames(info.tb)  # break the traceback's cycle so the worker is shut down now, not at exit
    del batches
    for key, value in (("seq_len", 31), ("batch_size", 4), ("world_size", 2), ("seed", 1), ("holdout_every", 3)):
        with pytest.raises(ValueError, match=f"{key}={value}"):
            make(source, resume=saved, **{key: value})


def test_missing_data_file_is_one_line(tmp_path):
    missing = str(tmp_path / "nowhere" / "train.jsonl")
    with pytest.raises(FileNotFoundError) as info:
        make(SourceSpec(builder="json", data_files={"train": missing}))
    message = str(info.value)
    assert "\n" not in message and missing in message and "make data" in message
    with pytest.raises(ValueError, match="text_field='body' is not a column"):
        make(write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}], text_field="body"))
