"""Evaluation of §5 (Tables 1, 8 and 10): image-text matching accuracy on ComVG, RefCOCOg, VQAv2, Winoground, VL-CheckList.

    python evaluate.py --model PATH_OR_ID --dataset comvg --data-root DIR [--annotations FILE] [--output results.json]
    python evaluate.py --model PATH_OR_ID                  # every data set found under --data-root (default data/)

--dataset NAME: --data-root is that data set's own folder (default data/NAME). No --dataset: --data-root holds one
sub-folder per data set (names case-insensitive, '-' and '_' ignored), each in its publisher's layout:

    data/comvg/        compositional_visual_genome.csv (or ComVG.csv, comvg.csv); <image_id>.jpg in VG_100K/,
                       VG_100K_2/, vg_concept/, images/ or the folder itself
    data/refcocog/     refs(google).p (preferred, or refs(umd).p; --split-by) + instances.json (or both in refcocog/);
                       COCO_train2014_*.jpg in train2014/, images/train2014/, images/mscoco/images/train2014/, images/
    data/vqav2/        the paper's test.txt + vqa_text_test.csv (the official code's files: its Table 1 form), else
                       v2_OpenEnded_mscoco_val2014_questions.json + v2_mscoco_val2014_annotations.json (train2014 too;
                       also in annotations/); COCO_val2014_*.jpg in val2014/, images/val2014/, images/ or the folder
    data/winoground/   examples.jsonl + images/<image>.png (or data/examples.jsonl + data/images/, unzipped)
    data/vlchecklist/  VL-CheckList's data/ folder (data/{Attribute,Object,Relation}/**/*.json) + the image folders
                       vg/, swig/, hake/ of its DATASETS.md (directly or under images/)
    (data/coco/        captions_train2014.json + train2014/: a training source; evaluated only with --dataset coco)

Splits: RefCOCOg and VQAv2 are evaluated on "val" unless --split names another (or "all").
Fetching a data set: python -m tools.download NAME (see its --help). No --dataset and no data set under data/: the
embedded shapes world is evaluated (said in one line).

Metrics are pure functions of one item's score matrix s (n_images, n_texts), higher = better match; ties count as
errors (strict >):
    ComVG          correct = s[pos, sentence] > s[neg, sentence]                   Subjects / Objects / Predicate / Average
    RefCOCOg       rank of the true text among the 10 (others with s >= true)      Top-1 / Top-5
    VQAv2          Top-1: paper form, Binary = the true image beats the 9 others     Binary (yes/no) / Other / All
                   for its statement, Other = the true text of the 10; JSON form: the true text of the 10
    Winoground     text  = s(c0,i0) > s(c1,i0) and s(c1,i1) > s(c0,i1)
                   image = s(c0,i0) > s(c0,i1) and s(c1,i1) > s(c1,i0); group = both     Text / Image / Group, per tag
    VL-CheckList   correct = s(img, POS) > s(img, NEG)                             Attribute / Object / Relation / Average
"Average" and "All" are over all items (micro); the JSON also holds the mean of the columns (macro_average).
Bad input: "error: <one line>" on stderr, exit code 2. An unreadable image skips its item, counted in the summary.
A non-finite score is an error naming the item; ties with a wrong candidate and duplicate records are reported.

Every accuracy is printed with its 95% bootstrap interval over items; the JSON keeps each item's score matrix. Under
`accelerate launch --multi_gpu --num_processes N` (add --device cpu for CPU processes) each process scores its share
of the items and the main one writes the same JSON and tables as one process. Scores are appended to OUTPUT's partial
files as they come (results.json -> results.items/); `--resume` keeps them after a crash and scores the rest. A kept
score carries a digest of its item's id, texts and image bytes: an item edited since is scored again. --output
never replaces an input (a checkpoint, an annotation file, an image, anything under --model). Ctrl-C or SIGTERM
stops with one line naming the kept files and the command that resumes (exit 130 for Ctrl-C, 143 for SIGTERM).
"""
import argparse
import hashlib
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import sys

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm import tqdm

import methods
from common import (MAX_LISTED, SIGNAL_NAMES, ArgumentParser, InputError, Interrupted, check_apart, check_writable,
                    default_device, file_hash, name_fits, positive_int, resolve_dtype, run_cli, write_json)
from datasets import (DEFAULT_SPLIT, LOADERS, ImageCache, add_data_args, data_inputs, default_root, find_datasets,
                      has_table_data, load_items, loader_options, split_items)

