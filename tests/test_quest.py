"""Quest's Triton kernels (page scoring, attention through a page table) against their plain-torch
references under TRITON_INTERPRET=1, and the scoring bound itself."""
import pytest
import torch

from longkv.kernels import sparse_reference as ref

triton = pytest.importorskip("triton")
from longkv.kernels import quest  # noqa: E402


@pytest.mark.parametrize("B,Hq,Hkv,D,MP,npages", [(1, 4, 2, 32, 13, 13), (2, 9, 3, 64, 70, 41), (1, 2, 2, 16, 5, 1)])
def test_page_scores_kernel_matches_reference(B, Hq, Hkv, D, MP, npages):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, 1, D, generator=g)
    mn, mx = ref.page_minmax(torch.randn(B, Hkv, MP * 16, D, generator=g), 16, valid=MP * 16 - 3)
    n = torch.tensor([npages])
    got = quest.page_scores(q, mn, mx, n, sink=1, recent=2)
    want = ref.page_scores(q, mn, mx, n, sink=1, recent=2)
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin) and torch.equal(got[~fin], want[~fin])
    if fin.any():
        assert (got[fin] - want[fin]).abs().max() < 1e-4


def test_page_score_bounds_every_key_logit():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 6, 1, 16, generator=g)
    k = torch.randn(1, 2, 8 * 16, 16, generator=g)
    true = (q.reshape(1, 2, 3, 1, 1, 16) * k.reshape(1, 2, 1, 8, 16, 16)).sum(-1).amax(-1).amax(2)
    assert (ref.page_scores(q, *ref.page_minmax(k, 16), 8, sink=0, recent=0) >= true - 1e-5).all()


@pytest.mark.parametrize("splits,softcap", [(1, None), (3, None), (2, 30.0)])
def test_paged_attention_kernel_matches_reference(splits, softcap):
    g = torch.Generator().manual_seed(2)
    B, Hq, Hkv, D, P, NP = 2, 6, 2, 32, 16, 40
    q = torch.randn(B, Hq, 1, D, generator=g)
    kp, vp = torch.randn(NP, P, D, generator=g), torch.randn(NP, P, D, generator=g)
    table = torch.randint(0, NP, (B * Hkv, 7), generator=g).int()
    nsel, last = torch.tensor([7, 3, 1, 5]).int(), torch.tensor([16, 4, 1, 9]).int()
    got = quest.paged_attention(q, kp, vp, table, nsel, last, scale=0.2, softcap=softcap, splits=splits)
    want = ref.paged_attention(q, kp, vp, table, nsel, last, scale=0.2, softcap=softcap)
    assert (got - want).abs().max() < 1e-4


def test_paged_attention_over_all_pages_equals_dense():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 4, 1, 16, generator=g), torch.randn(1, 2, 64, 16, generator=g), torch.randn(1, 2, 64, 16, generator=g)
    table = torch.arange(8).reshape(2, 4).int()
    got = quest.paged_attention(q, k.reshape(-1, 16, 16), v.reshape(-1, 16, 16), table, torch.tensor([4]), torch.tensor([10]),
                                scale=0.25)
    from longkv.kernels.reference import attention_lse

    dense, _ = attention_lse(q, k[:, :, :58], v[:, :, :58], scale=0.25)
    assert (got - dense).abs().max() < 1e-5
