"""SD 1.x / 2.x: one CLIP text encoder whose last hidden states are the UNet's encoder_hidden_states (§4.2).

    hidden = encode_texts(model, ids, texts)   # (M, L, D)
    kw = unet_kwargs(model, hidden)            # {"encoder_hidden_states": (R, L, D)}

Epsilon or v-prediction (SD 2.1-768), conv or linear projections, upcast_attention: all of it inside the stock UNet and
scheduler, so this family needs nothing else. LCM (families/lcm.py) shares its text conditioning.
"""
import torch

NAME = "sd"
LORA_PIPELINE = "StableDiffusionPipeline"  # whose LoraLoaderMixin classmethods read a LoRA for this UNet
PARTS = ()  # components beyond tokenizer, text_encoder, vae, unet, scheduler


def matches(config):
    return True


def components(load, read, dtype, vae_dtype=None):
    """tokenizer, text encoder, VAE, UNet, scheduler; load(cls, subfolder, **kw) = cls.from_pretrained of the model's
    subfolder, read(subfolder) = its config.json (None: model_index.json)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    return dict(tokenizer=load(CLIPTokenizer, "tokenizer"),
                text_encoder=load(CLIPTextModel, "text_encoder", dtype=dtype),
                vae=load(AutoencoderKL, "vae", torch_dtype=vae_dtype or dtype),
                unet=load(UNet2DConditionModel, "unet", torch_dtype=dtype),
                scheduler=load(DDPMScheduler, "scheduler"))


@torch.no_grad()
def encode_texts(model, ids, texts):
    """token ids (M, L) -> the text encoder's last hidden states (M, L, D)."""
    return model.text_encoder(ids.to(model.device))[0]


def unet_kwargs(model, hidden):
    """hidden (R, L, D) -> the UNet's conditioning for R rows."""
    return dict(encoder_hidden_states=hidden)


def config(model):
    """What this family adds to the model's recorded config."""
    return {}
