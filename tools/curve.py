"""Accuracy per UNet evaluation: the curve a user with a fixed budget chooses from (noise draws, adaptive candidate
elimination, learned level weights; evaluate.py --draws / --adaptive, train.py --fit-level-weights).

    python -m tools.curve                       # the embedded world, tiny model: docs/curve.json and docs/curve.png
    python -m tools.benchmark --curve ...       # the same

For each task (the embedded shapes world's many-candidate instances, written with --items items, and the ComVG-format
shapes test split), each method's score of every pair at every unit is computed once (`score_items(per_unit=True)`)
and each point is read off those tables:
  - Discffusion: 1, 2, 4, 8 and 16 noise levels l_k = (k + 1) / (n + 1) at one draw (4: the paper's), and the
    paper's 4 levels with 2, 3, 4 draws; its trained deltas are --checkpoint (default the committed shapes run's);
  - DiffusionITM: the first 10, 25, 50, 100, 250 timesteps of DiffusionITM's grid:250 in van der Corput order (each
    prefix spread over [10, 990)), so one table serves every budget;
  - adaptive schedules, through the same `eliminate` evaluate.py --adaptive runs, on the largest table's units;
  - learned level weights (the shapes task, which has a training split): fit on the training split's frozen
    per-level scores (`train.fit_weights`) and scored at the same rows as the uniform ensemble.
Each point: the task's headline accuracy with its 95% bootstrap interval over items, and the UNet rows per item
(DiffusionITM's shared "" rows included). One adaptive schedule per method and task also runs for real
(evaluate_items with the model's adaptive schedule) beside the full ensemble: its accuracy, rows and top-1 agreement
are the measurement of docs/budget.md's targets.
"""
import argparse
import hashlib
import json
import os
import sys
import time

import matplotlib
import matplotlib.ticker
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import methods  # noqa: E402
import train  # noqa: E402
from baselines.diffusion_itm import DiffusionITM  # noqa: E402
from benchmarks.embedded import write as write_embedded  # noqa: E402
from datasets import REGISTRY, item_metrics, load_items, split_items  # noqa: E402
from discffusion import Discffusion, eliminate, elimination_order  # noqa: E402
from evaluate import evaluate_items  # noqa: E402
from common import atomic_write  # noqa: E402
from tools.cli import ArgumentParser, positive_int, run_cli, use_threads, write_json  # noqa: E402
from tools.intervals import bootstrap_ci  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DELTAS = os.path.join(ROOT, "docs", "few_shot_runs", "threads1.safetensors")
TASKS = ("flickr30k_text", "flickr30k", "shapes")
DISC_LEVELS = (1, 2, 4, 8, 16)
ITM_BUDGETS = (10, 25, 50, 100, 250)
SCHEDULES = {"discffusion": ([(2, 3), (16, None)], [(4, 2), (16, None)], [(1, 5), (4, 2), (16, None)],
                             [(4, 5), (16, None)]),
             "diffusion_itm": ([(10, 2), (100, None)], [(10, 3), (100, None)], [(25, 3), (250, None)],
                               [(10, 5), (50, 2), (250, None)])}


def spread_levels(n):
    return tuple(round((k + 1) / (n + 1), 6) for k in range(n))


# ---- the tables ----------------------------------------------------------------------------------------------------

def unit_tables(model, items, args, key):
    """[(n_units, n_img, n_txt)] of every item: its per-unit scores (`score_items(per_unit=True)`), kept under
    --tables by a digest of `key` (what they depend on) and read back from there by a rerun."""
    path = os.path.join(args.tables, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] + ".pt")
    if os.path.isfile(path):
        return torch.load(path, weights_only=True)
    out = train.unit_scores(model, items, args.pairs_per_call)
    os.makedirs(args.tables, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(out, tmp))
    return out


def rows_of(shape, evals, itm):
    """UNet rows of one item given each pair's evaluations (n_img, n_txt): one per pair and unit, and DiffusionITM's
    "" row per image for as long as any of its pairs runs."""
    return int(evals.sum()) + (int(evals.max(1).values.sum()) if itm else 0)


