r"""App. I, Fig. 11: failure cases, the items Discffusion gets most wrong, with their per-word attention maps.

From evaluate.py's per-item results (its JSON: methods[<row>].datasets[<data set>].items, each {id, category, scores,
...}; ComVG / shapes scores are (2 images, 1 sentence)), the margin of an item is s(positive image, sentence) -
s(negative image, sentence); the N items with the most negative margin are drawn, each as two blocks: the sentence's
per-word attention maps on the positive image and on the negative image (figures.word_maps / draw_blocks, the Fig. 10
machinery: mean over heads, layers and noise levels), scored by the same model, options and learned deltas that the
row was evaluated with (its JSON records them).

    python evaluate.py --dataset shapes --methods discffusion --checkpoint runs/shapes/prompt_deltas.safetensors \
        --output runs/shapes/eval_results.json
    python -m tools.failures runs/shapes/eval_results.json               # -> docs/fig11_failures.png + .json
"""
import argparse
import json
import os
import sys
import time

import torch

from tools import figures
from common import InputError, check_writable
from tools.cli import ArgumentParser, positive_int, run_cli
from datasets import POS_IMAGE, REGISTRY, load_items
from discffusion import Discffusion

PAIRED = [n for n, d in REGISTRY.items() if d.judge is POS_IMAGE]  # a sentence, a positive and a negative image:
                                                                    # the margin of eq. 6


