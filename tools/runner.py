"""The run machinery of train.py and evaluate.py, one folder down from the paper: what a real run needs around
Algorithm 1 and the evaluation protocol, and what a reader of the paper can skip.

- many processes (`accelerate launch`): `processes`, `score_sharded` (each process scores its share of the items,
  bit-identical to one process), and training's gradient average (`average_gradients`);
- evaluation of a set of items: `evaluate_items` scores them (`pair_chunks` per call, unreadable images skipped and
  counted, non-finite scores refused), judges each (datasets.item_metrics) and averages the flags into the paper's
  columns (`summarize`), with 95% bootstrap intervals (`intervals`, `paired_differences`);
- resume: evaluation's partial files (`open_partial`: a fingerprint of the run, one record per item with a digest
  of its texts and image bytes), training's checkpoint (`save_state` / `restore`: weights-only torch files);
- stops: Ctrl-C and SIGTERM end the step or the group in flight and print the command that resumes (`stops`);
- which runs and data sets evaluate.py evaluates (`default_runs`, `dataset_roots`, `load_data`), outputs that never
  replace an input (`check_output`), and the text tables (`render_table`, `format_table`, `summary_line`).
"""
import contextlib
import hashlib
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import signal
import sys
import threading

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, reduce
from tqdm import tqdm

import methods
from common import (MAX_LISTED, SIGNAL_NAMES, InputError, Interrupted, atomic_write, check_apart, check_writable,
                    default_device, file_hash, name_fits, number, positive_int, resolve_dtype, write_json)
from datasets import (COLUMNS, DEFAULT_SPLIT, TITLES, WINOGROUND_TAGS, ImageCache, _is, default_root, find_datasets,
                      data_inputs, has_table_data, item_metrics, load_items, loader_options, split_items, tied)


# ---- many processes (accelerate launch) --------------------------------------------------------------------------


