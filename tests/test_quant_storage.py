"""Quantized storage under eviction (`quant+snapkv`, `kv4+streaming`, `quant+tova`): at 8 bits it
matches the full-precision storage under the same eviction (keeps, ring overwrites, argmin overwrites
and the packed decode kernel included), its bytes are every tensor it holds and fewer than full
storage's, specs round-trip, the graph-safe step equals the eager one, runs are deterministic. And
under Quest's selection (`quant+quest`): rows gathered one by one equal the whole-layer read, every
page selected equals the storage's own decode, a small budget selects as full-precision Quest does."""
import pytest
import torch
import transformers
from test_evict import tensor_bytes

from longkv.cache import compose
from longkv.cache import spec as cache_spec
from longkv.engine.decode import decode_tokens
from longkv.engine.prefill import prefill
from longkv.engine.sampling import Sampling
from longkv.errors import UserError
from longkv.kernels import quant_reference as qref
from longkv.models.load import load_model

CAP = 96
Q8 = "quant:bits=8,group=16,sink=2,window=4"      # small groups/window so tokens really get packed
POLICIES = {"snapkv": "snapkv:ratio=0.5,window=8", "streaming": "streaming:budget=30,sink=3",
            "tova": "tova:budget=30"}
STORAGE = {"snapkv": Q8, "streaming": "kv4:bits=8,group=16,sink=2,window=4", "tova": Q8}
FULL_BUDGET = {"snapkv": "snapkv:ratio=0", "streaming": "streaming:budget=1000", "tova": "tova:ratio=0"}


@pytest.fixture(scope="module")
def tiny(tiny_llama32):
    return tiny_llama32


def ids(n=60, seed=0):
    return torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(seed))


def build(model, spec):
    return cache_spec.parse(spec).build(model.layer_specs(), batch=1, capacity=CAP, device="cpu", dtype=torch.float32)


_RUNS: dict = {}


def greedy(model, kv, logits, new):
    return [t for part in decode_tokens(model, kv, logits[:, -1], max_new_tokens=new, sampling=Sampling(),
                                        stop_ids=set()) for t in part]


def graph_greedy(model, spec, new: int) -> list[int]:
    """Greedy tokens through the device-only step (`make_step(pos, None)`: what a CUDA graph replays),
    run eagerly on the CPU after the same prefill as `run`."""
    kv = build(model, spec)
    logits = prefill(model, kv, ids(), chunk=16)
    toks = [int(logits.argmax(-1))]
    with torch.inference_mode():
        for _ in range(new - 1):
            out = model(torch.tensor([[toks[-1]]]), model.make_step(torch.tensor([kv.length]), None), kv)[:, -1]
            kv.advance(1)
            toks.append(int(out.argmax(-1)))
    return toks


def run(model, spec, new=12):
    """Prefill 60 tokens in chunks of 16, then `new` greedy decode steps (memoized: runs are deterministic,
    which test_deterministic checks without the memo)."""
    if (id(model), spec, new) not in _RUNS:
        kv = build(model, spec)
        logits = prefill(model, kv, ids(), chunk=16, logits="all")
        toks = greedy(model, kv, logits, new)
        _RUNS[id(model), spec, new] = logits, toks, kv
    return _RUNS[id(model), spec, new]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_full_budget_8_bits_is_close_to_the_full_cache(tiny, name):
    ref_logits, ref_toks, _ = run(tiny, "full", new=5)
    logits, toks, kv = run(tiny, f"{STORAGE[name]}+{FULL_BUDGET[name]}", new=5)
    assert type(kv.store).__name__.startswith("QuantStorage")
    assert kv.store.nq(kv.store.count[0]) > 0                          # tokens really were packed
    assert (logits - ref_logits).abs().max() < 0.02 * ref_logits.abs().max()
    assert toks == ref_toks


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_8_bits_matches_full_storage_under_the_same_eviction(tiny, name):
    """Compaction, ring overwrites of packed groups (streaming), argmin overwrites (tova), decode kernel."""
    a_logits, a_toks, a = run(tiny, f"full+{POLICIES[name]}")
    b_logits, b_toks, b = run(tiny, f"{STORAGE[name]}+{POLICIES[name]}")
    assert a.compactions > 0 and b.n == a.n
    assert (a_logits - b_logits).abs().max() < 0.02 * a_logits.abs().max()
    assert a_toks == b_toks
    assert sorted(a.store.positions(0, a.n[0])[0, 0].tolist()) == sorted(b.store.positions(0, b.n[0])[0, 0].tolist())
    assert b.stats()["decode"] == "packed kernel"


