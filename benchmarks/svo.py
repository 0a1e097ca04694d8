"""SVO-Probes of GDBench (Hendricks & Nematzadeh, 2021; Krojer et al., 2023 §4): a sentence against its image and an
image whose subject, verb or object differs (T->I, 2 images; accuracy, per changed part).

    svo_probes.csv     sentence,pos_triplet,neg_triplet,subj_neg,verb_neg,obj_neg,pos_image_id,neg_image_id,
                       pos_url,neg_url
    images/<id>.jpg    fetched from pos_url / neg_url by `python -m tools.download svo` (dead URLs counted, skipped)

category subject / verb / object from the True one of subj_neg / verb_neg / obj_neg (DiffusionITM's svo_subj /
svo_verb / svo_obj tasks, read here from the one CSV: its download script writes svo.json where its loader does not
look). A row whose images did not download is counted as missing, as any missing image.
"""
import csv
import os
import sys

from benchmarks.fetching import JOBS, count, existing_image, fetch_images, fetch_one, mirrored, new_tally
from benchmarks.reading import (Item, check_root, csv_records, find_file, finish, given_file, image_files, malformed,
                                new_report)

LAYOUT = "svo_probes.csv + images/<image_id>.jpg"
SVO_CSV = "svo_probes.csv"
SVO_CSV_URL = "https://raw.githubusercontent.com/google-deepmind/svo_probes/main/svo_probes.csv"
FETCHES = f"{SVO_CSV} (github google-deepmind/svo_probes) + its images from their URLs (dead ones counted)"
HINT = f"python -m tools.download svo ({SVO_CSV} + the images from their URLs; dead URLs are counted and skipped)"
SVO_FIELDS = ("sentence", "pos_triplet", "neg_triplet", "subj_neg", "verb_neg", "obj_neg", "pos_image_id",
              "neg_image_id")
KINDS = (("subj_neg", "subject"), ("verb_neg", "verb"), ("obj_neg", "object"))


def truthy(value):
    return str(value).strip().lower() in ("true", "1", "yes")


def load(root, annotations=None, split=None, seed=0):
    """svo_probes.csv -> one Item per row: images [pos, neg] images/<id>.jpg, texts [sentence], category subject /
    verb / object. No split; `seed` unused."""
    check_root(root, "SVO-Probes")
    path = given_file("SVO-Probes CSV", annotations) if annotations else find_file("SVO-Probes CSV", [SVO_CSV], [root])
    folders = [os.path.join(root, "images"), root]
    report, items, seen = new_report("svo", [path]), [], set()
    for line, row in csv_records(report, path, "SVO-Probes CSV", SVO_FIELDS):
        where = f"{path}:{line}"
        kinds = [name for col, name in KINDS if truthy(row[col])]
        ids = [row["pos_image_id"].strip(), row["neg_image_id"].strip()]
        if not row["sentence"].strip() or not all(ids) or len(kinds) != 1:
            malformed(report, where, "expected a sentence, two image ids and exactly one of subj_neg / verb_neg / "
                                     "obj_neg True")
            continue
        names = [i if i.lower().endswith((".jpg", ".jpeg", ".png")) else f"{i}.jpg" for i in ids]
        paths = image_files(report, where, names, folders, seen)
        if paths is None:
            continue
        items.append(Item(id=str(line), images=paths, texts=[row["sentence"].strip()], category=kinds[0],
                          meta=dict(pos_triplet=row["pos_triplet"], neg_triplet=row["neg_triplet"])))
    return finish(report, items, "SVO-Probes", "images/<pos_image_id>.jpg", folders)


def fetch(root, mirror=None, with_images=False, yes=False, jobs=JOBS):
    """The CSV, then every image it names from its URL into images/<id>.jpg (a dead URL is one failed file)."""
    tally = new_tally()
    csv_path = os.path.join(root, SVO_CSV)
    if not fetch_one(tally, SVO_CSV, mirrored(SVO_CSV_URL, mirror), csv_path):
        return tally
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    urls = {}
    for r in rows:
        for side in ("pos", "neg"):
            image_id, url = (r.get(f"{side}_image_id") or "").strip(), (r.get(f"{side}_url") or "").strip()
            if image_id.isdigit() and url.startswith(("http://", "https://")):
                urls.setdefault(f"{image_id}.jpg", url)
    images = os.path.join(root, "images")
    todo = []
    for name, url in sorted(urls.items()):
        if existing_image([name], [images]):
            count(tally, name, "present")
        else:
            todo.append((name, [(mirrored(url, mirror), os.path.join(images, name))]))
    print(f"svo: {len(urls)} images named, {len(todo)} to fetch", file=sys.stderr)
    fetch_images(todo, tally, jobs, desc="SVO-Probes")
    return tally


def manual_route(root):
    return (f"{SVO_CSV_URL} into {root}/, each row's pos_url / neg_url into "
            f"{root}/images/<pos_image_id / neg_image_id>.jpg")
