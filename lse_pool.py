"""§4.4 LogSumExp pooling, eq. 3-4, and the pooling variants of the ablations (Fig. 5).

eq. 3  S(A)_j = (1/lambda) * log sum_i exp(lambda * A_ij)     pooled over the n image tokens i, one value per text token j
eq. 4  f(y, x) = Ave(S(A))                                      here: the mean over the caption's real tokens j

`A` is one cross-attention map per head, A = softmax(Q K^T / sqrt(d)) of shape (B, heads, N_img, N_txt); rows
(image tokens) sum to one over the text tokens. The result is one number per (example, head); the heads, layers and
noise levels are averaged in `attention_capture.py` / `discffusion.py`.

Variants (Fig. 5 and docs/official_code.md, the comparison with the public code):
  lse       eq. 3 with lambda, then the mean over real text tokens (the paper; default)
  max       lambda -> infinity: the maximum of each column ("maximum value from each column of the attention map")
  mean      the plain average of each column
  cosine    cosine similarity of image and text features on their shared dimensions (App. J), averaged over image
            tokens and real text tokens; the same value for every head
  official  the public official code: logsumexp over ALL text tokens (padding included) of the pre-softmax logits,
            one value per image token, then the mean over image tokens (the opposite axis to eq. 3)
"""
import torch
import torch.nn.functional as F

POOLINGS = ("lse", "max", "mean", "cosine", "official")


def masked_mean(values, mask):
    """Mean over the last axis where mask is true. values (B, heads, L), mask (B, L) -> (B, heads); empty -> 0."""
    m = mask[:, None, :].to(values.dtype)                                 # (B, 1, L)
    return (values * m).sum(-1) / m.sum(-1).clamp(min=1)


def lse_pool(A, mask, lam=1.0):
    """eq. 3-4 on attention maps A (B, heads, N_img, L) with real-token mask (B, L) -> (B, heads)."""
    S = torch.logsumexp(lam * A, dim=2) / lam                              # (B, heads, L)  eq. 3, over image tokens
    return masked_mean(S, mask)                                            # (B, heads)     eq. 4, over real tokens


def pool(method, A, mask, lam=None, logits=None, image_feats=None, text_feats=None):
    """Pool one layer's attention to a (B, heads) score with the chosen `method` (see the module docstring)."""
    if method == "lse":
        return lse_pool(A, mask, lam)
    if method == "max":
        return masked_mean(A.amax(dim=2), mask)                            # (B, heads)
    if method == "mean":
        return masked_mean(A.mean(dim=2), mask)
    if method == "official":
        return torch.logsumexp(logits, dim=-1).mean(dim=-1)                # (B, heads, N_img) -> (B, heads)
    if method == "cosine":
        d = min(image_feats.shape[-1], text_feats.shape[-1])               # the shared dimensions
        x = F.normalize(image_feats[..., :d].float(), dim=-1)              # (B, N_img, d)
        y = F.normalize(text_feats[..., :d].float(), dim=-1)               # (B, L, d)
        cos = (x @ y.transpose(1, 2)).mean(dim=1)                          # (B, L)
        return masked_mean(cos[:, None, :], mask).expand(-1, A.shape[1])   # (B, heads)
    raise ValueError(f"unknown pooling {method!r}; choose from {', '.join(POOLINGS)}")
