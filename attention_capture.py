"""§4.3 cross-attention score computation: a stock-API diffusers attention processor for the attn2 layers.

For every selected cross-attention layer i of the UNet, with image tokens r_x (B, N_img, C) and text tokens
r_y (B, L, D):
    Q = W^q r_x,  K = (W^k + p^k) r_y,  V = (W^v + p^v) r_y          (eq. 5: p^k = p^v = 0 unless prompts are learned)
    A = softmax(Q K^T / sqrt(d))                                      (B, heads, N_img, L), explicit, per head
A is diffusers' own `Attention.get_attention_scores` (the stock `AttnProcessor`'s: scale-then-matmul, Q and K in
fp32 where the UNet sets `upcast_attention`), so the processor returns the layer's usual output A V (the UNet
computes exactly what it computes with the stock processor) and hands A (in fp32) to `lse_pool.pool`, keeping only
the pooled (B, heads) value. Full maps are kept only when asked (`keep_maps=True`, for visualisation). Under
torch.autocast (training) the upcast layers' logits stay fp32 (autocast would run their matmul in fp16 again).
Self-attention (attn1) keeps the stock SDPA processor.

`AttentionCapture` is a context manager in the manner of DAAM's `trace` (castorini/daam): on enter it installs the
processors (the originals come back on exit); it holds the per-(layer, head) weight logits of the "dynamic attention
head weighting" (zero-initialised: softmax of zeros = the plain average over heads) and, once `add_trainable` ran, eq. 5's
p^k, p^v (`prompt_delta.PromptDeltas`). A UNet call takes a `CallRecord` (the token mask in, the pooled values out)
as cross_attention_kwargs, the diffusers way to reach every processor; `combine` turns it into one score per
example: the weighted mean over heads, then the mean over layers. Its parameters are exactly what few-shot training
changes.
"""
import contextlib
import dataclasses
import logging

import torch
import torch.nn as nn

from common import layer_key
from lse_pool import POOLINGS, pool
from prompt_delta import PromptDeltas

ATTN_LOGGER = logging.getLogger("diffusers.models.attention_processor")  # Attention.forward's logger

_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def cross_attention_layers(unet):
    """Names of the UNet's cross-attention (attn2) modules in execution order (down, mid, up)."""
    # sort key: the part (down < mid < up), then the indices in the name as numbers, e.g. up_blocks.1.attentions.2.
    # transformer_blocks.0.attn2 -> (2, [1, 2, 0]): block, then attention within it (numbers, so 10 follows 9)
    names = [k[: -len(".processor")] for k in unet.attn_processors if k.endswith("attn2.processor")]
    return sorted(names, key=lambda n: (_BLOCK_ORDER[n.split(".")[0]], [int(p) for p in n.split(".") if p.isdigit()]))


def official_layers(all_layers):
    """The public code's layers (6 in SD 2.x): in the last cross-attention block of the down path, the mid block and
    the last cross-attention block of the up path, the attn2 of each Transformer2D's last transformer block
    (its unet_2d_condition.py: `list(blocks.values())[-1]`, then `list(attn.values())[-1]`)."""
    out = []
    for part in _BLOCK_ORDER:
        names = [n for n in all_layers if n.startswith(part + ".")]
        if names:
            block = names[-1].split(".attentions.")[0]                        # e.g. down_blocks.2
            last = {}
            for n in names:
                if n.startswith(block + ".attentions."):
                    last[n.split(".attentions.")[1].split(".")[0]] = n       # later transformer blocks overwrite
            out += list(last.values())
    return out


def select_layers(all_layers, layers):
    """layers: "all", an int k (the last k layers, Fig. 3), "official" (`official_layers`) or a list of names."""
    if layers in (None, "all"):
        return list(all_layers)
    if layers == "official":
        if not official_layers(all_layers):
            raise ValueError("layers='official': the public code's six layers exist in a UNet, not in this model")
        return official_layers(all_layers)
    if isinstance(layers, str) and layers.isdigit():
        layers = int(layers)
    if isinstance(layers, int):
        if not 1 <= layers <= len(all_layers):
            raise ValueError(f"layers={layers}: the UNet has {len(all_layers)} cross-attention layers")
        return list(all_layers[-layers:])
    unknown = [n for n in layers if n not in all_layers]
    if unknown:
        raise ValueError(f"unknown cross-attention layers {unknown}; the UNet has {all_layers}")
    return [n for n in all_layers if n in layers]


