"""The methods of §5 built from one set of options, for both CLIs: Discffusion (§4), DiffusionITM (Krojer et al.
2023) and the CLIP baselines of §5.3; the one table of defaults and the one rule that resolves an option.

An option's value is, in this order: the command line's; else the --preset's (`PRESETS`: `official` sets every
scoring choice of the public code at once); else the value recorded in the checkpoint being loaded (the lambda and
pooling its deltas were learned under, its training --shots, the --lora and --guidance-scale of its model); else the
data set's default (`DEFAULTS`, e.g. the embedded shapes world); else the generic default.

    model = methods.build("discffusion", args, checkpoint="runs/comvg/prompt_deltas.safetensors")
"""
import argparse
import os

import prompt_delta
from baselines.clip_baselines import ClipMatcher
from baselines.diffusion_itm import DiffusionITM
from common import DTYPES, InputError, meta_value, read_checkpoint
from tools.cli import MAX_SIZE, image_size, number, positive, positive_int
from discffusion import DEFAULT_MODEL, LEVELS, Discffusion
from families import flux, lcm, sd3
from families.joint_capture import READINGS

METHODS = ("discffusion", "diffusion_itm", "clip", "clip_ft", "clip_prompt")  # clip: zero-shot, the plain cosine
CLIP_MODEL = "openai/clip-vit-base-patch32"
TINY_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "tiny-shapes-sd")

# generic defaults, then per data set. The embedded shapes world (tools/shapes.py + models/tiny-shapes-sd): 60 training
# items, 300 steps, a larger learning rate for the tiny model, a sharper LogSumExp (attention probabilities lie in
# [0, 1], so at lambda 1 eq. 3 is within a constant of mean pooling over the image tokens; lambda 100 is close to max
# pooling: see docs/results.md), and DiffusionITM beside it with 50 timesteps (cheap on the tiny model).
DEFAULTS = {
    None: dict(model=DEFAULT_MODEL, shots="0.05", lr=1e-4, compare="", lam=1.0, pooling="lse", itm_timesteps=10,
               layers="all", itm_variant="itm", uncond_attention=False),
    "shapes": dict(model=TINY_MODEL, shots="60", steps=300, lr=3e-3, lam=100.0, itm_timesteps=50,
                   compare="diffusion_itm"),
    # the suites' embedded instances (benchmarks/embedded.py): the tiny model, 10 DiffusionITM timesteps (minutes)
    "embedded": dict(model=TINY_MODEL, lam=100.0, itm_timesteps=10),
}


# --preset official: the public code's score (eric-ai-lab/DSD, dsd_infer.py defaults) except its batch-averaging bug:
# the official pooling on its six layers, the attention term averaged over its [uncond, cond] batch, plus the
# DiffusionITM term, at t = 989 - 33 k. Its trained tensors are LoRA (diffusion_itm's), as the public code's.
PRESETS = {"paper": {}, "official": dict(pooling="official", layers="official", itm_variant="combined",
                                         uncond_attention=True, itm_timesteps="official")}


def option(args, key, recorded=None):
    """The value of option `key`: command line, else the --preset's, else `recorded` (a checkpoint's), else the
    data set's, else generic."""
    preset = PRESETS.get(getattr(args, "preset", None) or "paper", {})
    own = getattr(args, "defaults", None) or getattr(args, "dataset", None)   # "embedded" for a suite's shapes world
    for value in (getattr(args, key, None), preset.get(key), (recorded or {}).get(key),
                  DEFAULTS.get(own, {}).get(key), DEFAULTS[None].get(key)):
        if value is not None:
            return value
    return None


def recorded_options(checkpoint, meta=None):
    """The options a checkpoint was trained with (its scorer's lambda and pooling first); {} without a checkpoint.
    meta: its header, if already read."""
    if not checkpoint:
        return {}
    meta = meta or read_checkpoint(checkpoint, tensors=False)[0]
    parts = [meta_value(checkpoint, {key: {}, **meta}, key, dict, "a dict") for key in ("training_args", "scorer")]
    recorded = {**parts[0], **parts[1]}
    for key, parse in RECORDED_RULES.items():  # a recorded value obeys the rule of its command-line option
        if recorded.get(key) is not None:
            try:
                recorded[key] = parse(str(recorded[key]))
            except argparse.ArgumentTypeError as e:
                raise InputError(f"checkpoint {checkpoint}: its recorded {key}: {e}") from None
    return recorded


def _choice(*names):
    def parse(text):
        if text not in names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(names)}, got {text!r}")
        return text
    return parse


