"""SD3 and SD3.5 (MMDiT): three text encoders, joint attention, flow matching, as StableDiffusion3Pipeline has them.

    hidden = encode_texts(model, ids, texts)   # (M, L_clip + L_t5, D + P): the joint text sequence, pooled alongside
    z_t, ts = add_noise(model, z, eps, timestep(model, level));  v = denoise(model, z_t, ts, hidden, record)

Text: CLIP-L's and CLIP-G's penultimate states concatenated on the feature axis and zero-padded to T5's width, then
T5's last states appended on the token axis (77 + 256 tokens for real; `max_sequence_length`, the pipeline's default
256); the pooled projection is both CLIPs' text_embeds, riding along the feature axis as in families/sdxl.py. Each
caption word appears once in each half; the real-token mask covers CLIP's caption tokens (without BOS / EOS / padding)
by default, measured on two tiny SD3s pretrained on the shapes world (docs/models.md: never below both halves in 8
comparisons, ahead by 3 to 10 points in 6); `text_tokens` "both" or "t5" (T5's without "</s>" / padding) otherwise.
Noise: a level l is the fraction of the training schedule, t = round(l * T), as for the UNets; the scheduler's own
table (with SD3's shift 3.0) makes it sigma = shift * s / (1 + (shift - 1) * s), s = t / T, and the timestep the
pipeline passes, sigma * T; z_t = (1 - sigma) z + sigma eps as FlowMatchEulerDiscreteScheduler.scale_noise computes
it; the transformer predicts the flow eps - z (the `target`). The capture reads A on every block's joint attention
(families/joint_capture.py); eq. 5's p^k, p^v sit on the text stream's add_k_proj / add_v_proj. SD3.5's query / key
RMS norms and MMDiT-X blocks (a second, image-only self-attention, attn2, not captured) are inside the stock
transformer.
"""
import torch
import torch.nn.functional as F

from families.joint_capture import JointCaptureProcessor

NAME = "sd3"
LORA_PIPELINE = "StableDiffusion3Pipeline"  # whose loader reads a LoRA into the transformer (loading.load_lora)
PARTS = ("tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3")
OFFLOAD = True  # T5-XXL (4.76 B) leaves the GPU before the transformer runs (Discffusion.offload)
MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default T5 length
TEXT_TOKENS = ("clip", "both", "t5")  # whose caption tokens are the real ones (--text-tokens; the first: default)


def matches(config):
    return "caption_projection_dim" in config  # SD3Transformer2DModel's config


