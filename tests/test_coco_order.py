"""benchmarks/coco_order.py and flickr30k_order.py: Karpathy-format files, one item per caption, seeded
perturbations."""
import json
import os
import sys

import pytest

import datasets
from benchmarks.coco_order import load
from benchmarks.flickr30k_order import load as load_flickr
from support import image, tagger


def write_karpathy(root, outside, name, folder):
    image(os.path.join(root, folder, "1.jpg"), "red")
    recs = [dict(image=f"{folder}/1.jpg", caption=["A man riding a red horse.", "A red horse in a green field."]),
            dict(image=f"{folder}/2.jpg", caption=["A lost image."]), dict(image=f"{folder}/1.jpg"),
            dict(image=os.path.relpath(outside, root), caption=["An escape."])]
    os.makedirs(root, exist_ok=True)
    json.dump(recs, open(os.path.join(root, name), "w"))
    return root


def test_one_item_per_caption_seeded_and_counted(tmp_path):
    outside = image(str(tmp_path / "outside.jpg"), "red")
    root = write_karpathy(str(tmp_path / "coco"), outside, "coco_karpathy_test.json", "val2014")
    items, report = load(root, seed=0, tagger=tagger)
    assert [it.id for it in items] == ["0.0", "0.1"] and all(len(it.texts) == 5 for it in items)
    assert items[0].texts[0] == "a man riding a red horse" and items[0].meta["generated"]
    assert report["malformed"] == 2 and report["missing_images"] == 1
    again, _ = load(root, seed=0, tagger=tagger)
    other, _ = load(root, seed=1, tagger=tagger)
    assert [it.texts for it in again] == [it.texts for it in items]
    assert [it.texts for it in other] != [it.texts for it in items]
    flickr = write_karpathy(str(tmp_path / "f"), outside, "flickr30k_val.json", "flickr30k-images")
    assert len(load_flickr(flickr, tagger=tagger)[0]) == 2


def test_the_scored_texts_are_kept_in_the_results(tmp_path, monkeypatch):
    import evaluate
    import torch
    outside = image(str(tmp_path / "outside.jpg"), "red")
    root = write_karpathy(str(tmp_path / "coco"), outside, "coco_karpathy_test.json", "val2014")
    items, _ = load(root, tagger=tagger)

    class Model:
        def score_items(self, batch, spent=None):
            return [torch.tensor([[float(-k) for k in range(len(t))]]) for _, t in batch]
    out = evaluate.evaluate_items(Model(), "coco_order", items)
    assert out["metrics"]["Accuracy"] == 100.0
    assert [r["texts"] for r in out["items"]] == [it.texts for it in items]


def test_without_spacy_the_loader_says_how_to_install_it(tmp_path, monkeypatch):
    outside = image(str(tmp_path / "outside.jpg"), "red")
    root = write_karpathy(str(tmp_path / "coco"), outside, "coco_karpathy_test.json", "val2014")
    monkeypatch.setitem(sys.modules, "spacy", None)
    with pytest.raises(datasets.InputError, match="en_core_web_sm"):
        datasets.load_items("coco_order", root)
