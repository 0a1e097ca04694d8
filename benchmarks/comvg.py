"""ComVG (Jiang et al., 2022): one sentence, its positive Visual Genome image and a negative one (§5.1, Table 1).

    compositional_visual_genome.csv   id,sentence,pos_triplet,neg_triplet,pos_image_id,neg_image_id,neg_value
    VG_100K/<image_id>.jpg            (or VG_100K_2/, vg_concept/, images/, or the folder itself)

5,400 rows; neg_value subject / object / verb says which part of the triplet the negative image changes. Item = the
sentence against [pos, neg] images. `fetch` takes the official code's CSV and only the 524 images it references.
"""
import csv
import os
import sys

from benchmarks.fetching import (DSD_RAW, JOBS, VG_ARCHIVES, count, existing_image, fetch_images, fetch_one, mirrored,
                                 new_tally)
from benchmarks.reading import (Item, check_root, csv_records, find_file, finish, given_file, image_files, malformed,
                                new_report)
from common import InputError

LAYOUT = "compositional_visual_genome.csv + VG_100K/<image_id>.jpg"
FETCHES = "the ComVG CSV (0.6 MB, github eric-ai-lab/DSD) + only the 524 Visual Genome images it uses (~0.1 GB)"
HINT = "python -m tools.download comvg (the ComVG CSV + the 524 Visual Genome images it uses, ~0.1 GB)"
COMVG_CSV_URL = f"{DSD_RAW}/compositional_visual_genome.csv"
COMVG_CSV_SIZE = 556_175
COMVG_CSV_SHA256 = "9ace4e5d850aca75d42c0bfca420a89d5dac76c4a7c8460b846502579633c38a"
VG_IMAGE_BASES = ("https://cs.stanford.edu/people/rak248/VG_100K", "https://cs.stanford.edu/people/rak248/VG_100K_2")
COMVG_CSV = ("compositional_visual_genome.csv", "ComVG.csv", "comvg.csv")
COMVG_IMAGE_DIRS = ("VG_100K", "VG_100K_2", "vg_concept", "images", "")
COMVG_FIELDS = ("id", "sentence", "pos_triplet", "neg_triplet", "pos_image_id", "neg_image_id", "neg_value")
COMVG_KINDS = {"subject": "subject", "object": "object", "verb": "verb", "predicate": "verb"}


def load(root, annotations=None, split=None, seed=0):
    """ComVG CSV -> Items: images [pos, neg] `<image_id>.jpg`, texts [sentence], category subject / object / verb.

    The CSV is `annotations`, else compositional_visual_genome.csv / ComVG.csv / comvg.csv in `root`; images are
    looked up in root/VG_100K, root/VG_100K_2, root/vg_concept, root/images and root. ComVG has no publisher split
    (`split` and `seed` are unused: the items carry no drawn negatives).
    """
    check_root(root, "ComVG")
    path = given_file("ComVG CSV", annotations) if annotations else find_file("ComVG CSV", COMVG_CSV, [root])
    folders = [os.path.join(root, d) if d else root for d in COMVG_IMAGE_DIRS]
    report, items, seen = new_report("comvg", [path]), [], set()
    for line, row in csv_records(report, path, "ComVG CSV", COMVG_FIELDS):
        where = f"{path}:{line}"
        sentence, kind = row["sentence"].strip(), row["neg_value"].strip().lower()
        ids = [row["pos_image_id"].strip(), row["neg_image_id"].strip()]
        if not sentence or not all(ids):
            malformed(report, where, "empty sentence or image id")
            continue
        if kind not in COMVG_KINDS:
            malformed(report, where, f"neg_value {row['neg_value']!r} is not subject / object / verb")
            continue
        names = [i if i.lower().endswith((".jpg", ".jpeg", ".png")) else f"{i}.jpg" for i in ids]
        paths = image_files(report, where, names, folders, seen)
        if paths is None:
            continue
        items.append(Item(id=row["id"].strip() or str(report["records"]), images=paths, texts=[sentence],
                          category=COMVG_KINDS[kind],
                          meta=dict(pos_triplet=row["pos_triplet"], neg_triplet=row["neg_triplet"])))
    return finish(report, items, "ComVG", "<pos_image_id>.jpg", folders)


# ---- fetching ----------------------------------------------------------------------------------------------------

def fetch(root, mirror=None, with_images=False, yes=False, jobs=JOBS, csv_sha256=COMVG_CSV_SHA256,
          csv_size=COMVG_CSV_SIZE):
    """The ComVG CSV of the official code + only the Visual Genome images it references (pos_image_id,
    neg_image_id), each from VG_100K/ or else VG_100K_2/, stored as root/<that folder>/<id>.jpg."""
    tally = new_tally()
    csv_path = os.path.join(root, "compositional_visual_genome.csv")
    if not fetch_one(tally, "compositional_visual_genome.csv", mirrored(COMVG_CSV_URL, mirror), csv_path, csv_size,
                     csv_sha256):
        return tally
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"pos_image_id", "neg_image_id"} <= set(rows[0]):
        raise InputError(f"{csv_path} has no pos_image_id / neg_image_id columns")
    ids = sorted({r[k].strip() for r in rows for k in ("pos_image_id", "neg_image_id")}, key=lambda s: (len(s), s))
    folders = [os.path.join(root, d) if d else root for d in COMVG_IMAGE_DIRS]
    jobs_list = []
    for image_id in ids:
        name = f"{image_id}.jpg"
        if not image_id.isdigit():
            count(tally, name, "failed", "not a Visual Genome image id")
        elif existing_image([name], folders):
            count(tally, name, "present")
        else:
            bases = [mirrored(b, mirror) for b in VG_IMAGE_BASES]
            jobs_list.append((name, [(f"{b}/{name}", os.path.join(root, b.rsplit("/", 1)[1], name)) for b in bases]))
    print(f"comvg: {len(ids)} Visual Genome images referenced, {len(jobs_list)} to fetch "
          f"(~{len(jobs_list) * 0.15:.0f} MB)", file=sys.stderr)
    fetch_images(jobs_list, tally, jobs, desc="Visual Genome")
    return tally


def manual_route(root):
    """Where to get it by hand, for what failed."""
    return (f"the CSV from https://github.com/eric-ai-lab/DSD/tree/main/data into {root}/; the images from "
            f"Visual Genome's archives {VG_ARCHIVES['images.zip'][0]} (9.7 GB) and "
            f"{VG_ARCHIVES['images2.zip'][0]} (5.5 GB), unzipped into {root}/ (VG_100K/, VG_100K_2/)")
