"""conf/data/climbmix.yaml on local files of the ClimbMix card's schema: the official GPT-2 token ids (`tokens`,
with `token_count` and `cluster_id`; jsonl as released, parquet as the card's details list says) and the community
raw-text version (`text`). The packed stream holds every training document once, with one EOS between them."""

from __future__ import annotations

import json
import random
from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from egmla import compose
from egmla.data.tokenizer import build_tokenizer
from egmla.train.datamodule import StreamDataModule

EOS = 50256  # GPT-2 <|endoftext|>
DOCS = 12


def token_rows(ends_in_eos: bool) -> list[dict]:
    """Documents of GPT-2 ids as the official release stores them; every other one ends in <|endoftext|>."""
    rng = random.Random(0)
    rows = []
    for i in range(DOCS):
        ids = [rng.randrange(EOS) for _ in range(rng.randint(3, 30))]
        if ends_in_eos and i % 2:
            ids.append(EOS)
        rows.append({"tokens": ids, "token_count": len(ids), "cluster_id": rng.randint(1, 20)})
    return rows


def write(path, rows: list[dict]) -> None:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def packed(path, *overrides: str) -> list[int]:
    """The training stream conf/data/climbmix.yaml makes of a local file: its fields, holdout and tokenizer."""
    builder = "parquet" if path.suffix == ".parquet" else "json"
    cfg = compose(
        [
            "data=climbmix",
            "data.path=null",
            f"data.builder={builder}",
            f"data.data_files={path}",
            "data.seq_len=15",
            "data.batch_size=2",
            "data.shuffle_window=0",
            "data.num_workers=0",
            "data.holdout_every=4",
            *overrides,
        ]
    )
    data = StreamDataModule(OmegaConf.to_container(cfg.data, resolve=True), seed=0)
    batches = islice(data._dataset("train", rank=0, world=1), 4)  # the stream loops: 4 x 2 x 16 tokens suffice
    return torch.cat([b["input_ids"] for b in batches]).reshape(-1).tolist()


def expected(documents: list[list[int]]) -> list[int]:
    """Training documents (1, 2, 3, 5, ...: every 4th is held out) each followed by exactly one EOS, looping."""
    kept = [ids[:-1] if ids and ids[-1] == EOS else ids for i, ids in enumerate(documents) if i % 4]
    return [t for ids in kept for t in [*ids, EOS]] * 10


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("ends_in_eos", [False, True])
def test_token_ids_are_packed_as_stored_with_one_eos_between_documents(tmp_path, suffix, ends_in_eos):
    rows = token_rows(ends_in_eos)
    write(tmp_path / f"part_0.tokenized{suffix}", rows)
    stream = packed(tmp_path / f"part_0.tokenized{suffix}")
    assert stream == expected([row["tokens"] for row in rows])[: len(stream)] and len(stream) == 128
    assert all(a != EOS or b != EOS for a, b in zip(stream, stream[1:], strict=False))  # never two in a row


def test_the_raw_text_version_is_tokenized_with_gpt2(tmp_path):
    rng = random.Random(1)
    words = ["climb", " mix", " data", ",", " the", " token", "s", " 400B", "\n"]
    rows = [
        {
            "text": "".join(rng.choice(words) for _ in range(rng.randint(2, 12))),
            "cluster_id": rng.randint(1, 20),
            "token_count": float(rng.randint(2, 12)),
        }
        for _ in range(DOCS)
    ]
    write(tmp_path / "part_0.jsonl", rows)
    stream = packed(tmp_path / "part_0.jsonl", "data.token_field=null")  # as the yaml says for OptimalScale/ClimbMix
    gpt2 = build_tokenizer("gpt2")
    assert stream == expected([gpt2.encode(row["text"]) for row in rows])[: len(stream)] and len(stream) == 128
