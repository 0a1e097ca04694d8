"""benchmarks/sugarcrepe.py on SugarCrepe's seven JSON files written in their published format."""
import json
import os

import pytest

import datasets
import evaluate
from benchmarks.sugarcrepe import load
from support import image


def write_sugarcrepe(root, outside):
    image(os.path.join(root, "val2017", "000000000139.jpg"), "red")
    good = dict(filename="000000000139.jpg", caption="a red room", negative_caption="a blue room")
    json.dump({"0": good, "1": dict(good, filename="000000000999.jpg"), "2": {"caption": "x"}},
              open(os.path.join(root, "replace_att.json"), "w"))
    json.dump({"0": good, "1": dict(good, filename=os.path.relpath(outside, os.path.join(root, "val2017")))},
              open(os.path.join(root, "swap_obj.json"), "w"))
    json.dump({"0": good}, open(os.path.join(root, "add_att.json"), "w"))
    json.dump({"0": good}, open(os.path.join(root, "add_obj.json"), "w"))
    return root


def test_items_per_file_and_the_add_replace_swap_averages(tmp_path):
    outside = image(str(tmp_path / "outside.jpg"), "red")
    root = write_sugarcrepe(str(tmp_path / "sc"), outside)
    items, report = load(root)
    assert sorted(it.category for it in items) == ["add_att", "add_obj", "replace_att", "swap_obj"]
    assert report["malformed"] == 2 and report["missing_images"] == 1
    hits = {"add_att": True, "add_obj": False, "replace_att": True, "swap_obj": False}
    out = evaluate.summarize("sugarcrepe", [(it, dict(correct=hits[it.category])) for it in items])
    assert out["metrics"]["Add"] == 50.0 and out["metrics"]["Replace"] == 100.0 and out["metrics"]["Swap"] == 0.0
    assert out["metrics"]["All"] == 50.0 and out["per_file"]["add_obj"]["All"] == 0.0
    os.makedirs(tmp_path / "empty")
    with pytest.raises(datasets.InputError, match="add_att.json"):
        datasets.load_items("sugarcrepe", str(tmp_path / "empty"))
