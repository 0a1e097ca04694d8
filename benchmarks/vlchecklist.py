"""VL-CheckList (Zhao et al., 2022): an image, a true and a false caption, by attribute / object / relation (Table 8).

    data/{Attribute,Object,Relation}/**/*.json   [[image_rel_path, {"POS": [str], "NEG": [str]}], ...]
    images/{vg,swig,hake}/                        the image roots of its corpus yaml files (IMG_ROOT)

As its official evaluator (itc): one item per record whose image exists, POS[0] vs NEG[0], at most MAX_NUM / 2
records per annotation file; accuracy per file, then Attribute / Object / Relation.
"""
import argparse
import os
import re

from benchmarks.fetching import JOBS, VG_ARCHIVES, confirm, fetch_archive, mirrored, new_tally, pending_size
from benchmarks.reading import (Item, check_root, escape, first_existing, finish, malformed, missing, new_report,
                                read_json)
from common import InputError

LAYOUT = "data/{Attribute,Object,Relation}/**/*.json + images/{vg,swig,hake}/"
FETCHES = ("VL-CheckList annotations: data/ + corpus/ of github om-ai-lab/VL-CheckList (~10 MB archive, 47 MB "
           "unpacked); images (VG, SWiG, HAKE) by hand, or --with-images --yes: VG's archives (15.2 GB)")
HINT = ("python -m tools.download vlchecklist (the annotations; it prints where to get the VG / SWiG / HAKE "
        "images)")
VLC_ARCHIVE_URL = "https://github.com/om-ai-lab/VL-CheckList/archive/refs/heads/main.zip"
VLC_FOLDERS = ("data", "corpus")
VLC_DATASETS_MD = "https://github.com/om-ai-lab/VL-CheckList/blob/main/DATASETS.md"

VLC_KINDS = {"attribute": "Attribute", "object": "Object", "relation": "Relation"}
VLC_SOURCES = ("vg", "swig", "hake")  # the image folders of VL-CheckList's DATASETS.md (VAW images are VG's)


def vlc_category(rel):
    """Attribute / Object / Relation: the first path component naming one (case-insensitive), else None."""
    for part in re.split(r"[\\/]", rel):
        if part.lower() in VLC_KINDS:
            return VLC_KINDS[part.lower()]
    return None


def vlc_json_files(root, annotations):
    """[(path, key)] of the corpus's JSON files; key is the path relative to the corpus folder (it has a category)."""
    if annotations and os.path.isfile(annotations):
        return [(annotations, annotations)]
    if annotations and not os.path.isdir(annotations):
        raise InputError(f"VL-CheckList annotations not found: {annotations} is neither a file nor a folder")
    bases = [annotations] if annotations else [root, os.path.join(root, "data"),
                                               os.path.join(root, "vl-checklist", "data"),
                                               os.path.join(root, "VL-CheckList", "data")]
    out = []
    for base in bases:
        if not os.path.isdir(base):
            continue
        for d in sorted(os.listdir(base)):
            if d.lower() in VLC_KINDS and os.path.isdir(os.path.join(base, d)):
                for dirpath, dirnames, filenames in os.walk(os.path.join(base, d)):
                    dirnames.sort()
                    out += [(os.path.join(dirpath, f), os.path.relpath(os.path.join(dirpath, f), base))
                            for f in sorted(filenames) if f.lower().endswith(".json")]
        if out:
            return out
    raise InputError(f"VL-CheckList JSON files not found: looked for Attribute/, Object/, Relation/ folders of "
                     f"*.json in {', '.join(bases)}")


def vlc_image_roots(root, images):
    return [images] if images else [os.path.join(root, "images"), root]


def vlc_find(rel, key, roots):
    """An image path of a VL-CheckList JSON: relative to a per-source folder (vg/, swig/, hake/) under an images root."""
    hint = [s for s in VLC_SOURCES if s in key.lower() or (s == "vg" and "vaw" in key.lower())]
    subdirs = [""] + hint + [s for s in VLC_SOURCES if s not in hint]
    return first_existing([os.path.join(s, rel) if s else rel for s in subdirs], roots)


VLC_MAX_PER_FILE = 1000  # its evaluate.py (task itc) keeps MAX_NUM / 2 records per file; configs/sample.yaml: 2000


def whole_number(text):
    """An argparse type: a whole number >= 0 (-1 would cap nothing and then seem to blame the data)."""
    try:
        x = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = all), got {text}")
    return x


def add_args(g):
    """The command-line options of this loader (datasets.add_data_args; the registry row maps them to `load`)."""
    g.add_argument("--vlc-max-per-file", type=whole_number,
                   help=f"VL-CheckList: records per annotation file (default {VLC_MAX_PER_FILE}, its evaluator's "
                        "MAX_NUM / 2; 0 = all)")