def point(name, tables, units, itm, schedule=None, weights=None):
    """One curve point from the per-unit tables (n_units, n_img, n_txt): the units `units` averaged (weighted by
    `weights` per unit: `Discffusion.weigh`'s), or, with `schedule`, `units` taken in that order by `eliminate` ->
    (hits per item, rows per item, score matrices)."""
    flag = dict((c, f) for c, f, _ in REGISTRY[name].columns)[REGISTRY[name].headline]
    hits, rows, mats = [], [], []
    c = torch.ones(max(units) + 1) if weights is None else weights

    def pool(values, us):
        out = 0.0
        for u, v in zip(us, values):
            out = out + c[u] * v
        return out
    for t in tables:
        flat = t.flatten(1)                                                   # (n_units, P)
        if schedule:
            s, e = eliminate([tuple(t.shape[1:])], schedule, units, lambda active, us: [flat[u, active] for u in us],
                             pool)
            S, E = s.view(t.shape[1:]), e.view(t.shape[1:])
        else:
            got = sorted(units)
            S = (pool([flat[u] for u in got], got) / len(units)).view(t.shape[1:])
            E = torch.full(t.shape[1:], len(units))
        mats.append(S)
        hits.append(float(item_metrics(name, S)[flag]))
        rows.append(rows_of(t.shape[1:], E, itm))
    return hits, rows, mats


def many(items):
    """Whether adaptive elimination applies: items with one image and > 2 texts or one text and > 2 images."""
    return any(min(len(it.images), len(it.texts)) == 1 and max(len(it.images), len(it.texts)) > 2 for it in items)


def summary(label, hits, rows, **extra):
    ci = bootstrap_ci(hits)
    return dict(label=label, accuracy=100 * sum(hits) / len(hits), ci=[100 * ci[0], 100 * ci[1]],
                rows_per_item=sum(rows) / len(rows), items=len(hits), **extra)


def agreement(a, b):
    """The share of items whose top-1 choice (a matrix's argmax) is the same under two scorings."""
    return sum(int(x.flatten().argmax() == y.flatten().argmax()) for x, y in zip(a, b)) / len(a)


# ---- the run -------------------------------------------------------------------------------------------------------

def task_items(name, args, data):
    """(train items or None, test items) of one task: the embedded instance written with --items items (the shapes
    world: its few-shot split)."""
    if name == "shapes":
        items, _ = load_items("shapes", os.path.join(data, "shapes"), seed=0)
        train_items, test_items = split_items(items, "60", 0)[:2]
        return train_items, test_items[:args.shapes_items]
    writer = REGISTRY[name].embedded
    root = os.path.join(data, f"{name}-{args.items}")
    options = write_embedded(lambda out, rng: writer(out, rng, n=args.items), root)
    return None, load_items(name, root, seed=0, **options)[0]


def discffusion_points(name, train_items, items, args, log):
    out, real = [], {}
    tables = {}
    for n in DISC_LEVELS:
        draws = 4 if n == 4 else 1
        m = Discffusion.from_pretrained(args.model, device="cpu", lam=100.0, levels=spread_levels(n), draws=draws,
                                        pairs_per_call=args.pairs_per_call)
        if args.checkpoint:
            m.load_trained(args.checkpoint)
        tables[n] = unit_tables(m, items, args, dict(task=name, items=[it.id for it in items], model=args.model,
                                                     checkpoint=args.checkpoint, levels=n, draws=draws, seed=0))
        if n == 4:
            for d in range(1, 5):
                out.append(summary(f"4 levels x {d} draws", *point(name, tables[4], list(range(4 * d)), False)[:2],
                                   method="discffusion", levels=4, draws=d))
            full = point(name, tables[4], list(range(16)), False)
            for sched in SCHEDULES["discffusion"] if many(items) else ():
                hits, rows, mats = point(name, tables[4], elimination_order(4, 4), False, sched)
                out.append(summary("adaptive " + ",".join(f"{e}:{k}" if k else f"{e}" for e, k in sched), hits, rows,
                                   method="discffusion", adaptive=sched, same_top1=agreement(mats, full[2])))
            real = real_check(m, name, items, SCHEDULES["discffusion"][0], args) if many(items) else {}
            if train_items is not None:
                out += weighted_points(m, name, train_items, tables[4], args, "discffusion")
        else:
            out.append(summary(f"{n} levels", *point(name, tables[n], list(range(n)), False)[:2],
                               method="discffusion", levels=n, draws=1))
        log(f"{name} discffusion {n} levels done")
        del m
    return out, real


