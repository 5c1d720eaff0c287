"""The decode loop: sample, step, repeat; stop tokens; tokens handed out in small batches.

On CUDA the step is a replayed CUDA graph and the sampled token stays on the device; the host reads
the generated ids only every `sync_every` tokens (to stream them and to check stop tokens), so the
GPU never waits on the host per token. Steps computed past a stop token are discarded.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .sampling import Sampling, sample


@torch.inference_mode()
def decode_tokens(model, cache, logits: torch.Tensor, *, max_new_tokens: int, sampling: Sampling,
                  stop_ids: set[int], graph=None, sync_every: int = 16) -> Iterator[list[int]]:
    """logits (1, V): the prefill's last-token logits. Yields lists of new token ids; the last list
    ends with the stop token when one was produced."""
    dev = logits.device
    gen = torch.Generator(device=dev)
    if sampling.seed is not None:
        gen.manual_seed(sampling.seed)
    else:
        gen.seed()
    buf = torch.empty(max_new_tokens, dtype=torch.long, device=dev)
    every = sync_every if dev.type == "cuda" else 1
    tok = sample(logits, sampling, gen)
    done = 0
    for i in range(max_new_tokens):
        buf[i:i + 1].copy_(tok)
        last = i + 1 == max_new_tokens
        if last or i + 1 - done >= every:
            new = buf[done:i + 1].tolist()
            done = i + 1
            for j, t in enumerate(new):
                if t in stop_ids:
                    yield new[:j + 1]
                    return
            yield new
        if last:
            return
        pos = cache.length
        if graph is not None:
            logits = graph(tok, pos)
            cache.advance(1)
        else:
            step = model.make_step(torch.tensor([pos], device=dev), pos)
            logits = model(tok.view(1, 1), step, cache, logits="last")[:, -1]
        tok = sample(logits, sampling, gen)
