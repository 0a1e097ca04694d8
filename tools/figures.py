"""Pictures of one model, the paper's Fig. 7, 8 and 10: each a PNG plus a JSON of the numbers behind it.

  Fig. 10  `attention`  averaged cross-attention maps: one heat map per caption token over the image (mean over heads,
                        cross-attention layers and the noise levels of the ensemble; also per layer group down / mid /
                        up), before and after the learned p^k, p^v (eq. 5), with the pair's score f(y, x) (eq. 3-4).
  Fig. 8   `deltas`     the learned prompt weights p^k, p^v: histogram of their entries (log count) and their norm per
                        layer (also relative to W^k, W^v when the base model's UNet is on disk).
  Fig. 7   `curves`     training loss and training accuracy per step from train.py's results.json, several runs on one
                        plot.

    python -m tools.figures                             # = `all`: the defaults below, into docs/
    python -m tools.figures attention [--model M] [--checkpoint F] [--image P --text T [--text T2 ...]] [--out docs/]
    python -m tools.figures deltas RUN/prompt_deltas.safetensors
    python -m tools.figures curves RUN1/results.json RUN2/results.json

Defaults: the committed tiny model (models/tiny-shapes-sd) on held-out items of the shapes world (the test split of
`train.py --dataset shapes`), each item's true caption and its swapped caption (the caption of the ComVG negative
image's scene: one of subject / object / relation changed) on the item's positive image; the deltas and results.json
of runs/shapes (written by `python train.py --dataset shapes`). Maps are plain means over heads (the learned head
weights enter the score, not the picture).
"""
import argparse
import ast
import json
import os
import pathlib
import re
import sys
import textwrap
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

import common  # noqa: E402
import datasets  # noqa: E402
import methods  # noqa: E402
from discffusion import Discffusion, to_rgb  # noqa: E402
from benchmarks import shapes  # noqa: E402
from tools import cli  # noqa: E402

TINY_MODEL = methods.TINY_MODEL
SHAPES_RUN = os.path.join("runs", "shapes")
DEFAULT_DELTAS = os.path.join(SHAPES_RUN, "prompt_deltas.safetensors")
DEFAULT_RESULTS = os.path.join(SHAPES_RUN, "results.json")
GROUPS = ("down_blocks", "mid_block", "up_blocks")
GROUP_LABEL = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up", "all": "all layers"}
CMAP = "inferno"
DPI = 100


def shapes_split(seed=0):
    """(train, test) items of the shapes world, the split of `train.py --dataset shapes` (same shots and seed)."""
    items, _ = datasets.load_items("shapes", os.path.join("data", "shapes"))
    return datasets.split_items(items, methods.DEFAULTS["shapes"]["shots"], seed)


# ---- Fig. 10: cross-attention maps -----------------------------------------------------------------------------------

def to_grid(amap, size):
    """Maps over a square layer's image tokens (..., N_img) -> (..., size, size), bilinear; token i = row i // w,
    column i % w of the layer's (h, w) grid, as the UNet flattens it."""
    n = amap.shape[-1]
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"{n} image tokens do not form a square grid")
    x = amap.reshape(-1, 1, side, side).float()                                 # (M, 1, h, w)
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.reshape(*amap.shape[:-1], size, size)                               # (..., size, size)


def token_words(model, texts, mask):
    """The real tokens of each text as words (tokenizer pieces, `</w>` stripped), in mask order."""
    out = []
    for ids, m in zip(model.tokenize(model.tokenizer, texts).input_ids.tolist(), mask.cpu().tolist()):
        pieces = model.tokenizer.convert_ids_to_tokens([i for i, keep in zip(ids, m) if keep])
        out.append([p.replace("</w>", "") for p in pieces])
    return out


@torch.no_grad()
def layer_maps(model, jobs):
    """jobs [(PIL image, [texts])]: per-layer maps averaged over heads and noise levels, and the pair scores.

    -> ({layer: (P, N_img, L)}, scores (P,), mask (P, L)), one row per (image, text) pair, jobs in order. Each image's
    texts see the model's own eps and t per level, and a pair's score does not depend on its batch-mates, so the mean
    of the per-level scores is model.score([image], texts)."""
    texts = [t for _, ts in jobs for t in ts]
    latents = model.encode_images([im for im, _ in jobs])                       # (n_images, 4, h, w)
    hidden, mask = model.encode_texts(texts)                                     # (P, L, D), (P, L)
    if not mask.any(1).all():
        empty = [t for t, m in zip(texts, mask.any(1).tolist()) if not m]
        raise common.InputError(f"caption(s) {empty} have no tokens once tokenized")
    img_idx, _ = common.pair_index([(1, len(ts)) for _, ts in jobs])             # pair p = text p, on image img_idx[p]
    noise = model.level_noise(latents.shape[1:])                                 # (n_levels, 4, h, w)
    P, step = len(texts), model.pairs_per_call
    sums, score = {}, torch.zeros(P)
    for level, eps in zip(model.levels, noise):
        for s in range(0, P, step):
            z_t, ts = model.add_noise(latents[img_idx[s:s + step]], eps, model.timestep(level))
            maps = {}
            sc, _ = model.unet_pass(z_t, ts, hidden[s:s + step], mask[s:s + step], maps)   # (b,)
            score[s:s + step] += sc.float().cpu()
            for name, A in maps.items():                                         # (b, heads, N_img, L)
                if name not in sums:
                    sums[name] = torch.zeros(P, *A.shape[2:])                    # (P, N_img, L)
                sums[name][s:s + step] += A.float().mean(1).cpu()
    n = len(model.levels)
    return {k: v / n for k, v in sums.items()}, score / n, mask.cpu()


