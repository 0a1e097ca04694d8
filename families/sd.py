"""SD 1.x / 2.x: one CLIP text encoder's last hidden states are the UNet's encoder_hidden_states (§4.2); DDPM noise.

    hidden = encode_texts(model, ids, texts)   # (M, L, D)
    kw = unet_kwargs(model, hidden)            # {"encoder_hidden_states": (R, L, D)}
    z_t, ts = add_noise(model, z, eps, timestep(model, level));  pred = denoise(model, z_t, ts, hidden, record)

Epsilon or v-prediction (SD 2.1-768), conv or linear projections, upcast_attention: all of it inside the stock UNet and
scheduler, so this family needs nothing else. LCM (families/lcm.py) shares its text conditioning.
"""
import torch

from common import InputError

NAME = "sd"
LORA_PIPELINE = "StableDiffusionPipeline"  # whose LoraLoaderMixin classmethods read a LoRA for this UNet
PARTS = ()  # components beyond tokenizer, text_encoder, vae, unet, scheduler
OFFLOAD = False  # the text encoders stay on the GPU (Discffusion.offload: the default on CUDA for T5 families)


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
    return model.text_encoder(ids.to(model.text_encoder.device))[0]


def unet_kwargs(model, hidden):
    """hidden (R, L, D) -> the UNet's conditioning for R rows."""
    return dict(encoder_hidden_states=hidden)


def config(model):
    """What this family adds to the model's recorded config."""
    return {}


def capture_kwargs(unet):
    """AttentionCapture's layers, processor and eq. 5 projections for this denoiser: {} = the UNet's attn2 layers."""
    return {}


def text_mask(model, mask, texts):
    """The real-token mask over the denoiser's text sequence, from the first tokenizer's (M, L): the same here."""
    return mask


def denoise(model, z_t, ts, hidden, record):
    """One UNet call with the capture's record -> the prediction (R, 4, h, w)."""
    return model.unet(z_t, ts, **model.unet_kwargs(hidden), cross_attention_kwargs={"record": record}).sample


def timestep(model, level):
    """Noise level l in (0, 1] -> the integer timestep round(l * T), at most T - 1."""
    T = model.scheduler.config.num_train_timesteps
    return min(int(round(level * T)), T - 1)


def add_noise(model, latents, eps, t):
    """z_t = sqrt(a_t) z + sqrt(1 - a_t) eps (the scheduler's add_noise) for latents (P, 4, h, w), eps broadcastable
    to them, integer timestep t -> z_t and the timesteps (P,)."""
    ts = torch.full((latents.shape[0],), t, dtype=torch.long, device=latents.device)
    eps = eps.to(latents.device, latents.dtype).expand_as(latents)
    return model.scheduler.add_noise(latents, eps, ts), ts


def target(model, latents, eps, ts):
    """What the UNet predicts for z_t = add_noise(latents, eps, ts): eps, or for a v-prediction model (SD 2.1-768)
    the velocity sqrt(a_t) eps - sqrt(1 - a_t) z; (R, 4, h, w)."""
    eps = eps.to(latents.device, latents.dtype).expand_as(latents)
    pred = model.scheduler.config.prediction_type
    if pred == "v_prediction":
        return model.scheduler.get_velocity(latents, eps, ts)
    if pred != "epsilon":
        raise InputError(f"scheduler prediction_type {pred!r}: a denoising target needs 'epsilon' or "
                         "'v_prediction'")
    return eps
