"""§4.5 attention-based prompt learning, eq. 5: W^k' = W^k + p^k,  W^v' = W^v + p^v  on every cross-attention layer.

p^k, p^v have exactly the shape of to_k.weight / to_v.weight (inner_dim, cross_attention_dim), are zero-initialised
(so the model starts bit-for-bit as the pretrained one) and, with the per-(layer, head) weight logits of the dynamic
head weighting, are the only trainable tensors: UNet, VAE and text encoder stay frozen. They are stored in float32
even when the UNet runs in fp16/bf16. `attention_capture.CaptureProcessor` projects the text tokens through
`PromptDeltas.project` once the capture holds deltas. Saved as one small safetensors file with metadata (base model,
layer names, the capture's lambda and pooling (key "scorer"), training arguments); loading onto a model whose layers
or shapes differ fails naming the mismatch.
"""
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import InputError, check_tensors, copy_tensors, layer_key, meta_value, read_checkpoint, save_tensors

FORMAT = "discffusion-prompt-deltas-v1"


class PromptDeltas(nn.Module):
    """Zero-initialised p^k, p^v for each named attention layer of `unet`, shaped like its text key / value
    projections `proj` (a UNet's attn2: to_k, to_v; an MMDiT's joint attention: add_k_proj, add_v_proj; a dict: per
    layer, as on Flux's single-stream blocks, whose to_k, to_v project the text rows too)."""

    def __init__(self, unet, layers, proj=("to_k", "to_v")):
        super().__init__()
        self.k, self.v = nn.ParameterDict(), nn.ParameterDict()
        for name in layers:
            attn = unet.get_submodule(name)
            for store, p in zip((self.k, self.v), proj[name] if isinstance(proj, dict) else proj):
                store[layer_key(name)] = nn.Parameter(torch.zeros_like(getattr(attn, p).weight, dtype=torch.float32))

    def project(self, which, name, linear, x):
        """eq. 5: x (B, L, D) through `linear` (to_k or to_v) with weight W + p -> (B, L, inner)."""
        delta = (self.k if which == "k" else self.v)[layer_key(name)]
        return F.linear(x, linear.weight + delta.to(linear.weight.dtype), linear.bias)

    def term(self, which, name, x):
        """eq. 5's added term alone, p x: x (B, L, D) -> (B, L, inner) (Flux's single-stream blocks add it to the text
        rows of a projection of the whole sequence; zero p adds exact zeros)."""
        delta = (self.k if which == "k" else self.v)[layer_key(name)]
        return F.linear(x, delta.to(x.dtype))


def state(capture):
    """{name: tensor}: p^k, p^v and the head logits of each of the capture's layers."""
    out = {}
    for name in capture.layers:
        key = layer_key(name)
        out[f"delta_k.{name}"] = capture.deltas.k[key]
        out[f"delta_v.{name}"] = capture.deltas.v[key]
        out[f"head_logits.{name}"] = capture.head_logits[key]
    return out


def save(path, capture, base_model, training_args=None, family=None, levels=None, level_logits=None):
    """One safetensors file: p^k, p^v, head logits per layer, and metadata describing where they belong (the model
    family too: families/); with learned level weights, their logits and the noise levels they weigh."""
    extra = {} if level_logits is None else {"level_logits": level_logits}
    save_tensors(path, state(capture) | extra, {
        "format": FORMAT, "base_model": base_model, "family": family, "layers": capture.layers,
        "scorer": {"lam": capture.lam, "pooling": capture.pooling},  # the deltas were learned under these
        "training_args": training_args or {}, **({"levels": list(levels)} if extra else {})})


def load(path, capture, family=None, base_model=None, extra=None):
    """Load a file written by `save` into the capture's deltas; a family, layer or shape mismatch is an InputError
    naming it (a file without a family, written before families were recorded, loads wherever its layers fit).
    base_model: this model's name; a file recorded for another one (shapes matching) is warned about, as DiffusionITM
    and CLIP files are (a hub id and its local copy are the same model). extra: {name: tensor} the file holds too
    (the level-weight logits)."""
    meta, tensors = read_checkpoint(path)
    if meta.get("format") != FORMAT:
        raise InputError(f"checkpoint {path} is not a Discffusion prompt-delta file (no format metadata)")
    if family and meta.get("family") and meta["family"] != family:
        raise InputError(f"checkpoint {path} was trained on a {meta['family']} model (base model "
                         f"{meta.get('base_model')}), not on this {family} model")
    saved_layers = meta_value(path, meta, "layers", list, "a list of layer names")
    for key in ("scorer", "training_args"):
        meta_value(path, {key: {}, **meta}, key, dict, "a dict")
    if saved_layers != list(capture.layers):
        extra = sorted(set(saved_layers) - set(capture.layers))
        lacking = sorted(set(capture.layers) - set(saved_layers))
        raise InputError(f"checkpoint {path} (base model {meta.get('base_model')}) was trained on other "
                         f"cross-attention layers: not in this model {extra[:3]}, not in the checkpoint {lacking[:3]}")
    own = state(capture) | (extra or {})
    check_tensors(path, tensors, own, f" (base model {meta.get('base_model')})")
    if base_model is not None and meta.get("base_model") != base_model:
        warnings.warn(f"{path}: trained on {meta.get('base_model')!r}, loading onto {base_model!r} (shapes match)")
    copy_tensors(tensors, own)
    return meta
