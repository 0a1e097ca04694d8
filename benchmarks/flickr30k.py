"""Flickr30K image retrieval of GDBench (Krojer et al., 2023, §4): one caption against 10 images (T->I, R@1 / R@5).

    val_top10_RN50x64.json    {caption: [10 image paths]}, the true image first, the other 9 CLIP RN50x64's top hits
    images/<id>.jpg           (the file's paths read datasets/flickr30k/images/<id>.jpg: read under the root's images/)

DiffusionITM's frozen candidate lists (its repository's data/flickr30k/); as its loader, every 5th caption key is a
query (`every`, 1,014 of the 5,070), so each image is queried once. Flickr30K's images come from its authors after a
form; the JSON from the DiffusionITM repository.
"""
import os

from benchmarks.fetching import JOBS, fetch_one, mirrored, new_tally
from benchmarks.reading import Item, finish, new_report
from benchmarks.top10 import image_paths, karpathy_pool, read_lists, valid_list

LAYOUT = "val_top10_RN50x64.json + images/<id>.jpg"
ITM_RAW = "https://raw.githubusercontent.com/McGill-NLP/diffusion-itm/main/data"
FETCHES = ("DiffusionITM's val_top10_RN50x64.json and val_top10_RN50x64_text.json (github McGill-NLP/diffusion-itm); "
           "the images from Flickr30K's authors (https://shannon.cs.illinois.edu/DenotationGraph/, a form) "
           "into images/")
HINT = ("python -m tools.download flickr30k (the candidate lists; Flickr30K's images from "
        "https://shannon.cs.illinois.edu/DenotationGraph/ into images/)")
TOP10 = "val_top10_RN50x64.json"
TOP10_TEXT = "val_top10_RN50x64_text.json"



def add_args(g):
    """The command-line options of the Flickr30K loaders (datasets.add_data_args; the registry rows map them)."""
    g.add_argument("--flickr-every", type=int,
                   help="Flickr30K image retrieval: every Nth caption of the top-10 file is a query (default 5, "
                        "DiffusionITM's: 1,014 queries; 1 = all 5,070)")
    g.add_argument("--flickr-karpathy", action="store_true", default=None,
                   help="Flickr30K: Karpathy's dataset_flickr30k.json test split, every caption / image against the "
                        "whole split (full retrieval; with evaluate.py --prefilter-k K)")


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
        fetch_one(tally, name, mirrored(f"{ITM_RAW}/flickr30k/{name}", mirror), os.path.join(root, name))
    return tally


def after(root, args):
    return (f"the Flickr30K images are not public by URL: request them at "
            f"https://shannon.cs.illinois.edu/DenotationGraph/ and unpack them into {root}/images/")


def manual_route(root):
    return f"{ITM_RAW}/flickr30k/{TOP10} and {TOP10_TEXT} into {root}/; {after(root, None)}"