TITLES = {"comvg": "Compositional Visual Genome", "refcocog": "RefCOCOg", "vqav2": "VQAv2",
          "winoground": "Winoground", "vlchecklist": "VL-checklist", "coco": "MS-COCO captions",
          "shapes": "Shapes (ComVG format)"}


# ---- metrics: pure functions of one score matrix (n_images, n_texts) --------------------------------------------------

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


def accuracy(records, flag, which=None):
    """(percent or None, count) of `flag` over the records [(item, metrics)] whose category passes `which`."""
    hits = [m[flag] for item, m in records if which is None or which(item.category)]
    return (100.0 * sum(hits) / len(hits) if hits else None), len(hits)


def bootstrap_ci(values, resamples=1000, seed=0, level=0.95):
    """(low, high) percentile-bootstrap interval of the mean of per-item `values` (0/1 hits: a percent after x100),
    over `resamples` resamples of the items drawn with `seed`; None without items. The resamples depend only on the
    item count and the seed, so the difference of two methods' hits on the same items is paired (same resamples)."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if not len(x):
        return None
    g = torch.Generator().manual_seed(seed)
    means = torch.cat([x[torch.randint(len(x), (min(100, resamples - k), len(x)), generator=g)].mean(1)
                       for k in range(0, resamples, 100)])                     # (resamples,)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(means, q).tolist()
    return low, high


def summarize(name, records):
    """Columns of the paper's table for one data set, with counts and the per-tag / per-file breakdowns."""
    out = dict(metrics={}, counts={})
    for col, flag, which in COLUMNS[name]:
        out["metrics"][col], out["counts"][col] = accuracy(records, flag, which)
    parts = [v for c, v in out["metrics"].items() if c not in ("Average", "All") and v is not None]
    if name in ("comvg", "vlchecklist", "shapes") and parts:
        out["macro_average"] = sum(parts) / len(parts)
    if name == "winoground":
        tags = sorted({item.category for item, _ in records}, key=lambda t: (t not in WINOGROUND_TAGS, t))
        out["per_tag"] = {t: {f: accuracy(records, f.lower(), _is(t.lower()))[0] for f in ("Text", "Image", "Group")}
                          | {"n": accuracy(records, "text", _is(t.lower()))[1]} for t in tags}
    if name == "vlchecklist":
        files = sorted({item.meta.get("file", "") for item, _ in records})
        out["per_file"] = {f: dict(zip(("accuracy", "n"), accuracy(
            [(it, m) for it, m in records if it.meta.get("file", "") == f], "correct"))) for f in files}
    return out


# ---- the scoring loop ----------------------------------------------------------------------------------------------

def pair_chunks(items, pairs):
    """Consecutive items whose (n_images * n_texts) pairs add up to about `pairs` (one score_items call each)."""
    group, n = [], 0
    for item in items:
        group.append(item)
        n += len(item.images) * len(item.texts)
        if n >= pairs:
            yield group
            group, n = [], 0
    if group:
        yield group


def score_dataset(model, items, pairs=16, desc=None, groups=None, on_group=None):
    """[(item, score matrix)] for every item whose images open, and [(item id, error)] for those that do not.
    groups: the item groups to score, one score_items call each (default pair_chunks(items, pairs));
    on_group(scored, [(item, error)]) runs after each group with that group's results (the partial file)."""
    scored, unreadable, cache = [], [], ImageCache()
    groups = list(pair_chunks(items, pairs)) if groups is None else groups
    with tqdm(total=sum(map(len, groups)), desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True,
              disable=not PartialState().is_main_process) as bar:
        for group in groups:
            loaded, bad = [], []
            for item in group:
                try:
                    loaded.append((item, cache.load(item.images)))
                except Exception as e:  # corrupt / truncated / not an image: skip this item only
                    bad.append((item, f"{type(e).__name__}: {e}"))
            done = []
            if loaded:
                try:
                    mats = model.score_items([(ims, item.texts) for item, ims in loaded])
                except InputError as e:  # e.g. an empty caption, named by its place in the call: name the items
                    ids = ", ".join(str(item.id) for item, _ in loaded)
                    raise InputError(f"{e} (the call's items in order: {ids})") from None
                done = [(item, finite(item, s.detach().float().cpu())) for (item, _), s in zip(loaded, mats)]
            scored += done
            unreadable += [(item.id, e) for item, e in bad]
            if on_group:
                on_group(done, bad)
            bar.update(len(group))
    return scored, unreadable


