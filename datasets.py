"""Data sets of §5.1 (ComVG, RefCOCOg, VQAv2, Winoground, VL-CheckList, MS-COCO), read as their publishers ship them.

Every loader yields `Item`s of one shape, so evaluation and training need no per-data-set branches beyond metrics:
an item is a small image-text matching problem whose score matrix is (len(images), len(texts)). How an item is judged
(`item_metrics`) and the paper's columns of each data set (`COLUMNS`) are defined here, beside its format:

    ComVG          correct = s[pos, sentence] > s[neg, sentence]                   Subjects / Objects / Predicate / Average
    RefCOCOg       rank of the true text among the 10 (others with s >= true)      Top-1 / Top-5
    VQAv2          Top-1: paper form, Binary = the true image beats the 9 others     Binary (yes/no) / Other / All
                   for its statement, Other = the true text of the 10; JSON form: the true text of the 10
    Winoground     text  = s(c0,i0) > s(c1,i0) and s(c1,i1) > s(c0,i1)
                   image = s(c0,i0) > s(c0,i1) and s(c1,i1) > s(c1,i0); group = both     Text / Image / Group, per tag
    VL-CheckList   correct = s(img, POS) > s(img, NEG)                             Attribute / Object / Relation / Average

    items, report = LOADERS["comvg"]("data/comvg")      # every loader: (root, annotations=None, split=None, seed=0)
    items, report = load_items("comvg")                 # the same, the folder found under data/ by any alias
    train, test = split_items(items, "0.05", seed=0)     # the few-shot split of §5.2

`report` counts what did not become an item: `malformed` records (each also listed in `warnings` with its file and
line / index), items skipped because an image is `missing_images` on disk (distinct files in `missing_files`).
A missing root, annotation file or image folder (no image found at all) raises `InputError` (`DataMissing`) with one
line naming what was looked for and every place searched; through `load_items` the line also says what goes where,
the `python -m tools.download` command and the offline `--dataset shapes` (`data_hint`). Negative texts are drawn
with `random.Random(f"{seed}/{item id}")`, so an item's candidates do not depend on which other items are loaded.

The few-shot split (`split_items`): items that share any (text, image) pair are joined into one group, the groups are
shuffled with the seed, and whole groups go to training until `shots` items are reached; every other group is the
held-out test split, so no test item shares a sentence-image pair with a training item. Data sets that ship a split
(RefCOCOg) draw the shots from their train split and test on `eval_split`.
"""
import csv
import io
import json
import math
import os
import pickle
import random
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch

from tools import download, shapes
from common import MAX_LISTED, InputError

# A CSV field may be as long as its file (the file is in memory already): no `field larger than field limit` at
# 131,072 characters; an over-long sentence is cut by the tokenizer, as any long text is.
csv.field_size_limit(2 ** 31 - 1)


@dataclass
class Item:
    id: str
    images: list        # image file paths; images[0] is the true image of texts[0]
    texts: list         # candidate texts; texts[0] is the true text of images[0] (Winoground: image k <-> text k)
    category: str = ""  # the table column the item counts towards, e.g. "subject" / "object" / "verb"
    split: str = ""     # the publisher's split where it has one (RefCOCOg: train / val / test)
    meta: dict = field(default_factory=dict)


# ---- shared helpers ----------------------------------------------------------------------------------------------


def new_report(dataset, files):
    return dict(dataset=dataset, files=list(files), records=0, items=0, malformed=0, missing_images=0,
                missing_files=[], n_missing_files=0, warnings=[])


def malformed(report, where, why):
    report["malformed"] += 1
    report["warnings"].append(f"{where}: {why}; skipped")


def missing(report, paths, seen):
    """Count an item skipped for images not on disk; `seen` is the set of distinct missing files."""
    report["missing_images"] += 1
    for p in paths:
        if p not in seen:
            seen.add(p)
            if len(report["missing_files"]) < MAX_LISTED:
                report["missing_files"].append(p)
    report["n_missing_files"] = len(seen)


class DataMissing(InputError):
    """A data set (or its annotation file, or all of its images) is not on disk; `load_items` adds `data_hint`."""


def check_root(root, what):
    if root is None or not os.path.isdir(root):
        raise DataMissing(f"{what} data root not found: {root} is not a folder")


def find_file(what, names, folders):
    """The first folders[i]/names[j] that exists (folders outer), else one-line InputError naming all of them."""
    found = find_image(names, folders)
    if found is None:
        raise DataMissing(f"{what} not found: looked for {' or '.join(names)} in {', '.join(folders)}")
    return found


def given_file(what, path):
    if not os.path.isfile(path):
        raise InputError(f"{what} not found: {path} is not a file")
    return path


def outside(name):
    """Why a file name read from a data file could leave the folder it is looked up in, or None if it cannot: every
    name a data file gives stays inside its data root. An absolute path (/x, C:\\x, \\\\host\\x), a '..' component, or a
    NUL byte may leave it (symlinks the user placed under the root are followed: the name itself is what is checked)."""
    if not isinstance(name, str) or not name:
        return "not a file name"
    if "\0" in name:
        return "a NUL byte"
    if os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[\\/]", name):
        return "an absolute path"
    if ".." in re.split(r"[\\/]", name):
        return "a '..' component"
    return None


def escape(report, where, names):
    """Count the record at `where` as malformed if any of `names` (from a data file) could leave its folder."""
    for name in names:
        why = outside(name)
        if why:
            malformed(report, where, f"file name {name!r} could leave the data folder ({why})")
            return True
    return False


def find_image(names, folders):
    """First existing folder/name over folders (outer) and candidate names (inner); None if none exists. A name that
    could leave its folder (`outside`) is never looked up."""
    for d in folders:
        for n in names:
            if outside(n):
                continue
            p = os.path.join(d, n)
            if os.path.isfile(p):
                return p
    return None


def finish(report, items, what, example, folders):
    """Fill the counts; no item at all because no image was found -> InputError naming the image folders."""
    report["items"] = len(items)
    if not items and report["missing_images"]:
        raise DataMissing(f"no {what} images found: looked for e.g. {example} in {', '.join(folders)}")
    if not items:
        first = f" (first: {report['warnings'][0]})" if report["warnings"] else ""
        other = f", {report['other_split']} of other splits" if report.get("other_split") else ""
        raise InputError(f"no usable {what} records in {', '.join(report['files'])}: "
                         f"{report['records']} records, {report['malformed']} malformed{other}{first}")
    return items, report


