"""benchmarks/clevr.py on DiffusionITM's captions/<subtask>.json written in their published format."""
import json
import os

import torch

import evaluate
from benchmarks.clevr import load
from support import image


def write_clevr(root, outside):
    image(os.path.join(root, "images", "CLEVR_val_1.png"), "red")
    os.makedirs(os.path.join(root, "captions"))
    json.dump({"CLEVR_val_1.png": [["On the left is a red cube.", "On the right is a red cube."],
                                   ["only one"]],
               "CLEVR_val_2.png": [["a", "b"]],
               os.path.relpath(outside, os.path.join(root, "images")): [["c", "d"]]},
              open(os.path.join(root, "captions", "spatial.json"), "w"))
    json.dump({"CLEVR_val_1.png": [["A red object.", "A blue object."]]},
              open(os.path.join(root, "captions", "recognition_color.json"), "w"))
    return root


def test_pairs_per_subtask_spatial_read_like_the_others(tmp_path):
    outside = image(str(tmp_path / "outside.png"), "red")
    items, report = load(write_clevr(str(tmp_path / "clevr"), outside))
    assert [(it.category, it.texts) for it in items] == [
        ("recognition_color", ["A red object.", "A blue object."]),
        ("spatial", ["On the left is a red cube.", "On the right is a red cube."])]
    assert report["malformed"] == 2 and report["missing_images"] == 1 and report["records"] == 5
    recs = [(it, evaluate.item_metrics("clevr", torch.tensor(s))) for it, s in zip(items, ([[1.0, 0.0]],
                                                                                           [[0.0, 1.0]]))]
    out = evaluate.summarize("clevr", recs)
    assert out["metrics"]["recognition_color"] == 100.0 and out["metrics"]["spatial"] == 0.0
    assert out["metrics"]["Overall"] == 50.0 and out["metrics"]["pair_binding_size"] is None
