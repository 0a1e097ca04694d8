"""benchmarks/imagecode.py on ImageCoDe's valid_data.json + image-sets/ written in their published format."""
import json
import os

import datasets
from benchmarks.imagecode import load
from support import image

COLORS = ["red", "green", "blue", "yellow"]


def write_imagecode(root, outside):
    for s in ("open-images-1_a", "MSR-VTT-video_b"):
        for k in range(10):
            image(os.path.join(root, "image-sets", s, f"img{k}.jpg"), COLORS[k % 4])
    data = {"open-images-1_a": {"3": "the yellow one", "12": "no such image", "x": "not an index"},
            "MSR-VTT-video_b": {"0": "a video frame"},
            "open-images-2_missing": {"1": "a set not on disk"},
            os.path.relpath(os.path.dirname(outside), os.path.join(root, "image-sets")) + "/open-images-x":
                {"0": "out"},
            "open-images-3_bad": "not a dict"}
    json.dump(data, open(os.path.join(root, "valid_data.json"), "w"))
    return root


def test_static_sets_target_first_in_k_order(tmp_path):
    outside = image(str(tmp_path / "out" / "open-images-x" / "img0.jpg"), "red")
    root = write_imagecode(str(tmp_path / "imagecode"), outside)
    items, report = load(root)
    assert [it.id for it in items] == ["open-images-1_a/3"] and items[0].texts == ["the yellow one"]
    sets = os.path.join(root, "image-sets", "open-images-1_a")
    assert items[0].images == [os.path.join(sets, f"img{k}.jpg") for k in (3, 0, 1, 2, 4, 5, 6, 7, 8, 9)]
    assert report["missing_images"] == 2 and report["malformed"] == 3 and report["video_sets_left_out"] == 1
    assert any("could leave" in w for w in report["warnings"])
    video, _ = load(root, video=True)
    assert {it.category for it in video} == {"static", "video"}


def test_sets_sort_by_k_as_numbers(tmp_path):
    root = str(tmp_path / "ic")
    for k in range(12):
        image(os.path.join(root, "image-sets", "open-images-s", f"img{k}.jpg"), COLORS[k % 4])
    json.dump({"open-images-s": {"10": "the tenth"}}, open(os.path.join(root, "valid_data.json"), "w"))
    items, _ = datasets.load_items("imagecode", root)
    assert os.path.basename(items[0].images[0]) == "img10.jpg"
    assert [os.path.basename(p) for p in items[0].images[1:3]] == ["img0.jpg", "img1.jpg"]
