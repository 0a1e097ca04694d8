"""Alg. 1 / §5.2: few-shot training of the attention-based prompts (eq. 5) with the margin loss (eq. 6).

    python train.py --dataset comvg --shots 0.05 --data-root DIR

Read top to bottom: options, data and the few-shot split (`datasets.split_items`: whole groups of items that share a
sentence-image pair go to training until --shots items are reached, the rest is the test split), the model, then the
loop of Alg. 1: score the batch's candidates through the same `score_items` path as evaluation (one noise level and
one eps per micro-batch, shared by a positive and its negatives), margin loss, backward, step; then save and evaluate.
Only p^k, p^v and the head-weight logits train, in fp32 under autocast (fp16: torch.amp.GradScaler). Defaults per data
set: `methods.DEFAULTS`. Checkpoints, --resume, signals and multi-process runs are in tools/ (training.py, resume.py,
processes.py; docs/reliability.md, docs/scaleout.md).
"""
import argparse
import json
import sys
import time

import torch
from accelerate import PartialState
from tqdm import tqdm

import methods
import triplet_loss
from baselines.diffusion_itm import hardneg_loss
from common import InputError
from datasets import REGISTRY, ImageCache, add_data_args
from evaluate import evaluate_items, pair_chunks
from tools import cli, processes, resume, training
from tools.cli import ArgumentParser, Interrupted, number, positive, positive_int, run_cli


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", required=True, help=f"one of {', '.join(REGISTRY)} (datasets.REGISTRY)")
    p.add_argument("--method", default="discffusion", choices=[m for m in methods.METHODS if m != "clip"],
                   help="discffusion: p^k, p^v (eq. 5) + eq. 6; diffusion_itm: HardNeg LoRA; clip_ft / clip_prompt: "
                        "the CLIP baselines of §5.3 with the same margin loss")
    p.add_argument("--data-root", help="the data set's folder (default data/<dataset>)")
    p.add_argument("--annotations", help="annotation file, if not found by name under --data-root")
    p.add_argument("--shots", help="training items: a fraction in (0, 1) like 0.05 (default), or a count like 27")
    p.add_argument("--epochs", type=positive, default=5, help="passes over the training split (if --steps not given)")
    p.add_argument("--steps", type=positive_int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="items per micro-batch")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=number(above=0, high=10), help="AdamW learning rate (default 1e-4; shapes 3e-3)")
    p.add_argument("--weight-decay", type=number(low=0), default=1e-2)
    p.add_argument("--grad-clip", type=number(low=0), default=1.0, help="max gradient norm (0 = off)")
    p.add_argument("--loss", default="margin", choices=triplet_loss.LOSSES, help="eq. 6 or Table 11's alternatives")
    p.add_argument("--margin", type=number(low=0), default=0.1, help="M of eq. 6")
    p.add_argument("--negatives", default="hardest", choices=("hardest", "mean"))
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory in the UNet")
    w = p.add_argument_group("level weights (one per noise level / DiffusionITM timestep, softmax, uniform at 0)")
    w.add_argument("--level-weights", action="store_true",
                   help="discffusion: train them with the deltas (each step weighs its drawn level by n_levels x "
                        "its weight, so the steps average to the weighted ensemble)")
    w.add_argument("--fit-level-weights", action="store_true",
                   help="fit them alone, in seconds, on the frozen per-level scores of the training split (one pass: "
                        "levels x draws rows per pair), instead of the training loop; --checkpoint: on trained "
                        "deltas / LoRA")
    w.add_argument("--checkpoint", help="with --fit-level-weights: the trained file whose frozen tensors are scored "
                                        "(default none: the pretrained model)")
    w.add_argument("--fit-steps", type=positive_int, default=300, help="full-batch AdamW steps of the fit (lr 0.05)")
    training.add_run_args(p)                    # --output-dir, --resume, --save-every, --eval-*, --compare
    methods.add_model_args(p)                 # --model, --precision, --seed, the scorer's options
    add_data_args(p)
    return training.finish_args(p, p.parse_args(argv))


def batch_indices(step, micro, args, n, rank=0, world=1):
    """Items of micro-batch `micro` of step `step`, stateless: the k-th item drawn in the whole run is item k % n of
    epoch k // n's permutation, seeded by (seed, epoch). With `world` processes the micro-batch has batch_size x world
    items and process `rank` takes its slice, so the data order is that of one process with the same global batch."""
    first = (step * args.grad_accum + micro) * args.batch_size * world + rank * args.batch_size  # k of its first item
    out = []
    for k in range(first, first + args.batch_size):
        epoch = k // n
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
        out.append(int(perm[k % n]))
    return out


def step_generator(args, step, micro):
    """The noise level and eps of a micro-batch: a function of (seed, step, micro) alone, so --resume repeats them."""
    return torch.Generator().manual_seed((args.seed * 1000003 + step) * 101 + micro)


