"""Pretrain a tiny Stable Diffusion on the shapes world, on CPU, and save it in diffusers layout.

Not a paper section: it makes the embedded default model `models/tiny-shapes-sd` (what `Discffusion.from_pretrained`
and `StableDiffusionPipeline.from_pretrained` load). Three stock parts, trained in two stages:
  1. VAE (AutoencoderKL with one block, so no downsampling: 32x32x3 image <-> 4x32x32 latent): reconstruction MSE +
     a small KL term; the latent scaling factor is set so that scaled latents have unit std, as in SD. The latent
     stays at full resolution: a pixel-space-sized 32x32 model with a real (small) VAE in front.
  2. Text encoder (CLIPTextModel, 2 layers, 64 wide; its tokenizer pads on the left, see `shapes_tokenizer`) and
     UNet (UNet2DConditionModel, 32/64/64 channels: no attention at 32x32, cross-attention at 16x16, 8x8 and in the
     8x8 mid block), trained jointly with the standard epsilon-prediction loss || eps - eps_theta(z_t, t, y) ||^2
     under a DDPMScheduler (1000 steps), 10% empty captions, AdamW, batch 32, 767 steps, lr 2e-3 (docs/results.md gives
     the measured losses and run time).
Deterministic for a given --seed and --threads.

`--family sd3` pretrains a tiny SD3 (MMDiT) on the same world instead, to measure what random weights cannot (the
joint-attention reading and the real-token rule of families/sd3.py, docs/models.md): the VAE of an SD folder
(--vae-from, the committed one by default; 4 latent channels, no shift), two 32-wide CLIP text encoders with
projections and a 64-wide T5 encoder (16 tokens each), an SD3Transformer2DModel (4 joint blocks, 2 heads of 32, patch
2: 256 image tokens) trained jointly with the encoders under SD3's flow-matching loss || (eps - z) - v(z_t, sigma) ||^2,
sigma logit-normal (SD3's training density), each text encoder dropped (zeros) independently with p 0.3 as SD3's
training drops them; scheduler FlowMatchEulerDiscrete with shift 1 (SD3's at 256 image tokens).

    python -m tools.pretrain_shapes --out models/tiny-shapes-sd
    python -m tools.pretrain_shapes --family sd3 --out runs/tiny-shapes-sd3 --images 8000 --steps 600 --grid ""
"""
import math
import os
import random
import tempfile
import sys
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from tools.cli import ArgumentParser, number, positive_int, run_cli
from families.loading import load_components
from benchmarks import shapes
from tools.mmdit_configs import save_pipeline, write_t5_tokenizer
from tools.sd_configs import SCHEDULER, save_sd, write_tokenizer

MAX_TOKENS = 16  # bos + 'a red circle left of a blue square' + eos fits in 10

VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,), layers_per_block=1,
           down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
           norm_num_groups=8, sample_size=32, mid_block_add_attention=False)
TEXT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=MAX_TOKENS)
UNET = dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=2, cross_attention_dim=64, norm_num_groups=8)  # attention_head_dim = heads per layer


def log(msg, t0=[time.time()]):
    print(f"[{time.time() - t0[0]:7.1f}s] {msg}", flush=True)


def lr_at(step, steps, lr, warmup=50):
    """Linear warm-up, then cosine decay to lr/10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def to_tensor(images):
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(vae, x, steps, batch, lr, kl_weight, g):
    """Reconstruction MSE + kl_weight * KL, on images x (N, 3, H, W) in [-1, 1]."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        xb = x[torch.randint(0, len(x), (batch,), generator=g)]
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)  # (B, 4, 32, 32)
        rec = vae.decode(z).sample                                           # (B, 3, 32, 32)
        mse, kl = F.mse_loss(rec, xb), post.kl().mean() / z[0].numel()
        (mse + kl_weight * kl).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step:4d}  mse {mse.item():.4f}  kl/dim {kl.item():.2f}")
    return vae


@torch.no_grad()
def encode(vae, x, batch=256):
    """Latent means (N, 4, 32, 32), unscaled."""
    return torch.cat([vae.encode(x[i:i + batch]).latent_dist.mean for i in range(0, len(x), batch)])


