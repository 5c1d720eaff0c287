"""Cache specs: the strings users write (`full`, later `quant:bits=4+snapkv:ratio=0.5`).

Grammar: methods joined by `+`; each is `name` or `name:key=value,key=value`. Every method is a
registry entry with its class, a one-line description and its parameters (name → (type, default,
help)). Unknown methods or parameters are errors that point at the offending part.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from . import methods  # noqa: F401  (registers every method)
from .registry import REGISTRY


@dataclass(frozen=True)
class CacheSpec:
    parts: tuple[tuple[str, tuple[tuple[str, object], ...]], ...]

    def __str__(self) -> str:
        return "+".join(n + (":" + ",".join(f"{k}={v}" for k, v in p) if p else "") for n, p in self.parts)

    def build(self, specs, *, batch: int, capacity: int, device, dtype):
        from .compose import build  # roles, rules and the storage interface live there

        return build(self.parts, specs, batch=batch, capacity=capacity, device=device, dtype=dtype)


def _value(kind: type, raw: str, where: str):
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return kind(raw)
    except ValueError:
        raise UserError(f"cache spec: {where} needs a {kind.__name__}, got {raw!r}") from None


def parse(text: str | CacheSpec) -> CacheSpec:
    if isinstance(text, CacheSpec):
        return text
    text = (text or "").strip()
    if not text:
        raise UserError("cache spec is empty; try `full` (`longkv caches` lists them)")
    parts = []
    for chunk in text.split("+"):
        name, _, rest = chunk.strip().partition(":")
        name = name.strip()
        if name not in REGISTRY:
            raise UserError(f"unknown cache method {name!r} in {text!r}; known: {', '.join(REGISTRY)}")
        method = REGISTRY[name]
        params = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, raw = item.partition("=")
            if not eq:
                raise UserError(f"cache spec {text!r}: {item!r} should be key=value")
            if key not in method.params:
                known = ", ".join(method.params) or "none"
                raise UserError(f"cache spec {text!r}: {name} has no parameter {key!r} (parameters: {known})")
            params[key] = _value(method.params[key][0], raw, f"{name}:{key}")
        parts.append((name, tuple(sorted(params.items()))))
    return CacheSpec(tuple(parts))


def describe() -> list[tuple[str, str, dict]]:
    """(name, help, params) for `longkv caches`."""
    return [(n, m.help, m.params) for n, m in REGISTRY.items()]
