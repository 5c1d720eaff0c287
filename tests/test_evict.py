"""Invariants of every registered cache method on a tiny random Llama (GQA 6/2): causal, deterministic,
honest bytes, and the method at full budget equals the full cache; plus eviction-specific behaviour."""
import json

import pytest
import torch
import transformers
from conftest import save_tiny_llama

from longkv.cache import spec as cache_spec
from longkv.cache.registry import REGISTRY
from longkv.engine.decode import decode_tokens
from longkv.engine.prefill import prefill
from longkv.engine.sampling import Sampling
from longkv.errors import UserError
from longkv.kernels import sparse_reference as ref
from longkv.models.load import load_model

CAP = 80


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_llama(tmp_path_factory, "tiny", hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                           num_key_value_heads=2)
    (path / "duo_heads.json").write_text(json.dumps({"scores": [[0.1, 0.9], [0.5, 0.3], [0.2, 0.8]]}))
    return load_model(path), path


def ids(n, seed=0):
    return torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(seed))


def build(model, spec, cap=CAP):
    return cache_spec.parse(spec).build(model.layer_specs(), batch=1, capacity=cap, device="cpu", dtype=torch.float32)


def compressed(name, folder):
    """A spec that really compresses at these tiny sizes."""
    return {"duo": f"duo:ratio=0.5,map={folder},sink=4,window=8", "quest": "quest:budget=16,dense_layers=1",
            "streaming": "streaming:budget=20,sink=4", "adakv": "adakv+snapkv:ratio=0.5,window=8",
            "snapkv": "snapkv:ratio=0.5,window=8", "pyramidkv": "pyramidkv:ratio=0.5,window=8"}.get(name, f"{name}:ratio=0.5")


def full_budget(name, folder):
    return {"adakv": "adakv+snapkv:ratio=0", "quest": "quest:budget=100000", "streaming": "streaming:budget=100000",
            "duo": "duo:ratio=0"}.get(name, f"{name}:ratio=0" if name != "full" else "full")


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from a cache (its real footprint)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if obj.data_ptr() in seen or obj.numel() == 0:
            return 0
        seen.add(obj.data_ptr())
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x, seen) for x in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__.startswith("longkv"):
        skip = ("specs",)
        return sum(tensor_bytes(v, seen) for k, v in vars(obj).items() if k not in skip)
    return 0


def run(model, spec, x, chunk=16, new=5):
    kv = build(model, spec)
    logits = prefill(model, kv, x, chunk=chunk, logits="all")
    toks = sum(decode_tokens(model, kv, logits[:, -1], max_new_tokens=new, sampling=Sampling(), stop_ids=set()), [])
    return logits, toks, kv


METHODS = sorted(REGISTRY)


@pytest.fixture(scope="module")
def reference(tiny):
    return run(tiny[0], "full", ids(45))


@pytest.mark.parametrize("name", METHODS)
def test_every_method_invariants(tiny, reference, name):
    model, folder = tiny
    if getattr(REGISTRY[name].cls, "role", "storage") == "storage" and name != "full":
        pytest.skip("storage methods are tested by their own module")
    x = ids(45)
    ref_logits, ref_toks, _ = reference
    # full budget == full cache
    logits, toks, kv = run(model, full_budget(name, folder), x)
    assert (logits - ref_logits).abs().max() < 1e-4 and toks == ref_toks, name
    spec = compressed(name, folder) if name != "full" else "full"
    a_logits, a_toks, a = run(model, spec, x)
    # deterministic
    b_logits, b_toks, b = run(model, spec, x)
    assert torch.equal(a_logits, b_logits) and a_toks == b_toks
    # honest bytes: nbytes() is exactly the tensors the cache holds
    assert a.nbytes() == tensor_bytes(a), (a.nbytes(), tensor_bytes(a))
    if name != "full" and name != "quest":
        assert a.nbytes() < build(model, "full").nbytes()
    # causal: changing the future leaves past logits unchanged
    y = x.clone()
    y[0, 30:] = (y[0, 30:] + 1) % 97
    c_logits, _, _ = run(model, spec, y)
    assert (c_logits[:, :30] - a_logits[:, :30]).abs().max() < 1e-5


def test_ratio_and_budget_errors():
    for bad, msg in [("snapkv:ratio=1.0", r"\[0, 1\)"), ("knorm:ratio=-0.1", r"\[0, 1\)"),
                     ("tova:budget=0", ">= 1"), ("streaming:budget=4,sink=4", "exceed sink"),
                     ("quest:ratio=1.5", r"\[0, 1\)"), ("quest:rerank=2,rank=top", "rank='top' must be max, mass or peak")]:
        with pytest.raises(UserError, match=msg):
            build(_specs_model(), bad)
    with pytest.raises(UserError, match="not both"):
        build(_specs_model(), "snapkv:ratio=0.5,budget=10")