@pytest.mark.parametrize("spec", ["quant:bits=4,group=16,sink=2,window=4+snapkv:ratio=0.5,window=8",
                                  "kv4:group=16,window=4+streaming:budget=30,sink=3",
                                  "quant:bits=8,group=16,window=4+tova:budget=30",
                                  "kv2:window=4+snapkv:ratio=0.5,window=8"])
def test_nbytes_is_every_tensor_and_less_than_full_storage(tiny, spec):
    _, _, kv = run(tiny, spec)
    assert kv.nbytes() == tensor_bytes(kv), (kv.nbytes(), tensor_bytes(kv))
    assert kv.store.nbytes() == sum(t.numel() * t.element_size() for t in kv.store.tensors())
    assert len({t.data_ptr() for t in kv.store.tensors()}) == len(kv.store.tensors())   # nothing counted twice
    policy = spec.split("+", 1)[1]
    _, _, full = run(tiny, f"full+{policy}")
    assert kv.n == full.n and kv.nbytes() < full.nbytes()


@pytest.mark.parametrize("text", ["quant:bits=4+snapkv:ratio=0.5", "kv4+streaming:ratio=0.5", "quant:bits=2+tova:budget=512",
                                  "kv2+knorm:budget=64", "quant:bits=3,group=32,window=64+pyramidkv:ratio=0.7"])
def test_specs_round_trip_and_build(tiny, text):
    s = cache_spec.parse(text)
    assert cache_spec.parse(str(s)) == s
    kv = s.build(tiny.layer_specs(), batch=1, capacity=CAP, device="cpu", dtype=torch.float32)
    assert type(kv.store).__name__.startswith("QuantStorage")


def test_graph_decode_path_matches_eager(tiny):
    """Positions only on the device (`step.start is None`, what a CUDA graph replays), run eagerly."""
    spec = f"{Q8}+{POLICIES['streaming']}"
    _, eager, _ = run(tiny, spec)
    assert graph_greedy(tiny, spec, 12) == eager


def test_deterministic(tiny):
    spec = "quant:bits=2,group=16,sink=2,window=4+tova:budget=30"
    a = build(tiny, spec)
    la = prefill(tiny, a, ids(), chunk=16, logits="all")
    b = build(tiny, spec)
    lb = prefill(tiny, b, ids(), chunk=16, logits="all")
    assert torch.equal(la, lb)
    ta, tb = greedy(tiny, a, la, 6), greedy(tiny, b, lb, 6)
    assert ta == tb


def test_unfit_head_dim_says_decode_dequantizes():
    from test_compose import _specs  # head dim 16: not for the packed kernel
    kv = cache_spec.parse("kv4+snapkv").build(_specs(), batch=1, capacity=64, device="cpu", dtype=torch.float32)
    assert "no speed gain" in kv.stats()["decode"]


@pytest.mark.parametrize("bad,msg", [("quant:prerope=1+snapkv", "after RoPE"), ("quant:rotate=1+snapkv", "rotation"),
                                     ("kv4+adakv+snapkv", "full-precision"), ("kv4+quest:rerank=4", "rerank")])
def test_unsupported_options_are_clear(bad, msg):
    from test_compose import _specs
    with pytest.raises(UserError, match=msg):
        cache_spec.parse(bad).build(_specs(), batch=1, capacity=64, device="cpu", dtype=torch.float32)


def test_listing_names_quant_storages():
    assert {"quant", "kv4", "kv3", "kv2"} <= set(compose.STORAGES)
    assert any(c.startswith("[full|") and "quant" in c and c.endswith("tova") for c in compose.combinations())