def finite(item, s):
    """s unchanged; a NaN or infinite score is an InputError naming the item, never a silent 0%."""
    if not torch.isfinite(s).all():
        raise InputError(f"item {item.id} ({', '.join(map(str, item.images))}) got non-finite scores {s.tolist()}: "
                         "check --lam, --precision (fp16 can overflow) and the checkpoint")
    return s


def evaluate_items(model, name, items, pairs=16, desc=None, store=None):
    """Score `items` of data set `name`, about `pairs` image-text pairs per scoring call -> {"metrics": {column:
    percent}, "counts", "ci" (95% bootstrap intervals), n_items, unreadable, "items" (id, category, score matrix and
    flags of each scored item), ...}. Under `accelerate launch` the items are shared out among the processes
    (`score_sharded`); every process returns the same results. store: a partial file (`open_partial`)."""
    records = score_sharded(model, items, pairs, desc or name, store)
    scored = [(items[k], torch.tensor(r["scores"])) for k, r in records if "scores" in r]
    unreadable = [(r["id"], r["error"]) for _, r in records if "error" in r]
    records = [(item, item_metrics(name, s)) for item, s in scored]
    out = summarize(name, records)
    ties = [item.id for item, s in scored if tied(name, s)]
    out.update(n_items=len(records), unreadable=len(unreadable),
               unreadable_items=[f"{i}: {e}" for i, e in unreadable[:MAX_LISTED]],
               ties=len(ties), tied_items=ties[:MAX_LISTED], **intervals(name, records))
    out["items"] = [dict(id=item.id, category=item.category, scores=s.tolist(), **m)
                    for (item, s), (_, m) in zip(scored, records)]
    return out


# ---- many processes (accelerate launch), partial files, confidence intervals -------------------------------------

CI_RESAMPLES, CI_SEED = 1000, 0  # every interval: 95% percentile bootstrap over items, the same resamples for a count


def processes(device=None):
    """accelerate's PartialState: this run's one process, or one of `accelerate launch`'s. Processes on CPU
    (--device cpu, or no GPU) talk over gloo; on GPUs each takes its own device (accelerate sets it)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "MASTER_PORT" in os.environ \
            and not any(k in os.environ for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")):
        print("warning: `accelerate launch --cpu --num_processes N` starts one process (accelerate starts N CPU "
              "processes only with --mpirun_hostfile); for N CPU processes use `accelerate launch --multi_gpu "
              "--num_processes N ... --device cpu`", file=sys.stderr)
    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


def score_sharded(model, items, pairs, desc, store=None):
    """[(position in items, record)] for every item, in order; a record is {"id", "scores": matrix as lists} or
    {"id", "error"}. The items are cut into the groups one process would score (pair_chunks), the groups not already
    in `store` are dealt out to the processes in turn, and the records are gathered (gather_object: no padding, so
    no duplicates), so every score comes from the same scoring call as in one process and is bit-identical to it."""
    state = PartialState()
    done, out = store or ({}, None)
    hashes = {}
    where = {id(item): k for k, item in enumerate(items)}
    groups = [g for g in pair_chunks(items, pairs) if not all(where[id(item)] in done for item in g)]

    def record(scored, unreadable):
        new = [dict(k=where[id(item)], id=item.id, content=item_digest(item, hashes) if out else None,
                    scores=s.tolist()) for item, s in scored]
        new += [dict(k=where[id(item)], id=item.id, content=item_digest(item, hashes) if out else None, error=e)
                for item, e in unreadable]
        mine.extend(new)
        if out:
            out.write("".join(json.dumps(r) + "\n" for r in new))
            out.flush()                                            # a kill loses at most the group in flight

    mine = []
    score_dataset(model, items, pairs, desc, groups=groups[state.process_index::state.num_processes], on_group=record)
    if out:
        out.close()
    records = dict(done) | {r["k"]: r for r in gather_object(mine)}
    return [(k, records[k]) for k in range(len(items))]


def _hits(records, flag, which=None):
    return [float(m[flag]) for item, m in records if which is None or which(item.category)]


def percent_ci(values):
    """[low, high] in percent (or points, for differences) of the mean of per-item 0/1 values; None without items."""
    ci = bootstrap_ci(values, CI_RESAMPLES, CI_SEED)
    return ci and [100 * ci[0], 100 * ci[1]]


def intervals(name, records):
    """{"ci": {column: [low, high]}}, and Winoground's {"per_tag_ci": {tag: {column: [low, high]}}} (Table 10)."""
    out = {"ci": {col: percent_ci(_hits(records, flag, which)) for col, flag, which in COLUMNS[name]}}
    if name == "winoground":
        out["per_tag_ci"] = {t: {f: percent_ci(_hits(records, f.lower(), _is(t.lower())))
                                 for f in ("Text", "Image", "Group")}
                             for t in sorted({item.category for item, _ in records})}
    return out


