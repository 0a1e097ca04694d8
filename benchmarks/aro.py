"""What ARO's four sets share (Yuksekgonul et al., 2023, §3): reading its VG files (a region, a true and a false
caption) and the Karpathy-format order files (a caption and its four perturbations), and where its files are.

    items, report = read_vg(root, None, "visual_genome_relation.json", "VG-Relation", lambda rec: rec["relation_name"])
    items, report = read_order(root, None, "coco_karpathy_test.json", "COCO-Order", seed=0, tagger=None)
"""
import os

from benchmarks.perturbations import PERTURBATIONS, order_texts, spacy_tagger
from benchmarks.reading import (Item, check_root, cropped, escape, find_file, first_existing, finish, given_file,
                                image_files, item_rng, malformed, missing, new_report, read_json)
from common import InputError

ARO_FILES = ("ARO's files are on Google Drive: visual_genome_relation.json "
             "(gdown id 1kX2iCHEv0CADL8dSO1nMdW-V0NqIAiP3), "
             "visual_genome_attribution.json (13tWvOrNOLHxl3Rm9cR3geAdHx2qR3-Tw) and the images "
             "vgr_vga_images.zip (1qaPlrwhGNMrR3a11iopZUT_GPP_LrgP9, unzipped to images/): `pip install gdown; "
             "gdown ID`")
BLIP_FILES = "https://storage.googleapis.com/sfr-vision-language-research/datasets"
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
        images = image_files(report, where, [rec["image_path"]], folders, seen)
        if images is None:
            continue
        items.append(Item(id=str(k), images=[cropped(images[0], [rec[b] for b in BOX])],
                          texts=[rec["true_caption"], rec["false_caption"]], category=category(rec),
                          meta=dict(image_id=rec.get("image_id"))))
    return finish(report, items, what, "images/<image_path>", folders)


def read_order(root, annotations, name, what, seed, tagger):
    """A Karpathy-format file [{image, caption: [...]}] -> one Item per caption: images [image], texts [cleaned
    caption, its four perturbations]; meta keeps the perturbation names and marks the texts as generated (kept in the
    results)."""
    check_root(root, what)
    path = given_file(what, annotations) if annotations else find_file(what, [name], [root])
    data = read_json(path, what)
    if not isinstance(data, list):
        raise InputError(f"{what} {path}: expected a JSON list of {{image, caption}} records, "
                         f"got {type(data).__name__}")
    tagger = tagger or spacy_tagger()
    report, items, seen = new_report(what, [path]), [], set()
    for k, rec in enumerate(data):
        report["records"] += 1
        where = f"{path}[{k}]"
        captions = rec.get("caption") if isinstance(rec, dict) else None
        captions = [captions] if isinstance(captions, str) else captions
        if not (isinstance(rec, dict) and isinstance(rec.get("image"), str) and rec["image"].strip()
                and isinstance(captions, list) and captions and all(isinstance(c, str) and c.strip()
                                                                    for c in captions)):
            malformed(report, where, "expected {image: path, caption: [captions]}")
            continue
        if escape(report, where, [rec["image"]]):
            continue
        image = first_existing([rec["image"], os.path.join("images", os.path.basename(rec["image"]))], [root])
        if image is None:
            missing(report, [rec["image"]], seen)
            continue
        for j, caption in enumerate(captions):
            item_id = f"{k}.{j}"
            items.append(Item(id=item_id, images=[image], texts=order_texts(caption, tagger, item_rng(seed, item_id)),
                              meta=dict(perturbations=list(PERTURBATIONS), generated=True)))
    return finish(report, items, what, rec_example(data), [root])


def rec_example(data):
    first = next((r for r in data if isinstance(r, dict) and isinstance(r.get("image"), str)), None)
    return first["image"] if first else "<image>"
