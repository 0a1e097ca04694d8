"""ARO's VG-Relation (Yuksekgonul et al., 2023, §3): a Visual Genome region, its relation caption and the caption with
subject and object swapped (I->T, 2 texts; accuracy, and the macro accuracy over relations as ARO reports it).

    visual_genome_relation.json   [{image_id, image_path, bbox_x, bbox_y, bbox_w, bbox_h, true_caption,
                                    false_caption, relation_name}, ...]
    images/<image_path>

23,937 records; the image is cropped to the box, as ARO's loader does. `read_vg` reads VG-Attribution's file too.
Both files and the image zip are on Google Drive (ARO's gdown ids); not fetched here.
"""
import os

from benchmarks.reading import (Item, check_root, cropped, escape, find_file, first_existing, finish, given_file,
                                malformed, missing, new_report, read_json)
from common import InputError

LAYOUT = "visual_genome_relation.json + images/<image_path>"
ARO_FILES = ("ARO's files are on Google Drive: visual_genome_relation.json "
             "(gdown id 1kX2iCHEv0CADL8dSO1nMdW-V0NqIAiP3), "
             "visual_genome_attribution.json (13tWvOrNOLHxl3Rm9cR3geAdHx2qR3-Tw) and the images "
             "vgr_vga_images.zip (1qaPlrwhGNMrR3a11iopZUT_GPP_LrgP9, unzipped to images/): `pip install gdown; "
             "gdown ID`")
HINT = f"not fetched here; {ARO_FILES}, into data/vg_relation/ (and data/vg_attribution/)"
BOX = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")
VG_FIELDS = ("image_path", "true_caption", "false_caption") + BOX


def read_vg(root, annotations, name, what, category):
    """ARO's VG file -> (items, report): one Item per record, images [the region], texts [true, false], category
    `category(record)` (relation or attribute pair)."""
    check_root(root, what)
    path = given_file(what, annotations) if annotations else find_file(what, [name], [root])
    data = read_json(path, what)
    if not isinstance(data, list):
        raise InputError(f"{what} {path}: expected a JSON list of records, got {type(data).__name__}")
    folders = [os.path.join(root, "images"), root]
    report, items, seen = new_report(os.path.splitext(name)[0], [path]), [], set()
    for k, rec in enumerate(data):
        report["records"] += 1
        where = f"{path}[{k}]"
        ok = isinstance(rec, dict) and all(isinstance(rec.get(f), str) and rec[f].strip() for f in VG_FIELDS[:3])
        if not ok or not all(isinstance(rec.get(b), (int, float)) and not isinstance(rec.get(b), bool) for b in BOX):
            malformed(report, where, f"expected {', '.join(VG_FIELDS)}")
            continue
        if rec["bbox_w"] <= 0 or rec["bbox_h"] <= 0:
            malformed(report, where, f"empty box {[rec[b] for b in BOX]}")
            continue
        if escape(report, where, [rec["image_path"]]):
            continue
        image = first_existing([rec["image_path"]], folders)
        if image is None:
            missing(report, [rec["image_path"]], seen)
            continue
        items.append(Item(id=str(k), images=[cropped(image, [rec[b] for b in BOX])],
                          texts=[rec["true_caption"], rec["false_caption"]], category=category(rec),
                          meta=dict(image_id=rec.get("image_id"))))
    return finish(report, items, what, "images/<image_path>", folders)


def load(root, annotations=None, split=None, seed=0):
    """visual_genome_relation.json -> Items [region] x [true, false], category = relation_name. No split; `seed`
    unused."""
    return read_vg(root, annotations, "visual_genome_relation.json", "VG-Relation",
                   lambda rec: str(rec.get("relation_name", "")))
