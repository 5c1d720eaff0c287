"""benchmarks/answer_logprob.py's `fq:` diagnostic caches: the full cache with its keys and/or values fake-quantized
as kv4 stores them. With both halves quantized it must give kv4's own next-token logits after a one-chunk prefill
(the claim its figures rest on), and with neither, full's."""
import sys
from pathlib import Path

import pytest
import torch

from longkv.engine.prefill import prefill

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import answer_logprob as al  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_llama32):
    return tiny_llama32


def next_logits(model, spec, n=400):
    """Logits of one decode step after a one-chunk prefill of n tokens (400: 4 full 64-token groups are packed and
    the step flushes none)."""
    ids = torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(3))
    kv = al.build(spec, model, batch=1, capacity=n + 8, device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        prefill(model, kv, ids, chunk=n)
        step = model.make_step(torch.tensor([kv.length]), None if kv.graph_safe else kv.length)  # kres: eager
        return model(torch.tensor([[5]]), step, kv)[0, -1]


def test_fake_quant_both_halves_is_kv4_and_neither_is_full(tiny):
    kv4, full = next_logits(tiny, "kv4"), next_logits(tiny, "full")
    both, none = next_logits(tiny, "fq:k=4,v=4"), next_logits(tiny, "fq:k=0,v=0")
    assert (both - kv4).abs().max() < 1e-4 * kv4.abs().max()
    assert torch.equal(none, full)
    assert (both - full).abs().max() > 10 * (both - kv4).abs().max()    # the 4 bits do move the logits
    keys = next_logits(tiny, "fq:k=4")                                  # keys alone: between the two
    assert 0 < (keys - full).abs().max() and (keys - kv4).abs().max() > 0


def test_fake_quant_of_some_layers_only(tiny):
    """lo/hi: only those layers quantized; all of them is the whole spec, none of them is full."""
    full, both = next_logits(tiny, "full"), next_logits(tiny, "fq:k=4,v=4")
    assert torch.equal(next_logits(tiny, "fq:k=4,v=4,lo=0,hi=2"), both)
    assert torch.equal(next_logits(tiny, "fq:k=4,v=4,lo=2,hi=3"), full)
    first = next_logits(tiny, "fq:k=4,v=4,lo=0,hi=1")
    assert not torch.equal(first, full) and not torch.equal(first, both)


def test_key_layouts_error_where_the_key_error_table_says():
    """benchmarks/key_error.py's layouts on Gaussian keys: the residual bit keeps kv4's codes and cuts the squared
    error about 4x (no element moves by more than a quarter step); MSE clipping never does worse than min/max (the
    full range is one of its candidates); 16-token groups sit between."""
    import key_error as ke
    from longkv.kernels import quant_reference as ref

    k = torch.randn(2, 3, 256, 32, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.2, 4, 32)
    sq = lambda y: float((y - k).square().sum())                                     # noqa: E731
    base, res, g16, clip = sq(ke.keys(k, 64)), sq(ke.keys(k, 64, res=True)), sq(ke.keys(k, 16)), sq(
        ke.clipped(k, 4, 64, True))
    assert 0.2 < res / base < 0.35 and res < g16 < base and clip <= base * (1 + 1e-6)
    step = ref.quantize_keys(k, bits=4, group=64)["scale"].float().repeat_interleave(64, 2)
    assert ((ke.keys(k, 64, res=True) - ke.keys(k, 64)).abs() - step / 4).abs().max() < 1e-5 * step.max()
    vq = ref.quantize_tokens(k, bits=4, vgroup=32)                                   # values: per token
    vbase = float((ref.dequantize_tokens(vq, bits=4, vgroup=32, d=32) - k).square().sum())
    assert sq(ke.clipped(k, 4, 32, False)) <= vbase * (1 + 1e-6)


def test_fake_quant_residual_bit_moves_keys_toward_full(tiny):
    """fq:k=4,kres=1: the keys' residual bit brings the step's logits closer to full's than kv4's keys alone; with
    the values quantized too it gives the package's `kv4:kres=1` logits (two implementations of the bit agree)."""
    full, k4, kres = next_logits(tiny, "full"), next_logits(tiny, "fq:k=4"), next_logits(tiny, "fq:k=4,kres=1")
    assert 0 < (kres - full).abs().max() < (k4 - full).abs().max()
    both, cache = next_logits(tiny, "fq:k=4,v=4,kres=1"), next_logits(tiny, "kv4:kres=1")
    assert (both - cache).abs().max() < 1e-4 * cache.abs().max() < (both - next_logits(tiny, "kv4")).abs().max()
