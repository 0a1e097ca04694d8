"""tools/prefilter.py and evaluate.py --prefilter-k: CLIP's top K per item, re-ranked by the method; the filter's
recall against a direct computation; Flickr30K's Karpathy split as full retrieval."""
import json
import os

import torch

import datasets
import evaluate
import methods
from benchmarks.flickr30k import load
from benchmarks.flickr30k_text import load as load_text
from support import FakeModel, image
from tools.prefilter import prefilter
from tools.sd_configs import make_random_clip

COLORS = ["red", "green", "blue", "yellow"]


def write_karpathy(root, n=4):
    recs = [dict(filename=f"{k}.jpg", split="test", sentences=[dict(raw=f"a {COLORS[k % 4]} thing {k}"),
                                                               dict(raw=f"the {COLORS[(k + 1) % 4]} one")])
            for k in range(n)]
    recs += [dict(filename="train.jpg", split="train", sentences=[dict(raw="x")]),
             dict(filename="missing.jpg", split="test", sentences=[dict(raw="gone")]),
             dict(filename="bad.jpg", split="test", sentences="nope")]
    for k in range(n):
        image(os.path.join(root, "images", f"{k}.jpg"), COLORS[k % 4])
    json.dump(dict(images=recs), open(os.path.join(root, "dataset_flickr30k.json"), "w"))
    return root


def test_karpathy_split_is_full_retrieval(tmp_path):
    root = write_karpathy(str(tmp_path / "f"))
    items, report = load(root, every=1, karpathy=True)
    assert len(items) == 8 and all(len(it.images) == 4 for it in items)
    assert items[2].images[0].endswith("1.jpg") and items[2].texts == ["a green thing 1"]
    assert report["missing_images"] == 1 and report["malformed"] == 1 and report["records"] == 6
    text, _ = load_text(root, karpathy=True)
    assert len(text) == 4 and text[1].texts[0] == "a green thing 1" and len(text[1].texts) == 4


def test_prefilter_keeps_clips_top_k_and_reports_its_recall(tmp_path):
    root = write_karpathy(str(tmp_path / "f"))
    clip_dir = make_random_clip(str(tmp_path / "clip"), seed=0)
    args = evaluate.build_parser().parse_args(["--clip-model", clip_dir, "--device", "cpu"])
    clip = methods.build("clip", args)
    items, _ = load(root, every=1, karpathy=True)
    kept, misses, stats = prefilter(clip, items, k=3)
    hits = 0
    for it in items:                                  # direct: CLIP's cosines of the caption with each image
        s = clip.score(datasets.ImageCache().load(it.images), it.texts)[:, 0]
        top = torch.argsort(s, descending=True, stable=True)[:3].tolist()
        hits += 0 in top
        if 0 in top:
            cut = next(k for k in kept if k.id == it.id)
            assert cut.images == [it.images[0]] + [it.images[i] for i in top if i != 0]
        else:
            miss = next(s for m, s in misses if m.id == it.id)       # keeps its CLIP rank, beyond the top 3
            rank = torch.argsort(s, descending=True, stable=True).tolist().index(0)
            assert datasets.item_metrics("flickr30k", miss) == dict(top1=False, top5=rank < 5, rank=rank)
    assert stats["hits"] == hits and stats["recall"] == 100.0 * hits / 8 and len(kept) + len(misses) == 8
    assert all(datasets.item_metrics("flickr30k", s)["rank"] >= 3 for _, s in misses)


def test_evaluate_with_prefilter_counts_misses_wrong(tmp_path, monkeypatch, capsys):
    root = write_karpathy(str(tmp_path / "f"))
    clip_dir = make_random_clip(str(tmp_path / "clip"), seed=0)
    build = methods.build
    monkeypatch.setattr(evaluate.methods, "build", lambda method, args, checkpoint=None:
                        build(method, args, checkpoint) if method == "clip" else FakeModel())
    out = str(tmp_path / "r.json")
    assert evaluate.main(["--dataset", "flickr30k", "--data-root", root, "--flickr-karpathy", "--flickr-every", "1",
                          "--prefilter-k", "2", "--clip-model", clip_dir, "--device", "cpu", "--output", out]) == 0
    res = json.load(open(out))["datasets"]["flickr30k"]
    f = res["prefilter"]
    assert f["k"] == 2 and f["items"] == 8 and res["n_items"] == 8
    missed = [r for r in res["items"] if r.get("prefilter_miss")]
    assert len(missed) == 8 - f["hits"] and not any(r["top1"] for r in missed)
    assert res["metrics"]["Top-1"] <= f["recall"]
    assert "CLIP pre-filter top 2: recall@2" in capsys.readouterr().out
