"""SDXL: two text encoders, their penultimate hidden states concatenated as encoder_hidden_states, the second's pooled
projection and six time ids as added_cond_kwargs, as StableDiffusionXLPipeline computes them (clip_skip None).

    hidden = encode_texts(model, ids, texts)   # (M, L, D1 + D2 + P): the states, then the pooled embeds per token
    kw = unet_kwargs(model, hidden)            # encoder_hidden_states (R, L, D1 + D2), added_cond_kwargs

The pooled projection rides along the feature axis, repeated over the tokens, so one tensor's rows index like any
other family's; `unet_kwargs` splits it again. The text "" (DiffusionITM's unconditional prompt) is all zeros when
model_index.json's force_zeros_for_empty_prompt is true (the pipeline's default), as its unconditional embeddings are.
The six time ids (original size, crop top-left, target size) are (R, R, 0, 0, R, R) for the resolution R every image
is resized to. SDXL's VAE overflows in fp16: it runs in fp32 when its config says force_upcast, as the pipeline does.
"""
import torch

from families import sd

NAME = "sdxl"
LORA_PIPELINE = "StableDiffusionXLPipeline"
PARTS = ("tokenizer_2", "text_encoder_2")
OFFLOAD = False
capture_kwargs, text_mask, denoise, timestep, add_noise, target = (
    sd.capture_kwargs, sd.text_mask, sd.denoise, sd.timestep, sd.add_noise, sd.target)


def matches(config):
    return config.get("addition_embed_type") == "text_time"


def components(load, read, dtype, vae_dtype=None):
    """SD's components (the VAE in fp32 under fp16 when force_upcast), the second tokenizer and text encoder, and
    model_index.json's force_zeros_for_empty_prompt."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer
    upcast = dtype == torch.float16 and read("vae").get("force_upcast", True)
    parts = sd.components(load, read, dtype, vae_dtype=torch.float32 if upcast else None)
    parts.update(tokenizer_2=load(CLIPTokenizer, "tokenizer_2"),
                 text_encoder_2=load(CLIPTextModelWithProjection, "text_encoder_2", dtype=dtype),
                 force_zeros_for_empty_prompt=bool(read(None).get("force_zeros_for_empty_prompt", True)))
    return parts


@torch.no_grad()
def encode_texts(model, ids, texts):
    """ids (M, L) of the first tokenizer -> (M, L, D1 + D2 + P)."""
    ids_2 = model.tokenize(model.tokenizer_2, texts).input_ids.to(model.text_encoder.device)
    out_1 = model.text_encoder(ids.to(model.text_encoder.device), output_hidden_states=True)
    out_2 = model.text_encoder_2(ids_2, output_hidden_states=True)
    hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)   # (M, L, D1 + D2)
    pooled = out_2.text_embeds[:, None].expand(-1, hidden.shape[1], -1)             # (M, L, P)
    hidden = torch.cat([hidden, pooled.to(hidden.dtype)], dim=-1)                   # (M, L, D1 + D2 + P)
    if model.force_zeros_for_empty_prompt:  # the pipeline's unconditional input (DiffusionITM's "")
        hidden[torch.tensor([t == "" for t in texts], device=hidden.device)] = 0
    return hidden


def unet_kwargs(model, hidden):
    """hidden (R, L, D + P) -> encoder_hidden_states (R, L, D) and added_cond_kwargs: text_embeds (R, P), time_ids
    (R, 6)."""
    R, D = hidden.shape[0], model.unet.config.cross_attention_dim
    size = (model.resolution, model.resolution)
    time_ids = torch.tensor([size + (0, 0) + size], dtype=hidden.dtype, device=hidden.device)
    return dict(encoder_hidden_states=hidden[..., :D],
                added_cond_kwargs={"text_embeds": hidden[:, 0, D:], "time_ids": time_ids.expand(R, -1)})


def config(model):
    return {}