def shapes_tokenizer(folder, words):
    """`sd_configs.write_tokenizer` with an order of merges in which every word is one token, padding on the left.

    A word's merges are only reached if no earlier word's merge splits it first ('ri' of 'right' breaks 'triangle'),
    so longer words go first, then seeded shuffles until every word encodes as one token.
    Left padding: in the causal text encoder, right-hand padding tokens attend to the whole caption, so every pad
    carries a summary of the sentence that competes with the caption's own tokens for the UNet's cross-attention
    (eq. 3-4 pools attention on the caption's tokens only); left-hand pads see only earlier pads and stay the same
    for every caption. The setting is saved with the tokenizer, so every loader pads the same way."""
    order = sorted(words, key=lambda w: (-len(w), w))
    for attempt in range(100):
        tok = write_tokenizer(folder, order, MAX_TOKENS)
        tok.padding_side = "left"
        if all(len(tok(w).input_ids) == 3 for w in words):  # BOS, word, EOS
            return tok
        random.Random(attempt).shuffle(order)
    raise RuntimeError(f"no merge order makes every word of {words} one token")


def tokenize(tok, texts):
    return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids  # (N, MAX_TOKENS)


def run_steps(params, steps, lr, n, batch, g, name, loss_of):
    """AdamW over `params` for `steps` steps with lr_at's schedule and gradients clipped at 1: each step draws `batch`
    of the n images and one of their two captions, loss_of(idx (B,), which (B,)) -> the loss; a running mean of it is
    logged every 50 steps."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    avg = None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        idx = torch.randint(0, n, (batch,), generator=g)
        which = torch.randint(0, 2, (batch,), generator=g)
        loss = loss_of(idx, which)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"{name} step {step:5d}  loss {avg:.4f}  lr {opt.param_groups[0]['lr']:.2e}")


def train_diffusion(unet, text_encoder, sched, z, ids, empty_ids, steps, batch, lr, p_empty, g):
    """Epsilon-prediction loss on scaled latents z (N, 4, 32, 32); ids (N, 2, L): two true captions per image."""
    def loss_of(idx, which):
        y = ids[idx, which]                                                   # (B, L)
        y[torch.rand(batch, generator=g) < p_empty] = empty_ids
        z0 = z[idx]
        eps = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        zt = sched.add_noise(z0, eps, t)
        cond = text_encoder(y).last_hidden_state                             # (B, L, 64)
        return F.mse_loss(unet(zt, t, cond).sample, eps)
    run_steps(list(unet.parameters()) + list(text_encoder.parameters()), steps, lr, len(z), batch, g, "diffusion",
              loss_of)
    return unet, text_encoder


GRID_CAPTIONS = ("a red circle left of a blue square", "a blue square left of a red circle",
                 "a green triangle above a yellow circle", "a yellow circle above a green triangle",
                 "a yellow square right of a red triangle", "a blue circle below a green square", "")


@torch.no_grad()
def sample(folder, captions, n=6, steps=50, guidance=4.0, seed=0):
    """DDIM sampling with classifier-free guidance from a saved model: images (len(captions), n, H, W, 3) uint8."""
    from diffusers import DDIMScheduler
    parts = load_components(folder, torch.float32)
    tok, text_encoder, vae, unet = (parts[k] for k in ("tokenizer", "text_encoder", "vae", "unet"))  # eval mode
    sched = DDIMScheduler.from_config(parts["scheduler"].config)
    sched.set_timesteps(steps)
    cond = text_encoder(tokenize(tok, list(captions))).last_hidden_state.repeat_interleave(n, 0)  # (C*n, L, D)
    uncond = text_encoder(tokenize(tok, [""])).last_hidden_state.expand_as(cond)
    size = unet.config.sample_size
    z = torch.randn((len(captions) * n, unet.config.in_channels, size, size),
                    generator=torch.Generator().manual_seed(seed))                   # (C*n, 4, 32, 32)
    for t in sched.timesteps:
        e_c, e_u = unet(torch.cat([z, z]), t, torch.cat([cond, uncond])).sample.chunk(2)
        z = sched.step(e_u + guidance * (e_c - e_u), t, z).prev_sample
    x = vae.decode(z / vae.config.scaling_factor).sample                             # (C*n, 3, 32, 32)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return x.reshape(len(captions), n, *x.shape[1:])


def draw_grid(images, captions, path, scale=3):
    """One row per caption: the caption, then its samples, each `scale` times larger."""
    from PIL import Image, ImageDraw
    rows, n, h, w, _ = images.shape
    label = 260
    grid = Image.new("RGB", (label + n * (w * scale + 4), rows * (h * scale + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for r in range(rows):
        y = r * (h * scale + 4)
        draw.text((6, y + h * scale // 2 - 6), captions[r] or '"" (unconditional)', fill="black")
        for c in range(n):
            tile = Image.fromarray(images[r, c]).resize((w * scale, h * scale), Image.NEAREST)
            grid.paste(tile, (label + c * (w * scale + 4), y + 2))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)


SD3_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=MAX_TOKENS, projection_dim=32)
SD3_T5 = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
              feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True)
SD3_TRANSFORMER = dict(sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
                       num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=64,
                       pooled_projection_dim=64, pos_embed_max_size=16)


def sd3_text(encoders, ids, drop):
    """families/sd3.encode_texts with gradients, on token ids (3 x (B, L)): [CLIP-L; CLIP-G] penultimate states padded
    to T5's width, then T5's -> (B, 2L, 64), pooled (B, 64); drop (3, B) bool zeroes an encoder's part."""
    outs = [e(i, output_hidden_states=True) for e, i in zip(encoders[:2], ids[:2])]
    keep = [(~d).float()[:, None, None] for d in drop]
    t5 = encoders[2](ids[2])[0] * keep[2]                                               # (B, L, 64)
    clip = torch.cat([o.hidden_states[-2] * k for o, k in zip(outs, keep)], dim=-1)     # (B, L, 64)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    pooled = torch.cat([o.text_embeds * k[:, 0] for o, k in zip(outs, keep)], dim=-1)  # (B, 64)
    return torch.cat([clip, t5], dim=1), pooled


