"""Tokenizers: true GPT-2 ids offline (both backends agree), round trips, exact token bytes, EOS, pickling, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from egmla.data.tokenizer import GPT2_EOS, GPT2Tokenizer, build_tokenizer, bytes_to_unicode

# Reference GPT-2 ids ("<|endoftext|>" written in a text is ordinary text, not the EOS id).
KNOWN_IDS = {
    "Hello world": [15496, 995],
    " the": [262],
    "To be, or not to be: that is the question.": [2514, 307, 11, 393, 407, 284, 307, 25, 326, 318, 262, 1808, 13],
    GPT2_EOS: [27, 91, 437, 1659, 5239, 91, 29],
}
PARAGRAPH = (
    "Naïve café owners said: “Ünïcödé — ok?”  日本語のテキスト, 😀🎉 emoji,\n\n\n"
    "\ttabs\t\tand   runs of    spaces,\r\nCRLF lines, trailing spaces   \n"
    "numbers 1234567 3.14159, contractions it's we'll they've, and <|endoftext|> in the text.   "
)
TEXTS = ["", "a", "Hello world", PARAGRAPH, "  leading and trailing  ", "\n\n\n", "é" * 50]


@pytest.fixture(scope="module", params=["tiktoken", "tokenizers"])
def gpt2(request) -> GPT2Tokenizer:
    pytest.importorskip(request.param)
    return GPT2Tokenizer(request.param)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    """A local Hugging Face tokenizer directory holding the GPT-2 BPE (the offline stand-in for a hub name)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from egmla.data.tokenizer import _gpt2_encoder

    path = tmp_path_factory.mktemp("hf_gpt2")
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=_gpt2_encoder("tokenizers"), eos_token=GPT2_EOS
    ).save_pretrained(path)
    return str(path)


def test_gpt2_known_ids(gpt2):
    for text, ids in KNOWN_IDS.items():
        assert gpt2.encode(text) == ids, text


def test_gpt2_backends_agree():
    pytest.importorskip("tiktoken")
    pytest.importorskip("tokenizers")
    fast, fallback = GPT2Tokenizer("tiktoken"), GPT2Tokenizer("tokenizers")
    assert fast.encode(PARAGRAPH) == fallback.encode(PARAGRAPH)
    assert fast.encode_batch(TEXTS) == fallback.encode_batch(TEXTS)
    assert np.array_equal(fast.token_bytes(), fallback.token_bytes())


def test_build_gpt2_sizes():
    tokenizer = build_tokenizer("gpt2")
    assert (tokenizer.name, tokenizer.vocab_size, tokenizer.eos_id) == ("gpt2", 50257, 50256)
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.decode([tokenizer.eos_id]) == GPT2_EOS


def test_bytes_tokenizer():
    tokenizer = build_tokenizer("bytes")
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (257, 256)
    assert tokenizer.encode("hé") == [104, 0xC3, 0xA9]
    assert tokenizer.decode([104, 105, tokenizer.eos_id]) == "hi" + GPT2_EOS


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(gpt2, text):
    assert gpt2.decode(gpt2.encode(text)) == text
    byte_level = build_tokenizer("bytes")
    assert byte_level.decode(byte_level.encode(text)) == text


def test_encode_batch_matches_encode(gpt2):
    assert gpt2.encode_batch(TEXTS) == [gpt2.encode(text) for text in TEXTS]


def test_decode_accepts_arrays_and_tensors(gpt2):
    ids = gpt2.encode(PARAGRAPH)
    assert gpt2.decode(np.array(ids)) == gpt2.decode(torch.tensor(ids)) == PARAGRAPH


@pytest.mark.parametrize("name", ["gpt2", "bytes"])
def test_token_bytes_sum_to_utf8_length(name):
    tokenizer = build_tokenizer(name)
    sizes = tokenizer.token_bytes()
    assert sizes.shape == (tokenizer.vocab_size,) and np.issubdtype(sizes.dtype, np.integer)
    assert sizes[tokenizer.eos_id] == 0
    for text in TEXTS:
        assert sizes[tokenizer.encode(text)].sum() == len(text.encode("utf-8")), text


