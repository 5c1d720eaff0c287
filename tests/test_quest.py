"""Quest's Triton kernels (append, page scoring, page selection, attention through a page table)
against their plain-torch references under TRITON_INTERPRET=1, at odd sizes; the scoring bound
itself; and one whole decode step, kernels against references."""
import functools

import pytest
import torch

from longkv.kernels import sparse_reference as ref

triton = pytest.importorskip("triton")
from longkv.kernels import page_select, quest


@pytest.mark.parametrize("B,Hq,Hkv,D,MP,npages", [(1, 4, 2, 32, 13, 13), (2, 9, 3, 64, 70, 41), (1, 2, 2, 16, 5, 1)])
def test_page_scores_kernel_matches_reference(B, Hq, Hkv, D, MP, npages):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, 1, D, generator=g)
    mn, mx = ref.page_minmax(torch.randn(B, Hkv, MP * 16, D, generator=g), 16, valid=MP * 16 - 3)
    pos = torch.tensor([(npages - 1) * 16 + 5])
    got = quest.page_scores(q, mn, mx, pos, page=16, sink=1, recent=2)
    want = ref.page_scores(q, mn, mx, pos, page=16, sink=1, recent=2)
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin) and torch.equal(got[~fin], want[~fin])
    if fin.any():
        assert (got[fin] - want[fin]).abs().max() < 1e-4


def test_page_score_bounds_every_key_logit():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 6, 1, 16, generator=g)
    k = torch.randn(1, 2, 8 * 16, 16, generator=g)
    true = (q.reshape(1, 2, 3, 1, 1, 16) * k.reshape(1, 2, 1, 8, 16, 16)).sum(-1).amax(-1).amax(2)
    assert (ref.page_scores(q, *ref.page_minmax(k, 16), 127, page=16, sink=0, recent=0) >= true - 1e-5).all()


def _scores(g, B, Hkv, MP, npages, levels):
    """Scores with many exact ties (`levels` distinct values), forced pages +inf, invalid -inf, and
    negative values (the float → key mapping must order signs and magnitudes)."""
    s = torch.randint(0, levels, (B, Hkv, MP), generator=g).float() / 3 - levels / 6
    p = torch.arange(MP)
    s[..., (p == 0) | ((p >= npages - 2) & (p < npages))] = float("inf")
    s[..., p >= npages] = float("-inf")
    return s


def _valid(table, nsel):
    return [table[r, :int(nsel[r])].tolist() for r in range(table.shape[0])]


@pytest.mark.parametrize("B,Hkv,MP,npages,k,levels,seg", [
    (1, 2, 13, 13, 5, 4, None),       # heavy ties
    (2, 3, 70, 41, 9, 1000, None),    # pages past npages exist
    (1, 2, 37, 37, 7, 3, 8),          # several segments a row (multi)
    (1, 1, 37, 30, 12, 2, 16),        # two levels: almost everything tied
    (1, 2, 5, 3, 4, 5, None),         # k > npages: every valid page
    (1, 1, 9, 1, 4, 5, None),         # one page
    (2, 2, 300, 283, 31, 100000, 64)])
@pytest.mark.parametrize("method", [None, "multi"])
def test_select_pages_kernel_matches_reference(B, Hkv, MP, npages, k, levels, seg, method):
    g = torch.Generator().manual_seed(MP + k)
    s = _scores(g, B, Hkv, MP, npages, levels)
    s[0, 0, 1] = -0.0 if MP > 1 else s[0, 0, 1]           # ±0 and tiny magnitudes order correctly
    pos = torch.tensor([(npages - 1) * 16 + 7])
    # multi: segments of `seg` pages (several programs a row, ties across segment borders)
    got = quest.select_pages(s, k, pos, page=16, row_pages=MP + 2, method=method, seg=seg or 16)
    want = ref.select_pages(s, k, pos, page=16, row_pages=MP + 2)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert _valid(got[0], got[1]) == _valid(want[0], want[1])
    n = min(k, npages)
    for r, row in enumerate(_valid(want[0], want[1])):   # the semantics, spelled out
        ids = [x - r * (MP + 2) for x in row]
        flat = s.reshape(-1, MP)[r, :npages]
        assert ids == sorted(ids) and len(ids) == n and (npages - 1) in ids and 0 in ids
        kth = flat[ids].min()
        assert all(i in ids for i in range(npages) if flat[i] > kth)
        ties = [i for i in range(npages) if flat[i] == kth]
        assert [i for i in ties if i in ids] == ties[:len([i for i in ids if flat[i] == kth])]
    assert (got[2] == 8).all()                                # the page holding pos is last