def test_rows_gathered_one_by_one_equal_the_layer_read(tiny):
    """Per-head rows (packed ones with outliers among them, sinks, the recent ring) dequantized one by one
    (`gather_rows`) equal the layer's read, and a read from a later slot is the same rows."""
    _, _, kv = run(tiny, "quant:bits=4,group=16,sink=2,window=4,outliers=0.05+snapkv:ratio=0")
    st, n = kv.store, kv.store.count[1]
    assert st.nq(n) > 0 and st.n_out[1] > 0
    k, v = st.read(1, n)
    rows = torch.randint(0, n, (1, 2, 37), generator=torch.Generator().manual_seed(0))
    rows[0, 0, :3] = torch.tensor([0, 1, n - 1])
    kr, vr = ref_gather_rows(st, 1, rows)
    idx = rows[..., None].expand(-1, -1, -1, k.shape[-1])
    assert torch.equal(kr, k.gather(2, idx)) and torch.equal(vr, v.gather(2, idx))
    for start in (1, 19, n - 3):                        # inside the sink, a packed group, the ring
        ks, vs = st.read(1, n, start)
        assert torch.equal(ks, k[:, :, start:]) and torch.equal(vs, v[:, :, start:])


def ref_gather_rows(st, layer, rows):
    k, v = qref.gather_rows(st.kq[layer], st.vq[layer], st.kf[layer], st.vf[layer], rows, st.nq(st.cnt[layer]),
                           bits=st.bits, group=st.g, vgroup=st._vg(layer), sink=st.S)
    return k.to(st.dtype), v.to(st.dtype)


QUEST = "quest:dense_layers=0,recent=1"


def test_quant_quest_every_page_equals_the_storage_decode(tiny):
    """A budget of 5 of the 6 pages while at most 5 hold tokens: the sparse path (score, select,
    gather-dequantize, paged attention) reads every token, so it decodes what the storage's own
    decode does (ratio=0: every page, degraded to the storage)."""
    _, toks, kv = run(tiny, f"{Q8}+{QUEST},budget=80")
    _, dense_toks, dense = run(tiny, f"{Q8}+{QUEST},ratio=0")
    assert kv.k_pages == 5 < kv.max_pages and kv._sparse(0) and not dense._sparse(0)
    assert kv.store.nq(kv.store.count[0]) > 0
    assert toks == dense_toks


def test_quant_quest_small_budget_selects_as_full_precision_quest(tiny):
    logits, toks, kv = run(tiny, f"{Q8}+{QUEST},budget=32")
    f_logits, f_toks, full = run(tiny, f"{QUEST},budget=32")
    assert kv.k_pages == 2 and (60 + 12) // 16 + 1 > kv.k_pages            # really sparse
    assert toks == f_toks and (logits - f_logits).abs().max() < 0.02 * f_logits.abs().max()
    assert kv.nbytes() == tensor_bytes(kv) and kv.nbytes() < full.nbytes()
    assert "quant+quest" in kv.stats()["note"]


def test_quant_quest_graph_step_equals_eager(tiny):
    spec = "kv4:group=16,sink=2,window=4+quest:budget=32,dense_layers=1,recent=1"
    _, eager, _ = run(tiny, spec)
    assert graph_greedy(tiny, spec, 12) == eager


@pytest.mark.parametrize("params", [dict(bits=8, group=16, sink=2, window=4),
                                    dict(bits=4, group=16, sink=3, window=8, outliers=0.1)])
