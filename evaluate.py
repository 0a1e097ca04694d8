"""Evaluation of §5 (Tables 1, 8 and 10): image-text matching accuracy of every method on every data set.

    python evaluate.py --model PATH_OR_ID --dataset comvg --data-root DIR [--output results.json]
    python evaluate.py --model PATH_OR_ID                  # every data set found under --data-root (default data/)
    python evaluate.py --suite gdbench                     # GDBench / compositional: one table, bias table
                                                           # (docs/gdbench.md; --prefilter-k, --ties first)
    python evaluate.py --dataset flickr30k_text --adaptive 2:3,16  # every candidate 2 units, the best 3 go on to 16
                                                           # (--draws, learned level weights: docs/budget.md)

The protocol, read in `run`: load every data set asked for (datasets.REGISTRY; with no --dataset, one sub-folder per
data set under --data-root, and with none there, the embedded shapes world), then for each method (methods.build, with
its learned tensors from --checkpoint) score every item's candidates (`evaluate_items`: one `score_items` call per
about --pairs-per-call pairs), judge each item by its data set's rule (datasets.item_metrics; a tie counts as an
error), average the flags into the columns (`summarize`) and print the paper's tables: one row per method, each
accuracy with its 95% bootstrap interval over items, and the item counts. The run machinery (processes, partial files
and --resume, signals, output checks) is in tools/; docs/reliability.md and docs/scaleout.md describe it.
"""
import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import sys

import torch
from accelerate import PartialState
from tqdm import tqdm

import methods
from common import MAX_LISTED, InputError
from datasets import SUITES, REGISTRY, ImageCache, accuracy, add_data_args, groups_of, item_metrics, prefer_true, tied
from tools import runs
from tools.cli import (SIGNAL_NAMES, ArgumentParser, Interrupted, held, positive_int, run_cli, stops_ignored,
                       use_threads, write_json)
from tools.intervals import intervals
from tools.prefilter import prefilter
from tools.processes import gather, my_share, processes
from tools.resume import item_digest, partial_root, partial_store
from tools.tables import fmt_ci, render_table, show_differences, summary_line


# ---- scoring a data set's items: the numbers of the tables ------------------------------------------------------


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


def score_groups(model, groups, desc=None, on_group=None):
    """[(item, score matrix, {evaluations, rows} or {})] for every item of `groups` whose images open (the cost as the
    model's score_items reports it), and [(item id, error)] for those that do not; one score_items call per group.
    on_group(scored, [(item, error)]) runs after each group (the partial file). Each image is held as the model
    prepares it (`prepare_image`: at its input size), not at the file's size."""
    scored, unreadable, cache = [], [], ImageCache(prepare=getattr(model, "prepare_image", None))
    with tqdm(total=sum(map(len, groups)), desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True,
              disable=not PartialState().is_main_process) as bar:
        for group in groups:
            loaded, bad = [], []
            for item in group:
                try:
                    loaded.append((item, cache.load(item.images)))
                except Exception as e:  # corrupt / truncated / not an image: skip this item only
                    bad.append((item, f"{type(e).__name__}: {e}"))
            done, spent = [], []
            if loaded:
                try:
                    mats = model.score_items([(ims, item.texts) for item, ims in loaded], spent=spent)
                except InputError as e:  # e.g. an empty caption, named by its place in the call: name the items
                    ids = ", ".join(str(item.id) for item, _ in loaded)
                    raise InputError(f"{e} (the call's items in order: {ids})") from None
                spent = spent or [{}] * len(mats)                         # a scorer without UNet rows (CLIP)
                done = [(item, finite(item, s.detach().float().cpu()), cost)
                        for (item, _), s, cost in zip(loaded, mats, spent)]
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


