"""`--rope SPEC`: training-free context extension for one run.

Grammar: `name` or `name:key=value,key=value` (one method per run), e.g. `yarn:factor=4`,
`ntk:factor=4`, `dynamic:factor=4`, `linear:factor=4`,
`llama3:factor=8,low_freq_factor=1,high_freq_factor=4,original_max_position_embeddings=8192`,
`self-extend:group=8,window=1024`; `none` (or no spec) keeps what the model's config declares and
`default` forces plain RoPE. Unknown methods or parameters are errors that point at the part.

The scalings replace the RoPE params of the layers that attend globally (sliding-window layers, as
Gemma 3's local ones, never see distances past their window and keep theirs) and stretch the window
to factor x L0, L0 being the trained window (`original_max_position_embeddings=` overrides it). They
live in `models/rope.py`, so every cache composes with them unchanged. `self-extend` keeps the
model's RoPE and groups distant positions at attention time (Jin et al. 2024, "LLM Maybe LongLM:
Self-Extend LLM Context Window Without Tuning", arXiv:2401.01325): see `attention/self_extend.py`;
its window is (L0 - window) * group + window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import UserError
from .rope import Rope, RopeParams, extended_window

_L0 = (int, None, "the trained window the scaling stretches (default: the model's)")
_FACTOR = (float, None, "how many times the trained window to reach (required)")
METHODS: dict[str, tuple[str, dict]] = {
    "none": ("the model's own RoPE, as its config declares it", {}),
    "default": ("plain RoPE, ignoring any scaling the config declares", {}),
    "linear": ("Position Interpolation (Chen et al. 2023): every frequency / factor",
               {"factor": _FACTOR, "original_max_position_embeddings": _L0}),
    "ntk": ("NTK-aware scaling (bloc97 2023): base * factor^(d/(d-2))",
            {"factor": _FACTOR, "original_max_position_embeddings": _L0}),
    "dynamic": ("dynamic NTK (emozilla 2023): NTK with the factor set by the run's length",
                {"factor": _FACTOR, "original_max_position_embeddings": _L0}),
    "yarn": ("YaRN (Peng et al. 2023): NTK-by-parts ramp + attention temperature 0.1 ln(factor) + 1",
             {"factor": _FACTOR, "original_max_position_embeddings": _L0,
              "beta_fast": (float, 32.0, "rotations above which a dimension is kept"),
              "beta_slow": (float, 1.0, "rotations below which a dimension is interpolated"),
              "attention_factor": (float, None, "cos/sin multiplier (default: 0.1 ln(factor) + 1)"),
              "mscale": (float, None, "DeepSeek-style temperature numerator"),
              "mscale_all_dim": (float, None, "DeepSeek-style temperature denominator"),
              "truncate": (bool, True, "round the ramp's ends to whole dimensions")}),
    "llama3": ("Llama 3.1 band-wise scaling",
               {"factor": _FACTOR, "original_max_position_embeddings": _L0,
                "low_freq_factor": (float, 1.0, "wavelengths above L0/low are divided by factor"),
                "high_freq_factor": (float, 4.0, "wavelengths below L0/high are kept")}),
    "self-extend": ("Self-Extend (Jin et al. 2024): exact positions within `window`, positions // group beyond",
                    {"group": (int, None, "group size for distant tokens (required)"),
                     "window": (int, None, "neighbour window with exact positions, in tokens (required)")}),
}


@dataclass(frozen=True)
class RopeSpec:
    method: str
    params: tuple[tuple[str, object], ...] = ()

    def __str__(self) -> str:
        def fmt(v):
            return f"{v:g}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)
        return self.method + (":" + ",".join(f"{k}={fmt(v)}" for k, v in self.params) if self.params else "")

    def get(self, key, default=None):
        return dict(self.params).get(key, default)

    @property
    def self_extend(self) -> tuple[int, int] | None:
        """(group, window) for `self-extend`, else None."""
        return (self.get("group"), self.get("window")) if self.method == "self-extend" else None

    def rope_params(self, base: RopeParams, trained: int) -> RopeParams:
        """The RoPE params of a global layer kind under this spec (`base`: the model's own)."""
        if self.method in ("none", "self-extend"):
            return base
        extra = {k: v for k, v in self.params if k != "factor"}
        if self.method != "default":
            extra.setdefault("original_max_position_embeddings", trained)
        return RopeParams(theta=base.theta, type=self.method, factor=float(self.get("factor", 1.0)),
                          extra=tuple(sorted(extra.items())))

    def window(self, native: int, trained: int) -> int:
        """Tokens the model may attend over under this spec (`native`: its window as configured)."""
        if self.method == "none":
            return native
        if self.method == "self-extend":
            group, w = self.self_extend
            return (native - w) * group + w
        return extended_window(self.rope_params(RopeParams(), trained), trained)


def _value(kind: type, raw: str, where: str):
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return raw.lower() in ("1", "true", "yes", "on")
            raise ValueError
        return kind(raw)
    except ValueError:
        raise UserError(f"--rope {where} needs a {kind.__name__}, got {raw!r}") from None


def parse(text: str | RopeSpec | None) -> RopeSpec | None:
    """A spec string → RopeSpec; None or "" → None (the model's own RoPE)."""
    if text is None or isinstance(text, RopeSpec):
        return text
    text = text.strip()
    if not text:
        return None
    if "+" in text:
        raise UserError(f"--rope {text!r}: one method per run (combining scalings is not supported)")
    name, _, rest = text.partition(":")
    name = name.strip()
    if name not in METHODS:
        raise UserError(f"unknown --rope method {name!r} in {text!r}; known: {', '.join(METHODS)}")
    allowed = METHODS[name][1]
    params = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq:
            raise UserError(f"--rope {text!r}: {item!r} should be key=value")
        if key not in allowed:
            raise UserError(f"--rope {text!r}: {name} has no parameter {key!r} (parameters: {', '.join(allowed) or 'none'})")
        params[key] = _value(allowed[key][0], raw.strip(), f"{name}:{key}")
    for key, (_, default, _) in allowed.items():
        if default is None and key in ("factor", "group", "window") and key not in params:
            raise UserError(f"--rope {text!r}: {name} needs {key}= (e.g. {example(name)})")
    if params.get("factor", 1.0) < 1.0:
        raise UserError(f"--rope {text!r}: factor must be >= 1 (it stretches the window), got {params['factor']}")
    for key in ("group", "window", "original_max_position_embeddings"):
        if key in params and params[key] < 1:
            raise UserError(f"--rope {text!r}: {key} must be >= 1, got {params[key]}")
    return RopeSpec(name, tuple(sorted(params.items())))


def example(name: str) -> str:
    return {"self-extend": "self-extend:group=8,window=1024", "llama3": "llama3:factor=8"}.get(name, f"{name}:factor=4")


def describe() -> list[tuple[str, str, dict]]:
    return [(n, h, p) for n, (h, p) in METHODS.items()]


def configure(model, spec: RopeSpec | None, base) -> int:
    """Give `model` the RoPE of `spec` on top of its config `base` (a ModelConfig, kept unchanged so
    the spec can be changed again); returns the window the run may use."""
    native = max(extended_window(p, base.max_position_embeddings) for p in base.ropes)
    cfg, trained = base, base.max_position_embeddings
    if spec is not None:
        trained = int(spec.get("original_max_position_embeddings") or trained)
        global_kinds = {base.layer_rope[i] for i, w in enumerate(base.layer_window) if w is None}
        ropes = [spec.rope_params(p, trained) if k in global_kinds else p for k, p in enumerate(base.ropes)]
        cfg = replace(base, ropes=ropes)
        if spec.self_extend:
            group, w = spec.self_extend
            if w >= native:
                raise UserError(f"--rope {spec}: window must be below the model's window ({native})")
            widest = max((x for x in base.layer_window if x is not None), default=0)
            if widest > w:
                raise UserError(f"--rope {spec}: window must cover the model's sliding window ({widest})")
    dev = model.lm_head.weight.device
    model.config = cfg
    model.ropes = [Rope(p, cfg.head_dim, device=dev) for p in cfg.ropes]
    return native if spec is None else spec.window(native, trained)


def build_cache(model, cache_spec, spec: RopeSpec | None, *, batch: int, capacity: int, device, dtype):
    """A cache for a run of up to `capacity` tokens: dynamic NTK is fitted to `capacity` (fixed for the
    whole run) and Self-Extend wraps whatever cache `cache_spec` builds."""
    from ..cache import spec as cache_specs

    for r in model.ropes:
        r.fit(capacity)
    inner = cache_specs.parse(cache_spec)
    kw = dict(batch=batch, capacity=capacity, device=device, dtype=dtype)
    if spec is None or not spec.self_extend:
        return inner.build(model.layer_specs(), **kw)
    from ..attention.self_extend import SelfExtendCache

    group, window = spec.self_extend
    return SelfExtendCache(model.layer_specs(), lambda specs: inner.build(specs, **kw),
                           group=group, window=window, **kw)


def suggest(needed: int, trained: int) -> str:
    """The extension to try for `needed` tokens on a model trained at `trained`: YaRN with the
    smallest power-of-two factor that fits (YaRN answered needles best in our runs)."""
    factor = 2 ** max(1, math.ceil(math.log2(needed / trained)))
    return f"--rope yarn:factor={factor}"
