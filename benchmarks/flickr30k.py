"""Flickr30K image retrieval of GDBench (Krojer et al., 2023, §4): one caption against 10 images (T->I, R@1 / R@5).

    val_top10_RN50x64.json    {caption: [10 image paths]}, the true image first, the other 9 CLIP RN50x64's top hits
    images/<id>.jpg           (the file's paths read datasets/flickr30k/images/<id>.jpg: read under the root's images/)

DiffusionITM's frozen candidate lists (its repository's data/flickr30k/); as its loader, every 5th caption key is a
query (`every`, 1,014 of the 5,070), so each image is queried once. Flickr30K's images come from its authors after a
form; the JSON from the DiffusionITM repository.
"""
import os

from benchmarks.fetching import JOBS, FetchError, count, mirrored, new_tally
from benchmarks.fetching import fetch as fetch_file
from benchmarks.reading import (Item, check_root, escape, find_file, first_existing, finish, given_file, malformed,
                                missing, new_report, read_json)
from common import InputError

LAYOUT = "val_top10_RN50x64.json + images/<id>.jpg"
ITM_RAW = "https://raw.githubusercontent.com/McGill-NLP/diffusion-itm/main/data"
FETCHES = ("DiffusionITM's val_top10_RN50x64.json and val_top10_RN50x64_text.json (github McGill-NLP/diffusion-itm); "
           "the images from Flickr30K's authors (https://shannon.cs.illinois.edu/DenotationGraph/, a form) "
           "into images/")
HINT = ("python -m tools.download flickr30k (the candidate lists; Flickr30K's images from "
        "https://shannon.cs.illinois.edu/DenotationGraph/ into images/)")
TOP10 = "val_top10_RN50x64.json"
KARPATHY = "dataset_flickr30k.json"   # Karpathy's split: {images: [{filename, split, sentences: [{raw}]}]}
TOP10_TEXT = "val_top10_RN50x64_text.json"
PREFIX = "datasets/flickr30k/"   # how the files name an image: datasets/flickr30k/images/<id>.jpg


def image_name(path):
    """A path of the candidate files -> the name read under the root (images/<id>.jpg)."""
    return path[len(PREFIX):] if isinstance(path, str) and path.startswith(PREFIX) else path


def image_paths(report, where, paths, root, seen):
    """The files of `paths` under root (or root/images by base name); None if one could leave the root (counted
    malformed) or is missing (counted)."""
    names = [image_name(p) for p in paths]
    if escape(report, where, names):
        return None
    found = [first_existing([n, os.path.join("images", os.path.basename(n))], [root]) for n in names]
    if None in found:
        missing(report, [n for n, f in zip(names, found) if f is None], seen)
        return None
    return found


def read_lists(root, annotations, name, what):
    """(path, {key: list}) of one candidate file; a file that is not a JSON object is an InputError."""
    check_root(root, what)
    path = given_file(what, annotations) if annotations else find_file(what, [name], [root, os.path.join(root, "data")])
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise InputError(f"{what} {path}: expected a JSON object {{key: [10 candidates]}}, got {type(data).__name__}")
    return path, data


def valid_list(report, where, key, values, n=10):
    if not (isinstance(key, str) and key.strip() and isinstance(values, list) and len(values) >= 2
            and all(isinstance(v, str) and v.strip() for v in values)):
        malformed(report, where, f"expected a non-empty key and a list of at least 2 strings (the true one first), "
                                 f"got {str(values)[:60]}")
        return False
    return True


def karpathy_pool(root, annotations, split="test"):
    """(path, report, [(image path, [captions])]) of the Karpathy file's `split` images found under root/images
    (a missing image is counted and left out of the pool; a malformed record is counted)."""
    check_root(root, "Flickr30K")
    what = "Flickr30K Karpathy split"
    path = given_file(what, annotations) if annotations else find_file(what, [KARPATHY], [root])
    data = read_json(path, what)
    records = data.get("images") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise InputError(f"{what} {path}: expected {{\"images\": [{{filename, split, sentences}}]}}")
    report, pool, seen = new_report("flickr30k", [path]), [], set()
    for k, rec in enumerate(records):
        if not isinstance(rec, dict) or rec.get("split") != (split or "test"):
            continue
        report["records"] += 1
        where = f"{path}[images][{k}]"
        captions = [s.get("raw") for s in rec.get("sentences", []) if isinstance(s, dict)] \
            if isinstance(rec.get("sentences"), list) else []
        if not (isinstance(rec.get("filename"), str) and captions and all(isinstance(c, str) and c.strip()
                                                                          for c in captions)):
            malformed(report, where, "expected {filename, split, sentences: [{raw}]}")
            continue
        found = image_paths(report, where, [os.path.join("images", rec["filename"])], root, seen)
        if found:
            pool.append((found[0], captions))
    return path, report, pool


def load(root, annotations=None, split=None, seed=0, every=5, karpathy=False):
    """val_top10_RN50x64.json -> one Item per `every`-th caption (DiffusionITM's 5; 1 = all): images = its 10
    candidates (the true one first), texts = [caption]. No split; `seed` unused (the lists are frozen).

    karpathy=True (--flickr-karpathy): dataset_flickr30k.json's `split` (default test: 1,000 images, 5,000 captions)
    instead, each `every`-th caption against every image of the split found on disk (the true one first): full
    retrieval, for --prefilter-k."""
    if karpathy:
        path, report, pool = karpathy_pool(root, annotations, split)
        images = [p for p, _ in pool]
        items = [Item(id=f"c{i}.{j}", images=[p] + images[:i] + images[i + 1:], texts=[c])
                 for i, (p, caps) in enumerate(pool) for j, c in enumerate(caps)][::every]
        return finish(report, items, "Flickr30K", "images/<filename>", [os.path.join(root, "images")])
    path, data = read_lists(root, annotations, TOP10, "Flickr30K retrieval lists")
    report, items, seen = new_report("flickr30k", [path]), [], set()
    for k, (caption, paths) in enumerate(list(data.items())[::every]):
        report["records"] += 1
        where = f"{path}[{k * every}]"
        if not valid_list(report, where, caption, paths):
            continue
        images = image_paths(report, where, paths, root, seen)
        if images:
            items.append(Item(id=f"q{k * every}", images=images, texts=[caption]))
    return finish(report, items, "Flickr30K", "images/<id>.jpg", [os.path.join(root, "images")])


def fetch(root, mirror=None, with_images=False, yes=False, jobs=JOBS):
    """The two candidate lists from DiffusionITM's repository; the images cannot be fetched (a form)."""
    tally = new_tally()
    for name in (TOP10, TOP10_TEXT):
        try:
            count(tally, name, fetch_file(mirrored(f"{ITM_RAW}/flickr30k/{name}", mirror), os.path.join(root, name)))
        except FetchError as e:
            count(tally, name, "failed", str(e))
    return tally


def after(root, args):
    return (f"the Flickr30K images are not public by URL: request them at "
            f"https://shannon.cs.illinois.edu/DenotationGraph/ and unpack them into {root}/images/")


def manual_route(root):
    return f"{ITM_RAW}/flickr30k/{TOP10} and {TOP10_TEXT} into {root}/; {after(root, None)}"
