"""Triton kernels against their plain-torch references (CPU via TRITON_INTERPRET=1)."""

import pytest
import torch

from longkv.kernels import reference
from longkv.kernels.attention import banded_lse, chunk_attention, past_attention

triton = pytest.importorskip("triton")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])



@pytest.mark.parametrize("B,Hq,Hkv,D,cap,length,window,softcap,splits", [
    (1, 4, 2, 64, 100, 77, None, None, 3),
    (2, 9, 3, 64, 130, 130, None, None, 4),
    (1, 4, 1, 32, 70, 50, 16, None, 2),
    (1, 2, 2, 16, 40, 1, None, 20.0, 5),
])
@pytest.mark.parametrize("device", DEVICES)
def test_decode_kernel_matches_reference(B, Hq, Hkv, D, cap, length, window, softcap, splits, device):
    from longkv.kernels.decode import decode_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, t, D, generator=g).to(device) for h, t in ((Hq, 1), (Hkv, cap), (Hkv, cap)))
    n = torch.tensor([length], device=device)
    got = decode_attention(q, k, v, n, scale=D ** -0.5, window=window, softcap=softcap, splits=splits)
    ref = reference.decode_attention(q, k, v, n, scale=D ** -0.5, window=window, softcap=softcap)
    assert (got - ref).abs().max().item() < (1e-4 if device == "cpu" else 5e-3)  # tf32 dots on GPU


def test_fused_past_and_chunk_attention_match_reference(monkeypatch):
    import longkv.kernels.attention as attn

    monkeypatch.setattr(attn, "CPU_FUSED_MIN", 0)  # the fused kernels even at this small size
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 5, 16, generator=g)
    k = torch.randn(2, 2, 11, 16, generator=g)
    v = torch.randn(2, 2, 11, 16, generator=g)
    o, l = past_attention(q, k, v, scale=0.25)
    ro, rl = reference.attention_lse(q, k, v, scale=0.25)
    assert (o - ro).abs().max() < 1e-5 and (l - rl).abs().max() < 1e-5
    kc, vc = k[:, :, :5], v[:, :, :5]
    o, l = chunk_attention(q, kc, vc, scale=0.25)
    pos = torch.arange(5)
    ro, rl = reference.attention_lse(q, kc, vc, scale=0.25, mask=reference.visible(pos, pos, None))
    assert (o - ro).abs().max() < 1e-5 and (l - rl).abs().max() < 1e-5


@pytest.mark.parametrize("T,window,softcap", [(1000, 64, None), (777, 100, 30.0), (301, 7, None), (97, 40, None)])
def test_banded_sliding_window_chunk_matches_reference(T, window, softcap):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, T, 8, generator=g)
    k = torch.randn(2, 2, T, 8, generator=g)
    v = torch.randn(2, 2, T, 12, generator=g)
    pos = torch.arange(T)
    ro, rl = reference.attention_lse(q, k, v, scale=0.3, mask=reference.visible(pos, pos, window), softcap=softcap)
    for o, l in (chunk_attention(q, k, v, scale=0.3, window=window, softcap=softcap),
                 banded_lse(q, k, v, scale=0.3, window=window, softcap=softcap)):
        assert o.shape == ro.shape and l.shape == rl.shape
        assert (o - ro).abs().max() < 1e-5 and (l - rl).abs().max() < 1e-5


def test_merge_equals_attention_over_union():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 3, 8, generator=g)
    k = torch.randn(1, 2, 9, 8, generator=g)
    v = torch.randn(1, 2, 9, 8, generator=g)
    whole = reference.attention_lse(q, k, v, scale=0.3)
    a = reference.attention_lse(q, k[:, :, :4], v[:, :, :4], scale=0.3)
    b = reference.attention_lse(q, k[:, :, 4:], v[:, :, 4:], scale=0.3)
    o, l = reference.merge_lse(*a, *b)
    assert (o - whole[0]).abs().max() < 1e-5 and (l - whole[1]).abs().max() < 1e-5


def test_compiled_piece_falls_back_to_eager_past_the_recompile_limit(monkeypatch):
    """A torch.compile'd piece that hits dynamo's recompile limit warns once and runs eagerly."""
    import torch._dynamo

    from longkv.kernels import fused

    calls = []

    def raising(*a):
        calls.append(a)
        raise torch._dynamo.exc.FailOnRecompileLimitHit("limit")

    monkeypatch.setattr(fused, "_compiles", lambda x: True)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: raising)

    @fused.on_cuda
    def double(x):
        return 2 * x

    x = torch.ones(3)
    with pytest.warns(UserWarning, match="recompile limit"):
        assert torch.equal(double(x), 2 * x)
    assert torch.equal(double(x), 2 * x) and len(calls) == 1     # eager from then on
