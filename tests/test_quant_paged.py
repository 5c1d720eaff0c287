"""The paged packed decode kernel (`kernels/quant_paged.py`, Quest's pages over a quantized layer)
against its plain-torch reference under TRITON_INTERPRET=1: random packed layers at odd lengths, the
fast path (2/4-bit, one value range per token) and the general one (3/8 bits, value groups,
outliers), pages that cross key groups, the sink page and the full-precision ring, partial last
pages, shorter rows."""
import pytest
import torch

from longkv.kernels import quant_paged as kp
from longkv.kernels import quant_reference as ref
from longkv.kernels import sparq_reference as sref

D, P = 32, 16
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])   # cuda: bf16, the inline-PTX tiles


def layer(B, H, length, *, bits, group, vgroup, sink, window, n_out, seed):
    """A packed layer as QuantStorage holds it: every slot's post-RoPE key/value drawn at random,
    slots [sink, sink + cap) quantized, the rest (and a stale copy of quantized ones) in sink + ring."""
    g = torch.Generator().manual_seed(seed)
    cap = group * max(1, -(-length // group))
    k = torch.randn(B, H, sink + cap, D, generator=g) * 2 + torch.randn(1, 1, 1, D, generator=g) * 3
    v = torch.randn(B, H, sink + cap, D, generator=g)
    kq = ref.quantize_keys(k[:, :, sink:], bits=bits, group=group, n_out=n_out)
    vq = ref.quantize_tokens(v[:, :, sink:], bits=bits, vgroup=vgroup, n_out=n_out)
    ring = window + 2 * group
    kf = torch.randn(B, H, sink + ring, D, generator=g)       # stale slots must not be read
    vf = torch.randn(B, H, sink + ring, D, generator=g)
    nq = group * max(0, (length - 1 - sink - window) // group)
    for j in list(range(min(sink, length))) + list(range(sink + nq, length)):
        r = j if j < sink else sink + (j - sink) % ring
        kf[:, :, r], vf[:, :, r] = k[:, :, j], v[:, :, j]
    return kq, vq, kf, vf      # fp32: the interpreter's dot has no bf16


def table_for(B, H, length, k_pages, row_pages, seed):
    """Each row: page 0, random others and the current token's page, ascending (as
    kernels/page_select.py lays the table out; the kernel relies on it)."""
    g = torch.Generator().manual_seed(seed)
    cur = (length - 1) // P
    rows = []
    for bh in range(B * H):
        others = torch.randperm(cur - 1, generator=g)[:k_pages - 2] + 1
        pages = [0] + sorted(others.tolist()) + [cur]
        rows.append([bh * row_pages + p for p in pages])
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("bits,group,vgroup,n_out,sink,length", [
    (4, 32, D, 0, 4, 333),      # fast path (kv4-like): sink page mixed, pages across key groups (sink 4)
    (2, 16, D, 0, 0, 300),      # fast path, 2-bit, pages aligned to groups
    (4, 32, 16, 0, 4, 250),     # value groups -> general path everywhere
    (3, 32, D, 0, 4, 277),      # two planes
    (8, 16, 16, 1, 2, 199),     # outliers
    (4, 8, D, 0, 4, 150),       # key groups shorter than a page: no fast path
])
@pytest.mark.parametrize("device", DEVICES)
def test_paged_kernel_matches_reference(bits, group, vgroup, n_out, sink, length, device):
    B, H, G, window = 2, 2, 3, 24
    kq, vq, kf, vf = layer(B, H, length, bits=bits, group=group, vgroup=vgroup, sink=sink, window=window,
                           n_out=n_out, seed=bits + length)
    dt, tol = (torch.float32, 1e-4) if device == "cpu" else (torch.bfloat16, 2e-2)
    kq, vq = ({k: [p.to(device) for p in t] if k == "planes" else t.to(device) for k, t in d.items()} for d in (kq, vq))
    kf, vf = kf.to(device, dt), vf.to(device, dt)
    row_pages = -(-(length + 40) // P)
    table = table_for(B, H, length, 9, row_pages, seed=length).to(device)
    nsel = torch.full((B * H,), table.shape[1], dtype=torch.int32, device=device)
    nsel[1] -= 2                      # a shorter row: its last two entries are not read
    table[1, nsel[1] - 1] = table[1, -1]
    last = torch.full((B * H,), (length - 1) % P + 1, dtype=torch.int32, device=device)
    q = torch.randn(B, H * G, 1, D, generator=torch.Generator().manual_seed(7)).to(device, dt)
    n = torch.tensor([length], device=device)
    kw = dict(row_pages=row_pages, page=P, bits=bits, group=group, vgroup=vgroup, sink=sink, window=window,
              scale=D ** -0.5)
    want = ref.quant_paged_attention(q, kq, vq, kf, vf, n, table, nsel, last, **kw).float()
    for splits in (1, 3):
        got = kp.quant_paged_attention(q, kq, vq, kf, vf, n, table, nsel, last, splits=splits, **kw).float()
        assert (got - want).abs().max() < tol, (splits, (got - want).abs().max())
    # the answer really comes from the packed rows: flip the codes of one selected quantized row
    nq = group * max(0, (length - 1 - sink - window) // group)
    pages = [int(x) for x in table[0] if sink <= int(x) * P and int(x) * P + P <= sink + nq]
    assert pages
    kq2 = {**kq, "planes": [p.clone() for p in kq["planes"]]}
    kq2["planes"][0][0, 0, pages[0] * P - sink + 3] ^= 0xFF
    moved = kp.quant_paged_attention(q, kq2, vq, kf, vf, n, table, nsel, last, splits=3, **kw).float()
    assert (moved - got)[0, :G].abs().max() > 1e-3
    assert (moved - got)[1].abs().max() == 0


def test_fast_path_is_taken_for_whole_pages(monkeypatch):
    """kv4's layout reads the pages of quantized rows through the pair-order tiles (also one that
    crosses a key group) and only those: counted by wrapping the tile reader, which the interpreter
    calls as Python."""
    from longkv.kernels import packed as pk

    calls = []
    orig = pk.pair_codes
    monkeypatch.setattr(pk, "pair_codes", lambda *a, **k: calls.append(1) or orig(*a, **k))
    B, H, G, length, sink, group, window = 1, 1, 2, 300, 4, 32, 24
    kq, vq, kf, vf = layer(B, H, length, bits=4, group=group, vgroup=D, sink=sink, window=window, n_out=0, seed=3)
    row_pages = -(-length // P)
    # pages 0 (sink), 1 (slots 16..31 hold rows 12..27: one key group), 2 (rows 28..43: crosses into the
    # next group), 5 (rows 76..91), 18 (the current page, in the ring)
    table = torch.tensor([[0, 1, 2, 5, 18]], dtype=torch.int32)
    nsel, last = torch.tensor([5], dtype=torch.int32), torch.tensor([(length - 1) % P + 1], dtype=torch.int32)
    q = torch.randn(B, H * G, 1, D)
    kw = dict(row_pages=row_pages, page=P, bits=4, group=group, vgroup=D, sink=sink, window=window, scale=0.2)
    got = kp.quant_paged_attention(q, kq, vq, kf, vf, torch.tensor([length]), table, nsel, last, splits=1, **kw)
    want = ref.quant_paged_attention(q, kq, vq, kf, vf, torch.tensor([length]), table, nsel, last, **kw)
    assert (got - want).abs().max() < 1e-4
    assert len(calls) == 3 * 2        # pages 1, 2 and 5: a key and a value tile each


# -- Quest over key groups (`quest:groups=1`): bounds from the groups' statistics, groups read via a table --
def _dense_masked(q, kq, vq, kf, vf, length, keep_group, *, bits, group, sink, window, scale):
    """Independent of `quant_group_attention`: every position's key/value (sink and ring from the fp
    buffer, the quantized region dequantized whole), masked to the sink, the fp positions and the kept
    groups, through plain attention."""
    from longkv.kernels.sparse_reference import ragged_attention_lse

    B, H = kf.shape[:2]
    ring = kf.shape[2] - sink
    nq = group * max(0, (length - 1 - sink - window) // group)
    kd = ref.dequantize_keys(kq, bits=bits, group=group, d=D)
    vd = ref.dequantize_tokens(vq, bits=bits, vgroup=D, d=D)
    ks, vs, ok = [], [], []
    for p in range(length):
        if sink <= p < sink + nq:
            ks.append(kd[:, :, p - sink]), vs.append(vd[:, :, p - sink])
            ok.append(keep_group[:, :, (p - sink) // group])
        else:
            r = p if p < sink else sink + (p - sink) % ring
            ks.append(kf[:, :, r]), vs.append(vf[:, :, r])
            ok.append(torch.ones(B, H, dtype=torch.bool))
    k, v, ok = torch.stack(ks, 2), torch.stack(vs, 2), torch.stack(ok, 2)     # (B, H, length[, D])
    out, _ = ragged_attention_lse(q, k, v, ok, scale=scale)
    return out


@pytest.mark.parametrize("bits,group,sink,length", [(4, 32, 4, 333), (2, 16, 0, 300), (4, 16, 3, 100)])
def test_group_attention_reads_the_listed_groups_and_every_fp_slot(bits, group, sink, length):
    B, H, G, window = 2, 2, 3, 24
    kq, vq, kf, vf = layer(B, H, length, bits=bits, group=group, vgroup=D, sink=sink, window=window, n_out=0,
                           seed=length)
    q = torch.randn(B, H * G, 1, D, generator=torch.Generator().manual_seed(1))
    MG = kq["scale"].shape[2]
    nqg = max(0, (length - 1 - sink - window) // group)
    g = torch.Generator().manual_seed(2)
    keep = torch.zeros(B, H, MG, dtype=torch.bool)
    rows = []
    for bh in range(B * H):
        pick = sorted(torch.randperm(MG, generator=g)[:max(1, MG // 2)].tolist())   # some past the region
        keep.view(B * H, MG)[bh, pick] = True
        rows.append([bh * MG + p for p in pick] + [0] * (MG - len(pick)))
    table = torch.tensor(rows, dtype=torch.int32)
    nsel = torch.tensor([max(1, MG // 2)] * (B * H), dtype=torch.int32)
    kw = dict(bits=bits, group=group, sink=sink, window=window, scale=D ** -0.5)
    got = ref.quant_group_attention(q, kq, vq, kf, vf, torch.tensor([length]), table, nsel, row_pages=MG, vgroup=D,
                                    **kw)
    want = _dense_masked(q, kq, vq, kf, vf, length, keep & (torch.arange(MG) < nqg), **kw)
    assert (got - want).abs().max() < 1e-5
    # every group listed: the dense packed decode
    every = torch.arange(B * H * MG, dtype=torch.int32).reshape(B * H, MG)
    got = ref.quant_group_attention(q, kq, vq, kf, vf, length, every, torch.tensor([MG]), row_pages=MG, vgroup=D,
                                    **kw)
    dense = ref.quant_decode_attention(q, kq, vq, kf, vf, length, vgroup=D, inv_freq=torch.zeros(D // 2),
                                       prerope=False, **kw)
    assert (got - dense).abs().max() < 1e-5


@pytest.mark.parametrize("bits,G,length", [(4, 3, 333), (2, 8, 1000), (4, 1, 20)])
def test_group_scores_kernel_matches_reference(bits, G, length):
    """The Triton bound over key groups (interpreter) = the reference, and it is a real bound: no key of a
    group scores above it (for the query of any head of the group)."""
    from longkv.kernels import quest as kq_

    B, H, group, sink, window = 2, 2, 16, 4, 24
    kq, vq, kf, vf = layer(B, H, length, bits=bits, group=group, vgroup=D, sink=sink, window=window, n_out=0,
                           seed=3)
    q = torch.randn(B, H * G, 1, D, generator=torch.Generator().manual_seed(4))
    kw = dict(bits=bits, group=group, sink=sink, window=window)
    n = torch.tensor([length])
    want, wpos = ref.group_scores(q, kq["scale"], kq["zero"], n, **kw)
    got, gpos = kq_.group_scores(q, kq["scale"], kq["zero"], n, **kw)
    assert torch.equal(gpos, wpos) and gpos.item() == group * max(0, (length - 1 - sink - window) // group) - 1
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got)) and (got[~fin] < 0).all()
    assert fin.any() == (length > 1 + sink + window + group)
    if fin.any():
        assert (got[fin] - want[fin]).abs().max() < 1e-3 * want[fin].abs().max()
        k = ref.dequantize_keys(kq, bits=bits, group=group, d=D)                      # (B, H, cap, D)
        logits = (q.reshape(B, H, G, D) @ k.transpose(-1, -2)).amax(2)                # (B, H, cap)
        MG = k.shape[2] // group
        best = logits.reshape(B, H, MG, group).amax(-1)
        assert (best[fin] <= want[fin] + 1e-3).all()


# -- `quest:groups=1,channels=F`: key groups scored from R channels of a channel-major copy (SparQ) --------
def _sketched(B, H, length, *, group, sink, window, seed):
    kq, vq, kf, vf = layer(B, H, length, bits=4, group=group, vgroup=D, sink=sink, window=window, n_out=0, seed=seed)
    MG, cap = kq["scale"].shape[2], kq["planes"][0].shape[2]
    sk = torch.zeros(B, H, D, cap // 2, dtype=torch.uint8)
    sz = torch.zeros(B, H, D, MG, 2, dtype=torch.float16)
    return kq, sk, sz


def test_sketch_is_the_key_codes_channel_major():
    B, H, group, MG = 2, 3, 16, 5
    kq, sk, sz = _sketched(B, H, group * MG, group=group, sink=0, window=0, seed=5)
    sref.sketch_groups(kq["planes"], kq["scale"], kq["zero"], sk, sz, 1, 4, group=group)
    codes = ref.unpack(kq["planes"], 4, D).long()                                  # (B, H, cap, D)
    b = sk.long()
    lo, hi = b & 15, b >> 4
    got = torch.stack([lo, hi], -1).flatten(-2)                                    # (B, H, D, cap)
    assert torch.equal(got[..., group:4 * group], codes.transpose(2, 3)[..., group:4 * group])
    assert (got[..., :group] == 0).all() and (got[..., 4 * group:] == 0).all()     # outside [1, 4): untouched
    assert torch.equal(sz[:, :, :, 1:4, 0], kq["scale"][:, :, 1:4].transpose(2, 3))
    assert torch.equal(sz[:, :, :, 1:4, 1], kq["zero"][:, :, 1:4].transpose(2, 3))
    assert (sz[:, :, :, [0, 4]] == 0).all()


def _to(device, *ts):
    return [({k: ([p.to(device) for p in v] if k == "planes" else v.to(device)) for k, v in t.items()}
             if isinstance(t, dict) else t.to(device)) for t in ts]


@pytest.mark.parametrize("device", DEVICES)
def test_prepare_picks_the_channels(device):
    from longkv.kernels import quest_sparq as ks

    B, H, G, R = 2, 2, 3, 5
    q = torch.randn(B, H * G, 1, D, generator=torch.Generator().manual_seed(12))
    idx, tau = ks.prepare(q.to(device), H, R)
    idx, tau = idx.cpu(), tau.cpu()
    want, share = sref.sparq_channels(q.reshape(B, H, G, D), R)
    assert torch.equal(idx[:, :R].long(), want.reshape(B * H, R))
    assert torch.equal(idx.long().sort(-1).values, torch.arange(D).expand(B * H, -1))   # the rest: every other channel
    assert torch.allclose(tau[:, :G], share.reshape(B * H, G).rsqrt(), rtol=1e-5)


def test_sparq_scores_with_every_channel_are_the_exact_logits():
    """channels = D: every channel, share 1, so the estimate is the exact logit of the dequantized keys:
    rank=max is each group's largest logit, rank=mass each query's log-sum-exp over the group, rank=peak each
    query's largest logit there."""
    B, H, G, group, sink, window, length = 2, 2, 3, 16, 4, 24, 333
    kq, sk, sz = _sketched(B, H, length, group=group, sink=sink, window=window, seed=7)
    MG = kq["scale"].shape[2]
    sref.sketch_groups(kq["planes"], kq["scale"], kq["zero"], sk, sz, 0, MG, group=group)
    q = torch.randn(B, H * G, 1, D, generator=torch.Generator().manual_seed(8))
    kw = dict(group=group, sink=sink, window=window, channels=D, scale=0.3)
    n = torch.tensor([length])
    k = ref.dequantize_keys(kq, bits=4, group=group, d=D)
    lg = (q.reshape(B, H, G, D) @ k.transpose(-1, -2) * 0.3).reshape(B, H, G, MG, group)
    nqg = (length - 1 - sink - window) // group
    smax, npos = sref.sparq_group_scores(q, sk, sz, n, rank="max", **kw)
    assert npos.item() == nqg * group - 1
    assert torch.allclose(smax[..., :nqg], lg.amax(-1).amax(2)[..., :nqg], atol=1e-4)
    assert (smax[..., nqg:] == float("-inf")).all()
    smass, _ = sref.sparq_group_scores(q, sk, sz, n, rank="mass", **kw)
    assert torch.allclose(smass[:, :, :nqg], lg.logsumexp(-1).transpose(2, 3)[:, :, :nqg], atol=1e-4)
    assert (smass[:, :, nqg:] == float("-inf")).all()
    speak, _ = sref.sparq_group_scores(q, sk, sz, n, rank="peak", **kw)
    assert torch.allclose(speak[:, :, :nqg], lg.amax(-1).transpose(2, 3)[:, :, :nqg], atol=1e-4)
    assert (speak[:, :, nqg:] == float("-inf")).all()


def test_sparq_channels_are_the_largest_of_the_query_group():
    q = torch.randn(2, 6, 1, D, generator=torch.Generator().manual_seed(9)).reshape(2, 2, 3, D)
    idx, share = sref.sparq_channels(q, 5)
    want = q.abs().sum(2).topk(5, -1).indices
    assert torch.equal(idx.sort(-1).values, want.sort(-1).values)
    assert torch.allclose(share, q.abs().gather(-1, want[:, :, None].expand(-1, -1, 3, -1)).sum(-1) / q.abs().sum(-1))


def test_weighted_channels_are_the_largest_q_times_key_rms():
    g = torch.Generator().manual_seed(30)
    q = torch.randn(2, 6, 1, D, generator=g).reshape(2, 2, 3, D)
    w = torch.rand(2, 2, D, generator=g) * 3
    idx, share = sref.sparq_channels(q, 5, w)
    qa = q.abs() * w[:, :, None, :]
    want = qa.sum(2).topk(5, -1).indices
    assert torch.equal(idx.sort(-1).values, want.sort(-1).values)
    assert torch.allclose(share, qa.gather(-1, want[:, :, None].expand(-1, -1, 3, -1)).sum(-1) / qa.sum(-1))
    assert not torch.equal(idx.sort(-1).values, sref.sparq_channels(q, 5)[0].sort(-1).values)   # the weights count
    ksq = torch.rand(2, 2, D, generator=g) * 50
    assert torch.allclose(sref.sparq_weights(ksq, 25) ** 2, ksq / 25 + 1e-3 * (ksq / 25).mean(-1, keepdim=True))


@pytest.mark.parametrize("device", DEVICES)
def test_prepare_weighs_the_channel_choice(device):
    from longkv.kernels import quest_sparq as ks

    B, H, G, R, group, sink, window, length = 2, 2, 3, 5, 16, 4, 24, 333
    kq, sk, sz = _sketched(B, H, length, group=group, sink=sink, window=window, seed=31)
    g = torch.Generator().manual_seed(32)
    q = torch.randn(B, H * G, 1, D, generator=g)
    w = torch.rand(B, H, D, generator=g) * 3
    q_d, sk_d, sz_d, n_d, w_d = _to(device, q, sk, sz, torch.tensor([length]), w)
    idx, tau = ks.prepare(q_d, H, R, weight=w_d)
    want, share = sref.sparq_channels(q.reshape(B, H, G, D), R, w)
    assert torch.equal(idx.cpu()[:, :R].long(), want.reshape(B * H, R))
    assert torch.allclose(tau.cpu()[:, :G], share.reshape(B * H, G).rsqrt(), rtol=1e-5)


@pytest.mark.parametrize("G,channels,length,rank", [(3, 4, 333, "max"), (4, 8, 1000, "mass"), (1, 32, 20, "max"),
                                                    (8, 16, 700, "mass"), (4, 16, 1000, "peak")])
@pytest.mark.parametrize("device", DEVICES)
def test_sparq_score_kernel_matches_reference(G, channels, length, rank, device):
    from longkv.kernels import quest_sparq as ks

    B, H, group, sink, window = 2, 2, 16, 4, 24
    kq, sk, sz = _sketched(B, H, length, group=group, sink=sink, window=window, seed=10)
    MG = kq["scale"].shape[2]
    sref.sketch_groups(kq["planes"], kq["scale"], kq["zero"], sk, sz, 0, MG, group=group)
    q = torch.randn(B, H * G, 1, D, generator=torch.Generator().manual_seed(11))
    kw = dict(group=group, sink=sink, window=window, channels=channels, scale=D ** -0.5, rank=rank)
    n = torch.tensor([length])
    want, wpos = sref.sparq_group_scores(q, sk, sz, n, **kw)
    args = _to(device, q, sk, sz, n)
    sel = ks.prepare(args[0], H, channels)
    cfg = [(bp, w, c, st) for bp, w in ((4, 4), (8, 2), (16, 4), (32, 8)) for c in (0, 1, 2) for st in (0, 1)] \
        if device == "cuda" else [(4, 4, c, st) for c in (0, 1, 2) for st in (0, 1)]
    for bp, w, cvt, st in cfg:
        got, gpos = ks.sparq_group_scores(*args, sel, block_p=bp, warps=w, cvt=cvt, stack=bool(st), **kw)
        got, gpos = got.cpu(), gpos.cpu()
        assert torch.equal(gpos, wpos) and got.shape == want.shape
        fin = torch.isfinite(want)
        assert torch.equal(fin, torch.isfinite(got))
        if fin.any():
            assert (got[fin] - want[fin]).abs().max() < 2e-2 * (1 + want[fin].abs().max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA score runs on a GPU only")
@pytest.mark.parametrize("G,channels,length,group", [(3, 4, 333, 16), (4, 16, 5000, 64), (1, 32, 700, 32),
                                                     (8, 16, 2000, 64), (4, 20, 200, 64)])
@pytest.mark.parametrize("rank", ["max", "peak", "mass"])
def test_sparq_cuda_score_matches_reference(G, channels, length, group, rank):
    """quest_sparq.cu (rank=max, or each query's for peak and mass): bf16 and fp16 queries, fp16 sums over the
    channels; -inf past the held groups; launches; the channels from `prepare` or chosen in the kernel (with and
    without weights)."""
    from longkv.kernels import quest_sparq as ks

    B, H, sink, window = 2, 2, 4, 24
    kq, sk, sz = _sketched(B, H, length, group=group, sink=sink, window=window, seed=10)
    sref.sketch_groups(kq["planes"], kq["scale"], kq["zero"], sk, sz, 0, kq["scale"].shape[2], group=group)
    q = torch.randn(B, H * G, 1, D, generator=torch.Generator().manual_seed(11))
    kw = dict(group=group, sink=sink, window=window, channels=channels, scale=D ** -0.5, rank=rank)
    n = torch.tensor([length])
    for dt in (torch.bfloat16, torch.float16):
        qd = q.to(dt)
        want, wpos = sref.sparq_group_scores(qd.float(), sk, sz, n, **kw)
        args = _to("cuda", qd, sk, sz, n)
        sel = ks.prepare(args[0], H, channels)
        for wpt, minb, nt, vec, pipe in ((1, 1, 256, 0, 0), (2, 3, 256, 1, 0), (4, 1, 128, 1, 0), (8, 1, 64, 1, 0),
                                         (4, 2, 256, 0, 0), (4, 1, 256, 1, 0), (2, 3, 128, 1, 1), (1, 2, 256, 1, 2),
                                         (4, 1, 64, 1, 2)):   # pipe k > 1: k blocks a row, looping
            got, gpos = ks.sparq_group_scores(*args, sel, impl="cuda", wpt=wpt, minb=minb, threads=nt, vec=vec,
                                              pipe=pipe, hexp=rank == "mass" and wpt == 4, **kw)   # hexp: fp16 exps
            got, gpos = got.cpu(), gpos.cpu()
            fin = torch.isfinite(want)
            assert torch.equal(gpos, wpos) and got.shape == want.shape and torch.equal(fin, torch.isfinite(got))
            assert fin.any()
            assert (got[fin] - want[fin]).abs().max() < 2e-2 * (1 + want[fin].abs().max())
        # sel=None: every block picks the channels itself (CHOOSE), by |q| alone or weighed (WEIGH)
        w = torch.rand(B, H, D, generator=torch.Generator().manual_seed(12)) + 0.1
        for weight in (None, w):
            want, wpos = sref.sparq_group_scores(qd.float(), sk, sz, n, weight=weight, **kw)
            got, gpos = ks.sparq_group_scores(*args, None, impl="cuda", weight=None if weight is None else w.cuda(),
                                              pipe=2 if weight is not None else 0, **kw)
            got, gpos = got.cpu(), gpos.cpu()
            fin = torch.isfinite(want)
            assert torch.equal(gpos, wpos) and torch.equal(fin, torch.isfinite(got)) and fin.any()
            assert (got[fin] - want[fin]).abs().max() < 2e-2 * (1 + want[fin].abs().max())
    assert any(k[-5] == 1 for k in ks._CUDA)     # the 8/16-byte loads were built and run (the codes are aligned)
    assert any(k[-4] and k[-3] for k in ks._CUDA) and any(k[-2] for k in ks._CUDA)   # choice, weighed; pipelined


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the gated CUDA score and select run on a GPU only")
def test_gated_cuda_score_and_select_keep_the_table_between_refreshes():
    """quest's every=K on the GPU: on the steps that choose afresh the gated CUDA score equals the ungated one;
    the gated block select keeps its table on the others, and the table so kept equals the where-based
    fallback's (the Triton select) step by step."""
    from longkv.kernels import page_select as ps
    from longkv.kernels import quest_sparq as ks

    B, H, G, group, sink, window, length, every = 1, 2, 4, 64, 4, 24, 5000, 3
    kq, sk, sz = _sketched(B, H, length + 8, group=group, sink=sink, window=window, seed=13)
    sref.sketch_groups(kq["planes"], kq["scale"], kq["zero"], sk, sz, 0, kq["scale"].shape[2], group=group)
    q = torch.randn(B, H * G, 1, D, generator=torch.Generator().manual_seed(14)).to(torch.bfloat16).cuda()
    kw = dict(group=group, sink=sink, window=window, channels=16, scale=D ** -0.5, rank="max")
    sk, sz = sk.cuda(), sz.cuda()
    p0 = torch.tensor([length - 1], device="cuda")
    K = 10
    tabs = {m: (torch.zeros(B * H, K, dtype=torch.int32, device="cuda"),
                torch.zeros(B * H, dtype=torch.int32, device="cuda")) for m in ("block", "bisect")}
    for step in range(7):
        n = torch.tensor([length + step], device="cuda")
        gate = (n, p0, every)
        want, wpos = ks.sparq_group_scores(q, sk, sz, n, None, impl="cuda", **kw)
        out, npos = ks.sparq_group_scores(q, sk, sz, n, None, impl="cuda", gate=gate, **kw)
        if step % every == 0:
            assert torch.equal(out, want) and torch.equal(npos, wpos)
        for m, o in tabs.items():
            before = o[0].clone()
            ps.select_pages(want, K, wpos, page=group, row_pages=want.shape[-1], method=m, out=o, gate=gate)
            if step % every:
                assert torch.equal(o[0], before), (m, step)
        assert torch.equal(tabs["block"][0], tabs["bisect"][0]) and torch.equal(tabs["block"][1], tabs["bisect"][1])
    assert any(k[-1] == every for k in ks._CUDA) and any(k[-1] == every for k in ps._BLOCK)


def test_sparq_cuda_env_switches_the_cuda_score_off_or_names_a_bad_launch():
    """LONGKV_SPARQ_CUDA=off keeps the Triton score on the GPU too (to tell the CUDA score's fp16 sums from the
    rest of a GPU run); a malformed launch is an error naming the variable."""
    import os
    import subprocess
    import sys

    code = "import longkv.kernels.quest_sparq as q; print(q.CUDA_OFF, q.CUDA_WPT)"
    for value, want in (("off", "True 4"), ("2:1:128", "False 2")):
        out = subprocess.run([sys.executable, "-c", code], env=os.environ | {"LONGKV_SPARQ_CUDA": value},
                             capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.split() == want.split(), out.stderr
    out = subprocess.run([sys.executable, "-c", code], env=os.environ | {"LONGKV_SPARQ_CUDA": "fast"},
                         capture_output=True, text=True)
    assert out.returncode != 0 and "LONGKV_SPARQ_CUDA" in out.stderr and "or off" in out.stderr
