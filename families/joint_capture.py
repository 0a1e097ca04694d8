"""§4.3 on an MMDiT (SD3, SD3.5, Flux): the cross-attention map A read from a joint-attention layer, eq. 3-5.

    processor = JointCaptureProcessor("transformer_blocks.3.attn", capture)   # installed by AttentionCapture

A joint-attention layer attends over the concatenation [image tokens; text tokens] with one softmax. Its image-query x
text-key block is the MMDiT's cross-attention: Q = norm_q(W^q r_x) and K = norm_added_k((W^k_add + p^k) r_y) after the
query / key norms (RMSNorm on SD3.5), as the stock `JointAttnProcessor2_0` computes them; eq. 5's p^k, p^v sit on the
text stream's add_k_proj / add_v_proj. Two readings of A (B, heads, N_img, L), the capture's `reading`:
  text   softmax(Q K_txt^T / sqrt(d)) over the text keys alone: the cross-attention of eq. 3, unaffected by the image
         keys that dominate the joint softmax's denominator (default)
  joint  the text columns of the joint softmax over [image; text] keys (rows sum to below one)
The layer's output is the stock processor's own computation, op for op (scaled_dot_product_attention over the joint
sequence), so the transformer returns exactly what it returns with the stock processor; A is computed beside it in
fp32 and pooled (lse_pool.pool) into the call's CallRecord, as attention_capture.CaptureProcessor does for a UNet.
`FluxCaptureProcessor` does the same for Flux's FluxAttnProcessor (text first, rotary embedding, single-stream blocks).
"""
import torch
import torch.nn.functional as F

from lse_pool import pool

READINGS = ("text", "joint")


def heads(x, attn):
    """(B, N, heads * d) -> (B, heads, N, d)."""
    return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


def text_attention(q, k_img, k_txt, scale, reading, keep_logits=False):
    """q (B, h, N, d), k_img (B, h, N, d), k_txt (B, h, L, d) -> A (B, h, N, L) in fp32 and the text logits (only
    when kept: the official pooling's input; each is (B, h, N, L) fp32, 131 MB per row and layer at 1024 px). fp32 also
    under autocast (training), which would run these matmuls in bf16 / fp16."""
    with torch.autocast(q.device.type, enabled=False):
        logits = (q.float() @ k_txt.float().transpose(-1, -2)) * scale       # (B, h, N, L)
        if reading == "text":
            A = logits.softmax(-1)
        else:
            img = (q.float() @ k_img.float().transpose(-1, -2)) * scale      # (B, h, N, N)
            A = (logits - torch.logsumexp(torch.cat([img, logits], dim=-1), dim=-1, keepdim=True)).exp()
    return A, logits if keep_logits else None


class JointCaptureProcessor:
    """JointAttnProcessor2_0 with eq. 5 on the text keys / values and A recorded."""

    def __init__(self, name, capture):
        self.name, self.capture = name, capture

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, record=None, **kwargs):
        cap, B, N = self.capture, hidden_states.shape[0], hidden_states.shape[1]
        q, k, v = (heads(p(hidden_states), attn) for p in (attn.to_q, attn.to_k, attn.to_v))  # (B, h, N, d)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        c = encoder_hidden_states                                              # (B, L, D) text stream
        cq = attn.add_q_proj(c)
        if cap.deltas is None:
            ck, cv = attn.add_k_proj(c), attn.add_v_proj(c)
        else:                                                                  # eq. 5 on the text stream
            ck = cap.deltas.project("k", self.name, attn.add_k_proj, c)
            cv = cap.deltas.project("v", self.name, attn.add_v_proj, c)
        cq, ck, cv = heads(cq, attn), heads(ck, attn), heads(cv, attn)         # (B, h, L, d)
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        if record is not None:
            A, logits = text_attention(q, k, ck, attn.scale, cap.reading, cap.pooling == "official")  # (B, h, N, L)
            record.pooled[self.name] = pool(cap.pooling, A, record.mask, cap.lam, logits,
                                            hidden_states, c)                  # (B, h)
            if cap.keep_maps:
                record.maps[self.name] = A.detach()
        query, key, value = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(B, -1, attn.heads * q.shape[-1]).to(query.dtype)  # (B, N + L, h * d)
        out, c = out[:, :N], out[:, N:]
        if not attn.context_pre_only:
            c = attn.to_add_out(c)
        return attn.to_out[1](attn.to_out[0](out)), c


class FluxCaptureProcessor:
    """FluxAttnProcessor with eq. 5 and A recorded, for Flux's dual-stream blocks (text in encoder_hidden_states,
    projected by add_k_proj / add_v_proj) and single-stream blocks (one sequence [text; image], projected by to_k /
    to_v: p^k, p^v act on the text rows only, their number L read from the record's mask). Text comes first in the
    joint sequence; A is read after the RMS norms and the rotary embedding, as the stock processor computes q and k."""
    _attention_backend = None  # the stock processor's defaults: dispatch_attention_fn's native SDPA
    _parallel_config = None

    def __init__(self, name, capture):
        self.name, self.capture = name, capture

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 record=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        cap, deltas = self.capture, self.capture.deltas
        x, c = hidden_states, encoder_hidden_states
        dual = c is not None
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)                    # (B, S, h * d)
        if deltas is not None and not dual:                                   # eq. 5 on the text rows [:L]
            L = record.mask.shape[1]
            k = torch.cat([k[:, :L] + deltas.term("k", self.name, x[:, :L]), k[:, L:]], 1)
            v = torch.cat([v[:, :L] + deltas.term("v", self.name, x[:, :L]), v[:, L:]], 1)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))     # (B, S, h, d)
        q, k = attn.norm_q(q), attn.norm_k(k)
        if dual:
            if deltas is None:
                ck, cv = attn.add_k_proj(c), attn.add_v_proj(c)
            else:                                                              # eq. 5 on the text stream
                ck = deltas.project("k", self.name, attn.add_k_proj, c)
                cv = deltas.project("v", self.name, attn.add_v_proj, c)
            cq, ck, cv = (t.unflatten(-1, (-1, attn.head_dim)) for t in (attn.add_q_proj(c), ck, cv))
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)  # (B, L + N, h, d)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        if record is not None:
            L = record.mask.shape[1]
            qh, kh = q.transpose(1, 2), k.transpose(1, 2)                     # (B, h, L + N, d)
            A, logits = text_attention(qh[:, :, L:], kh[:, :, L:], kh[:, :, :L], attn.head_dim ** -0.5, cap.reading,
                                       cap.pooling == "official")             # (B, h, N, L)
            record.pooled[self.name] = pool(cap.pooling, A, record.mask, cap.lam, logits, x[:, -A.shape[2]:],
                                            c if dual else x[:, :L])          # (B, h)
            if cap.keep_maps:
                record.maps[self.name] = A.detach()
        out = dispatch_attention_fn(q, k, v, attn_mask=attention_mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(q.dtype)
        if not dual:
            return out
        c, out = out.split_with_sizes([c.shape[1], out.shape[1] - c.shape[1]], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(c.contiguous())
