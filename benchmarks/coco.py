"""MS-COCO captions (Chen et al., 2015): training data of Table 3 and a retrieval check (1 image, 10 captions).

    annotations/captions_train2014.json   {images: [{id, file_name}], annotations: [{image_id, id, caption}]}
    train2014/COCO_train2014_<id>.jpg

Item = 1 image, its caption and 9 captions of other images (drawn per item); Top-1 / Top-5.
"""
import os


from benchmarks.fetching import COCO_ZIPS, JOBS, confirm, fetch_archive, mirrored, new_tally, pending_size
from benchmarks.reading import (digits, is_key, listed, Item, check_root, draw, escape, find_file, first_existing, finish, given_file, item_rng,
                                malformed, missing, new_report, read_json)
from common import InputError

LAYOUT = "annotations/captions_train2014.json + train2014/COCO_train2014_<id>.jpg"
FETCHES = ("COCO 2014 captions from annotations_trainval2014.zip (253 MB); --with-images --yes: COCO train2014.zip "
           "(13.5 GB)")
HINT = ("python -m tools.download coco --with-images --yes (COCO 2014 captions 253 MB + COCO train2014.zip "
        "13.5 GB)")
COCO_CAPTION_FILES = ("annotations/captions_train2014.json", "annotations/captions_val2014.json")

COCO_CAPTIONS = ("captions_train2014.json", "captions_val2014.json")


def load(root, annotations=None, split=None, seed=0, n_negatives=9):
    """captions_{train,val}2014.json -> one Item per caption: 1 image, texts [caption, n_negatives other captions].

    Negatives are captions of other images, drawn per item. The file is `annotations`, else captions_<split>2014.json
    (split "train" / "val"; None = train, else val) in root or root/annotations; images (file_name) in
    root/<subset>, root/images/<subset>, root/images/mscoco/images/<subset>, root/coco/<subset>, root/images or root.
    """
    check_root(root, "MS-COCO")
    folders = [root, os.path.join(root, "annotations")]
    if annotations:
        path = given_file("MS-COCO captions", annotations)
    elif split:
        path = find_file("MS-COCO captions", [f"captions_{split}2014.json"], folders)
    else:
        path = find_file("MS-COCO captions", COCO_CAPTIONS, folders)
    sub = "val" if "val" in os.path.basename(path) else "train"
    data = read_json(path, "MS-COCO captions")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise InputError(f"MS-COCO captions {path} lacks an 'annotations' list")
    report, seen = new_report("coco", [path]), set()
    names = {im["id"]: im["file_name"] for im in listed(data, "images")
             if is_key(im.get("id")) and isinstance(im.get("file_name"), str)}
    image_dirs = coco_image_dirs(root, f"{sub}2014")
    caps = []
    for i, a in enumerate(data["annotations"]):
        report["records"] += 1
        if not isinstance(a, dict) or not isinstance(a.get("caption"), str) or not a["caption"].strip() \
                or not is_key(a.get("image_id")):
            malformed(report, f"{path}[{i}]", "not an annotation with image_id and caption")
            continue
        caps.append((a["image_id"], str(a["caption"]).strip(), a.get("id", i)))
    pool = [(image_id, c) for image_id, c, _ in caps]
    items = []
    for image_id, caption, cid in caps:
        cands = [names[image_id]] if names.get(image_id) else []
        if escape(report, f"{path}[image_id {image_id}]", cands):
            continue
        if digits(image_id):
            cands.append(f"COCO_{sub}2014_{int(image_id):012d}.jpg")
        image = first_existing(cands, image_dirs)
        if image is None:
            missing(report, cands[:1] or [str(image_id)], seen)
            continue
        negatives = draw(pool, n_negatives, item_rng(seed, cid), bad_keys={image_id}, bad_texts=[caption])
        items.append(Item(id=str(cid), images=[image], texts=[caption] + negatives, split=sub,
                          meta=dict(image_id=image_id)))
    return finish(report, items, "MS-COCO", "<file_name>", image_dirs)


# ---- fetching ------------------------------------------------------------------------------------------------------

def fetch(root, mirror=None, with_images=False, yes=False, jobs=JOBS):
    """The 2014 caption files of annotations_trainval2014.zip into root/annotations/; with_images: train2014.zip into
    root/ (train2014/)."""
    tally = new_tally()
    url, size, md5 = COCO_ZIPS["train2014.zip"]
    if with_images:
        confirm("coco: COCO train2014.zip", pending_size([("train2014.zip", size)], root), yes)
    a_url, a_size, a_md5 = COCO_ZIPS["annotations_trainval2014.zip"]
    fetch_archive([mirrored(a_url, mirror)], os.path.join(root, "annotations_trainval2014.zip"), root, tally, a_size,
                  md5=a_md5, rename=lambda n: n if n in COCO_CAPTION_FILES else None)
    if with_images:
        fetch_archive([mirrored(url, mirror)], os.path.join(root, "train2014.zip"), root, tally, size, md5=md5)
    return tally


def coco_image_dirs(root, subset):
    """Where COCO `<subset>` (train2014 / val2014) images are looked for (RefCOCOg and VQAv2 too)."""
    return [os.path.join(root, subset), os.path.join(root, "images", subset),
            os.path.join(root, "images", "mscoco", "images", subset), os.path.join(root, "coco", subset),
            os.path.join(root, "images"), root]


def manual_route(root):
    return (f"https://cocodataset.org/#download: {COCO_ZIPS['annotations_trainval2014.zip'][0]} (its "
            f"annotations/captions_*2014.json) and {COCO_ZIPS['train2014.zip'][0]}, unzipped into {root}/")
