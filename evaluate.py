"""Evaluation of §5 (Tables 1, 8 and 10): image-text matching accuracy on ComVG, RefCOCOg, VQAv2, Winoground, VL-CheckList.

    python evaluate.py --model PATH_OR_ID --dataset comvg --data-root DIR [--annotations FILE] [--output results.json]
    python evaluate.py --model PATH_OR_ID                  # every data set found under --data-root (default data/)

The protocol, read in `run`: load every data set asked for (datasets.py), then for each method (methods.build:
Discffusion, DiffusionITM, the CLIP baselines, with their learned tensors from --checkpoint) score every item's
candidates (one `score_items` call per about --eval-batch-size pairs), judge each item by its data set's rule
(datasets.item_metrics: ComVG the positive image beats the negative, RefCOCOg / VQAv2 the rank of the true text,
Winoground text / image / group, VL-CheckList POS beats NEG; a tie counts as an error) and print the paper's tables:
one row per method, each accuracy with its 95% bootstrap interval over items, and the item counts.

--dataset NAME: --data-root is that data set's own folder (default data/NAME). No --dataset: --data-root holds one
sub-folder per data set (comvg/, refcocog/, vqav2/, winoground/, vlchecklist/, coco/), each in its publisher's
layout (docs/data.md; fetched by python -m tools.download NAME). RefCOCOg and VQAv2 are evaluated on "val" unless
--split names another (or "all"). No --dataset and no data set under data/: the embedded shapes world.

The run machinery is tools/runner.py: `accelerate launch --multi_gpu --num_processes N` (add --device cpu for CPU
processes) shares the items out and writes what one process writes; scores are appended to OUTPUT's partial files
(results.json -> results.items/) and `--resume` keeps them (an item whose texts or image bytes changed is scored
again); --output never replaces an input; Ctrl-C or SIGTERM stops with one line naming the kept files and the command
that resumes (exit 130 / 143). Bad input: "error: <one line>" on stderr, exit 2; an unreadable image skips its item,
counted in the summary; a non-finite score is an error naming the item.
"""
import argparse
import shutil
import signal
import sys

import torch

import methods
from common import ArgumentParser, Interrupted, positive_int, run_cli, write_json
from datasets import COLUMNS, LOADERS, TITLES, WINOGROUND_TAGS, add_data_args
from tools import runner


# ---- the paper's tables ------------------------------------------------------------------------------------------


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
    body = [(m, [runner.fmt_ci(v, cis.get(m, {}).get((t, c))) for t, cols in g for c, v, _ in cols])
            for m, g in rows.items()]
    return runner.render_table(title, [(g, [c for c, _, _ in cols]) for g, cols in column_groups],
                        body + [("(items)", [n for _, _, n in cells])])


def cell_ci(results, key, group, column):
    """The interval of one cell of `tables(results)`: table `key`, column group `group` (a data set's title, or a
    Winoground tag in Table 10)."""
    if key == "table10":
        return results["winoground"]["per_tag_ci"].get(group, {}).get(column)
    return results[next(n for n, t in TITLES.items() if t == group and n in results)]["ci"][column]


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
                        f"few-shot with {runner.SHAPES_RUN}/prompt_deltas.safetensors if train.py wrote it)")
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
    """Load every data set, score each method on each, print the paper's tables and write OUTPUT."""
    state = runner.processes(args.device)  # one process, or one of `accelerate launch`'s: each scores its share
    roots = runner.dataset_roots(args)                             # [(data set, folder)]
    runs = runner.default_runs(args, [name for name, _ in roots])  # [(row label, method, checkpoint)]
    runner.check_output(args, runs)                                # before any data or model
    with state.main_process_first():                               # the shapes world is written on first use
        data = runner.load_data(args, roots, runs)                 # {name: (root, split, items, report)}
    runner.check_output(args, runs, data)                          # nor a file the data sets read
    per_method = {}
    for label, method, checkpoint in runs:
        model = methods.build(method, args, checkpoint)
        results = {}
        for name, (root, split, items, report) in data.items():
            store = runner.partial_store(args, label, method, checkpoint, model, name, root, split, items)
            results[name] = runner.evaluate_items(model, name, items, args.eval_batch_size, f"{label} {name}", store)
            results[name].update(root=root, split=split, report=report)
        per_method[label] = dict(method=method, checkpoint=checkpoint, model=getattr(model, "config", {}),
                                 datasets=results)
        del model
    return write_results(args, argv, per_method) if state.is_main_process else None


def write_results(args, argv, per_method):
    """The paper's tables (one row per method), the paired differences against the first method, one summary line
    per data set; OUTPUT (JSON) written, its partial files removed."""
    labels = list(per_method)
    first = per_method[labels[0]]["datasets"]
    shown = {m: tables(r["datasets"]) for m, r in per_method.items()}
    differences, diff_text = runner.show_differences({m: r["datasets"] for m, r in per_method.items()}, labels)
    print()
    for key, (title, column_groups) in shown[labels[0]].items():
        cis = {m: {(g, c): cell_ci(per_method[m]["datasets"], key, g, c) for g, cols in shown[m][key][1]
                   for c, _, _ in cols} for m in labels}
        print(show_table(title + " [95% bootstrap CI]", column_groups, {m: shown[m][key][1] for m in labels}, cis)
              + "\n")
    if len(labels) > 1:
        print(diff_text + "\n")
    for name, res in first.items():
        print(runner.summary_line(name, res, res["report"]))
        for line in res["unreadable_items"]:
            print(f"  unreadable: {line}")
    flat = lambda t: {k: {g: {c: v for c, v, _ in cols} for g, cols in cg} for k, (_, cg) in t.items()}  # noqa
    out = dict(command=["evaluate.py"] + [a for a in argv if a != "--resume"],
               args={k: v for k, v in vars(args).items() if k != "resume"}, model=per_method[labels[0]]["model"],
               datasets=first, tables=flat(shown[labels[0]]),
               methods={m: dict(r, tables=flat(shown[m])) for m, r in per_method.items()}, differences=differences)
    if args.output:
        write_json(args.output, out)
        shutil.rmtree(runner.partial_root(args.output), ignore_errors=True)
        print(f"results written to {args.output}")
    return out


def evaluate_cli(argv):
    args = build_parser().parse_args(argv)
    try:
        with torch.no_grad():
            run(args, argv)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated, under run_cli): one line, the partial files kept
        raise Interrupted(runner.interrupted_line(args, argv, getattr(e, "signum", signal.SIGINT)),
                          getattr(e, "signum", signal.SIGINT)) from None


def main(argv=None):
    """The command line: exit code 0, or 2 after one `error: ...` line for bad input."""
    return run_cli(evaluate_cli, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