def test_append_only_writes_equal_the_general_writes(params):
    """Quest's storage writes a decode token with the append + flush kernel (`append_only`); the
    slots it holds must read back as the general (any-slot) write leaves them, through group flushes."""
    from longkv.cache.base import LayerSpec
    from longkv.models.rope import Rope, RopeParams

    specs = [LayerSpec(num_heads=4, num_kv_heads=2, head_dim=32, scale=0.2, rope=Rope(RopeParams(), 32), rope_index=0)]
    g = torch.Generator().manual_seed(0)
    a, b = (compose.make_storage(("quant", dict(params)), specs, batch=1, device="cpu", dtype=torch.float32)
            for _ in range(2))
    b.append_only = True
    for st in (a, b):
        st.reserve(0, 96, 0)
    cos, sin = torch.ones(1, 32), torch.zeros(1, 32)
    k, v = torch.randn(1, 2, 37, 32, generator=g), torch.randn(1, 2, 37, 32, generator=g)
    for st in (a, b):
        st.write(0, k, v, pos=torch.arange(37), cos=cos.expand(37, -1), sin=sin.expand(37, -1), slot=0)
    for t in range(37, 80):   # 43 decode tokens: two more groups complete
        kk, vv = torch.randn(1, 2, 1, 32, generator=g), torch.randn(1, 2, 1, 32, generator=g)
        for st in (a, b):
            st.write(0, kk, vv, pos=torch.tensor([t]), cos=cos, sin=sin, slot=torch.tensor([t]))
        for x, y in zip(a.read(0, t + 1), b.read(0, t + 1)):
            assert (x - y).abs().max() < 1e-3, t
    assert b.nq(80) - b.nq(37) >= 32            # groups were flushed by the decode writes themselves


def test_quant_quest_sliding_window_layers_read_their_window(tmp_path):
    """Windowed layers (Mistral-style, window 24 < 60 tokens) keep their window as `full`'s ring: the same
    tokens as full-precision quest, eager and through the device-only step."""
    cfg = transformers.MistralConfig(vocab_size=97, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=24)
    torch.manual_seed(2)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    spec = f"{Q8}+quest:budget=32"
    kv = build(model, spec)
    logits = prefill(model, kv, ids(), chunk=16, logits="all")
    toks = greedy(model, kv, logits, 10)
    ref_kv = build(model, "quest:budget=32")
    ref_logits = prefill(model, ref_kv, ids(), chunk=16, logits="all")
    assert toks == greedy(model, ref_kv, ref_logits, 10)
    assert graph_greedy(model, spec, 10) == toks


KV4G = "kv4:group=16,sink=2,window=4"
GROUPS = "quest:groups=1,dense_layers=0"


def test_quest_over_key_groups_keeps_sliding_layers_as_a_full_precision_ring(tiny_gemma32):
    """Gemma 3's sliding-window layers are not in the packed storage: they hold their window in full
    precision, the same bytes as `full`'s ring (so they do not grow with the context), and only the global
    layer is packed and scored. With nothing quantized (window 64) the cache decodes what `full` does;
    sparse, the device-only step decodes what the eager one does."""
    model = tiny_gemma32
    specs = model.layer_specs()
    windowed = [i for i, s in enumerate(specs) if s.window is not None]
    assert windowed and len(windowed) < len(specs)
    logits, toks, _ = run(model, "kv4:group=16,sink=2,window=64+quest:groups=1,dense_layers=0,budget=40")
    f_logits, f_toks, full = run(model, "full")
    assert toks == f_toks and (logits - f_logits).abs().max() < 1e-4 * f_logits.abs().max()
    spec = f"{KV4G}+{GROUPS},budget=40"
    _, toks, kv = run(model, spec)
    assert kv._sparse(5) and kv.store.nq(int(kv.store.cnt[5])) == 64      # the global layer: packed and scored
    assert all(kv.store.kq[i] is None and kv.store.kf[i] is None for i in windowed)
    held = sum(kv.local.k[kv.win[i]].nbytes + kv.local.v[kv.win[i]].nbytes for i in windowed)
    assert held == sum(full.k[i].nbytes + full.v[i].nbytes for i in windowed) < sum(full.k[5].nbytes for _ in windowed)
    assert kv.nbytes() == tensor_bytes(kv)
    assert "sliding-window layers" in kv.stats()["note"]
    assert graph_greedy(model, spec, 12) == toks