def diffusion_itm_points(name, train_items, items, args, log):
    out = []
    m = DiffusionITM.from_pretrained(args.model, device="cpu", lam=100.0, n_timesteps=f"grid:{args.itm_max}",
                                     pairs_per_call=args.pairs_per_call)
    order = elimination_order(len(m.timesteps), 1)                  # van der Corput: every prefix spread
    tables = unit_tables(m, items, args, dict(task=name, items=[it.id for it in items], model=args.model,
                                              itm=f"grid:{args.itm_max}", seed=0))
    n_max = len(order)
    for n in [b for b in ITM_BUDGETS if b < n_max] + [n_max]:
        out.append(summary(f"{n} timesteps", *point(name, tables, order[:n], True)[:2], method="diffusion_itm",
                           timesteps=n))
    for sched in SCHEDULES["diffusion_itm"] if many(items) else ():
        sched = [(min(e, n_max), k) for e, k in sched]
        hits, rows, mats = point(name, tables, order[:sched[-1][0]], True, sched)
        ref = point(name, tables, order[:sched[-1][0]], True)[2]
        out.append(summary("adaptive " + ",".join(f"{e}:{k}" if k else f"{e}" for e, k in sched), hits, rows,
                           method="diffusion_itm", adaptive=sched, same_top1=agreement(mats, ref)))
    log(f"{name} diffusion_itm done")
    return out


def weighted_points(model, name, train_items, tables, args, method):
    """Level weights fit on the training split's frozen per-level scores, scored on the test tables at the uniform
    ensemble's rows (4 levels, 1 and 4 draws)."""
    frozen = train.frozen_level_scores(model, train_items, args.pairs_per_call)
    logits = torch.zeros(len(model.levels), requires_grad=True)
    before, after = train.fit_weights(logits, frozen)
    pi = logits.detach().softmax(0)
    out = []
    for d in (1, 4):
        c = (pi * len(pi)).repeat(d)                                         # the unit weights of `weigh`
        hits, rows, _ = point(name, tables, list(range(4 * d)), False, weights=c)
        out.append(summary(f"4 levels x {d} draws, learned level weights", hits, rows, method=method, levels=4,
                           draws=d, weights=pi.tolist(), fit=dict(uniform=before, fitted=after)))
    return out


def real_check(model, name, items, schedule, args):
    """The schedule run for real (the model's adaptive path, evaluate_items) beside the model's full ensemble."""
    t0 = time.perf_counter()
    full = evaluate_items(model, name, items, args.pairs_per_call, desc=f"{name} full")
    t1 = time.perf_counter()
    model.adaptive = schedule
    cut = evaluate_items(model, name, items, args.pairs_per_call, desc=f"{name} adaptive")
    t2 = time.perf_counter()
    model.adaptive = None
    col = REGISTRY[name].headline
    same = sum(int(torch.tensor(a["scores"]).flatten().argmax() == torch.tensor(b["scores"]).flatten().argmax())
               for a, b in zip(full["items"], cut["items"])) / len(items)
    return dict(schedule=schedule, full=dict(accuracy=full["metrics"][col], ci=full["ci"][col],
                                             rows_per_item=full["rows_per_item"], seconds=round(t1 - t0, 1)),
                adaptive=dict(accuracy=cut["metrics"][col], ci=cut["ci"][col], rows_per_item=cut["rows_per_item"],
                              seconds=round(t2 - t1, 1)),
                same_top1=same, row_share=cut["rows_per_item"] / full["rows_per_item"])


