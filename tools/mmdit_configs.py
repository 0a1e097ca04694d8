"""SD3 / SD3.5 and Flux (MMDiT) architectures built from configs, with random weights, saved in diffusers layout.

    make_random_mmdit("tiny-sd3", folder)      # then Discffusion.from_pretrained(folder), offline
    make_random_flux("tiny-flux", folder)
    make_random_pixart(folder)                 # PixArt-Sigma: a DiT with cross-attention, T5

Not a paper section: the scaffolding of tools/sd_configs.py for the joint-attention families (families/sd3.py). A
tiny SD3 is three tiny text encoders (CLIP-L and CLIP-G with projections, and a T5 encoder), a 16-channel VAE with a
shift_factor, an SD3Transformer2DModel and a FlowMatchEulerDiscreteScheduler with SD3's shift 3.0, in the layout of
`StableDiffusion3Pipeline`. The CLIP tokenizers are sd_configs' hand-made BPE ones; the T5 tokenizer is a `tokenizers`
Unigram model with a Metaspace pre-tokenizer and "</s>" appended, as T5's SentencePiece one is, wrapped in
T5TokenizerFast. Presets: tiny-sd3 (SD3-medium's topology), tiny-sd35 (SD3.5: RMS query / key norms, MMDiT-X blocks
with a second, image-only self-attention); tiny-flux, tiny-flux-schnell (Flux.1-dev with the guidance embedding and
the dynamic shift, schnell without either: a CLIP-L and a T5 encoder, dual- and single-stream blocks); sd3-medium,
sd35-medium, sd35-large, flux-dev: the real transformers' configs (parameter counts on the meta device).
"""
import json
import os
import sys

import torch

from tools.cli import ArgumentParser, number, run_cli
from tools.sd_configs import WORDS, write_tokenizer

_TINY = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
             pos_embed_max_size=8)
_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=16, projection_dim=16, hidden_act="quick_gelu")
_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
           feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True)

PRESETS = {
    # stabilityai/stable-diffusion-3-medium-diffusers: 24 joint blocks (the last one context_pre_only), no qk norm
    "tiny-sd3": dict(transformer=_TINY, text=_CLIP, text_2=dict(_CLIP, hidden_act="gelu"), t5=_T5),
    # stabilityai/stable-diffusion-3.5-medium: RMS norms on q, k (both streams), MMDiT-X (attn2) in the first blocks
    "tiny-sd35": dict(transformer=dict(_TINY, qk_norm="rms_norm", dual_attention_layers=(0,)), text=_CLIP,
                      text_2=dict(_CLIP, hidden_act="gelu"), t5=_T5),
    # the real transformers (config.json of each hub repository)
    "sd3-medium": dict(transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                        caption_projection_dim=1536, pooled_projection_dim=2048,
                                        pos_embed_max_size=192)),
    "sd35-medium": dict(transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                         caption_projection_dim=1536, pooled_projection_dim=2048,
                                         pos_embed_max_size=384, qk_norm="rms_norm",
                                         dual_attention_layers=tuple(range(13)))),
    "sd35-large": dict(transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                                        attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                                        caption_projection_dim=2432, pooled_projection_dim=2048,
                                        pos_embed_max_size=192, qk_norm="rms_norm")),
    # black-forest-labs/FLUX.1-dev: 19 dual-stream + 38 single-stream blocks, guidance embedding, rotary (16, 56, 56);
    # FLUX.1-schnell: the same without guidance_embeds, a static shift (1.0) instead of the dynamic one
    "tiny-flux": dict(flux=dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                                guidance_embeds=True, axes_dims_rope=(2, 2, 4)),
                      text=dict(_CLIP, projection_dim=16), t5=_T5),
    "tiny-flux-schnell": dict(flux=dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(2, 2, 4)),
                              text=dict(_CLIP, projection_dim=16), t5=_T5,
                              scheduler=dict(use_dynamic_shifting=False, shift=1.0)),
    "flux-dev": dict(flux=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                               attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                               pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
}
# FluxPipeline's scheduler (FLUX.1-dev's scheduler_config.json): dynamic shifting over 256 .. 4096 image tokens
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)


def write_t5_tokenizer(folder, words=WORDS, max_length=512):
    """A T5TokenizerFast: Unigram over "▁word" pieces (the words of `words`) with single letters as the fallback,
    Metaspace pre-tokenizer, "</s>" appended (T5's post-processor); ids <pad> 0, </s> 1, <unk> 2 as in T5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -5.0)]
    vocab += [("▁" + w, -1.0) for w in words] + [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
                           model_max_length=max_length)
    fast.save_pretrained(folder)
    return fast


def calibrate_latents(vae, size=32):
    """shift_factor and scaling_factor so latents of colour images have zero mean and unit std (SD3's VAE: 0.0609,
    1.5305 for real images)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(8, 3, 1, 1, generator=g) * 2 - 1).expand(8, 3, size, size)
    x = x + 0.1 * torch.randn(8, 3, size, size, generator=g)
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    vae.register_to_config(shift_factor=mean.mean().item(), scaling_factor=1.0 / mean.std().item())


