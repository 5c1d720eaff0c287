"""The tokenizer wrapper and the streaming detokenizer, on the real SmolLM2 tokenizer."""
import random

import pytest

from longkv.errors import UserError
from longkv.models import fetch
from longkv.models.tokenizer import StreamDecoder, Tokenizer

TEXTS = [
    "Hello, world!",
    "Grüße aus Köln — naïve café, déjà vu.",
    "日本語のテキストと中文混合 🙂🎉👩‍👩‍👧 end",
    "  leading spaces\n\ttabs\n\ncode: x = f(1, 2)  # ok",
    "Ω≈ç√∫˜µ≤≥÷ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def tok():
    try:
        return Tokenizer(fetch.resolve("smollm2-135m"))
    except UserError as e:
        pytest.skip(f"smollm2-135m is not cached and cannot be fetched: {e}")


def test_facts(tok):
    v = tok.hf.get_vocab()
    assert tok.has_chat_template and tok.vocab_size == 49152
    assert tok.bos_id == v["<|im_start|>"] and v["<|im_end|>"] in tok.stop_ids
    assert tok.eos_id in tok.stop_ids and v["<|endoftext|>"] in tok.stop_ids


def test_chat_applies_template_once(tok):
    user = "What is the capital of France?"
    ids = tok.chat(user)
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert f"<|im_start|>user\n{user}<|im_end|>" in text
    assert ids.count(tok.bos_id) == 3              # one <|im_start|> a turn, none added on top
    assert ids != tok.encode(user)
    sys_text = tok.decode(tok.chat(user, system="Answer in one word."), skip_special_tokens=False)
    assert sys_text.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>")


def test_without_template_chat_is_encode(tok, monkeypatch):
    monkeypatch.setattr(tok, "has_chat_template", False)   # as for a base model such as gemma3-270m
    assert tok.chat("Once upon a time") == tok.encode("Once upon a time")
    assert tok.chat("Q", system="S") == tok.encode("S\n\nQ")


@pytest.mark.parametrize("text", TEXTS)
def test_roundtrip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def stream(tok, ids, **kw):
    d = StreamDecoder(tok, **kw)
    pieces = [d.push(i) for i in ids]
    return pieces, d.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_matches_decode(tok, text):
    ids = tok.encode(text)
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)     # partial characters were held back


def test_stream_decoder_with_special_tokens(tok):
    ids = tok.chat("Hi") + tok.encode("Bonjour 🙂", add_special_tokens=False) + [tok.eos_id]
    for skip in (True, False):
        pieces, tail = stream(tok, ids, skip_special_tokens=skip)
        assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip)


def test_stream_decoder_random_ids(tok):
    """Arbitrary ids (as a sampler may produce) can form broken UTF-8; the stream still adds up."""
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tok.vocab_size) for _ in range(40)]
        pieces, tail = stream(tok, ids)
        assert "".join(pieces) + tail == tok.decode(ids)


def test_stream_decoder_holds_back_incomplete_character(tok):
    ids = tok.encode("🙂")
    assert len(ids) > 1                                 # a 4-byte character split over byte tokens
    d = StreamDecoder(tok)
    assert [d.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert d.push(ids[-1]) == "🙂" and d.flush() == ""
    d = StreamDecoder(tok)
    d.push(ids[0])
    assert d.flush() == tok.decode(ids[:1])             # generation ended mid-character
