"""Plain-torch references for Quest's groups scored SparQ's way (`quest:groups=1,channels=F`,
`cache/select/quest_storage.py`): the channel-major copy of a 4-bit layer's key codes, the channel choice, the
group scores estimated from the chosen channels, and the channels' weights (`weigh=1`).

SparQ: Ribar et al., "SparQ Attention: Bandwidth-Efficient LLM Inference", ICML 2024, arXiv 2312.04985.
The ground truth for `kernels/quest_sparq.py` (Triton and CUDA) and the sketch writes of `kernels/quant_append.py`.
"""
from __future__ import annotations

import torch

from .quant_reference import unpack

__all__ = ["sketch_groups", "sparq_channels", "sparq_gather", "sparq_group_scores", "sparq_weights"]


def sketch_groups(planes: list, ks, kz, sk, sz, g0, g1, *, group: int) -> None:
    """The channel-major copy of a 4-bit packed layer's key groups [g0, g1) that `sparq_group_scores`
    reads (`quest:groups=1,channels=F`): sk (B, H, D, cap/2) uint8, byte m of channel c = the codes of
    the group-relative tokens 2m (low nibble) and 2m + 1 (high); sz (B, H, D, MG, 2) fp16 = (scale, zero)
    of channel c in each group. planes: the storage's key planes (B, H, cap, D/2); g0, g1 ints or 0-dim
    device tensors (graph-safe: a range of one group, clamped to the buffer)."""
    D = ks.shape[-1]

    def channel_major(a, b):   # groups [a, b) → (B, H, D, (b - a)·g/2) bytes, (B, H, D, b - a, 2) statistics
        codes = unpack([p[:, :, a * group:b * group] for p in planes], 4, D)                       # (B, H, T, D)
        pairs = codes[:, :, 0::2].to(torch.int32) | (codes[:, :, 1::2].to(torch.int32) << 4)         # (B, H, T/2, D)
        return pairs.transpose(2, 3).to(torch.uint8), torch.stack([ks[:, :, a:b], kz[:, :, a:b]], -1).transpose(2, 3)

    if isinstance(g0, int) and isinstance(g1, int):   # a prefill chunk's range: only those groups
        g0, g1 = max(g0, 0), min(g1, ks.shape[2])
        if g1 > g0:
            new, st = channel_major(g0, g1)
            sk[..., g0 * group // 2:g1 * group // 2] = new
            sz[:, :, :, g0:g1] = st.to(sz.dtype)
        return
    gi = torch.arange(ks.shape[2], device=ks.device)   # device bounds (graph-safe): the whole layer, masked
    sel = (gi >= g0) & (gi < g1)
    new, st = channel_major(0, ks.shape[2])
    sk.copy_(torch.where(sel.repeat_interleave(group // 2), new[..., :sk.shape[-1]], sk))
    sz.copy_(torch.where(sel[:, None], st.to(sz.dtype), sz))


def sparq_channels(q, channels: int, weight=None):
    """The `channels` channels of largest Σ_g |q_g| over each KV head's query group (ties: the lower
    channel), → (idx (B, Hkv, R) int64 in ascending rank order, share (B, Hkv, G) fp32 = the L1 fraction
    of each query those channels hold). q (B, Hq, 1, D), Hq = Hkv·G given by the caller's reshape.
    weight (B, Hkv, D) (`channels=F,weigh=1`): |q_g| times the keys' root mean square along each channel
    (`sparq_weights`), for the choice and the share: a channel counts for what it can add to q·k."""
    qa = q.float().abs()
    if weight is not None:
        qa = qa * weight.float()[:, :, None, :]
    idx = qa.sum(2).neg().argsort(dim=-1, stable=True)[..., :channels]                                # (B, Hkv, R)
    share = qa.gather(-1, idx[:, :, None, :].expand(-1, -1, q.shape[2], -1)).sum(-1) / qa.sum(-1).clamp_min(1e-30)
    return idx, share


def sparq_group_scores(q, sk, sz, length, *, group: int, sink: int, window: int, channels: int, scale: float,
                       rank: str = "max", weight=None):
    """Score a 4-bit packed layer's key groups by logits estimated from `channels` channels (SparQ:
    Ribar et al., "SparQ Attention: Bandwidth-Efficient LLM Inference", ICML 2024, arXiv 2312.04985): the
    channels of largest |q| summed over the KV head's query group, keys from the channel-major copy
    (`sketch_groups`), each query's logits scaled by scale / sqrt(share) (SparQ's temperature: the
    channels kept hold `share` of the query's L1 norm). rank="max": a group's largest estimated logit
    over its tokens and the query group → (B, Hkv, MG); rank="mass": each query's log-sum-exp over the
    group's tokens → (B, Hkv, MG, G) for `page_mass`; rank="peak": each query's largest estimate over them
    → (B, Hkv, MG, G), also for `page_mass` (a group's share of each query's softmax over the groups' peaks).
    Groups the decode kernel reads, n_q(length - 1) / group, score; the rest -inf. Returns (scores, npos) as `group_scores`. q (B, Hq, 1, D)."""
    qr, codes, st, share, nqg = sparq_gather(q, sk, sz, length, group=group, sink=sink, window=window,
                                             channels=channels, weight=weight)
    B, H, G, _ = qr.shape
    MG = sz.shape[3]
    k = (st[..., 1:] + codes.reshape(B, H, -1, MG, group) * st[..., :1]).flatten(-2)                  # (B, H, R, MG·g)
    lg = (qr @ k) * (scale / share.clamp_min(1e-30).sqrt())[..., None]                                # (B, H, G, MG·g)
    lg = lg.reshape(B, H, G, MG, group)
    ok = torch.arange(MG, device=q.device) < nqg
    if rank == "max":
        s = lg.amax(-1).amax(2)
        return torch.where(ok, s, float("-inf")), nqg * group - 1
    s = (lg.logsumexp(-1) if rank == "mass" else lg.amax(-1)).transpose(2, 3)                          # (B, H, MG, G)
    return torch.where(ok[:, None], s, float("-inf")).contiguous(), nqg * group - 1


def sparq_gather(q, sk, sz, length, *, group: int, sink: int, window: int, channels: int, weight=None):
    """What `sparq_group_scores` reads: → qr (B, Hkv, G, R) the queries at the R chosen channels, codes (B, Hkv, R,
    MG·group) their keys' 4-bit codes (float), st (B, Hkv, R, MG, 2) each group's (scale, zero) there, share (B, Hkv, G)
    and nqg (1,) the groups scored."""
    B, Hq, _, D = q.shape
    H = sk.shape[1]
    G = Hq // H
    MG = sz.shape[3]
    n = torch.as_tensor(length, device=q.device).reshape(-1)[-1:]
    nqg = torch.clamp((n - 1 - sink - window) // group, min=0)
    qg = q.float().reshape(B, H, G, D)
    idx, share = sparq_channels(qg, channels, weight)
    qr = qg.gather(-1, idx[:, :, None, :].expand(-1, -1, G, -1))                                       # (B, H, G, R)
    b = sk.gather(2, idx[..., None].expand(-1, -1, -1, sk.shape[-1])).to(torch.int32)                 # (B, H, R, cap/2)
    codes = torch.stack([b & 15, b >> 4], -1).flatten(-2)[..., :MG * group].float()                   # (B, H, R, MG·g)
    st = sz.gather(2, idx[..., None, None].expand(-1, -1, -1, MG, 2)).float()                         # (B, H, R, MG, 2)
    return qr, codes, st, share, nqg


def sparq_weights(ksq, count):
    """The channel weights of `sparq_channels` from ksq = Σ_t k_t² (B, H, D) over `count` keys: each
    channel's root mean square, +1e-3 of the mean square under the root (no channel weighs ~0)."""
    ms = ksq.float() / max(int(count), 1)
    return (ms + 1e-3 * ms.mean(-1, keepdim=True)).sqrt()