def test_quest_over_key_groups_every_group_equals_the_storage_decode(tiny):
    """groups=1 with a budget of every quantized group (4 of the 5 the buffer holds at the end): the sparse
    path (bounds from the groups' scale/zero, select, the listed groups + the fp slots) decodes what the
    storage's own dense decode does."""
    logits, toks, kv = run(tiny, f"{KV4G}+{GROUPS},budget=86")
    d_logits, d_toks, dense = run(tiny, f"{KV4G}+quest:dense_layers=0,ratio=0")
    assert kv.groups and kv.k_pages == 4 and kv._sparse(0) and not dense._sparse(0)
    assert kv.store.nq(int(kv.store.cnt[0])) == 64                   # 4 groups packed by the end
    assert toks == d_toks and (logits - d_logits).abs().max() < 1e-4 * d_logits.abs().max()


def test_quest_over_key_groups_reads_fewer_and_holds_no_bounds(tiny):
    _, toks, kv = run(tiny, f"{KV4G}+{GROUPS},budget=40")
    _, _, minmax = run(tiny, f"{KV4G}+quest:dense_layers=0,budget=40")
    assert kv.k_pages == 2 and kv._sparse(1)                          # 2 of the 4 packed groups a step
    assert all(t is None for t in kv.pmin + kv.pmax)
    assert kv.nbytes() == tensor_bytes(kv) == kv.store.nbytes() < minmax.nbytes()
    assert "key groups" in kv.stats()["note"]
    assert graph_greedy(tiny, f"{KV4G}+{GROUPS},budget=40", 12) == toks


def test_quest_over_key_groups_says_when_the_fp_window_exceeds_the_budget(tiny):
    """The sink and window are always read and count toward the budget: a window wider than the budget
    reads more than the budget, and the stats say so (with the tokens a step really reads)."""
    fits = build(tiny, f"{KV4G}+{GROUPS},budget=40").stats()["note"]
    over = build(tiny, f"kv4:group=16,sink=2,window=32+{GROUPS},budget=20").stats()["note"]
    assert "exceed" not in fits
    assert "alone exceed the 20-token budget" in over and f"about 66 of {CAP} tokens" in over   # 2 + 32 + 2 x 16


@pytest.mark.parametrize("spec,msg", [(f"{Q8}+quest:groups=1", "2/4-bit"), ("quest:groups=1", "packed storage"),
                                      ("quant:bits=2,outliers=0.01+quest:groups=1", "outliers")])
def test_quest_over_key_groups_refuses_what_it_cannot_read(tiny, spec, msg):
    with pytest.raises(UserError, match=msg):
        build(tiny, spec)


def test_kivi_presets_are_storages_whose_groups_are_the_pages(tiny):
    kv = build(tiny, "kivi2:sink=2,window=4+quest:groups=1,budget=40")
    assert kv.groups and kv.P == 16 == kv.store.g and kv.store.bits == 2


def test_quest_over_key_groups_scored_from_channels(tiny):
    """channels=F (SparQ estimates from a channel-major copy of the key codes): the copy holds every flushed
    group's codes and statistics after prefill chunks and decode flushes, nbytes counts it, and the
    device-only step decodes what the eager one does (both ranks)."""
    from longkv.kernels import sparq_reference as sref

    spec = f"{KV4G}+{GROUPS},budget=40,channels=0.25,rank=max"
    _, toks, kv = run(tiny, spec)
    st = kv.store
    for layer in range(2):
        kd = st.kq[layer]
        sk, sz = torch.zeros_like(kv.sketch[layer]), torch.zeros_like(kv.sz[layer])
        sref.sketch_groups(kd["planes"], kd["scale"], kd["zero"], sk, sz, 0, st.nq(int(st.cnt[layer])) // kv.P,
                          group=kv.P)
        assert st.nq(int(st.cnt[layer])) == 64 and torch.equal(sk, kv.sketch[layer]) and torch.equal(sz, kv.sz[layer])
    assert kv.channels == [16, 16] and "channels" in kv.stats()["note"]   # 0.25 of 32 = 8, raised to 16
    _, _, plain = run(tiny, f"{KV4G}+{GROUPS},budget=40")
    assert kv.nbytes() == tensor_bytes(kv) == plain.nbytes() + sum(t.numel() * t.element_size()
                                                                  for t in kv.sketch + kv.sz)
    assert graph_greedy(tiny, spec, 12) == toks
    for rank in ("max", "mass", "peak"):
        s = f"{KV4G}+{GROUPS},budget=40,channels=0.25,rank={rank}"
        assert graph_greedy(tiny, s, 12) == run(tiny, s)[1]


