"""RefCOCOg (Mao et al., 2016; the refer toolkit's layout): one image, its referring expression and 9 others (Table 1).

    refs(google).p / refs(umd).p   pickled [{ref_id, ann_id, image_id, split, category_id, sentences: [{raw, sent}]}]
    instances.json                  {images: [{id, file_name}], annotations: [{id, bbox}], categories}
    train2014/COCO_train2014_<id 12 digits>.jpg

Item = 1 image, 10 texts (the expression + 9 of other refs, drawn per item); Top-1 / Top-5. The refs pickle is read
by an unpickler that accepts plain data only. Table 6 masks the referred object's box (`masked`).
"""
import math
import os
import pickle

from benchmarks.coco import coco_image_dirs
from benchmarks.fetching import COCO_ZIPS, JOBS, confirm, fetch_archive, mirrored, new_tally, pending_size
from benchmarks.reading import (digits, is_key, listed, DataMissing, Item, check_root, draw, escape, find_file, first_existing, finish,
                                given_file, item_rng, malformed, missing, new_report, read_json)
from common import InputError

LAYOUT = "refs(google).p + instances.json + train2014/COCO_train2014_<id>.jpg"
FETCHES = ("refcocog.zip (57 MB: refs(google).p, refs(umd).p, instances.json); --with-images --yes: COCO "
           "train2014.zip (13.5 GB)")
HINT = ("python -m tools.download refcocog --with-images --yes (refcocog.zip 57 MB + COCO train2014.zip "
        "13.5 GB)")
REFCOCOG_URLS = ("https://bvisionweb1.cs.unc.edu/licheng/referit/data/refcocog.zip",  # the publisher (often down)
                 "https://web.archive.org/web/20220413012904id_/"                    # its Internet Archive capture
                 "https://bvisionweb1.cs.unc.edu/licheng/referit/data/refcocog.zip")
REFCOCOG_SIZE = 56_712_951
REFCOCOG_SHA256 = "3d1f7e5b2ff2205940bf59de55f861f5f2cc1403fb980669933a7f9af1aa8211"


REFS_FILES = ("refs(google).p", "refs(umd).p")  # google first: the split the official code reads



class PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only (lists, dicts, strings, numbers: all a refs file holds): a pickle that names any
    class or function, the way a crafted file runs code, is refused before anything is called."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a refs file never does (refused, not run)")


def load_pickle(path):
    try:
        with open(path, "rb") as f:
            try:
                return PlainUnpickler(f).load()
            except UnicodeDecodeError:  # a Python 2 pickle with non-ASCII byte strings
                f.seek(0)
                return PlainUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError, TypeError) as e:
        raise InputError(f"RefCOCOg refs {path} is not a readable plain-data pickle: {type(e).__name__}: {e}") from None


def refcocog_file_names(report, refs_path, root, boxes=None):
    """image_id -> file_name from instances.json next to the refs file (or in root); {} with a warning if absent.
    `boxes` (a dict) is filled with ann_id -> bbox [x, y, w, h] in pixels."""
    folders = list(dict.fromkeys([os.path.dirname(refs_path), root, os.path.join(root, "refcocog")]))
    path = first_existing(["instances.json"], folders)
    if path is None:
        if boxes is not None:
            raise DataMissing(f"--mask-object needs the boxes of RefCOCOg's instances.json: not found in "
                              f"{', '.join(folders)}")
        report["warnings"].append(f"instances.json not found in {', '.join(folders)}; "
                                  "using COCO_train2014_%012d.jpg image names")
        return {}
    report["files"].append(path)
    data = read_json(path, "RefCOCOg instances")
    if boxes is not None:
        boxes.update({a["id"]: a.get("bbox") for a in listed(data, "annotations") if is_key(a.get("id"))})
    return {im["id"]: im["file_name"] for im in listed(data, "images")
            if is_key(im.get("id")) and isinstance(im.get("file_name"), str)}


class MaskedImage(str):
    """An image path whose `box` (x, y, w, h in pixels) `open_image` fills with the image's mean colour (Table 6)."""
    box = None


def masked(path, box):
    out = MaskedImage(path)
    out.box = tuple(float(v) for v in box)
    return out


def add_args(g):
    """The command-line options of this loader (datasets.add_data_args; the registry row maps them to `load`)."""
    g.add_argument("--split-by", choices=("google", "umd"),
                   help="RefCOCOg refs file: refs(google).p (default when present, the official code's) or refs(umd).p")
    g.add_argument("--ref-negatives", choices=("any", "split"),
                   help="RefCOCOg: the 9 negative expressions from any other ref (default, the official code's) or "
                        "from other refs of the same split")
    g.add_argument("--mask-object", action="store_true", default=None,
                   help="RefCOCOg (Table 6): fill the referred object's instances.json box with the image's mean colour")


