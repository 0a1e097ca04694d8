"""Winoground (Thrush et al., 2022): two images, two captions with the same words in another order (Tables 8, 10).

    examples.jsonl   {id, image_0, image_1, caption_0, caption_1, tag, secondary_tag, num_main_preds, collapsed_tag}
    images/<image_k>.png

400 examples; item = 2 images x 2 captions, image k <-> caption k, judged text / image / group (datasets.py).
Fetched from the Hugging Face Hub (gated: accept its terms, log in).
"""
import io
import json
import os
import shutil
import zipfile

from benchmarks.fetching import (JOBS, FetchError, count, extract, hub_error, marker_path, new_tally, unpacked)
from benchmarks.reading import (Item, check_root, find_file, finish, given_file, image_files, malformed, new_report,
                                read_text)
from common import InputError

LAYOUT = "examples.jsonl + images/<image>.png"
FETCHES = ("Hugging Face dataset facebook/winoground: examples.jsonl + images.zip, 800 images (gated: accept its terms "
           "at huggingface.co and log in first)")
HINT = "python -m tools.download winoground (gated on the Hugging Face Hub: accept its terms and log in first)"
WINOGROUND_REPO = "facebook/winoground"
WINOGROUND_FILES = ("data/examples.jsonl", "data/images.zip")

WINOGROUND_FIELDS = ("id", "image_0", "image_1", "caption_0", "caption_1")


def load(root, annotations=None, split=None, seed=0):
    """examples.jsonl -> one Item per example: images [image_0, image_1], texts [caption_0, caption_1].

    category = collapsed_tag (Object / Relation / Both); meta keeps tag, secondary_tag, num_main_preds. The file is
    `annotations`, else examples.jsonl in root or root/data (the Hugging Face layout); images `<image_k>.png` in
    root/images or root/data/images (unzip images.zip first). No split; `seed` unused.
    """
    check_root(root, "Winoground")
    path = (given_file("Winoground examples", annotations) if annotations else
            find_file("Winoground examples", ["examples.jsonl"], [root, os.path.join(root, "data")]))
    folders = list(dict.fromkeys([os.path.join(os.path.dirname(path), "images"), os.path.join(root, "images"),
                                  os.path.join(root, "data", "images")]))
    if not any(os.path.isdir(d) for d in folders):
        zips = [p for p in (os.path.join(os.path.dirname(d), "images.zip") for d in folders) if os.path.isfile(p)]
        hint = f" (unzip {zips[0]} there)" if zips else ""
        raise InputError(f"Winoground image folder not found: looked for {', '.join(folders)}{hint}")
    report, items, seen = new_report("winoground", [path]), [], set()
    with io.StringIO(read_text(path, "Winoground examples"), newline=None) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            report["records"] += 1
            where = f"{path}:{n}"
            try:
                ex = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
                malformed(report, where, f"not JSON ({getattr(e, 'msg', 'nested too deeply')})")
                continue
            if not isinstance(ex, dict) or not all(ex.get(k) not in (None, "") for k in WINOGROUND_FIELDS):
                malformed(report, where, f"missing one of {', '.join(WINOGROUND_FIELDS)}")
                continue
            odd = [k for k in WINOGROUND_FIELDS[1:] if not isinstance(ex[k], str) or not ex[k].strip()]
            if odd:
                malformed(report, where, f"{odd[0]} is {json.dumps(ex[odd[0]])[:40]}, not a string")
                continue
            names = [ex[k] if os.path.splitext(ex[k])[1] else f"{ex[k]}.png" for k in ("image_0", "image_1")]
            paths = image_files(report, where, names, folders, seen)
            if paths is None:
                continue
            items.append(Item(id=str(ex["id"]), images=paths, texts=[ex["caption_0"], ex["caption_1"]],
                              category=str(ex.get("collapsed_tag", "")),
                              meta={k: ex.get(k) for k in ("tag", "secondary_tag", "num_main_preds")}))
    return finish(report, items, "Winoground", "<image_0>.png", folders)


# ---- VL-CheckList (Zhao et al., 2022) ------------------------------------------------------------------------------


# ---- fetching ------------------------------------------------------------------------------------------------------

def winoground_examples_ok(path):
    try:
        with open(path, encoding="utf-8") as f:
            return all("image_0" in json.loads(line) for line in f if line.strip())
    except (OSError, ValueError, TypeError, RecursionError):
        return False


def fetch(root, mirror=None, with_images=False, yes=False, jobs=JOBS, repo_id=WINOGROUND_REPO):
    """examples.jsonl -> root/examples.jsonl and images.zip -> root/images/, through huggingface_hub (its own
    progress bars, resume and integrity checks; staged in root/.hf and removed once unpacked)."""
    tally = new_tally()
    examples = os.path.join(root, "examples.jsonl")
    if winoground_examples_ok(examples) and unpacked(root, "images.zip"):
        count(tally, "examples.jsonl", "present")
        count(tally, "images.zip", "present")
        return tally
    from huggingface_hub import hf_hub_download
    staging = os.path.join(root, ".hf")
    try:
        paths = [hf_hub_download(repo_id=repo_id, repo_type="dataset", filename=name, local_dir=staging)
                 for name in WINOGROUND_FILES]
    except Exception as e:  # noqa: BLE001 - huggingface_hub and its HTTP client raise many types; all become one line
        if not any(f.endswith(".incomplete") for _, _, files in os.walk(staging) for f in files):
            shutil.rmtree(staging, ignore_errors=True)  # kept for a partial download: hf resumes it
        raise InputError(hub_error(e, repo_id)) from None
    if not winoground_examples_ok(paths[0]):
        count(tally, "examples.jsonl", "failed", f"{paths[0]} is not JSON lines with image_0 / image_1")
        return tally
    shutil.copyfile(paths[0], f"{examples}.part")
    os.replace(f"{examples}.part", examples)
    count(tally, "examples.jsonl", "fetched")
    try:
        with zipfile.ZipFile(paths[1]) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
        in_folder = all(n.startswith("images/") for n in names)  # unzip so that the images land in root/images/
        written = extract(paths[1], root, lambda n: n if in_folder else f"images/{n}")
    except (FetchError, zipfile.BadZipFile) as e:
        count(tally, "images.zip", "failed", str(e))
        return tally
    with open(marker_path(root, "images.zip"), "w") as f:
        json.dump(written, f)
    shutil.rmtree(staging, ignore_errors=True)
    count(tally, "images.zip", "fetched")
    return tally


def manual_route(root):
    return (f"https://huggingface.co/datasets/{WINOGROUND_REPO}: data/examples.jsonl into {root}/, "
            f"data/images.zip unzipped into {root}/images/")
