"""ARO's COCO-Order (Yuksekgonul et al., 2023, §3): a COCO image against its caption and four word-order perturbations
of it (I->T, 5 texts; accuracy = the true caption scores highest).

    coco_karpathy_test.json      [{image: "val2014/COCO_val2014_<id>.jpg", caption: [5 captions], image_id}, ...]
    val2014/COCO_val2014_<id>.jpg

One item per caption (25,010 on the Karpathy test split), its texts drawn by benchmarks/perturbations.py from the
seed with a part-of-speech tagger (spaCy en_core_web_sm by default, `tagger` to inject another). `read_order` reads
Flickr30k-Order's file too. The JSON is BLIP's public file; the images COCO's val2014.zip.
"""
import os

from benchmarks.fetching import COCO_ZIPS, JOBS, FetchError, confirm, count, fetch_archive, mirrored, new_tally
from benchmarks.fetching import fetch as fetch_file
from benchmarks.perturbations import PERTURBATIONS, order_texts, spacy_tagger
from benchmarks.reading import (Item, check_root, escape, find_file, first_existing, finish, given_file, item_rng,
                                malformed, missing, new_report, read_json)
from common import InputError

LAYOUT = "coco_karpathy_test.json + val2014/COCO_val2014_<id>.jpg"
BLIP_FILES = "https://storage.googleapis.com/sfr-vision-language-research/datasets"
KARPATHY_TEST = "coco_karpathy_test.json"
FETCHES = f"{KARPATHY_TEST} (BLIP's, as ARO) + with --with-images --yes COCO val2014.zip (6.6 GB)"
HINT = f"python -m tools.download coco_order --with-images --yes ({KARPATHY_TEST} + COCO val2014.zip, 6.6 GB)"


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


def load(root, annotations=None, split=None, seed=0, tagger=None):
    """coco_karpathy_test.json -> one Item per caption, [image] x [caption, 4 perturbations] drawn from `seed`.
    tagger: text -> [(token, Penn tag)] (default spaCy en_core_web_sm; its absence is one error naming the install)."""
    return read_order(root, annotations, KARPATHY_TEST, "COCO-Order", seed, tagger)


def fetch(root, mirror=None, with_images=False, yes=False, jobs=JOBS):
    """The Karpathy test file; with --with-images COCO's val2014.zip unpacked to val2014/."""
    tally = new_tally()
    try:
        count(tally, KARPATHY_TEST, fetch_file(mirrored(f"{BLIP_FILES}/{KARPATHY_TEST}", mirror),
                                               os.path.join(root, KARPATHY_TEST)))
    except FetchError as e:
        count(tally, KARPATHY_TEST, "failed", str(e))
    if with_images:
        url, size, md5 = COCO_ZIPS["val2014.zip"]
        confirm("COCO val2014.zip", size, yes)
        fetch_archive([mirrored(url, mirror)], os.path.join(root, "val2014.zip"), root, tally, size=size, md5=md5)
    return tally


def manual_route(root):
    return (f"{BLIP_FILES}/{KARPATHY_TEST} into {root}/; {COCO_ZIPS['val2014.zip'][0]} unzipped into {root}/ "
            f"(val2014/)")