def train_sd3(transformer, encoders, z, ids, steps, batch, lr, p_drop, g):
    """SD3's flow-matching loss on latents z (N, 4, 32, 32); ids: 3 x (N, 2, L), two true captions per image."""
    def loss_of(idx, which):
        hidden, pooled = sd3_text(encoders, [i[idx, which] for i in ids], torch.rand(3, batch, generator=g) < p_drop)
        z0, eps = z[idx], torch.randn(z[idx].shape, generator=g)
        sigma = torch.randn(batch, generator=g).sigmoid()                                 # logit-normal
        zt = (1 - sigma[:, None, None, None]) * z0 + sigma[:, None, None, None] * eps
        v = transformer(hidden_states=zt, timestep=sigma * 1000, encoder_hidden_states=hidden,
                        pooled_projections=pooled).sample
        return F.mse_loss(v, eps - z0)
    run_steps(list(transformer.parameters()) + [q for e in encoders for q in e.parameters()], steps, lr, len(z), batch,
              g, "flow", loss_of)


def pretrain_sd3(a, images, captions, g):
    """--family sd3: the tiny SD3 of the module docstring, saved in StableDiffusion3Pipeline's layout."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel
    vae = AutoencoderKL.from_pretrained(a.vae_from, subfolder="vae").eval().requires_grad_(False)
    z = encode(vae, to_tensor(images)) * vae.config.scaling_factor                  # (N, 4, 32, 32)
    log(f"latents {tuple(z.shape)} from {a.vae_from}")
    toks = [shapes_tokenizer(os.path.join(a.out, k), shapes.words()) for k in ("tokenizer", "tokenizer_2")]
    for k, t in zip(("tokenizer", "tokenizer_2"), toks):
        t.save_pretrained(os.path.join(a.out, k))                                   # with its left padding
    toks.append(write_t5_tokenizer(os.path.join(a.out, "tokenizer_3"), shapes.words(), MAX_TOKENS))
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(t), bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
        **SD3_TEXT, hidden_act=act)) for t, act in zip(toks, ("quick_gelu", "gelu"))]
    encoders.append(T5EncoderModel(T5Config(**SD3_T5, vocab_size=len(toks[2]), pad_token_id=0, eos_token_id=1,
                                            decoder_start_token_id=0)))
    transformer = SD3Transformer2DModel(**SD3_TRANSFORMER)
    flat = [c for pair in captions for c in pair]
    ids = [tokenize(t, flat).view(len(captions), 2, -1) for t in toks]                 # 3 x (N, 2, L)
    log(f"transformer {sum(q.numel() for q in transformer.parameters()) / 1e6:.2f}M, text encoders "
        f"{sum(q.numel() for e in encoders for q in e.parameters()) / 1e6:.2f}M parameters")
    train_sd3(transformer.train(), [e.train() for e in encoders], z, ids, a.steps, a.batch, a.lr, 0.3, g)
    parts = dict(text_encoder=encoders[0].eval(), text_encoder_2=encoders[1].eval(), text_encoder_3=encoders[2].eval(),
                 vae=vae, transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0))
    save_pipeline(a.out, "StableDiffusion3Pipeline", parts, {
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"], "image_encoder": [None, None],
        "feature_extractor": [None, None]})
    log(f"saved {a.out}")


def build_parser():
    p = ArgumentParser(prog="python -m tools.pretrain_shapes", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/tiny-shapes-sd",
                   help="default %(default)s (the committed one: models/tiny-shapes-sd)")
    p.add_argument("--seed", type=number(int, low=0), default=0)
    p.add_argument("--family", choices=("sd", "sd3"), default="sd", help="sd: the UNet model (default); sd3: a tiny "
                   "SD3 (MMDiT) on the VAE of --vae-from (module docstring)")
    p.add_argument("--vae-from", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                       "models", "tiny-shapes-sd"),
                   help="--family sd3: the SD folder whose VAE it uses (default the committed models/tiny-shapes-sd)")
    p.add_argument("--images", type=positive_int, default=20000, help="training images (drawn once, encoded once)")
    p.add_argument("--vae-steps", type=positive_int, default=400)
    p.add_argument("--vae-batch", type=positive_int, default=32)
    p.add_argument("--vae-lr", type=number(above=0, high=10), default=2e-3)
    p.add_argument("--kl-weight", type=number(low=0), default=1e-3,
                   help="per latent dimension, relative to the per-pixel MSE")
    p.add_argument("--steps", type=positive_int, default=767)
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--lr", type=number(above=0, high=10), default=2e-3)
    p.add_argument("--p-empty", type=number(low=0, high=1), default=0.1,
                   help="fraction of empty captions (for the unconditional)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads (fixed, for a reproducible model)")
    p.add_argument("--grid", default="runs/shapes_grid.png", help="where to draw samples of the saved model ('': none) "
                   "(default %(default)s)")
    p.add_argument("--grid-only", action="store_true", help="only draw the grid from the model in --out")
    return p


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if a.grid and os.path.splitext(a.grid)[1].lower() not in (".png", ".jpg", ".jpeg"):
        p.error(f"--grid {a.grid}: the grid is an image file: name it .png or .jpg")
    t_start = time.time()
    torch.set_num_threads(a.threads)
    if a.grid_only:
        draw_grid(sample(a.out, GRID_CAPTIONS, seed=a.seed), GRID_CAPTIONS, a.grid)
        return log(f"wrote {a.grid}")
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)

    log(f"drawing {a.images} training images")
    images, captions = shapes.training_pairs(a.images, seed=10_000 + a.seed)
    if a.family == "sd3":
        pretrain_sd3(a, images, captions, g)
        return log(f"done in {(time.time() - t_start) / 60:.1f} min")
    x = to_tensor(images)                                                    # (N, 3, 32, 32)

    vae = train_vae(AutoencoderKL(**VAE), x, a.vae_steps, a.vae_batch, a.vae_lr, a.kl_weight, g).eval()
    mu = encode(vae, x)                                                      # (N, 4, 32, 32)
    vae.register_to_config(scaling_factor=float(1 / mu.std()))
    z = mu * vae.config.scaling_factor
    log(f"latents {tuple(z.shape)}, scaling factor {vae.config.scaling_factor:.4f}")
    vae.requires_grad_(False)

    tok = shapes_tokenizer(tempfile.mkdtemp(), shapes.words())
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **TEXT))
    unet = UNet2DConditionModel(**UNET)
    sched = DDPMScheduler(**SCHEDULER)
    ids = tokenize(tok, [c for pair in captions for c in pair]).view(len(captions), 2, -1)  # (N, 2, L)
    empty_ids = tokenize(tok, [""])[0]
    log(f"unet {sum(q.numel() for q in unet.parameters()) / 1e6:.2f}M, "
        f"text encoder {sum(q.numel() for q in text_encoder.parameters()) / 1e6:.2f}M, "
        f"vae {sum(q.numel() for q in vae.parameters()) / 1e6:.2f}M parameters")
    unet.train()
    text_encoder.train()
    train_diffusion(unet, text_encoder, sched, z, ids, empty_ids, a.steps, a.batch, a.lr, a.p_empty, g)
    save_sd(a.out, unet.eval(), vae, text_encoder.eval(), sched, tok)
    log(f"saved {a.out}")
    if a.grid:
        draw_grid(sample(a.out, GRID_CAPTIONS, seed=a.seed), GRID_CAPTIONS, a.grid)
        log(f"wrote {a.grid}")
    log(f"done in {(time.time() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(run_cli(main))