def compute_loss(model, batch, args, generator):
    """(loss, score matrices or None) of one micro-batch [(images, texts)]: eq. 6 on the items' score matrices (or
    Table 11's cross-entropy), Table 11's diffusion loss, or DiffusionITM's HardNeg loss."""
    if args.method == "diffusion_itm":
        return hardneg_loss(model, batch, generator), None
    if args.loss == "diffusion":
        return triplet_loss.diffusion_loss(model, batch, generator), None
    mats = model.score_items(batch, train=True, generator=generator)   # Alg. 1 l.10-15: [(n_img, n_txt)]
    if args.loss == "ce":
        return triplet_loss.ce_loss(mats), mats
    return triplet_loss.margin_loss(mats, args.margin, args.negatives), mats          # Alg. 1 l.16, eq. 6


def train(args, model, params, train_items, test_items, log=print, stop=None):
    """Alg. 1's loop; `stop` (cli.stops) set in any process: end this step, checkpoint, Interrupted."""
    dist = PartialState()
    total = training.total_steps(args, len(train_items))
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    autocast, scaler = training.mixed_precision(model, params)
    start, history = resume.restore(args, params, opt, scaler, log)   # --resume, else (0, [])
    images, unreadable = ImageCache(prepare=model.prepare_image), {u for h in history for u in h.get("unreadable", [])}
    bar = tqdm(range(start, total), initial=start, total=total, desc="train", dynamic_ncols=True,
               disable=not dist.is_main_process)
    t0 = time.time()
    for step in bar:
        opt.zero_grad(set_to_none=True)
        step_loss, hits, seen, used, skipped = 0.0, 0, 0, 0, []
        for micro in range(args.grad_accum):
            batch = [train_items[i] for i in batch_indices(step, micro, args, len(train_items), dist.process_index,
                                                            dist.num_processes)]               # Alg. 1 l.9
            loaded, bad = training.load_batch(images, batch, unreadable, len(train_items))
            used, skipped = used + len(loaded), skipped + bad
            if loaded:
                with torch.autocast(**autocast):                   # the frozen model's precision; Alg. 1 l.10-16
                    loss, mats = compute_loss(model, loaded, args, step_generator(args, step, micro))
            else:  # the whole micro-batch unreadable: zero gradients, so every process still reduces the same tensors
                loss, mats = sum(p.sum() for p in params) * 0.0, None
            step_loss += training.checked_loss(loss, step, args) / args.grad_accum
            scaler.scale(loss / args.grad_accum).backward()        # fp16: times the scale (no underflow)
            if mats is not None:
                hits += sum(triplet_loss.correct(S.detach()) for S in mats)
                seen += len(mats)
        processes.average_gradients(params)                        # over the processes
        scaler.unscale_(opt)                                       # the true gradients, before clipping
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        scale = scaler.get_scale()
        scaler.step(opt)                                           # Alg. 1 l.17; fp16: skipped if a grad is inf/nan
        scaler.update()
        history.append(training.step_record(step, step_loss, hits, seen, used, skipped, scaler, scale))
        done = step + 1
        rate = (done - start) * args.batch_size * dist.num_processes * args.grad_accum / max(time.time() - t0, 1e-9)
        bar.set_postfix(loss=f"{step_loss:.4f}", items_per_s=f"{rate:.2f}")
        stopping = cli.stop_requested(stop, done, total)
        if done % args.save_every == 0 or done == total or stopping:
            resume.save_state(args, done, params, opt, scaler, history)
        if stopping:
            bar.close()
            raise Interrupted(f"interrupted at step {done} of {total} (checkpoint {args.output_dir}/checkpoint.pt)",
                              stop.signum)
        if args.eval_every and done % args.eval_every == 0 and done != total:
            res = evaluate_items(model, args.eval_dataset or args.dataset, test_items, args.pairs_per_call,
                                 desc=f"eval@{done}")
            if dist.is_main_process:
                log(f"step {done}: " + json.dumps(res["metrics"]))
    return history


def unit_scores(model, items, pairs_per_call):
    """Every unit's score of `items` once (`score_items(per_unit=True)`) -> [(levels x draws, n_img, n_txt)], for the
    items whose images open."""
    cache, out = ImageCache(prepare=model.prepare_image), []
    for group in tqdm(list(pair_chunks(items, pairs_per_call)), desc="per-unit scores", dynamic_ncols=True,
                      disable=not PartialState().is_main_process):
        loaded, _ = training.load_batch(cache, group, set(), len(items))
        out += model.score_items(loaded, per_unit=True)
    return out


def frozen_level_scores(model, items, pairs_per_call):
    """`unit_scores` averaged over the draws -> [(n_levels, n_img, n_txt)], frozen."""
    n = len(model.levels if hasattr(model, "levels") else model.timesteps)
    return [f.view(-1, n, *f.shape[1:]).mean(0) for f in unit_scores(model, items, pairs_per_call)]


