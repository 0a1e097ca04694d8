"""ARO's COCO-Order (Yuksekgonul et al., 2023, §3): a COCO image against its caption and four word-order perturbations
of it (I->T, 5 texts; accuracy = the true caption scores highest).

    coco_karpathy_test.json      [{image: "val2014/COCO_val2014_<id>.jpg", caption: [5 captions], image_id}, ...]
    val2014/COCO_val2014_<id>.jpg

One item per caption (25,010 on the Karpathy test split), its texts drawn by benchmarks/perturbations.py from the
seed with a part-of-speech tagger (spaCy en_core_web_sm by default, `tagger` to inject another; benchmarks/aro.py
`read_order`). The JSON is BLIP's public file; the images COCO's val2014.zip.
"""
import os

from benchmarks.aro import BLIP_FILES, read_order
from benchmarks.fetching import COCO_ZIPS, JOBS, confirm, fetch_archive, fetch_one, mirrored, new_tally

LAYOUT = "coco_karpathy_test.json + val2014/COCO_val2014_<id>.jpg"
KARPATHY_TEST = "coco_karpathy_test.json"
FETCHES = f"{KARPATHY_TEST} (BLIP's, as ARO) + with --with-images --yes COCO val2014.zip (6.6 GB)"
HINT = f"python -m tools.download coco_order --with-images --yes ({KARPATHY_TEST} + COCO val2014.zip, 6.6 GB)"


def load(root, annotations=None, split=None, seed=0, tagger=None):
    """coco_karpathy_test.json -> one Item per caption, [image] x [caption, 4 perturbations] drawn from `seed`.
    tagger: text -> [(token, Penn tag)] (default spaCy en_core_web_sm; its absence is one error naming the install)."""
    return read_order(root, annotations, KARPATHY_TEST, "COCO-Order", seed, tagger)


def fetch(root, mirror=None, with_images=False, yes=False, jobs=JOBS):
    """The Karpathy test file; with --with-images COCO's val2014.zip unpacked to val2014/."""
    tally = new_tally()
    fetch_one(tally, KARPATHY_TEST, mirrored(f"{BLIP_FILES}/{KARPATHY_TEST}", mirror),
              os.path.join(root, KARPATHY_TEST))
    if with_images:
        url, size, md5 = COCO_ZIPS["val2014.zip"]
        confirm("COCO val2014.zip", size, yes)
        fetch_archive([mirrored(url, mirror)], os.path.join(root, "val2014.zip"), root, tally, size=size, md5=md5)
    return tally


def manual_route(root):
    return (f"{BLIP_FILES}/{KARPATHY_TEST} into {root}/; {COCO_ZIPS['val2014.zip'][0]} unzipped into {root}/ "
            f"(val2014/)")