def _specs_model():
    class M:
        @staticmethod
        def layer_specs():
            from longkv.cache.base import LayerSpec
            from longkv.models.rope import Rope, RopeParams
            return [LayerSpec(num_heads=4, num_kv_heads=2, head_dim=16, scale=0.25, rope=Rope(RopeParams(), 16),
                              rope_index=0)] * 2
    return M


def test_budget_larger_than_context_says_full(tiny):
    model, _ = tiny
    _, _, kv = run(model, "snapkv:budget=500", ids(30))
    assert "degraded to the full cache" in kv.stats()["note"]


def test_chunked_eviction_bounds_memory(tiny):
    """Chunk by chunk, a streaming cache never holds more than budget + one chunk."""
    model, _ = tiny
    kv = build(model, "streaming:budget=12,sink=2", cap=200)
    peak = 0
    prefill(model, kv, ids(150), chunk=8, on_chunk=lambda n: None)
    for L in range(3):
        peak = max(peak, kv.store.slots(L))
    assert peak <= 12 + 8 + 5  # budget + chunk + growth slack
    once = build(model, "streaming:budget=12,sink=2,chunked=false", cap=200)
    prefill(model, once, ids(150), chunk=8)
    assert once.store.slots(0) >= 150


def test_streaming_keeps_sink_and_recent_and_ring_decodes(tiny):
    model, _ = tiny
    _, _, kv = run(model, "streaming:budget=12,sink=3", ids(40), new=9)
    pos = sorted(kv.store.positions(0, kv.n[0])[0, 0].tolist())
    assert kv.length == 48 and pos == [0, 1, 2] + list(range(39, 48))  # 40 prompt + 8 decoded


def test_snapkv_reports_question_awareness(tiny):
    model, _ = tiny
    kv = build(model, "snapkv:ratio=0.5,window=8")
    kv.question_at = 36
    prefill(model, kv, ids(40), chunk=16)
    sum(decode_tokens(model, kv, torch.zeros(1, 97), max_new_tokens=2, sampling=Sampling(), stop_ids=set()), [])
    st = kv.stats()
    assert st["question"] == "question-aware" and st["scored_with"] == "queries at positions [32, 40)"