def figure(results, path):
    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4.4), squeeze=False)
    for ax, name in zip(axes[0], tasks):
        for method, colour in (("discffusion", "tab:blue"), ("diffusion_itm", "tab:orange")):
            pts = [p for p in results["tasks"][name]["points"] if p["method"] == method]
            groups = {"uniform": [p for p in pts if "adaptive" not in p and "weights" not in p
                                  and (method != "discffusion" or p["draws"] == 1)],
                      "draws": [p for p in pts if p.get("levels") == 4 and "weights" not in p],
                      "adaptive": [p for p in pts if "adaptive" in p], "weights": [p for p in pts if "weights" in p]}
            styles = {"uniform": ("o-", ""), "draws": ("s--", " (4 levels x 1-4 draws)"),
                      "adaptive": ("^", " adaptive"), "weights": ("*", " learned level weights")}
            for g, ps in groups.items():
                if not ps or (g == "draws" and method != "discffusion"):
                    continue
                ps = sorted(ps, key=lambda p: p["rows_per_item"])
                x, y = [p["rows_per_item"] for p in ps], [p["accuracy"] for p in ps]
                err = [[p["accuracy"] - p["ci"][0] for p in ps], [p["ci"][1] - p["accuracy"] for p in ps]]
                fmt, suffix = styles[g]
                ax.errorbar(x, y, yerr=err, fmt=fmt, color=colour, capsize=2, alpha=0.8, label=method + suffix,
                            markersize=8 if g == "weights" else 5)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.axhline(REGISTRY[name].chance, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{REGISTRY[name].title} ({results['tasks'][name]['items']} items)")
        ax.set_xlabel("UNet rows per item")
        ax.set_ylabel(f"{REGISTRY[name].headline} accuracy (%)")
    seen = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=len(seen), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    p = ArgumentParser(prog="python -m tools.curve", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--items", type=positive_int, default=10, help="items of each retrieval instance")
    p.add_argument("--shapes-items", type=positive_int, default=45, help="test items of the shapes task")
    p.add_argument("--model", default=methods.TINY_MODEL, help="a diffusers folder or hub id (default the tiny model)")
    p.add_argument("--checkpoint", default=DELTAS, help="Discffusion's trained deltas ('' for zero-shot)")
    p.add_argument("--itm-max", type=positive_int, default=250, help="DiffusionITM's largest budget (its grid:S)")
    p.add_argument("--methods", default="discffusion,diffusion_itm")
    p.add_argument("--pairs-per-call", type=positive_int, default=32)
    p.add_argument("--data", default=os.path.join("runs", "curve_data"),
                   help="where the instances are written (default runs/curve_data)")
    p.add_argument("--tables", default=os.path.join("runs", "curve_tables"),
                   help="where the per-unit score tables are kept for reruns (default runs/curve_tables)")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--replot", action="store_true", help="only draw --figure from an earlier run's --output")
    p.add_argument("--output", default=os.path.join("docs", "curve.json"))
    p.add_argument("--figure", default=os.path.join("docs", "curve.png"))
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in args.tasks if t not in TASKS]
    if bad:
        p.error(f"--tasks: unknown {bad}; choose from {', '.join(TASKS)}")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.threads = use_threads(args.threads)
    if args.replot:
        with open(args.output) as f:
            figure(json.load(f), args.figure)
        print(f"wrote {args.figure}")
        return 0
    data = args.data
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    results = dict(command="python -m tools.curve " + " ".join(argv or sys.argv[1:]), args=vars(args), tasks={})
    t0 = time.perf_counter()
    for name in args.tasks:
        train_items, items = task_items(name, args, data)
        task = dict(items=len(items), points=[])
        if "discffusion" in args.methods:
            pts, real = discffusion_points(name, train_items, items, args, log)
            task["points"] += pts
            task["real_check"] = real
        if "diffusion_itm" in args.methods:
            task["points"] += diffusion_itm_points(name, train_items, items, args, log)
        results["tasks"][name] = task
        write_json(args.output, results)                        # each task kept as it finishes
    results["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(args.output, results)
    figure(results, args.figure)
    print(f"wrote {args.output} and {args.figure} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
