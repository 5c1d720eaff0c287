"""RoPE scalings: frequencies against the papers' formulas and transformers' init functions, factor 1
is plain RoPE, logits with a `--rope` override match transformers with the same `rope_parameters`,
and the spec parser's errors."""
import math

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from longkv.errors import UserError
from longkv.engine.prefill import prefill
from longkv.models import rope_spec
from longkv.models.load import load_model
from longkv.models.rope import RopeParams, inv_freq

D, THETA, L0 = 64, 100000.0, 8192
BASE = 1.0 / THETA ** (torch.arange(0, D, 2).float() / D)


def params(kind, factor, **extra):
    return RopeParams(theta=THETA, type=kind, factor=factor,
                      extra=tuple(sorted({"original_max_position_embeddings": L0, **extra}.items())))


def hf(kind, factor, seq_len=None, **extra):
    cfg = transformers.LlamaConfig(hidden_size=D * 4, num_attention_heads=4, head_dim=D, max_position_embeddings=L0,
                                   rope_parameters={"rope_type": kind, "rope_theta": THETA, "factor": factor,
                                                    "original_max_position_embeddings": L0, **extra})
    return ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", seq_len=seq_len)


def test_linear_and_ntk_follow_their_formulas():
    f, a = inv_freq(params("linear", 4.0), D)
    assert torch.allclose(f, BASE / 4) and a == 1.0
    f, _ = inv_freq(params("ntk", 4.0), D)
    theta = THETA * 4.0 ** (D / (D - 2))
    assert torch.allclose(f, 1.0 / theta ** (torch.arange(0, D, 2).float() / D))
    assert f[0] == BASE[0] and torch.isclose(f[-1], BASE[-1] / 4 * BASE[-1] / BASE[-1], rtol=1e-5)  # lowest / factor


def test_dynamic_is_ntk_at_the_runs_length():
    assert torch.equal(inv_freq(params("dynamic", 4.0), D)[0], BASE)             # up to L0: plain RoPE
    n = 3 * L0
    alpha = 4.0 * n / L0 - 3.0
    assert torch.allclose(inv_freq(params("dynamic", 4.0), D, seq_len=n)[0], inv_freq(params("ntk", alpha), D)[0])


def test_yarn_follows_the_paper():
    s = 4.0
    f, att = inv_freq(params("yarn", s), D)
    assert math.isclose(att, 0.1 * math.log(s) + 1)
    r = L0 / (2 * math.pi / BASE)                                  # rotations of each dimension over L0
    assert torch.equal(f[r > 32], BASE[r > 32])                    # many rotations: extrapolate (kept)
    assert torch.allclose(f[r < 1], BASE[r < 1] / s)               # under one rotation: interpolate
    mid = (r >= 1) & (r <= 32)
    assert ((f[mid] <= BASE[mid]) & (f[mid] >= BASE[mid] / s)).all()


def test_llama3_bands():
    f, _ = inv_freq(params("llama3", 8.0, low_freq_factor=1.0, high_freq_factor=4.0), D)
    wavelen = 2 * math.pi / BASE
    assert torch.equal(f[wavelen < L0 / 4], BASE[wavelen < L0 / 4])
    assert torch.allclose(f[wavelen > L0], BASE[wavelen > L0] / 8)


@pytest.mark.parametrize("kind,factor,seq_len,extra", [
    ("linear", 4.0, None, {}), ("dynamic", 4.0, 3 * L0, {}), ("dynamic", 2.0, L0 // 2, {}),
    ("yarn", 4.0, None, {}), ("yarn", 8.0, None, {"beta_fast": 16.0, "beta_slow": 2.0}),
    ("yarn", 4.0, None, {"mscale": 1.0, "mscale_all_dim": 0.5}), ("yarn", 4.0, None, {"attention_factor": 1.3}),
    ("llama3", 8.0, None, {"low_freq_factor": 1.0, "high_freq_factor": 4.0}),
])
def test_frequencies_match_transformers(kind, factor, seq_len, extra):
    ours, att = inv_freq(params(kind, factor, **extra), D, seq_len=seq_len)
    ref, ref_att = hf(kind, factor, seq_len, **extra)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0) and math.isclose(att, ref_att, rel_tol=1e-9)


@pytest.mark.parametrize("kind", ["linear", "ntk", "dynamic", "yarn", "llama3"])
def test_factor_one_is_plain_rope(kind):
    # dynamic NTK's formula (s*L/L0 - (s-1)) still adapts to runs past L0 at s = 1, as in transformers:
    # its factor-1 identity holds within the trained window
    f, att = inv_freq(params(kind, 1.0), D, seq_len=L0 if kind == "dynamic" else 4 * L0)
    assert torch.allclose(f, BASE, rtol=1e-6) and att == 1.0


