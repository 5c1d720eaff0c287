"""The CUDA decode kernel over KIVI-layout packed KV (`kernels/quant_cuda.py`) against the torch
reference. It needs a GPU (NVRTC compiles it there): skipped on CPU-only machines such as CI; run on
the GPU machine with `TRITON_INTERPRET=0 python -m pytest tests/test_quant_cuda.py` (the Triton
kernels compared with it must compile for the GPU there, not run in the interpreter)."""

import pytest
import torch

from longkv.kernels import quant as qk
from longkv.kernels import quant_cuda as qc
from longkv.kernels import quant_reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _layer(B, H, D, cap, group, bits, sink, ring, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, cap, D, generator=g) * torch.linspace(0.2, 3, D)
    v = torch.randn(B, H, cap, D, generator=g) + torch.randn(B, H, cap, 1, generator=g)
    kq = ref.quantize_keys(k, bits=bits, group=group)
    vq = ref.quantize_tokens(v, bits=bits, vgroup=D)
    kf = torch.randn(B, H, sink + ring, D, generator=g)
    vf = torch.randn(B, H, sink + ring, D, generator=g)
    return kq, vq, kf, vf


def _cuda(x):
    return {k: ([p.cuda() for p in t] if k == "planes" else t.cuda()) for k, t in x.items()}