def score_all(model, items, pairs, desc, store=None):
    """[(position in items, record)] for every item, in order; a record is {"id", "scores": (n_img, n_txt) tensor} or
    {"id", "error"}. The items are cut into the groups one process would score (pair_chunks), the groups not already
    in `store` are dealt out to the processes in turn, and the records are gathered, so every score comes from the
    same scoring call as in one process and is bit-identical to it."""
    done, out = store or ({}, None)
    hashes, mine = {}, []
    where = {id(item): k for k, item in enumerate(items)}
    groups = [g for g in pair_chunks(items, pairs) if not all(where[id(item)] in done for item in g)]

    def record(scored, unreadable):
        new = [dict(k=where[id(item)], id=item.id, content=item_digest(item, hashes) if out else None, scores=s,
                    **({"evaluations": cost["evaluations"].tolist(), "rows": cost["rows"]} if cost else {}))
               for item, s, cost in scored]
        new += [dict(k=where[id(item)], id=item.id, content=item_digest(item, hashes) if out else None, error=e)
                for item, e in unreadable]
        mine.extend(new)
        if out:
            try:
                out.write("".join(json.dumps({**r, "scores": r["scores"].tolist()} if "scores" in r else r) + "\n"
                                  for r in new))
                out.flush()                                        # a kill loses at most the group in flight
            except OSError as e:                                   # a full disk: the records before are kept
                with contextlib.suppress(OSError):
                    out.close()
                raise InputError(f"cannot write {out.name}: {e.strerror.lower() if e.strerror else e}; the items "
                                 "scored before are kept there: free some space, then rerun with --resume") from None

    score_groups(model, my_share(groups), desc, on_group=record)
    if out:
        out.close()
    records = dict(done) | {r["k"]: r for r in gather(mine)}
    return [(k, records[k]) for k in range(len(items))]


def evaluate_items(model, name, items, pairs=16, desc=None, store=None, ties="error", misses=()):
    """Score `items` of data set `name`, about `pairs` image-text pairs per scoring call -> {"metrics": {column:
    percent}, "counts", "ci" (95% bootstrap intervals), n_items, unreadable, "items" (id, category, score matrix and
    flags of each scored item; the texts too where the loader drew them, e.g. ARO's perturbations), ...}. Under
    `accelerate launch` the items are shared out among the processes (`score_all`); every process returns the same
    results. store: a partial file (`open_partial`). ties "first": DiffusionITM's rule, the true (first) candidate
    wins a tie (`datasets.prefer_true`); "error" (default): a tie counts as an error. misses: [(item, score matrix)]
    of items the --prefilter-k filter lost, counted as scored with that (losing) matrix."""
    records = score_all(model, items, pairs, desc or name, store)
    scored = [(items[k], torch.as_tensor(r["scores"])) for k, r in records if "scores" in r]    # kept: lists
    costs = [{c: r[c] for c in ("evaluations", "rows") if c in r} for _, r in records if "scores" in r]
    scored += list(misses)
    costs += [{}] * len(misses)
    lost = {id(item) for item, _ in misses}
    unreadable = [(r["id"], r["error"]) for _, r in records if "error" in r]
    judge = prefer_true if ties == "first" else (lambda s: s)
    records = [(item, item_metrics(name, judge(s))) for item, s in scored]
    out = summarize(name, records)
    tied_ids = [item.id for item, s in scored if tied(name, s)]
    cis = intervals(name, records)
    cis["ci"] = {**out.pop("ci", {}), **cis["ci"]}                      # set-level columns' intervals from summarize
    rows = [c["rows"] for c in costs if "rows" in c]
    out.update(n_items=len(records), unreadable=len(unreadable),
               rows_per_item=sum(rows) / len(rows) if rows else None,
               unreadable_items=[f"{i}: {e}" for i, e in unreadable[:MAX_LISTED]],
               ties=len(tied_ids), tied_items=tied_ids[:MAX_LISTED], tie_rule=ties, **cis)
    out["items"] = [dict(id=item.id, category=item.category, scores=s.tolist(), **m,
                         **({"texts": list(item.texts)} if item.meta.get("generated") else {}),
                         **({"prefilter_miss": True} if id(item) in lost else {}), **cost)
                    for (item, s), (_, m), cost in zip(scored, records, costs)]
    return out


def summarize(name, records):
    """The data set's columns (the mean of each flag over the column's items) with their counts; the mean of the
    category columns (macro), the per-group breakdown (Winoground per tag, VL-CheckList per file) and set-level
    metrics where its registry row has them."""
    row = REGISTRY[name]
    out = dict(metrics={}, counts={})
    for col, flag, which in row.columns:
        out["metrics"][col], out["counts"][col] = accuracy(records, flag, which)
    parts = [out["metrics"][c] for c, _, which in row.columns if which and out["metrics"][c] is not None]
    if row.macro and parts:
        out["macro_average"] = sum(parts) / len(parts)
    if row.breakdown:
        out[f"per_{row.breakdown.name}"] = {
            g: {col: accuracy(recs, flag)[0] for col, flag, which in row.columns if which is None and flag}
            | {"n": len(recs)}
            for g, recs in groups_of(name, records).items()}
    if row.metrics:
        for key, value in row.metrics(records).items():  # set-level columns merge into metrics / counts / ci
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


