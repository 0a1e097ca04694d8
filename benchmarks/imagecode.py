"""ImageCoDe of GDBench (Krauss et al., 2022; Krojer et al., 2023 §4): a description against the 10 near-identical
images of its set (T->I, R@1 / R@5).

    valid_data.json                  {set name: {"<target index>": description}}
    image-sets/<set>/img<k>.jpg      the set's images, ordered by k

As DiffusionITM's `imagecode` task: the static sets (name containing "open-images"); `video=True` (--imagecode-video,
its `imagecode_video`) every set. The images are put first the target's, then the others in k order (scores do not
depend on the order). The JSON is in the DiffusionITM repository; the image sets on Zenodo (its setup.sh's URL).
"""
import os
import re

from benchmarks.fetching import JOBS, fetch_one, mirrored, new_tally
from benchmarks.reading import (Item, check_root, escape, find_file, finish, given_file, malformed, missing,
                                new_report, read_json)
from common import InputError

LAYOUT = "valid_data.json + image-sets/<set>/img<k>.jpg"
ITM_RAW = "https://raw.githubusercontent.com/McGill-NLP/diffusion-itm/main/data"
VALID = "valid_data.json"
IMAGE_SETS = "https://zenodo.org/record/6518944/files/image-sets.zip"
FETCHES = f"DiffusionITM's {VALID}; the image sets from {IMAGE_SETS}, unzipped into image-sets/"
HINT = f"python -m tools.download imagecode ({VALID}; the images from {IMAGE_SETS} into image-sets/)"
STATIC = "open-images"


def set_images(folder):
    """The set folder's img<k>.jpg files ordered by k ([] if there is no such folder)."""
    if not os.path.isdir(folder):
        return []
    names = [n for n in os.listdir(folder) if re.fullmatch(r"img(\d+)\.jpg", n)]
    return [os.path.join(folder, n) for n in sorted(names, key=lambda n: int(n[3:-4]))]



def add_args(g):
    """The command-line options of this loader (datasets.add_data_args; the registry row maps them to `load`)."""
    g.add_argument("--imagecode-video", action="store_true", default=None,
                   help="ImageCoDe: every image set (DiffusionITM's imagecode_video), not only the static ones")


def load(root, annotations=None, split=None, seed=0, video=False):
    """valid_data.json -> one Item per description: images [target, the other images of its set], texts
    [description]; category "static" / "video". No split; `seed` unused."""
    check_root(root, "ImageCoDe")
    path = given_file("ImageCoDe descriptions", annotations) if annotations else \
        find_file("ImageCoDe descriptions", [VALID], [root, os.path.join(root, "data")])
    data = read_json(path, "ImageCoDe descriptions")
    if not isinstance(data, dict):
        raise InputError(f"ImageCoDe descriptions {path}: expected a JSON object {{set: {{index: text}}}}")
    sets = os.path.join(root, "image-sets")
    report, items, seen = new_report("imagecode", [path]), [], set()
    report["video_sets_left_out"] = 0
    for name, descriptions in data.items():
        static = STATIC in name
        if not (static or video):
            report["video_sets_left_out"] += 1
            continue
        where = f"{path}[{name!r}]"
        if not isinstance(descriptions, dict):
            report["records"] += 1
            malformed(report, where, "expected {target index: description}")
            continue
        if escape(report, where, [name]):
            report["records"] += len(descriptions)
            continue
        images = set_images(os.path.join(sets, name))
        for idx, text in descriptions.items():
            report["records"] += 1
            if not (str(idx).isdigit() and isinstance(text, str) and text.strip()):
                malformed(report, f"{where}[{idx!r}]", "expected a target index and a description")
                continue
            if int(idx) >= len(images) or len(images) < 2:
                missing(report, [os.path.join(name, f"img{idx}.jpg")], seen)
                continue
            t = int(idx)
            items.append(Item(id=f"{name}/{t}", images=[images[t]] + images[:t] + images[t + 1:], texts=[text],
                              category="static" if static else "video", meta=dict(set=name, target=t)))
    return finish(report, items, "ImageCoDe", "image-sets/<set>/img0.jpg", [sets])


def fetch(root, mirror=None, with_images=False, yes=False, jobs=JOBS):
    tally = new_tally()
    fetch_one(tally, VALID, mirrored(f"{ITM_RAW}/imagecode/{VALID}", mirror), os.path.join(root, VALID))
    return tally


def after(root, args):
    return f"the ImageCoDe image sets: {IMAGE_SETS}, unzipped into {root}/image-sets/"


def manual_route(root):
    return f"{ITM_RAW}/imagecode/{VALID} into {root}/; {after(root, None)}"