@dataclasses.dataclass
class CallRecord:
    """One UNet call's capture, handed to every attention processor as cross_attention_kwargs["record"] (with gradient
    checkpointing diffusers hands it to the re-run too): the real-token mask (B, L) in; per selected layer the pooled
    value (B, heads) and, for keep_maps, the attention map (B, heads, N_img, L) out."""
    mask: torch.Tensor
    pooled: dict = dataclasses.field(default_factory=dict)
    maps: dict = dataclasses.field(default_factory=dict)


class CaptureProcessor:
    """attn2 processor: the stock attention computed with an explicit softmax, its map pooled per head."""

    def __init__(self, name, capture):
        self.name, self.capture = name, capture

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, record=None):
        """The stock AttnProcessor's input and output handling around `attend`; record: this UNet call's CallRecord
        (None: the layer's output only)."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        out = self.attend(attn, hidden_states, encoder_hidden_states, attention_mask, record)  # (B, N_img, heads * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def attend(self, attn, hidden_states, encoder_hidden_states, attention_mask, record=None):
        """A = attn.get_attention_scores(Q, K): diffusers' own scale-then-matmul with its upcast rule
        (`attn.upcast_attention`: Q, K in fp32, as SD 2.1-768 needs in fp16; `attn.upcast_softmax`), then A V;
        A pooled (eq. 3-4) into `record`."""
        B, cap = hidden_states.shape[0], self.capture
        q = attn.to_q(hidden_states)                                          # (B, N_img, inner)
        if cap.deltas is None:
            k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)  # (B, L, inner)
        else:                                                                 # eq. 5
            k = cap.deltas.project("k", self.name, attn.to_k, encoder_hidden_states)
            v = cap.deltas.project("v", self.name, attn.to_v, encoder_hidden_states)
        q, k, v = attn.head_to_batch_dim(q), attn.head_to_batch_dim(k), attn.head_to_batch_dim(v)  # (B * heads, N, d)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, k.shape[1], B)  # (B * heads, 1, L)
        # upcast layers: no autocast around their logits, which would cast the fp32 matmul back to fp16
        upcast = torch.autocast(q.device.type, enabled=False) if attn.upcast_attention else contextlib.nullcontext()
        logits = None
        with upcast:
            A = attn.get_attention_scores(q, k, attention_mask)              # (B * heads, N_img, L), q's dtype
            if record is not None and cap.pooling == "official":  # its pre-softmax logits, by the same rule
                lq, lk = (q.float(), k.float()) if attn.upcast_attention else (q, k)
                bias = torch.zeros((), dtype=lq.dtype, device=lq.device) if attention_mask is None else attention_mask
                logits = torch.baddbmm(bias.expand(lq.shape[0], lq.shape[1], lk.shape[1]).to(lq.dtype), lq,
                                       lk.transpose(-1, -2), alpha=attn.scale).float().unflatten(0, (B, attn.heads))
        out = attn.batch_to_head_dim(torch.bmm(A, v))                         # (B, N_img, heads * d)
        if record is not None:
            A = A.float().unflatten(0, (B, attn.heads))                       # (B, heads, N_img, L)
            # assigned, not accumulated: gradient checkpointing's re-run in backward writes the same value again
            record.pooled[self.name] = pool(cap.pooling, A, record.mask, cap.lam, logits, hidden_states,
                                            encoder_hidden_states)            # (B, heads)
            if cap.keep_maps:
                record.maps[self.name] = A.detach()
        return out


class AttentionCapture(nn.Module):
    """The capture of §4.3 and its trainable tensors, a context manager in the manner of DAAM's `trace`.

        with model.capture:              # CaptureProcessor on the selected attn2 layers, the originals back on exit
            record = CallRecord(mask)
            unet(z_t, t, hidden, cross_attention_kwargs={"record": record})
            f = model.capture.combine(record)                                 # (B,)

    Re-entrant: a `with` inside an active capture does nothing, so the scoring methods enter it themselves and a
    caller can hold it open across forward and backward (gradient checkpointing re-runs the processors in backward).
    While active, diffusers' warning about the `record` argument is dropped (`quiet`)."""

    def __init__(self, unet, layers, pooling, lam, keep_maps=False, all_layers=None, processor=CaptureProcessor,
                 proj=("to_k", "to_v"), reading="text"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}")
        self.__dict__["unet"] = unet          # the denoiser it acts on (UNet or MMDiT), not a submodule of the capture
        # the family's attention layers and processor (families/): a UNet's attn2 by default, an MMDiT's joint ones
        self.all_layers = cross_attention_layers(unet) if all_layers is None else list(all_layers)
        self.layers = select_layers(self.all_layers, layers)
        self.pooling, self.lam, self.keep_maps = pooling, float(lam), keep_maps
        self.proj, self.reading = proj, reading   # eq. 5's projections (per layer: a dict); joint attention's A
        self.heads = {n: unet.get_submodule(n).heads for n in self.layers}
        # dynamic attention head weighting: softmax over each layer's heads of zero-initialised logits
        self.head_logits = nn.ParameterDict({layer_key(n): nn.Parameter(torch.zeros(h)) for n, h in self.heads.items()})
        self.processors = {f"{n}.processor": processor(n, self) for n in self.layers}
        self.deltas = None                                                   # eq. 5, from add_trainable
        self.depth, self.originals = 0, None

    def __enter__(self):
        if self.depth == 0:
            self.originals = self.unet.attn_processors                       # every layer's, by name
            # a new dict: set_attn_processor pops the entries of the dict it is given, and needs every layer named
            self.unet.set_attn_processor({**self.originals, **self.processors})
            ATTN_LOGGER.addFilter(self.quiet)                               # this capture's own filter
        self.depth += 1
        return self

    def __exit__(self, *exc):
        self.depth -= 1
        if self.depth == 0:
            self.unet.set_attn_processor(dict(self.originals))
            ATTN_LOGGER.removeFilter(self.quiet)
            self.originals = None

    def quiet(self, log):
        """A logging filter: drops the "cross_attention_kwargs ['record'] are not expected by ..." line that
        Attention.forward logs at every call of a processor without a `record` argument (attn1's stock one)."""
        return not log.getMessage().startswith("cross_attention_kwargs ['record'] are not expected")

    def check_held(self):
        """With gradients and gradient checkpointing, the caller must hold the capture: the backward re-runs the
        processors, which must be these (an error here, not gradients through the stock ones)."""
        if torch.is_grad_enabled() and self.unet.is_gradient_checkpointing and not self.depth:
            raise RuntimeError("gradient checkpointing re-runs the capture processors in backward: hold "
                               "`with model.capture:` across the forward and the backward")

    def add_trainable(self):
        """Attach zero-initialised p^k, p^v (eq. 5) unless attached; -> every trainable tensor."""
        if self.deltas is None:
            self.deltas = PromptDeltas(self.unet, self.layers, self.proj)
        return self.trainable_parameters()

    def trainable_parameters(self):
        """p^k, p^v of every selected layer (once attached) and the head-weight logits."""
        if self.deltas is None:
            raise RuntimeError("no prompt deltas attached: call add_trainable() first (the model's load_trained does)")
        return list(self.deltas.parameters()) + list(self.head_logits.parameters())

    def combine(self, record):
        """One UNet call's pooled values (B, heads) per layer -> f (B,): weighted mean over heads, mean over layers."""
        missing = [n for n in self.layers if n not in record.pooled]
        if missing:
            raise RuntimeError(f"no attention captured for {missing}")
        per_layer = [(record.pooled[n] * self.head_logits[layer_key(n)].softmax(0)).sum(-1) for n in self.layers]
        return torch.stack(per_layer, dim=0).mean(0)                          # (B,)
