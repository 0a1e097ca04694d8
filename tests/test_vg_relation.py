"""benchmarks/vg_relation.py and vg_attribution.py on ARO's VG files written in their published format."""
import json
import os

import torch
from PIL import Image

import datasets
from benchmarks.vg_attribution import load as load_attribution
from benchmarks.vg_relation import load
from support import image


def record(path, **kw):
    return dict(image_id=1, image_path=path, bbox_x=4, bbox_y=2, bbox_w=8, bbox_h=6, true_caption="the cup is on the "
                "table", false_caption="the table is on the cup", **kw)


def write_vg(root, outside, name, **extra):
    image(os.path.join(root, "images", "1.jpg"), "red", size=16)
    recs = [record("1.jpg", **extra), record("2.jpg", **extra), {"image_path": "1.jpg"},
            record(os.path.relpath(outside, os.path.join(root, "images")), **extra)]
    os.makedirs(root, exist_ok=True)
    json.dump(recs, open(os.path.join(root, name), "w"))
    return root


def test_relation_items_crop_the_box_and_count_bad_records(tmp_path):
    outside = image(str(tmp_path / "outside.jpg"), "red")
    root = write_vg(str(tmp_path / "vgr"), outside, "visual_genome_relation.json", relation_name="on")
    items, report = load(root)
    assert len(items) == 1 and items[0].texts == ["the cup is on the table", "the table is on the cup"]
    assert items[0].category == "on" and items[0].images[0].crop == (4.0, 2.0, 8.0, 6.0)
    assert report["malformed"] == 2 and report["missing_images"] == 1
    assert any("could leave" in w for w in report["warnings"])
    im = datasets.open_image(items[0].images[0])
    assert im.size == (8, 6)                                      # ARO's crop: (x, y, x + w, y + h)
    full = Image.open(os.path.join(root, "images", "1.jpg"))
    assert im.tobytes() == full.crop((4, 2, 12, 8)).tobytes()


def test_relation_macro_accuracy_over_relations():
    recs = [(datasets.Item(str(k), [], [], category=c), dict(correct=v))
            for k, (c, v) in enumerate([("on", 1), ("on", 1), ("on", 1), ("under", 0)])]
    out = __import__("evaluate").summarize("vg_relation", recs)
    assert out["metrics"]["Accuracy"] == 75.0 and out["metrics"]["Macro"] == 50.0   # (100 + 0) / 2
    low, high = out["ci"]["Macro"]
    assert low <= 50.0 <= high
    assert out["per_relation"]["under"]["Accuracy"] == 0.0


def test_attribution_category_and_judge(tmp_path):
    outside = image(str(tmp_path / "outside.jpg"), "red")
    root = write_vg(str(tmp_path / "vga"), outside, "visual_genome_attribution.json", attributes=["white", "red"])
    items, report = load_attribution(root)
    assert len(items) == 1 and items[0].category == "white_red" and report["malformed"] == 2
    assert datasets.item_metrics("vg_attribution", torch.tensor([[0.2, 0.1]])) == dict(correct=True)
    assert datasets.item_metrics("vg_attribution", torch.tensor([[0.1, 0.1]])) == dict(correct=False)  # a tie