def load(root, annotations=None, split=None, seed=0, n_texts=10, split_by=None, negatives="any",
                  mask_object=False):
    """refs(google).p / refs(umd).p + instances.json -> one Item per referring expression: 1 image, `n_texts` texts.

    texts = [the expression, n_texts-1 expressions of other objects (other ann_id)], drawn with a per-item seed from
    every ref of the file (negatives="any", as the official code draws them) or from the same split ("split").
    `split` keeps only refs of that split (train / val / test); None keeps all. The refs file is `annotations`, else
    refs(<split_by>).p in root or root/refcocog (split_by None: google preferred, the official code's, else umd);
    images COCO_train2014_%012d.jpg (or instances.json's file_name) in root/train2014, root/images/train2014,
    root/images/mscoco/images/train2014, root/coco/train2014, root/images or root. mask_object (Table 6): the
    referred object's instances.json box is filled with the image's mean colour when the image is opened.
    """
    check_root(root, "RefCOCOg")
    if negatives not in ("any", "split") or split_by not in (None, "google", "umd"):
        raise InputError(f"RefCOCOg: negatives {negatives!r} (any / split), split_by {split_by!r} (google / umd)")
    names = [f"refs({split_by}).p"] if split_by else REFS_FILES
    path = (given_file("RefCOCOg refs", annotations) if annotations else
            find_file("RefCOCOg refs", names, [root, os.path.join(root, "refcocog")]))
    refs = load_pickle(path)
    if not isinstance(refs, list):
        raise InputError(f"RefCOCOg refs {path} holds a {type(refs).__name__}, not a list of refs")
    report, seen, boxes = new_report("refcocog", [path]), set(), ({} if mask_object else None)
    report.update(refs_file=os.path.basename(path), negatives=negatives, mask_object=bool(mask_object))
    file_names = refcocog_file_names(report, path, root, boxes)
    folders = coco_image_dirs(root, "train2014")
    sents, every = [], []  # (ref, sentence text, sent_id) of the split; (ann_id, text) of every ref
    for i, ref in enumerate(refs):
        report["records"] += 1
        where = f"{path}[{i}]"
        try:
            texts = [(s.get("sent") or s.get("raw") or "").strip() for s in ref["sentences"]]
            ids = [s.get("sent_id", k) for k, s in enumerate(ref["sentences"])]
            if not (is_key(ref["image_id"]) and is_key(ref["ann_id"])):
                raise TypeError("image_id and ann_id must be numbers or names")
        except (KeyError, TypeError, AttributeError) as e:
            malformed(report, where, f"not a ref with image_id, ann_id, sentences ({type(e).__name__}: {e})")
            continue
        if not any(texts):
            malformed(report, where, "no sentence text")
            continue
        every += [(ref["ann_id"], t) for t in texts if t]
        if split is not None and str(ref.get("split", "")) != split:
            report["other_split"] = report.get("other_split", 0) + 1
            continue
        sents += [(ref, t, sid) for t, sid in zip(texts, ids) if t]
    pool = every if negatives == "any" else [(ref["ann_id"], t) for ref, t, _ in sents]
    items = []
    for ref, text, sid in sents:
        image_id = ref["image_id"]
        names = [f"COCO_train2014_{int(image_id):012d}.jpg" if digits(image_id) else str(image_id)]
        if file_names.get(image_id):
            names.append(file_names[image_id])
        if escape(report, f"{path}[ref_id {ref.get('ref_id')}]", names):
            continue
        image = first_existing(names, folders)
        if image is None:
            missing(report, names[:1], seen)
            continue
        if mask_object:
            box = boxes.get(ref["ann_id"])
            if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
                malformed(report, f"{path}[ann_id {ref['ann_id']}]", "no bbox (4 finite numbers) in instances.json to mask")
                continue
            image = masked(image, box)
        item_id = f"{ref.get('ref_id', ref['ann_id'])}/{sid}"
        negatives = draw(pool, n_texts - 1, item_rng(seed, item_id), bad_keys={ref["ann_id"]}, bad_texts=[text])
        items.append(Item(id=item_id, images=[image], texts=[text] + negatives, split=str(ref.get("split", "")),
                          meta=dict(ref_id=ref.get("ref_id"), ann_id=ref["ann_id"], image_id=image_id,
                                    category_id=ref.get("category_id"))))
    report["short_items"] = sum(len(it.texts) < n_texts for it in items)
    return finish(report, items, "RefCOCOg", "COCO_train2014_<image_id 12 digits>.jpg", folders)


# ---- fetching ------------------------------------------------------------------------------------------------------

def fetch(root, mirror=None, with_images=False, yes=False, jobs=JOBS):
    """refcocog.zip (its refcocog/ folder) into root/; with_images: COCO train2014.zip into root/ (train2014/)."""
    tally = new_tally()
    url, size, md5 = COCO_ZIPS["train2014.zip"]
    if with_images:
        confirm("refcocog: COCO train2014.zip", pending_size([("train2014.zip", size)], root), yes)
    fetch_archive([mirrored(u, mirror) for u in REFCOCOG_URLS], os.path.join(root, "refcocog.zip"), root, tally,
                  REFCOCOG_SIZE, REFCOCOG_SHA256,
                  rename=lambda n: n.split("/", 1)[1] if n.startswith("refcocog/") else None)
    if with_images:
        fetch_archive([mirrored(url, mirror)], os.path.join(root, "train2014.zip"), root, tally, size, md5=md5)
    return tally


def manual_route(root):
    return (f"refcocog.zip ({REFCOCOG_URLS[1]}, see github lichengunc/refer) unzipped into "
            f"{os.path.dirname(root) or '.'}/; COCO {COCO_ZIPS['train2014.zip'][0]} unzipped into {root}/")