def processes(device=None):
    """accelerate's PartialState: this run's one process, or one of `accelerate launch`'s. Processes on CPU
    (--device cpu, or no GPU) talk over gloo; on GPUs each takes its own device (accelerate sets it)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "MASTER_PORT" in os.environ \
            and not any(k in os.environ for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")):
        print("warning: `accelerate launch --cpu --num_processes N` starts one process (accelerate starts N CPU "
              "processes only with --mpirun_hostfile); for N CPU processes use `accelerate launch --multi_gpu "
              "--num_processes N ... --device cpu`", file=sys.stderr)
    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


# ---- evaluating a set of items ----------------------------------------------------------------------------------


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


def accuracy(records, flag, which=None):
    """(percent or None, count) of `flag` over the records [(item, metrics)] whose category passes `which`."""
    hits = [m[flag] for item, m in records if which is None or which(item.category)]
    return (100.0 * sum(hits) / len(hits) if hits else None), len(hits)


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


# ---- confidence intervals ----------------------------------------------------------------------------------------

CI_RESAMPLES, CI_SEED = 1000, 0  # every interval: 95% percentile bootstrap over items, the same resamples for a count


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


# ---- evaluation's partial files (--resume) ----------------------------------------------------------------------


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


def check_output(args, runs, data=None):
    """--output and its partial folder (OUTPUT.items, removed at the end) replace no input. Before the data: the
    file can be written, and it is no checkpoint or --annotations file and nothing under --model; the partial folder
    is a folder apart from OUTPUT and its name fits the file system (refused here, before any scoring, not when the
    first records are written). With the loaded `data` (before any model is built): no file a data set reads."""
    if not args.output:
        return
    items = partial_root(args.output)
    if data is not None:
        check_apart([(args.output, "file"), (items, "folder")],
                    [i for _, _, its, report in data.values() for i in data_inputs(its, report)])
        return
    check_writable(args.output)
    if os.path.abspath(items) == os.path.abspath(args.output):
        raise InputError(f"--output {args.output}: the partial scores go to OUTPUT minus its extension + .items, "
                         "which is this name itself; choose a name not ending in .items")
    if os.path.lexists(items) and not os.path.isdir(items):
        raise InputError(f"cannot write the partial scores of --output {args.output} to {items}: a file is there, "
                         "not a folder")
    name_fits(items)
    inputs = methods.model_folders(args) + [(c, "checkpoint", "file") for _, _, c in runs if c]
    check_apart([(args.output, "file"), (items, "folder")], inputs + [(args.annotations, "annotations", "file")])


def partial_store(args, label, method, checkpoint, model, name, root, split, items):
    """The partial file of one (run, data set) (`open_partial`), or None without --output."""
    if not args.output:
        return None
    folder = partial_folder(args.output, label, name)
    store = open_partial(folder, fingerprint(args, method, checkpoint, model, name, root, split, items), args.resume,
                         items)
    if store[0] and PartialState().is_main_process:
        print(f"{label} {name}: {len(store[0])} of {len(items)} items already scored in {folder}")
    return store


# ---- which runs and data sets evaluate.py evaluates -----------------------------------------------------------


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
        if PartialState().is_main_process:
            for w in report["warnings"][:5]:
                print(f"warning: {w}", file=sys.stderr)
            if len(report["warnings"]) > 5:
                print(f"warning: {name}: {len(report['warnings']) - 5} more warnings (all in the JSON)",
                      file=sys.stderr)
    return out


# ---- text tables ---------------------------------------------------------------------------------------------


def _fmt(v):
    return "-" if v is None else f"{v:.2f}"


def fmt_ci(v, ci):
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
                        [(label, [fmt_ci(m.get(c), cis.get(label, {}).get(c)) for c in cols])
                         for label, m in rows.items()])


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
                                 [(row, [fmt_ci(d[c]["difference"], d[c]["ci"]) if d else "-" for c in cols])
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


# ---- stops: Ctrl-C and SIGTERM -----------------------------------------------------------------------------------


def interrupted_line(args, argv, signum):
    """What an interruption says: where the scores made so far are kept and the command that resumes."""
    items = partial_root(args.output) if args.output else None
    command = shlex.join(["python", "evaluate.py", *[a for a in argv if a != "--resume"]])
    if items and os.path.isdir(items):
        return (f"interrupted ({SIGNAL_NAMES[signum]}): the items scored so far are kept in {items}/; resume with: "
                f"{command} --resume")
    return f"interrupted ({SIGNAL_NAMES[signum]}) before any item was scored; rerun with: {command}"


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; schedulers, containers and `timeout`


@contextlib.contextmanager
def stops(argv=None):
    """Within: the first Ctrl-C (SIGINT) or SIGTERM sets the yielded Event and its `signum` (train.py's loop ends its
    step, checkpoints and raises Interrupted, given here the command that resumes); a second one acts at once (the
    previous handlers are back: KeyboardInterrupt, or under run_cli Terminated for SIGTERM). The previous handlers are
    back afterwards. Off the main thread, where no handler can be set, the Event is never set."""
    stop = threading.Event()
    stop.signum = signal.SIGINT
    previous = {}

    def handler(signum, frame):
        stop.signum = signum
        stop.set()
        for s, h in previous.items():
            signal.signal(s, h)
        again = "press again" if signum == signal.SIGINT else "send it again"
        print(f"\n{SIGNAL_NAMES[signum]}: stopping after this step ({again} to abort at once)", file=sys.stderr)
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            previous[s] = signal.signal(s, handler) or signal.SIG_DFL
    try:
        yield stop
    except Interrupted as e:
        raise Interrupted(f"{e}; resume with: {resume_command(argv)}", e.signum) from None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def resume_command(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", "train.py", *argv] + ([] if "--resume" in argv else ["--resume"]))


def stop_requested(stop, done, total):
    """Did any process get a stop signal (and is there a step left to resume)? Every process asks at every step."""
    return stop is not None and bool(reduce(torch.tensor(float(stop.is_set())), "sum") > 0) and done < total


# ---- train.py: options, data, mixed precision, gradients across processes ---------------------------------------

def add_run_args(p):
    """train.py's options around the loop: what it evaluates, where it writes, how it resumes."""
    p.add_argument("--eval-split", default="val", help="test split for data sets that ship splits (default val)")
    p.add_argument("--eval-dataset", help="test on another data set instead of a held-out split (Table 8: train on "
                                          "coco, test on winoground or vlchecklist)")
    p.add_argument("--eval-data-root", help="the --eval-dataset's folder (default data/<name>)")
    p.add_argument("--compare", help="comma-separated methods evaluated zero-shot on the same test split, one table "
                                     "row each (e.g. diffusion_itm,clip_ft; shapes default: diffusion_itm)")
    p.add_argument("--output-dir", help="default runs/<dataset>")
    p.add_argument("--save-every", type=positive_int, default=50, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    p.add_argument("--eval-every", type=number(int, low=0), default=0,
                   help="evaluate the test split every N steps (0 = only at the end)")
    p.add_argument("--eval-limit", type=positive_int, default=None, help="evaluate at most N test items")
    p.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot evaluation before training")


def finish_args(p, args):
    """The options after parsing: each resolved by methods.option (command line, checkpoint, data set, generic), the
    --compare list checked, the output folder's default."""
    for key in ("model", "shots", "lr", "compare", "lam", "pooling", "itm_timesteps", "steps"):
        setattr(args, key, methods.option(args, key))
    names = [m for m in args.compare.split(",") if m]
    bad = [m for m in names if m not in methods.METHODS]
    if bad:
        p.error(f"--compare: unknown method(s) {bad}; choose from {','.join(methods.METHODS)}")
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:
        p.error(f"--compare: {', '.join(twice)} named twice (each method is one row)")
    args.output_dir = args.output_dir or os.path.join("runs", args.dataset)
    args.changes = []  # options changed at a --resume (RESUME_APPLIED)
    return args


def trained_file(args):
    name = "prompt_deltas" if args.method == "discffusion" else f"trained_{args.method}"
    return os.path.join(args.output_dir, f"{name}.safetensors")


def train_outputs(args):
    return [(os.path.join(args.output_dir, f), "file") for f in ("checkpoint.pt", "results.json")] + [
        (trained_file(args), "file")]


def train_data(args):
    """(train items, test items, the test data set's name, the training data's report): the few-shot split of
    datasets.split_items (or --eval-dataset's items, Table 8), --eval-limit applied; the outputs checked against
    every file the data sets read (before any model)."""
    check_writable(args.output_dir, folder=True)                   # before any data, model or step
    check_apart(train_outputs(args), methods.model_folders(args) + [(args.annotations, "annotations", "file")])
    state = PartialState()
    with state.main_process_first():                               # the shapes world is written on first use
        items, report = load_items(args.dataset, args.data_root, args.annotations, seed=args.seed,
                                   **loader_options(args, args.dataset))
    train_items, test_items = split_items(items, args.shots, args.seed, args.eval_split, not args.eval_dataset)
    name = args.eval_dataset or args.dataset                      # the data set the test split (and metrics) come from
    inputs = data_inputs(items, report)
    if args.eval_dataset:                                          # zero-shot transfer (Table 8): train on one, test on another
        test_items, test_report = load_items(name, args.eval_data_root, seed=args.seed, split=DEFAULT_SPLIT.get(name),
                                             **loader_options(args, name))
        inputs += data_inputs(test_items, test_report)
    check_apart(train_outputs(args), inputs)                       # nor a file the data sets read
    if args.eval_limit:
        test_items = test_items[:args.eval_limit]
    if state.is_main_process:
        print(f"{args.dataset}: {len(train_items)} training items; {name}: {len(test_items)} test items "
              f"(split by seed {args.seed}, no shared sentence-image pair)")
    return train_items, test_items, name, report


def total_steps(args, n_items):
    """--steps, else --epochs passes over the training split at the global batch (batch x processes x accumulation)."""
    per_epoch = math.ceil(n_items / (args.batch_size * PartialState().num_processes * args.grad_accum))
    return args.steps if args.steps is not None else max(1, math.ceil(args.epochs * per_epoch))


def mixed_precision(model, params):
    """(torch.autocast arguments, GradScaler): autocast in the frozen model's precision; fp16 scales the loss (the
    trained tensors are fp32), bf16 and fp32 need no scaler."""
    device_type, dtype = torch.device(model.device).type, model.dtype
    autocast = dict(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16 and all(
        p.dtype == torch.float32 for p in params))
    return autocast, scaler


def load_batch(cache, batch, unreadable, n_items):
    """[(images, texts)] of the micro-batch's readable items, and the "id: error" of those skipped (as in evaluation:
    an unreadable image skips its item, warned about once; `unreadable` collects them over the run)."""
    loaded, skipped = [], []
    for it in batch:
        try:
            loaded.append((cache.load(it.images), it.texts))
        except Exception as e:  # noqa: BLE001 - corrupt / truncated / not an image: PIL raises many types
            skipped.append(f"{it.id}: {type(e).__name__}: {e}")
            if skipped[-1] not in unreadable and PartialState().is_main_process:
                print(f"warning: training item {skipped[-1]}; skipped (counted in results.json)", file=sys.stderr)
            unreadable.add(skipped[-1])
    if len(unreadable) == n_items:
        raise InputError(f"no training item can be read: the images of all {n_items} are unreadable "
                         f"(first: {min(unreadable)})")
    return loaded, skipped


def checked_loss(loss, step, args):
    """The loss averaged over the processes (a float); a non-finite one stops the run (FloatingPointError, exit 1)."""
    mean = reduce(loss.detach(), "mean")                           # over the processes: the global micro-batch's
    if not torch.isfinite(mean):
        path = os.path.join(args.output_dir, "checkpoint.pt")
        good = f"last good checkpoint {path}" if os.path.exists(path) else "no checkpoint yet"
        raise FloatingPointError(f"non-finite loss ({mean.item()}) at step {step}; {good}. "
                                 "Try a lower --lr or --precision fp32.")
    return mean.item()


def average_gradients(params):
    """Every process's gradients of the trained tensors replaced by their mean over the processes (accelerate's
    reduce), so that every process takes the same optimizer step."""
    grads = [p for p in params if p.grad is not None]              # the same tensors in every process
    for p, g in zip(grads, reduce([p.grad for p in grads], "mean")):
        p.grad = g


def step_record(step, loss, hits, seen, used, skipped, scaler, scale):
    """One step of the history: its loss, training accuracy, items trained on (and skipped), fp16's loss scale."""
    hits, seen, used = map(int, reduce(torch.tensor([hits, seen, used]), "sum"))
    out = {"step": step + 1, "loss": loss, "train_acc": hits / seen if seen else None, "items": used} | (
        {"unreadable": sorted(set(skipped))} if skipped else {})
    if scaler.is_enabled():
        out.update(loss_scale=scale, skipped=scaler.get_scale() < scale)   # an overflow lowers the scale
    return out


def save_training(model, results, history, seconds, args):
    """After the loop: the history and the unreadable items into `results`; the trained tensors saved (main
    process) with the training options as metadata."""
    unreadable = sorted({u for h in history for u in h.get("unreadable", [])})
    results["train"] = {"steps": len(history), "seconds": round(seconds, 1),
                        "final_loss": history[-1]["loss"] if history else None,
                        "unreadable": len(unreadable), "unreadable_items": unreadable[:MAX_LISTED], "history": history}
    if PartialState().is_main_process:
        if unreadable:
            print(f"training: {len(unreadable)} items with unreadable images skipped (listed in results.json)")
        model.save_trained(trained_file(args), vars(args))


def finish_training(args, results, name, test_items):
    """The --compare methods evaluated zero-shot on the same test items, results.json written and the table printed
    (one row per run; main process)."""
    results["compare"] = {}
    for method in [m for m in args.compare.split(",") if m]:
        other = methods.build(method, args)
        with torch.no_grad():
            results["compare"][method] = evaluate_items(other, name, test_items, args.eval_batch_size,
                                                        desc=f"{method} zero-shot")
        del other
    if not PartialState().is_main_process:
        return results
    write_json(os.path.join(args.output_dir, "results.json"), results)
    runs = {f"{args.method} {k.replace('_', '-')}": results[k] for k in ("zero_shot", "few_shot") if k in results}
    runs.update({f"{m} zero-shot": r for m, r in results["compare"].items()})
    print(format_table(name, {k: r["metrics"] for k, r in runs.items()}, {k: r["ci"] for k, r in runs.items()}))
    print(f"wrote {args.output_dir}/results.json and {trained_file(args)}")
    return results


# ---- train.py's checkpoint (--resume) ----------------------------------------------------------------------------
# --resume and the options: those that define the trained tensors, the data order or the score are refused when they
# differ from the checkpoint's; the optimisation settings below apply from the resumed step on (the restored
# optimizer state takes the command line's --lr and --weight-decay), and each change is recorded in args.changes
# (results.json's args and the trained file's training_args), with the step it took effect from.
RESUME_FIXED = ("method", "dataset", "shots", "seed", "batch_size", "grad_accum", "lam", "pooling", "layers", "levels",
                "score", "resolution", "resize_via", "itm_variant", "itm_timesteps", "uncond_attention", "split_by",
                "ref_negatives", "mask_object", "vlc_max_per_file", "precision", "lora", "guidance_scale")

RESUME_APPLIED = ("lr", "weight_decay", "grad_clip", "margin", "negatives", "loss", "steps", "epochs")

STATE_KEYS = ("step", "params", "optimizer", "rng", "history", "args")

def read_state(path):
    """checkpoint.pt -> its state dict, loaded with torch.load(weights_only=True): tensors and plain data only, so a
    crafted pickle is refused and never runs. An unreadable file or one that lacks the state's parts is an
    InputError naming it."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a truncated, empty or foreign file
        text = str(e).strip()
        why = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        raise InputError(f"--resume: {path} is not a checkpoint train.py wrote: " + (
            f"it names {why.group(1)}, which only a crafted file does (refused, not run)" if why else
            f"{type(e).__name__}{': ' + text.splitlines()[0][:120] if text else ''}")) from None
    lacking = [k for k in STATE_KEYS if k not in ck] if isinstance(ck, dict) else list(STATE_KEYS)
    if lacking or not isinstance(ck["args"], dict) or not isinstance(ck["params"], list):
        raise InputError(f"--resume: {path} is not a checkpoint train.py wrote (no {', '.join(lacking) or 'args'})")
    return ck

def check_params(path, saved, params):
    """The checkpoint's trained tensors fit this model's, in number and shape (zip would silently cut them short)."""
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in saved]
    if shapes != [tuple(p.shape) for p in params]:
        raise InputError(f"--resume: {path} holds {len(shapes)} trained tensors that do not fit this model's "
                         f"{len(params)} (first shapes {shapes[:2]} there, {[tuple(p.shape) for p in params[:2]]} "
                         f"here): written with other --layers or --model? rerun without --resume to start over")


def restore(args, params, opt, scaler, log=print):
    """(first step, history): (0, []) unless --resume finds OUTPUT_DIR/checkpoint.pt, whose trained tensors,
    optimizer, grad scaler and RNG state are then restored; an option that defines the run must be the checkpoint's
    (RESUME_FIXED), a changed optimisation setting (RESUME_APPLIED) applies from here on and is recorded."""
    dist = PartialState()
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
    if not (args.resume and os.path.exists(ckpt_path)):
        return 0, []
    ck = read_state(ckpt_path)
    was = dict(ck["args"], batch_size=ck["args"]["batch_size"] * ck["args"].get("processes", 1))
    for key in RESUME_FIXED:
        now, what = getattr(args, key, None), f"--{key.replace('_', '-')}"
        if key == "batch_size":
            now, what = now * dist.num_processes, "the global batch (--batch-size x processes)"
        if key in was and was[key] != now:
            shown = ["the default" if v is None else v for v in (was[key], now)]
            raise InputError(f"--resume: {ckpt_path} was written with {what} {shown[0]}, this run has "
                             f"{shown[1]}; rerun without --resume to start over")
    check_params(ckpt_path, ck["params"], params)
    try:
        with torch.no_grad():
            for p, saved in zip(params, ck["params"]):
                p.copy_(saved)
        opt.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):                                       # {} when no scaler ran (fp32, bf16)
            scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"--resume: {ckpt_path} does not fit this run ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    for group in opt.param_groups:                                 # the command line's, not the restored ones
        group.update(lr=args.lr, weight_decay=args.weight_decay)
    start, history = ck["step"], ck["history"]
    changed = [dict(option=f"--{k.replace('_', '-')}", was=was.get(k), now=getattr(args, k), from_step=start + 1)
               for k in RESUME_APPLIED if k in was and was[k] != getattr(args, k)]
    args.changes = list(was.get("changes") or []) + changed
    if dist.is_main_process:
        log(f"resumed from {ckpt_path} at step {start}" + "".join(
            f"; {c['option']} {c['was']} -> {c['now']} from step {c['from_step']}" for c in changed))
    return start, history


def save_state(args, done, params, opt, scaler, history):
    """OUTPUT_DIR/checkpoint.pt, written atomically by the main process: tensors and plain data only (read back with
    torch.load(weights_only=True))."""
    if PartialState().is_main_process:
        state = {"step": done, "params": [p.detach().cpu() for p in params], "optimizer": opt.state_dict(),
                 "scaler": scaler.state_dict(), "rng": torch.get_rng_state(), "history": history, "args": vars(args)}
        atomic_write(os.path.join(args.output_dir, "checkpoint.pt"), lambda tmp: torch.save(state, tmp))
