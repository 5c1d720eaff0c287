"""Composition: specs round-trip through the parser, roles combine as documented, bad combinations
are clear errors, and `longkv caches` lists what combines."""
import pytest
import torch

from longkv.cache import compose
from longkv.cache import spec as cache_spec
from longkv.errors import UserError


@pytest.mark.parametrize("text", ["snapkv:ratio=0.5", "adakv:alpha=0.3+snapkv:ratio=0.25,window=16",
                                  "full+streaming:budget=128,sink=4", "quest:budget=2048", "duo:map=x,ratio=0.5",
                                  "quant:bits=4+snapkv:ratio=0.5"])
def test_specs_round_trip(text):
    s = cache_spec.parse(text)
    assert cache_spec.parse(str(s)) == s


def _specs():
    from longkv.cache.base import LayerSpec
    from longkv.models.rope import Rope, RopeParams
    return [LayerSpec(num_heads=4, num_kv_heads=2, head_dim=16, scale=0.25, rope=Rope(RopeParams(), 16), rope_index=0)] * 2


def build(text):
    return cache_spec.parse(text).build(_specs(), batch=1, capacity=64, device="cpu", dtype=torch.float32)


def test_roles_build_the_right_cache():
    assert type(build("full+snapkv:ratio=0.5").store).__name__ == "DenseStorage"
    a = build("snapkv:ratio=0.5+adakv")
    assert a.name == "adakv+snapkv" and type(a.store).__name__ == "PagedStorage"
    assert build("quest").role == "select" and build("duo:ratio=0").role == "heads"


@pytest.mark.parametrize("bad,msg", [
    ("snapkv+tova", "both evict"), ("snapkv+quest", "cannot be combined"), ("adakv", "wraps a scorer"),
    ("adakv+tova", "cannot wrap tova"), ("full+quant", "both storage"), ("quant+adakv+snapkv", "full-precision"),
    ("quant+quest:rerank=2", "rerank")])
def test_bad_combinations_are_clear(bad, msg):
    with pytest.raises(UserError, match=msg):
        build(bad)


def test_quant_composes_once_it_provides_storage():
    if "quant" in compose.STORAGES:
        build("quant:bits=4+snapkv:ratio=0.5")
    else:
        with pytest.raises(UserError, match="storage interface"):
            build("quant:bits=4+snapkv:ratio=0.5")


def test_caches_listing_names_combinations():
    combos = compose.combinations()
    assert any("snapkv" in c for c in combos) and any(c.startswith("[") and "adakv+" in c for c in combos)
