"""Latent consistency models (LCM): an SD UNet with time_cond_proj_dim that also takes the guidance scale w as an
embedding (timestep_cond), as LatentConsistencyModelPipeline computes it; text conditioning as SD's.

    kw = unet_kwargs(model, hidden)   # {"encoder_hidden_states": (R, L, D), "timestep_cond": (R, time_cond_proj_dim)}

The UNet sees w = guidance_scale - 1 (the pipeline's convention); GUIDANCE is that pipeline's default guidance_scale.
An LCM-LoRA (latent-consistency/lcm-lora-sdv1-5) merged into a plain SD UNet stays family "sd": it has no
time_cond_proj_dim, and its pipeline passes no timestep_cond.
"""
import torch

from families import sd

NAME = "lcm"
GUIDANCE = 8.5  # LatentConsistencyModelPipeline's default guidance_scale
LORA_PIPELINE, PARTS, OFFLOAD = sd.LORA_PIPELINE, sd.PARTS, sd.OFFLOAD
components, encode_texts = sd.components, sd.encode_texts
capture_kwargs, text_mask, denoise, timestep, add_noise, target = (
    sd.capture_kwargs, sd.text_mask, sd.denoise, sd.timestep, sd.add_noise, sd.target)


def matches(config):
    return bool(config.get("time_cond_proj_dim"))


def guidance(model):
    """The model's guidance_scale, GUIDANCE unless given."""
    return GUIDANCE if model.guidance_scale is None else model.guidance_scale


def guidance_embedding(w, dim):
    """w (B,) -> (B, dim): LatentConsistencyModelPipeline's own embedding of the guidance scale (the method does not
    use its `self`)."""
    from diffusers import LatentConsistencyModelPipeline  # only here: importing the pipelines is slow and noisy
    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)


def unet_kwargs(model, hidden):
    """hidden (R, L, D) -> SD's conditioning plus the guidance embedding of w = guidance_scale - 1 for R rows."""
    w = torch.full((hidden.shape[0],), guidance(model) - 1)
    emb = guidance_embedding(w, model.unet.config.time_cond_proj_dim)          # (R, time_cond_proj_dim)
    return dict(encoder_hidden_states=hidden, timestep_cond=emb.to(hidden.device, hidden.dtype))


def config(model):
    return dict(guidance_scale=guidance(model))
