"""`kernels.gemv` (the batch-1 projections with their norm / activation / residual folded in) against its
plain-torch reference: the kernel on random inputs at odd sizes (interpreter on CPU, or the GPU), and a tiny
Llama's decode through it against the torch path."""
import pytest
import torch
from conftest import save_tiny_llama

from longkv.cache.full import FullCache
from longkv.engine.prefill import prefill
from longkv.kernels import gemv as gv
from longkv.models.load import load_model

pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1" else "cpu"

FUSIONS = [dict(), dict(norm=True), dict(act="silu"), dict(act="silu", norm=True), dict(act="gelu_pytorch_tanh"),
           dict(act="gelu", bias=True), dict(res=True), dict(res=True, bias=True), dict(norm=True, f32=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,cfg", [(37, 100, (8, 64, 4, 1)), (64, 576, (4, 256, 4, 1)), (130, 1536, (16, 512, 4, 1)),
                                     (9, 40, (32, 1024, 8, 1))])
@pytest.mark.parametrize("fusion", FUSIONS, ids=lambda f: "+".join(f) or "plain")
def test_gemv_matches_reference(dtype, n, k, cfg, fusion):
    g = torch.Generator(device=DEV).manual_seed(n * k)
    x = torch.randn(1, 1, k, generator=g, device=DEV).to(dtype)
    rows = 2 * n if "act" in fusion else n
    w = (torch.randn(rows, k, generator=g, device=DEV) / k ** 0.5).to(dtype)
    kw = dict(act=fusion.get("act"), eps=1e-5, out_dtype=torch.float32 if fusion.get("f32") else None,
              norm=(torch.rand(k, generator=g, device=DEV) + 0.5).to(dtype) if fusion.get("norm") else None,
              res=torch.randn(1, 1, n, generator=g, device=DEV).to(dtype) if fusion.get("res") else None)
    b = torch.randn(rows, generator=g, device=DEV).to(dtype) if fusion.get("bias") else None
    y = gv.gemv(x, w, b, cfg=cfg, **kw)
    want = gv.reference(x, w, b, **kw)
    assert y.shape == (1, 1, n) and y.dtype == want.dtype
    # fp32: summation order only. bf16: the output's rounding can land a step apart; and Triton's interpreter casts
    # fp32 to bf16 by truncation (checked: 1 + 2^-8 + 2^-10 -> 1.0), a bias of up to a step at each of the kernel's
    # roundings (the normed input or the gate and up outputs, the output), so on CPU three steps
    step = 2 ** -7 if DEV == "cuda" else 3 * 2 ** -7
    tol = 1e-5 if dtype == torch.float32 else step * (1 + want.abs().max().item())
    assert (y.float() - want.float()).abs().max().item() <= tol


@pytest.mark.parametrize("block,n,k", [(2, 38, 100), (4, 64, 576), (8, 40, 1536)])
def test_gemv_interleaved_gate_up(block, n, k):
    """The gated form over `interleave`d rows (each program's gate and up rows one contiguous run) gives the same
    outputs as over [gate; up], bias included; `deinterleave` undoes the row order on a matmul's output."""
    g = torch.Generator(device=DEV).manual_seed(n + k)
    x = torch.randn(1, 1, k, generator=g, device=DEV)
    w = torch.randn(2 * n, k, generator=g, device=DEV) / k ** 0.5
    b = torch.randn(2 * n, generator=g, device=DEV)
    norm = torch.rand(k, generator=g, device=DEV) + 0.5
    wi = gv.interleave(w, block)
    assert not torch.equal(wi, w) and torch.equal(wi.sort(0).values, w.sort(0).values)
    want = gv.reference(x, w, b, norm=norm, act="silu", eps=1e-5)
    got = gv.gemv(x, wi, b, norm=norm, act="silu", eps=1e-5, cfg=(16, 256, 4, 1), ilv=block)
    assert (got - want).abs().max().item() <= 1e-5
    gate, up = gv.deinterleave(x @ wi.T, block)
    assert torch.allclose(gate, x @ w[:n].T, atol=1e-6) and torch.allclose(up, x @ w[n:].T, atol=1e-6)


def test_gemv_takes_only_one_row():
    x = torch.randn(2, 1, 8)
    assert not gv.enabled(x)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(save_tiny_llama(tmp_path_factory, "tiny_gemv", hidden_size=48, num_attention_heads=6,
                                      num_key_value_heads=2, mlp_bias=True, attention_bias=True))


def test_decode_through_gemv_equals_torch_path(tiny, monkeypatch):
    """One decode step of a Llama (biases on) with LONGKV_GEMV=cpu (the four GEMVs a layer and the head, norms and
    adds inside) gives the torch path's logits. A prefill's last-token head (one row) takes it too; its layers do
    not."""
    x = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    out = {}
    for mode in ("0", "cpu"):
        monkeypatch.setenv("LONGKV_GEMV", mode)
        kv = FullCache(tiny.layer_specs(), batch=1, capacity=32, device="cpu", dtype=torch.float32)
        pre = prefill(tiny, kv, x[:, :8], chunk=8)
        step = tiny.make_step(torch.tensor([8]), 8)
        out[mode] = pre, tiny(x[:, 8:], step, kv, logits="last")
    assert (out["0"][0] - out["cpu"][0]).abs().max() < 1e-4
    assert (out["0"][1] - out["cpu"][1]).abs().max() < 1e-4


def test_interleaved_mlp_equals_plain(tmp_path_factory, monkeypatch):
    """A Llama loaded with gemv.ILV (gate/up rows interleaved at fuse) gives the same prefill and decode logits as
    without, on the torch path and through the GEMV."""
    x = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(1))
    folder = save_tiny_llama(tmp_path_factory, "tiny_ilv", hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                             mlp_bias=True)
    out = {}
    for ilv in (False, True):
        monkeypatch.setattr(gv, "ILV", ilv)
        m = load_model(folder)
        assert bool(m.model.layers[0].mlp.ilv) == ilv
        for mode in ("0", "cpu"):
            monkeypatch.setenv("LONGKV_GEMV", mode)
            kv = FullCache(m.layer_specs(), batch=1, capacity=32, device="cpu", dtype=torch.float32)
            pre = prefill(m, kv, x[:, :8], chunk=8)
            out[ilv, mode] = pre, m(x[:, 8:], m.make_step(torch.tensor([8]), 8), kv, logits="last")
    for key in out:
        assert (out[key][0] - out[False, "0"][0]).abs().max() < 1e-4
        assert (out[key][1] - out[False, "0"][1]).abs().max() < 1e-4