def paired_differences(name, first, other):
    """{column: {difference, ci, n}}: `other` minus `first` in points, item by item (two evaluate_items results on
    the same items; the same resamples for both); None when they scored different items."""
    a, b = first["items"], other["items"]
    if [r["id"] for r in a] != [r["id"] for r in b]:
        return None
    out = {}
    for col, flag, which in COLUMNS[name]:
        d = [float(y[flag]) - float(x[flag]) for x, y in zip(a, b) if which is None or which(x["category"])]
        out[col] = dict(difference=100 * sum(d) / len(d) if d else None, ci=percent_ci(d), n=len(d))
    return out


def partial_root(output):
    """The folder of OUTPUT's partial files: results.json -> results.items (removed once OUTPUT is written)."""
    return os.path.splitext(output)[0] + ".items"


def partial_folder(output, label, name):
    """Where one run's per-item records go while it is scored: results.json -> results.items/<data set>/<label>/."""
    return os.path.join(partial_root(output), name, re.sub(r"[^\w.-]+", "-", label))


def fingerprint(args, method, checkpoint, model, name, root, split, items):
    """What a partial file's scores depend on, flat {what: value} so that a difference can be named: the method, the
    checkpoint's content, precision and device, the scorer's options (model.config), the data set and its items."""
    ids = hashlib.sha256(json.dumps([it.id for it in items]).encode()).hexdigest()[:16]
    fp = dict(getattr(model, "config", {}), method=method, checkpoint=checkpoint and file_hash(checkpoint)[:16],
              device=default_device(args.device), eval_batch_size=args.eval_batch_size,
              precision=str(resolve_dtype(args.precision, default_device(args.device))).replace("torch.", ""),
              dataset=name, data_root=os.path.abspath(root), split=split,
              items=f"{len(items)}, ids {ids}")
    return json.loads(json.dumps(fp, default=str))


def read_fingerprint(path):
    """A partial folder's fingerprint.json; a truncated or garbled one is an InputError naming it (its scores cannot
    be matched to a run, so they are not kept)."""
    try:
        fp = json.loads(pathlib.Path(path).read_bytes())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        fp = e
    if not isinstance(fp, dict):
        raise InputError(f"--resume: {path} is not a fingerprint (cut short or overwritten?): the scores beside it "
                         "cannot be matched to this run; rerun without --resume to start over")
    return fp


def parse_record(line):
    """One line of a partial file -> its record, or None for a line that is not one (a power cut can leave a line
    that is complete but garbled): that item is scored again."""
    try:
        r = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(r, dict) and type(r.get("k")) is int and r["k"] >= 0 and isinstance(r.get("content"), str) and (
        isinstance(r.get("error"), str) or isinstance(r.get("scores"), list))
    return r if ok else None


def item_digest(item, hashes):
    """What an item's scores depend on besides the run's options: its id, texts, and its images' bytes (and a
    --mask-object box). `hashes`: {path: file hash} memo, one read per image file."""
    def image(path):
        key = str(path)
        if key not in hashes:
            try:
                hashes[key] = file_hash(key)[:32]
            except OSError as e:
                hashes[key] = f"unreadable {type(e).__name__}"
        return [hashes[key], getattr(path, "box", None)]
    content = [item.id, list(item.texts), [image(p) for p in item.images]]
    return hashlib.sha256(json.dumps(content, default=str).encode()).hexdigest()[:32]


def kept(record, item, digest):
    """A partial record still true for `item`: the same content digest and a finite score matrix of its shape."""
    if record["content"] != digest:
        return False
    if "error" in record:
        return True
    s = record["scores"]
    try:
        return torch.isfinite(torch.tensor(s, dtype=torch.float64)).all().item() and \
            list(torch.tensor(s).shape) == [len(item.images), len(item.texts)]
    except (TypeError, ValueError, RuntimeError):
        return False