def build(method, args, checkpoint=None):
    """The model of one method from the CLI options, with its learned tensors when a checkpoint is given."""
    meta = read_checkpoint(checkpoint, tensors=False)[0] if checkpoint else {}
    recorded = recorded_options(checkpoint, meta)
    shared = dict(device=args.device, dtype=args.precision, seed=args.seed)
    if method in ("clip", "clip_ft", "clip_prompt"):
        model = ClipMatcher.from_pretrained(args.clip_model or CLIP_MODEL, method=method, **shared)
    else:
        opts = dict(layers=option(args, "layers"), resolution=args.resolution, resize_via=args.resize_via,
                    pairs_per_call=args.pairs_per_call, lam=option(args, "lam", recorded),
                    pooling=option(args, "pooling", recorded), lora=option(args, "lora", recorded),
                    guidance_scale=option(args, "guidance_scale", recorded), reading=option(args, "reading", recorded),
                    max_sequence_length=option(args, "max_sequence_length", recorded),
                    offload=getattr(args, "offload", None), text_tokens=option(args, "text_tokens", recorded))
        model_id = option(args, "model")
        units = dict(draws=getattr(args, "draws", None), adaptive=getattr(args, "adaptive", None))
        if method == "discffusion" and getattr(args, "preset", None) != "official":
            model = Discffusion.from_pretrained(model_id, levels=args.levels, **shared, **opts, **units)
        else:  # DiffusionITM, or the official code's Discffusion score (attention + DiffusionITM term)
            model = DiffusionITM.from_pretrained(model_id, variant=option(args, "itm_variant"),
                                                 n_timesteps=option(args, "itm_timesteps", recorded),
                                                 uncond_attention=option(args, "uncond_attention"), **shared, **opts,
                                                 **units)
    if meta.get("format") == prompt_delta.FORMAT and isinstance(model, DiffusionITM):
        model.core.load_trained(checkpoint)  # p^k, p^v scored the official way
    elif checkpoint:
        model.load_trained(checkpoint)
    return model


def model_folders(args):
    """The local model folders a run reads, as `common.check_apart` inputs: nothing is written anywhere under them."""
    return [(m, f"{flag} folder", "tree") for m, flag in ((option(args, "model"), "--model"),
                                                          (getattr(args, "clip_model", None), "--clip-model"))
            if m and os.path.isdir(m)]


# ---- the options both CLIs share, spelled the same way --------------------------------------------------------------

def _levels(text):
    try:
        levels = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.2,0.4,0.6,0.8, got {text!r}")
    if not all(0 < x <= 1 for x in levels):  # also refuses nan
        raise argparse.ArgumentTypeError(f"each noise level must be in (0, 1], got {text}")
    return levels


def _layers(text):
    if text in ("all", "official"):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    if "attn2" in text:
        return [n.strip() for n in text.split(",") if n.strip()]
    raise argparse.ArgumentTypeError(f"expected 'all', 'official', a positive number of last layers or comma-separated "
                                     f"attn2 names, got {text!r}")


def _schedule(text):
    """"4:5,16:1" -> [(4, 5), (16, 1)]: every candidate gets 4 evaluations, the best 5 go on to 16 (the last keep
    only names how many are ranked: it may be left out, "4:5,16")."""
    try:
        stages = [tuple(int(x) for x in part.split(":")) for part in text.split(",")]
    except ValueError:
        stages = None
    if not stages or any(len(s) != 2 or min(s) < 1 for s in stages[:-1]) or len(stages[-1]) not in (1, 2) or min(
            stages[-1]) < 1:
        raise argparse.ArgumentTypeError(f"expected EVALS:KEEP,...,EVALS[:KEEP] with positive numbers, like 4:5,16:1, "
                                         f"got {text!r}")
    out = [(e, k) for e, k in stages[:-1]] + [(stages[-1][0], stages[-1][1] if len(stages[-1]) == 2 else None)]
    if [e for e, _ in out] != sorted({e for e, _ in out}):
        raise argparse.ArgumentTypeError(f"the evaluations must increase from stage to stage, got {text!r}")
    return out


def _timesteps(text):
    if text == "official" or (text.startswith("grid:") and text[5:].isdigit() and int(text[5:]) > 0):
        return text
    return positive_int(text)


# the recorded options `option` takes from a checkpoint, checked as the command line checks them
POOLINGS = ("lse", "max", "mean", "cosine", "official")
RECORDED_RULES = {"lam": positive, "pooling": _choice(*POOLINGS), "itm_timesteps": _timesteps}


