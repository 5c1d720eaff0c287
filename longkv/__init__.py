"""longkv: long-context inference with KV caches that really shrink, measured honestly.

    import longkv
    llm = longkv.load("smollm2-135m")
    print(llm.generate("What is the capital of France?").text)

Importing longkv loads no weights, downloads nothing and patches nothing.
"""
from .errors import UserError
from .llm import LLM, Result, load

__all__ = ["load", "LLM", "Result", "UserError"]
__version__ = "0.1.0"