def test_quest_channels_weighed_by_the_keys_rms(tiny):
    """weigh=1: Σ k² per channel over the first `fit` keys (two prefill chunks of 16 here), the weights
    from it, nbytes counting both, a choice that differs from |q| alone, graph step = eager (both ranks)."""
    from longkv.kernels import sparq_reference as sref

    spec = f"{KV4G}+{GROUPS},budget=40,channels=0.25,weigh=1,fit=32,rank=max"
    _, toks, kv = run(tiny, spec)
    assert kv.fitted == [32, 32]
    for layer in range(2):
        assert (kv.ksq[layer] > 0).all() and torch.equal(kv.wch[layer], sref.sparq_weights(kv.ksq[layer], 32))
    _, _, plain = run(tiny, f"{KV4G}+{GROUPS},budget=40,channels=0.25,rank=max")
    assert kv.nbytes() == tensor_bytes(kv) == plain.nbytes() + sum(t.numel() * t.element_size()
                                                                  for t in kv.ksq + kv.wch)
    q = torch.randn(1, tiny.layer_specs()[0].num_heads, 1, kv.wch[0].shape[-1],
                    generator=torch.Generator().manual_seed(3))
    G = q.shape[1] // kv.wch[0].shape[1]
    qg = q.reshape(1, -1, G, q.shape[-1])
    assert not torch.equal(sref.sparq_channels(qg, 8, kv.wch[0])[0].sort(-1).values,
                           sref.sparq_channels(qg, 8)[0].sort(-1).values)
    for rank in ("max", "mass"):
        s = f"{KV4G}+{GROUPS},budget=40,channels=0.25,weigh=1,fit=32,rank={rank}"
        assert graph_greedy(tiny, s, 12) == run(tiny, s)[1]
    with pytest.raises(UserError, match="weigh=1"):
        build(tiny, f"{KV4G}+{GROUPS},budget=40,weigh=1")
    with pytest.raises(UserError, match="rank=peak"):       # peak ranks SparQ's estimates only
        build(tiny, f"{KV4G}+{GROUPS},budget=40,rank=peak")
    with pytest.raises(UserError, match="rank=peak"):
        build(tiny, "quest:budget=40,rank=peak")


def test_quest_pages_of_several_key_groups(tiny, monkeypatch):
    """groups=1 with page = 2 key groups: with every page read it decodes what the storage's own decode does; at
    a budget of one page the device-only step decodes what the eager one does (bound, SparQ max, mass and peak); the
    selected pages' groups are listed in order and only the flushed ones are counted; a page that is not a
    power of two is refused."""
    logits, toks, kv = run(tiny, f"{KV4G}+{GROUPS},page=32,budget=86")
    d_logits, d_toks, _ = run(tiny, f"{KV4G}+quest:dense_layers=0,ratio=0")
    assert kv.P == 32 and kv.sub == 2 and kv.k_pages == 2 and kv._sparse(0)
    assert toks == d_toks and (logits - d_logits).abs().max() < 1e-4 * d_logits.abs().max()
    from longkv.kernels import quest as kq

    ranked = []                         # the select ranks pages: ceil(5 groups / 2) = 3 a row, whatever the rank
    select = kq.select_pages
    monkeypatch.setattr(kq, "select_pages", lambda scores, *a, **k: ranked.append(scores.shape[2]) or select(
        scores, *a, **k))
    for extra in ("", ",channels=0.25,rank=max", ",channels=0.25,rank=mass", ",channels=0.25,rank=peak"):
        spec = f"{KV4G}+{GROUPS},page=32,budget=40{extra}"
        ranked.clear()
        _, toks, kv = run(tiny, spec)
        assert kv.k_pages == 1 and "2 of the 16-token key groups" in kv.stats()["note"]
        assert kv.store.kq[0]["scale"].shape[2] == 5 and ranked and set(ranked) == {3}
        assert graph_greedy(tiny, spec, 12) == toks
    # rows of 3 pages (6 groups), 3 groups flushed (n = 2 + 4 + 3·16 + 1): row 0 took pages 0 and 2, row 1 only its
    # page 1, whose second group is not flushed yet
    from longkv.kernels import page_select, sparse_reference

    table, nsel = torch.tensor([[0, 2], [4, 3]], dtype=torch.int32), torch.tensor([2, 1], dtype=torch.int32)
    for fn in (page_select.page_groups, sparse_reference.page_groups):   # Triton (interpreted) and the reference
        ids, count = fn(table, nsel, torch.tensor([55]), sub=2, row_pages=3, row_groups=6, group=16, sink=2, window=4)
        assert ids.tolist() == [[0, 1, 4, 5], [8, 9, 6, 7]] and count.tolist() == [2, 1]
    with pytest.raises(UserError, match="power of two"):
        build(tiny, f"{KV4G}+{GROUPS},page=48,budget=40")


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("BH,row_pages,K,sub,length", [(3, 40, 7, 4, 40 * 64 - 5), (2, 9, 9, 2, 300),
                                                        (4, 1024, 128, 4, 65536)])
