"""ARO's Flickr30k-Order (Yuksekgonul et al., 2023, §3): a Flickr30K image against its caption and four word-order
perturbations of it (I->T, 5 texts; accuracy).

    flickr30k_val.json              [{image: "flickr30k-images/<id>.jpg", caption: [5 captions]}, ...]
    flickr30k-images/<id>.jpg       (or images/<id>.jpg)

One item per caption, drawn as COCO-Order's (benchmarks/aro.py `read_order`, benchmarks/perturbations.py).
The JSON is BLIP's public file; the images come from Flickr30K's authors (a form).
"""
import os

from benchmarks.aro import BLIP_FILES, read_order
from benchmarks.fetching import JOBS, fetch_one, mirrored, new_tally

LAYOUT = "flickr30k_val.json + flickr30k-images/<id>.jpg"
KARPATHY_VAL = "flickr30k_val.json"
FETCHES = f"{KARPATHY_VAL} (BLIP's, as ARO); the images from Flickr30K's authors (a form) into flickr30k-images/"
HINT = (f"python -m tools.download flickr30k_order ({KARPATHY_VAL}; the images from "
        "https://shannon.cs.illinois.edu/DenotationGraph/ into flickr30k-images/)")


def load(root, annotations=None, split=None, seed=0, tagger=None):
    """flickr30k_val.json -> one Item per caption, [image] x [caption, 4 perturbations] drawn from `seed`; tagger as
    COCO-Order's load."""
    return read_order(root, annotations, KARPATHY_VAL, "Flickr30k-Order", seed, tagger)


def fetch(root, mirror=None, with_images=False, yes=False, jobs=JOBS):
    tally = new_tally()
    fetch_one(tally, KARPATHY_VAL, mirrored(f"{BLIP_FILES}/{KARPATHY_VAL}", mirror), os.path.join(root, KARPATHY_VAL))
    return tally


def after(root, args):
    return (f"the Flickr30K images are not public by URL: request them at "
            f"https://shannon.cs.illinois.edu/DenotationGraph/ and unpack them into {root}/flickr30k-images/")


def manual_route(root):
    return f"{BLIP_FILES}/{KARPATHY_VAL} into {root}/; {after(root, None)}"