@pytest.mark.parametrize("D,bits,group,G,length,splits", [
    (128, 4, 64, 4, 1000, None), (128, 4, 64, 4, 1000, 3), (128, 4, 64, 1, 700, 2), (128, 4, 64, 8, 3000, 7),
    (128, 4, 16, 3, 530, 5), (128, 2, 16, 4, 1000, None), (128, 2, 16, 5, 777, 4), (64, 4, 64, 3, 900, 2),
    (256, 4, 64, 2, 1300, 3), (256, 2, 16, 4, 600, 2), (128, 4, 64, 4, 100, 2),   # 100: nothing quantized yet
    (128, 2, 64, 4, 1000, None),   # 2 bits in 64-token key groups (the clipped kv2 candidate; BULK without KDQ)
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# the defaults; 4 warps a program; the key-group prefetch on / off (its default depends on the group); the keys
# dequantized in registers (KDQ) on and off (its default is the module's); 32-token tiles (two 16-token steps' scores
# before one softmax update), with and without KDQ
# bulk copies into shared memory (sm_90; the default at 2 bits) on and off, shorter and more stages, with the group
# rebuild, and with each split's last tokens in one-tile stages (tail)
@pytest.mark.parametrize("variant", [{}, {"cw": 4}, {"gpf": 1}, {"gpf": 0}, {"kdq": 1}, {"kdq": 0}, {"tile": 32},
                                     {"tile": 32, "kdq": 1}, {"bulk": 1}, {"bulk": 0}, {"bulk": 1, "stok": 32, "nst": 4},
                                     {"bulk": 1, "kdq": 0}, {"bulk": 1, "tile": 32}, {"bulk": 1, "tail": 64},
                                     {"bulk": 1, "tail": 128, "stok": 32, "nst": 4}],
                         ids=lambda v: "-".join(f"{k}{x}" for k, x in v.items()) or "default")
def test_cuda_kernel_matches_reference(D, bits, group, G, length, splits, dtype, variant):
    if variant and dtype != torch.bfloat16:
        pytest.skip("launch variants: bf16 is enough")
    B, H, sink, window = 2, 2, 4, 128
    ring = window + 2 * group
    cap = 3072
    kq, vq, kf, vf = _layer(B, H, D, cap, group, bits, sink, ring)
    q = torch.randn(B, H * G, 1, D, generator=torch.Generator().manual_seed(7)) * 2
    kw = dict(bits=bits, group=group, vgroup=D, sink=sink, window=window, scale=D ** -0.5,
              inv_freq=1.0 / (10000 ** (torch.arange(0, D, 2).float() / D)), prerope=False)
    want = ref.quant_decode_attention(q, kq, vq, kf, vf, length, **kw)
    qg = q.cuda().to(dtype)
    args = (qg, _cuda(kq), _cuda(vq), kf.cuda().to(dtype), vf.cuda().to(dtype), torch.tensor([length]).cuda())
    assert qc.supported(qg, args[1], bits=bits, group=group, vgroup=D, prerope=False, G=G)
    if variant.get("bulk") and torch.cuda.get_device_capability()[0] >= 9:
        assert qc._bulk_ok(qg, args[1], args[2])     # (else the variant would quietly run the default loop)
    if variant.get("bulk") and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("bulk copies need sm_90")
    if variant.get("bulk") and variant.get("stok", qc.BULK_STOK) % group and group % variant.get("stok", qc.BULK_STOK):
        pytest.skip("stages and key groups do not tile each other")
    if qc.smem_bytes(D=D, G=G, cw=variant.get("cw", 1)) > 48 * 1024:
        with pytest.raises(qc.Unavailable, match="shared memory"):
            qc.decode_attention(*args, splits=splits, **variant, **{k: kw[k] for k in ("bits", "group", "sink",
                                                                                      "window", "scale")})
        return
    got = qc.decode_attention(*args, splits=splits, **variant, **{k: kw[k] for k in ("bits", "group", "sink", "window",
                                                                                 "scale")}).float().cpu()
    tri = qk.quant_decode_attention(*args, splits=splits, impl="triton", **kw).float().cpu()
    tol = 4e-2 if dtype == torch.bfloat16 else 1e-2   # the Triton kernel's own error on these inputs: 6e-3 (fp16)
    err, err_tri = (got - want).abs().max().item(), (tri - want).abs().max().item()
    assert err < tol, f"cuda {err:.2e}, triton {err_tri:.2e}"
    assert err < 2 * err_tri + 1e-3    # and no less exact than the Triton kernel (its products round to bf16)


@pytest.mark.parametrize("D,bits,group,G,length,k,splits", [
    (128, 4, 64, 4, 3000, 10, None), (128, 4, 64, 4, 3000, 10, 3), (128, 4, 64, 1, 1000, 3, 2),
    (128, 2, 16, 4, 2000, 40, None), (128, 2, 16, 5, 777, 9, 4), (64, 4, 64, 3, 2500, 7, 2),
    (256, 4, 64, 2, 1300, 5, 3), (128, 4, 64, 8, 3000, 60, None),   # k past the packed groups: all of them
    (128, 4, 64, 4, 150, 4, None),                                   # nothing packed yet: the fp slots only
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# minb None: the default (MINB 16: 4 bits, D <= 128); kdq 1: the keys dequantized in registers (None: the default)
@pytest.mark.parametrize("cw,minb,kdq", [(1, None, None), (1, 0, None), (2, 0, None), (4, 0, None), (1, None, 1)],
                         ids=["default", "minb0", "cw2", "cw4", "kdq1"])
def test_cuda_paged_kernel_matches_reference(D, bits, group, G, length, k, splits, dtype, cw, minb, kdq):
    """Quest over key groups (`paged_attention`): the listed groups (ascending, inside the packed region, as
    `select_pages` over `group_scores` lists them) and every full-precision slot."""
    B, H, sink, window = 2, 2, 4, 128
    ring = window + 2 * group
    cap = 3072
    kq, vq, kf, vf = _layer(B, H, D, cap, group, bits, sink, ring, seed=1)
    q = torch.randn(B, H * G, 1, D, generator=torch.Generator().manual_seed(7)) * 2
    q, kf, vf = (x.to(dtype).float() for x in (q, kf, vf))     # the reference sees the inputs the kernel sees
    MG = cap // group
    ngq = max(0, (length - 1 - sink - window) // group)
    g = torch.Generator().manual_seed(length)
    nsel = min(k, ngq)
    table = torch.zeros(B * H, k, dtype=torch.int32)
    for bh in range(B * H):
        pick = sorted(torch.randperm(ngq, generator=g)[:nsel].tolist()) if ngq else []
        table[bh, :len(pick)] = torch.tensor([bh * MG + p for p in pick], dtype=torch.int32)
    n = torch.tensor([length])
    kw = dict(bits=bits, group=group, sink=sink, window=window, scale=D ** -0.5)
    want = ref.quant_group_attention(q, kq, vq, kf, vf, n, table, torch.tensor([nsel]), row_pages=MG, vgroup=D, **kw)
    got = qc.paged_attention(q.cuda().to(dtype), _cuda(kq), _cuda(vq), kf.cuda().to(dtype), vf.cuda().to(dtype),
                             n.cuda(), table.cuda(), torch.tensor([nsel], dtype=torch.int32).cuda(), row_pages=MG,
                             splits=splits, cw=cw, minb=minb, kdq=kdq, **kw).float().cpu()
    dense = qc.decode_attention(q.cuda().to(dtype), _cuda(kq), _cuda(vq), kf.cuda().to(dtype), vf.cuda().to(dtype),
                                n.cuda(), **kw).float().cpu()
    err_dense = (dense - ref.quant_decode_attention(q, kq, vq, kf, vf, length, vgroup=D, inv_freq=torch.zeros(D // 2),
                                                    prerope=False, **kw)).abs().max().item()
    err = (got - want).abs().max().item()
    tol = 4e-2 if dtype == torch.bfloat16 else 1e-2   # as the dense kernel's test; fewer keys, less averaging
    assert err < tol, f"paged {err:.2e}, dense {err_dense:.2e}"
    if nsel == ngq:   # every packed group listed: the dense kernel's result, up to the splits' rounding
        assert (got - dense).abs().max().item() < 2 * err_dense + 1e-3


@pytest.mark.parametrize("D,G,length,k", [(128, 4, 3000, 10), (128, 1, 1000, 3), (256, 2, 1300, 5), (128, 4, 150, 4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernels_read_the_keys_residual_bits(D, G, length, k, dtype, monkeypatch):
    """kres=1 (RES in the source; on by default since this and the cache-level test below passed on an H100): the
    dense and the paged kernel against the references, which decode the bits (z + s·(c + r/2 - 1/4)); and the bits
    really count: the same codes read without them are further from the reference."""
    monkeypatch.setattr(qc, "RES_CUDA", True)
    B, H, sink, window, group, bits = 2, 2, 4, 128, 64, 4
    ring, cap = window + 2 * group, 3072
    g = torch.Generator().manual_seed(3)
    kk = torch.randn(B, H, cap, D, generator=g) * torch.linspace(0.2, 3, D)
    kq = ref.quantize_keys(kk, bits=bits, group=group, res=True)
    _, vq, kf, vf = _layer(B, H, D, cap, group, bits, sink, ring, seed=1)
    q = torch.randn(B, H * G, 1, D, generator=torch.Generator().manual_seed(7)) * 2
    q, kf, vf = (x.to(dtype).float() for x in (q, kf, vf))
    kw = dict(bits=bits, group=group, sink=sink, window=window, scale=D ** -0.5)
    cu = lambda x: x.cuda().to(dtype)                                                     # noqa: E731
    n = torch.tensor([length])
    assert qc.supported(cu(q), _cuda(kq), bits=bits, group=group, vgroup=D, prerope=False, G=G)
    want = ref.quant_decode_attention(q, kq, vq, kf, vf, length, vgroup=D, inv_freq=torch.zeros(D // 2),
                                      prerope=False, **kw)
    got = qc.decode_attention(cu(q), _cuda(kq), _cuda(vq), cu(kf), cu(vf), n.cuda(), **kw).float().cpu()
    plain = {x: t for x, t in kq.items() if x != "res"}
    without = ref.quant_decode_attention(q, plain, vq, kf, vf, length, vgroup=D, inv_freq=torch.zeros(D // 2),
                                         prerope=False, **kw)
    tol = 4e-2 if dtype == torch.bfloat16 else 1e-2
    err = (got - want).abs().max().item()
    assert err < tol and (length < 300 or err < 0.5 * (without - want).abs().max().item())
    MG, ngq = cap // group, max(0, (length - 1 - sink - window) // group)
    nsel = min(k, ngq)
    table = torch.zeros(B * H, k, dtype=torch.int32)
    for bh in range(B * H):
        pick = sorted(torch.randperm(ngq, generator=g)[:nsel].tolist()) if ngq else []
        table[bh, :len(pick)] = torch.tensor([bh * MG + p for p in pick], dtype=torch.int32)
    want = ref.quant_group_attention(q, kq, vq, kf, vf, n, table, torch.tensor([nsel]), row_pages=MG, vgroup=D, **kw)
    got = qc.paged_attention(cu(q), _cuda(kq), _cuda(vq), cu(kf), cu(vf), n.cuda(), table.cuda(),
                             torch.tensor([nsel], dtype=torch.int32).cuda(), row_pages=MG, **kw).float().cpu()
    assert (got - want).abs().max().item() < tol


@pytest.mark.parametrize("spec", ["kv4:kres=1+quest:ratio=0.5,groups=1,channels=0.25,rank=max,weigh=1,dense_layers=0",
                                  "kv4:kres=1"])
def test_kres_cache_step_reads_the_bits_on_the_gpu_as_torch_does(spec, tmp_path_factory, monkeypatch):
    """The quarter over `kv4:kres=1` without dense layers (session 31's candidate), and `kv4:kres=1` alone, as caches on
    the GPU: the device-only decode step (what a CUDA graph replays) with the CUDA kernels reading the keys' residual
    bits gives, token by token on the same forced tokens, the logits of the same cache attending in torch (RES_CUDA
    off; `kv4:kres=1` alone then decodes eagerly) within half of what the bits themselves move them (the same cache
    without them, on its CUDA path); the two really take different paths."""
    from conftest import save_tiny_llama

    from longkv.cache import spec as cache_spec
    from longkv.engine.prefill import prefill
    from longkv.models.load import load_model

    path = save_tiny_llama(tmp_path_factory, "tiny_llama_d128", hidden_size=256, num_attention_heads=2,
                           num_key_value_heads=1)                                   # head dim 128, G = 2
    model = load_model(path, device="cuda", dtype=torch.float16)                     # fp16: less rounding than bf16
    for name, w in model.named_parameters():     # sharper attention: at random weights the bits move the logits
        if "q_proj" in name:                     # ~0.001, twice the kernels' own rounding; x8: 0.010 against 0.0007
            w.data *= 8                          # (both measured on CPU in fp16, the rounding as Triton against torch)
    ids = torch.randint(0, 97, (1, 900), generator=torch.Generator().manual_seed(5)).cuda()
    forced = torch.randint(0, 97, (8,), generator=torch.Generator().manual_seed(6)).tolist()
    out = {}
    for res_cuda, sp in ((True, spec), (False, spec), (False, spec.replace("kres=1", "kres=0"))):
        monkeypatch.setattr(qc, "RES_CUDA", res_cuda)
        kv = cache_spec.parse(sp).build(model.layer_specs(), batch=1, capacity=1024, device="cuda",
                                        dtype=torch.float16)
        store = getattr(kv, "store", None)
        assert (all(store.kernel) if store else kv.graph_safe) == (res_cuda or sp != spec)
        rows = [prefill(model, kv, ids, chunk=512)[0]]
        assert (store.nq(store.count[0]) if store else kv.n_quantized(kv.length)) >= 640   # 10+ groups packed
        with torch.inference_mode():
            for t in forced:
                step = model.make_step(torch.tensor([kv.length], device="cuda"), None if kv.graph_safe else kv.length)
                rows.append(model(torch.tensor([[t]], device="cuda"), step, kv)[0, -1].float())
                if kv.graph_safe:        # an eager step (the host knows its start) advances the cache itself
                    kv.advance(1)
        out[res_cuda, sp] = torch.stack(rows)
    cuda, torch_, plain = out.values()
    err, bits = (cuda - torch_).abs().max().item(), (plain - torch_).abs().max().item()
    assert err < 0.5 * bits, f"CUDA against torch {err:.4g}, the bits' own effect {bits:.4g}"


@pytest.mark.parametrize("D,bits,group,G,length,variant", [
    (128, 2, 16, 4, 1000, {}), (128, 2, 16, 5, 777, {"stok": 32, "nst": 4}), (64, 4, 16, 3, 900, {"bulk": 1, "kdq": 1}),
    (256, 2, 16, 4, 600, {}), (128, 4, 16, 4, 1000, {"bulk": 1, "kdq": 1}), (128, 2, 16, 4, 100, {}),
    (128, 2, 16, 4, 1000, {"bulk": 0})])       # bulk 0: no KS8 layout, the statistics handed over as fp16 rows
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernel_reads_8bit_key_statistics(D, bits, group, G, length, variant, dtype):
    """kstat=8: the bulk stages carry the statistics' bytes and grids and every lane rebuilds them (`convert8`); the
    result equals the reference over the same codes, and the kernel over the same statistics expanded to fp16 rows."""
    if torch.cuda.get_device_capability()[0] < 9 and variant.get("bulk", 1):
        pytest.skip("bulk copies need sm_90")
    B, H, sink, window = 2, 2, 4, 128
    ring, cap = window + 2 * group, 3072
    g = torch.Generator().manual_seed(1)
    k = torch.randn(B, H, cap, D, generator=g) * torch.linspace(0.2, 3, D) + torch.randn(D, generator=g)
    _, vq, kf, vf = _layer(B, H, D, cap, group, bits, sink, ring)
    kq = ref.quantize_keys(k, bits=bits, group=group, kstat=8)
    q = torch.randn(B, H * G, 1, D, generator=torch.Generator().manual_seed(7)) * 2
    kw = dict(bits=bits, group=group, sink=sink, window=window, scale=D ** -0.5)
    want = ref.quant_decode_attention(q, kq, vq, kf, vf, length, vgroup=D, inv_freq=torch.zeros(D // 2),
                                      prerope=False, **kw)
    qg = q.cuda().to(dtype)
    args = (qg, _cuda(kq), _cuda(vq), kf.cuda().to(dtype), vf.cuda().to(dtype), torch.tensor([length]).cuda())
    layout = qc.config(D=D, bits=bits, group=group, G=G, sink=sink, ring=ring, bf16=True, ks8=True,
                       **{k: variant[k] for k in ("bulk", "kdq", "stok", "nst") if k in variant})
    assert layout["KS8"] == int(variant.get("bulk", 1) != 0)
    got = qc.decode_attention(*args, **variant, **kw).float().cpu()
    rows = qc.decode_attention(qg, qc.expand_stats(args[1]), *args[2:], **variant, **kw).float().cpu()
    tol = 4e-2 if dtype == torch.bfloat16 else 1e-2
    assert (got - want).abs().max() < tol
    assert (got - rows).abs().max() < tol      # (the scales rebuilt by a half-precision EX2 here, in fp32 there)
