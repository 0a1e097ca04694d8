"""The shapes world: coloured shapes in spatial relations, in the ComVG format (§5.1) - the embedded default data set.

A scene is a triplet (subject, relation, object), e.g. ("red circle", "left of", "blue square"), drawn with PIL as two
shapes on a dark background, with jittered sizes and positions. `write_comvg` writes ComVG exactly as distributed
(`comvg.csv` + `images/<image_id>.jpg`): each row is a sentence, its positive image and a negative image whose scene
changes the subject, the object or the relation (neg_value subject / object / verb), so the real ComVG loader,
training and evaluation run on it unchanged; `load` writes it on first use. `training_pairs` draws (image, caption)
pairs from the same world for pretraining a tiny Stable Diffusion (tools/pretrain_shapes.py).

    python -m tools.shapes --out data/shapes --n 50 --seed 0
"""
import csv
import io
import os
import random

import numpy as np
from PIL import Image, ImageDraw

from benchmarks.comvg import load as load_comvg
from common import InputError, atomic_write, check_writable

COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
BACKGROUND = (24, 24, 24)
HEADER = ["id", "sentence", "pos_triplet", "neg_triplet", "pos_image_id", "neg_image_id", "neg_value"]
NEG_VALUES = ("subject", "object", "verb")


def objects(colors=tuple(COLORS), shapes=SHAPES):
    """Every nameable object, e.g. 'red circle'."""
    return [f"{c} {s}" for c in colors for s in shapes]


def words(colors=tuple(COLORS), shapes=SHAPES, relations=RELATIONS):
    """The world's vocabulary (for `sd_configs.write_tokenizer`)."""
    return sorted({"a", *colors, *shapes, *" ".join(relations).split()})


def check_vocabulary(colors, shapes, relations):
    """Raise InputError unless every word is drawable, none is given twice, and negatives exist (3+ objects, 2+
    relations)."""
    bad = [c for c in colors if c not in COLORS] + [s for s in shapes if s not in SHAPES]
    bad += [r for r in relations if r not in RELATIONS]
    if bad:
        raise InputError(f"unknown word(s) {', '.join(map(repr, bad))}: colours {', '.join(COLORS)}; "
                         f"shapes {', '.join(SHAPES)}; relations {', '.join(RELATIONS)}")
    for what, given in (("colour", colors), ("shape", shapes), ("relation", relations)):
        twice = sorted({w for w in given if list(given).count(w) > 1})
        if twice:
            raise InputError(f"{what}(s) {', '.join(map(repr, twice))} given twice: each may appear once")
    if len(colors) * len(shapes) < 3 or len(relations) < 2:
        raise InputError("need at least 3 objects (colours x shapes) and 2 relations to draw negatives")


def caption(scene):
    """('red circle', 'left of', 'blue square') -> 'a red circle left of a blue square'."""
    subj, rel, obj = scene
    return f"a {subj} {rel} a {obj}"


def sample_scene(rng, objs, relations=RELATIONS):
    """A random triplet with two different objects."""
    subj, obj = rng.sample(objs, 2)
    return (subj, rng.choice(relations), obj)


def negative(scene, slot, rng, objs, relations=RELATIONS):
    """The scene with exactly one slot (subject / object / verb) changed; objects stay distinct from both."""
    subj, rel, obj = scene
    if slot == "verb":
        return (subj, rng.choice([r for r in relations if r != rel]), obj)
    other = [o for o in objs if o not in (subj, obj)]
    return (rng.choice(other), rel, obj) if slot == "subject" else (subj, rel, rng.choice(other))


