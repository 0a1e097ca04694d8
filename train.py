"""Alg. 1 / §5.2: few-shot training of the attention-based prompts (eq. 5) with the margin loss (eq. 6).

    python train.py --dataset comvg --shots 0.05 --data-root DIR

The training score goes through the same `score_items` code path as evaluation; each step draws one noise level of
the ensemble and one eps, shared by a positive and its negatives. Only p^k, p^v and the head-weight logits train.

The split is `datasets.split_items`: whole groups of items that share a sentence-image pair go to training until
`--shots` items are reached, the rest is the held-out test split; data sets that ship a split (RefCOCOg) draw the
shots from their train split and test on `--eval-split`. Defaults per data set: `methods.DEFAULTS`.

Mixed precision, the standard way: the frozen model runs in --precision (fp16 / bf16) under torch.autocast, the
trained tensors (p^k, p^v, head logits; DiffusionITM's LoRA) stay fp32, and fp16 scales the loss with a
torch.amp.GradScaler so that small gradients do not flush to zero (unscaled before clipping; a step whose gradients
overflow is skipped and the scale lowered, as GradScaler does: recorded in the history, not an error). bf16 has
fp32's range and needs no scaler. A step's rows go through the UNet --eval-batch-size at a time, also in backward
(gradient caching, `discffusion.CachedScores`): memory is bounded by that chunk, not by the candidates.

Checkpoints (OUTPUT_DIR/checkpoint.pt: deltas, head logits, optimizer, grad scaler, step, RNG) are written atomically
every `--save-every` steps; `--resume` continues where a run stopped and ends with the same deltas as an uninterrupted
run (the data order and the noise of step s are functions of (seed, s)); the checkpoint is read with
torch.load(weights_only=True), so a crafted file is refused, never run. An option that defines the run (RESUME_FIXED)
must match the checkpoint's; a changed --lr, --weight-decay, --grad-clip, --margin, --negatives, --loss, --steps or
--epochs applies from the resumed step on and is recorded (args.changes). At the end: OUTPUT_DIR/results.json (split
sizes, zero-shot and few-shot metrics) and OUTPUT_DIR/prompt_deltas.safetensors. Ctrl-C or SIGTERM (schedulers,
containers, `timeout`) ends the current step, writes the checkpoint and prints the command that resumes (exit 130 for
Ctrl-C, 143 for SIGTERM); a failed write keeps the last good checkpoint (exit 2). As in evaluation, an item whose
image cannot be read is skipped and counted (results.json: train.unreadable; a warning line when first seen); if no
training item can be read at all, that is an error.

Data-parallel under `accelerate launch --multi_gpu --num_processes N` (add --device cpu for CPU processes):
--batch-size is per process, the global batch batch-size x N x grad-accum, in the data order of one process with that
global batch; the trainable gradients are averaged across processes (accelerate's reduce); only the main process
writes files. `--resume` accepts a checkpoint with the same global batch.
"""
import argparse
import contextlib
import json
import math
import os
import re
import shlex
import signal
import sys
import threading
import time

import torch
from accelerate import PartialState
from accelerate.utils import reduce
from tqdm import tqdm

import methods
import triplet_loss
from baselines.diffusion_itm import hardneg_loss
from common import (MAX_LISTED, SIGNAL_NAMES, ArgumentParser, InputError, Interrupted, atomic_write, check_apart,
                    check_writable, number, positive, positive_int, run_cli, write_json)
