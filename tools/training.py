"""What train.py needs around Algorithm 1 and is not the algorithm: its options resolved, the data and the few-shot
split loaded with the outputs checked, mixed precision, a micro-batch's images, a step's record, and the end of a
run (the trained tensors saved, the --compare rows, results.json and the table)."""
import math
import os
import sys

import torch
from accelerate import PartialState
from accelerate.utils import reduce

import methods
from common import MAX_LISTED, InputError, check_writable
from datasets import REGISTRY, data_inputs, load_items, loader_options, lookup, split_items
from evaluate import evaluate_items
from tools.cli import check_apart, number, positive_int, write_json
from tools.tables import format_table


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
    if args.checkpoint and not args.fit_level_weights:
        p.error("--checkpoint: only with --fit-level-weights (the frozen tensors whose level weights are fit)")
    if args.fit_level_weights and args.level_weights:
        p.error("--level-weights trains them with the deltas, --fit-level-weights alone: choose one")
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
    for name in (args.dataset, args.eval_dataset):
        if name and lookup(name).bias:                             # no true candidate: nothing to learn or judge
            raise InputError(f"{name} is a bias set (an effect size, no right answer): train and test on a "
                             "matching data set, and evaluate the bias with evaluate.py --dataset " + name)
    check_writable(args.output_dir, folder=True)                   # before any data, model or step
    check_apart(train_outputs(args), methods.model_folders(args) + [(args.annotations, "annotations", "file"),
                                                                    (args.checkpoint, "--checkpoint", "file")])
    state = PartialState()
    with state.main_process_first():                               # the shapes world is written on first use
        items, report = load_items(args.dataset, args.data_root, args.annotations, seed=args.seed,
                                   **loader_options(args, args.dataset))
    train_items, test_items = split_items(items, args.shots, args.seed, args.eval_split, not args.eval_dataset)
    name = args.eval_dataset or args.dataset                      # the data set the test split (and metrics) come from
    inputs = data_inputs(items, report)
    if args.eval_dataset:                                          # zero-shot transfer (Table 8): train on one, test on another
        test_items, test_report = load_items(name, args.eval_data_root, seed=args.seed, split=REGISTRY[name].split,
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
            results["compare"][method] = evaluate_items(other, name, test_items, args.pairs_per_call,
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
