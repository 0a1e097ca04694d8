"""PixArt-Sigma: a DiT with ordinary cross-attention (attn2) to T5's states, so the UNets' capture reads it as it is,
as PixArtSigmaPipeline computes its inputs.

    hidden = encode_texts(model, ids, texts)   # (M, 300, D + 1): T5's states, then its attention mask alongside
    pred = denoise(model, z_t, ts, hidden, record)

Text: T5's last states over `max_sequence_length` tokens (the pipeline's 300; captions as given, i.e. the pipeline's
clean_caption=False), its padding masked in every cross-attention (encoder_attention_mask, riding along the feature
axis so rows index like any other family's); the real-token mask is T5's caption tokens (without "</s>" and padding).
The transformer learns its variance: of its 8 output channels the first 4 are eps, as the pipeline splits them. Noise,
the scheduler's betas and eps-prediction: families/sd.py's DDPM helpers. eq. 5 on attn2's to_k / to_v as for a UNet.
"""
import torch

from families import sd

NAME = "pixart"
LORA_PIPELINE = None
PARTS = ()
OFFLOAD = True  # T5-XXL (4.76 B) leaves the GPU before the transformer runs (Discffusion.offload)
MAX_SEQUENCE_LENGTH = 300  # PixArtSigmaPipeline's default
timestep, add_noise, target = sd.timestep, sd.add_noise, sd.target


def matches(config):
    return "caption_channels" in config  # PixArtTransformer2DModel's config


def components(load, read, dtype, vae_dtype=None):
    """T5 tokenizer and encoder, VAE, the transformer (as `unet`) and the scheduler's betas (DDPMScheduler)."""
    from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel
    from transformers import T5EncoderModel, T5TokenizerFast
    return dict(tokenizer=load(T5TokenizerFast, "tokenizer"),
                text_encoder=load(T5EncoderModel, "text_encoder", dtype=dtype),
                vae=load(AutoencoderKL, "vae", torch_dtype=vae_dtype or dtype),
                unet=load(PixArtTransformer2DModel, "transformer", torch_dtype=dtype),
                scheduler=load(DDPMScheduler, "scheduler"))


def capture_kwargs(transformer):
    """Every block's cross-attention (transformer_blocks.i.attn2), in order; the UNets' processor."""
    names = [k[: -len(".processor")] for k in transformer.attn_processors if k.endswith(".attn2.processor")]
    return dict(all_layers=sorted(names, key=lambda n: int(n.split(".")[1])))


def t5_tokens(model, texts):
    return model.tokenizer(list(texts), padding="max_length", truncation=True, add_special_tokens=True,
                           max_length=model.max_sequence_length or MAX_SEQUENCE_LENGTH, return_tensors="pt")


@torch.no_grad()
def encode_texts(model, ids, texts):
    """texts -> (M, L, D + 1): T5's last states and the tokenizer's attention mask."""
    tok = t5_tokens(model, texts)
    am = tok.attention_mask.to(model.text_encoder.device)                                        # (M, L)
    hidden = model.text_encoder(tok.input_ids.to(model.text_encoder.device), attention_mask=am)[0]  # (M, L, D)
    return torch.cat([hidden, am[..., None].to(hidden.dtype)], dim=-1)


def text_mask(model, mask, texts):
    tok = t5_tokens(model, texts)
    return (tok.attention_mask.bool() & (tok.input_ids != model.tokenizer.eos_token_id)).to(mask.device)


def unet_kwargs(model, hidden):
    """hidden (R, L, D + 1) -> encoder_hidden_states (R, L, D), encoder_attention_mask (R, L), no micro-conditions."""
    return dict(encoder_hidden_states=hidden[..., :-1], encoder_attention_mask=hidden[..., -1],
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def denoise(model, z_t, ts, hidden, record):
    """One transformer call -> eps (R, 4, h, w): the first half of a learned-variance output."""
    out = model.unet(z_t, timestep=ts, **unet_kwargs(model, hidden), cross_attention_kwargs={"record": record}).sample
    return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * z_t.shape[1] else out


def config(model):
    return dict(max_sequence_length=model.max_sequence_length or MAX_SEQUENCE_LENGTH)
