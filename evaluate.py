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
Fetching a data set: python download.py NAME (see its --help). No --dataset and no data set under data/: the embedded
shapes world is evaluated (said in one line).

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
"""
import argparse
import json
import os
import sys

import torch
from tqdm import tqdm

import methods
from common import MAX_LISTED, ArgumentParser, InputError, check_writable, positive_int, run_cli, write_json
from datasets import (DEFAULT_SPLIT, LOADERS, ImageCache, add_data_args, default_root, find_datasets, has_table_data,
                      load_items, loader_options, split_items)

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


def score_dataset(model, items, pairs=16, desc=None):
    """[(item, score matrix)] for every item whose images open, and [(item id, error)] for those that do not."""
    scored, unreadable, cache = [], [], ImageCache()
    with tqdm(total=len(items), desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True) as bar:
        for group in pair_chunks(items, pairs):
            loaded = []
            for item in group:
                try:
                    loaded.append((item, cache.load(item.images)))
                except Exception as e:  # corrupt / truncated / not an image: skip this item only
                    unreadable.append((item.id, f"{type(e).__name__}: {e}"))
            if loaded:
                mats = model.score_items([(ims, item.texts) for item, ims in loaded])
                scored += [(item, finite(item, s.detach().float().cpu())) for (item, _), s in zip(loaded, mats)]
            bar.update(len(group))
    return scored, unreadable


def finite(item, s):
    """s unchanged; a NaN or infinite score is an InputError naming the item, never a silent 0%."""
    if not torch.isfinite(s).all():
        raise InputError(f"item {item.id} ({', '.join(map(str, item.images))}) got non-finite scores {s.tolist()}: "
                         "check --lam, --precision (fp16 can overflow) and the checkpoint")
    return s


def evaluate_items(model, name, items, pairs=16, desc=None):
    """Score `items` of data set `name`, about `pairs` image-text pairs per scoring call -> {"metrics": {column:
    percent}, "counts", n_items, unreadable, ...}."""
    scored, unreadable = score_dataset(model, items, pairs, desc=desc or name)
    records = [(item, item_metrics(name, s)) for item, s in scored]
    out = summarize(name, records)
    ties = [item.id for item, s in scored if tied(name, s)]
    out.update(n_items=len(records), unreadable=len(unreadable),
               unreadable_items=[f"{i}: {e}" for i, e in unreadable[:MAX_LISTED]],
               ties=len(ties), tied_items=ties[:MAX_LISTED])
    return out


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
        print("no data set under data/: evaluating the embedded shapes world (python download.py comvg fetches "
              "ComVG; see README, Getting the data)")
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


def render_table(title, column_groups, rows):
    """column_groups [(group title, [column])], rows [(label, [cell])] (cells of all groups in order) -> text."""
    widths = [[max(len(c), 7) for c in cols] for _, cols in column_groups]
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


def format_table(name, rows):
    """One data set's columns for several runs: rows {label: {column: percent}} (e.g. zero_shot / few_shot)."""
    cols = [c for c, _, _ in COLUMNS[name]]
    return render_table(f"{TITLES[name]}: accuracy (%)", [(TITLES[name], cols)],
                        [(label, [_fmt(m.get(c)) for c in cols]) for label, m in rows.items()])


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


def show_table(title, column_groups, rows):
    """A paper table: one accuracy row per method ({method: column_groups}) and the item counts behind each cell."""
    cells = [c for _, cols in column_groups for c in cols]
    body = [(m, [_fmt(v) for _, cols in g for _, v, _ in cols]) for m, g in rows.items()]
    return render_table(title, [(g, [c for c, _, _ in cols]) for g, cols in column_groups],
                        body + [("(items)", [n for _, _, n in cells])])


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
    methods.add_model_args(p)
    add_data_args(p)
    p.add_argument("--batch-size", dest="eval_batch_size", type=positive_int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the old spelling of --eval-batch-size
    return p


def run(args, argv=()):
    if args.output:
        check_writable(args.output)  # before any data or model
    roots = dataset_roots(args)
    runs = default_runs(args, [name for name, _ in roots])
    data = load_data(args, roots, runs)
    for name, (_, _, _, report) in data.items():
        for w in report["warnings"][:5]:
            print(f"warning: {w}", file=sys.stderr)
        if len(report["warnings"]) > 5:
            print(f"warning: {name}: {len(report['warnings']) - 5} more warnings (all in the JSON)", file=sys.stderr)
    per_method = {}
    for label, method, checkpoint in runs:
        model = methods.build(method, args, checkpoint)
        results = {}
        for name, (root, split, items, report) in data.items():
            results[name] = evaluate_items(model, name, items, args.eval_batch_size, desc=f"{label} {name}")
            results[name].update(root=root, split=split, report=report)
        per_method[label] = {"method": method, "checkpoint": checkpoint, "model": getattr(model, "config", {}),
                             "datasets": results}
        del model
    labels = [label for label, _, _ in runs]
    first = per_method[labels[0]]["datasets"]
    shown = {m: tables(r["datasets"]) for m, r in per_method.items()}
    print()
    for key, (title, column_groups) in shown[labels[0]].items():
        print(show_table(title, column_groups, {m: shown[m][key][1] for m in labels}) + "\n")
    for name, res in first.items():
        print(summary_line(name, res, res["report"]))
        for line in res["unreadable_items"]:
            print(f"  unreadable: {line}")
    flat = lambda t: {k: {g: {c: v for c, v, _ in cols} for g, cols in cg} for k, (_, cg) in t.items()}  # noqa
    out = dict(command=["evaluate.py"] + list(argv), args=vars(args), model=per_method[labels[0]]["model"],
               datasets=first, tables=flat(shown[labels[0]]),
               methods={m: dict(r, tables=flat(shown[m])) for m, r in per_method.items()})
    if args.output:
        write_json(args.output, out)
        print(f"results written to {args.output}")
    return out


def evaluate_cli(argv):
    args = build_parser().parse_args(argv)
    with torch.no_grad():
        run(args, argv)


def main(argv=None):
    """The command line: exit code 0, or 2 after one `error: ...` line for bad input."""
    return run_cli(evaluate_cli, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
