"""`longkv calibrate`: fit non-uniform quantization levels (KVQuant's nuq) for one model, offline.

KVQuant (Hooper et al. 2024, §3.3): one codebook per layer for keys and one for values, fitted by
k-means on activations normalised to their group's range, then rescaled per group at run time. Here
the activations are the keys the cache will quantize (pre-RoPE, or after RoPE for a `prerope=0` spec
such as `kv4`; the file records which) and the values the model produces on calibration text (the
*last* windows of the corpus, so perplexity measured on the earlier part is not calibrated on);
normalisation uses exactly the grouping and outlier rule of the cache spec the codebook is for.
Unlike KVQuant the k-means is unweighted (no Fisher information: that needs a backward pass the
engine does not have); the file records this.

Output: `<model folder>/nuq-<bits>bit-<hash of the grouping>.json` (next to the weights), with the
model's shape, so a codebook from another model is refused (`quant:nuq=...`).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from .errors import UserError
from .models.rope import apply_rope


def kmeans_1d(x: torch.Tensor, k: int, iters: int = 40) -> torch.Tensor:
    """Lloyd's algorithm on 1-D data x (N,) in [0, 1] → k sorted centroids; starts at quantiles."""
    x = x.float()
    c = torch.quantile(x, torch.linspace(0, 1, k + 2)[1:-1]) if x.numel() < 2 ** 24 else \
        torch.linspace(0, 1, k)
    for _ in range(iters):
        c, _ = c.sort()
        a = torch.bucketize(x, (c[1:] + c[:-1]) / 2)
        s = torch.zeros(k).index_add_(0, a, x)
        n = torch.zeros(k).index_add_(0, a, torch.ones_like(x))
        c = torch.where(n > 0, s / n.clamp_min(1), c)
    return c.sort().values


class _Capture:
    """Collects each layer's keys (pre-RoPE, or rotated at their positions when `post_rope`) and values
    while a full cache runs the model."""

    def __init__(self, inner, post_rope: bool = False):
        self.inner, self.k, self.v, self.post_rope = inner, {}, {}, post_rope

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def attend(self, layer, q, k, v, *, step):
        kk = apply_rope(k, *step.rope[self.inner.specs[layer].rope_index]) if self.post_rope else k
        self.k.setdefault(layer, []).append(kk.float().cpu())
        self.v.setdefault(layer, []).append(v.float().cpu())
        return self.inner.attend(layer, q, k, v, step=step)

    def advance(self, n):
        self.inner.advance(n)


def calibrate(llm, folder: Path, *, spec: str, corpus: str = "auto", length: int = 2048, samples: int = 4,
              max_values: int = 1 << 21, seed: int = 0) -> Path:
    """Fit per-layer key/value codebooks for the quant `spec` → path of the JSON file written."""
    from .cache import spec as cache_spec
    from .cache.quant import QuantCache
    from .engine.prefill import prefill
    from .evals import corpora

    parsed = cache_spec.parse(spec)
    name = parsed.parts[0][0]
    probe = parsed.build(llm.model.layer_specs(), batch=1, capacity=64, device="cpu", dtype=torch.float32)
    if not isinstance(probe, QuantCache):
        raise UserError(f"--cache {spec}: calibration is for quant caches (quant, kv4, kv3, kv2), not {name}")
    c = corpora.get(corpus)
    ids = llm.tokenizer.encode(c.text())
    if len(ids) < samples * length:
        raise UserError(f"corpus {c.name} has {len(ids)} tokens, fewer than --samples × --length")
    layers = llm.model.layer_specs()
    gen = torch.Generator().manual_seed(seed)
    ks, vs = {i: [] for i in range(len(layers))}, {i: [] for i in range(len(layers))}
    for s in range(samples):  # the corpus's last windows: evaluation uses the earlier part
        x = torch.tensor([ids[len(ids) - (s + 1) * length:len(ids) - s * length]], device=llm.device)
        cap = _Capture(cache_spec.parse("full").build(layers, batch=1, capacity=length, device=llm.device,
                                                      dtype=llm.dtype), post_rope=not probe.prerope)
        prefill(llm.model, cap, x, chunk=length)
        for i in range(len(layers)):
            k, v = torch.cat(cap.k[i], 2), torch.cat(cap.v[i], 2)
            if probe.H is not None:
                k = k @ probe.H.cpu().float()
            T = k.shape[2] - k.shape[2] % probe.group
            ks[i].append(ref_norm(k[:, :, :T], probe, keys=True))
            vs[i].append(ref_norm(v, probe, keys=False))
    k_levels, v_levels = [], []
    for i in range(len(layers)):
        for src, dst in ((ks[i], k_levels), (vs[i], v_levels)):
            t = torch.cat(src)
            if t.numel() > max_values:
                t = t[torch.randperm(t.numel(), generator=gen)[:max_values]]
            dst.append([round(float(z), 6) for z in kmeans_1d(t, 2 ** probe.bits)])
    s0 = layers[0]
    grouping = f"{probe.p['keys']}-{probe.group}-{probe.vgroup}-{probe.n_out}-{int(probe.p['rotate'])}"
    if not probe.prerope:
        grouping += "-postrope"   # (pre-RoPE files keep their old name)
    tag = hashlib.sha1(grouping.encode()).hexdigest()[:8]
    out = Path(folder) / f"nuq-{probe.bits}bit-{tag}.json"
    out.write_text(json.dumps({
        "bits": probe.bits, "shape": [len(layers), s0.num_kv_heads, s0.head_dim], "model": llm.name,
        "grouping": grouping, "prerope": bool(probe.prerope), "spec": spec, "corpus": c.name,
        "samples": samples, "length": length,
        "method": "unweighted 1-D k-means per layer (KVQuant nuq without Fisher weighting)",
        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "k": k_levels, "v": v_levels}))
    return out


def ref_norm(x, probe, *, keys: bool):
    from .kernels import quant_reference as ref

    if keys and probe.per_channel:
        return ref.normalized(x, per_channel=True, group=probe.group, n_out=probe.n_out)
    return ref.normalized(x, per_channel=False, group=probe.vgroup, n_out=probe.n_out)


def cmd_calibrate(a) -> int:
    from . import load
    from .models.fetch import resolve

    if a.what == "duo":
        from .calibrate_duo import calibrate_duo

        path = calibrate_duo(a.model or "smollm2-135m", lengths=(a.length,), samples=a.samples, device=a.device)
        print(f"wrote {path}\nuse it with: --cache 'duo:map={path}'")
        return 0

    llm = load(a.model, device=a.device, dtype=a.dtype)
    folder = resolve(llm.name, progress=False)
    folder = folder if folder.is_dir() else folder.parent
    path = calibrate(llm, folder, spec=a.cache, corpus=a.corpus, length=a.length, samples=a.samples)
    print(f"wrote {path}\nuse it with: --cache '{a.cache.split('+')[0]}{':' if ':' not in a.cache else ','}nuq={path}'")
    return 0


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="fit nuq codebooks (default) or find DuoAttention's retrieval heads (duo)")
    p.add_argument("what", nargs="?", default="nuq", choices=["nuq", "duo"],
                   help="nuq: non-uniform quantization levels; duo: head map for the `duo` cache")
    p.add_argument("--model", default=None, help="registry name or folder (default: smollm2-135m)")
    p.add_argument("--cache", default="kv3", help="the quant cache spec the codebook is for (default: kv3)")
    p.add_argument("--corpus", default="auto", help="calibration text (its last windows are used)")
    p.add_argument("--length", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--samples", type=int, default=4, help="number of windows")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.set_defaults(fn=cmd_calibrate)