def test_page_groups_kernel_matches_reference(BH, row_pages, K, sub, length, device):
    """The selected pages' group listing (Triton; compiled on a GPU) equals the reference at random tables: taken
    counts from 0 to K, the page still filling among them, rows whose table is only partly taken."""
    from longkv.kernels import page_select, sparse_reference

    g = torch.Generator().manual_seed(BH * K)
    table = torch.stack([torch.randperm(row_pages, generator=g)[:K].sort().values + r * row_pages for r in range(BH)])
    nsel = torch.randint(0, K + 1, (BH,), generator=g)
    nsel[0] = K
    args = (table.to(torch.int32).to(device), nsel.to(torch.int32).to(device), torch.tensor([length], device=device))
    kw = dict(sub=sub, row_pages=row_pages, row_groups=row_pages * sub, group=16, sink=4, window=128)
    got, want = page_select.page_groups(*args, **kw), sparse_reference.page_groups(*args, **kw)
    for r in range(BH):                  # ids past a row's taken pages are not read: compare only the taken ones
        n = int(nsel[r]) * sub
        assert got[0][r, :n].tolist() == want[0][r, :n].tolist()
    assert got[1].tolist() == want[1].tolist()


@pytest.mark.parametrize("spec,msg", [(f"{KV4G}+quest:channels=0.25", "groups=1"),
                                      ("kivi2+quest:groups=1,channels=0.25", "4-bit"),
                                      (f"{KV4G}+quest:groups=1,channels=2", "fraction"),
                                      ("quest:channels=0.5", "packed storage")])
def test_quest_channels_refuses_what_it_cannot_read(tiny, spec, msg):
    with pytest.raises(UserError, match=msg):
        build(tiny, spec)


