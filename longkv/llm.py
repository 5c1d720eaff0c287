"""The Python API: `llm = longkv.load("smollm2-135m"); llm.generate("...")`.

`LLM` ties a model, its tokenizer and the engine together: it encodes the prompt (chat template for
instruct models, the text as it is for base models), prefills it in chunks into a fresh cache built
from a cache spec, decodes (CUDA graphs on a GPU), and reports what it cost.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from .cache import spec as cache_spec
from .engine.decode import decode_tokens
from .engine.prefill import prefill
from .engine.sampling import Sampling
from .errors import UserError


@dataclass
class Result:
    text: str
    prompt_tokens: int
    generated_tokens: int
    prefill_s: float
    decode_tokens_per_s: float
    kv_bytes: int
    kv_bytes_full: int
    model: str
    cache: str
    device: str
    finish_reason: str = "length"
    rope: str | None = None        # the --rope spec of the run (None: the model's own RoPE)
    token_ids: list | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("token_ids")
        return d


def _sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class LLM:
    def __init__(self, model, tokenizer, *, name: str, device: torch.device, dtype: torch.dtype, rope=None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.device, self.dtype = device, dtype
        self.base_config = model.config
        self.set_rope(rope)

    def set_rope(self, rope=None) -> None:
        """Context extension for the runs that follow: a `--rope` spec (`yarn:factor=4`,
        `self-extend:group=8,window=1024`, ...; None: the model's own RoPE). Raises the window."""
        from .models import rope_spec

        self.rope = rope_spec.parse(rope)
        self._window = rope_spec.configure(self.model, self.rope, self.base_config)
        self.config = self.model.config

    @property
    def window(self) -> int:
        return self._window

    def encode(self, prompt: str, *, chat: bool | None = None) -> list[int]:
        """Chat template for instruct models (unless chat=False); base models get the text as it is."""
        use_chat = self.tokenizer.has_chat_template if chat is None else chat
        return self.tokenizer.chat(prompt) if use_chat else self.tokenizer.encode(prompt)

    def new_cache(self, spec="full", *, capacity: int, batch: int = 1):
        """A cache for a run of up to `capacity` tokens (dynamic NTK is fitted to it; Self-Extend wraps it)."""
        from .models.rope_spec import build_cache

        return build_cache(self.model, spec, self.rope, batch=batch, capacity=capacity, device=self.device,
                           dtype=self.dtype)

    def check_fits(self, n: int, what: str = "the prompt") -> None:
        if n > self.window:
            from .models.rope_spec import suggest

            trained = self.base_config.max_position_embeddings
            using = f" with --rope {self.rope}" if self.rope else ""
            raise UserError(f"{what} needs {n} tokens but {self.name}'s window{using} is {self.window} "
                            f"tokens: try {suggest(n, trained)} (training-free context extension), or "
                            f"shorten the input or lower --max-new-tokens")

    def stream(self, prompt: str | None = None, *, ids: list[int] | None = None, max_new_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, cache="full",
               chunk: int = 2048, chat: bool | None = None, progress: bool = False,
               use_graph: bool = True, ignore_stop: bool = False) -> Iterator[str]:
        """Yields the answer's text as it is generated; afterwards `self.last` holds the `Result`.
        ignore_stop: decode exactly max_new_tokens (`longkv bench`)."""
        if ids is None:
            if prompt is None or not prompt.strip():
                raise UserError("the prompt is empty")
            ids = self.encode(prompt, chat=chat)
        if max_new_tokens < 1:
            raise UserError("--max-new-tokens must be at least 1")
        if not 0 < top_p <= 1:
            raise UserError("--top-p must be in (0, 1]")
        if temperature < 0:
            raise UserError("--temperature must be >= 0")
        self.check_fits(len(ids) + max_new_tokens, f"the prompt ({len(ids)} tokens) plus {max_new_tokens} new tokens")
        spec = cache_spec.parse(cache)
        kv = self.new_cache(spec, capacity=len(ids) + max_new_tokens)
        x = torch.tensor([ids], device=self.device)
        bar = None
        if progress and len(ids) > chunk:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), unit="tok", desc="prefill", leave=False)
        t0 = time.perf_counter()
        logits = prefill(self.model, kv, x, chunk=chunk, on_chunk=bar.update if bar else None)
        _sync(self.device)
        prefill_s = time.perf_counter() - t0
        if bar:
            bar.close()
        graph = None
        if use_graph and self.device.type == "cuda" and kv.graph_safe:
            from .engine.graph import GraphStep
            graph = GraphStep(self.model, kv, batch=1)
        from .models.tokenizer import StreamDecoder
        dec = StreamDecoder(self.tokenizer)
        out: list[int] = []
        reason = "length"
        stops = set() if ignore_stop else self.tokenizer.stop_ids
        t1 = time.perf_counter()
        for new in decode_tokens(self.model, kv, logits, max_new_tokens=max_new_tokens,
                                 sampling=Sampling(temperature, top_p, seed),
                                 stop_ids=stops, graph=graph):
            out += new
            if out and out[-1] in stops:
                reason, new = "stop", new[:-1]
            piece = "".join(dec.push(t) for t in new)
            if piece:
                yield piece
        tail = dec.flush()
        if tail:
            yield tail
        _sync(self.device)
        decode_s = time.perf_counter() - t1
        text_ids = out[:-1] if reason == "stop" else out
        self.last = Result(
            text=self.tokenizer.decode(text_ids), prompt_tokens=len(ids), generated_tokens=len(out),
            prefill_s=round(prefill_s, 4),
            decode_tokens_per_s=round(len(out) / decode_s, 2) if decode_s > 0 else 0.0,
            kv_bytes=kv.nbytes(), kv_bytes_full=kv.full_nbytes(), model=self.name, cache=str(spec),
            device=str(self.device), finish_reason=reason, rope=str(self.rope) if self.rope else None,
            token_ids=text_ids)

    def generate(self, prompt: str | None = None, **kw) -> Result:
        for _ in self.stream(prompt, **kw):
            pass
        return self.last

    def ask(self, document: str, question: str, **kw) -> Result:
        return self.generate(ask_prompt(self, document, question), **kw)


def ask_prompt(llm: LLM, document: str, question: str) -> str:
    """Instruct models get the document and the question as one user turn; base models a completion
    prompt that ends in the answer's lead-in."""
    if not document.strip():
        raise UserError("the document is empty")
    if llm.tokenizer.has_chat_template:
        return f"{document.strip()}\n\nAnswer the question using the text above.\nQuestion: {question}"
    return f"{document.strip()}\n\nQuestion: {question}\nAnswer:"


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available (use --device cpu)")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise UserError(f"unknown device {device!r} (use cpu or cuda)")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (use one of {', '.join(DTYPES)})")
    return DTYPES[dtype]


def load(name: str | None = None, *, device: str | None = None, dtype: str | None = None,
         progress: bool = True, rope=None) -> LLM:
    """Load a model by registry name, local GGUF file, local Hugging Face folder or hub id.
    `rope`: a context-extension spec (`yarn:factor=4`, see `longkv.models.rope_spec`)."""
    from .models.rope_spec import parse as parse_rope
    from .models.fetch import resolve
    from .models.load import load_model
    from .models.registry import DEFAULT_MODEL
    from .models.tokenizer import Tokenizer

    name = name or DEFAULT_MODEL
    rope = parse_rope(rope)  # a bad spec fails before any download
    folder = resolve(name, progress=progress)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model = load_model(folder, device=dev, dtype=dt)
    return LLM(model, Tokenizer(folder), name=name, device=dev, dtype=dt, rope=rope)
