"""Which runs and data sets evaluate.py evaluates: the table rows (method, checkpoint), the data sets found under
the data root (the embedded shapes world when there is none), all loaded before any model is built, and the outputs
checked against every input before any work."""
import os
import sys

from accelerate import PartialState

import methods
from common import InputError, check_writable, name_fits
from benchmarks.embedded import write as write_embedded
from datasets import SUITES, REGISTRY, DataMissing, data_inputs, default_root, find_datasets, has_table_data, \
    load_items, loader_options, split_items
from tools.cli import check_apart
from tools.resume import check_owner, partial_root


SHAPES_RUN = os.path.join("runs", "shapes")  # train.py --dataset shapes writes its deltas here


def default_runs(args, names):
    """[(row label, method, checkpoint)]: --methods (with --checkpoint), or for the shapes world the rows of
    train.py's table in its order: Discffusion zero-shot, few-shot (when train.py's deltas are there), DiffusionITM."""
    if args.methods:
        return [(m, m, checkpoint_for(args, m)) for m in args.methods]
    if getattr(args, "suite", None):  # the three rows of every task; no CLIP offline in the embedded world
        rows = ("discffusion", "diffusion_itm") + (() if embedded(args) else ("clip",))
        return [(m, m, checkpoint_for(args, m)) for m in rows]
    if list(names) != ["shapes"]:
        return [("discffusion", "discffusion", checkpoint_for(args, "discffusion"))]
    deltas = checkpoint_for(args, "discffusion") or os.path.join(SHAPES_RUN, "prompt_deltas.safetensors")
    few_shot = [("discffusion few-shot", "discffusion", deltas)] if os.path.exists(deltas) else []
    return [("discffusion zero-shot", "discffusion", None)] + few_shot + [("diffusion_itm zero-shot", "diffusion_itm",
                                                                            None)]


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


def embedded(args):
    return getattr(args, "defaults", None) == "embedded"


def suite_roots(args):
    """[(data set, its folder)] of --suite: each of its data sets with a non-empty folder under --data-root (default
    data/); none and no --data-root: the embedded shapes world's instance of each (benchmarks/embedded.py, written on
    first use to data/embedded_<suite>/<name>/), scored with the tiny model (methods.DEFAULTS["embedded"])."""
    names, data = SUITES[args.suite], args.data_root or "data"
    found = [(n, default_root(n, data)) for n in names]
    found = [(n, r) for n, r in found if os.path.isdir(r) and os.listdir(r)]
    if found:
        return found
    if args.data_root:
        raise DataMissing(f"no data set of the {args.suite} suite under {data}: looked for "
                          f"{', '.join(os.path.join(data, n) for n in names)} (docs/gdbench.md says how to get each)")
    args.defaults = "embedded"
    out = [(n, os.path.join(data, f"embedded_{args.suite}", n)) for n in names if REGISTRY[n].embedded]
    print(f"no {args.suite} data set under data/: evaluating the embedded shapes world's instance of "
          f"{', '.join(n for n, _ in out)} on the tiny model (docs/gdbench.md says how to get the real data)")
    return out


def dataset_roots(args):
    """[(data set, its folder)]: --dataset with --data-root as its folder, --suite (`suite_roots`), or every data set
    under --data-root."""
    if args.annotations and not args.dataset:
        raise InputError("--annotations needs --dataset (it names one data set's annotation file)")
    if getattr(args, "suite", None):
        if args.dataset:
            raise InputError("--suite and --dataset: give one (--dataset runs one data set)")
        return suite_roots(args)
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
    out, args.skipped = {}, {}
    for name, root in roots:
        split = None if args.split == "all" else (args.split or REGISTRY[name].split)
        options = loader_options(args, name)
        if embedded(args):                                      # written on first use, read by the same loader
            options = {**write_embedded(REGISTRY[name].embedded, root), **options}  # seed 0: the data
        try:
            items, report = load_items(name, root, args.annotations, seed=args.seed, split=split, **options)
        except InputError as e:
            shared = os.path.basename(os.path.normpath(root)).lower().replace("-", "").replace("_", "") != \
                name.replace("_", "")                            # e.g. flickr30k_order found in data/flickr30k/
            if not (getattr(args, "suite", None) or (shared and not args.dataset)):
                raise
            args.skipped[name] = str(e)        # a suite, or a folder another set shares, goes on without it
            print(f"skipped {name}: {e}", file=sys.stderr)
            continue
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
    if not out:
        raise InputError("no data set could be loaded: "
                         + "; ".join(f"{n}: {e}" for n, e in args.skipped.items()))
    return out


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
    check_owner(args.output)                                       # results.txt may not touch results.json's scores
    inputs = methods.model_folders(args) + [(c, "checkpoint", "file") for _, _, c in runs if c]
    check_apart([(args.output, "file"), (items, "folder")], inputs + [(args.annotations, "annotations", "file")])