def read_text(path, what):
    """A UTF-8 file's text (a leading BOM dropped); any other encoding is an InputError naming the file, the offset
    of the first byte that is not UTF-8 and its line (the whole file is decoded at once: the offset is the file's)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{what} {path} is not UTF-8 text: byte {data[e.start]:#04x} at offset {e.start} "
                         f"(line {line}); save it as UTF-8") from None


def read_json(path, what):
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise InputError(f"{what} {path} is nested too deeply to be an annotation file (JSON parser's recursion "
                         "limit)") from None


def csv_rows(f, path, what, required):
    """csv.DictReader over `f` whose header holds every `required` column once; a lacking column or a column named
    twice (DictReader would keep the last) is an InputError naming the file and the column."""
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    twice = [c for c, n in Counter(header).items() if n > 1 and c]
    if twice:
        raise InputError(f"{what} {path}: the header names the column {twice[0]!r} {Counter(header)[twice[0]]} times")
    absent = [c for c in required if c not in header]
    if absent:
        raise InputError(f"{what} {path} lacks the column(s) {', '.join(absent)} "
                         f"(expected header {','.join(required)})")
    return reader


def draw(pool, k, rng, bad_keys=(), bad_texts=()):
    """k distinct texts from pool [(key, text)], skipping bad keys and texts (case-insensitive), in random order."""
    bad_texts = {t.strip().lower() for t in bad_texts}
    n = len(pool)
    out = []
    for tries in (min(n, 4 * k + 16), n):  # a small sample nearly always suffices; else the whole pool
        out, seen = [], set(bad_texts)
        for i in rng.sample(range(n), tries):
            key, text = pool[i]
            t = text.strip().lower()
            if key in bad_keys or t in seen:
                continue
            seen.add(t)
            out.append(text)
            if len(out) == k:
                return out
    return out


def item_rng(seed, item_id):
    return random.Random(f"{seed}/{item_id}")


# ---- ComVG (Jiang et al., 2022) ------------------------------------------------------------------------------------

COMVG_CSV = ("compositional_visual_genome.csv", "ComVG.csv", "comvg.csv")
COMVG_IMAGE_DIRS = ("VG_100K", "VG_100K_2", "vg_concept", "images", "")
COMVG_FIELDS = ("id", "sentence", "pos_triplet", "neg_triplet", "pos_image_id", "neg_image_id", "neg_value")
COMVG_KINDS = {"subject": "subject", "object": "object", "verb": "verb", "predicate": "verb"}


def load_comvg(root, annotations=None, split=None, seed=0):
    """ComVG CSV -> Items: images [pos, neg] `<image_id>.jpg`, texts [sentence], category subject / object / verb.

    The CSV is `annotations`, else compositional_visual_genome.csv / ComVG.csv / comvg.csv in `root`; images are
    looked up in root/VG_100K, root/VG_100K_2, root/vg_concept, root/images and root. ComVG has no publisher split
    (`split` and `seed` are unused: the items carry no drawn negatives).
    """
    check_root(root, "ComVG")
    path = given_file("ComVG CSV", annotations) if annotations else find_file("ComVG CSV", COMVG_CSV, [root])
    folders = [os.path.join(root, d) if d else root for d in COMVG_IMAGE_DIRS]
    report, items, seen = new_report("comvg", [path]), [], set()
    with io.StringIO(read_text(path, "ComVG CSV"), newline="") as f:
        reader = csv_rows(f, path, "ComVG CSV", COMVG_FIELDS)
        for row in reader:
            report["records"] += 1
            where = f"{path}:{reader.line_num}"
            if None in row or any(row[c] is None for c in COMVG_FIELDS):
                malformed(report, where, f"expected {len(COMVG_FIELDS)} fields")
                continue
            sentence, kind = row["sentence"].strip(), row["neg_value"].strip().lower()
            ids = [row["pos_image_id"].strip(), row["neg_image_id"].strip()]
            if not sentence or not all(ids):
                malformed(report, where, "empty sentence or image id")
                continue
            if kind not in COMVG_KINDS:
                malformed(report, where, f"neg_value {row['neg_value']!r} is not subject / object / verb")
                continue
            names = [i if i.lower().endswith((".jpg", ".jpeg", ".png")) else f"{i}.jpg" for i in ids]
            if escape(report, where, names):
                continue
            paths = [find_image([n], folders) for n in names]
            if None in paths:
                missing(report, [n for n, p in zip(names, paths) if p is None], seen)
                continue
            items.append(Item(id=row["id"].strip() or str(report["records"]), images=paths, texts=[sentence],
                              category=COMVG_KINDS[kind],
                              meta=dict(pos_triplet=row["pos_triplet"], neg_triplet=row["neg_triplet"])))
    return finish(report, items, "ComVG", "<pos_image_id>.jpg", folders)


# ---- RefCOCOg (Yu et al., 2016; refer toolkit layout) --------------------------------------------------------------

REFS_FILES = ("refs(google).p", "refs(umd).p")  # google first: the split the official code reads


def coco_image_dirs(root, subset):
    """Where COCO `<subset>` (train2014 / val2014) images are looked for."""
    return [os.path.join(root, subset), os.path.join(root, "images", subset),
            os.path.join(root, "images", "mscoco", "images", subset), os.path.join(root, "coco", subset),
            os.path.join(root, "images"), root]


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
    path = find_image(["instances.json"], folders)
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
        boxes.update({a.get("id"): a.get("bbox") for a in data.get("annotations", []) if isinstance(a, dict)})
    return {im.get("id"): im.get("file_name") for im in data.get("images", []) if isinstance(im, dict)}


class MaskedImage(str):
    """An image path whose `box` (x, y, w, h in pixels) `open_image` fills with the image's mean colour (Table 6)."""
    box = None


def masked(path, box):
    out = MaskedImage(path)
    out.box = tuple(float(v) for v in box)
    return out


