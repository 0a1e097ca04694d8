"""What the two Flickr30K retrieval directions of GDBench share: DiffusionITM's frozen top-10 candidate files
({key: [10 candidates]}, the true one first) and Karpathy's split file, read with their image paths checked.

    path, data = read_lists(root, None, "val_top10_RN50x64.json", "Flickr30K retrieval lists")
    path, report, pool = karpathy_pool(root, None, "test")     # [(image path, [captions])]
"""
import os

from benchmarks.reading import (check_root, escape, find_file, first_existing, given_file, malformed, missing,
                                new_report, read_json)
from common import InputError

PREFIX = "datasets/flickr30k/"   # how DiffusionITM's files name an image: datasets/flickr30k/images/<id>.jpg
KARPATHY = "dataset_flickr30k.json"   # Karpathy's split: {images: [{filename, split, sentences: [{raw}]}]}


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
