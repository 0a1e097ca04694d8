"""VQAv2 as the paper's Table 1 evaluates it: the official code's own test files, or the VQAv2 release.

    test.txt            COCO_val2014_<12 digits>.jpg*The question is asking about yes or no: <statement>
    vqa_text_test.csv   sentence,pos_image_id,neg_sentence_1..9
    val2014/COCO_val2014_<id>.jpg

Binary item = 1 statement vs 10 images (its own + 9 others, drawn reproducibly); Other item = 1 image vs the 10
sentences. From the release (questions + annotations JSON) a question is 1 image vs 10 "question answer" texts.
"""
import csv
import io
import json
import os
from collections import Counter

from benchmarks.coco import coco_image_dirs
from benchmarks.fetching import (COCO_IMAGE_BASE, COCO_IMAGE_BYTES, COCO_ZIPS, DSD_RAW, JOBS, confirm, count,
                                 existing_image, fetch_images, fetch_one, mirrored, new_tally)
from benchmarks.reading import (digits, Item, check_root, csv_rows, draw, escape, find_file, first_existing, finish, given_file,
                                item_rng, malformed, missing, new_report, read_json, read_text)
from common import InputError

LAYOUT = ("the paper's test.txt + vqa_text_test.csv (or the VQAv2 questions/annotations JSON) + "
          "val2014/COCO_val2014_<id>.jpg")
FETCHES = ("the official code's VQAv2 test files test.txt + vqa_text_test.csv (1.3 MB); --with-images: the 5,762 "
           "COCO val2014 images they use (~0.9 GB)")
HINT = ("python -m tools.download vqav2 --with-images (the paper's test files + the COCO val2014 images they use, "
        "~0.9 GB)")
VQA_FILES = {  # name: (url, bytes, sha256) as in the official code's repository
    "test.txt": (f"{DSD_RAW}/test.txt", 877_356, "9ae79531c2ab331362b8d54fb55b821b2720a084c993417e4839516fcb5dce4b"),
    "vqa_text_test.csv": (f"{DSD_RAW}/vqa_text_test.csv", 404_578,
                          "74c6e7dee19abbeb345d751d9e515c142363c28c59617f05cc32c21530210936")}


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
        q = first_existing([f"v2_OpenEnded_mscoco_{d}_questions.json"], folders)
        a = first_existing([f"v2_mscoco_{d}_annotations.json"], folders)
        if q and a:
            found.append((sub, q, a))
    if not found:
        names = [f"v2_OpenEnded_mscoco_{VQA_SUBSETS[s]}_questions.json + v2_mscoco_{VQA_SUBSETS[s]}_annotations.json"
                 for s in wanted]
        raise InputError(f"VQAv2 annotations not found: looked for {' or '.join(names)} in {', '.join(folders)}")
    return found


def vqa_records(report, q_path, a_path):
    """([(question, annotation)], every annotation's multiple_choice_answer); bad records reported with file+index."""
    questions, annotations = (data.get(key) if isinstance(data, dict) else None for data, key in (
        (read_json(q_path, "VQAv2 questions"), "questions"), (read_json(a_path, "VQAv2 annotations"), "annotations")))
    if not isinstance(questions, list) or not isinstance(annotations, list):
        raise InputError(f"VQAv2 files {q_path} / {a_path} lack a 'questions' / 'annotations' list")
    by_id = {}
    for i, a in enumerate(annotations):
        try:
            a["question_id"], a["multiple_choice_answer"], [x["answer"] for x in a["answers"]]
            if not isinstance(a["question_id"], (int, str)):
                raise TypeError
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
        elif not digits(q["image_id"]):
            malformed(report, where, f"image_id {q['image_id']!r} is not a number")
        elif not isinstance(q["question_id"], (int, str)) or q["question_id"] not in by_id:
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
        found = {k: first_existing([n], folders) for k, n in VQA_PAPER.items()}
        return dict(found, **{("binary" if annotations.endswith(".txt") else "other"): annotations})
    found = {k: first_existing([n], [root, os.path.join(root, "data")]) for k, n in VQA_PAPER.items()}
    return found if any(found.values()) else None