def word_maps(model, jobs):
    """Per job, per text: {text, words, score, maps: {all | down_blocks | mid_block | up_blocks: (n_words, G, G)}},
    on the grid G of the finest cross-attention layer; layers are averaged with equal weight."""
    per_layer, scores, mask = layer_maps(model, jobs)
    grid = max(int(round(m.shape[1] ** 0.5)) for m in per_layer.values())
    on_grid = {k: to_grid(m.transpose(1, 2), grid) for k, m in per_layer.items()}  # (P, L, G, G)
    groups = {"all": list(on_grid), **{g: [k for k in on_grid if k.split(".")[0] == g] for g in GROUPS}}
    means = {g: torch.stack([on_grid[k] for k in names]).mean(0) for g, names in groups.items() if names}
    texts = [t for _, ts in jobs for t in ts]
    words = token_words(model, texts, mask)
    flat = [dict(text=t, words=words[p], score=float(scores[p]),
                 maps={g: m[p][mask[p]] for g, m in means.items()})                # (n_words, G, G)
            for p, t in enumerate(texts)]
    out, p = [], 0
    for _, ts in jobs:
        out.append(flat[p:p + len(ts)])
        p += len(ts)
    return out


def layer_sides(model):
    """{group: sorted distinct grid sides} of the model's cross-attention layers, from the UNet's structure: the
    latent side, halved (rounding up: a stride-2 convolution with padding 1) by each downsampler before the layer on
    the down path and the mid block; each upsampler before it on the up path goes back one of those sizes."""
    unet = model.unet
    sides = [model.resolution // model.vae_scale]                               # the down path's grid sides
    for block in unet.down_blocks[:-1]:
        sides.append((sides[-1] + 1) // 2 if getattr(block, "downsamplers", None) else sides[-1])

    def side(name):
        part = name.split(".")[0]
        if part == "mid_block":
            return sides[-1]
        k = int(name.split(".")[1])                                             # the block's index on its path
        if part == "down_blocks":
            return sides[k]
        ups = sum(bool(getattr(b, "upsamplers", None)) for b in unet.up_blocks[:k])
        return sides[len(sides) - 1 - ups]
    out = {}
    for name in model.capture.layers:
        out.setdefault(name.split(".")[0], set()).add(side(name))
    return {g: sorted(s, reverse=True) for g, s in out.items()}


def overlay(ax, image, amap, vmax):
    """The colour image in grey with the (G, G) map stretched over it (the model sees the image resized to a square,
    so map cell (r, c) covers the same fraction of the image whatever its aspect)."""
    w, h = image.size
    ax.imshow(np.asarray(image.convert("L")), cmap="gray", vmin=0, vmax=255, extent=(0, w, h, 0))
    im = ax.imshow(amap.numpy(), cmap=CMAP, alpha=0.7, vmin=0, vmax=vmax, extent=(0, w, h, 0),
                   interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def blocks_figsize(ncols, heights):
    """Inches for `ncols` panel columns and blocks of `heights` rows: about 1.5 in a panel, room for titles."""
    return 1.45 * ncols + 1.4, 1.55 * sum(heights) + 0.55 * len(heights) + 0.5


def draw_blocks(blocks, path, title):
    """blocks: [(block title, PIL image, rows)], rows: [(row label, words, maps (n_words, G, G))]: per block a column
    with the image, then one overlay per caption token; one colour scale and colour bar per block."""
    ncols = 1 + max(len(words) for _, _, rows in blocks for _, words, _ in rows)
    heights = [len(rows) for _, _, rows in blocks]
    size = blocks_figsize(ncols, heights)
    fig = plt.figure(figsize=size, layout="constrained", dpi=DPI)
    fig.suptitle(wrap(title, size[0], 12), fontsize=12)
    subs = fig.subfigures(len(blocks), 1, height_ratios=heights) if len(blocks) > 1 else [fig.subfigures(1, 1)]
    for sub, (block_title, image, rows) in zip(subs, blocks):
        sub.suptitle(wrap(block_title, size[0], 11), fontsize=11)
        axes = sub.subplots(len(rows), ncols, squeeze=False)
        vmax = max(float(maps.max()) for _, _, maps in rows)
        for r, (label, words, maps) in enumerate(rows):
            axes[r, 0].imshow(image)
            axes[r, 0].set_xticks([])
            axes[r, 0].set_yticks([])
            axes[r, 0].set_title(label, fontsize=9)
            for c in range(1, ncols):
                if c - 1 < len(words):
                    im = overlay(axes[r, c], image, maps[c - 1], vmax)
                    axes[r, c].set_title(words[c - 1], fontsize=10)
                else:
                    axes[r, c].axis("off")
        sub.colorbar(im, ax=axes, shrink=0.9, label="attention probability\n(mean over heads, layers, noise levels)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def wrap(text, width_in, points):
    """Lines that fit `width_in` inches of `points`-sized text (about 0.55 em a character)."""
    return "\n".join(textwrap.wrap(text, max(20, int(width_in * 72 / (0.55 * points)))))


def rounded(t, digits=4):
    return np.round(t.numpy().astype(np.float64), digits).tolist()


def dump_json(obj, path):
    """Indented JSON with every list of numbers on one line (maps stay readable and small)."""
    text = json.dumps(obj, indent=1)
    text = re.sub(r"\[[-0-9.,eE\s]+\]", lambda m: "[" + ",".join(m.group(0)[1:-1].split()).replace(",,", ",") + "]",
                  text)
    common.atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text + "\n"))


# ---- the shapes world's default items and the "named shape" measure ------------------------------------------------

def neg_caption(item):
    """The caption of the ComVG negative image's scene (meta neg_triplet: a tuple repr or comma-separated)."""
    raw = item.meta["neg_triplet"]
    try:
        scene = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        scene = [p.strip() for p in raw.split(",")]
    return shapes.caption(tuple(scene))


def colour_mask(image, colour, size, tol=90.0):
    """Fraction of each of the (size, size) cells covered by pixels within `tol` (RGB distance) of `colour`."""
    x = np.asarray(image.convert("RGB"), dtype=np.float32)                       # (H, W, 3)
    hit = np.linalg.norm(x - np.asarray(colour, np.float32), axis=-1) < tol     # (H, W)
    t = torch.from_numpy(hit.astype(np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="area")[0, 0]               # (size, size)


def named_shape_shares(item, image, entry):
    """For the true caption 'a C1 S1 REL a C2 S2' on its positive image (two shapes of different colours): per colour /
    shape word, the share of its attention mass on either shape (`on_shapes`) and, of the mass on the two shapes, the
    share on the shape the word names (`on_named`, 0.5 = no preference); None when the colours coincide."""
    subj, _, obj = item.meta["pos_triplet"].split(",")
    (c1, s1), (c2, s2) = subj.split(" "), obj.split(" ")
    words = entry["words"]
    if c1 == c2 or words[1:3] != [c1, s1] or words[-2:] != [c2, s2]:
        return None
    G = entry["maps"]["all"].shape[-1]
    m1, m2 = colour_mask(image, shapes.COLORS[c1], G), colour_mask(image, shapes.COLORS[c2], G)
    out = {}
    for j, own, other in ((1, m1, m2), (2, m1, m2), (len(words) - 2, m2, m1), (len(words) - 1, m2, m1)):
        a = entry["maps"]["all"][j]                                              # (G, G)
        on_own, on_other = float((a * own).sum()), float((a * other).sum())
        out[f"{j}:{words[j]}"] = dict(on_shapes=(on_own + on_other) / float(a.sum()),
                                      on_named=on_own / max(on_own + on_other, 1e-12))
    out["area_shapes"] = float((m1 + m2).mean())
    return out


def summarise_shares(per_item):
    """Means over items of on_shapes / on_named for the colour and the shape words, and the area for reference."""
    rows = [s for s in per_item if s]
    out = {"items": len(rows), "area_shapes": float(np.mean([s["area_shapes"] for s in rows])) if rows else None}
    for kind, pos in (("colour", (0, 2)), ("shape", (1, 3))):
        vals = [list(v for k, v in s.items() if k != "area_shapes")[p] for s in rows for p in pos]
        for key in ("on_shapes", "on_named"):
            out[f"{kind}_{key}"] = float(np.mean([v[key] for v in vals])) if vals else None
    return out


def default_items(test, per_kind=1):
    """The first held-out item of each kind (subject / object / verb swap) whose two shapes differ in colour."""
    chosen = []
    for kind in ("subject", "object", "verb"):
        ok = [it for it in test if it.category == kind and
              len({p.split(" ")[0] for p in it.meta["pos_triplet"].split(",")[::2]}) == 2]
        chosen += ok[:per_kind]
    return chosen


# ---- Fig. 10 driver ----------------------------------------------------------------------------------------------------

def load_image(path):
    if not os.path.isfile(path):
        raise common.InputError(f"image {path} does not exist")
    try:
        with Image.open(path, formats=common.RASTER_FORMATS) as im:
            im.load()
            return to_rgb(im)
    except OSError as e:
        raise common.InputError(f"image {path} is not a readable image ({type(e).__name__})") from None


def scorer_settings(args, checkpoint):
    """lambda and pooling: the command line's, else those the deltas were learned under, else the shapes default for
    the tiny shapes model (lambda 100), else eq. 3's lambda 1."""
    recorded = methods.recorded_options(checkpoint)
    is_tiny = os.path.abspath(args.model) == os.path.abspath(TINY_MODEL)
    opts = argparse.Namespace(lam=args.lam, dataset="shapes" if is_tiny else None)
    return float(methods.option(opts, "lam", recorded)), methods.option(opts, "pooling", recorded)


def load_attention_model(args, checkpoint):
    lam, pooling = scorer_settings(args, checkpoint)
    model = Discffusion.from_pretrained(args.model, device=args.device, keep_maps=True, lam=lam, pooling=pooling,
                                        seed=args.seed, pairs_per_call=args.pairs_per_call)
    cli.needs_unet(model, "tools.figures attention", "a UNet's down / mid / up attn2 layers and one CLIP tokenizer's "
                   "words")
    return model


def stages(model, checkpoint, jobs):
    """jobs: [(PIL image, texts)] -> {"before": [word_maps per job], "after": ... (when a checkpoint is given)}."""
    out = {"before": word_maps(model, jobs)}
    if checkpoint:
        model.load_trained(checkpoint)
        out["after"] = word_maps(model, jobs)
    return out


def stage_label(stage, has_after):
    return {"before": "before deltas" if has_after else "no deltas", "after": "after deltas"}[stage]


def attention_figures(args):
    """Fig. 10 for --image/--text pairs or the shapes world's held-out items; returns the paths written."""
    t0 = time.time()
    checkpoint = args.checkpoint
    if checkpoint is None and args.model == TINY_MODEL and not args.image and os.path.exists(DEFAULT_DELTAS):
        checkpoint = DEFAULT_DELTAS
    model = load_attention_model(args, checkpoint)
    if args.image:
        jobs = [(load_image(p), list(args.text)) for p in args.image]
        meta = [dict(image=p, roles=["given"] * len(args.text), item=None) for p in args.image]
        n_show = len(jobs)
    else:
        _, test = shapes_split(args.seed)
        picked = default_items(test)
        items = picked + [it for it in test if it not in picked] if args.summary else picked
        jobs = [(load_image(it.images[0]), [it.texts[0], neg_caption(it)]) for it in items]
        meta = [dict(image=it.images[0], roles=["true", "swapped"], item=it) for it in items]
        n_show = len(picked)
    res = stages(model, checkpoint, jobs)
    summary = held_out_summary(meta, jobs, res) if not args.image and args.summary else None
    main = os.path.join(args.out, "fig10_attention.png")
    draw_blocks([(block_title(m, res["before"][j]), jobs[j][0], rows_for(res, j, m["roles"]))
                 for j, m in enumerate(meta[:n_show])], main, main_title(model, checkpoint, summary))
    groups, group_rec = os.path.join(args.out, "fig10_groups.png"), group_figure(args, model, jobs, meta, res)
    record = attention_record(args, model, checkpoint, meta[:n_show], res, summary)
    record["seconds"] = group_rec["seconds"] = round(time.time() - t0, 1)
    dump_json(record, os.path.join(args.out, "fig10_attention.json"))
    dump_json(group_rec, os.path.join(args.out, "fig10_groups.json"))
    return [main, os.path.join(args.out, "fig10_attention.json"), groups, os.path.join(args.out, "fig10_groups.json")]


def main_title(model, checkpoint, summary):
    what = "before and after the learned deltas" if checkpoint else "without learned deltas"
    title = (f"Fig. 10: cross-attention per caption token, mean over heads, {len(model.capture.layers)} layers and noise "
             f"levels {list(model.levels)}, {what}; f = score (eq. 3-4, lambda {model.capture.lam:g}).")
    if summary and "after" in summary:
        b, a = summary["before"], summary["after"]
        title += (f" Over {b['items']} held-out items: f(true) > f(swapped) on the positive image "
                  f"{b['true_beats_swapped']:.0%} -> {a['true_beats_swapped']:.0%}; of the colour words' attention on "
                  f"the two shapes, the share on the named one {b['named_shapes']['colour_on_named']:.2f} -> "
                  f"{a['named_shapes']['colour_on_named']:.2f} (shape words "
                  f"{b['named_shapes']['shape_on_named']:.2f} -> {a['named_shapes']['shape_on_named']:.2f}; 0.5 = no "
                  f"preference).")
    return title


def group_figure(args, model, jobs, meta, res):
    """Fig. 10 per layer group: every given (image, text), or the first default item's true caption."""
    sides = layer_sides(model)
    blocks, pairs = [], []
    for j, m in enumerate(meta if args.image else meta[:1]):
        for i, role in enumerate(m["roles"] if args.image else m["roles"][:1]):
            rows, maps = [], {}
            for g in [g for g in GROUPS if g in sides]:
                grid = ", ".join(f"{s}x{s}" for s in sides[g])
                for stage in res:
                    e = res[stage][j][i]
                    rows.append((f"{GROUP_LABEL[g]} ({grid})\n{stage_label(stage, 'after' in res)}", e["words"],
                                 e["maps"][g]))
                    maps.setdefault(stage, {})[g] = rounded(e["maps"][g])
            text = res["before"][j][i]["text"]
            blocks.append((f"{os.path.basename(m['image'])}: {role} caption '{text}'", jobs[j][0], rows))
            pairs.append(dict(image=m["image"], role=role, text=text, words=res["before"][j][i]["words"], maps=maps))
    draw_blocks(blocks, os.path.join(args.out, "fig10_groups.png"),
                "Fig. 10 by layer group (down / mid / up blocks of the UNet; their token grids in brackets), mean over "
                "heads, the group's layers and noise levels; one colour scale per block")
    return dict(figure="Fig. 10 by layer group", grid_sides=sides, groups={g: [n for n in model.capture.layers
                                                                            if n.startswith(g)] for g in sides},
                maps="[stage][group]: (n_words, G, G) attention probability per caption token", pairs=pairs)


def rows_for(res, j, roles):
    """Rows of job j: each text (role) before, then after the deltas, maps averaged over all layers."""
    rows = []
    for i, role in enumerate(roles):
        for stage in res:
            e = res[stage][j][i]
            head = f"{role} caption\n" if role != "given" else ""
            rows.append((f"{head}{stage_label(stage, 'after' in res)}\nf = {e['score']:.4f}", e["words"],
                         e["maps"]["all"]))
    return rows


def block_title(m, entries):
    if m["item"] is None:
        return f"{os.path.basename(m['image'])}"
    it = m["item"]
    t, s = entries[0]["text"], entries[1]["text"]
    return (f"held-out item {it.id} ({it.category} swap), its positive image: true caption '{t}' vs swapped "
            f"caption '{s}' (the negative image's scene)")


def attention_record(args, model, checkpoint, meta, res, summary):
    pairs = []
    for j, m in enumerate(meta):
        for i, role in enumerate(m["roles"]):
            e = res["before"][j][i]
            pairs.append(dict(image=m["image"], item=m["item"].id if m["item"] else None, role=role, text=e["text"],
                              words=e["words"], stages={s: dict(score=res[s][j][i]["score"],
                                                                maps=rounded(res[s][j][i]["maps"]["all"]))
                                                        for s in res}))
    return dict(figure="Fig. 10", model=args.model, checkpoint=checkpoint, lam=model.capture.lam,
                pooling=model.capture.pooling, levels=list(model.levels), seed=args.seed,
                layers=list(model.capture.layers), grid_sides=layer_sides(model),
                maps="(n_words, G, G): attention probability per caption token, mean over heads, noise levels and "
                     "every cross-attention layer, on the finest layer's grid", held_out=summary, pairs=pairs)


def held_out_summary(meta, jobs, res):
    """Over the scored held-out items: how often f(true) > f(swapped) on the positive image, and where the colour /
    shape words' attention lies (named_shape_shares), per stage."""
    out = {}
    for stage, per_job in res.items():
        wins = [e[0]["score"] > e[1]["score"] for e in per_job]
        shares = [named_shape_shares(m["item"], jobs[j][0], per_job[j][0]) for j, m in enumerate(meta)]
        out[stage] = dict(items=len(per_job), true_beats_swapped=float(np.mean(wins)),
                          named_shapes=summarise_shares(shares))
    return out


# ---- Fig. 8: learned prompt weights --------------------------------------------------------------------------------

def short_layer(name):
    """'down_blocks.1.attentions.0.transformer_blocks.0.attn2' -> 'down1.0'; 'mid_block.attentions.0...' -> 'mid.0'."""
    parts = name.split(".")
    nums = [p for p in parts if p.isdigit()]
    group = GROUP_LABEL.get(parts[0], parts[0])
    if parts[0] == "mid_block":
        nums = ["", *nums]
    label = f"{group}{nums[0]}.{nums[1]}" if len(nums) >= 2 else name
    return label + (f".t{nums[2]}" if len(nums) > 2 and nums[2] != "0" else "")


def read_deltas(path):
    """(metadata, layers, {layer: (p^k, p^v, head logits)}) of a prompt_deltas.safetensors file."""
    meta, tensors = common.read_checkpoint(path)
    layers = meta.get("layers") if isinstance(meta.get("layers"), list) else \
        [k[len("delta_k."):] for k in tensors if k.startswith("delta_k.")]
    missing = [n for n in layers if f"delta_k.{n}" not in tensors or f"delta_v.{n}" not in tensors]
    if not layers or missing:
        raise common.InputError(f"{path} is not a prompt-delta file (no delta_k.<layer> / delta_v.<layer> tensors"
                                f"{' for ' + missing[0] if missing else ''})")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise common.InputError(f"{path}: {bad[0]} holds non-finite values (NaN or inf)"
                                + (f", and {len(bad) - 1} more tensors" if len(bad) > 1 else ""))
    return meta, layers, {n: (tensors[f"delta_k.{n}"], tensors[f"delta_v.{n}"], tensors.get(f"head_logits.{n}"))
                          for n in layers}


def base_weights(model, layers):
    """{layer: (W^k, W^v)} from the base model's unet/diffusion_pytorch_model.safetensors, or {} if not on disk."""
    path = os.path.join(str(model or ""), "unet", "diffusion_pytorch_model.safetensors")
    if not model or not os.path.isfile(path):
        return {}
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            if not all(f"{n}.to_k.weight" in keys for n in layers):
                return {}
            return {n: (f.get_tensor(f"{n}.to_k.weight").float(), f.get_tensor(f"{n}.to_v.weight").float())
                    for n in layers}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for a truncated or corrupt file
        raise common.InputError(f"base model weights {path} are not a readable safetensors file "
                                f"({type(e).__name__}: {str(e).strip()[:120]})") from None


def deltas_figure(path, out, model=None, bins=101):
    """Fig. 8 for one deltas file -> (png, json)."""
    meta, layers, d = read_deltas(path)
    model = model or meta.get("base_model")
    W = base_weights(model, layers)
    k_all = torch.cat([d[n][0].flatten() for n in layers])
    v_all = torch.cat([d[n][1].flatten() for n in layers])
    series = [("p_k", k_all), ("p_v", v_all)]
    if W:
        series.append(("W", torch.cat([w.flatten() for pair in W.values() for w in pair])))
    lim = float(torch.cat([x for _, x in series]).abs().max()) or 1.0
    edges = torch.linspace(-lim, lim, bins + 1)
    counts = {name: torch.histc(x, bins=bins, min=-lim, max=lim) for name, x in series}
    per_layer = {n: layer_stats(d[n], W.get(n)) for n in layers}
    record = dict(figure="Fig. 8", file=path, base_model=model, layers=layers,
                  histogram=dict(edges=edges.tolist(), counts={k: c.long().tolist() for k, c in counts.items()}),
                  entries={k: entry_stats(x, W, i) for i, (k, x) in enumerate((("p_k", k_all), ("p_v", v_all)))},
                  per_layer=per_layer)
    png, js = os.path.join(out, "fig8_deltas.png"), os.path.join(out, "fig8_deltas.json")
    draw_deltas(record, edges, counts, png, path)
    cli.write_json(js, record)
    return [png, js]


def layer_stats(tensors, base):
    k, v, logits = tensors
    s = dict(norm_k=float(torch.linalg.norm(k)), norm_v=float(torch.linalg.norm(v)), shape=list(k.shape))
    if base is not None:
        s.update(rel_norm_k=s["norm_k"] / float(torch.linalg.norm(base[0])),
                 rel_norm_v=s["norm_v"] / float(torch.linalg.norm(base[1])))
    if logits is not None:
        s["head_weights"] = logits.softmax(0).tolist()
    return s


def entry_stats(x, W, which):
    a = x.abs().double()
    q = torch.quantile(a[torch.randperm(len(a), generator=torch.Generator().manual_seed(0))[:1_000_000]],
                       torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    s = dict(n=len(x), frac_zero=float((x == 0).double().mean()), mean=float(x.mean()), std=float(x.std()), abs_median=float(q[0]), abs_p90=float(q[1]),
             abs_p99=float(q[2]), abs_max=float(a.max()))
    if W:
        w = torch.cat([pair[which].flatten() for pair in W.values()])
        rms = float(w.pow(2).mean().sqrt())
        s.update(base_rms=rms, frac_below_tenth_base_rms=float((a < 0.1 * rms).double().mean()))
    return s


def draw_deltas(rec, edges, counts, png, run):
    has_rel = all("rel_norm_k" in s for s in rec["per_layer"].values())
    fig, axes = plt.subplots(1, 3 if has_rel else 2, figsize=(16 if has_rel else 12, 4.8), layout="constrained",
                             dpi=DPI)
    centres = ((edges[1:] + edges[:-1]) / 2).numpy()
    for (name, c), colour in zip(counts.items(), ("tab:blue", "tab:orange", "0.5")):
        label = {"p_k": "p^k (added to W^k)", "p_v": "p^v (added to W^v)", "W": "base W^k and W^v, for scale"}[name]
        axes[0].step(centres, c.clamp(min=0.5).numpy(), where="mid", color=colour, label=label,
                     ls="--" if name == "W" else "-")
    axes[0].set_yscale("log")
    axes[0].set_ylim(0.5, 20 * max(float(c.max()) for c in counts.values()))
    axes[0].set(xlabel="entry value (units of the weight matrices)", ylabel="count of entries (log scale)",
                title=f"entries of p^k, p^v, all {len(rec['layers'])} layers")
    axes[0].legend(loc="upper left", fontsize=9)
    names = [short_layer(n) for n in rec["layers"]]
    x = np.arange(len(names))
    panels = [(axes[1], "norm", "Frobenius norm ||p||", "norm of p^k, p^v per layer")]
    if has_rel:
        panels.append((axes[2], "rel_norm", "||p|| / ||W|| (ratio)", "relative to the base W^k, W^v"))
    for ax, key, ylabel, title in panels:
        for off, kv, colour in ((-0.2, "k", "tab:blue"), (0.2, "v", "tab:orange")):
            vals = [rec["per_layer"][n][f"{key}_{kv}"] for n in rec["layers"]]
            ax.bar(x + off, vals, width=0.4, color=colour, label=f"p^{kv}")
            for xi, v in zip(x, vals):
                if v == 0:
                    ax.text(xi + off, 0, "0", ha="center", va="bottom", fontsize=9, color=colour)
        ax.set_xticks(x, names, rotation=45, ha="right")
        ax.set(xlabel="cross-attention layer (execution order)", ylabel=ylabel, title=title)
        ax.legend()
    fig.suptitle(f"Fig. 8: learned prompt weights (eq. 5) of {run}", fontsize=12)
    fig.savefig(png, dpi=DPI)
    plt.close(fig)


# ---- Fig. 7: training curves ---------------------------------------------------------------------------------------

def read_history(path):
    """results.json of train.py -> (results, history [{step, loss, train_acc}])."""
    if not os.path.isfile(path):
        raise common.InputError(f"results file {path} does not exist")
    res = datasets.read_json(path, "results file")                 # not UTF-8, not JSON, nested too deeply: one line
    hist = (res.get("train") or {}).get("history") if isinstance(res, dict) else None
    if not hist or not all(isinstance(h, dict) and "step" in h and "loss" in h for h in hist):
        raise common.InputError(f"{path} has no training history (expected train.history = [{{step, loss, "
                                "train_acc}}], as train.py writes)")
    return res, hist


def run_labels(paths):
    """The run folder's name, or its path where two runs share a name."""
    names = [os.path.basename(os.path.dirname(os.path.abspath(p))) or p for p in paths]
    return [n if names.count(n) == 1 else os.path.dirname(p) or p for n, p in zip(names, paths)]


def smooth(values, window):
    """Trailing moving average over `window` steps (None entries skipped)."""
    out = []
    for i in range(len(values)):
        seg = [v for v in values[max(0, i - window + 1):i + 1] if v is not None]
        out.append(float(np.mean(seg)) if seg else None)
    return out


def curves_figure(paths, out):
    """Fig. 7 for one or several results.json -> (png, json)."""
    runs = []
    for path, label in zip(paths, run_labels(paths)):
        res, hist = read_history(path)
        window = max(1, len(hist) // 20)
        loss, acc = [h["loss"] for h in hist], [h.get("train_acc") for h in hist]
        runs.append(dict(path=path, label=label, loss_kind=(res.get("args") or {}).get("loss", "margin"),
                         steps=[h["step"] for h in hist], loss=loss, train_acc=acc, window=window,
                         loss_smoothed=smooth(loss, window), train_acc_smoothed=smooth(acc, window),
                         test=test_metrics(res)))
    png, js = os.path.join(out, "fig7_curves.png"), os.path.join(out, "fig7_curves.json")
    draw_curves(runs, png)
    cli.write_json(js, dict(figure="Fig. 7", runs=runs))
    return [png, js]


def test_metrics(res):
    """Held-out accuracy (%) before and after training where results.json has it: the 'Average' column, else the
    first (evaluate.py writes percents)."""
    out = {}
    for key in ("zero_shot", "few_shot"):
        m = (res.get(key) or {}).get("metrics") or {}
        name = next((k for k in m if k.lower() == "average"), next(iter(m), None))
        if name is not None and isinstance(m[name], (int, float)):
            out[key] = dict(metric=name, percent=float(m[name]))
    return out


def draw_curves(runs, png):
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained", dpi=DPI)
    for r, colour in zip(runs, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10):
        ax_l.plot(r["steps"], r["loss"], color=colour, alpha=0.25, lw=0.8)
        ax_l.plot(r["steps"], r["loss_smoothed"], color=colour, lw=2,
                  label=f"{r['label']} ({r['loss_kind']} loss; bold: mean of {r['window']} steps)")
        acc = [np.nan if a is None else 100 * a for a in r["train_acc"]]
        ax_a.plot(r["steps"], acc, color=colour, alpha=0.25, lw=0.8)
        ax_a.plot(r["steps"], [np.nan if a is None else 100 * a for a in r["train_acc_smoothed"]], color=colour,
                  lw=2, label=f"{r['label']}: training batches (before each step's update)")
        for key, style in (("zero_shot", ":"), ("few_shot", "--")):
            if key in r["test"]:
                t = r["test"][key]
                ax_a.axhline(t["percent"], color=colour, ls=style, lw=1.5,
                             label=f"{r['label']}: held-out {t['metric']}, {key.replace('_', '-')} "
                                   f"({t['percent']:.1f} %)")
    ax_l.set(xlabel="optimizer step", ylabel="training loss (per step, unitless)", title="loss")
    ax_a.set(xlabel="optimizer step", ylabel="accuracy (% of items right)", title="accuracy", ylim=(-2, 102))
    ax_l.legend(fontsize=9)
    ax_a.legend(fontsize=9, loc="lower right")
    fig.suptitle("Fig. 7: training curves (thin: every step; bold: trailing mean)", fontsize=12)
    fig.savefig(png, dpi=DPI)
    plt.close(fig)


# ---- CLI -----------------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = cli.ArgumentParser(prog="python -m tools.figures", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command")
    a = sub.add_parser("attention", help="Fig. 10: cross-attention maps per caption token")
    a.add_argument("--model", default=TINY_MODEL, help="local diffusers folder or hub id (default the tiny shapes SD)")
    a.add_argument("--checkpoint", help="prompt_deltas.safetensors: draw before and after the deltas (default with "
                                        f"the tiny model and no --image: {DEFAULT_DELTAS} if it exists)")
    a.add_argument("--image", action="append", help="an image file (repeatable; every --text is drawn on each)")
    a.add_argument("--text", action="append", help="a caption (repeatable)")
    a.add_argument("--lam", type=cli.positive, help="eq. 3's lambda for the score (default: the deltas', shapes 100, else 1)")
    a.add_argument("--no-summary", dest="summary", action="store_false",
                   help="default items only: skip the held-out summary (every test item scored)")
    a.add_argument("--seed", type=int, default=0, help="noise and the shapes split (as train.py)")
    a.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    a.add_argument("--pairs-per-call", "--eval-batch-size", dest="pairs_per_call", type=cli.positive_int, default=32,
                   help="image-text pairs per UNet call (maps do not depend on it)")
    d = sub.add_parser("deltas", help="Fig. 8: learned prompt weights")
    d.add_argument("file", nargs="?", default=DEFAULT_DELTAS)
    d.add_argument("--model", help="base model folder for ||p|| / ||W|| (default the file's base_model)")
    c = sub.add_parser("curves", help="Fig. 7: training curves")
    c.add_argument("files", nargs="*", default=[DEFAULT_RESULTS])
    sub.add_parser("all", help="every default figure (the same as no command)")
    for s in (a, d, c, sub.choices["all"]):
        s.add_argument("--out", default=os.path.join("runs", "figures"),
                       help="output folder (default runs/figures; the docs' figures: --out docs)")
    args = p.parse_args(argv)
    if args.command is None:
        args = p.parse_args(["all", *(argv or [])])
    return args


def check_attention_args(args):
    if bool(args.image) != bool(args.text):
        raise common.InputError("--image and --text go together: give at least one of each")
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise common.InputError(f"checkpoint {args.checkpoint} does not exist")
    for path in args.image or []:
        load_image(path)


def run_all(args):
    """Every default figure; the ones needing runs/shapes say how to make it when it is absent."""
    ns = parse_args(["attention", "--out", args.out])
    paths = timed("attention", lambda: attention_figures(ns))
    for name, need, fn in (("deltas", DEFAULT_DELTAS, lambda: deltas_figure(DEFAULT_DELTAS, args.out)),
                           ("curves", DEFAULT_RESULTS, lambda: curves_figure([DEFAULT_RESULTS], args.out))):
        if os.path.exists(need):
            paths += timed(name, fn)
        else:
            print(f"{name}: skipped, {need} absent (python train.py --dataset shapes writes it)")
    return paths


def timed(name, fn):
    t = time.time()
    paths = fn()
    print(f"{name}: wrote {', '.join(paths)} in {time.time() - t:.1f} s")
    return paths


def main(argv=None):
    args = parse_args(argv)
    common.check_writable(args.out, folder=True)  # before any model or figure
    os.makedirs(args.out, exist_ok=True)
    if args.command == "attention":
        check_attention_args(args)
        timed("attention", lambda: attention_figures(args))
    elif args.command == "deltas":
        timed("deltas", lambda: deltas_figure(args.file, args.out, args.model))
    elif args.command == "curves":
        timed("curves", lambda: curves_figure(args.files, args.out))
    else:
        run_all(args)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