def read_results(path, row=None):
    """(row label, that row's record, data set name, its result) from evaluate.py's JSON."""
    try:
        with open(path) as f:
            res = json.load(f)
    except FileNotFoundError:
        raise InputError(f"results file {path} does not exist (run evaluate.py first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"results file {path} is not evaluate.py's JSON ({type(e).__name__})") from None
    runs = res.get("methods") if isinstance(res, dict) else None
    if not runs:
        raise InputError(f"results file {path} has no 'methods' (not evaluate.py's JSON)")
    few = [k for k, r in runs.items() if r.get("method") == "discffusion" and r.get("checkpoint")]
    label = row or (few or [k for k, r in runs.items() if r.get("method") == "discffusion"] or [None])[0]
    if label not in runs:
        raise InputError(f"results file {path}: no row {label!r}; it has {', '.join(runs)}")
    if runs[label].get("method") != "discffusion":
        raise InputError(f"row {label!r} of {path} is {runs[label].get('method')}: attention maps need discffusion")
    name = next((n for n in runs[label]["datasets"] if n in PAIRED), None)
    if name is None:
        raise InputError(f"row {label!r} of {path} has none of {', '.join(PAIRED)} (sentence + 2 images items)")
    return label, runs[label], name, runs[label]["datasets"][name]


def worst_items(result, n):
    """The n items with the most negative margin s(pos) - s(neg), most negative first: [(margin, record)]."""
    scored = [(r["scores"][0][0] - r["scores"][1][0], r) for r in result["items"]]
    return sorted(scored, key=lambda x: x[0])[:n]


def build_model(run, device=None):
    """The row's scorer (model, levels, lambda, pooling, layers, seed from its JSON) with its deltas, keeping maps."""
    cfg = run["model"]
    model = Discffusion.from_pretrained(cfg["model"], device=device, keep_maps=True, levels=cfg["levels"],
                                        lam=cfg["lam"], pooling=cfg["pooling"], layers=cfg["layers"],
                                        seed=cfg["seed"], resolution=cfg.get("resolution"),
                                        resize_via=cfg.get("resize_via"))
    if run.get("checkpoint"):
        model.load_trained(run["checkpoint"])
    return model


def failure_figure(args):
    t0 = time.time()
    label, run, name, result = read_results(args.results, args.row)
    worst = worst_items(result, args.n)
    by_id = {it.id: it for it in load_items(name, result["root"])[0]}
    missing = [r["id"] for _, r in worst if r["id"] not in by_id]
    if missing:
        raise InputError(f"items {missing[:5]} of {args.results} are not in {result['root']} any more")
    model = build_model(run, args.device)
    items = [by_id[r["id"]] for _, r in worst]
    jobs = [(figures.load_image(p), [it.texts[0]]) for it in items for p in it.images[:2]]   # pos, neg per item
    maps = figures.word_maps(model, jobs)
    blocks, records = [], []
    for k, ((margin, rec), it) in enumerate(zip(worst, items)):
        pos, neg = maps[2 * k][0], maps[2 * k + 1][0]
        negative = figures.neg_caption(it) if "neg_triplet" in it.meta else "(negative image)"
        blocks.append((f"#{k + 1} item {it.id} ({it.category} swap), margin {margin:+.4f}: positive image, "
                       f"caption '{it.texts[0]}'", jobs[2 * k][0], [(f"positive\nf = {pos['score']:.4f}",
                                                                    pos["words"], pos["maps"]["all"])]))
        blocks.append((f"negative image (its scene: '{negative}'), same caption", jobs[2 * k + 1][0],
                       [(f"negative\nf = {neg['score']:.4f}", neg["words"], neg["maps"]["all"])]))
        records.append(dict(rank=k + 1, id=it.id, category=it.category, caption=it.texts[0], negative=negative,
                            images=it.images[:2], margin=margin, evaluated_scores=rec["scores"],
                            redrawn_scores=[pos["score"], neg["score"]], words=pos["words"],
                            maps={"positive": figures.rounded(pos["maps"]["all"]),
                                  "negative": figures.rounded(neg["maps"]["all"])}))
    png = os.path.join(args.out, "fig11_failures.png")
    n_wrong = sum(1 for r in result["items"] if r["scores"][0][0] <= r["scores"][1][0])
    figures.draw_blocks(blocks, png, f"Fig. 11: the {len(worst)} held-out items with the most negative margin "
                                     f"f(positive) - f(negative) ({label}, {n_wrong} of {len(result['items'])} items "
                                     f"wrong); per-word cross-attention, mean over heads, layers and noise levels")
    kinds = {c: sum(1 for r in result["items"] if r["category"] == c and r["scores"][0][0] <= r["scores"][1][0])
             for c in sorted({r["category"] for r in result["items"]})}
    out = dict(figure="Fig. 11", results=args.results, row=label, dataset=name, checkpoint=run.get("checkpoint"),
               model=run["model"], wrong_items=n_wrong, n_items=len(result["items"]), wrong_by_kind=kinds,
               maps="(n_words, G, G): attention probability per caption token on each image",
               seconds=round(time.time() - t0, 1), torch_threads=torch.get_num_threads(), failures=records)
    figures.dump_json(out, os.path.join(args.out, "fig11_failures.json"))
    for r in records:
        print(f"#{r['rank']} {r['id']} {r['category']:8s} margin {r['margin']:+.4f}  '{r['caption']}'  vs the "
              f"scene '{r['negative']}'")
    print(f"wrong by kind: {kinds}; written {png} and fig11_failures.json")
    return out


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter, prog="python -m tools.failures")
    p.add_argument("results", nargs="?", default=os.path.join("runs", "shapes", "eval_results.json"),
                   help="evaluate.py's JSON (default runs/shapes/eval_results.json)")
    p.add_argument("--row", help="its row (default: the first Discffusion row with a checkpoint, else the first "
                                 "Discffusion row)")
    p.add_argument("-n", type=positive_int, default=4, help="failure cases to draw (default 4)")
    p.add_argument("--out", default=os.path.join("runs", "failures"),
                   help="folder for fig11_failures.png / .json (default runs/failures; the docs' figure: --out docs)")
    p.add_argument("--device", choices=("cpu", "cuda"))
    return p


def cli(argv):
    args = build_parser().parse_args(argv)
    check_writable(args.out, folder=True)
    failure_figure(args)


def main(argv=None):
    return run_cli(cli, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