def vqa_binary_lines(report, path):
    """[(line number, image name, statement)] of test.txt's yes/no lines (`<image>*<prefix>: <statement>`); the
    `...about others` lines are counted (report["other_lines"]), unused as in the official evaluation."""
    out = []
    for n, line in enumerate(io.StringIO(read_text(path, "VQAv2"), newline=None), 1):  # UTF-8, a BOM dropped
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
    with io.StringIO(read_text(path, "VQAv2"), newline="") as f:   # UTF-8 (a BOM dropped) or one line naming it
        reader = csv_rows(f, path, "VQAv2", ["pos_image_id"] + cols)
        for row in reader:
            report["records"] += 1
            texts = [str(row[c] or "").strip() for c in cols]
            if not digits(str(row["pos_image_id"] or "").strip()) or not all(texts):
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
        paths = [first_existing([m], folders) for m in names]
        if None in paths:
            missing(report, [m for m, p in zip(names, paths) if p is None], seen)
            continue
        items.append(Item(id=f"binary/{n}", images=paths, texts=[text], category="yes/no", split="val",
                          meta=dict(file=VQA_PAPER["binary"], line=n)))
    for n, name, texts in (vqa_other_rows(report, files["other"], n_texts) if files["other"] else []):
        image = first_existing([name], folders)
        if image is None:
            missing(report, [name], seen)
            continue
        items.append(Item(id=f"other/{n}", images=[image], texts=texts, category="other", split="val",
                          meta=dict(file=VQA_PAPER["other"], line=n)))
    report["short_items"] = sum(max(len(it.images), len(it.texts)) < n_texts for it in items)
    return finish(report, items, "VQAv2", "COCO_val2014_<image_id 12 digits>.jpg", folders)


def load(root, annotations=None, split=None, seed=0, n_texts=10, pool_size=VQA_POOL):
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
        image = first_existing(names, folders)
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


# ---- fetching ------------------------------------------------------------------------------------------------------

def vqa_image_names(root):
    """The COCO val2014 file names test.txt and vqa_text_test.csv use."""
    names = set()
    lines = io.StringIO(read_text(os.path.join(root, "test.txt"), "VQAv2"), newline=None)
    names |= {line.split("*", 1)[0].strip() for line in lines if "*" in line}
    with io.StringIO(read_text(os.path.join(root, "vqa_text_test.csv"), "VQAv2"), newline="") as f:
        names |= {f"COCO_val2014_{int(r['pos_image_id']):012d}.jpg" for r in csv.DictReader(f)
                  if digits(str(r.get("pos_image_id", "")).strip())}
    return sorted(n for n in names if n.startswith("COCO_val2014_") and n.endswith(".jpg") and "/" not in n)


def fetch(root, mirror=None, with_images=False, yes=False, jobs=JOBS, files=VQA_FILES):
    """The official code's test.txt and vqa_text_test.csv into root/; with_images: only the COCO val2014 images they
    use, one by one, into root/val2014/."""
    tally = new_tally()
    for name, (url, size, sha256) in files.items():
        fetch_one(tally, name, mirrored(url, mirror), os.path.join(root, name), size, sha256)
    if not with_images or tally["failed"]:
        return tally
    folder = os.path.join(root, "val2014")
    jobs_list = []
    for name in vqa_image_names(root):
        if existing_image([name], [folder]):
            count(tally, name, "present")
        else:
            jobs_list.append((name, [(f"{mirrored(COCO_IMAGE_BASE, mirror)}/val2014/{name}",
                                      os.path.join(folder, name))]))
    confirm(f"vqav2: {len(jobs_list):,} COCO val2014 images (estimated)", len(jobs_list) * COCO_IMAGE_BYTES, yes)
    fetch_images(jobs_list, tally, jobs, desc="COCO val2014")
    return tally


def manual_route(root):
    return (f"test.txt and vqa_text_test.csv from https://github.com/eric-ai-lab/DSD/tree/main/data into "
            f"{root}/; COCO val2014 images ({COCO_ZIPS['val2014.zip'][0]}, 6.6 GB) unzipped into {root}/ (val2014/)")
