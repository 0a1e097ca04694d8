"""SugarCrepe (Hsieh et al., 2023): a COCO image against its caption and a hard negative that adds, replaces or swaps
an object, attribute or relation (I->T, 2 texts; accuracy per file, and the add / replace / swap averages).

    add_att.json, add_obj.json, replace_att.json, replace_obj.json, replace_rel.json, swap_att.json, swap_obj.json
                        {key: {filename, caption, negative_caption}}
    val2017/<filename>  COCO 2017 validation images

One item per record; category = its file's name (add_att, ...). Not part of GDBench: the compositional suite of
arXiv 2505.17955. The JSON files are in the SugarCrepe repository, the images COCO's val2017.zip.
"""
import os

from benchmarks.fetching import JOBS, fetch_archive, fetch_one, mirrored, new_tally
from benchmarks.reading import (DataMissing, Item, check_root, finish, image_files, malformed, new_report,
                                read_json)

LAYOUT = "add_att.json, ..., swap_obj.json + val2017/<filename>"
FILES = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")
SUGARCREPE_RAW = "https://raw.githubusercontent.com/RAIVNLab/sugar-crepe/main/data"
COCO_VAL2017 = "http://images.cocodataset.org/zips/val2017.zip"
FETCHES = f"SugarCrepe's seven JSON files (github RAIVNLab/sugar-crepe); --with-images: COCO {COCO_VAL2017} (0.8 GB)"
HINT = "python -m tools.download sugarcrepe --with-images (the seven JSON files + COCO val2017.zip, 0.8 GB)"
FIELDS = ("filename", "caption", "negative_caption")


def load(root, annotations=None, split=None, seed=0):
    """The seven files present (or `annotations`, one of them) -> one Item per record: images [val2017/filename],
    texts [caption, negative_caption], category = the file's name. No split; `seed` unused."""
    check_root(root, "SugarCrepe")
    files = [annotations] if annotations else [p for p in (os.path.join(d, f"{f}.json") for f in FILES
                                                           for d in (root, os.path.join(root, "data")))
                                                if os.path.isfile(p)]
    if not files:
        raise DataMissing(f"SugarCrepe files not found: looked for {', '.join(f'{f}.json' for f in FILES)} in {root}")
    folders = [os.path.join(root, "val2017"), os.path.join(root, "images"), root]
    report, items, seen = new_report("sugarcrepe", files), [], set()
    for path in files:
        kind = os.path.splitext(os.path.basename(path))[0]
        data = read_json(path, "SugarCrepe file")
        records = data.items() if isinstance(data, dict) else enumerate(data if isinstance(data, list) else [data])
        for key, rec in records:
            report["records"] += 1
            where = f"{path}[{key!r}]"
            if not (isinstance(rec, dict) and all(isinstance(rec.get(f), str) and rec[f].strip() for f in FIELDS)):
                malformed(report, where, f"expected {{{', '.join(FIELDS)}}}")
                continue
            images = image_files(report, where, [rec["filename"]], folders, seen)
            if images is None:
                continue
            items.append(Item(id=f"{kind}/{key}", images=images, texts=[rec["caption"], rec["negative_caption"]],
                              category=kind))
    return finish(report, items, "SugarCrepe", "val2017/<filename>", folders)


def fetch(root, mirror=None, with_images=False, yes=False, jobs=JOBS):
    tally = new_tally()
    for f in FILES:
        fetch_one(tally, f"{f}.json", mirrored(f"{SUGARCREPE_RAW}/{f}.json", mirror), os.path.join(root, f"{f}.json"))
    if with_images:
        fetch_archive([mirrored(COCO_VAL2017, mirror)], os.path.join(root, "val2017.zip"), root, tally)
    return tally


def manual_route(root):
    return f"{SUGARCREPE_RAW}/<file>.json into {root}/; {COCO_VAL2017} unzipped into {root}/ (val2017/)"
