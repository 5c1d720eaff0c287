"""CUDA-graph decode step (nano-vllm / gpt-fast style).

The whole one-token forward (embedding, every layer's projections, cache write and flash-decoding,
the head) is captured once and replayed per token; the host only writes the token id and the
position into static device tensors, so no host sync happens in the loop.
"""
from __future__ import annotations

import torch


class GraphStep:
    def __init__(self, model, cache, batch: int):
        dev = cache.device
        self.model, self.cache = model, cache
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.full((1,), cache.length, dtype=torch.long, device=dev)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # compiles the Triton kernels; writes only the slot the next step rewrites
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = self._forward()

    def _forward(self):
        return self.model(self.ids, self.model.make_step(self.pos, None), self.cache, logits="last")[:, -1]

    def __call__(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        """tok (B,) on the device, pos the logical position → logits (B, V) (a static buffer)."""
        self.ids.copy_(tok.view(-1, 1))
        self.pos.fill_(pos)
        self.graph.replay()
        return self.logits
