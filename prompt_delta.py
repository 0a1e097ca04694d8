"""§4.5 attention-based prompt learning, eq. 5: W^k' = W^k + p^k,  W^v' = W^v + p^v  on every cross-attention layer.

p^k, p^v have exactly the shape of to_k.weight / to_v.weight (inner_dim, cross_attention_dim), are zero-initialised
(so the model starts bit-for-bit as the pretrained one) and, with the per-(layer, head) weight logits of the dynamic
head weighting, are the only trainable tensors: UNet, VAE and text encoder stay frozen. They are stored in float32
even when the UNet runs in fp16/bf16. Saved as one small safetensors file with metadata (base model, layer names,
shapes, the scorer's lambda and pooling, training arguments); loading onto a model whose layers or shapes differ
fails naming the mismatch.
"""
import json

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from datasets import InputError


class PromptDeltas(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.layers = list(model.scorer.layers)
        self.k, self.v = nn.ParameterDict(), nn.ParameterDict()
        for name in self.layers:
            attn = model.unet.get_submodule(name)
            key = _key(name)
            self.k[key] = nn.Parameter(torch.zeros(attn.to_k.weight.shape, device=attn.to_k.weight.device))
            self.v[key] = nn.Parameter(torch.zeros(attn.to_v.weight.shape, device=attn.to_v.weight.device))
            proc = model.scorer.processors[name]
            proc.delta_k, proc.delta_v = self.k[key], self.v[key]


def attach(model):
    """Add zero-initialised p^k, p^v to `model` (a Discffusion) once; returns the PromptDeltas module."""
    if getattr(model, "deltas", None) is None:
        model.deltas = PromptDeltas(model)
    return model.deltas


def trainable_parameters(model):
    """The deltas and the head-weight logits: everything the few-shot training may change."""
    deltas = attach(model)
    return list(deltas.parameters()) + list(model.scorer.head_logits.parameters())


def state_tensors(model):
    deltas = attach(model)
    out = {}
    for name in deltas.layers:
        key = _key(name)
        out[f"delta_k.{name}"] = deltas.k[key].detach().float().cpu().contiguous()
        out[f"delta_v.{name}"] = deltas.v[key].detach().float().cpu().contiguous()
        out[f"head_logits.{name}"] = model.scorer.head_logits[key].detach().float().cpu().contiguous()
    return out


def save(path, model, training_args=None):
    """One safetensors file: p^k, p^v, head logits per layer, and metadata describing where they belong."""
    tensors = state_tensors(model)
    meta = {"base_model": model.name, "layers": json.dumps(model.scorer.layers),
            "shapes": json.dumps({k: list(t.shape) for k, t in tensors.items()}),
            "scorer": json.dumps({"lam": model.scorer.lam, "pooling": model.scorer.pooling}),  # learned under these
            "training_args": json.dumps(training_args or {}, default=str), "format": "discffusion-prompt-deltas-v1"}
    save_file(tensors, str(path), metadata=meta)


def read_checkpoint(path, tensors=True):
    """(metadata, tensors) of a safetensors file ({} for tensors=False: the header only); a missing or unreadable file
    is an InputError naming it. Shared by every method's load_trained."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except FileNotFoundError:
        raise InputError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for corrupt files
        raise InputError(f"checkpoint {path} is not a readable safetensors file ({type(e).__name__})") from None


def load(path, model):
    """Load a file written by `save` onto `model`; a layer or shape mismatch is an InputError naming it."""
    meta, tensors = read_checkpoint(path)
    if meta.get("format") != "discffusion-prompt-deltas-v1":
        raise InputError(f"checkpoint {path} is not a Discffusion prompt-delta file (no format metadata)")
    saved_layers = json.loads(meta["layers"])
    if saved_layers != list(model.scorer.layers):
        extra = sorted(set(saved_layers) - set(model.scorer.layers))
        lacking = sorted(set(model.scorer.layers) - set(saved_layers))
        raise InputError(f"checkpoint {path} (base model {meta.get('base_model')}) was trained on other "
                         f"cross-attention layers: not in this model {extra[:3]}, not in the checkpoint {lacking[:3]}")
    want = state_tensors(model)
    for key, t in tensors.items():
        if key not in want or want[key].shape != t.shape:
            have = tuple(want[key].shape) if key in want else None
            raise InputError(f"checkpoint {path} (base model {meta.get('base_model')}): {key} has shape "
                             f"{tuple(t.shape)}, this model expects {have}")
    deltas = attach(model)
    with torch.no_grad():
        for name in deltas.layers:
            key = _key(name)
            deltas.k[key].copy_(tensors[f"delta_k.{name}"])
            deltas.v[key].copy_(tensors[f"delta_v.{name}"])
            model.scorer.head_logits[key].copy_(tensors[f"head_logits.{name}"])
    return {k: (json.loads(v) if k in ("layers", "shapes", "scorer", "training_args") else v) for k, v in meta.items()}


def _key(name):
    return name.replace(".", "_")