def add_model_args(p):
    """The model and scorer options of train.py and evaluate.py."""
    p.add_argument("--model", help=f"hub id or local diffusers folder (default {DEFAULT_MODEL}; for --dataset shapes "
                                   "the committed models/tiny-shapes-sd)")
    p.add_argument("--lora", help="a LoRA merged into the UNet before scoring or training: a .safetensors file, a "
                                  "folder or a hub id (e.g. latent-consistency/lcm-lora-sdv1-5 on SD 1.5)")
    p.add_argument("--guidance-scale", type=positive, help=f"LCM models (a UNet with time_cond_proj_dim): the "
                   f"guidance scale w whose embedding conditions the UNet (default {lcm.GUIDANCE}, the LCM pipeline's);"
                   f" Flux.1-dev: its guidance embedding (default {flux.GUIDANCE}, FluxPipeline's)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--precision", "--dtype", dest="precision", choices=tuple(DTYPES),
                   help="weights and activations (default fp16 on CUDA, fp32 on CPU); learned tensors stay fp32; "
                        "training: autocast, and fp16 scales the loss (GradScaler). bf16 on A100/H100, fp16 on V100")
    p.add_argument("--seed", type=number(int, low=0), default=0, help="split, data order, noise and negative sampling")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: the cores not already busy, from "
                   "the load average, at least 1); few-shot training's rounding, so its numbers, depend on it")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction,
                   help="text encoders on the CPU except while they encode, the denoiser on the CPU meanwhile, so the "
                        "GPU holds the larger of the two, not their sum (default: on with CUDA for the T5 families "
                        "SD3, SD3.5, Flux, PixArt; --no-offload keeps everything on the GPU: faster where it fits, "
                        "docs/models.md)")
    p.add_argument("--pairs-per-call", "--eval-batch-size", dest="pairs_per_call", type=positive_int, default=16,
                   help="image-text pairs per UNet call, in evaluation and in a training step's forward and backward "
                        "(scores and gradients do not depend on it; memory does); --eval-batch-size is its old name")
    g = p.add_argument_group("scorer (Discffusion.from_pretrained)")
    g.add_argument("--preset", "--score", dest="preset", choices=tuple(PRESETS), default="paper",
                   help="paper (default): the paper's score with the options below; official: every scoring choice of "
                        "the public code at once (official pooling, --layers official, --uncond-attention, "
                        "--itm-variant combined, --itm-timesteps official; see docs/official_code.md), options given still win; "
                        "--score is its old name"),
    g.add_argument("--pooling", choices=POOLINGS,
                   help="eq. 3 LogSumExp (default) or a Fig. 5 variant; official = the public code's pooling "
                        "(with --checkpoint: default the checkpoint's own)")
    g.add_argument("--lam", type=positive, help="LogSumExp lambda of eq. 3 (default 1; 100 for the shapes world; "
                                                "with --checkpoint: default the checkpoint's own)")
    g.add_argument("--layers", type=_layers, help="'all' (default), K = the last K cross-attention layers, 'official' "
                                                  "(the public code's six) or comma-separated attn2 names")
    g.add_argument("--levels", type=_levels, default=LEVELS, help="noise levels, comma-separated (default "
                   + ",".join(map(str, LEVELS)) + ")")
    g.add_argument("--draws", type=positive_int,
                   help="independent eps per noise level (DiffusionITM: per timestep): the ensemble is levels x draws "
                        "units, each a UNet row per pair, all shared by an item's candidates (default 1; with "
                        "--adaptive: as many as its last stage needs)")
    g.add_argument("--adaptive", type=_schedule, metavar="EVALS:KEEP,...",
                   help="adaptive candidate elimination for items with one image and >2 texts or one text and >2 "
                        "images (Diffusion Classifier's): e.g. 4:5,16:1 = every candidate gets 4 units, the best 5 go "
                        "on to 16; the others rank below them (docs/budget.md)")
    g.add_argument("--resolution", type=image_size(8), help="input resolution in pixels, a multiple of 8 up to "
                                                            f"{MAX_SIZE} (default: the model's native size)")
    g.add_argument("--reading", choices=READINGS,
                   help="SD3 / Flux (joint attention): A as the softmax over the text keys alone (text, default) or "
                        "the text columns of the joint softmax over image and text keys (joint)")
    g.add_argument("--text-tokens", choices=sd3.TEXT_TOKENS,
                   help="SD3 / SD3.5: the caption's real tokens in the joint text sequence [CLIP-L+G (77); T5]: "
                        "CLIP's (default: measured on pretrained tiny SD3s, docs/models.md), both halves' or T5's")
    g.add_argument("--max-sequence-length", type=positive_int,
                   help="SD3 / Flux: T5 tokens of the text sequence (default the pipeline's: 256 SD3, 512 Flux; 256 "
                        "for FLUX.1-schnell)")
    g.add_argument("--resize-via", type=image_size(),
                   help=f"resize to this size first, 1 to {MAX_SIZE} pixels (224: the paper's Table 2 setting)")
    b = p.add_argument_group("baselines (§5.3, Table 8)")
    b.add_argument("--clip-model", default=CLIP_MODEL,
                   help=f"CLIP checkpoint for clip (zero-shot) / clip_ft / clip_prompt ({CLIP_MODEL})")
    b.add_argument("--itm-variant", choices=("itm", "classifier", "combined"),
                   help="diffusion_itm: normalised (itm), Diffusion Classifier (classifier), or the official code's "
                        "attention + itm sum (combined); default itm")
    b.add_argument("--itm-timesteps", type=_timesteps, help="diffusion_itm: timesteps spread over [10, 990) (default "
                                                            "10; 50 for the shapes world), 'official': 989 - 33 k, or "
                                                            "'grid:S': DiffusionITM's range(10, 990, 1000 // S)")
    b.add_argument("--uncond-attention", action="store_true", default=None,
                   help="combined: the attention term is the mean of the text's and the empty prompt's (the public "
                        "code's [uncond, cond] batch)")