def tiny_vae():
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        norm_num_groups=8, sample_size=16, use_quant_conv=False, use_post_quant_conv=False)
    calibrate_latents(vae)
    return vae


def save_pipeline(folder, pipeline, parts, tokenizers):
    """The parts and tokenizers (already written to folder) in diffusers layout with a model_index.json."""
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1", **tokenizers}
    for name, part in parts.items():
        part.save_pretrained(os.path.join(folder, name))
        index[name] = [type(part).__module__.split(".")[0], type(part).__name__]
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return folder


def make_random_flux(preset, folder, seed=0, words=WORDS):
    """A tiny Flux (CLIP-L text encoder, T5, 16-channel VAE, FluxTransformer2DModel) in FluxPipeline's layout."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    cfg = PRESETS[preset]
    torch.manual_seed(seed)
    tok = write_tokenizer(os.path.join(folder, "tokenizer"), words, cfg["text"]["max_position_embeddings"])
    tok_2 = write_t5_tokenizer(os.path.join(folder, "tokenizer_2"), words)
    parts = dict(text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text"], vocab_size=len(tok),
                                                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                           pad_token_id=tok.pad_token_id)),
                 text_encoder_2=T5EncoderModel(T5Config(**cfg["t5"], vocab_size=len(tok_2), pad_token_id=0,
                                                        eos_token_id=1, decoder_start_token_id=0)),
                 vae=tiny_vae(), transformer=FluxTransformer2DModel(**cfg["flux"]),
                 scheduler=FlowMatchEulerDiscreteScheduler(**dict(FLUX_SCHEDULER, **cfg.get("scheduler", {}))))
    return save_pipeline(folder, "FluxPipeline", parts, {"tokenizer": ["transformers", "CLIPTokenizer"],
                                                         "tokenizer_2": ["transformers", "T5TokenizerFast"]})


def make_random_mmdit(preset, folder, seed=0, words=WORDS):
    """Build the preset with random weights (seeded) and save it in StableDiffusion3Pipeline's layout; -> folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    cfg = PRESETS[preset]
    torch.manual_seed(seed)
    parts = {}
    for i, key in enumerate(("text", "text_2")):
        sub = "" if i == 0 else "_2"
        tok = write_tokenizer(os.path.join(folder, "tokenizer" + sub), words, cfg[key]["max_position_embeddings"],
                              "<|endoftext|>" if i == 0 else "!")
        parts["text_encoder" + sub] = CLIPTextModelWithProjection(CLIPTextConfig(
            **cfg[key], vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id))
    tok_3 = write_t5_tokenizer(os.path.join(folder, "tokenizer_3"), words)
    parts["text_encoder_3"] = T5EncoderModel(T5Config(**cfg["t5"], vocab_size=len(tok_3), pad_token_id=0,
                                                      eos_token_id=1, decoder_start_token_id=0))
    parts.update(vae=tiny_vae(), transformer=SD3Transformer2DModel(**cfg["transformer"]),
                 scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return save_pipeline(folder, "StableDiffusion3Pipeline", parts, {
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"], "image_encoder": [None, None],
        "feature_extractor": [None, None]})


def make_random_pixart(folder, seed=0, words=WORDS):
    """A tiny PixArt-Sigma (T5, 4-channel VAE, PixArtTransformer2DModel with learned variance, DPM-Solver scheduler) in
    PixArtSigmaPipeline's layout."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel
    from tools.sd_configs import PRESETS as SD_PRESETS, calibrate_latent_scale
    torch.manual_seed(seed)
    tok = write_t5_tokenizer(os.path.join(folder, "tokenizer"), words)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, **SD_PRESETS["tiny"]["vae"])
    calibrate_latent_scale(vae)
    parts = dict(text_encoder=T5EncoderModel(T5Config(**_T5, vocab_size=len(tok), pad_token_id=0, eos_token_id=1,
                                                      decoder_start_token_id=0)),
                 vae=vae, transformer=PixArtTransformer2DModel(
                     num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                     cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=32,
                     use_additional_conditions=False, interpolation_scale=1),
                 scheduler=DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear"))
    return save_pipeline(folder, "PixArtSigmaPipeline", parts, {"tokenizer": ["transformers", "T5TokenizerFast"]})


def main(argv=None):
    tiny = [k for k in PRESETS if k.startswith("tiny-")] + ["tiny-pixart"]
    p = ArgumentParser(prog="python -m tools.mmdit_configs", description=__doc__.splitlines()[0])
    p.add_argument("preset", choices=tiny, help="the architecture (module docstring); the real-size presets are "
                                                "configs only (parameter counts), not written")
    p.add_argument("--out", help="the diffusers folder to write (default runs/random-PRESET)")
    p.add_argument("--seed", type=number(int, low=0), default=0, help="the random weights")
    a = p.parse_args(argv)
    out = a.out or os.path.join("runs", "random-" + a.preset)
    if a.preset == "tiny-pixart":
        make_random_pixart(out, a.seed)
    elif "flux" in a.preset:
        make_random_flux(a.preset, out, a.seed)
    else:
        make_random_mmdit(a.preset, out, a.seed)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