def test_gpt2_token_bytes_match_decoded_bytes(gpt2):
    """Every GPT-2 id stands for exactly its bytes (byte-level tokens may be partial UTF-8 characters)."""
    sizes = gpt2.token_bytes()
    assert len(bytes_to_unicode()) == 256 and len(set(bytes_to_unicode().values())) == 256
    if gpt2.backend == "tiktoken":
        for i in range(0, gpt2.vocab_size - 1, 97):
            assert sizes[i] == len(gpt2.encoder.decode_single_token_bytes(i))
    assert (sizes == 0).sum() == 1 and sizes[:256].tolist() == [1] * 256 and sizes.max() == 128


def test_token_bytes_is_a_copy():
    tokenizer = build_tokenizer("bytes")
    tokenizer.token_bytes()[0] = 99
    assert tokenizer.token_bytes()[0] == 1


def test_pickle_round_trip(gpt2):
    gpt2.token_bytes()  # cached state must not need to travel
    clone = pickle.loads(pickle.dumps(gpt2))
    assert len(pickle.dumps(gpt2)) < 1000, "the GPT-2 tokenizer should pickle as its name, not its 50K ranks"
    assert (clone.backend, clone.vocab_size, clone.eos_id) == (gpt2.backend, gpt2.vocab_size, gpt2.eos_id)
    assert clone.encode(PARAGRAPH) == gpt2.encode(PARAGRAPH)
    assert np.array_equal(clone.token_bytes(), gpt2.token_bytes())
    byte_level = pickle.loads(pickle.dumps(build_tokenizer("bytes")))
    assert byte_level.encode("hi") == [104, 105]


def test_local_hf_directory(hf_dir):
    tokenizer, gpt2 = build_tokenizer(hf_dir), build_tokenizer("gpt2")
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (50257, 50256)
    ordinary = PARAGRAPH.replace(GPT2_EOS, "")  # the HF tokenizer matches its EOS string as a special token
    assert tokenizer.encode(ordinary) == gpt2.encode(ordinary)
    assert tokenizer.encode_batch(["Hello world", ordinary]) == [[15496, 995], gpt2.encode(ordinary)]
    assert tokenizer.decode(tokenizer.encode(ordinary)) == ordinary
    assert np.array_equal(tokenizer.token_bytes(), gpt2.token_bytes())
    assert pickle.loads(pickle.dumps(tokenizer)).encode(ordinary) == gpt2.encode(ordinary)


@pytest.mark.parametrize("name", ["meta-llama/Not-A-Real-Tokenizer", "./no/such/tokenizer/dir"])
def test_unloadable_tokenizer_is_one_line(name, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError) as info:
        build_tokenizer(name)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    assert repr(name) in message and "data.tokenizer=gpt2" in message and "local tokenizer directory" in message


@pytest.mark.parametrize("why", ["HF_HUB_OFFLINE", "unreachable"])
def test_a_hub_name_without_the_hub_fails_at_once(monkeypatch, why):
    """HF_HUB_OFFLINE set after huggingface_hub was imported (it reads the variable once), or no hub to connect
    to: the cache alone is looked at, instead of a minute of retries."""
    import time

    pytest.importorskip("transformers")
    import huggingface_hub  # noqa: F401  (imported before the variable changes, as in a long-lived process)

    from egmla.data.tokenizer import PROXY_VARIABLES

    for key in PROXY_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    if why == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        build_tokenizer("meta-llama/Not-A-Real-Tokenizer")
    assert time.perf_counter() - start < 15
    message = str(info.value)
    assert "\n" not in message and "'meta-llama/Not-A-Real-Tokenizer'" in message
    assert ("HF_HUB_OFFLINE=1 is set" if why == "HF_HUB_OFFLINE" else "the hub at 127.0.0.1 is unreachable") in message