def _draw_shape(draw, shape, cx, cy, r, color):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        r = 0.85 * r  # equal visual area
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - 1.1 * r), (cx - 1.15 * r, cy + 0.85 * r), (cx + 1.15 * r, cy + 0.85 * r)], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene, rng, size=32, colors=COLORS, supersample=4):
    """Draw a scene as a size x size RGB image; sizes and positions are jittered, the relation stays unambiguous."""
    subj, rel, obj = scene
    S = size * supersample
    r_s, r_o = (S * rng.uniform(0.13, 0.17) for _ in range(2))   # shape radii
    gap = S * rng.uniform(0.40, 0.52)                             # centre distance along the relation's axis
    off = S * rng.uniform(-0.08, 0.08)                            # small offset across it
    du, dv = {"left of": (-gap, off), "right of": (gap, off), "above": (off, -gap), "below": (off, gap)}[rel]
    m = 1.2 * max(r_s, r_o)                                       # subject - object = (du, dv), both inside [m, S-m]
    sx = rng.uniform(m + max(0, du), S - m + min(0, du))
    sy = rng.uniform(m + max(0, dv), S - m + min(0, dv))
    img = Image.new("RGB", (S, S), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for name, cx, cy, r in ((subj, sx, sy, r_s), (obj, sx - du, sy - dv, r_o)):
        color, shape = name.split(" ")
        _draw_shape(draw, shape, cx, cy, r, colors[color])
    return img.resize((size, size), Image.LANCZOS)


def write_comvg(out, n=50, seed=0, size=32, colors=tuple(COLORS), shapes=SHAPES, relations=RELATIONS, quality=95):
    """Write n items per neg_value (subject, object, verb) to out/comvg.csv and out/images/; returns the csv path.
    A folder that cannot be written (a file, read-only, full) is an InputError naming it; the CSV comes last and
    atomically, so a world cut short is written again on its next use."""
    check_vocabulary(colors, shapes, relations)
    check_writable(out, folder=True)
    try:
        os.makedirs(os.path.join(out, "images"), exist_ok=True)
        return _write_comvg(out, n, seed, size, colors, shapes, relations, quality)
    except OSError as e:
        raise InputError(f"cannot write the shapes world to {out}: {e.strerror or e}") from None


def _write_comvg(out, n, seed, size, colors, shapes, relations, quality):
    rng = random.Random(seed)
    objs = objects(colors, shapes)
    rows, image_id = [], 100000
    for slot in NEG_VALUES:
        for _ in range(n):
            pos = sample_scene(rng, objs, relations)
            neg = negative(pos, slot, rng, objs, relations)
            ids = (image_id + 1, image_id + 2)
            image_id += 2
            for i, scene in zip(ids, (pos, neg)):
                save_jpeg(render(scene, rng, size), os.path.join(out, "images", f"{i}.jpg"), quality)
            rows.append([len(rows) + 1, caption(pos), ",".join(pos), str(neg), ids[0], ids[1], slot])
    path = os.path.join(out, "comvg.csv")

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(HEADER)
            w.writerows(rows)
    atomic_write(path, write)
    return path


def save_jpeg(img, fp, quality=95):
    """The ComVG files' encoding: JPEG at `quality`, 4:4:4 (no chroma subsampling)."""
    img.save(fp, format="JPEG", quality=quality, subsampling=0)


def jpeg(img, quality=95):
    """The image as written to and read back from a .jpg by `write_comvg`."""
    buf = io.BytesIO()
    save_jpeg(img, buf, quality)
    return Image.open(buf).convert("RGB")


def training_pairs(n, seed=0, size=32, colors=tuple(COLORS), shapes=SHAPES, relations=RELATIONS, quality=95):
    """n images of random scenes and their captions, for pretraining; JPEG round-tripped like the ComVG files.

    Returns images (n, size, size, 3) uint8 and, per image, its two true captions: the scene's and the mirrored one
    ('a red circle left of a blue square' / 'a blue square right of a red circle')."""
    rng = random.Random(seed)
    objs = objects(colors, shapes)
    images, captions = np.zeros((n, size, size, 3), np.uint8), []
    for i in range(n):
        s, r, o = scene = sample_scene(rng, objs, relations)
        images[i] = np.asarray(jpeg(render(scene, rng, size), quality))
        captions.append((caption(scene), caption((o, INVERSE[r], s))))
    return images, captions


LAYOUT = "comvg.csv + images/<image_id>.jpg, written on first use"


def load(root, annotations=None, split=None, seed=0, n=50):
    """The shapes world in ComVG format; written to `root` first if it holds no comvg.csv.

    The world itself is always drawn with seed 0 (n items per subject / object / relation swap), so `--seed` moves
    the few-shot split and the noise, never the data."""
    if annotations is None and not os.path.exists(os.path.join(root, "comvg.csv")):
        print(f"shapes: writing {3 * n} items to {root} (first use)")
        write_comvg(root, n=n, seed=0)
    items, report = load_comvg(root, annotations)
    report["dataset"] = "shapes"
    return items, report