# -- logits: our override vs transformers built with the same rope_parameters ----------------------------
TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False)
T = 40  # 2.5x the tiny model's window


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).float().eval()
    path = tmp_path_factory.mktemp("plain")
    ref.save_pretrained(path)
    return ref, load_model(path)


def with_rope(ref, rope_parameters):
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, rope_parameters=rope_parameters)).float().eval()
    m.load_state_dict(ref.state_dict())
    return m


@pytest.mark.parametrize("spec,rp", [
    ("linear:factor=4", {"rope_type": "linear", "factor": 4.0}),
    ("yarn:factor=4", {"rope_type": "yarn", "factor": 4.0}),
    ("llama3:factor=8,low_freq_factor=1,high_freq_factor=4",
     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16}),
    ("dynamic:factor=2", {"rope_type": "dynamic", "factor": 2.0}),
    # static NTK with alpha = 4 is transformers' dynamic NTK (factor 2) at 40 tokens: 2 * 40 / 16 - 1
    ("ntk:factor=4", {"rope_type": "dynamic", "factor": 2.0}),
])
@pytest.mark.parametrize("chunk", [7, 64])
def test_override_matches_transformers(plain, spec, rp, chunk):
    ref, model = plain
    base = model.config
    try:
        rope_spec.configure(model, rope_spec.parse(spec), base)
        ids = torch.randint(0, 101, (1, T), generator=torch.Generator().manual_seed(1))
        cache = rope_spec.build_cache(model, "full", rope_spec.parse(spec), batch=1, capacity=T, device="cpu",
                                      dtype=torch.float32)
        got = prefill(model, cache, ids, chunk=chunk, logits="all")
    finally:
        rope_spec.configure(model, None, base)
    with torch.no_grad():
        want = with_rope(ref, {"rope_theta": 10000.0, **rp})(ids).logits
    assert (got - want).abs().max().item() <= 1e-4


def test_config_declared_yarn_is_read(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**TINY, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    ref = transformers.LlamaForCausalLM(cfg).float().eval()
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.config.ropes[0].get("original_max_position_embeddings") == 16
    ids = torch.randint(0, 101, (1, T), generator=torch.Generator().manual_seed(2))
    got = rope_spec.build_cache(model, "full", None, batch=1, capacity=T, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        assert (prefill(model, got, ids, chunk=9, logits="all") - ref(ids).logits).abs().max().item() <= 1e-4


# -- specs ----------------------------------------------------------------------------------------------------
def test_windows_and_round_trip():
    for text, window in [("yarn:factor=4", 4 * L0), ("linear:factor=2", 2 * L0), ("none", L0),
                         ("self-extend:group=8,window=1024", (L0 - 1024) * 8 + 1024),
                         ("yarn:factor=4,original_max_position_embeddings=4096", 4 * 4096)]:
        s = rope_spec.parse(text)
        assert str(rope_spec.parse(str(s))) == str(s)
        trained = s.get("original_max_position_embeddings") or L0
        assert s.window(L0, trained) == window, text
    assert rope_spec.parse("") is None and rope_spec.parse(None) is None


@pytest.mark.parametrize("bad,msg", [
    ("nope:factor=2", "unknown --rope method 'nope'"), ("yarn:fctor=4", "yarn has no parameter 'fctor'"),
    ("yarn:factor=x", "yarn:factor needs a float"), ("yarn", "yarn needs factor="), ("yarn:factor", "key=value"),
    ("linear:factor=0.5", "factor must be >= 1"), ("self-extend:group=8", "needs window="),
    ("self-extend:group=0,window=4", "group must be >= 1"), ("yarn:factor=2+ntk:factor=2", "one method per run"),
    ("yarn:factor=4,truncate=maybe", "needs a bool"),
])
def test_bad_specs_point_at_the_part(bad, msg):
    with pytest.raises(UserError, match=msg):
        rope_spec.parse(bad)


def test_too_long_suggests_the_extension_that_fits(plain):
    from longkv.llm import LLM

    _, model = plain
    llm = LLM(model, None, name="tiny", device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(UserError, match=r"needs 50 tokens but tiny's window is 16 tokens: try --rope yarn:factor=4"):
        llm.check_fits(50, "the prompt")
    llm.set_rope("yarn:factor=4")
    assert llm.window == 64
    llm.check_fits(50)
    with pytest.raises(UserError, match=r"window with --rope yarn:factor=4 is 64 tokens: try --rope yarn:factor=8"):
        llm.check_fits(100, "the prompt")
    llm.set_rope(None)
    assert llm.window == 16 and llm.model.ropes[0].params.type == "default"


def test_cli_rejects_a_bad_rope_before_loading_a_model():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "longkv", "generate", "hi", "--rope", "yarn:factr=4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "yarn has no parameter 'factr'" in r.stderr and "Traceback" not in r.stderr