# ---- the paper's tables ------------------------------------------------------------------------------------------

TABLES = {"table1": "Table 1: accuracy (%)", "table8": "Table 8: accuracy (%)",
          "coco": "MS-COCO captions: accuracy (%)",
          "gdbench": "GDBench tasks (Krojer et al., 2023): R@1 / R@5 or accuracy (%)",
          "compositional": "Compositional tasks: accuracy (%)"}   # each registry row's `table`, in print order
SUITE_TITLES = {"gdbench": "GDBench (Krojer et al., 2023): R@1 / R@5 or accuracy (%)",
                "compositional": "Compositional suite (ARO, SugarCrepe, CLEVR, Winoground, VL-CheckList, ComVG): "
                                 "accuracy (%)"}


def tables(results, suite=None):
    """{table: (title, [(group, [(column, percent, count)])])} for the data sets evaluated, in the paper's layout: each
    data set in its row's table, and a breakdown with a table of its own (Winoground's Table 10) after them. suite:
    one table of the suite's data sets in the suite's order instead (and no breakdown tables)."""
    def group(n, r, keep=lambda which: True):
        return (REGISTRY[n].title, [(c, r["metrics"][c], r["counts"][c]) for c, _, which in REGISTRY[n].columns
                                    if keep(which)])
    if suite:  # the all-item columns of each data set, then the per-category ones (CLEVR's subtasks, SVO's parts)
        names = [n for n in SUITES[suite] if n in results and REGISTRY[n].columns]
        out = {suite: (SUITE_TITLES[suite], [group(n, results[n], lambda w: w is None) for n in names])}
        parts = [group(n, results[n], lambda w: w is not None) for n in names]
        if any(cols for _, cols in parts):
            out[f"{suite}_parts"] = (f"{SUITE_TITLES[suite].split(':')[0]}: per subtask / part, accuracy (%)",
                                     [g for g in parts if g[1]])
        return out if names else {}
    out = {}
    for key, title in TABLES.items():
        groups = [group(n, r) for n, r in results.items() if REGISTRY[n].table == key]
        if groups:
            out[key] = (title, groups)
    for n, r in results.items():
        b = REGISTRY[n].breakdown
        if b and b.table:
            per = r[f"per_{b.name}"]
            cols = [c for c, _, which in REGISTRY[n].columns if which is None]
            out[b.table[0]] = (b.table[1], [(g, [(c, per.get(g, {}).get(c), per.get(g, {}).get("n", 0)) for c in cols])
                                            for g in (b.order or tuple(per))])
    return out


def show_table(title, column_groups, rows, cis=None):
    """A paper table: one accuracy row per method ({method: column_groups}) and the item counts behind each cell;
    cis {method: {(group, column): [low, high]}}: each cell's interval, printed beside it."""
    cells, cis = [c for _, cols in column_groups for c in cols], cis or {}
    body = [(m, [fmt_ci(v, cis.get(m, {}).get((t, c))) for t, cols in g for c, v, _ in cols])
            for m, g in rows.items()]
    return render_table(title, [(g, [c for c, _, _ in cols]) for g, cols in column_groups],
                        body + [("(items)", [n for _, _, n in cells])])


def cell_ci(results, key, group, column):
    """The interval of one cell of `tables(results)`: table `key`, column group `group` (a data set's title, or a
    breakdown's group, e.g. a Winoground tag in Table 10)."""
    for n, r in results.items():
        b = REGISTRY[n].breakdown
        if b and b.table and b.table[0] == key:
            return r[f"per_{b.name}_ci"].get(group, {}).get(column)
    return results[next(n for n in results if REGISTRY[n].title == group)]["ci"].get(column)


