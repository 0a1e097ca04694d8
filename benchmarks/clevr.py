"""CLEVR of GDBench (Krojer et al., 2023 §4): a rendered CLEVR scene against a true and a false caption, in seven
subtasks of attribute binding, recognition and spatial relations (I->T, 2 texts; accuracy per subtask and overall).

    captions/<subtask>.json    {image file: [[true caption, false caption], ...]}
    images/<image file>

Subtasks: pair_binding_size, pair_binding_color, recognition_color, recognition_shape, spatial, binding_color_shape,
binding_shape_color; one item per caption pair. DiffusionITM's loader reads a hard-coded ../clevr/validation and has
a spatial branch that never runs (`if 'subtask' == 'spatial'`): every subtask's pair is [true, false] as here. The
caption files are in its repository, the images on Zenodo (its setup.sh).
"""
import os

from benchmarks.fetching import JOBS, fetch_one, mirrored, new_tally
from benchmarks.reading import (Item, check_root, escape, finish, malformed, missing, new_report, read_json,
                                first_existing, DataMissing)

LAYOUT = "captions/<subtask>.json + images/<image file>"
SUBTASKS = ("pair_binding_size", "pair_binding_color", "recognition_color", "recognition_shape", "spatial",
            "binding_color_shape", "binding_shape_color")
ITM_RAW = "https://raw.githubusercontent.com/McGill-NLP/diffusion-itm/main/data"
CLEVR_IMAGES = "https://zenodo.org/record/8096756/files/images.zip"
FETCHES = f"DiffusionITM's seven captions/<subtask>.json; the images from {CLEVR_IMAGES} into images/"
HINT = f"python -m tools.download clevr (the caption files; the images: {CLEVR_IMAGES} unzipped into images/)"


def load(root, annotations=None, split=None, seed=0):
    """captions/<subtask>.json (each present one; `annotations` = one such file) -> one Item per pair: images [the
    scene], texts [true, false], category = the subtask. No split; `seed` unused."""
    check_root(root, "CLEVR")
    files = [annotations] if annotations else [p for p in (os.path.join(root, "captions", f"{t}.json")
                                                            for t in SUBTASKS) if os.path.isfile(p)]
    if not files:
        raise DataMissing(f"CLEVR captions not found: looked for {', '.join(f'{t}.json' for t in SUBTASKS)} in "
                          f"{os.path.join(root, 'captions')}")
    folders = [os.path.join(root, "images"), root]
    report, items, seen = new_report("clevr", files), [], set()
    for path in files:
        subtask = os.path.splitext(os.path.basename(path))[0]
        data = read_json(path, "CLEVR captions")
        if not isinstance(data, dict):
            report["records"] += 1
            malformed(report, path, "expected a JSON object {image: [[true, false], ...]}")
            continue
        for image, pairs in data.items():
            where = f"{path}[{image!r}]"
            pairs = pairs if isinstance(pairs, list) else [pairs]
            report["records"] += len(pairs)
            if escape(report, where, [image]):
                continue
            found = first_existing([image], folders)
            for j, pair in enumerate(pairs):
                if not (isinstance(pair, list) and len(pair) >= 2 and all(isinstance(t, str) and t.strip()
                                                                         for t in pair[:2])):
                    malformed(report, f"{where}[{j}]", "expected [true caption, false caption]")
                elif found is None:
                    missing(report, [image], seen)
                else:
                    items.append(Item(id=f"{subtask}/{image}/{j}", images=[found], texts=list(pair[:2]),
                                      category=subtask))
    return finish(report, items, "CLEVR", "images/<image file>", folders)


def fetch(root, mirror=None, with_images=False, yes=False, jobs=JOBS):
    tally = new_tally()
    for t in SUBTASKS:
        fetch_one(tally, f"{t}.json", mirrored(f"{ITM_RAW}/clevr/captions/{t}.json", mirror),
                  os.path.join(root, "captions", f"{t}.json"))
    return tally


def after(root, args):
    return f"the CLEVR images: {CLEVR_IMAGES}, unzipped into {root}/ (images/)"


def manual_route(root):
    return f"{ITM_RAW}/clevr/captions/<subtask>.json into {root}/captions/; {after(root, None)}"
