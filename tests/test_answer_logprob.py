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
        step = model.make_step(torch.tensor([kv.length]), None)
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
