"""Engine invariants on a tiny random Llama: chunking, determinism, sampling, honest bytes, specs."""
import pytest
import torch
from conftest import save_tiny_llama

from longkv.cache import spec as cache_spec
from longkv.cache.full import FullCache
from longkv.engine.decode import decode_tokens
from longkv.engine.prefill import prefill
from longkv.engine.sampling import Sampling, sample
from longkv.errors import UserError
from longkv.models.load import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(save_tiny_llama(tmp_path_factory, "tiny", hidden_size=48, num_attention_heads=6,
                                      num_key_value_heads=2))


def cache(model, cap=64):
    return FullCache(model.layer_specs(), batch=1, capacity=cap, device="cpu", dtype=torch.float32)


def ids(n, seed=0):
    return torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_prefill_equals_unchunked(tiny, chunk):
    x = ids(37)
    whole = prefill(tiny, cache(tiny), x, chunk=64, logits="all")
    parts = prefill(tiny, cache(tiny), x, chunk=chunk, logits="all")
    assert (whole - parts).abs().max() < 1e-5


def generate(model, x, n, sampling):
    kv = cache(model)
    logits = prefill(model, kv, x, chunk=8)
    return sum(decode_tokens(model, kv, logits, max_new_tokens=n, sampling=sampling, stop_ids=set()), [])


def test_greedy_is_deterministic_and_sampling_follows_the_seed(tiny):
    x = ids(12, 1)
    assert generate(tiny, x, 10, Sampling()) == generate(tiny, x, 10, Sampling())
    a = generate(tiny, x, 10, Sampling(1.0, 0.95, seed=7))
    assert a == generate(tiny, x, 10, Sampling(1.0, 0.95, seed=7))
    assert a != generate(tiny, x, 10, Sampling(1.0, 0.95, seed=8))


def test_stop_token_ends_generation(tiny):
    x = ids(12, 1)
    full = generate(tiny, x, 10, Sampling())
    kv = cache(tiny)
    got = sum(decode_tokens(tiny, kv, prefill(tiny, kv, x), max_new_tokens=10, sampling=Sampling(),
                            stop_ids={full[3]}), [])
    assert got == full[:full.index(full[3]) + 1]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {sample(logits, Sampling(1.0, 0.7), g).item() for _ in range(300)}
    assert seen == {0, 1}
    assert sample(logits, Sampling(0.0), g).item() == 0


def test_full_cache_nbytes_equals_its_tensors(tiny):
    kv = cache(tiny, cap=50)
    per_layer = 2 * 1 * 2 * 50 * 8 * 4  # k and v, B, Hkv, capacity, D, fp32
    assert kv.nbytes() == 2 * per_layer == sum(t.numel() * t.element_size() for t in kv.k + kv.v)
    prefill(tiny, kv, ids(20))
    assert kv.length == 20 and kv.full_nbytes() == 2 * 2 * 2 * 20 * 8 * 4


def test_prefill_past_capacity_is_a_clear_error(tiny):
    with pytest.raises(UserError, match="holds 8 tokens"):
        prefill(tiny, cache(tiny, cap=8), ids(9))


@pytest.mark.parametrize("bad,msg", [("", "empty"), ("nope", "unknown cache method 'nope'"),
                                     ("full:x=1", "has no parameter 'x'"), ("full:x", "key=value")])
def test_bad_cache_specs(bad, msg):
    with pytest.raises(UserError, match=msg):
        cache_spec.parse(bad)


def test_spec_round_trip():
    s = cache_spec.parse("full")
    assert str(s) == "full" and cache_spec.parse(str(s)) == s


def test_gemma_one_chunk_prefill_equals_small_chunks(tiny_gemma):
    """A chunk over twice the sliding window runs those layers' attention in bands (banded_lse): the same
    logits as chunks smaller than the window, where every chunk attends through the cache."""
    specs = tiny_gemma.layer_specs()
    x = ids(45, seed=2)
    a, b = (prefill(tiny_gemma, FullCache(specs, batch=1, capacity=64, device="cpu", dtype=torch.float32), x,
                    chunk=c, logits="all") for c in (45, 3))
    assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("chunk", [3, 8, 16])
def test_full_cache_keeps_only_the_window_of_sliding_layers(tiny_gemma, chunk):
    """Sliding-window layers hold a ring of `window` slots: the same logits and tokens as keeping every
    token (ring=False), eager and through the device-only decode step, in a fifth of the bytes here."""
    model, cap = tiny_gemma, 64
    specs = model.layer_specs()
    ring = FullCache(specs, batch=1, capacity=cap, device="cpu", dtype=torch.float32)
    every = FullCache(specs, batch=1, capacity=cap, device="cpu", dtype=torch.float32, ring=False)
    x = ids(45, seed=1)
    a, b = prefill(model, ring, x, chunk=chunk, logits="all"), prefill(model, every, x, chunk=chunk, logits="all")
    assert (a - b).abs().max() < 1e-5
    windowed = [i for i, s in enumerate(specs) if s.window is not None]
    assert windowed and all(ring.k[i].shape[2] == 8 for i in windowed)
    assert ring.nbytes() == sum(t.numel() * t.element_size() for t in ring.k + ring.v) < every.nbytes() / 3
    assert ring.full_nbytes() == sum(2 * 2 * 16 * 4 * (8 if s.window else 45) for s in specs)
    toks = [sum(decode_tokens(model, kv, lg[:, -1], max_new_tokens=12, sampling=Sampling(), stop_ids=set()), [])
            for kv, lg in ((ring, a), (every, b))]
    assert toks[0] == toks[1]
    kv = FullCache(specs, batch=1, capacity=cap, device="cpu", dtype=torch.float32)   # the graph's step
    out = [int(prefill(model, kv, x, chunk=chunk).argmax(-1))]
    with torch.inference_mode():
        for _ in range(11):
            logits = model(torch.tensor([[out[-1]]]), model.make_step(torch.tensor([kv.length]), None), kv)[:, -1]
            kv.advance(1)
            out.append(int(logits.argmax(-1)))
    assert out == toks[0]
