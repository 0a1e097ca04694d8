"""§4.2 Discriminative Stable Diffusion (Discffusion): image-text matching scores from Stable Diffusion, Alg. 1.

    z   = E(x)                       VAE latent mean times the scaling factor, once per image
    r_y = tau(y)                     text encoder hidden states, once per text; real-token mask = the caption's tokens
    z_t = sqrt(a_t) z + sqrt(1-a_t) eps,   t = round(l * T),  l in {0.2, 0.4, 0.6, 0.8}   (noise-level ensemble, §5.6)
    f(y, x) = mean over levels of  mean over layers of  sum over heads w_h * Ave_j S(A)_j     (eq. 3-4, §4.4)

For one image every candidate text sees the same eps and t, so differences between candidates come from the text
alone; eps depends only on the seed and the level, so a pair's score never depends on its batch-mates. All pairs of
a call go through the UNet together, `pairs_per_call` at a time; in a training step too, also in backward
(`CachedScores`, gradient caching), so its memory is bounded by `pairs_per_call`, not by the candidates.

    model = Discffusion.from_pretrained("stabilityai/stable-diffusion-2-1-base")   # or a local diffusers folder
    scores = model.score(images, texts)                                            # (len(images), len(texts))
"""
import functools
import os
import warnings

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import prompt_delta
from attention_capture import AttentionScorer
from common import InputError, default_device, pair_index, resolve_dtype, split_scores

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
LEVELS = (0.2, 0.4, 0.6, 0.8)


def to_rgb(image):
    """Any PIL mode (RGB, RGBA, LA, L, P, CMYK, I;16, ...) -> RGB; transparency composited on white."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 256).clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def preprocess(images, resolution, resize_via=None):
    """PIL images -> (N, 3, R, R) in [-1, 1]. resize_via=224 reproduces the paper's 224-then-512 setting (Table 2)."""
    out = []
    for image in images:
        image = to_rgb(image)
        if resize_via:
            image = image.resize((resize_via, resize_via), Image.BICUBIC)
        image = image.resize((resolution, resolution), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    return torch.stack(out)


def load_components(model, dtype):
    """tokenizer, text encoder, VAE, UNet, scheduler from a hub id or a local folder in diffusers layout."""
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if os.path.isdir(model):
        missing = [s for s in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
                   if not os.path.isdir(os.path.join(model, s))]
        if missing:
            raise InputError(f"model folder {model} is not in diffusers layout: no {', '.join(m + '/' for m in missing)}"
                             " (expected model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    elif os.path.exists(model) or model.count("/") != 1 or model.startswith((".", "/")):
        raise InputError(f"model {model!r} is neither a local diffusers folder nor a hub id like {DEFAULT_MODEL!r}")
    try:
        return dict(
            tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype),
            vae=AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype),
            unet=UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype),
            scheduler=DDPMScheduler.from_pretrained(model, subfolder="scheduler"))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"could not load model {model!r}: {first}") from None


class CachedScores(torch.autograd.Function):
    """Gradient caching (Gao et al. 2021, "Scaling deep contrastive learning batch size under memory limited setup"):
    a training step's memory is bounded by the chunk size, not by the number of candidates, and its gradients equal
    those of one pass over all rows.

    forward: the scores of all R rows without a graph, `step` rows per call of rows(start, stop).
    backward(dL/dscore (R,), the grad scaler's scale included): per chunk, re-score with a graph and backpropagate that
    chunk's dL/dscore at once into the trainable `params` (a chunk's recompute and its backward are paired, as
    gradient checkpointing needs: it re-runs the processors with the scorer's current token mask). The recompute
    runs under the forward's autocast state, as torch.utils.checkpoint does."""

    @staticmethod
    def forward(ctx, rows, n, step, device_type, *params):
        ctx.rows, ctx.n, ctx.step, ctx.params = rows, n, step, params
        ctx.autocast = dict(device_type=device_type, enabled=torch.is_autocast_enabled(device_type),
                            dtype=torch.get_autocast_dtype(device_type))
        return torch.cat([rows(s, s + step) for s in range(0, n, step)])                  # (R,)

    @staticmethod
    def backward(ctx, grad):                                                                # grad (R,)
        total = [None] * len(ctx.params)
        for s in range(0, ctx.n, ctx.step):
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                out = ctx.rows(s, s + ctx.step)                                             # (step,)
            got = torch.autograd.grad(out, ctx.params, grad[s:s + ctx.step].to(out.dtype), allow_unused=True)
            total = [g if t is None else t if g is None else t + g for t, g in zip(total, got)]
        return (None, None, None, None, *total)