def load(root, annotations=None, split=None, seed=0, images=None, max_per_file=VLC_MAX_PER_FILE):
    """VL-CheckList JSON files [[image_path, {"POS": [...], "NEG": [...]}], ...] -> one Item per record, as its
    official evaluator (vl_checklist/evaluate.py, task itc) forms them.

    Each item: 1 image, texts [POS[0], NEG[0]] (a SWiG record with 3 POS / 3 NEG is still one item); records whose
    image is on disk, the first `max_per_file` of them per file (None or 0: all; the rest counted in
    report["over_cap"]); category = Attribute / Object / Relation from the file's path; meta["file"] = the path
    relative to the corpus folder (per-file accuracy).
    Files: `annotations` (one JSON file, or a corpus folder), else every *.json under Attribute/, Object/, Relation/
    (any case) in root, root/data, root/vl-checklist/data or root/VL-CheckList/data (the repository's data/ folder).
    Image paths in the JSON are relative to the source's image folder (vg/, swig/, hake/ as in VL-CheckList's
    DATASETS.md): looked up as IMAGES/<path> and IMAGES/{vg,swig,hake}/<path>, IMAGES = `images`, else root/images
    and root. No split; `seed` unused.
    """
    check_root(root, "VL-CheckList")
    files = vlc_json_files(root, annotations)
    roots = vlc_image_roots(root, images)
    report, items, seen = new_report("vlchecklist", [p for p, _ in files]), [], set()
    report.update(max_per_file=max_per_file or None, over_cap=0)
    for path, key in files:
        kept = 0
        category = vlc_category(key if key != path else os.path.abspath(path))
        if category is None:
            report["warnings"].append(f"{path}: no Attribute / Object / Relation folder in its path; "
                                      "counted in Average only")
        data = read_json(path, "VL-CheckList file")
        if not isinstance(data, list):
            malformed(report, path, "not a JSON list of [image_path, {POS, NEG}]")
            continue
        for i, rec in enumerate(data):
            report["records"] += 1
            where = f"{path}[{i}]"
            try:
                rel, texts = rec
                pos, neg = [t for t in texts["POS"] if t], [t for t in texts["NEG"] if t]
                assert isinstance(rel, str) and rel and pos and neg
                assert all(isinstance(texts[k], list) for k in ("POS", "NEG")) and all(
                    isinstance(t, str) for t in pos + neg)                      # "POS": "abc" is not three texts
                pos, neg = [t for t in pos if t.strip()], [t for t in neg if t.strip()]  # a blank caption is none
                assert pos and neg
            except (ValueError, TypeError, KeyError, AssertionError):
                malformed(report, where, "not [image_path, {\"POS\": [text], \"NEG\": [text]}] with texts")
                continue
            if escape(report, where, [rel]):
                continue
            image = vlc_find(rel, key, roots)
            if image is None:
                missing(report, [rel], seen)
                continue
            if max_per_file and kept >= max_per_file:
                report["over_cap"] += 1
                continue
            kept += 1
            items.append(Item(id=f"{key}[{i}]", images=[image], texts=[pos[0], neg[0]],
                              category=category or "", meta=dict(file=key)))
    return finish(report, items, "VL-CheckList", "<image_path> or vg/<image_path>", roots)


# ---- MS-COCO captions (Lin et al., 2014): training source for the zero-shot transfer of Table 8 ----------------------


# ---- fetching ------------------------------------------------------------------------------------------------------

def fetch(root, mirror=None, with_images=False, yes=False, jobs=JOBS):
    """VL-CheckList's data/ and corpus/ from its repository's archive into root/; with_images: Visual Genome's two
    archives into root/images/vg/ (VG_100K/, VG_100K_2/), as its DATASETS.md lays them out."""
    tally = new_tally()
    images = os.path.join(root, "images", "vg")
    if with_images:
        confirm("VL-CheckList: Visual Genome images.zip + images2.zip",
                pending_size([(n, s) for n, (_, s) in VG_ARCHIVES.items()], images), yes)

    def keep(name):  # VL-CheckList-main/data/... -> data/...
        rel = name.split("/", 1)[1] if "/" in name else ""
        return rel if rel.split("/", 1)[0] in VLC_FOLDERS else None

    fetch_archive([mirrored(VLC_ARCHIVE_URL, mirror)], os.path.join(root, "VL-CheckList-main.zip"), root, tally,
                  rename=keep)
    if with_images:
        for name, (url, _) in VG_ARCHIVES.items():  # its size is only stated: one public source; CRCs check it
            fetch_archive([mirrored(url, mirror)], os.path.join(images, name), images, tally)
    return tally


def after(root, args):
    """Printed after a fetch without --with-images: where the images go."""
    if args.with_images:
        return None
    return (f"VL-CheckList images are not fetched by default: put them under {root}/images/ as vg/ (Visual Genome: "
            f"`python -m tools.download vlchecklist --with-images --yes` fetches its two archives, 15.2 GB), swig/ "
            f"(https://swig-data-weights.s3.us-east-2.amazonaws.com/images_512.zip) and hake/ (HAKE's images), "
            f"exactly as in {VLC_DATASETS_MD}")


def manual_route(root):
    return f"https://github.com/om-ai-lab/VL-CheckList: its data/ and corpus/ folders into {root}/"