def fit_weights(logits, frozen, steps=300, weight_decay=1e-2):
    """Fit level-weight logits (n_levels,) in place on frozen per-level scores [(n_levels, n_img, n_txt)]: full-batch
    AdamW on the cross-entropy over each item's candidates with a learned scale (set at first so that the scores' gaps
    within items are about 1). eq. 6's hinge with a margin above the scores' gaps is linear in the weights and only
    picks the single best level of the training items. -> (loss, training accuracy) before and after."""
    frozen = [f.to(logits.device) for f in frozen]
    gaps = torch.cat([(S - S.flatten()[0]).flatten()[1:] for S in (f.mean(0) for f in frozen)])
    log_scale = (-gaps.std().clamp_min(1e-8).log()).reshape(1).requires_grad_()   # unit gaps at the start

    def scored():
        pi = logits.softmax(0)[:, None, None]
        return [(pi * f).sum(0) for f in frozen]                             # eq. 4 with the level weights

    def measure():
        mats = scored()
        return dict(loss=triplet_loss.ce_loss([m * log_scale.exp() for m in mats]).item(),
                    train_acc=sum(map(triplet_loss.correct, mats)) / len(mats))
    opt = torch.optim.AdamW([logits, log_scale], lr=0.05, weight_decay=weight_decay)
    with torch.no_grad():
        before = measure()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        triplet_loss.ce_loss([m * log_scale.exp() for m in scored()]).backward()
        opt.step()
    with torch.no_grad():
        return before, measure()


def fit_level_weights(model, items, args, log=print):
    """--fit-level-weights: the level weights alone on the frozen per-level scores of the training items
    (`frozen_level_scores`, `fit_weights`) -> the fit's record."""
    frozen = frozen_level_scores(model, items, args.pairs_per_call)
    logits = model.add_level_weights()                                      # (n_levels,) zero: uniform
    before, after = fit_weights(logits, frozen, args.fit_steps, args.weight_decay)
    weights = logits.detach().softmax(0).tolist()
    log(f"level weights fit on {len(frozen)} items: {', '.join(f'{w:.3f}' for w in weights)}; loss "
        f"{before['loss']:.4f} -> {after['loss']:.4f}, training accuracy {before['train_acc']:.2f} -> "
        f"{after['train_acc']:.2f}")
    return dict(uniform=before, fitted=after, weights=weights, items=len(frozen))


def build(args):
    """The method's model and its trained tensors (zero-initialised p^k, p^v and head logits for Discffusion; with
    --level-weights the level-weight logits too); --fit-level-weights: the model with --checkpoint's frozen tensors,
    nothing to train but the level weights (`fit_level_weights`)."""
    if args.fit_level_weights:
        if args.method not in ("discffusion", "diffusion_itm"):
            raise InputError(f"--fit-level-weights: {args.method} has no noise levels")
        return methods.build(args.method, args, args.checkpoint), []
    model = methods.build(args.method, args)
    params = model.add_trainable()
    if args.level_weights:
        if args.method != "discffusion":
            raise InputError(f"--level-weights trains with Discffusion's deltas; for {args.method} fit them alone "
                             "(--fit-level-weights)")
        params = params + [model.add_level_weights()]
    if args.gradient_checkpointing:
        if not hasattr(model, "unet"):
            raise InputError(f"--gradient-checkpointing applies to the diffusion methods, not {args.method}")
        model.unet.enable_gradient_checkpointing()
    return model, params


def main(argv=None):
    args = parse_args(argv)
    with cli.held(args.output_dir, "--output-dir"):                    # a second live run on it is refused
        return run(args, argv)


def run(args, argv):
    """Alg. 1 end to end: the data, zero-shot scores, training, few-shot scores, the trained file and results.json."""
    args.processes = processes.processes(args.device).num_processes   # one, or `accelerate launch`'s N
    args.threads = cli.use_threads(args.threads)                       # recorded in results.json's args
    torch.manual_seed(args.seed)
    train_items, test_items, name, report = training.train_data(args)
    model, params = build(args)
    results = {"dataset": args.dataset, "eval_dataset": name, "model": model.config, "args": vars(args),
               "data_report": report, "split": {"train": len(train_items), "test": len(test_items), "seed": args.seed,
                                                "shots": args.shots}}
    if not args.no_zero_shot:
        with torch.no_grad():
            results["zero_shot"] = evaluate_items(model, name, test_items, args.pairs_per_call,
                                                         desc="zero-shot")
    t = time.time()
    if args.fit_level_weights:                                        # the frozen per-level scores, seconds
        results["level_fit"], history = fit_level_weights(model, train_items, args), []
    else:
        # Ctrl-C / SIGTERM: end the step, checkpoint, the command that resumes; the capture held through every
        # backward (gradient checkpointing re-runs its processors there)
        with cli.stops(argv) as stop, model.capture:
            history = train(args, model, params, train_items, test_items, stop=stop)
    training.save_training(model, results, history, time.time() - t, args)   # the trained tensors, the history
    results["few_shot"] = evaluate_items(model, name, test_items, args.pairs_per_call, desc="few-shot")
    del model
    return training.finish_training(args, results, name, test_items)         # --compare rows, results.json, table


if __name__ == "__main__":
    try:
        sys.exit(run_cli(main))
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
