"""Which runs and data sets evaluate.py evaluates: the table rows (method, checkpoint), the data sets found under
the data root (the embedded shapes world when there is none), all loaded before any model is built, and the outputs
checked against every input before any work."""
import os
import sys

from accelerate import PartialState

import methods
from common import InputError, check_writable, name_fits
from datasets import REGISTRY, data_inputs, default_root, find_datasets, has_table_data, load_items, loader_options, \
    split_items
from tools.cli import check_apart
from tools.resume import partial_root


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
        split = None if args.split == "all" else (args.split or REGISTRY[name].split)
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