def fill_box(image, box):
    """Table 6's masking: the box (x, y, w, h) filled with the image's mean colour, a fill that adds no shape of its
    own beyond the box's edges (black would add a dark patch the model may match to words)."""
    from PIL import ImageStat
    image = image.convert("RGB")                                          # a copy: the cached file stays as read
    x, y, w, h = box
    image.paste(tuple(round(v) for v in ImageStat.Stat(image).mean),
                (int(x), int(y), int(math.ceil(x + w)), int(math.ceil(y + h))))
    return image


def load_refcocog(root, annotations=None, split=None, seed=0, n_texts=10, split_by=None, negatives="any",
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
            ref["image_id"], ref["ann_id"]
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
        names = [f"COCO_train2014_{int(image_id):012d}.jpg" if str(image_id).isdigit() else str(image_id)]
        if file_names.get(image_id):
            names.append(file_names[image_id])
        if escape(report, f"{path}[ref_id {ref.get('ref_id')}]", names):
            continue
        image = find_image(names, folders)
        if image is None:
            missing(report, names[:1], seen)
            continue
        if mask_object:
            box = boxes.get(ref["ann_id"])
            if not (isinstance(box, (list, tuple)) and len(box) == 4):
                malformed(report, f"{path}[ann_id {ref['ann_id']}]", "no bbox in instances.json to mask")
                continue
            image = masked(image, box)
        item_id = f"{ref.get('ref_id', ref['ann_id'])}/{sid}"
        negatives = draw(pool, n_texts - 1, item_rng(seed, item_id), bad_keys={ref["ann_id"]}, bad_texts=[text])
        items.append(Item(id=item_id, images=[image], texts=[text] + negatives, split=str(ref.get("split", "")),
                          meta=dict(ref_id=ref.get("ref_id"), ann_id=ref["ann_id"], image_id=image_id,
                                    category_id=ref.get("category_id"))))
    report["short_items"] = sum(len(it.texts) < n_texts for it in items)
    return finish(report, items, "RefCOCOg", "COCO_train2014_<image_id 12 digits>.jpg", folders)


# ---- VQAv2 (Goyal et al., 2017) ------------------------------------------------------------------------------------

VQA_SUBSETS = {"train": "train2014", "val": "val2014"}
VQA_POOL = 3129  # the usual answer vocabulary size: candidates come from the most frequent answers


def vqa_files(root, annotations, split):
    """[(split, questions path, annotations path)] for the wanted splits present in root (or next to `annotations`)."""
    folders = [root, os.path.join(root, "annotations"), os.path.join(root, "Annotations"),
               os.path.join(root, "questions"), os.path.join(root, "Questions")]
    if annotations:
        given_file("VQAv2 annotations", annotations)
        name = os.path.basename(annotations)
        sub = next((s for s, d in VQA_SUBSETS.items() if d in name), "val")
        q_names = [f"v2_OpenEnded_mscoco_{VQA_SUBSETS[sub]}_questions.json"]
        q = find_file("VQAv2 questions", q_names, [os.path.dirname(annotations) or "."] + folders)
        return [(sub, q, annotations)]
    wanted = [split] if split else list(VQA_SUBSETS)
    if split and split not in VQA_SUBSETS:
        raise InputError(f"VQAv2 split {split!r}: annotations exist for {', '.join(VQA_SUBSETS)} only")
    found = []
    for sub in wanted:
        d = VQA_SUBSETS[sub]
        q = find_image([f"v2_OpenEnded_mscoco_{d}_questions.json"], folders)
        a = find_image([f"v2_mscoco_{d}_annotations.json"], folders)
        if q and a:
            found.append((sub, q, a))
    if not found:
        names = [f"v2_OpenEnded_mscoco_{VQA_SUBSETS[s]}_questions.json + v2_mscoco_{VQA_SUBSETS[s]}_annotations.json"
                 for s in wanted]
        raise InputError(f"VQAv2 annotations not found: looked for {' or '.join(names)} in {', '.join(folders)}")
    return found


def vqa_records(report, q_path, a_path):
    """([(question, annotation)], every annotation's multiple_choice_answer); bad records reported with file+index."""
    questions = read_json(q_path, "VQAv2 questions").get("questions")
    annotations = read_json(a_path, "VQAv2 annotations").get("annotations")
    if not isinstance(questions, list) or not isinstance(annotations, list):
        raise InputError(f"VQAv2 files {q_path} / {a_path} lack a 'questions' / 'annotations' list")
    by_id = {}
    for i, a in enumerate(annotations):
        try:
            a["question_id"], a["multiple_choice_answer"], [x["answer"] for x in a["answers"]]
            by_id[a["question_id"]] = a
        except (KeyError, TypeError) as e:
            malformed(report, f"{a_path}[{i}]", f"not an annotation with question_id, answers ({type(e).__name__})")
    out = []
    for i, q in enumerate(questions):
        report["records"] += 1
        where = f"{q_path}[{i}]"
        if not isinstance(q, dict) or not {"question_id", "question", "image_id"} <= set(q):
            malformed(report, where, "not a question with question_id, question, image_id")
        elif not isinstance(q["question"], str):
            malformed(report, where, f"question {json.dumps(q['question'])[:40]} is not a string")
        elif not str(q["image_id"]).isdigit():
            malformed(report, where, f"image_id {q['image_id']!r} is not a number")
        elif q["question_id"] not in by_id:
            malformed(report, where, f"question_id {q['question_id']} has no annotation in {a_path}")
        else:
            out.append((q, by_id[q["question_id"]]))
    return out, [str(a["multiple_choice_answer"]).strip() for a in by_id.values()]


VQA_PAPER = {"binary": "test.txt", "other": "vqa_text_test.csv"}  # the official code's data/ files (Table 1)
VQA_BINARY, VQA_OTHER = "The question is asking about yes or no", "The question is asking about others"


def vqa_paper_files(root, annotations):
    """{"binary": test.txt, "other": vqa_text_test.csv} (either may be None) in root or root/data, or next to an
    `annotations` file that is one of them; None when neither is there (or `annotations` is a JSON file)."""
    if annotations:
        if not annotations.endswith((".txt", ".csv")):
            return None
        given_file("VQAv2 paper file", annotations)
        folders = [os.path.dirname(annotations) or "."]
        found = {k: find_image([n], folders) for k, n in VQA_PAPER.items()}
        return dict(found, **{("binary" if annotations.endswith(".txt") else "other"): annotations})
    found = {k: find_image([n], [root, os.path.join(root, "data")]) for k, n in VQA_PAPER.items()}
    return found if any(found.values()) else None


def vqa_binary_lines(report, path):
    """[(line number, image name, statement)] of test.txt's yes/no lines (`<image>*<prefix>: <statement>`); the
    `...about others` lines are counted (report["other_lines"]), unused as in the official evaluation."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            report["records"] += 1
            name, sep, text = line.strip().partition("*")
            if not sep or not name.endswith(".jpg") or "/" in name:
                malformed(report, f"{path}:{n}", "not `COCO_val2014_<id>.jpg*<question type>: <statement>`")
            elif escape(report, f"{path}:{n}", [name]):
                continue
            elif text.startswith(VQA_BINARY):
                out.append((n, name, text.split(": ", 1)[-1].strip()))
            elif text.startswith(VQA_OTHER):
                report["other_lines"] = report.get("other_lines", 0) + 1
            else:
                malformed(report, f"{path}:{n}", "question type neither yes/no nor others")
    return out


def vqa_other_rows(report, path, n_texts):
    """[(row line, image name, [sentence, neg_sentence_1..9])] of vqa_text_test.csv."""
    cols = ["sentence"] + [f"neg_sentence_{k}" for k in range(1, n_texts)]
    out = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv_rows(f, path, "VQAv2", ["pos_image_id"] + cols)
        for row in reader:
            report["records"] += 1
            texts = [str(row[c] or "").strip() for c in cols]
            if not str(row["pos_image_id"] or "").strip().isdigit() or not all(texts):
                malformed(report, f"{path}:{reader.line_num}", "pos_image_id not a number or an empty sentence")
                continue
            out.append((reader.line_num, f"COCO_val2014_{int(row['pos_image_id']):012d}.jpg", texts))
    return out


def load_vqa_paper(root, files, split=None, seed=0, n_texts=10):
    """The official code's VQAv2 evaluation (Table 1) from its files, report["form"] = "paper":
    Binary (category yes/no), text-to-image: one Item per yes/no line of test.txt: images [its own, n_texts-1 others],
        texts [its statement]; the others are the images of other yes/no lines (a different image), drawn without
        replacement per item with the seed (its VQADataset_eval: random.sample of the other lines' images);
    Other (category other), image-to-text: one Item per row of vqa_text_test.csv: images [pos_image_id], texts
        [sentence, neg_sentence_1..9].
    Images COCO_val2014_<12 digits>.jpg in root/val2014, root/images/val2014, ..., root. All are val2014: `split`
    may be None or val."""
    if split not in (None, "val"):
        raise InputError(f"VQAv2 split {split!r}: the paper's files ({', '.join(VQA_PAPER.values())}) are val2014 "
                         "test items; use --split val (or all), or the VQAv2 JSON for other splits")
    report, seen = new_report("vqav2", [p for p in files.values() if p]), set()
    report["form"] = "paper"
    for kind, path in files.items():
        if not path:
            report["warnings"].append(f"{VQA_PAPER[kind]} not found next to the other file: no {kind} items")
    folders = coco_image_dirs(root, "val2014")
    items = []
    lines = vqa_binary_lines(report, files["binary"]) if files["binary"] else []
    for n, name, text in lines:
        rng = item_rng(seed, f"binary/{n}")
        others = []
        for j in rng.sample(range(len(lines)), min(len(lines), 4 * n_texts + 16)) + list(range(len(lines))):
            if lines[j][1] != name and j not in others:                  # a random order, then every line if short
                others.append(j)
            if len(others) == n_texts - 1:
                break
        names = [name] + [lines[j][1] for j in others]
        paths = [find_image([m], folders) for m in names]
        if None in paths:
            missing(report, [m for m, p in zip(names, paths) if p is None], seen)
            continue
        items.append(Item(id=f"binary/{n}", images=paths, texts=[text], category="yes/no", split="val",
                          meta=dict(file=VQA_PAPER["binary"], line=n)))
    for n, name, texts in (vqa_other_rows(report, files["other"], n_texts) if files["other"] else []):
        image = find_image([name], folders)
        if image is None:
            missing(report, [name], seen)
            continue
        items.append(Item(id=f"other/{n}", images=[image], texts=texts, category="other", split="val",
                          meta=dict(file=VQA_PAPER["other"], line=n)))
    report["short_items"] = sum(max(len(it.images), len(it.texts)) < n_texts for it in items)
    return finish(report, items, "VQAv2", "COCO_val2014_<image_id 12 digits>.jpg", folders)


def load_vqav2(root, annotations=None, split=None, seed=0, n_texts=10, pool_size=VQA_POOL):
    """VQAv2 -> Items: the paper's form from the official code's test.txt / vqa_text_test.csv when present in root
    (or given as `annotations`; `load_vqa_paper`), else this JSON form (report["form"] = "json"):
    VQAv2 questions + annotations JSON -> one Item per question: 1 image, `n_texts` "question answer" texts.

    texts[0] joins the question with its most common answer (multiple_choice_answer); the others with answers drawn
    per item from the `pool_size` most frequent multiple_choice_answers of the loaded files, never one an annotator
    gave for this question. category = answer_type (yes/no, number, other). Files: `annotations` (questions found
    next to it), else v2_OpenEnded_mscoco_{train,val}2014_questions.json + v2_mscoco_{train,val}2014_annotations.json
    in root, root/annotations, root/Annotations, root/questions or root/Questions (`split` "train" / "val" / None =
    both). Images COCO_{train,val}2014_%012d.jpg in root/{train,val}2014, root/images/{train,val}2014, root/images, root.
    """
    check_root(root, "VQAv2")
    paper = vqa_paper_files(root, annotations)
    if paper:
        return load_vqa_paper(root, paper, split, seed, n_texts)
    files = vqa_files(root, annotations, split)
    report = new_report("vqav2", [p for _, q, a in files for p in (q, a)])
    report["form"] = "json"
    records, counts = [], Counter()
    for sub, qp, ap in files:
        pairs, answers = vqa_records(report, qp, ap)
        records += [(sub, q, a) for q, a in pairs]
        counts.update(answers)
    pool = [(ans, ans) for ans, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:pool_size]]
    items, seen, all_folders = [], set(), []
    for sub, q, a in records:
        subset = VQA_SUBSETS[sub]
        folders = coco_image_dirs(root, subset)
        all_folders += [d for d in folders if d not in all_folders]
        names = [f"COCO_{subset}_{int(q['image_id']):012d}.jpg", f"{int(q['image_id']):012d}.jpg"]
        image = find_image(names, folders)
        if image is None:
            missing(report, names[:1], seen)
            continue
        answer = str(a["multiple_choice_answer"]).strip()
        given = [answer] + [str(x["answer"]) for x in a["answers"]]
        others = draw(pool, n_texts - 1, item_rng(seed, q["question_id"]), bad_texts=given)
        question = str(q["question"]).strip()
        items.append(Item(id=str(q["question_id"]), images=[image],
                          texts=[f"{question} {ans}" for ans in [answer] + others],
                          category=str(a.get("answer_type", "other")), split=sub,
                          meta=dict(question=question, answers=[answer] + others, image_id=q["image_id"])))
    report["short_items"] = sum(len(it.texts) < n_texts for it in items)
    return finish(report, items, "VQAv2", "COCO_val2014_<image_id 12 digits>.jpg", all_folders)


# ---- Winoground (Thrush et al., 2022) ------------------------------------------------------------------------------

WINOGROUND_FIELDS = ("id", "image_0", "image_1", "caption_0", "caption_1")


def load_winoground(root, annotations=None, split=None, seed=0):
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
            if escape(report, where, names):
                continue
            paths = [find_image([nm], folders) for nm in names]
            if None in paths:
                missing(report, [nm for nm, p in zip(names, paths) if p is None], seen)
                continue
            items.append(Item(id=str(ex["id"]), images=paths, texts=[ex["caption_0"], ex["caption_1"]],
                              category=str(ex.get("collapsed_tag", "")),
                              meta={k: ex.get(k) for k in ("tag", "secondary_tag", "num_main_preds")}))
    return finish(report, items, "Winoground", "<image_0>.png", folders)


# ---- VL-CheckList (Zhao et al., 2022) ------------------------------------------------------------------------------

VLC_KINDS = {"attribute": "Attribute", "object": "Object", "relation": "Relation"}
VLC_SOURCES = ("vg", "swig", "hake")  # the image folders of VL-CheckList's DATASETS.md (VAW images are VG's)


def vlc_category(rel):
    """Attribute / Object / Relation: the first path component naming one (case-insensitive), else None."""
    for part in re.split(r"[\\/]", rel):
        if part.lower() in VLC_KINDS:
            return VLC_KINDS[part.lower()]
    return None


def vlc_json_files(root, annotations):
    """[(path, key)] of the corpus's JSON files; key is the path relative to the corpus folder (it has a category)."""
    if annotations and os.path.isfile(annotations):
        return [(annotations, annotations)]
    if annotations and not os.path.isdir(annotations):
        raise InputError(f"VL-CheckList annotations not found: {annotations} is neither a file nor a folder")
    bases = [annotations] if annotations else [root, os.path.join(root, "data"),
                                               os.path.join(root, "vl-checklist", "data"),
                                               os.path.join(root, "VL-CheckList", "data")]
    out = []
    for base in bases:
        if not os.path.isdir(base):
            continue
        for d in sorted(os.listdir(base)):
            if d.lower() in VLC_KINDS and os.path.isdir(os.path.join(base, d)):
                for dirpath, dirnames, filenames in os.walk(os.path.join(base, d)):
                    dirnames.sort()
                    out += [(os.path.join(dirpath, f), os.path.relpath(os.path.join(dirpath, f), base))
                            for f in sorted(filenames) if f.lower().endswith(".json")]
        if out:
            return out
    raise InputError(f"VL-CheckList JSON files not found: looked for Attribute/, Object/, Relation/ folders of "
                     f"*.json in {', '.join(bases)}")


def vlc_image_roots(root, images):
    return [images] if images else [os.path.join(root, "images"), root]


def vlc_find(rel, key, roots):
    """An image path of a VL-CheckList JSON: relative to a per-source folder (vg/, swig/, hake/) under an images root."""
    hint = [s for s in VLC_SOURCES if s in key.lower() or (s == "vg" and "vaw" in key.lower())]
    subdirs = [""] + hint + [s for s in VLC_SOURCES if s not in hint]
    return find_image([os.path.join(s, rel) if s else rel for s in subdirs], roots)


VLC_MAX_PER_FILE = 1000  # its evaluate.py (task itc) keeps MAX_NUM / 2 records per file; configs/sample.yaml: 2000


def load_vlchecklist(root, annotations=None, split=None, seed=0, images=None, max_per_file=VLC_MAX_PER_FILE):
    """VL-CheckList JSON files [[image_path, {"POS": [...], "NEG": [...]}], ...] -> one Item per record, as its
    official evaluator (vl_checklist/evaluate.py, task itc) forms them.

    Each item: 1 image, texts [POS[0], NEG[0]] (a SWiG record with 3 POS / 3 NEG is still one item); records whose
    image is on disk, the first `max_per_file` of them per file (None or 0: all; the rest counted in
    report["over_cap"]); category = Attribute / Object / Relation from the file's path; meta["file"] = the path
    relative to the corpus folder (per-file accuracy).
    Files: `annotations` (one JSON file, or a corpus folder), else every *.json under Attribute/, Object/, Relation/
    (any case) in root, root/data, root/vl-checklist/data or root/VL-CheckList/data (the repository's data/ folder).
    Image paths in the JSON are relative to the source's image folder (vg/, swig/, hake/ as in VL-CheckList's
    DATASETS.md): looked up as IMAGES/<path> and IMAGES/{vg,swig,hake}/<path>, IMAGES = `images`, else root/images
    and root. No split; `seed` unused.
    """
    check_root(root, "VL-CheckList")
    files = vlc_json_files(root, annotations)
    roots = vlc_image_roots(root, images)
    report, items, seen = new_report("vlchecklist", [p for p, _ in files]), [], set()
    report.update(max_per_file=max_per_file or None, over_cap=0)
    for path, key in files:
        kept = 0
        category = vlc_category(key if key != path else os.path.abspath(path))
        if category is None:
            report["warnings"].append(f"{path}: no Attribute / Object / Relation folder in its path; "
                                      "counted in Average only")
        data = read_json(path, "VL-CheckList file")
        if not isinstance(data, list):
            malformed(report, path, "not a JSON list of [image_path, {POS, NEG}]")
            continue
        for i, rec in enumerate(data):
            report["records"] += 1
            where = f"{path}[{i}]"
            try:
                rel, texts = rec
                pos, neg = [t for t in texts["POS"] if t], [t for t in texts["NEG"] if t]
                assert isinstance(rel, str) and rel and pos and neg
                assert all(isinstance(texts[k], list) for k in ("POS", "NEG")) and all(
                    isinstance(t, str) for t in pos + neg)                      # "POS": "abc" is not three texts
            except (ValueError, TypeError, KeyError, AssertionError):
                malformed(report, where, "not [image_path, {\"POS\": [text], \"NEG\": [text]}] with texts")
                continue
            if escape(report, where, [rel]):
                continue
            image = vlc_find(rel, key, roots)
            if image is None:
                missing(report, [rel], seen)
                continue
            if max_per_file and kept >= max_per_file:
                report["over_cap"] += 1
                continue
            kept += 1
            items.append(Item(id=f"{key}[{i}]", images=[image], texts=[pos[0], neg[0]],
                              category=category or "", meta=dict(file=key)))
    return finish(report, items, "VL-CheckList", "<image_path> or vg/<image_path>", roots)


# ---- MS-COCO captions (Lin et al., 2014): training source for the zero-shot transfer of Table 8 ----------------------

COCO_CAPTIONS = ("captions_train2014.json", "captions_val2014.json")


def load_coco(root, annotations=None, split=None, seed=0, n_negatives=9):
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
    names = {im.get("id"): im.get("file_name") for im in data.get("images", []) if isinstance(im, dict)}
    image_dirs = coco_image_dirs(root, f"{sub}2014")
    caps = []
    for i, a in enumerate(data["annotations"]):
        report["records"] += 1
        if not isinstance(a, dict) or not isinstance(a.get("caption"), str) or not a["caption"].strip() \
                or a.get("image_id") is None:
            malformed(report, f"{path}[{i}]", "not an annotation with image_id and caption")
            continue
        caps.append((a["image_id"], str(a["caption"]).strip(), a.get("id", i)))
    pool = [(image_id, c) for image_id, c, _ in caps]
    items = []
    for image_id, caption, cid in caps:
        cands = [names[image_id]] if names.get(image_id) else []
        if escape(report, f"{path}[image_id {image_id}]", cands):
            continue
        if str(image_id).isdigit():
            cands.append(f"COCO_{sub}2014_{int(image_id):012d}.jpg")
        image = find_image(cands, image_dirs)
        if image is None:
            missing(report, cands[:1] or [str(image_id)], seen)
            continue
        negatives = draw(pool, n_negatives, item_rng(seed, cid), bad_keys={image_id}, bad_texts=[caption])
        items.append(Item(id=str(cid), images=[image], texts=[caption] + negatives, split=sub,
                          meta=dict(image_id=image_id)))
    return finish(report, items, "MS-COCO", "<file_name>", image_dirs)


def load_shapes(root, annotations=None, split=None, seed=0, n=50):
    """The embedded shapes world (tools/shapes.py) in ComVG format; written to `root` first if it holds no comvg.csv.

    The world itself is always drawn with seed 0 (n items per subject / object / relation swap), so `--seed` moves
    the few-shot split and the noise, never the data."""
    if annotations is None and not os.path.exists(os.path.join(root, "comvg.csv")):
        print(f"shapes: writing {3 * n} items to {root} (first use)")
        shapes.write_comvg(root, n=n, seed=0)
    items, report = load_comvg(root, annotations)
    report["dataset"] = "shapes"
    return items, report


LOADERS = {"comvg": load_comvg, "refcocog": load_refcocog, "vqav2": load_vqav2, "winoground": load_winoground,
           "vlchecklist": load_vlchecklist, "coco": load_coco, "shapes": load_shapes}


# ---- finding a data set's folder ---------------------------------------------------------------------------------

TABLE_DATASETS = ("comvg", "refcocog", "vqav2", "winoground", "vlchecklist")  # found automatically under data/
ALIASES = {"comvg": ("comvg", "compositional_visual_genome"), "refcocog": ("refcocog",),
           "vqav2": ("vqav2", "vqa", "vqa_v2"), "winoground": ("winoground",),
           "vlchecklist": ("vlchecklist", "vl-checklist"), "coco": ("coco", "mscoco"), "shapes": ("shapes",)}
DEFAULT_SPLIT = {"refcocog": "val", "vqav2": "val"}  # the split evaluated unless another is asked for


def _norm(name):
    return name.lower().replace("-", "").replace("_", "")


def default_root(name, data="data"):
    """data/<name> (any alias and case, e.g. data/VL-CheckList), or data/<name> as the place looked if absent."""
    subdirs = {_norm(d): os.path.join(data, d) for d in sorted(os.listdir(data))
               if os.path.isdir(os.path.join(data, d))} if os.path.isdir(data) else {}
    return next((subdirs[_norm(a)] for a in ALIASES[name] if _norm(a) in subdirs), os.path.join(data, name))


def find_datasets(root="data"):
    """[(data set, its folder)] of every table data set found under `root`."""
    fetch = f"fetch one with e.g.: {download.HINTS['comvg']}, or evaluate offline: --dataset shapes"
    if not os.path.isdir(root):
        raise DataMissing(f"data root not found: {root} is not a folder; {fetch}")
    found = [(n, default_root(n, root)) for n in TABLE_DATASETS]
    found = [(n, r) for n, r in found if os.path.isdir(r)]
    if not found:
        raise DataMissing(f"no data set found: looked for "
                          f"{', '.join(os.path.join(root, ALIASES[n][0]) for n in TABLE_DATASETS)}; {fetch}")
    return found


def has_table_data(root="data"):
    """Whether `root` holds a folder of any table data set (the embedded shapes world does not count)."""
    return os.path.isdir(root) and any(os.path.isdir(default_root(n, root)) for n in TABLE_DATASETS)


# what goes where, as the "not found" errors say it (evaluate.py --help and docs/data.md have the full layouts)
LAYOUTS = {
    "comvg": "compositional_visual_genome.csv + VG_100K/<image_id>.jpg",
    "refcocog": "refs(google).p + instances.json + train2014/COCO_train2014_<id>.jpg",
    "vqav2": "the paper's test.txt + vqa_text_test.csv (or the VQAv2 questions/annotations JSON) + "
             "val2014/COCO_val2014_<id>.jpg",
    "winoground": "examples.jsonl + images/<image>.png",
    "vlchecklist": "data/{Attribute,Object,Relation}/**/*.json + images/{vg,swig,hake}/",
    "coco": "annotations/captions_train2014.json + train2014/COCO_train2014_<id>.jpg",
}


def data_hint(name, root):
    """What goes where, the download command and the offline alternative, for a missing data set (one line)."""
    parts = [f"{root}/ holds {LAYOUTS[name]}"] if name in LAYOUTS else []
    parts += [download.hint(name)] if download.hint(name) else []
    return "; ".join(parts + ["or run offline on the embedded shapes world: --dataset shapes"])


def load_items(name, root=None, annotations=None, seed=0, split=None, **options):
    """(items, report) of data set `name` from its folder (default data/<name>); split None = every split; `options`
    go to the loader (`loader_options`). A missing data set's error says where it goes and how to fetch it."""
    if name not in LOADERS:
        raise InputError(f"unknown data set {name!r}: choose from {', '.join(sorted(LOADERS))}")
    root = root or default_root(name)
    try:
        items, report = LOADERS[name](root, annotations=annotations, split=split, seed=seed, **options)
    except DataMissing as e:
        raise InputError(f"{e}; {data_hint(name, root)}") from None
    return items, count_duplicates(items, report)


def data_inputs(items, report):
    """The files a loaded data set reads (its annotation files, every image), as `common.check_apart` inputs."""
    images = dict.fromkeys(str(p) for it in items for p in it.images)
    return [(f, "annotation file", "file") for f in report["files"]] + [(p, "image", "file") for p in images]


# loader options both CLIs offer: CLI dest -> (data set, loader keyword)
LOADER_OPTIONS = {"split_by": ("refcocog", "split_by"), "ref_negatives": ("refcocog", "negatives"),
                  "mask_object": ("refcocog", "mask_object"), "vlc_max_per_file": ("vlchecklist", "max_per_file")}


def add_data_args(p):
    """The loader options of train.py and evaluate.py."""
    g = p.add_argument_group("data set forms (datasets.py)")
    g.add_argument("--split-by", choices=("google", "umd"),
                   help="RefCOCOg refs file: refs(google).p (default when present, the official code's) or refs(umd).p")
    g.add_argument("--ref-negatives", choices=("any", "split"),
                   help="RefCOCOg: the 9 negative expressions from any other ref (default, the official code's) or "
                        "from other refs of the same split")
    g.add_argument("--mask-object", action="store_true", default=None,
                   help="RefCOCOg (Table 6): fill the referred object's instances.json box with the image's mean colour")
    g.add_argument("--vlc-max-per-file", type=int,
                   help=f"VL-CheckList: records per annotation file (default {VLC_MAX_PER_FILE}, its evaluator's "
                        "MAX_NUM / 2; 0 = all)")


def loader_options(args, name):
    """The loader keywords of data set `name` that the command line set."""
    return {kw: getattr(args, dest) for dest, (ds, kw) in LOADER_OPTIONS.items()
            if ds == name and getattr(args, dest, None) is not None}


def count_duplicates(items, report):
    """Records loaded twice (an item id, or the same images and texts, seen before): report["duplicates"] and a
    warning with the count. They stay in: every loaded item is scored and counted, as the publisher ships it."""
    ids, contents, dup = set(), set(), []
    for it in items:
        content = (tuple(map(str, it.images)), tuple(it.texts))
        if it.id in ids or content in contents:
            dup.append(it.id)
        ids.add(it.id)
        contents.add(content)
    report["duplicates"] = len(dup)
    if dup:
        report["warnings"].append(f"{len(dup)} duplicate records (an item id or the same images and texts seen "
                                  f"before, e.g. {', '.join(dup[:3])}); each is scored and counted as loaded")
    return report


# ---- how an item is judged: the paper's columns (§5.1; Tables 1, 8, 10) ------------------------------------------
# Pure functions of one item's score matrix s (n_images, n_texts), higher = better match; a tie counts as an error
# (strict >). tools/runner.py averages the flags into each data set's columns; evaluate.py prints the paper's tables.

TITLES = {"comvg": "Compositional Visual Genome", "refcocog": "RefCOCOg", "vqav2": "VQAv2",
          "winoground": "Winoground", "vlchecklist": "VL-checklist", "coco": "MS-COCO captions",
          "shapes": "Shapes (ComVG format)"}


def pos_image_wins(s):
    """ComVG: s (2 images, 1 text): the positive image scores higher than the negative one."""
    return bool(s[0, 0] > s[1, 0])

def pos_text_wins(s):
    """VL-CheckList: s (1 image, 2 texts [POS, NEG]): POS scores higher."""
    return bool(s[0, 0] > s[0, 1])

def true_image_wins(s):
    """s (n images, 1 text): image 0 scores strictly higher than every other image (text-to-image top-1)."""
    return bool((s[1:, 0] < s[0, 0]).all())

def true_text_rank(s):
    """0-based rank of text 0 for image 0 among all texts; a tie counts against it (pessimistic)."""
    return int((s[0, 1:] >= s[0, 0]).sum())

def top_k(s, k):
    return true_text_rank(s) < k

def winoground_scores(s):
    """s (2 images, 2 texts), image k <-> caption k -> (text, image, group) correctness (Thrush et al., 2022)."""
    text = bool(s[0, 0] > s[0, 1]) and bool(s[1, 1] > s[1, 0])   # each image prefers its own caption
    image = bool(s[0, 0] > s[1, 0]) and bool(s[1, 1] > s[0, 1])  # each caption prefers its own image
    return text, image, text and image

def tied(name, s):
    """Does the true candidate tie exactly with a false one in a comparison the metric makes? (Counted wrong, as
    every tie is, and reported.)"""
    if name == "winoground":
        return bool(s[0, 0] == s[0, 1] or s[1, 1] == s[1, 0] or s[0, 0] == s[1, 0] or s[1, 1] == s[0, 1])
    if name in ("comvg", "shapes"):
        return bool(s[0, 0] == s[1, 0])
    return bool((s[0, 1:] == s[0, 0]).any())  # text 0 against the other texts of image 0

def item_metrics(name, s):
    """The per-item correctness flags each data set's columns average."""
    if name in ("comvg", "shapes"):
        return dict(correct=pos_image_wins(s))
    if name == "vlchecklist":
        return dict(correct=pos_text_wins(s))
    if name == "winoground":
        return dict(zip(("text", "image", "group"), winoground_scores(s)))
    if name == "vqav2":  # the paper form's Binary items are 1 statement vs 10 images
        return dict(correct=true_image_wins(s) if s.shape[0] > 1 else top_k(s, 1))
    return dict(top1=top_k(s, 1), top5=top_k(s, 5), rank=true_text_rank(s))  # refcocog, coco

def _is(*cats):
    return lambda c: c.lower() in cats


# data set -> [(column, flag, which items: category predicate or None = all)], in the paper's order
COLUMNS = {
    "comvg": [("Subjects", "correct", _is("subject")), ("Objects", "correct", _is("object")),
              ("Predicate", "correct", _is("verb")), ("Average", "correct", None)],
    "refcocog": [("Top-1", "top1", None), ("Top-5", "top5", None)],
    "vqav2": [("Binary", "correct", _is("yes/no")), ("Other", "correct", lambda c: c.lower() != "yes/no"),
              ("All", "correct", None)],
    "winoground": [("Text", "text", None), ("Image", "image", None), ("Group", "group", None)],
    "vlchecklist": [("Attribute", "correct", _is("attribute")), ("Object", "correct", _is("object")),
                    ("Relation", "correct", _is("relation")), ("Average", "correct", None)],
    "coco": [("Top-1", "top1", None), ("Top-5", "top5", None)],
}
COLUMNS["shapes"] = COLUMNS["comvg"]
WINOGROUND_TAGS = ("Relation", "Object", "Both")  # Table 10's column groups (collapsed_tag)


# ---- the few-shot split (§5.2) -------------------------------------------------------------------------------------

def parse_shots(value, n):
    """--shots as a fraction ("0.05") or a count ("27") of n available items -> a count in [1, n - 1]."""
    try:
        x = float(value)
    except ValueError:
        raise InputError(f"--shots {value!r}: expected a fraction like 0.05 or a count like 27") from None
    if not x > 0 or x == float("inf"):  # nan and inf too
        raise InputError(f"--shots {value}: must be a positive finite number")
    if "." in str(value) or "e" in str(value).lower():
        if x >= 1:
            raise InputError(f"--shots {value}: a fraction must be below 1 (use a whole number for a count)")
        count = max(1, round(x * n))
    else:
        count = int(x)
    if count >= n:
        raise InputError(f"--shots {value}: asks for {count} training items but the data set has {n} "
                         "(at least one must stay for testing)")
    return count


def linked_groups(items):
    """Union-find over items that share a (text, image) pair -> list of lists of item indices, in first-seen order."""
    parent = list(range(len(items)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    owner = {}
    for i, it in enumerate(items):
        for pair in ((t, str(im)) for t in it.texts[:1] for im in it.images) if len(it.texts) == 1 else \
                ((t, str(im)) for t in it.texts for im in it.images[:1]):
            j = owner.setdefault(pair, i)
            parent[find(i)] = find(j)
    groups = {}
    for i in range(len(items)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def split_items(items, shots, seed, eval_split="val", holdout=True):
    """(train, test) item lists; see the module docstring. Deterministic in `seed`.

    Items that carry the publisher's split train on 'train' and test on `eval_split`; without a 'train' split the
    items are split by shots. holdout=False: every item not drawn for training is left out (test = [])."""
    pool = [it for it in items if it.split == "train"]
    test = [it for it in items if it.split == eval_split] if pool else None
    if not pool:
        pool = items
    elif holdout and not test:
        raise InputError(f"the data set ships splits {sorted({it.split for it in items})}: no items in "
                         f"--eval-split {eval_split!r}")
    n = parse_shots(shots, len(pool) + (0 if test is None and holdout else 1))
    groups = linked_groups(pool)
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    train_idx, rest = [], []
    for g in order:
        (train_idx if len(train_idx) < n else rest).extend(groups[g])
    train = [pool[i] for i in sorted(train_idx)]
    if not holdout:
        return train, []
    if test is None:
        test = [pool[i] for i in sorted(rest)]
        if not test:
            raise InputError(f"--shots {shots}: no test items left after drawing the training split")
    return train, test


# ---- images --------------------------------------------------------------------------------------------------------

def open_image(path):
    from PIL import Image
    with Image.open(path) as im:
        im.load()  # decode now: a corrupt file fails here, not inside the model
    return fill_box(im, path.box) if getattr(path, "box", None) else im


class ImageCache:
    """Decoded images by path, the `size` most recently used kept (training revisits items every epoch)."""

    def __init__(self, size=64):
        self.size, self.images = size, OrderedDict()

    def get(self, path):
        key = (str(path), getattr(path, "box", None))                         # a masked image is another image
        if key in self.images:
            self.images.move_to_end(key)
        else:
            self.images[key] = open_image(path)
            if len(self.images) > self.size:
                self.images.popitem(last=False)
        return self.images[key]

    def load(self, paths):
        return [self.get(p) for p in paths]