def components(load, read, dtype, vae_dtype=None):
    """Three tokenizers and text encoders, the 16-channel VAE, the transformer (as `unet`: the core's denoiser) and
    the flow-matching scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast
    return dict(tokenizer=load(CLIPTokenizer, "tokenizer"), tokenizer_2=load(CLIPTokenizer, "tokenizer_2"),
                tokenizer_3=load(T5TokenizerFast, "tokenizer_3"),
                text_encoder=load(CLIPTextModelWithProjection, "text_encoder", dtype=dtype),
                text_encoder_2=load(CLIPTextModelWithProjection, "text_encoder_2", dtype=dtype),
                text_encoder_3=load(T5EncoderModel, "text_encoder_3", dtype=dtype),
                vae=load(AutoencoderKL, "vae", torch_dtype=vae_dtype or dtype),
                unet=load(SD3Transformer2DModel, "transformer", torch_dtype=dtype),
                scheduler=load(FlowMatchEulerDiscreteScheduler, "scheduler"))


def capture_kwargs(transformer):
    """Every block's joint attention (transformer_blocks.i.attn, in order), its processor and eq. 5's projections."""
    names = [k[: -len(".processor")] for k in transformer.attn_processors if k.endswith(".attn.processor")]
    names.sort(key=lambda n: int(n.split(".")[1]))
    return dict(all_layers=names, processor=JointCaptureProcessor, proj=("add_k_proj", "add_v_proj"))


def t5_tokens(model, texts):
    tok = model.tokenizer_3
    return tok(list(texts), padding="max_length", max_length=model.max_sequence_length or MAX_SEQUENCE_LENGTH,
               truncation=True, add_special_tokens=True, return_tensors="pt")


@torch.no_grad()
def encode_texts(model, ids, texts):
    """ids (M, 77) of the first tokenizer -> (M, 77 + L_t5, D + P) (StableDiffusion3Pipeline.encode_prompt, clip_skip
    None)."""
    dev = model.text_encoder.device
    out_1 = model.text_encoder(ids.to(dev), output_hidden_states=True)
    out_2 = model.text_encoder_2(model.tokenize(model.tokenizer_2, texts).input_ids.to(dev), output_hidden_states=True)
    t5 = model.text_encoder_3(t5_tokens(model, texts).input_ids.to(dev))[0]         # (M, L_t5, D)
    clip = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)   # (M, 77, D1 + D2)
    clip = F.pad(clip.to(t5.dtype), (0, t5.shape[-1] - clip.shape[-1]))           # (M, 77, D)
    hidden = torch.cat([clip, t5], dim=1)                                           # (M, L, D)
    pooled = torch.cat([out_1.text_embeds, out_2.text_embeds], dim=-1)              # (M, P)
    return torch.cat([hidden, pooled[:, None].expand(-1, hidden.shape[1], -1).to(hidden.dtype)], dim=-1)


def text_mask(model, mask, texts):
    """CLIP's real-token mask (M, 77) -> the joint sequence's (M, 77 + L_t5): T5's tokens without "</s>" and padding;
    model.text_tokens: CLIP's only (default, measured: docs/models.md), both halves' or T5's only."""
    tok = t5_tokens(model, texts)
    t5 = tok.attention_mask.bool() & (tok.input_ids != model.tokenizer_3.eos_token_id)  # (M, L_t5)
    rule = model.text_tokens or TEXT_TOKENS[0]
    return torch.cat([mask & (rule != "t5"), t5.to(mask.device) & (rule != "clip")], dim=1)


def unet_kwargs(model, hidden):
    """hidden (R, L, D + P) -> encoder_hidden_states (R, L, D), pooled_projections (R, P)."""
    D = model.unet.config.joint_attention_dim
    return dict(encoder_hidden_states=hidden[..., :D], pooled_projections=hidden[:, 0, D:])


def denoise(model, z_t, ts, hidden, record):
    """One transformer call with the capture's record (joint_attention_kwargs) -> the flow prediction (R, 16, h, w)."""
    return model.unet(hidden_states=z_t, timestep=ts, **unet_kwargs(model, hidden),
                      joint_attention_kwargs={"record": record}).sample


def timestep(model, level):
    """Level l -> the timestep the pipeline passes, sigma * T: the scheduler's table at t = round(l * T), with its
    shift (FlowMatchEulerDiscreteScheduler.__init__'s formula, in float64 as it computes it)."""
    cfg = model.scheduler.config
    T = cfg.num_train_timesteps
    s = min(max(int(round(level * T)), 1), T) / T
    sigma = cfg.shift * s / (1 + (cfg.shift - 1) * s)
    return float(torch.tensor(sigma * T, dtype=torch.float32))


def add_noise(model, latents, eps, t):
    """z_t = (1 - sigma) z + sigma eps, sigma = t / T, for latents (P, 16, h, w) -> z_t and the timesteps (P,)."""
    sigma = t / model.scheduler.config.num_train_timesteps
    eps = eps.to(latents.device, latents.dtype).expand_as(latents)
    ts = torch.full((latents.shape[0],), t, dtype=torch.float32, device=latents.device)
    return sigma * eps + (1.0 - sigma) * latents, ts


def target(model, latents, eps, ts):
    """The flow the transformer predicts for z_t = add_noise(latents, eps, t): eps - z, (R, 16, h, w)."""
    return eps.to(latents.device, latents.dtype).expand_as(latents) - latents


def config(model):
    return dict(max_sequence_length=model.max_sequence_length or MAX_SEQUENCE_LENGTH, reading=model.capture.reading,
                text_tokens=model.text_tokens or TEXT_TOKENS[0])