def test_quest_every_k_steps_keeps_its_table_in_between(tiny):
    """every=K (LServe's reusable page selector): the groups read are chosen on the first decode step after the
    prompt and every K-th after it, and the same table is read in between; every=1 is the default; nbytes
    counts the kept tables; the device-only step decodes what the eager one does."""
    base = f"{KV4G}+{GROUPS},budget=40,channels=0.25,rank=max"
    assert run(tiny, f"{base},every=1")[1] == run(tiny, base)[1]
    kv = build(tiny, f"{base},every=3")
    logits = prefill(tiny, kv, ids(), chunk=16)
    assert int(kv.p0) == 60 and "chosen every 3 decode steps" in kv.stats()["note"]
    toks, tabs = [int(logits.argmax(-1))], []
    with torch.inference_mode():
        for _ in range(9):
            out = tiny(torch.tensor([[toks[-1]]]), tiny.make_step(torch.tensor([kv.length]), None), kv)[:, -1]
            kv.advance(1)
            toks.append(int(out.argmax(-1)))
            tabs.append([(kv.tab[i].clone(), kv.tabn[i].clone()) for i in range(2)])
    same = lambda a, b: all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    for i in range(1, 9):                       # steps 0, 3, 6 choose; 1-2, 4-5, 7-8 keep the table
        if i % 3:
            assert same(tabs[i], tabs[i - 1]), i
    assert not all(same(tabs[i], tabs[i - 1]) for i in (3, 6))      # and a fresh choice does change it
    assert toks[:2] == run(tiny, base, new=2)[1]                     # the first decode step chooses as every=1
    assert kv.nbytes() == tensor_bytes(kv) == run(tiny, base)[2].nbytes() + sum(
        t.numel() * t.element_size() for t in kv.tab + kv.tabn + [kv.p0])
    assert graph_greedy(tiny, f"{base},every=3", 10) == toks
    for bad, msg in ((f"{base},every=0", "every=0"), (f"{KV4G}+quest:every=2", "groups=1"),
                     ("quest:every=2", "packed storage")):
        with pytest.raises(UserError, match=msg):
            build(tiny, bad)


def test_kres_keys_decode_closer_to_full_and_count_their_bits(tiny):
    """kres=1 (the keys' residual bit): the same 4-bit codes and statistics as without it, one bit more an element
    held (nbytes), keys closer to full's than the 4-bit codes' alone (on a tiny random model the values' 4 bits
    hide that in the logits), on its own and as Quest's storage (where,
    with every group read, it decodes what the storage's own decode does, and the device-only step decodes what the
    eager one does: the append + flush kernel writes the bits, the attention is the torch reference)."""
    _, _, kv0 = run(tiny, KV4G)
    _, _, kv1 = run(tiny, f"{KV4G},kres=1")
    assert kv1.kres and not kv1.graph_safe and "res" in kv1.kq[0] and "res" not in kv1.vq[0]
    assert torch.equal(kv1.kq[0]["planes"][0], kv0.kq[0]["planes"][0]) and torch.equal(kv1.kq[0]["scale"],
                                                                                         kv0.kq[0]["scale"])
    packed = sum(d["res"].numel() for d in kv1.kq if d is not None)
    assert kv1.nbytes() - kv0.nbytes() == packed and kv1.kq[0]["res"].any()
    _, _, kvf = run(tiny, "full")
    n = 48         # layer 0's keys of the prompt's first 3 groups: the same in every cache (they see only embeddings)
    want = kvf.k[0][:, :, 2:2 + n].float()
    err = [(kv._dequant(0, n)[0] - want).square().sum() for kv in (kv0, kv1)]
    assert kv1.n_quantized(kv1.length) >= n and err[1] < 0.5 * err[0]       # 0.36 here (16-token groups)
    assert str(cache_spec.parse(f"{KV4G},kres=1")) == str(cache_spec.parse(str(cache_spec.parse(f"{KV4G},kres=1"))))
    # as Quest's storage: every group read = the storage's own decode; a small budget still decodes
    every, etoks, kvq = run(tiny, f"{KV4G},kres=1+{GROUPS},ratio=0")
    own, otoks, _ = run(tiny, f"{KV4G},kres=1+quest:dense_layers=0,ratio=0")
    assert kvq.graph_safe and "res" in kvq.store.kq[0] and etoks == otoks
    assert (every - own).abs().max() < 1e-4 * own.abs().max()
    _, stoks, kvs = run(tiny, f"{KV4G},kres=1+{GROUPS},budget=24,channels=0.25,rank=max")
    assert kvs.k_pages == 1 and len(stoks) == 12 and "residual" in kvs.stats()["decode"]
    assert graph_greedy(tiny, f"{KV4G},kres=1+{GROUPS},budget=24,channels=0.25,rank=max", 12) == stoks


@pytest.mark.parametrize("extra", ["keys=token", "rotate=1"])
def test_kres_refuses_what_it_cannot_refine(tiny, extra):
    with pytest.raises(UserError, match="kres"):
        build(tiny, f"quant:bits=4,kres=1,{extra}")
