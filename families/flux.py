"""Flux.1 (schnell, dev): dual-stream then single-stream joint attention over [T5 text; packed image], as FluxPipeline
computes it.

    hidden = encode_texts(model, ids, texts)   # (M, L_t5, D + P): T5's states, CLIP's pooled output alongside
    v = denoise(model, z_t, ts, hidden, record)  # packs z_t into 2x2 patches, unpacks the prediction

Text: T5's last states (512 tokens on dev, the pipeline's default; pass max_sequence_length=256 for schnell) are the
whole text sequence, so the real-token mask is T5's caption tokens (without "</s>" and padding); CLIP-L's pooled
output is the pooled projection. The transformer gets the latents packed into 2x2 patches with their image ids, the
text ids (zeros), timestep / 1000 and, on dev (guidance_embeds), the guidance scale (FluxPipeline's default 3.5) as an
embedding. Noise: flow matching as in families/sd3.py; the scheduler's dynamic shift (dev, schnell's is off) takes the
pipeline's mu for the image's sequence length: sigma = e^mu / (e^mu + 1 / s - 1). The capture reads A on every dual-
and single-stream block (joint_capture.FluxCaptureProcessor); p^k, p^v sit on add_k_proj / add_v_proj (dual) and on
to_k / to_v for the text rows only (single).
"""
import math

import torch

from families import sd3
from families.joint_capture import FluxCaptureProcessor

NAME = "flux"
LORA_PIPELINE = "FluxPipeline"
PARTS = ("tokenizer_2", "text_encoder_2")
OFFLOAD = True  # T5-XXL (4.76 B) leaves the GPU before the transformer runs (Discffusion.offload)
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default (dev); schnell's pipeline is run with 256
GUIDANCE = 3.5             # FluxPipeline's default guidance_scale
add_noise, target = sd3.add_noise, sd3.target


def matches(config):
    return "guidance_embeds" in config  # FluxTransformer2DModel's config


def components(load, read, dtype, vae_dtype=None):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast
    return dict(tokenizer=load(CLIPTokenizer, "tokenizer"), tokenizer_2=load(T5TokenizerFast, "tokenizer_2"),
                text_encoder=load(CLIPTextModel, "text_encoder", dtype=dtype),
                text_encoder_2=load(T5EncoderModel, "text_encoder_2", dtype=dtype),
                vae=load(AutoencoderKL, "vae", torch_dtype=vae_dtype or dtype),
                unet=load(FluxTransformer2DModel, "transformer", torch_dtype=dtype),
                scheduler=load(FlowMatchEulerDiscreteScheduler, "scheduler"))


def capture_kwargs(transformer):
    """The dual-stream blocks' attention, then the single-stream blocks', each in order; eq. 5's projections each."""
    names = [k[: -len(".processor")] for k in transformer.attn_processors if k.endswith(".attn.processor")]
    names.sort(key=lambda n: (n.startswith("single"), int(n.split(".")[1])))
    proj = {n: ("to_k", "to_v") if n.startswith("single") else ("add_k_proj", "add_v_proj") for n in names}
    return dict(all_layers=names, processor=FluxCaptureProcessor, proj=proj)


def t5_tokens(model, texts):
    return model.tokenizer_2(list(texts), padding="max_length", truncation=True, return_tensors="pt",
                             max_length=model.max_sequence_length or MAX_SEQUENCE_LENGTH)


@torch.no_grad()
def encode_texts(model, ids, texts):
    """ids (M, 77) of the CLIP tokenizer -> (M, L_t5, D + P) (FluxPipeline.encode_prompt)."""
    dev = model.text_encoder.device
    pooled = model.text_encoder(ids.to(dev), output_hidden_states=False).pooler_output               # (M, P)
    hidden = model.text_encoder_2(t5_tokens(model, texts).input_ids.to(dev))[0]                     # (M, L, D)
    return torch.cat([hidden, pooled[:, None].expand(-1, hidden.shape[1], -1).to(hidden.dtype)], dim=-1)


def text_mask(model, mask, texts):
    """The text sequence is T5's alone: its caption tokens, without "</s>" and padding (M, L_t5)."""
    tok = t5_tokens(model, texts)
    return (tok.attention_mask.bool() & (tok.input_ids != model.tokenizer_2.eos_token_id)).to(mask.device)


def unet_kwargs(model, hidden):
    """hidden (R, L, D + P) -> the transformer's text inputs: encoder_hidden_states, pooled_projections, txt_ids and
    the guidance (dev)."""
    D = model.unet.config.joint_attention_dim
    kw = dict(encoder_hidden_states=hidden[..., :D], pooled_projections=hidden[:, 0, D:],
              txt_ids=torch.zeros(hidden.shape[1], 3, device=hidden.device, dtype=hidden.dtype))
    if model.unet.config.guidance_embeds:
        g = GUIDANCE if model.guidance_scale is None else model.guidance_scale
        kw["guidance"] = torch.full((hidden.shape[0],), g, device=hidden.device, dtype=torch.float32)
    return kw


def denoise(model, z_t, ts, hidden, record):
    """z_t (R, C, h, w) packed (R, h/2 * w/2, 4C) with its image ids, one transformer call -> (R, C, h, w)."""
    from diffusers import FluxPipeline
    R, C, h, w = z_t.shape
    packed = FluxPipeline._pack_latents(z_t, R, C, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(R, h // 2, w // 2, z_t.device, z_t.dtype)
    out = model.unet(hidden_states=packed, timestep=ts / 1000, img_ids=img_ids, **unet_kwargs(model, hidden),
                     joint_attention_kwargs={"record": record}).sample
    return FluxPipeline._unpack_latents(out, h * model.vae_scale, w * model.vae_scale, model.vae_scale)


def timestep(model, level):
    """Level l -> sigma * T: with dynamic shifting the pipeline's mu for this resolution's (h/2 * w/2) tokens."""
    cfg = model.scheduler.config
    if not cfg.use_dynamic_shifting:
        return sd3.timestep(model, level)
    T = cfg.num_train_timesteps
    s = min(max(int(round(level * T)), 1), T) / T
    n = (model.resolution // model.vae_scale // 2) ** 2
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    mu = n * m + cfg.base_shift - m * cfg.base_image_seq_len                    # FluxPipeline's calculate_shift
    sigma = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    return float(torch.tensor(sigma * T, dtype=torch.float32))


def config(model):
    return dict(max_sequence_length=model.max_sequence_length or MAX_SEQUENCE_LENGTH, reading=model.capture.reading,
                guidance_scale=(GUIDANCE if model.guidance_scale is None else model.guidance_scale)
                if model.unet.config.guidance_embeds else None)
