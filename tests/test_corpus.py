"""The embedded corpus builder on small in-memory texts: documents, the train/val split, the manifest, idempotence.

Nothing here downloads: the fetching step is replaced by a function that returns in-memory sources.
"""

from __future__ import annotations

import hashlib
import json
import random
import re

import pytest

from egmla.data import corpus
from egmla.data.corpus import (
    CorpusError,
    Source,
    SourceUnavailable,
    build_embedded_corpus,
    clean_text,
    documents,
    split_documents,
    split_train_val,
    val_count,
)

WORDS = ["the", "of", "and", "to", "a", "in", "that", "is", "was", "he", "for", "it", "with", "as", "his", "on"]


def make_text(n_paragraphs: int, seed: int = 0, words: tuple[int, int] = (5, 80)) -> str:
    """Paragraphs of random words on wrapped lines, separated by blank lines (sometimes with stray spaces)."""
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(n_paragraphs):
        line_words = [rng.choice(WORDS) for _ in range(rng.randint(*words))]
        lines = [" ".join(line_words[i : i + 10]) for i in range(0, len(line_words), 10)]
        paragraphs.append("\n".join(lines))
    return "".join(p + rng.choice(["\n\n", "\n\n\n", "\n  \n"]) for p in paragraphs).strip()


def sources() -> list[Source]:
    return [
        Source("plays", "test", "public domain", [(f"play{i}", make_text(60, seed=i)) for i in range(4)]),
        Source("notes", "test", "public domain", [("short", "A single short work."), ("mid", make_text(5, 9))]),
    ]


def fake_fetch(calls: list | None = None):
    def fetch(cache, log):
        if calls is not None:
            calls.append(cache)
        return sources(), [{"name": "skipped-one", "reason": "not on this machine"}]

    return fetch


def squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


# ---------------------------------------------------------------------------------------------------------------
# Documents


def test_clean_text_strips_gutenberg_boilerplate():
    raw = (
        "The Project Gutenberg EBook of X\r\nlicence...\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\n"
        "Real text.\r\n\r\nMore text.\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nmore licence\r\n"
    )
    assert clean_text(raw) == "Real text.\n\nMore text."
    assert clean_text("  no markers here\r\n") == "no markers here"


@pytest.mark.parametrize("doc_chars", [300, 1000, 4000])
def test_documents_are_contiguous_text_covering_everything(doc_chars):
    text = make_text(200)
    docs = split_documents(text, doc_chars)
    position = 0
    for doc in docs:  # each document is a slice of the text, in order, with nothing skipped but whitespace
        found = text.find(doc, position)
        assert found >= 0 and text[position:found].strip() == ""
        position = found + len(doc)
    assert text[position:].strip() == ""
    assert squeeze("".join(docs)) == squeeze(text)
    assert all(doc == doc.strip() and doc for doc in docs)
    assert max(map(len, docs)) <= doc_chars * 5 // 4  # at most a merged short tail over the target
    assert len(text) / len(docs) > doc_chars * 0.6 and len(docs[-1]) > doc_chars // 4  # filled greedily


def test_documents_end_at_paragraph_breaks():
    text = make_text(100, seed=3)
    for doc in split_documents(text, 1000)[:-1]:
        end = text.find(doc) + len(doc)
        assert text[end : end + 2].strip() == "" and "\n" in text[end : end + 3]


def test_long_paragraph_is_cut_at_line_ends_and_long_line_kept_whole():
    paragraph = "\n".join(f"line {i} " + "x" * 60 for i in range(100))  # one ~7K-character paragraph
    docs = split_documents(paragraph, 1000)
    assert len(docs) > 5 and all(len(d) <= 1250 for d in docs)
    assert "\n".join(docs) == paragraph
    one_line = "y" * 5000
    assert split_documents(one_line, 1000) == [one_line]


def test_short_tail_joins_previous_document():
    text = make_text(40, seed=1) + "\n\nThe end."
    docs = split_documents(text, 1000)
    assert docs[-1].endswith("The end.") and len(docs[-1]) > len("The end.")
    assert split_documents("   ", 1000) == [] and split_documents("tiny", 1000) == ["tiny"]


def test_documents_are_labelled_by_source_and_work():
    docs = documents(sources(), 1000)
    labels = {doc["source"] for doc in docs}
    assert labels == {"plays/play0", "plays/play1", "plays/play2", "plays/play3", "notes/short", "notes/mid"}
    assert {"text": "A single short work.", "source": "notes/short"} in docs


# ---------------------------------------------------------------------------------------------------------------
# Train/val split


def test_val_count():
    assert val_count(1000, 0.02) == 20
    assert val_count(50, 0.02) == corpus.MIN_VAL_DOCS  # at least a few documents
    assert val_count(4, 0.02) == 2  # never more than half
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            val_count(100, bad)
    with pytest.raises(ValueError, match="at least 2"):
        val_count(1, 0.5)


def test_split_is_deterministic_disjoint_and_complete():
    docs = [{"text": f"doc {i}", "source": "s/w"} for i in range(500)]
    train, val = split_train_val(docs, 0.02, seed=0)
    assert (train, val) == split_train_val(docs, 0.02, seed=0)
    assert len(val) == 10 and len(train) == 490
    assert sorted(d["text"] for d in train + val) == sorted(d["text"] for d in docs)
    assert split_train_val(docs, 0.02, seed=1)[1] != val
    assert train != docs[10:], "train documents are shuffled too"