def bias_table(per_method):
    """The bias sets' table: one row per pair X-Y; per method its effect size d with the 95% bootstrap interval and
    the permutation p-value; the image counts. "" without a bias set."""
    cells, counts = {}, {}
    for m, r in per_method.items():
        for n, res in r["datasets"].items():
            for pair, b in (res.get("bias", {}) if REGISTRY[n].bias else {}).items():
                ci = f" [{b['ci'][0]:.2f}, {b['ci'][1]:.2f}]" if b["ci"] else ""
                cells.setdefault(pair, {})[m] = (f"{b['d']:.2f}{ci}", f"{b['p']:.4f}")
                counts[pair] = f"{b['n_x']} / {b['n_y']}"
    if not cells:
        return ""
    labels = list(per_method)
    body = [(pair, [x for m in labels for x in c.get(m, ("-", "-"))] + [counts[pair]]) for pair, c in cells.items()]
    return render_table("Bias test (MMBias): effect size d [95% bootstrap CI], permutation p (two-sided); d > 0: X "
                        "nearer the pleasant phrases than Y", [(m, ["d", "p"]) for m in labels] +
                        [("images", ["X / Y"])], body)


# ---- command line ------------------------------------------------------------------------------------------------


def interrupted_line(args, argv, signum):
    """What an interruption says: where the scores made so far are kept and the command that resumes."""
    items = partial_root(args.output) if args.output else None
    command = shlex.join(["python", "evaluate.py", *[a for a in argv if a != "--resume"]])
    if items and os.path.isdir(items):
        return (f"interrupted ({SIGNAL_NAMES[signum]}): the items scored so far are kept in {items}/; resume with: "
                f"{command} --resume")
    return f"interrupted ({SIGNAL_NAMES[signum]}) before any item was scored; rerun with: {command}"


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
    p.add_argument("--dataset", choices=sorted(REGISTRY), help="one data set (default: all found under --data-root)")
    p.add_argument("--suite", choices=tuple(SUITES),
                   help="every data set of a suite found under --data-root (default data/), one table: gdbench "
                        f"({', '.join(SUITES['gdbench'])}) or compositional ({', '.join(SUITES['compositional'])}); "
                        "none found: the embedded shapes world's instance of each, on the tiny model")
    p.add_argument("--prefilter-k", type=positive_int,
                   help="full retrieval: CLIP (--clip-model, zero-shot cosine) ranks every candidate of an item and "
                        "each method re-ranks only the top K (e.g. Flickr30K's Karpathy split: --flickr-karpathy "
                        "--prefilter-k 20); the filter's recall@K is printed beside R@1 / R@5")
    p.add_argument("--ties", choices=("error", "first"), default="error",
                   help="error (default): a tie with a wrong candidate counts as an error; first: DiffusionITM's "
                        "rule, the true (first) candidate wins a tie (numpy argmax), for items with one image or "
                        "one text")
    p.add_argument("--data-root", help="the data set's folder with --dataset (default data/NAME), else default data/")
    p.add_argument("--annotations", help="the annotation file (needs --dataset), instead of looking in the folder")
    p.add_argument("--split", help="the split of a data set that ships splits (default its registry row's); 'all' for every split")
    p.add_argument("--shots", help="shapes world: the training shots whose held-out split is evaluated (default "
                                   "the checkpoint's, else 60)")
    p.add_argument("--output", default="results.json", help="JSON results (default results.json)")
    p.add_argument("--limit", type=positive_int, help="the first N items of each data set (a quick look)")
    p.add_argument("--methods", type=_methods,
                   help=f"comma-separated methods, one table row each: {','.join(methods.METHODS)} (default "
                        "discffusion; for --dataset shapes: discffusion and diffusion_itm zero-shot, and discffusion "
                        f"few-shot with {runs.SHAPES_RUN}/prompt_deltas.safetensors if train.py wrote it)")
    p.add_argument("--checkpoint", action="append", metavar="[METHOD=]FILE",
                   help="learned tensors from train.py (prompt_deltas.safetensors, ...); FILE applies to the first "
                        "method, METHOD=FILE to that method; repeatable")
    p.add_argument("--resume", action="store_true",
                   help="keep the items already scored in OUTPUT's partial files (results.json -> results.items/) "
                        "and score the rest; refused if the model, checkpoint, options or item ids differ; an "
                        "item whose texts or image bytes changed is scored again")
    methods.add_model_args(p)
    add_data_args(p)
    return p