def open_partial(folder, fp, resume, items):
    """({item position: record} already scored in `folder`, this process's file to append records to).

    Without --resume, or without a fingerprint there, `folder` starts empty. With --resume its fingerprint must be
    `fp` (else an InputError names what differs); a line cut short by a kill, or garbled, is dropped; a record is
    kept only if its content digest is that of items[k] now (same id, texts and image bytes): an item edited since
    is scored again. Every process runs this."""
    state = PartialState()
    fp_file = os.path.join(folder, "fingerprint.json")
    old = read_fingerprint(fp_file) if resume and os.path.exists(fp_file) else None
    if old is not None and old != fp:
        diff = [k for k in dict.fromkeys([*fp, *old]) if old.get(k) != fp.get(k)]
        raise InputError(f"--resume: {folder} holds scores made with another " + "; another ".join(
            f"{k} ({old.get(k)} there, {fp.get(k)} now)" for k in diff[:3]) + "; rerun without --resume to start over")
    parts = lambda: sorted(f for f in os.listdir(folder) if f.startswith("part-"))  # noqa: E731
    state.wait_for_everyone()
    if state.is_main_process:
        if old is None:
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            write_json(fp_file, fp)
        for part in parts():
            with open(os.path.join(folder, part), "rb+") as f:
                f.truncate(f.read().rfind(b"\n") + 1)
    state.wait_for_everyone()
    done = {}
    for part in parts():
        with open(os.path.join(folder, part), "rb") as f:
            done.update((r["k"], r) for r in map(parse_record, f) if r)
    hashes = {}
    done = {k: r for k, r in done.items() if k < len(items) and kept(r, items[k], item_digest(items[k], hashes))}
    state.wait_for_everyone()                                      # all have read before anyone appends
    return done, open(os.path.join(folder, f"part-{state.process_index}.jsonl"), "a")


# ---- data and the runs -------------------------------------------------------------------------------------------

SHAPES_RUN = os.path.join("runs", "shapes")  # train.py --dataset shapes writes its deltas here


def default_runs(args, names):
    """[(row label, method, checkpoint)]: --methods (with --checkpoint), or for the shapes world Discffusion and
    DiffusionITM zero-shot plus Discffusion few-shot when train.py's deltas are there."""
    if args.methods:
        return [(m, m, checkpoint_for(args, m)) for m in args.methods]
    if list(names) != ["shapes"]:
        return [("discffusion", "discffusion", checkpoint_for(args, "discffusion"))]
    runs = [("discffusion zero-shot", "discffusion", None), ("diffusion_itm zero-shot", "diffusion_itm", None)]
    deltas = checkpoint_for(args, "discffusion") or os.path.join(SHAPES_RUN, "prompt_deltas.safetensors")
    if os.path.exists(deltas):
        runs.append(("discffusion few-shot", "discffusion", deltas))
    return runs


def checkpoint_for(args, method):
    """--checkpoint FILE (the first method's) or METHOD=FILE, repeatable -> the file for `method`, or None."""
    for spec in args.checkpoint or []:
        name, sep, path = spec.partition("=")
        if sep and name in methods.METHODS:
            if name == method:
                return path
        elif method == (args.methods or ("discffusion",))[0]:
            return spec
    return None


def dataset_roots(args):
    """[(data set, its folder)]: --dataset with --data-root as its folder, or every data set under --data-root."""
    if args.annotations and not args.dataset:
        raise InputError("--annotations needs --dataset (it names one data set's annotation file)")
    if args.dataset:
        return [(args.dataset, args.data_root or default_root(args.dataset))]
    if not args.data_root and not has_table_data("data"):  # a first run: the embedded default, with the way on
        print("no data set under data/: evaluating the embedded shapes world (python -m tools.download comvg fetches "
              "ComVG; see docs/data.md)")
        args.dataset = "shapes"
        return [("shapes", default_root("shapes"))]
    return find_datasets(args.data_root or "data")


def load_data(args, roots, runs):
    """{name: (root, split, items, report)} for every data set asked for; loads all before any model is built.

    The shapes world is evaluated on the held-out split of `train.py --dataset shapes`: the same seed and the --shots
    the runs' checkpoint was trained with (else --shots, else the shapes default)."""
    out = {}
    for name, root in roots:
        split = None if args.split == "all" else (args.split or DEFAULT_SPLIT.get(name))
        items, report = load_items(name, root, args.annotations, seed=args.seed, split=split,
                                   **loader_options(args, name))
        if name == "shapes":
            recorded = next((methods.recorded_options(c) for _, _, c in runs if c), {})
            items, split = split_items(items, methods.option(args, "shots", recorded), args.seed)[1], "test"
        out[name] = (root, split, items[:args.limit] if args.limit else items, report)
    return out


# ---- tables ------------------------------------------------------------------------------------------------------