# ---------------------------------------------------------------------------------------------------------------
# Output files, manifest, idempotence


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_build_writes_splits_and_manifest(tmp_path):
    out = tmp_path / "embedded"
    manifest = build_embedded_corpus(out, 0.1, seed=0, doc_chars=1000, fetch=fake_fetch(), log=lambda line: None)
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["params"] == {"val_fraction": 0.1, "seed": 0, "doc_chars": 1000}
    assert [s["name"] for s in manifest["sources"]] == ["plays", "notes"]
    assert all(s["licence"] == "public domain" for s in manifest["sources"])
    assert manifest["skipped"] == [{"name": "skipped-one", "reason": "not on this machine"}]
    all_docs = documents(sources(), 1000)
    written = []
    for split in ("train", "val"):
        entry, path = manifest["splits"][split], out / f"{split}.jsonl"
        rows = read_jsonl(path)
        assert all(set(row) == {"text", "source"} for row in rows)
        assert entry["documents"] == len(rows) and entry["characters"] == sum(len(r["text"]) for r in rows)
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["gpt2_tokens"] > entry["characters"] / 8
        written += rows
    assert manifest["splits"]["val"]["documents"] == val_count(len(all_docs), 0.1)
    assert sorted(map(json.dumps, written)) == sorted(map(json.dumps, all_docs))
    assert not list(out.glob("*.tmp"))


def test_build_is_idempotent_and_deterministic(tmp_path):
    out, calls, lines = tmp_path / "embedded", [], []
    first = build_embedded_corpus(out, 0.1, doc_chars=1000, fetch=fake_fetch(calls), log=lines.append)
    train_bytes = (out / "train.jsonl").read_bytes()
    assert len(calls) == 1 and calls[0] == out / ".cache"

    lines.clear()
    again = build_embedded_corpus(out, 0.1, doc_chars=1000, fetch=fake_fetch(calls), log=lines.append)
    assert again == first and len(calls) == 1, "a matching manifest means nothing is fetched or written"
    assert len(lines) == 1 and "already built" in lines[0]

    build_embedded_corpus(out, 0.1, doc_chars=1000, force=True, fetch=fake_fetch(calls), log=lines.append)
    assert len(calls) == 2 and (out / "train.jsonl").read_bytes() == train_bytes  # same inputs, same bytes

    reseeded = build_embedded_corpus(out, 0.1, seed=1, doc_chars=1000, fetch=fake_fetch(calls), log=lines.append)
    assert len(calls) == 3 and reseeded["params"]["seed"] == 1
    assert (out / "train.jsonl").read_bytes() != train_bytes


def test_damaged_output_is_rebuilt(tmp_path):
    out, calls = tmp_path / "embedded", []
    build_embedded_corpus(out, 0.1, doc_chars=1000, fetch=fake_fetch(calls), log=lambda line: None)
    with (out / "val.jsonl").open("a") as f:
        f.write('{"text": "extra", "source": "x"}\n')
    build_embedded_corpus(out, 0.1, doc_chars=1000, fetch=fake_fetch(calls), log=lambda line: None)
    assert len(calls) == 2
    (out / "manifest.json").write_text("{not json")
    build_embedded_corpus(out, 0.1, doc_chars=1000, fetch=fake_fetch(calls), log=lambda line: None)
    assert len(calls) == 3


def test_summary_names_documents_characters_tokens(tmp_path):
    lines = []
    build_embedded_corpus(tmp_path, 0.1, doc_chars=1000, fetch=fake_fetch(), log=lines.append)
    text = "\n".join(lines)
    assert "train" in text and "val" in text and "documents" in text and "GPT-2 tokens" in text


# ---------------------------------------------------------------------------------------------------------------
# Fetch orchestration (fetchers replaced: no pip, no apt)


def test_optional_source_is_skipped_required_source_fails(tmp_path, monkeypatch):
    def ok(cache, log):
        return Source("ok", "test", "public domain", [("w", "text")])

    def unavailable(cache, log):
        raise SourceUnavailable("apt-get not found")

    monkeypatch.setattr(corpus, "FETCHERS", {"ok": (ok, True), "optional": (unavailable, False)})
    lines = []
    found, skipped = corpus.fetch_sources(tmp_path, lines.append)
    assert [s.name for s in found] == ["ok"] and skipped == [{"name": "optional", "reason": "apt-get not found"}]
    assert any("optional: skipped (apt-get not found)" in line for line in lines)

    monkeypatch.setattr(corpus, "FETCHERS", {"required": (unavailable, True)})
    with pytest.raises(CorpusError, match="source required: apt-get not found"):
        corpus.fetch_sources(tmp_path, lines.append)


def test_python_docs_source_is_local():
    source = corpus.fetch_python_docs(None, lambda line: None)
    assert len(source.works) > 20 and source.characters > 100_000 and source.licence == "PSF-2.0"


def test_cli_error_is_one_line(tmp_path, capsys):
    assert corpus.main(["--out", str(tmp_path), "--val-fraction", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: val_fraction=2.0 is invalid")


def test_cli_reports_existing_corpus(tmp_path, capsys):
    build_embedded_corpus(tmp_path, 0.02, fetch=fake_fetch(), log=lambda line: None)
    assert corpus.main(["--out", str(tmp_path)]) == 0  # matching manifest: no fetching at all
    assert "already built" in capsys.readouterr().out
