"""Oxford-IIIT Pet of GDBench (Parkhi et al., 2012; Krojer et al., 2023 §4): zero-shot classification of an image
among the 37 breeds (I->T, 37 texts; top-1 and the mean per-class accuracy).

    images/<Breed_name>_<n>.jpg     the class from the file name: american_bulldog_10.jpg -> "american bulldog"
    classes.txt                     (optional) one class a line, lower case: the class order; else sorted names

Each text is `template` with the class ("a photo of a {}", DiffusionITM's); the item's texts are its own class's
first, then the other classes in class order (a pair's score does not depend on the others). The images from VGG's
site; classes.txt from DiffusionITM's repository.
"""
import os
import re

from benchmarks.fetching import JOBS, fetch_one, mirrored, new_tally
from benchmarks.reading import DataMissing, Item, check_root, finish, malformed, new_report, read_text
from common import InputError

LAYOUT = "images/<Breed_name>_<n>.jpg (+ classes.txt)"
PETS_IMAGES = "https://thor.robots.ox.ac.uk/~vgg/data/pets/images.tar.gz"
ITM_RAW = "https://raw.githubusercontent.com/McGill-NLP/diffusion-itm/main/data"
FETCHES = f"DiffusionITM's classes.txt; the images from {PETS_IMAGES} (tar -xzf into the folder: images/)"
HINT = f"python -m tools.download pets (classes.txt; the images: {PETS_IMAGES}, tar -xzf into the folder)"
TEMPLATE = "a photo of a {}"
NAME = re.compile(r"(.+)_(\d+)\.jpe?g", re.I)


def class_of(file_name):
    """'american_bulldog_10.jpg' -> 'american bulldog', 'Abyssinian_1.jpg' -> 'abyssinian'; None if not that form."""
    m = NAME.fullmatch(file_name)
    return m.group(1).replace("_", " ").lower() if m else None



def add_args(g):
    """The command-line options of this loader (datasets.add_data_args; the registry row maps them to `load`)."""
    g.add_argument("--pets-template", help=f"Oxford Pets: the text of a class (default {TEMPLATE!r})")


def load(root, annotations=None, split=None, seed=0, template=TEMPLATE):
    """images/*.jpg -> one Item per image: images [it], texts [template of its class, then the other classes'],
    category = its class. `annotations`: the classes file (default classes.txt if present). No split; `seed` unused."""
    check_root(root, "Oxford-IIIT Pet")
    if "{}" not in template:
        raise InputError(f"--pets-template {template!r}: needs a {{}} where the class name goes")
    folder = os.path.join(root, "images")
    if not os.path.isdir(folder):
        raise DataMissing(f"Oxford-IIIT Pet images not found: {folder} is not a folder")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpg", ".jpeg")))
    classes_file = annotations or os.path.join(root, "classes.txt")
    report = new_report("pets", [classes_file] if os.path.isfile(classes_file) else [])
    found = {n: class_of(n) for n in names}
    if report["files"]:
        classes = [c.strip().lower() for c in read_text(classes_file, "Pet classes").splitlines() if c.strip()]
    else:
        classes = sorted({c for c in found.values() if c})
    texts = {c: template.format(c) for c in classes}
    items = []
    for n in names:
        report["records"] += 1
        c = found[n]
        if c not in texts:
            malformed(report, os.path.join(folder, n), "not <class>_<n>.jpg of a listed class" if c is None else
                      f"class {c!r} is not in {classes_file}")
            continue
        items.append(Item(id=n, images=[os.path.join(folder, n)], texts=[texts[c]] + [texts[o] for o in classes
                                                                                         if o != c], category=c))
    report["classes"] = len(classes)
    return finish(report, items, "Oxford-IIIT Pet", "images/<Breed>_<n>.jpg", [folder])


def fetch(root, mirror=None, with_images=False, yes=False, jobs=JOBS):
    tally = new_tally()
    fetch_one(tally, "classes.txt", mirrored(f"{ITM_RAW}/pets/classes.txt", mirror), os.path.join(root, "classes.txt"))
    return tally


def after(root, args):
    return f"the Oxford-IIIT Pet images: {PETS_IMAGES}, then tar -xzf images.tar.gz -C {root} (images/)"


def manual_route(root):
    return f"{ITM_RAW}/pets/classes.txt into {root}/; {after(root, None)}"
