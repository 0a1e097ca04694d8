"""benchmarks/pets.py: Oxford-IIIT Pet's images/<Breed>_<n>.jpg, the class from the file name; per-class mean."""
import os

import pytest

import datasets
import evaluate
from benchmarks.pets import class_of, load
from support import image


def test_class_from_the_file_name_and_37_way_texts(tmp_path):
    root = str(tmp_path / "pets")
    for n, c in (("american_bulldog_10.jpg", "red"), ("Abyssinian_1.jpg", "blue"), ("Abyssinian_2.jpg", "green"),
                 ("README.jpg", "red")):
        image(os.path.join(root, "images", n), c)
    assert class_of("american_bulldog_10.jpg") == "american bulldog" and class_of("x.jpg") is None
    items, report = load(root)
    assert [it.texts[0] for it in items] == ["a photo of a abyssinian"] * 2 + ["a photo of a american bulldog"]
    assert all(len(it.texts) == 2 and len(set(it.texts)) == 2 for it in items)
    assert report["malformed"] == 1 and report["classes"] == 2
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("abyssinian\nbeagle\n")                      # a listed order; american bulldog not listed
    items, report = load(root, template="a {}")
    assert items[0].texts == ["a abyssinian", "a beagle"] and report["malformed"] == 2
    with pytest.raises(datasets.InputError, match="template"):
        load(root, template="no slot")


def test_per_class_mean_is_the_mean_of_class_accuracies():
    recs = [(datasets.Item(str(k), [], [], category=c), dict(top1=v, top5=True, rank=0 if v else 1))
            for k, (c, v) in enumerate([("a", 1), ("a", 1), ("a", 1), ("a", 0), ("b", 0)])]
    out = evaluate.summarize("pets", recs)
    assert out["metrics"]["Top-1"] == 60.0 and out["metrics"]["Per-class"] == pytest.approx(37.5)  # (75 + 0) / 2
    assert out["counts"]["Per-class"] == 5