from datasets import DEFAULT_SPLIT, ImageCache, add_data_args, data_inputs, load_items, loader_options, split_items
from tools import runner


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", required=True, help="comvg | refcocog | vqav2 | coco (see datasets.py)")
    p.add_argument("--method", default="discffusion", choices=methods.METHODS,
                   help="discffusion: p^k, p^v (eq. 5) + eq. 6; diffusion_itm: HardNeg LoRA; clip_ft / clip_prompt: "
                        "the CLIP baselines of §5.3 with the same margin loss")
    p.add_argument("--data-root", help="the data set's folder (default data/<dataset>)")
    p.add_argument("--annotations", help="annotation file, if not found by name under --data-root")
    p.add_argument("--shots", help="training items: a fraction in (0, 1) like 0.05 (default), or a count like 27")
    p.add_argument("--eval-split", default="val", help="test split for data sets that ship splits (default val)")
    p.add_argument("--eval-dataset", help="test on another data set instead of a held-out split (Table 8: train on "
                                          "coco, test on winoground or vlchecklist)")
    p.add_argument("--eval-data-root", help="the --eval-dataset's folder (default data/<name>)")
    p.add_argument("--epochs", type=positive, default=5, help="passes over the training split (if --steps not given)")
    p.add_argument("--steps", type=positive_int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--compare", help="comma-separated methods evaluated zero-shot on the same test split, one table "
                                     "row each (e.g. diffusion_itm,clip_ft; shapes default: diffusion_itm)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="items per micro-batch")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=number(above=0, high=10), help="AdamW learning rate (default 1e-4; shapes 3e-3)")
    p.add_argument("--weight-decay", type=number(low=0), default=1e-2)
    p.add_argument("--grad-clip", type=number(low=0), default=1.0, help="max gradient norm (0 = off)")
    p.add_argument("--loss", default="margin", choices=triplet_loss.LOSSES, help="eq. 6 or Table 11's alternatives")
    p.add_argument("--margin", type=number(low=0), default=0.1, help="M of eq. 6")
    p.add_argument("--negatives", default="hardest", choices=("hardest", "mean"))
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory in the UNet")
    p.add_argument("--output-dir", help="default runs/<dataset>")
    p.add_argument("--save-every", type=positive_int, default=50, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    p.add_argument("--eval-every", type=number(int, low=0), default=0,
                   help="evaluate the test split every N steps (0 = only at the end)")
    p.add_argument("--eval-limit", type=positive_int, default=None, help="evaluate at most N test items")
    p.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot evaluation before training")
    methods.add_model_args(p)
    add_data_args(p)
    args = p.parse_args(argv)
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
    args.changes = []  # options changed at a --resume (train: RESUME_APPLIED)
    return args


# ---- training --------------------------------------------------------------------------------------------------------
def batch_indices(step, micro, args, n, rank=0, world=1):
    """Items of micro-batch `micro` of step `step`: a per-epoch permutation seeded by (seed, epoch); stateless.
    With `world` processes the micro-batch has batch_size x world items and process `rank` takes its slice, so the
    data order is that of one process with the same global batch."""
    first = (step * args.grad_accum + micro) * args.batch_size * world + rank * args.batch_size
    out = []
    for k in range(first, first + args.batch_size):
        epoch = k // n
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
        out.append(int(perm[k % n]))
    return out


def step_generator(args, step, micro):
    return torch.Generator().manual_seed((args.seed * 1000003 + step) * 101 + micro)


def compute_loss(model, batch, args, generator):
    if args.method == "diffusion_itm":
        return hardneg_loss(model, batch, generator), None
    if args.loss == "diffusion":
        return triplet_loss.diffusion_loss(model, batch, generator), None
    mats = model.score_items(batch, train=True, generator=generator)
    if args.loss == "ce":
        return triplet_loss.ce_loss(mats), mats
    return triplet_loss.margin_loss(mats, args.margin, args.negatives), mats


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


def train(args, model, params, train_items, test_items, log=print, stop=None):
    """The training loop; `stop` (a threading.Event, see sigint_stops) set in any process: end this step, checkpoint,
    Interrupted. Data-parallel under `accelerate launch`: every process scores its slice of each micro-batch with the
    same noise (step_generator), the gradients of the trainable tensors are averaged over the processes (accelerate's
    reduce) before clipping and the optimizer step, so every process holds the same tensors; the main one saves."""
    dist = PartialState()
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
    steps_per_epoch = math.ceil(len(train_items) / (args.batch_size * dist.num_processes * args.grad_accum))
    total = args.steps if args.steps is not None else max(1, math.ceil(args.epochs * steps_per_epoch))
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    device_type, dtype = torch.device(model.device).type, model.dtype      # the frozen model's precision
    autocast = dict(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16 and all(
        p.dtype == torch.float32 for p in params))                          # fp16: loss scaling; bf16, fp32: none
    start, history = 0, []
    if args.resume and os.path.exists(ckpt_path):
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
            if ck.get("scaler"):                                   # {} when no scaler ran (fp32, bf16)
                scaler.load_state_dict(ck["scaler"])
            torch.set_rng_state(ck["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise InputError(f"--resume: {ckpt_path} does not fit this run ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
        for group in opt.param_groups:                             # the command line's, not the restored ones
            group.update(lr=args.lr, weight_decay=args.weight_decay)
        start, history = ck["step"], ck["history"]
        changed = [dict(option=f"--{k.replace('_', '-')}", was=was.get(k), now=getattr(args, k), from_step=start + 1)
                   for k in RESUME_APPLIED if k in was and was[k] != getattr(args, k)]
        args.changes = list(was.get("changes") or []) + changed
        if dist.is_main_process:
            log(f"resumed from {ckpt_path} at step {start}" + "".join(
                f"; {c['option']} {c['was']} -> {c['now']} from step {c['from_step']}" for c in changed))
    images = ImageCache()
    unreadable = {u for h in history for u in h.get("unreadable", [])}   # "item id: error", this process's
    bar = tqdm(range(start, total), initial=start, total=total, desc="train", dynamic_ncols=True,
               disable=not dist.is_main_process)
    t0 = time.time()
    for step in bar:
        opt.zero_grad(set_to_none=True)
        step_loss, hits, seen, used, skipped = 0.0, 0, 0, 0, []
        for micro in range(args.grad_accum):
            batch = [train_items[i] for i in batch_indices(step, micro, args, len(train_items), dist.process_index,
                                                            dist.num_processes)]
            loaded = []
            for it in batch:                              # as in evaluation: an unreadable image skips its item
                try:
                    loaded.append((images.load(it.images), it.texts))
                except Exception as e:  # noqa: BLE001 - corrupt / truncated / not an image: PIL raises many types
                    skipped.append(f"{it.id}: {type(e).__name__}: {e}")
                    if skipped[-1] not in unreadable and dist.is_main_process:
                        print(f"warning: training item {skipped[-1]}; skipped (counted in results.json)",
                              file=sys.stderr)
                    unreadable.add(skipped[-1])
            if len(unreadable) == len(train_items):
                raise InputError(f"no training item can be read: the images of all {len(train_items)} are unreadable "
                                 f"(first: {min(unreadable)})")
            used += len(loaded)
            if loaded:
                with torch.autocast(**autocast):
                    loss, mats = compute_loss(model, loaded, args, step_generator(args, step, micro))
            else:  # the whole micro-batch unreadable: zero gradients, so every process still reduces the same tensors
                loss, mats = sum(p.sum() for p in params) * 0.0, None
            mean_loss = reduce(loss.detach(), "mean")              # over the processes: the global micro-batch's
            if not torch.isfinite(mean_loss):
                good = f"last good checkpoint {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint yet"
                raise FloatingPointError(f"non-finite loss ({mean_loss.item()}) at step {step}; {good}. "
                                         "Try a lower --lr or --precision fp32.")
            scaler.scale(loss / args.grad_accum).backward()        # fp16: times the scale (no underflow)
            step_loss += mean_loss.item() / args.grad_accum
            if mats is not None:
                hits += sum(triplet_loss.correct(S.detach()) for S in mats)
                seen += len(mats)
        hits, seen, used = map(int, reduce(torch.tensor([hits, seen, used]), "sum"))
        grads = [p for p in params if p.grad is not None]          # the same tensors in every process
        for p, g in zip(grads, reduce([p.grad for p in grads], "mean")):
            p.grad = g
        scaler.unscale_(opt)                                       # the true gradients, before clipping
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        scale = scaler.get_scale()
        scaler.step(opt)                                           # fp16: skipped if a gradient is inf / nan
        scaler.update()
        history.append({"step": step + 1, "loss": step_loss, "train_acc": hits / seen if seen else None, "items": used}
                       | ({"unreadable": sorted(set(skipped))} if skipped else {}))
        if scaler.is_enabled():
            history[-1].update(loss_scale=scale, skipped=scaler.get_scale() < scale)   # an overflow lowers it
        rate = (step + 1 - start) * args.batch_size * dist.num_processes * args.grad_accum / max(time.time() - t0,
                                                                                                 1e-9)
        bar.set_postfix(loss=f"{step_loss:.4f}", items_per_s=f"{rate:.2f}")
        done = step + 1
        stopping = stop is not None and bool(reduce(torch.tensor(float(stop.is_set())), "sum") > 0) and done < total
        if (done % args.save_every == 0 or done == total or stopping) and dist.is_main_process:
            state = {"step": done, "params": [p.detach().cpu() for p in params], "optimizer": opt.state_dict(),
                     "scaler": scaler.state_dict(), "rng": torch.get_rng_state(), "history": history,
                     "args": vars(args)}
            atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))
        if stopping:
            bar.close()
            raise Interrupted(f"interrupted at step {done} of {total} (checkpoint {ckpt_path})", stop.signum)
        if args.eval_every and done % args.eval_every == 0 and done != total:
            res = runner.evaluate_items(model, args.eval_dataset or args.dataset, test_items, args.eval_batch_size,
                                          desc=f"eval@{done}")
            if dist.is_main_process:
                log(f"step {done}: " + json.dumps(res["metrics"]))
    return history


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; schedulers, containers and `timeout`


@contextlib.contextmanager
def sigint_stops():
    """Within: the first Ctrl-C (SIGINT) or SIGTERM sets the yielded Event and its `signum` (the loop ends its step,
    checkpoints and stops); a second one acts at once (the previous handlers are back: KeyboardInterrupt, or under
    run_cli Terminated for SIGTERM). The previous handlers are back afterwards. Off the main thread, where no handler
    can be set, the Event is never set."""
    stop = threading.Event()
    stop.signum = signal.SIGINT
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        stop.signum = signum
        stop.set()
        for s, h in previous.items():
            signal.signal(s, h)
        again = "press again" if signum == signal.SIGINT else "send it again"
        print(f"\n{SIGNAL_NAMES[signum]}: stopping after this step ({again} to abort at once)", file=sys.stderr)
    previous = {}
    for s in STOP_SIGNALS:
        previous[s] = signal.signal(s, handler) or signal.SIG_DFL
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def resume_command(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", "train.py", *argv] + ([] if "--resume" in argv else ["--resume"]))


def build(args):
    model = methods.build(args.method, args)
    params = model.add_trainable()
    if args.gradient_checkpointing:
        if not hasattr(model, "unet"):
            raise InputError(f"--gradient-checkpointing applies to the diffusion methods, not {args.method}")
        model.unet.enable_gradient_checkpointing()
    return model, params


def trained_file(args):
    name = "prompt_deltas" if args.method == "discffusion" else f"trained_{args.method}"
    return os.path.join(args.output_dir, f"{name}.safetensors")


def main(argv=None):
    args = parse_args(argv)
    state = runner.processes(args.device)   # one process, or one of `accelerate launch`'s (data-parallel: train())
    args.processes, main_process = state.num_processes, state.is_main_process
    torch.manual_seed(args.seed)
    check_writable(args.output_dir, folder=True)  # before any data, model or step
    outputs = [(os.path.join(args.output_dir, f), "file") for f in ("checkpoint.pt", "results.json")]
    outputs.append((trained_file(args), "file"))
    check_apart(outputs, methods.model_folders(args) + [(args.annotations, "annotations", "file")])
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
    check_apart(outputs, inputs)                                   # nor a file the data sets read
    if args.eval_limit:
        test_items = test_items[:args.eval_limit]
    if main_process:
        print(f"{args.dataset}: {len(train_items)} training items; {name}: {len(test_items)} test items "
              f"(split by seed {args.seed}, no shared sentence-image pair)")
    model, params = build(args)
    results = {"dataset": args.dataset, "eval_dataset": name, "model": model.config, "args": vars(args), "data_report": report,
               "split": {"train": len(train_items), "test": len(test_items), "seed": args.seed, "shots": args.shots}}
    if not args.no_zero_shot:
        with torch.no_grad():
            results["zero_shot"] = runner.evaluate_items(model, name, test_items, args.eval_batch_size,
                                                           desc="zero-shot")
    t = time.time()
    try:
        with sigint_stops() as stop:
            history = train(args, model, params, train_items, test_items, stop=stop)
    except Interrupted as e:
        raise Interrupted(f"{e}; resume with: {resume_command(argv)}", e.signum) from None
    unreadable = sorted({u for h in history for u in h.get("unreadable", [])})
    results["train"] = {"steps": len(history), "seconds": round(time.time() - t, 1),
                        "final_loss": history[-1]["loss"] if history else None,
                        "unreadable": len(unreadable), "unreadable_items": unreadable[:MAX_LISTED], "history": history}
    if unreadable and main_process:
        print(f"training: {len(unreadable)} items with unreadable images skipped (listed in results.json)")
    if main_process:
        model.save_trained(trained_file(args), vars(args))
    results["few_shot"] = runner.evaluate_items(model, name, test_items, args.eval_batch_size, desc="few-shot")
    del model
    results["compare"] = {}
    for method in [m for m in args.compare.split(",") if m]:
        other = methods.build(method, args)
        with torch.no_grad():
            results["compare"][method] = runner.evaluate_items(other, name, test_items, args.eval_batch_size,
                                                                 desc=f"{method} zero-shot")
        del other
    if not main_process:
        return results
    write_json(os.path.join(args.output_dir, "results.json"), results)
    runs = {f"{args.method} {k.replace('_', '-')}": results[k] for k in ("zero_shot", "few_shot") if k in results}
    runs.update({f"{m} zero-shot": r for m, r in results["compare"].items()})
    print(runner.format_table(name, {k: r["metrics"] for k, r in runs.items()},
                                {k: r["ci"] for k, r in runs.items()}))
    print(f"wrote {args.output_dir}/results.json and {trained_file(args)}")
    return results


if __name__ == "__main__":
    try:
        sys.exit(run_cli(main))
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
