"""Self-Extend: the wrapper against the paper's definition (one softmax over scores that mix exact and
grouped positions), with the full cache and with a cache that keeps pre-RoPE keys and rotates them
from `inv_freq` at read time; at a window covering everything (or group 1) it is plain attention."""
import pytest
import torch
import transformers

from longkv.attention.self_extend import SelfExtendCache
from longkv.cache.base import Cache, LayerSpec, Step
from longkv.cache.full import FullCache
from longkv.engine.prefill import prefill
from longkv.errors import UserError
from longkv.kernels.attention import past_attention
from longkv.models import rope_spec
from longkv.models.load import load_model
from longkv.models.rope import Rope, RopeParams, apply_rope

HQ, HKV, D = 4, 2, 16


class PreRopeCache(Cache):
    """Test double: keeps pre-RoPE keys and rotates them at read time from `inv_freq` (as KVQuant does)."""

    def __init__(self, specs, *, batch, capacity, device, dtype):
        super().__init__(specs, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self.k = [torch.zeros(batch, s.num_kv_heads, capacity, s.head_dim, dtype=dtype) for s in specs]
        self.v = [torch.zeros_like(x) for x in self.k]

    def past_attention(self, layer, q, step):
        n, s = step.start, self.specs[layer]
        if n == 0:
            return None
        f = torch.arange(n).float()[:, None] * s.rope.inv_freq[None]
        emb = torch.cat((f, f), -1)
        k = apply_rope(self.k[layer][:, :, :n], emb.cos() * s.rope.scaling, emb.sin() * s.rope.scaling)
        return past_attention(q, k, self.v[layer][:, :, :n], scale=s.scale)

    def append(self, layer, k, v, step):
        self.k[layer][:, :, step.start:step.start + step.n] = k
        self.v[layer][:, :, step.start:step.start + step.n] = v

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def reference(q, k, v, rope, group, window, scale):
    """The paper's Self-Extend: q (1, Hq, T, D), k/v (1, Hkv, T, D) pre-RoPE, positions 0..T-1."""
    T = q.shape[2]
    p = torch.arange(T)

    def rot(x, pos):
        return apply_rope(x, *rope.cos_sin(pos, torch.float32))

    k, v = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    exact = rot(q, p) @ rot(k, p).transpose(-1, -2)
    grouped = rot(q, p // group + window - window // group) @ rot(k, p // group).transpose(-1, -2)
    d = p[:, None] - p[None, :]
    s = torch.where(d < window, exact, grouped) * scale
    return torch.softmax(s.masked_fill(d < 0, float("-inf")), -1) @ v


def specs(rope):
    return [LayerSpec(num_heads=HQ, num_kv_heads=HKV, head_dim=D, scale=D ** -0.5, rope=rope, rope_index=0)]


@pytest.mark.parametrize("inner", [FullCache, PreRopeCache])
@pytest.mark.parametrize("chunk", [1, 4, 37])
@pytest.mark.parametrize("group,window,rope_type", [(3, 5, "yarn"), (4, 8, "default"), (2, 40, "default")])
def test_matches_the_papers_definition(inner, chunk, group, window, rope_type):
    T = 37
    rope = Rope(RopeParams(theta=100.0, type=rope_type, factor=2.0,
                           extra=(("original_max_position_embeddings", 16),)), D)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, T, D, generator=g) for h in (HQ, HKV, HKV))
    cache = SelfExtendCache(specs(rope), lambda s: inner(s, batch=1, capacity=T, device="cpu", dtype=torch.float32),
                            group=group, window=window, batch=1, capacity=T, device="cpu", dtype=torch.float32)
    outs = []
    for s in range(0, T, chunk):
        n = min(chunk, T - s)
        pos = torch.arange(s, s + n)
        cos, sin = rope.cos_sin(pos, torch.float32)
        step = Step(pos=pos, start=s, rope=[(cos, sin)])
        outs.append(cache.attend(0, apply_rope(q[:, :, s:s + n], cos, sin), k[:, :, s:s + n], v[:, :, s:s + n], step=step))
        cache.advance(n)
    got = torch.cat(outs, 2)
    want = reference(q, k, v, rope, group, window, D ** -0.5)
    assert (got - want).abs().max().item() < 1e-5
    band = min(window, T) * HKV * D * 4 * 2
    assert cache.nbytes() == cache.inner.nbytes() + band and cache.inner.length == max(0, T - window)


TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def plain_and_extended(model, spec, ids, chunk):
    base = model.config
    try:
        out = []
        for s in (None, spec):
            rope_spec.configure(model, rope_spec.parse(s), base)
            kv = rope_spec.build_cache(model, "full", rope_spec.parse(s), batch=1, capacity=ids.shape[1],
                                       device="cpu", dtype=torch.float32)
            out.append(prefill(model, kv, ids, chunk=chunk, logits="all"))
        return out
    finally:
        rope_spec.configure(model, None, base)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, cfg in [("llama", transformers.LlamaConfig(**TINY)),
                      ("gemma3", transformers.Gemma3TextConfig(**{**TINY, "num_hidden_layers": 6}, head_dim=16,
                                                               sliding_window=8, query_pre_attn_scalar=24))]:
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(name)
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
        out[name] = load_model(path)
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("spec", ["self-extend:group=4,window=63", "self-extend:group=1,window=8"])
@pytest.mark.parametrize("chunk", [1, 7])
def test_plain_attention_when_nothing_is_grouped(models, arch, spec, chunk):
    """A window covering every distance, or group 1 (grouped positions are exact), is plain RoPE."""
    ids = torch.randint(0, 101, (1, 40), generator=torch.Generator().manual_seed(1))
    plain, ext = plain_and_extended(models[arch], spec, ids, chunk)
    assert (plain - ext).abs().max().item() < 1e-4


def test_grouping_changes_the_logits_and_reaches_further(models):
    ids = torch.randint(0, 101, (1, 40), generator=torch.Generator().manual_seed(1))
    plain, ext = plain_and_extended(models["llama"], "self-extend:group=4,window=8", ids, 7)
    assert (plain[:, :8] - ext[:, :8]).abs().max() < 1e-4 and (plain[:, 9:] - ext[:, 9:]).abs().max() > 1e-3
    assert rope_spec.parse("self-extend:group=4,window=8").window(64, 64) == 4 * (64 - 8) + 8


def test_bad_windows_are_user_errors(models):
    m = models["gemma3"]
    with pytest.raises(UserError, match="cover the model's sliding window"):
        rope_spec.configure(m, rope_spec.parse("self-extend:group=4,window=4"), m.config)
    with pytest.raises(UserError, match="below the model's window"):
        rope_spec.configure(m, rope_spec.parse("self-extend:group=4,window=64"), m.config)