def _fmt(v):
    return "-" if v is None else f"{v:.2f}"


def _fmt_ci(v, ci):
    """A percent with its interval beside it: 93.75 [87.5, 98.9]."""
    return _fmt(v) if v is None or not ci else f"{v:.2f} [{ci[0]:.1f}, {ci[1]:.1f}]"


def render_table(title, column_groups, rows):
    """column_groups [(group title, [column])], rows [(label, [cell])] (cells of all groups in order) -> text."""
    starts = [sum(len(cols) for _, cols in column_groups[:g]) for g in range(len(column_groups))]
    widths = [[max(len(c), 7, *(len(str(cells[k + i])) for _, cells in rows)) for i, c in enumerate(cols)]
              for (_, cols), k in zip(column_groups, starts)]
    spans = [sum(w) + len(w) - 1 for w in widths]
    lines = [[""] + [g[:s].ljust(s) for (g, _), s in zip(column_groups, spans)],
             ["Method"] + [" ".join(c.rjust(w) for c, w in zip(cols, ws))
                           for (_, cols), ws in zip(column_groups, widths)]]
    for label, cells in rows:
        parts, k = [label], 0
        for ws in widths:
            parts.append(" ".join(str(c).rjust(w) for c, w in zip(cells[k:k + len(ws)], ws)))
            k += len(ws)
        lines.append(parts)
    first = max(24, max(len(r[0]) for r in lines) + 1)
    return "\n".join([title] + [" | ".join([r[0].ljust(first)] + r[1:]) for r in lines])


def format_table(name, rows, cis=None):
    """One data set's columns for several runs: rows {label: {column: percent}} (e.g. zero_shot / few_shot), and
    their intervals cis {label: {column: [low, high]}} when given."""
    cols, cis = [c for c, _, _ in COLUMNS[name]], cis or {}
    return render_table(f"{TITLES[name]}: accuracy (%)" + (" [95% bootstrap CI]" if cis else ""),
                        [(TITLES[name], cols)],
                        [(label, [_fmt_ci(m.get(c), cis.get(label, {}).get(c)) for c in cols])
                         for label, m in rows.items()])


def tables(results):
    """{table: (title, [(group, [(column, percent, count)])])} for the data sets evaluated, in the paper's layout."""
    def cols(name):
        r = results[name]
        return [(c, r["metrics"][c], r["counts"][c]) for c, _, _ in COLUMNS[name]]
    out = {}
    t1 = [(TITLES[n], cols(n)) for n in ("shapes", "comvg", "refcocog", "vqav2") if n in results]
    if t1:
        out["table1"] = ("Table 1: accuracy (%)", t1)
    t8 = [(TITLES[n], cols(n)) for n in ("winoground", "vlchecklist") if n in results]
    if t8:
        out["table8"] = ("Table 8: accuracy (%)", t8)
    if "winoground" in results:
        per_tag = results["winoground"]["per_tag"]
        out["table10"] = ("Table 10: Winoground per collapsed_tag, accuracy (%)",
                          [(t, [(f, per_tag.get(t, {}).get(f), per_tag.get(t, {}).get("n", 0))
                                for f in ("Text", "Image", "Group")]) for t in WINOGROUND_TAGS])
    if "coco" in results:
        out["coco"] = ("MS-COCO captions: accuracy (%)", [(TITLES["coco"], cols("coco"))])
    return out


def show_table(title, column_groups, rows, cis=None):
    """A paper table: one accuracy row per method ({method: column_groups}) and the item counts behind each cell;
    cis {method: {(group, column): [low, high]}}: each cell's interval, printed beside it."""
    cells, cis = [c for _, cols in column_groups for c in cols], cis or {}
    body = [(m, [_fmt_ci(v, cis.get(m, {}).get((t, c))) for t, cols in g for c, v, _ in cols]) for m, g in rows.items()]
    return render_table(title, [(g, [c for c, _, _ in cols]) for g, cols in column_groups],
                        body + [("(items)", [n for _, _, n in cells])])


def cell_ci(results, key, group, column):
    """The interval of one cell of `tables(results)`: table `key`, column group `group` (a data set's title, or a
    Winoground tag in Table 10)."""
    if key == "table10":
        return results["winoground"]["per_tag_ci"].get(group, {}).get(column)
    return results[next(n for n, t in TITLES.items() if t == group and n in results)]["ci"][column]


