"""lse_pool.py: eq. 3-4 and the pooling alternatives, by hand."""
import math

import pytest
import torch

from lse_pool import lse_pool, pool


def test_lse_pool_matches_eq3_eq4_by_hand():
    torch.manual_seed(0)
    A = torch.rand(2, 3, 5, 6).softmax(-1)                          # (B, heads, N_img, L)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    for lam in (1.0, 4.0):
        got = lse_pool(A, mask, lam)
        for b in range(2):
            for h in range(3):
                real = [j for j in range(6) if mask[b, j]]
                S = [math.log(sum(math.exp(lam * A[b, h, i, j].item()) for i in range(5))) / lam for j in real]
                assert got[b, h].item() == pytest.approx(sum(S) / len(S), rel=1e-6)
    # padding really is ignored: changing masked columns does not move the score
    A2 = A.clone()
    A2[0, :, :, 4:] = 0.9
    assert torch.allclose(lse_pool(A2, mask)[0], lse_pool(A, mask)[0])
    # large lambda tends to max pooling
    assert torch.allclose(lse_pool(A, mask, 1e4), pool("max", A, mask), atol=1e-3)


def test_official_pooling_is_lse_over_all_text_tokens_of_logits():
    logits = torch.randn(2, 3, 5, 6)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    got = pool("official", logits.softmax(-1), mask, logits=logits)
    want = torch.stack([torch.stack([torch.tensor([math.log(sum(math.exp(v) for v in logits[b, h, i].tolist()))
                                                   for i in range(5)]).mean() for h in range(3)]) for b in range(2)])
    assert torch.allclose(got, want, atol=1e-5)