@pytest.mark.parametrize("device,fused,G", [("cpu", False, 4)] + [("cuda", f, G) for f in (True, False) for G in (4, 3)
                                                                   if torch.cuda.is_available()])
def test_select_pages_ranks_per_query_scores_by_mass(device, fused, G, monkeypatch):
    """scores (B, Hkv, MP, G), each query's log-sum-exp a page (rank=mass): the pages of largest attention mass,
    `page_mass` with no forced page (on the GPU by default computed inside the cluster select: fused); a query with
    no finite score adds nothing; pages past npages are never taken."""
    monkeypatch.setattr(page_select, "MASS_CLUSTER", fused)
    g = torch.Generator().manual_seed(21)
    B, Hkv, MP, npages, k = 2, 2, 300, 250, 31
    s = torch.randn(B, Hkv, MP, G, generator=g) * 3
    s[:, :, npages:] = float("-inf")
    s[0, 1, :, 2] = float("-inf")                     # a query with no candidate
    s[1, 0, 7, :] = 40.0                              # one page carries nearly all of every query's mass
    pos = torch.tensor([(npages - 1) * 16 + 5])
    mass = ref.page_mass(s, ref.forced_bound(s.shape[:3], pos, page=16, sink=0, recent=0))
    want = ref.select_pages(mass, k, pos, page=16, row_pages=MP)
    got = [t.cpu() for t in page_select.select_pages(s.to(device), k, pos.to(device), page=16, row_pages=MP)]
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    flat = mass.reshape(-1, MP)
    for r, (a, b) in enumerate(zip(_valid(got[0], got[1]), _valid(want[0], want[1]))):
        a, b = {x - r * MP for x in a}, {x - r * MP for x in b}
        kth = flat[r, sorted(b)].min()
        assert len(a) == k and max(a) < npages and all((flat[r, i] - kth).abs() < 1e-4 for i in a ^ b)
    assert 7 + MP * 2 in got[0][2, :k].tolist()
    assert _valid(got[0], got[1]) == _valid(want[0], want[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused mass select runs on a GPU")
@pytest.mark.parametrize("MP,npages,k", [(8192, 8000, 1024), (16384, 16384, 2048), (2100, 1, 5)])
def test_mass_cluster_select_matches_page_mass_then_select(MP, npages, k, monkeypatch):
    """The cluster select ranking per-query scores by mass itself (MASSQ) takes the pages `page_mass` and then the
    select take (the reference's ranking; near-ties at the k-th may go either way), at the step's row lengths."""
    g = torch.Generator().manual_seed(MP)
    B, Hkv, G, page = 1, 8, 4, 64
    s = torch.randn(B, Hkv, MP, G, generator=g) * 4
    s[:, :, npages:] = float("-inf")
    pos = torch.tensor([npages * page - 1])
    mass = ref.page_mass(s, ref.forced_bound(s.shape[:3], pos, page=page, sink=0, recent=0))
    want = ref.select_pages(mass, k, pos, page=page, row_pages=MP)
    monkeypatch.setattr(page_select, "MASS_CLUSTER", True)
    got = [t.cpu() for t in page_select.select_pages(s.cuda(), k, pos.cuda(), page=page, row_pages=MP)]
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    flat = mass.reshape(-1, MP)
    for r, (a, b) in enumerate(zip(_valid(got[0], got[1]), _valid(want[0], want[1]))):
        a, b = {x - r * MP for x in a}, {x - r * MP for x in b}
        kth = flat[r, sorted(b)].min()
        assert len(a) == len(b) and all((flat[r, i] - kth).abs() < 1e-4 * max(1.0, kth.abs()) for i in a ^ b)
        assert len(a ^ b) <= 4


def test_select_pages_default_dispatch_long_row(monkeypatch):
    """Rows past SELECT_CHUNK pages take the multi-program select by default; bisect refuses them."""
    monkeypatch.setattr(page_select, "SELECT_CHUNK", 32)
    g = torch.Generator().manual_seed(3)
    s = _scores(g, 1, 2, 100, 90, 7)
    pos = torch.tensor([89 * 16 + 3])
    got = quest.select_pages(s, 20, pos, page=16, row_pages=100, seg=16)
    want = ref.select_pages(s, 20, pos, page=16, row_pages=100)
    assert _valid(got[0], got[1]) == _valid(want[0], want[1]) and torch.equal(got[2], want[2])
    with pytest.raises(ValueError, match="bisect"):
        quest.select_pages(s, 20, pos, page=16, row_pages=100, method="bisect")


def test_select_pages_last_entry_full_page_when_current_not_selected():
    s = torch.tensor([[[5.0, 1.0, 4.0, 0.5]]])
    multi = functools.partial(quest.select_pages, method="multi", seg=2)
    for sel in (quest.select_pages, multi, ref.select_pages):
        table, nsel, last = sel(s, 2, torch.tensor([3 * 16 + 2]), page=16, row_pages=4)
        assert table[0, :2].tolist() == [0, 2] and nsel.tolist() == [2] and last.tolist() == [16]


@pytest.mark.parametrize("pos", [0, 16 * 3, 16 * 3 + 5, 16 * 7 - 1])
def test_append_token_kernel_matches_reference(pos):
    g = torch.Generator().manual_seed(pos)
    B, Hkv, D, P, cap = 2, 3, 32, 16, 16 * 7
    k, v = torch.randn(B, Hkv, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g)
    ang = torch.randn(1, D // 2, generator=g).repeat(1, 2)
    cos, sin = ang.cos(), ang.sin()
    bufs = [torch.randn(B, Hkv, cap, D, generator=g), torch.randn(B, Hkv, cap, D, generator=g)]
    bufs += list(ref.page_minmax(bufs[0], P))
    mine, theirs = [b.clone() for b in bufs], [b.clone() for b in bufs]
    quest.append_token(k, v, cos, sin, torch.tensor([pos]), *mine, page=P)
    ref.append_token(k, v, cos, sin, torch.tensor([pos]), *theirs, page=P)
    for a, b in zip(mine, theirs):
        assert (a - b).abs().max() < 1e-5
    if pos % P == 0:   # a new page's bounds are the one key it holds
        assert torch.equal(mine[2][:, :, pos // P], mine[0][:, :, pos])
    # bounds only (kc = vc = None, as quant+quest calls it): the same bounds, and nothing else written
    only = [b.clone() for b in bufs[2:]]
    quest.append_token(k, v, cos, sin, torch.tensor([pos]), None, None, *only, page=P)
    assert torch.equal(only[0], mine[2]) and torch.equal(only[1], mine[3])
    ref_only = [b.clone() for b in bufs[2:]]
    ref.append_token(k, v, cos, sin, torch.tensor([pos]), None, None, *ref_only, page=P)
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(ref_only, only))


@pytest.mark.parametrize("splits,softcap", [(1, None), (3, None), (2, 30.0)])
def test_paged_attention_kernel_matches_reference(splits, softcap):
    g = torch.Generator().manual_seed(2)
    B, Hq, Hkv, D, P, NP = 2, 6, 2, 32, 16, 40
    q = torch.randn(B, Hq, 1, D, generator=g)
    kp, vp = torch.randn(NP, P, D, generator=g), torch.randn(NP, P, D, generator=g)
    table = torch.randint(0, NP, (B * Hkv, 7), generator=g).int()
    nsel, last = torch.tensor([7, 3, 1, 5]).int(), torch.tensor([16, 4, 1, 9]).int()
    got = quest.paged_attention(q, kp, vp, table, nsel, last, scale=0.2, softcap=softcap, splits=splits)
    want = ref.paged_attention(q, kp, vp, table, nsel, last, scale=0.2, softcap=softcap)
    assert (got - want).abs().max() < 1e-4


def test_paged_attention_does_not_depend_on_page_order():
    """An online softmax is order-independent: only the final (partial) entry must stay last."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 1, 16, generator=g)
    kp, vp = torch.randn(20, 16, 16, generator=g), torch.randn(20, 16, 16, generator=g)
    table = torch.tensor([[3, 9, 1, 14, 7, 2]]).int()
    shuffled = torch.tensor([[14, 1, 9, 3, 7, 2]]).int()
    kw = {"scale": 0.3, "splits": 2}
    a = quest.paged_attention(q, kp, vp, table, torch.tensor([6]), torch.tensor([5]), **kw)
    b = quest.paged_attention(q, kp, vp, shuffled, torch.tensor([6]), torch.tensor([5]), **kw)
    assert (a - b).abs().max() < 1e-5


def test_paged_attention_over_all_pages_equals_dense():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 4, 1, 16, generator=g), torch.randn(1, 2, 64, 16, generator=g), torch.randn(1, 2, 64, 16, generator=g)
    table = torch.arange(8).reshape(2, 4).int()
    got = quest.paged_attention(q, k.reshape(-1, 16, 16), v.reshape(-1, 16, 16), table, torch.tensor([4]), torch.tensor([10]),
                                scale=0.25)
    from longkv.kernels.reference import attention_lse

    dense, _ = attention_lse(q, k[:, :, :58], v[:, :, :58], scale=0.25)
    assert (got - dense).abs().max() < 1e-5


def _step(mod, q, k, v, cos, sin, pos, bufs, *, P, kp):
    kc, vc, mn, mx = bufs
    mod.append_token(k, v, cos, sin, pos, kc, vc, mn, mx, page=P)
    s = mod.page_scores(q, mn, mx, pos, page=P, sink=1, recent=2)
    table, nsel, last = mod.select_pages(s, kp, pos, page=P, row_pages=kc.shape[2] // P)
    D = kc.shape[-1]
    return mod.paged_attention(q, kc.view(-1, P, D), vc.view(-1, P, D), table, nsel, last, scale=D ** -0.5)


@pytest.mark.parametrize("pos,kp,P", [(16 * 9 + 4, 4, 16), (16 * 5, 3, 16), (40, 8, 16), (16 * 9 + 4, 3, 32),
                                      (32 * 5 - 1, 8, 32)])
def test_decode_step_kernels_match_references(pos, kp, P):
    """append → score → select → attend, Triton against plain torch, on the same cache; with kp ≥
    the pages in use it is dense attention over every token."""
    g = torch.Generator().manual_seed(5)
    B, Hq, Hkv, D, cap = 1, 6, 2, 16, 32 * 6
    q = torch.randn(B, Hq, 1, D, generator=g)
    k, v = torch.randn(B, Hkv, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g)
    ang = torch.randn(1, D // 2, generator=g).repeat(1, 2)
    kc, vc = torch.randn(B, Hkv, cap, D, generator=g), torch.randn(B, Hkv, cap, D, generator=g)
    bufs = [kc, vc, *ref.page_minmax(kc, P, valid=pos)]
    mine, theirs = [b.clone() for b in bufs], [b.clone() for b in bufs]
    got = _step(quest, q, k, v, ang.cos(), ang.sin(), torch.tensor([pos]), mine, P=P, kp=kp)
    want = _step(ref, q, k, v, ang.cos(), ang.sin(), torch.tensor([pos]), theirs, P=P, kp=kp)
    assert (got - want).abs().max() < 1e-5
    if kp >= pos // P + 1:
        from longkv.kernels.reference import attention_lse

        dense, _ = attention_lse(q, theirs[0][:, :, :pos + 1], theirs[1][:, :, :pos + 1], scale=D ** -0.5)
        assert (got - dense).abs().max() < 1e-5


@pytest.mark.parametrize("method", [None, "multi"])
def test_select_pages_orders_signs_and_magnitudes(method):
    """Scores over many binades and both signs (the float → integer key map must keep their order)."""
    g = torch.Generator().manual_seed(6)
    MP, npages, k = 100, 97, 23
    s = torch.randn(2, 1, MP, generator=g) * torch.pow(10.0, torch.randint(-30, 30, (2, 1, MP), generator=g).float())
    s[..., npages:] = float("-inf")
    s[0, 0, 5], s[0, 0, 6], s[1, 0, 7] = float("inf"), -1e-38, 0.0
    pos = torch.tensor([(npages - 1) * 16])
    got = quest.select_pages(s, k, pos, page=16, row_pages=MP, method=method, seg=32)
    want = ref.select_pages(s, k, pos, page=16, row_pages=MP)
    assert _valid(got[0], got[1]) == _valid(want[0], want[1])
    for r in range(2):
        ids = [x - r * MP for x in _valid(want[0], want[1])[r]]
        assert sorted(ids) == sorted(s[r, 0, :npages].topk(k).indices.tolist())


@pytest.mark.parametrize("B,Hq,Hkv,D,npages,kc", [(1, 6, 2, 16, 11, 5), (2, 9, 3, 32, 7, 7), (1, 4, 1, 16, 1, 3)])
def test_rerank_scores_kernel_matches_reference(B, Hq, Hkv, D, npages, kc):
    """Quest's second stage: exact max logits of the candidate pages, through the page table."""
    g = torch.Generator().manual_seed(npages)
    P, MP = 16, 12
    q = torch.randn(B, Hq, 1, D, generator=g)
    pool = torch.randn(B * Hkv * MP, P, D, generator=g)
    bound = _scores(g, B, Hkv, MP, npages, 1000)
    pos = torch.tensor([(npages - 1) * P + 5])
    cand = ref.select_pages(bound, kc, pos, page=P, row_pages=MP)
    got = quest.rerank_scores(q, pool, bound, *cand, row_pages=MP)
    want = ref.rerank_scores(q, pool, bound, *cand, row_pages=MP)
    assert torch.allclose(got, want, atol=1e-4)
    assert (got == float("inf")).sum() == (bound[..., :npages] == float("inf")).sum()   # forced pages stay
    assert ((got > float("-inf")).sum(-1) == min(kc, npages)).all()                       # only candidates
    # a candidate's score is its largest exact logit over its valid tokens and the query group
    r, ids = 0, cand[0][0, :int(cand[1][0])].long()
    for j, pid in enumerate(ids.tolist()):
        if bound[0, 0, pid] == float("inf"):
            continue
        n_tok = int(cand[2][0]) if j == len(ids) - 1 else P
        lg = q[0, :Hq // Hkv, 0].float() @ pool[pid, :n_tok].float().T
        assert abs(float(got[0, 0, pid]) - float(lg.max())) < 1e-4



@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_page_codes_round_trip_within_half_a_step(bits):
    g = torch.Generator().manual_seed(bits)
    k = torch.randn(2, 3, 5 * 16, 32, generator=g)
    k[0, 0, :16, 3] = 0.7                                        # a channel constant over its page
    mn, mx = ref.page_minmax(k, 16)
    codes = ref.page_codes(k, mn, mx, bits)
    assert codes.shape == (2, 3, 5, 16, 32 * bits // 8) and codes.dtype == torch.uint8
    back = ref.page_keys(codes, mn, mx, bits)
    step = ((mx - mn) / ((1 << bits) - 1)).unsqueeze(3)
    err = (back - k.reshape(2, 3, 5, 16, 32)).abs()
    assert (err <= step / 2 + 1e-5).all()
    assert err.amax() > step.amax() / 8                         # really quantized (not the keys copied)
    assert back[0, 0, 0, :, 3].eq(0.7).all()


@pytest.mark.parametrize("pos", [16 * 3 - 1, 16 * 3 + 5, 15])
@pytest.mark.parametrize("bits", [2, 4])
def test_append_token_writes_page_codes_when_the_page_fills(pos, bits):
    g = torch.Generator().manual_seed(pos + bits)
    B, Hkv, D, P, cap = 2, 3, 32, 16, 16 * 7
    k, v = torch.randn(B, Hkv, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g)
    ang = torch.randn(1, D // 2, generator=g).repeat(1, 2)
    kc = torch.randn(B, Hkv, cap, D, generator=g)
    bufs = [kc, torch.randn(B, Hkv, cap, D, generator=g), *ref.page_minmax(kc, P, valid=pos),
            torch.randint(0, 255, (B, Hkv, cap // P, P, D * bits // 8), generator=g).to(torch.uint8)]
    mine, theirs = [b.clone() for b in bufs], [b.clone() for b in bufs]
    quest.append_token(k, v, ang.cos(), ang.sin(), torch.tensor([pos]), *mine[:4], page=P, codes=mine[4], bits=bits)
    ref.append_token(k, v, ang.cos(), ang.sin(), torch.tensor([pos]), *theirs[:4], page=P, codes=theirs[4], bits=bits)
    for a, b in zip(mine[:4], theirs[:4]):
        assert torch.allclose(a, b, atol=1e-5)                  # pages past pos hold ±inf bounds
    assert torch.equal(mine[4], theirs[4])
    p = pos // P
    if pos % P == P - 1:   # the full page's codes, from its final bounds
        want = ref.page_codes(mine[0][:, :, p * P:(p + 1) * P], mine[2][:, :, p:p + 1], mine[3][:, :, p:p + 1], bits)
        assert torch.equal(mine[4][:, :, p], want[:, :, 0])
    assert torch.equal(mine[4][:, :, :p], bufs[4][:, :, :p]) and torch.equal(mine[4][:, :, p + 1:], bufs[4][:, :, p + 1:])
    if pos % P != P - 1:
        assert torch.equal(mine[4][:, :, p], bufs[4][:, :, p])


@pytest.mark.parametrize("fold", [None, False])
@pytest.mark.parametrize("B,Hq,Hkv,D,npages,kc,bits", [(1, 6, 2, 16, 11, 5, 2), (2, 9, 3, 32, 7, 7, 4),
                                                       (1, 4, 1, 16, 1, 3, 2), (1, 8, 2, 64, 12, 9, 1),
                                                       (1, 4, 2, 16, 9, 4, 8)])
def test_rerank_code_scores_kernel_matches_reference(B, Hq, Hkv, D, npages, kc, bits, fold):
    """The second stage from page-relative codes: kernel vs reference, and each score within the
    codes' error bound of the exact largest logit. fold=None: the folded kernel where it applies (bits
    <= 4; 8 bits takes the other); False: the per-page kernel everywhere."""
    g = torch.Generator().manual_seed(npages + bits)
    P, MP = 16, 12
    q = torch.randn(B, Hq, 1, D, generator=g)
    keys = torch.randn(B, Hkv, MP * P, D, generator=g)
    mn, mx = ref.page_minmax(keys, P)
    codes = ref.page_codes(keys, mn, mx, bits).reshape(-1, P, D * bits // 8)
    mn, mx = mn.reshape(-1, D), mx.reshape(-1, D)
    bound = _scores(g, B, Hkv, MP, npages, 1000)
    pos = torch.tensor([(npages - 1) * P + 5])
    cand = ref.select_pages(bound, kc, pos, page=P, row_pages=MP)
    got = quest.rerank_code_scores(q, codes, mn, mx, bound, *cand, row_pages=MP, bits=bits, fold=fold)
    want = ref.rerank_code_scores(q, codes, mn, mx, bound, *cand, row_pages=MP, bits=bits)
    assert torch.allclose(got, want, atol=1e-4)
    exact = ref.rerank_scores(q, keys.reshape(-1, P, D), bound, *cand, row_pages=MP)
    assert torch.equal(got == float("inf"), exact == float("inf"))
    assert torch.equal(got == float("-inf"), exact == float("-inf"))
    fin = torch.isfinite(exact)
    # |q·k̂ − q·k| <= sum_d |q_d| (max_d − min_d) / (2 L) for every key of a page
    slack = (q.abs().reshape(B, Hkv, -1, 1, D) * ((mx - mn) / (2 * ((1 << bits) - 1))).reshape(B, Hkv, 1, MP, D))
    slack = slack.sum(-1).amax(2)
    assert ((got - exact).abs()[fin] <= slack[fin] + 1e-4).all()
    if bits == 1 and fin.any():
        assert (got - exact).abs()[fin].max() > 1e-2            # the codes, not the keys, were read


@pytest.mark.parametrize("codes", [False, True])
@pytest.mark.parametrize("B,Hq,Hkv,D,npages,kc,softcap", [(1, 6, 2, 16, 11, 5, None), (2, 9, 3, 32, 7, 7, 3.0),
                                                          (1, 4, 1, 16, 1, 3, None)])
def test_rerank_mass_matches_the_softmax_over_candidates(B, Hq, Hkv, D, npages, kc, softcap, codes):
    """rank=mass: kernel vs reference, and each candidate's score is the log of its attention mass
    when each query's softmax runs over the candidates' valid tokens only, summed over the group
    (computed here directly, one softmax over the gathered tokens)."""
    g = torch.Generator().manual_seed(npages + 17)
    P, MP, scale, bits = 16, 12, 0.3, 2
    q = torch.randn(B, Hq, 1, D, generator=g)
    keys = torch.randn(B * Hkv * MP, P, D, generator=g)
    bound = _scores(g, B, Hkv, MP, npages, 1000)
    pos = torch.tensor([(npages - 1) * P + 5])
    cand = ref.select_pages(bound, kc, pos, page=P, row_pages=MP)
    how = dict(row_pages=MP, rank="mass", scale=scale, softcap=softcap)
    if codes:
        mn, mx = ref.page_minmax(keys.reshape(B, Hkv, MP * P, D), P)
        cd = ref.page_codes(keys.reshape(B, Hkv, MP * P, D), mn, mx, bits).reshape(-1, P, D * bits // 8)
        mn, mx = mn.reshape(-1, D), mx.reshape(-1, D)
        got = quest.rerank_code_scores(q, cd, mn, mx, bound, *cand, bits=bits, **how)
        want = ref.rerank_code_scores(q, cd, mn, mx, bound, *cand, bits=bits, **how)
        keys = ref.page_keys(cd, mn, mx, bits)
    else:
        got = quest.rerank_scores(q, keys, bound, *cand, **how)
        want = ref.rerank_scores(q, keys, bound, *cand, **how)
    assert torch.allclose(got, want, atol=1e-4)
    assert (got == float("inf")).sum() == (bound[..., :npages] == float("inf")).sum()   # forced pages stay
    assert ((got > float("-inf")).sum(-1) == min(kc, npages)).all()                       # only candidates
    G = Hq // Hkv
    for r in range(B * Hkv):
        ids = cand[0][r, :int(cand[1][r])].long()
        n_tok = [int(cand[2][r]) if j == len(ids) - 1 else P for j in range(len(ids))]
        tok = torch.cat([keys[pid, :n] for pid, n in zip(ids.tolist(), n_tok)]).float()
        lg = q[r // Hkv, (r % Hkv) * G:(r % Hkv + 1) * G, 0].float() @ tok.T * scale
        if softcap:
            lg = softcap * torch.tanh(lg / softcap)
        p = lg.softmax(-1).sum(0).split(n_tok)                   # each page's mass, summed over the group
        for pid, m in zip(ids.tolist(), p):
            local = pid - r * MP
            if bound.reshape(-1, MP)[r, local] != float("inf"):
                assert abs(float(got.reshape(-1, MP)[r, local].exp()) - float(m.sum())) < 1e-4


@pytest.mark.parametrize("rank", ["max", "mass"])
@pytest.mark.parametrize("B,Hq,Hkv,D,MP,npages,bits,softcap", [(1, 6, 2, 32, 13, 11, 2, None),
                                                              (2, 9, 3, 64, 21, 21, 4, 5.0),
                                                              (1, 4, 1, 16, 9, 1, 2, None)])
@pytest.mark.parametrize("fold", [None, False])
def test_all_page_code_scores_equal_the_second_stage_over_every_page(B, Hq, Hkv, D, MP, npages, bits, softcap, rank,
                                                                    fold):
    """Every page a candidate (rerank x budget >= the cache): the one-kernel path over the cache's
    buffers (no bound: sink and recent pages forced from pos) equals the reference, and the table-driven
    kernel given every page as a candidate and the real bound (whose forced pages are the same)."""
    g = torch.Generator().manual_seed(MP + bits)
    P = 16
    q = torch.randn(B, Hq, 1, D, generator=g)
    keys = torch.randn(B, Hkv, MP * P, D, generator=g)
    mn, mx = ref.page_minmax(keys, P)
    codes = ref.page_codes(keys, mn, mx, bits)                                  # (B, Hkv, MP, P, NB)
    pos = torch.tensor([(npages - 1) * P + 6])
    bound = quest.page_scores(q, mn, mx, pos, page=P, sink=1, recent=2)
    how = dict(bits=bits, rank=rank, scale=0.2, softcap=softcap)
    got = quest.all_page_code_scores(q, codes, mn, mx, pos, sink=1, recent=2, fold=fold, **how)
    want = ref.all_page_code_scores(q, codes, mn, mx, pos, sink=1, recent=2, **how)
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.equal(got == float("inf"), bound == float("inf"))
    cand = quest.select_pages(bound, MP, pos, page=P, row_pages=MP)
    table = quest.rerank_code_scores(q, codes.reshape(-1, P, codes.shape[-1]), mn.reshape(-1, D), mx.reshape(-1, D),
                                     bound, *cand, row_pages=MP, fold=fold, **how)
    assert torch.allclose(got, table, atol=1e-4)
    assert (got[..., :npages] > float("-inf")).all() and (got[..., npages:] == float("-inf")).all()


@pytest.mark.parametrize("G,MP", [(3, 2500), (1, 7), (4, 1024)])   # 10, 1 and 4 blocks of 256 pages
def test_page_mass_kernel_matches_reference(G, MP):
    """The two-pass normalization kernel: candidates over a wide range of log-masses, non-candidates (-inf for
    every query), forced pages (+inf bound)."""
    g = torch.Generator().manual_seed(G + MP)
    lse = torch.randn(2, 3, MP, G, generator=g) * 30
    lse[:, :, 1::3] = float("-inf")
    lse[0, 1, :, 0] = float("-inf")                      # one query's whole row empty but for others
    bound = torch.randn(2, 3, MP, generator=g)
    bound[..., 0] = float("inf")
    got, want = quest.page_mass(lse, bound, block=256), ref.page_mass(lse, bound)
    pos = torch.tensor([16 * (MP - 3) + 2])                      # forced pages from pos instead of a bound
    by_pos = quest.page_mass(lse, None, block=256, pos=pos, page=16, sink=2, recent=3)
    forced = ref.forced_bound(bound.shape, pos, page=16, sink=2, recent=3)
    assert torch.equal(by_pos == float("inf"), forced == float("inf"))
    assert torch.equal(by_pos.isfinite(), ref.page_mass(lse, forced).isfinite())
    assert torch.equal(got == float("inf"), want == float("inf"))
    assert torch.equal(got == float("-inf"), want == float("-inf"))
    fin = want.isfinite()
    assert torch.allclose(got[fin], want[fin], atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the block select is CUDA (NVRTC)")
@pytest.mark.parametrize("B,Hkv,MP,npages,k,levels", [
    (1, 2, 13, 13, 5, 4), (2, 3, 70, 41, 9, 1000), (1, 1, 37, 30, 12, 2), (1, 2, 5, 3, 4, 5), (1, 1, 9, 1, 4, 5),
    (2, 2, 300, 283, 31, 100000), (1, 8, 8192, 8190, 1021, 10 ** 6), (1, 4, 16384, 16001, 5000, 50),
    (1, 2, 3000, 2999, 3000, 7), (1, 2, 4001, 3999, 17, 10 ** 6)])   # odd row length: scalar loads                                             # k = every page
@pytest.mark.parametrize("method", ["block", "block-late", "cluster"])
def test_select_pages_block_matches_reference(B, Hkv, MP, npages, k, levels, method, monkeypatch):
    if method == "cluster" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the cluster select needs sm_90+")
    if method == "block-late":      # every radix pass, no early end
        monkeypatch.setattr(page_select, "BLOCK_EARLY", 0)
        method = "block"
    g = torch.Generator().manual_seed(MP + k)
    s = _scores(g, B, Hkv, MP, npages, levels)
    s[0, 0, 1] = -0.0
    s[0, -1, 2] = float("inf")
    pos = torch.tensor([(npages - 1) * 16 + 7])
    got = quest.select_pages(s.cuda(), k, pos.cuda(), page=16, row_pages=MP + 2, method=method)
    want = ref.select_pages(s, k, pos, page=16, row_pages=MP + 2)
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[2].cpu(), want[2])
    assert _valid(got[0].cpu(), got[1].cpu()) == _valid(want[0], want[1])
