"""Fakes shared by the evals tests: a character tokenizer and an LLM that answers from the prompt.

Not a test module (no test_ prefix): imported by tests/test_evals_*.py."""
import re
from dataclasses import dataclass


class CharTokenizer:
    """One token per character; a chat template of a few marker tokens."""
    has_chat_template = True
    bos_id = 1
    stop_ids = {2}
    vocab_size = 256

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [min(ord(c), 255) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i > 2)

    def chat(self, text):
        return self.encode("<u>" + text + "</u><a>")


@dataclass
class FakeResult:
    text: str
    prompt_tokens: int
    generated_tokens: int = 4
    prefill_s: float = 0.01
    decode_tokens_per_s: float = 100.0
    kv_bytes: int = 0
    kv_bytes_full: int = 0
    finish_reason: str = "stop"


class FakeCache:
    def full_nbytes(self, tokens=None):
        return 100 * (tokens or 0)


class FakeLLM:
    """Answers a needle prompt with the 7-digit number it finds (or nothing for cache "kv-bad")."""
    name = "fake"
    device = "cpu"
    dtype = "torch.float32"

    def __init__(self, interrupt_after=None):
        self.tokenizer = CharTokenizer()
        self.calls = 0
        self.interrupt_after = interrupt_after

    def new_cache(self, spec, capacity):
        return FakeCache()

    def generate(self, *, ids, max_new_tokens, cache, chunk):
        if self.interrupt_after is not None and self.calls >= self.interrupt_after:
            raise KeyboardInterrupt
        self.calls += 1
        found = re.findall(r"is: (\d{7})\.", self.tokenizer.decode(ids))
        text = found[0] if found and cache == "full" else "no idea"
        n = len(ids) + 4
        return FakeResult(text, len(ids), kv_bytes=100 * n // (1 if cache == "full" else 4), kv_bytes_full=100 * n)