def run(args, argv=()):
    """Load every data set, score each method on each, print the paper's tables and write OUTPUT."""
    state = processes(args.device)  # one process, or one of `accelerate launch`'s: each scores its share
    roots = runs.dataset_roots(args)                             # [(data set, folder)]
    rows = runs.default_runs(args, [name for name, _ in roots])  # [(row label, method, checkpoint)]
    runs.check_output(args, rows)                                # before any data or model
    with state.main_process_first():                               # the shapes world is written on first use
        data = runs.load_data(args, roots, rows)                 # {name: (root, split, items, report)}
    runs.check_output(args, rows, data)                          # nor a file the data sets read
    filtered = {}
    if args.prefilter_k:                                         # CLIP's top K per item; the rest never scored
        clip = methods.build("clip", args)
        for name, (root, split, items, report) in list(data.items()):
            kept, misses, stats = prefilter(clip, items, args.prefilter_k)
            data[name], filtered[name] = (root, split, kept, report), (misses, stats)
        del clip
    per_method = {}
    for label, method, checkpoint in rows:
        model = methods.build(method, args, checkpoint)
        results = {}
        for name, (root, split, items, report) in data.items():
            store = partial_store(args, label, method, checkpoint, model, name, root, split, items)
            misses, stats = filtered.get(name, ((), None))
            results[name] = evaluate_items(model, name, items, args.pairs_per_call, f"{label} {name}", store,
                                           args.ties, misses)
            results[name].update(root=root, split=split, report=report, **({"prefilter": stats} if stats else {}))
        per_method[label] = dict(method=method, checkpoint=checkpoint, model=getattr(model, "config", {}),
                                 datasets=results)
        del model
    return write_results(args, argv, per_method) if state.is_main_process else None


def write_results(args, argv, per_method):
    """The paper's tables (one row per method), the paired differences against the first method, one summary line
    per data set; OUTPUT (JSON) written, its partial files removed."""
    labels = list(per_method)
    first = per_method[labels[0]]["datasets"]
    shown = {m: tables(r["datasets"], getattr(args, "suite", None)) for m, r in per_method.items()}
    differences, diff_text = show_differences({m: r["datasets"] for m, r in per_method.items()}, labels)
    print()
    for key, (title, column_groups) in shown[labels[0]].items():
        cis = {m: {(g, c): cell_ci(per_method[m]["datasets"], key, g, c) for g, cols in shown[m][key][1]
                   for c, _, _ in cols} for m in labels}
        print(show_table(title + " [95% bootstrap CI]", column_groups, {m: shown[m][key][1] for m in labels}, cis)
              + "\n")
    if bias_table(per_method):
        print(bias_table(per_method) + "\n")
    if len(labels) > 1 and diff_text:
        print(diff_text + "\n")
    for name, res in first.items():
        print(summary_line(name, res, res["report"]))
        for line in res["unreadable_items"]:
            print(f"  unreadable: {line}")
    for name, res in first.items():
        if res.get("prefilter"):
            f = res["prefilter"]
            print(f"{name}: CLIP pre-filter top {f['k']}: recall@{f['k']} {f['recall']:.2f}% ({f['hits']} of "
                  f"{f['items']} items kept their true candidate; the rest count as wrong in every row)")
    for name, why in getattr(args, "skipped", {}).items():
        print(f"{name}: skipped, not loaded ({why})")
    flat = lambda t: {k: {g: {c: v for c, v, _ in cols} for g, cols in cg} for k, (_, cg) in t.items()}  # noqa
    out = dict(command=["evaluate.py"] + [a for a in argv if a != "--resume"],
               args={k: v for k, v in vars(args).items() if k != "resume"}, model=per_method[labels[0]]["model"],
               datasets=first, tables=flat(shown[labels[0]]),
               methods={m: dict(r, tables=flat(shown[m])) for m, r in per_method.items()}, differences=differences,
               skipped=getattr(args, "skipped", {}))
    if args.output:
        write_json(args.output, out)
        shutil.rmtree(partial_root(args.output), ignore_errors=True)
        print(f"results written to {args.output}")
    return out


def evaluate_cli(argv):
    args = build_parser().parse_args(argv)
    args.threads = use_threads(args.threads)  # recorded in OUTPUT's args
    try:
        with torch.no_grad(), held(args.output, "--output"):          # a second live run on OUTPUT is refused
            run(args, argv)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated, under run_cli): one line, the partial files kept
        with stops_ignored():                                      # a second Ctrl-C meanwhile: no traceback
            line = interrupted_line(args, argv, getattr(e, "signum", signal.SIGINT))
        raise Interrupted(line, getattr(e, "signum", signal.SIGINT)) from None


def main(argv=None):
    """The command line: exit code 0, or 2 after one `error: ...` line for bad input."""
    return run_cli(evaluate_cli, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