def test_adakv_heads_have_different_lengths_and_honest_pages(tiny):
    model, _ = tiny
    _, _, kv = run(model, "adakv+snapkv:ratio=0.7,window=4", ids(64))
    st = kv.stats()
    assert st["head_tokens_min"] < st["head_tokens_max"]
    pages = sum(t.shape[0] for t in kv.store.kp)
    room = kv.capacity - 64
    need = sum(-(-(n + room) // 16) for lens in kv.store.lens for n in lens)
    assert pages <= need  # only the pages each KV head needs for its kept tokens + decode room


@pytest.mark.parametrize("name", [n for n in METHODS if getattr(REGISTRY[n].cls, "role", "storage") != "storage"])
def test_graph_decode_path_matches_eager(tiny, name):
    """The CUDA-graph step (positions only on the device, `step.start is None`), run eagerly on the CPU,
    produces the same tokens as eager decoding: no host-side state is needed inside the step."""
    model, folder = tiny
    spec = compressed(name, folder)
    x = ids(45)
    _, eager, _ = run(model, spec, x, new=6)
    assert graph_tokens(model, spec, x, 6) == eager


def graph_tokens(model, spec, x, new: int) -> list[int]:
    """Greedy tokens through the device-only step (`make_step(pos, None)`), run eagerly on the CPU."""
    kv = build(model, spec)
    logits = prefill(model, kv, x, chunk=16)
    toks = [int(logits.argmax(-1))]
    with torch.inference_mode():
        for _ in range(new - 1):
            pos = torch.tensor([kv.length])
            out = model(torch.tensor([[toks[-1]]]), model.make_step(pos, None), kv)[:, -1]
            kv.advance(1)
            toks.append(int(out.argmax(-1)))
    return toks


@pytest.mark.parametrize("rbits,rank,n", [(0, "max", 45), (2, "max", 45), (2, "mass", 45), (2, "mass", 70)])
def test_quest_rerank_is_deterministic_and_graph_safe(tiny, rbits, rank, n):
    """Quest with its second stage (exact keys, or 2-bit page codes written through prefill and
    decode; ranked by max logit or attention mass; every page a candidate at 45 tokens, 4 of 5 at 70):
    same tokens eager and through the device-only step, twice."""
    model, _ = tiny
    spec, x = f"quest:budget=16,dense_layers=1,rerank=2,rbits={rbits},rank={rank},recent={1 + (n == 45)}", ids(n)
    logits, eager, kv = run(model, spec, x, new=6)
    assert kv.stats()["candidate_pages"] == min(kv.max_pages, 2 * kv.k_pages) > kv.k_pages
    assert kv.stats()["rerank_reads"] == ("2-bit page-relative key codes" if rbits else "exact keys")
    assert kv.stats()["rerank_rank"] == rank
    assert (kv.k_cand >= kv.max_pages) == (n == 45)
    full_pages = (n + 6) // kv.P
    for layer, codes in enumerate(kv.codes):   # every full page's codes are its keys' codes
        if codes is None:
            assert rbits == 0 or layer < 1
            continue
        k = kv.k[layer][:, :, :full_pages * kv.P]
        assert all(torch.equal(a[:, :, :full_pages], b) for a, b in
                   zip((kv.pmin[layer], kv.pmax[layer]), ref.page_minmax(k, kv.P)))   # bounds of every full page
        want = ref.page_codes(k, kv.pmin[layer][:, :, :full_pages], kv.pmax[layer][:, :, :full_pages], rbits)
        assert torch.equal(codes[:, :, :full_pages], want)
    assert torch.equal(run(model, spec, x, new=6)[0], logits)
    assert graph_tokens(model, spec, x, 6) == eager


@pytest.mark.slow
def test_calibrate_duo_writes_a_map_duo_reads(tmp_path):
    """`calibrate_duo` on the default model at a short length: one score per (layer, KV head)."""
    from longkv.calibrate_duo import calibrate_duo
    from longkv.models.fetch import is_cached
    if not is_cached("smollm2-135m"):
        pytest.skip("needs the default model (make model)")
    out = calibrate_duo("smollm2-135m", lengths=(400,), samples=1, sink=4, window=32, out=tmp_path, progress=False)
    data = json.loads(out.read_text())
    assert len(data["scores"]) == 30 and all(len(r) == 3 for r in data["scores"])
    assert all(0 <= x <= 1 for r in data["scores"] for x in r)
    specs = __import__("longkv").load("smollm2-135m", progress=False).model.layer_specs()
    kv = cache_spec.parse(f"duo:ratio=0.5,map={out}").build(specs, batch=1, capacity=8, device="cpu", dtype=torch.float32)
    assert kv.stats()["streaming_heads"] == "45/90"


def test_quest_prefill_bounds_across_unaligned_chunks(tiny):
    """Chunks of 7 tokens start and end inside pages: every page's bounds are its keys' min/max."""
    model, _ = tiny
    kv = build(model, "quest:budget=16,dense_layers=1")
    prefill(model, kv, ids(45), chunk=7)
    for layer in range(1, len(kv.specs)):
        k = kv.k[layer][:, :, :48]
        mn, mx = ref.page_minmax(k, 16, valid=45)
        assert torch.equal(kv.pmin[layer][:, :, :3], mn) and torch.equal(kv.pmax[layer][:, :, :3], mx)


def test_adakv_on_sliding_window_layers(tiny_gemma):
    """AdaKV on Gemma 3: the windowed layers keep their window as a ring (as every method does), the
    global layer's heads their own lengths in pages; full budget equals full, honest bytes, graph path."""
    model = tiny_gemma
    windowed = [i for i, s in enumerate(model.layer_specs()) if s.window is not None]
    assert 0 < len(windowed) < len(model.layer_specs())
    x = ids(45)
    ref_logits, ref_toks, _ = run(model, "full", x)
    logits, toks, _ = run(model, "adakv+snapkv:ratio=0", x)
    assert (logits - ref_logits).abs().max() < 1e-4 and toks == ref_toks
    spec = "adakv+snapkv:ratio=0.7,window=4"
    a_logits, a_toks, a = run(model, spec, x)
    assert a.nbytes() == tensor_bytes(a) and a.nbytes() < build(model, "full").nbytes()
    assert all(a.ring.slots(i) == 8 and a.n[i] == 8 for i in windowed)          # the window, nothing more
    assert all(a.ring.slots(i) == 0 for i in range(len(a.specs)) if i not in windowed)
    assert all(a.store.kp[i] is None for i in windowed)                       # no pages for ring layers
    st = a.stats()
    assert st["head_tokens_min"] < st["head_tokens_max"]                      # global heads differ
    # the windowed layers hold what plain snapkv's windowed layers hold (the window is not the budget)
    _, _, b = run(model, "snapkv:ratio=0.7,window=4", x)
    for i in windowed:
        assert sorted(a.ring.positions(i, 8)[0, 0].tolist()) == sorted(b.store.positions(i, 8)[0, 0].tolist())
    assert graph_tokens(model, spec, x, 5) == a_toks


def test_adakv_when_every_layer_has_a_window(tmp_path):
    """Mistral-style: every layer windowed, so AdaKV has no heads to budget: it runs as the rings."""
    cfg = transformers.MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=12)
    torch.manual_seed(5)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    _, toks, kv = run(model, "adakv+snapkv:ratio=0.5,window=4", ids(40))
    _, want, _ = run(model, "full", ids(40))
    assert toks == want and "head_tokens_min" not in kv.stats() and kv.nbytes() == tensor_bytes(kv)
