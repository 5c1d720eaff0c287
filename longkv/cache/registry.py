"""The registry of cache methods. A method module decorates its class with `@register(...)`;
`cache/methods.py` imports every method module (one line each), and `spec.py` parses names against
this registry."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    cls: type
    help: str
    params: dict = field(default_factory=dict)   # name -> (type, default, help)
    composes: tuple[str, ...] = ()              # methods it may be combined with


REGISTRY: dict[str, Method] = {}


def register(name: str, *, help: str, params: dict | None = None, composes: tuple[str, ...] = ()):
    def deco(cls):
        REGISTRY[name] = Method(cls, help, params or {}, composes)
        cls.name = name
        return cls
    return deco