def show_differences(results, labels):
    """{data set: {"<label> - <first label>": {column: {difference, ci, n}}}} of every run against the first, and the
    printed tables."""
    out, text = {}, []
    for name in results[labels[0]]:
        diffs = {f"{m} - {labels[0]}": paired_differences(name, results[labels[0]][name], results[m][name])
                 for m in labels[1:]}
        out[name] = diffs
        cols = [c for c, _, _ in COLUMNS[name]]
        text.append(render_table(f"{TITLES[name]}: paired difference, points [95% bootstrap CI, same items and "
                                 "resamples]", [(TITLES[name], cols)],
                                 [(row, [_fmt_ci(d[c]["difference"], d[c]["ci"]) if d else "-" for c in cols])
                                  for row, d in diffs.items()]))
    return out, "\n\n".join(text)


def summary_line(name, res, report):
    other = f" ({report['other_split']} records of other splits left out)" if report.get("other_split") else ""
    other += f" [{report['form']} form]" if report.get("form") else ""
    other += f" ({report['over_cap']} over the per-file cap)" if report.get("over_cap") else ""
    return (f"{name}: {report['records']} records{other} -> {res['n_items']} items scored; skipped: "
            f"{report['malformed']} malformed records, {report['missing_images']} items with missing images "
            f"({report['n_missing_files']} files), {res['unreadable']} items with unreadable images; "
            f"ties with a wrong candidate (counted wrong): {res.get('ties', 0)}"
            + (f"; duplicate records (scored as loaded): {report['duplicates']}" if report.get("duplicates") else ""))


# ---- command line ------------------------------------------------------------------------------------------------

