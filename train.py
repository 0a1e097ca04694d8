"""Alg. 1 / §5.2: few-shot training of the attention-based prompts (eq. 5) with the margin loss (eq. 6).

    python train.py --dataset comvg --shots 0.05 --data-root DIR

The training score goes through the same `score_items` code path as evaluation; each step draws one noise level of
the ensemble and one eps, shared by a positive and its negatives. Only p^k, p^v and the head-weight logits train.

The split (see `split_items`): items that share any (text, image) pair are joined into one group, the groups are
shuffled with `--seed`, and whole groups go to training until `--shots` items are reached; every other group is the
held-out test split, so no test item shares a sentence-image pair with a training item. Data sets that ship a split
(RefCOCOg) draw the shots from their train split and test on `--eval-split`.

Checkpoints (OUTPUT_DIR/checkpoint.pt: deltas, head logits, optimizer, step, RNG) are written atomically every
`--save-every` steps; `--resume` continues where a run stopped and ends with the same deltas as an uninterrupted run
(the data order and the noise of step s are functions of (seed, s)). At the end: OUTPUT_DIR/results.json (split
sizes, zero-shot and few-shot metrics) and OUTPUT_DIR/prompt_deltas.safetensors.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import evaluate
import triplet_loss
from datasets import InputError


GENERIC_DEFAULTS = dict(shots="0.05", lr=1e-4, compare="", lam=1.0, pooling="lse", itm_timesteps=10)
# the embedded default (shapes.py + models/tiny-shapes-sd): 60 training items, 300 steps, a larger learning rate for
# the tiny model, a sharper LogSumExp (attention probabilities lie in [0, 1], so at lambda 1 eq. 3 is within a constant
# of mean pooling over the image tokens; lambda 100 is close to max pooling: see README), and DiffusionITM beside it,
# with 50 timesteps (nearer the DiffusionITM paper's 100-200 samples; cheap on the tiny model)
DATASET_DEFAULTS = {"shapes": dict(shots="60", steps=300, lr=3e-3, lam=100.0, itm_timesteps=50,
                                   compare="diffusion_itm")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", required=True, help="comvg | refcocog | vqav2 | coco (see datasets.py)")
    p.add_argument("--method", default="discffusion", choices=evaluate.METHODS,
                   help="discffusion: p^k, p^v (eq. 5) + eq. 6; diffusion_itm: HardNeg LoRA; clip_ft / clip_prompt: "
                        "the CLIP baselines of §5.3 with the same margin loss")
    p.add_argument("--data-root", help="the data set's folder (default data/<dataset>)")
    p.add_argument("--annotations", help="annotation file, if not found by name under --data-root")
    p.add_argument("--model", help="hub id or local diffusers folder (default SD 2.1-base; shapes: the committed "
                                   "models/tiny-shapes-sd)")
    p.add_argument("--shots", help="training items: a fraction in (0, 1) like 0.05 (default), or a count like 27")
    p.add_argument("--eval-split", default="val", help="test split for data sets that ship splits (default val)")
    p.add_argument("--eval-dataset", help="test on another data set instead of a held-out split (Table 8: train on "
                                          "coco, test on winoground or vlchecklist)")
    p.add_argument("--eval-data-root", help="the --eval-dataset's folder (default data/<name>)")
    p.add_argument("--epochs", type=float, default=5, help="passes over the training split (if --steps not given)")
    p.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--compare", help="comma-separated methods evaluated zero-shot on the same test split, one table "
                                     "row each (e.g. diffusion_itm,clip_ft; shapes default: diffusion_itm)")
    p.add_argument("--batch-size", type=int, default=4, help="items per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--eval-batch-size", type=int, default=16, help="items per scoring call when evaluating, and rows "
                                                                   "per UNet call (scores do not depend on it)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-4; shapes 3e-3)")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    p.add_argument("--loss", default="margin", choices=triplet_loss.LOSSES, help="eq. 6 or Table 11's alternatives")
    p.add_argument("--margin", type=float, default=0.1, help="M of eq. 6")
    p.add_argument("--negatives", default="hardest", choices=("hardest", "mean"))
    p.add_argument("--precision", default=None, choices=("fp32", "fp16", "bf16"),
                   help="weights and activations (default fp16 on CUDA, fp32 on CPU); deltas stay fp32")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory in the UNet")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0, help="split, data order, noise")
    p.add_argument("--output-dir", help="default runs/<dataset>")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate the test split every N steps (0 = only at the end)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate at most N test items")
    p.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot evaluation before training")
    evaluate.add_scorer_args(p)
    args = p.parse_args(argv)
    for key, value in {**GENERIC_DEFAULTS, **DATASET_DEFAULTS.get(args.dataset, {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    bad = [m for m in args.compare.split(",") if m and m not in evaluate.METHODS]
    if bad:
        p.error(f"--compare: unknown method(s) {bad}; choose from {','.join(evaluate.METHODS)}")
    args.model = args.model or evaluate.default_model(args.dataset)
    args.output_dir = args.output_dir or os.path.join("runs", args.dataset)
    args.dtype = args.precision
    return args


# ---- the few-shot split --------------------------------------------------------------------------------------------
def parse_shots(value, n):
    """--shots as a fraction ("0.05") or a count ("27") of n available items -> a count in [1, n - 1]."""
    try:
        x = float(value)
    except ValueError:
        raise InputError(f"--shots {value!r}: expected a fraction like 0.05 or a count like 27") from None
    if x <= 0:
        raise InputError(f"--shots {value}: must be positive")
    if "." in str(value) or "e" in str(value).lower():
        if x >= 1:
            raise InputError(f"--shots {value}: a fraction must be below 1 (use a whole number for a count)")
        count = max(1, round(x * n))
    else:
        count = int(x)
    if count >= n:
        raise InputError(f"--shots {value}: asks for {count} training items but the data set has {n} "
                         "(at least one must stay for testing)")
    return count


def groups_of(items):
    """Union-find over items that share a (text, image) pair -> list of lists of item indices, in first-seen order."""
    parent = list(range(len(items)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    owner = {}
    for i, it in enumerate(items):
        for pair in ((t, str(im)) for t in it.texts[:1] for im in it.images) if len(it.texts) == 1 else \
                ((t, str(im)) for t in it.texts for im in it.images[:1]):
            j = owner.setdefault(pair, i)
            parent[find(i)] = find(j)
    groups = {}
    for i in range(len(items)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def split_items(items, shots, seed, eval_split="val", holdout=True):
    """(train, test) item lists; see the module docstring. Deterministic in `seed`.

    Items that carry the publisher's split train on 'train' and test on `eval_split`; without a 'train' split the
    items are split by shots. holdout=False: every item not drawn for training is left out (test = [])."""
    pool = [it for it in items if it.split == "train"]
    test = [it for it in items if it.split == eval_split] if pool else None
    if not pool:
        pool = items
    elif holdout and not test:
        raise InputError(f"the data set ships splits {sorted({it.split for it in items})}: no items in "
                         f"--eval-split {eval_split!r}")
    n = parse_shots(shots, len(pool) + (0 if test is None and holdout else 1))
    groups = groups_of(pool)
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    train_idx, rest = [], []
    for g in order:
        (train_idx if len(train_idx) < n else rest).extend(groups[g])
    train = [pool[i] for i in sorted(train_idx)]
    if not holdout:
        return train, []
    if test is None:
        test = [pool[i] for i in sorted(rest)]
        if not test:
            raise InputError(f"--shots {shots}: no test items left after drawing the training split")
    return train, test


# ---- training --------------------------------------------------------------------------------------------------------
def batch_indices(step, micro, args, n):
    """Items of micro-batch `micro` of step `step`: a per-epoch permutation seeded by (seed, epoch); stateless."""
    first = (step * args.grad_accum + micro) * args.batch_size
    out = []
    for k in range(first, first + args.batch_size):
        epoch = k // n
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
        out.append(int(perm[k % n]))
    return out


def step_generator(args, step, micro):
    return torch.Generator().manual_seed((args.seed * 1000003 + step) * 101 + micro)


def atomic_save(obj, path):
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def compute_loss(model, batch, args, generator):
    if args.method == "diffusion_itm":
        from diffusion_itm import hardneg_loss
        return hardneg_loss(model, batch, generator), None
    if args.loss == "diffusion":
        return triplet_loss.diffusion_loss(model, batch, generator), None
    mats = model.score_items(batch, train=True, generator=generator)
    if args.loss == "ce":
        return triplet_loss.ce_loss(mats), mats
    return triplet_loss.margin_loss(mats, args.margin, args.negatives), mats


def train(args, model, params, train_items, test_items, log=print):
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
    steps_per_epoch = math.ceil(len(train_items) / (args.batch_size * args.grad_accum))
    total = args.steps if args.steps is not None else max(1, math.ceil(args.epochs * steps_per_epoch))
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    start, history = 0, []
    if args.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        for key in ("method", "dataset", "shots", "seed", "batch_size", "grad_accum", "lam", "pooling"):
            if ck["args"].get(key) != getattr(args, key):
                raise InputError(f"--resume: {ckpt_path} was written with --{key.replace('_', '-')} "
                                 f"{ck['args'].get(key)}, this run has {getattr(args, key)}")
        with torch.no_grad():
            for p, saved in zip(params, ck["params"]):
                p.copy_(saved)
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
        start, history = ck["step"], ck["history"]
        log(f"resumed from {ckpt_path} at step {start}")
    images = evaluate.ImageCache()
    bar = tqdm(range(start, total), initial=start, total=total, desc="train", dynamic_ncols=True)
    t0 = time.time()
    for step in bar:
        opt.zero_grad(set_to_none=True)
        step_loss, hits, seen = 0.0, 0, 0
        for micro in range(args.grad_accum):
            batch = [train_items[i] for i in batch_indices(step, micro, args, len(train_items))]
            loaded = [(images.load(it.images), it.texts) for it in batch]
            loss, mats = compute_loss(model, loaded, args, step_generator(args, step, micro))
            if not torch.isfinite(loss):
                good = f"last good checkpoint {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint yet"
                raise FloatingPointError(f"non-finite loss ({loss.item()}) at step {step}; {good}. "
                                         "Try a lower --lr or --precision fp32.")
            (loss / args.grad_accum).backward()
            step_loss += loss.item() / args.grad_accum
            if mats is not None:
                hits += sum(triplet_loss.correct(S.detach()) for S in mats)
                seen += len(mats)
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        history.append({"step": step + 1, "loss": step_loss, "train_acc": hits / seen if seen else None})
        rate = (step + 1 - start) * args.batch_size * args.grad_accum / max(time.time() - t0, 1e-9)
        bar.set_postfix(loss=f"{step_loss:.4f}", items_per_s=f"{rate:.2f}")
        done = step + 1
        if done % args.save_every == 0 or done == total:
            atomic_save({"step": done, "params": [p.detach().cpu() for p in params], "optimizer": opt.state_dict(),
                         "rng": torch.get_rng_state(), "history": history, "args": vars(args)}, ckpt_path)
        if args.eval_every and done % args.eval_every == 0 and done != total:
            res = evaluate.evaluate_items(model, args.eval_dataset or args.dataset, test_items, args.eval_batch_size,
                                          desc=f"eval@{done}")
            log(f"step {done}: " + json.dumps(res["metrics"]))
    return history


def build(args):
    model = evaluate.load_model(args, args.method)
    params = model.trainable_parameters()
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
    torch.manual_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    items, report = evaluate.load_items(args.dataset, args.data_root, args.annotations, seed=args.seed)
    train_items, test_items = split_items(items, args.shots, args.seed, args.eval_split, not args.eval_dataset)
    name = args.eval_dataset or args.dataset                      # the data set the test split (and metrics) come from
    if args.eval_dataset:                                          # zero-shot transfer (Table 8): train on one, test on another
        test_items, _ = evaluate.load_items(name, args.eval_data_root, seed=args.seed,
                                            split=evaluate.DEFAULT_SPLIT.get(name))
    if args.eval_limit:
        test_items = test_items[:args.eval_limit]
    print(f"{args.dataset}: {len(train_items)} training items; {name}: {len(test_items)} test items "
          f"(split by seed {args.seed}, no shared sentence-image pair)")
    model, params = build(args)
    results = {"dataset": args.dataset, "eval_dataset": name, "model": model.config, "args": vars(args), "data_report": report,
               "split": {"train": len(train_items), "test": len(test_items), "seed": args.seed, "shots": args.shots}}
    if not args.no_zero_shot:
        with torch.no_grad():
            results["zero_shot"] = evaluate.evaluate_items(model, name, test_items, args.eval_batch_size,
                                                           desc="zero-shot")
    t = time.time()
    history = train(args, model, params, train_items, test_items)
    results["train"] = {"steps": len(history), "seconds": round(time.time() - t, 1),
                        "final_loss": history[-1]["loss"] if history else None, "history": history}
    model.save_trained(trained_file(args), vars(args))
    results["few_shot"] = evaluate.evaluate_items(model, name, test_items, args.eval_batch_size, desc="few-shot")
    del model
    results["compare"] = {}
    for method in [m for m in args.compare.split(",") if m]:
        other = evaluate.load_model(args, method)
        with torch.no_grad():
            results["compare"][method] = evaluate.evaluate_items(other, name, test_items, args.eval_batch_size,
                                                                 desc=f"{method} zero-shot")
        del other
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    rows = {f"{args.method} {k.replace('_', '-')}": results[k]["metrics"] for k in ("zero_shot", "few_shot")
            if k in results}
    rows.update({f"{m} zero-shot": r["metrics"] for m, r in results["compare"].items()})
    print(evaluate.format_table(name, rows))
    print(f"wrote {args.output_dir}/results.json and {trained_file(args)}")
    return results


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
