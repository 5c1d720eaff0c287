"""Run NVIDIA kvpress (0.5.5) on the very prompts `longkv eval` generates; write longkv result folders.

kvpress pins transformers < 5.3 and patches transformers' attention functions when imported, so it
lives in its own virtual env (see README.md here); from longkv this script only imports the pure-Python
prompt generators and the results writer. Each result line records `model = NAME@kvpress` (so a
report shows both engines side by side) and the same `prompt_sha` as longkv's lines for that sample:
`longkv report DIR_LONGKV DIR_KVPRESS` then compares like with like.

Cache specs use longkv's grammar and map onto presses with the same meaning of `ratio` (fraction of
the KV pairs removed): full, snapkv:ratio=R[,window=W,kernel=K], pyramidkv:ratio=R[,window,kernel],
streaming:ratio=R[,sink=S], knorm:ratio=R, tova:ratio=R, adakv[:alpha=A]+SCORER:... (AdaKVPress around
the scorer's press; kvpress masks what AdaKV evicts, so its KV bytes stay those of the full cache). The press compresses the whole prompt once
after prefill (kvpress's only mode; longkv's `chunked=false`), and decoding is greedy with the logical
positions kvpress's own pipeline uses (`generate_answer`).

    /tmp/kvp/bin/python benchmarks/peers/kvpress_runner.py niah --cache full --cache snapkv:ratio=0.5 \\
        --lengths 1k --depths 0,0.5,1 --out runs/niah-kvpress
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the longkv checkout (generators only)

import torch

from longkv.errors import UserError
from longkv.evals import corpora, prompts, ruler, runner

PRESSES = {"snapkv": ("SnapKVPress", {"window": "window_size", "kernel": "kernel_size"}),
           "pyramidkv": ("PyramidKVPress", {"window": "window_size", "kernel": "kernel_size"}),
           "streaming": ("StreamingLLMPress", {"sink": "n_sink"}),
           "knorm": ("KnormPress", {}), "tova": ("TOVAPress", {})}


def make_press(spec: str):
    """longkv spec text -> a kvpress press (None for full); UserError for what kvpress cannot do."""
    import kvpress

    if "+" in spec:
        outer, _, inner = spec.partition("+")
        oname, _, orest = outer.partition(":")
        scorer = make_press(inner) if oname == "adakv" else None
        if scorer is None:
            raise UserError(f"kvpress peer: no press for {spec!r}; combinations: adakv+SCORER (SCORER not full)")
        kw = {}
        for item in filter(None, orest.split(",")):
            k, _, v = item.partition("=")
            if k != "alpha":
                raise UserError(f"kvpress peer: {spec!r}: adakv parameter {k!r} has no kvpress equivalent")
            kw["alpha_safeguard"] = float(v)
        return kvpress.AdaKVPress(press=scorer, **kw)
    name, _, rest = spec.partition(":")
    if name == "full" and not rest:
        return None
    if name not in PRESSES:
        raise UserError(f"kvpress peer: no press for {spec!r}; supported: full, {', '.join(PRESSES)}")
    cls, names = PRESSES[name]
    kw = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        if k == "ratio":
            kw["compression_ratio"] = float(v)
        elif k in names:
            kw[names[k]] = int(v)
        elif k == "chunked" and v.lower() in ("false", "0", "no"):
            continue                      # kvpress compresses once after prefill: that is chunked=false
        else:
            raise UserError(f"kvpress peer: {spec!r}: parameter {k!r} has no kvpress equivalent")
    return getattr(kvpress, cls)(**kw)


@dataclass
class PeerResult:
    text: str
    prompt_tokens: int
    generated_tokens: int
    prefill_s: float
    decode_tokens_per_s: float
    kv_bytes: int
    kv_bytes_full: int
    finish_reason: str


class _PerToken:
    def __init__(self, n: int):
        self.n = n

    def full_nbytes(self, tokens=None):
        return self.n * (tokens or 0)


class KvpressLLM:
    """The slice of longkv.LLM that runner.run_niah / run_ruler use, backed by transformers + kvpress."""

    def __init__(self, name: str, folder: Path, *, dtype: str, device: str):
        # kvpress's version goes into every record's model name
        from importlib.metadata import version

        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        from longkv.models.tokenizer import Tokenizer

        hf_logging.disable_progress_bar()           # one bar line per weight tensor otherwise

        self.name, self.device = f"{name}@kvpress-{version('kvpress')}", torch.device(device)
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=self.dtype).eval().to(self.device)
        self.tokenizer = Tokenizer(folder)
        c = self.model.config
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * hd * self.model.dtype.itemsize

    def new_cache(self, spec, capacity):
        return _PerToken(self.per_token)

    @torch.inference_mode()
    def generate(self, *, ids, max_new_tokens, cache, chunk=None):
        from transformers import DynamicCache

        press, kv = make_press(cache), DynamicCache()
        x = torch.tensor([ids], device=self.device)
        t0 = time.perf_counter()
        with press(self.model) if press is not None else contextlib.nullcontext():
            h = self.model.model(input_ids=x, past_key_values=kv).last_hidden_state
        logits = self.model.lm_head(h[:, -1])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prefill_s = time.perf_counter() - t0
        out, pos, reason, t1 = [], len(ids), "length", time.perf_counter()
        for _ in range(max_new_tokens):
            nxt = int(logits[0].argmax())
            out.append(nxt)
            if nxt in self.tokenizer.stop_ids:
                reason = "stop"
                break
            # Logical positions continue from the prompt's length, whatever the press kept.
            logits = self.model(input_ids=torch.tensor([[nxt]], device=self.device), past_key_values=kv,
                                position_ids=torch.tensor([[pos]], device=self.device)).logits[:, -1]
            pos += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t1
        held = sum(t.numel() * t.element_size() for layer in kv.layers for t in (layer.keys, layer.values))
        text_ids = out[:-1] if reason == "stop" else out
        return PeerResult(self.tokenizer.decode(text_ids), len(ids), len(out), round(prefill_s, 4),
                          round(len(out) / dt, 2) if dt > 0 else 0.0, held,
                          self.per_token * (len(ids) + len(out) - 1), reason)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kvpress_runner", description=__doc__.split("\n")[0])
    ap.add_argument("kind", choices=["niah", "ruler"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cache", action="append", default=None)
    ap.add_argument("--lengths", default="1k")
    ap.add_argument("--depths", default="0:1:11")
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    try:
        from longkv.models.fetch import resolve

        specs = a.cache or ["full"]
        for s in specs:
            make_press(s)                       # unsupported specs and corpora fail before the model loads
        corpora.get(a.corpus)
        device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        llm = KvpressLLM(a.model, resolve(a.model, download=False, progress=False), dtype=a.dtype, device=device)
        lengths = prompts.parse_lengths(a.lengths, window_tokens=llm.model.config.max_position_embeddings)
        common = {"specs": specs, "lengths": lengths, "samples": a.samples, "seed": a.seed, "corpus": a.corpus,
                  "out": a.out, "argv": ["kvpress_runner"] + (argv or sys.argv[1:])}
        if a.kind == "niah":
            runner.run_niah(llm, depths=prompts.parse_depths(a.depths), max_new_tokens=a.max_new_tokens, **common)
        else:
            runner.run_ruler(llm, tasks=ruler.parse_tasks(a.tasks), **common)
    except UserError as e:
        print(f"kvpress_runner: error: {e}", file=sys.stderr)
        return 2
    print(f"results in {a.out}; compare: longkv report LONGKV_DIR {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