def _methods(text):
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in methods.METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}: choose from {','.join(methods.METHODS)}")
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{', '.join(twice)} named twice (each method is one row; the differences "
                                         "are against the first)")
    return names


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(LOADERS), help="one data set (default: all found under --data-root)")
    p.add_argument("--data-root", help="the data set's folder with --dataset (default data/NAME), else default data/")
    p.add_argument("--annotations", help="the annotation file (needs --dataset), instead of looking in the folder")
    p.add_argument("--split", help="RefCOCOg / VQAv2 split (default val), COCO (default train); 'all' for every split")
    p.add_argument("--shots", help="shapes world: the training shots whose held-out split is evaluated (default "
                                   "the checkpoint's, else 60)")
    p.add_argument("--output", default="results.json", help="JSON results (default results.json)")
    p.add_argument("--limit", type=positive_int, help="the first N items of each data set (a quick look)")
    p.add_argument("--methods", type=_methods,
                   help=f"comma-separated methods, one table row each: {','.join(methods.METHODS)} (default "
                        "discffusion; for --dataset shapes: discffusion and diffusion_itm zero-shot, and discffusion "
                        f"few-shot with {SHAPES_RUN}/prompt_deltas.safetensors if train.py wrote it)")
    p.add_argument("--checkpoint", action="append", metavar="[METHOD=]FILE",
                   help="learned tensors from train.py (prompt_deltas.safetensors, ...); FILE applies to the first "
                        "method, METHOD=FILE to that method; repeatable")
    p.add_argument("--resume", action="store_true",
                   help="keep the items already scored in OUTPUT's partial files (results.json -> results.items/) "
                        "and score the rest; refused if the model, checkpoint, options or item ids differ; an "
                        "item whose texts or image bytes changed is scored again")
    methods.add_model_args(p)
    add_data_args(p)
    p.add_argument("--batch-size", dest="eval_batch_size", type=positive_int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the old spelling of --eval-batch-size
    return p


def run(args, argv=()):
    if args.output:
        check_writable(args.output)  # before any data or model
    state = processes(args.device)  # one process, or one of `accelerate launch`'s: each scores its share of the items
    roots = dataset_roots(args)
    runs = default_runs(args, [name for name, _ in roots])
    if args.output:
        check_output(args, runs)  # before any data or model, too
    with state.main_process_first():                               # the shapes world is written on first use
        data = load_data(args, roots, runs)
    if args.output:                                                # nor a file the data sets read
        check_apart([(args.output, "file"), (partial_root(args.output), "folder")],
                    [i for _, _, items, report in data.values() for i in data_inputs(items, report)])
    for name, (_, _, _, report) in data.items() if state.is_main_process else ():
        for w in report["warnings"][:5]:
            print(f"warning: {w}", file=sys.stderr)
        if len(report["warnings"]) > 5:
            print(f"warning: {name}: {len(report['warnings']) - 5} more warnings (all in the JSON)", file=sys.stderr)
    per_method = {}
    for label, method, checkpoint in runs:
        model = methods.build(method, args, checkpoint)
        results = {}
        for name, (root, split, items, report) in data.items():
            store = None
            if args.output:
                folder = partial_folder(args.output, label, name)
                fp = fingerprint(args, method, checkpoint, model, name, root, split, items)
                store = open_partial(folder, fp, args.resume, items)
                if store[0] and state.is_main_process:
                    print(f"{label} {name}: {len(store[0])} of {len(items)} items already scored in {folder}")
            results[name] = evaluate_items(model, name, items, args.eval_batch_size, desc=f"{label} {name}",
                                           store=store)
            results[name].update(root=root, split=split, report=report)
        per_method[label] = {"method": method, "checkpoint": checkpoint, "model": getattr(model, "config", {}),
                             "datasets": results}
        del model
    labels = [label for label, _, _ in runs]
    first = per_method[labels[0]]["datasets"]
    shown = {m: tables(r["datasets"]) for m, r in per_method.items()}
    differences, diff_text = show_differences({m: r["datasets"] for m, r in per_method.items()}, labels)
    if not state.is_main_process:
        return None
    print()
    for key, (title, column_groups) in shown[labels[0]].items():
        cis = {m: {(g, c): cell_ci(per_method[m]["datasets"], key, g, c) for g, cols in shown[m][key][1]
                   for c, _, _ in cols} for m in labels}
        print(show_table(title + " [95% bootstrap CI]", column_groups, {m: shown[m][key][1] for m in labels}, cis)
              + "\n")
    if len(labels) > 1:
        print(diff_text + "\n")
    for name, res in first.items():
        print(summary_line(name, res, res["report"]))
        for line in res["unreadable_items"]:
            print(f"  unreadable: {line}")
    flat = lambda t: {k: {g: {c: v for c, v, _ in cols} for g, cols in cg} for k, (_, cg) in t.items()}  # noqa
    out = dict(command=["evaluate.py"] + [a for a in argv if a != "--resume"],
               args={k: v for k, v in vars(args).items() if k != "resume"}, model=per_method[labels[0]]["model"],
               datasets=first, tables=flat(shown[labels[0]]),
               methods={m: dict(r, tables=flat(shown[m])) for m, r in per_method.items()}, differences=differences)
    if args.output:
        write_json(args.output, out)
        shutil.rmtree(partial_root(args.output), ignore_errors=True)
        print(f"results written to {args.output}")
    return out


def check_output(args, runs):
    """--output and its partial folder (OUTPUT.items, removed at the end) replace no input: no checkpoint or
    --annotations file, nothing under --model (the data sets' own files are checked once they are loaded, before
    any model is built); the partial folder is a folder apart from OUTPUT and its name fits the file system
    (refused here, before any scoring, not when the first records are written)."""
    items = partial_root(args.output)
    if os.path.abspath(items) == os.path.abspath(args.output):
        raise InputError(f"--output {args.output}: the partial scores go to OUTPUT minus its extension + .items, "
                         "which is this name itself; choose a name not ending in .items")
    if os.path.lexists(items) and not os.path.isdir(items):
        raise InputError(f"cannot write the partial scores of --output {args.output} to {items}: a file is there, "
                         "not a folder")
    name_fits(items)
    inputs = methods.model_folders(args) + [(c, "checkpoint", "file") for _, _, c in runs if c]
    check_apart([(args.output, "file"), (items, "folder")], inputs + [(args.annotations, "annotations", "file")])


def evaluate_cli(argv):
    args = build_parser().parse_args(argv)
    try:
        with torch.no_grad():
            run(args, argv)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated, under run_cli): one line, the partial files kept
        raise Interrupted(interrupted_line(args, argv, getattr(e, "signum", signal.SIGINT)),
                          getattr(e, "signum", signal.SIGINT)) from None


def interrupted_line(args, argv, signum):
    """What an interruption says: where the scores made so far are kept and the command that resumes."""
    items = os.path.splitext(args.output)[0] + ".items" if args.output else None
    command = shlex.join(["python", "evaluate.py", *[a for a in argv if a != "--resume"]])
    if items and os.path.isdir(items):
        return (f"interrupted ({SIGNAL_NAMES[signum]}): the items scored so far are kept in {items}/; resume with: "
                f"{command} --resume")
    return f"interrupted ({SIGNAL_NAMES[signum]}) before any item was scored; rerun with: {command}"


def main(argv=None):
    """The command line: exit code 0, or 2 after one `error: ...` line for bad input."""
    return run_cli(evaluate_cli, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