class Discffusion(nn.Module):
    def __init__(self, tokenizer, text_encoder, vae, unet, scheduler, levels=LEVELS, lam=1.0, pooling="lse",
                 layers="all", pairs_per_call=16, resolution=None, resize_via=None, seed=0, keep_maps=False, name=""):
        super().__init__()
        self.tokenizer, self.text_encoder, self.vae, self.unet, self.scheduler = (
            tokenizer, text_encoder, vae, unet, scheduler)
        for m in (text_encoder, vae, unet):
            m.requires_grad_(False).eval()
        self.levels = tuple(float(l) for l in levels)
        if not self.levels or not all(0 < l <= 1 for l in self.levels):
            raise InputError(f"noise levels {levels}: each must be in (0, 1]")
        self.scorer = AttentionScorer(unet, layers, pooling, lam, keep_maps)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = int(resolution or unet.config.sample_size * self.vae_scale)
        self.resize_via, self.pairs_per_call, self.seed, self.name = resize_via, int(pairs_per_call), int(seed), name
        self._warned_truncation = False
        self.config = dict(model=name, levels=list(self.levels), lam=float(lam), pooling=pooling,
                           layers=layers if isinstance(layers, (str, int)) else list(layers),
                           n_layers=len(self.scorer.layers), pairs_per_call=self.pairs_per_call,
                           resolution=self.resolution, resize_via=resize_via, seed=self.seed)

    @classmethod
    def from_pretrained(cls, model=DEFAULT_MODEL, device=None, dtype=None, **options):
        device = default_device(device)
        dtype = resolve_dtype(dtype, device)
        parts = load_components(str(model), dtype)
        try:
            return cls(**parts, name=str(model), **options).to(device)
        except ValueError as e:
            raise InputError(str(e)) from None

    @property
    def device(self):
        return self.unet.device

    @property
    def dtype(self):
        return self.unet.dtype

    # ---- encoders: once per image, once per text --------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images):
        """PIL images -> VAE latent means times the scaling factor, (N, 4, h, w)."""
        x = preprocess(images, self.resolution, self.resize_via)               # (N, 3, R, R)
        out = []
        for chunk in x.split(self.pairs_per_call):
            dist = self.vae.encode(chunk.to(self.device, self.vae.dtype)).latent_dist
            out.append(dist.mean * self.vae.config.scaling_factor)             # (b, 4, h, w)
        return torch.cat(out).to(self.dtype)

    @torch.no_grad()
    def encode_texts(self, texts):
        """texts -> hidden states (M, L, D) and the real-token mask (M, L): caption tokens only, no BOS/EOS/padding."""
        tok = self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        if not self._warned_truncation:
            full = self.tokenizer(list(texts), truncation=False, verbose=False).input_ids
            longest = max(len(ids) for ids in full)
            if longest > self.tokenizer.model_max_length:
                warnings.warn(f"captions longer than {self.tokenizer.model_max_length} tokens are truncated "
                              f"(longest: {longest}); warned once per run", stacklevel=2)
                self._warned_truncation = True
        am = tok.attention_mask.bool()                                         # (M, L) BOS + caption + EOS
        count = am.cumsum(1)                                                   # 1 at BOS, padding on either side
        mask = am & (count > 1) & (count < am.sum(1, keepdim=True))            # (M, L) without BOS and EOS
        hidden = self.text_encoder(tok.input_ids.to(self.device))[0]          # (M, L, D)
        return hidden.to(self.dtype), mask.to(self.device)

    # ---- noise: one draw per level, shared by every pair ------------------------------------------------------
    def timestep(self, level):
        T = self.scheduler.config.num_train_timesteps
        return min(int(round(level * T)), T - 1)

    def level_noise(self, shape):
        """eps for each ensemble level, (n_levels, *shape), a function of the seed alone."""
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn((len(self.levels), *shape), generator=g)

    def add_noise(self, latents, eps, t):
        """z_t for latents (P, 4, h, w), eps broadcastable to them, integer timestep t."""
        ts = torch.full((latents.shape[0],), t, dtype=torch.long, device=latents.device)
        eps = eps.to(latents.device, latents.dtype).expand_as(latents)
        return self.scheduler.add_noise(latents, eps, ts), ts

    def target(self, latents, eps, ts):
        """What the UNet predicts for z_t = add_noise(latents, eps, ts): eps, or for a v-prediction model (SD 2.1-768)
        the velocity sqrt(a_t) eps - sqrt(1 - a_t) z; (R, 4, h, w). Every denoising loss and error uses it."""
        eps = eps.to(latents.device, latents.dtype).expand_as(latents)
        pred = self.scheduler.config.prediction_type
        if pred == "v_prediction":
            return self.scheduler.get_velocity(latents, eps, ts)
        if pred != "epsilon":
            raise InputError(f"scheduler prediction_type {pred!r}: a denoising target needs 'epsilon' or "
                             "'v_prediction'")
        return eps

    # ---- the score --------------------------------------------------------------------------------------------
    def attention_score(self, z_t, ts, hidden, mask):
        """UNet passes over R rows, pairs_per_call at a time -> attention score (R,), noise prediction (R, 4, h, w).

        With gradients, one pass: gradient checkpointing re-runs the processors in backward with the scorer's current
        token mask, which must be this pass's (a training step bounds its memory with `CachedScores` instead)."""
        step = z_t.shape[0] if torch.is_grad_enabled() else self.pairs_per_call
        att, pred = [], []
        for s in range(0, z_t.shape[0], step):
            self.scorer.begin(mask[s:s + step])
            pred.append(self.unet(z_t[s:s + step], ts[s:s + step], encoder_hidden_states=hidden[s:s + step]).sample)
            att.append(self.scorer.combine())
        return torch.cat(att), torch.cat(pred)

    def rows_score(self, z_t, ts, hidden, mask, start, stop):
        """The attention score (stop - start,) of rows start:stop (CachedScores' unit of work)."""
        return self.attention_score(z_t[start:stop], ts[start:stop], hidden[start:stop], mask[start:stop])[0]

    def pair_scores(self, latents, hidden, mask, levels=None, noise=None):
        """f(y, x) for P pairs: latents (P, 4, h, w), hidden (P, L, D), mask (P, L) -> (P,) float32.

        levels: the noise levels to average (default the ensemble); noise: eps per level (n_levels, 4, h, w),
        default the seed's draw. Differentiable (for training) unless called under no_grad/inference_mode; with more
        rows than pairs_per_call the trainable tensors get their gradients by `CachedScores`, pairs_per_call rows per
        UNet pass also in backward (one chunk: one plain pass).
        """
        levels = self.levels if levels is None else tuple(levels)
        if noise is None:
            noise = self.level_noise(latents.shape[1:])
            noise = noise[[self.levels.index(l) for l in levels]] if levels != self.levels else noise
        params = [p for p in self.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
        total = 0.0
        for level, eps in zip(levels, noise):
            z_t, ts = self.add_noise(latents, eps, self.timestep(level))
            rows = functools.partial(self.rows_score, z_t, ts, hidden, mask)          # rows(start, stop) -> (n,)
            if params and z_t.shape[0] > self.pairs_per_call:                         # more rows than one chunk
                total = total + CachedScores.apply(rows, z_t.shape[0], self.pairs_per_call, self.device.type, *params)
            else:
                total = total + rows(0, z_t.shape[0])
        return (total / len(levels)).float()

    def score_items(self, items, train=False, generator=None):
        """Score matrices for several matching problems at once.

        items: [(images, texts), ...] -> [Tensor (len(images), len(texts)), ...]. With train=True one level is drawn
        from the ensemble and one eps from `generator`, shared by every pair of the call (a positive and its
        negatives see the same noise), and gradients flow to the trainable tensors.
        """
        images = [im for ims, _ in items for im in ims]
        texts = [t for _, ts in items for t in ts]
        latents = self.encode_images(images)                                   # (N, 4, h, w)
        hidden, mask = self.encode_texts(texts)                                # (M, L, D), (M, L)
        shapes = [(len(ims), len(ts)) for ims, ts in items]
        img_idx, txt_idx = pair_index(shapes)
        args = (latents[img_idx], hidden[txt_idx], mask[txt_idx])
        if train:
            k = int(torch.randint(len(self.levels), (1,), generator=generator))
            eps = torch.randn((1, *latents.shape[1:]), generator=generator)
            flat = self.pair_scores(*args, levels=[self.levels[k]], noise=eps)
        else:
            with torch.inference_mode():
                flat = self.pair_scores(*args)
        return split_scores(flat if train else flat.cpu(), shapes)

    # ---- the few-shot prompts of §4.5 (the uniform interface train.py / evaluate.py drive for every method) ----
    def trainable_parameters(self):
        """p^k, p^v of every selected layer and the head-weight logits; attaches zero deltas on first use."""
        return self.scorer.add_deltas(self.unet)

    def save_trained(self, path, training_args=None):
        self.trainable_parameters()
        prompt_delta.save(path, self.scorer, self.name, training_args)

    def load_trained(self, path):
        self.trainable_parameters()
        return prompt_delta.load(path, self.scorer)

    def score(self, images, texts):
        """Scores (len(images), len(texts)), higher = better match; deterministic for a given seed."""
        return self.score_items([(list(images), list(texts))])[0]
