"""benchmarks/svo.py on SVO-Probes' svo_probes.csv written in its published format; the download of its images."""
import csv
import os

import datasets
from benchmarks import fetching
from benchmarks.svo import load
from support import image

HEADER = ["sentence", "pos_triplet", "neg_triplet", "subj_neg", "verb_neg", "obj_neg", "pos_image_id",
          "neg_image_id", "pos_url", "neg_url"]


def write_svo(root, outside):
    image(os.path.join(root, "images", "1.jpg"), "red")
    image(os.path.join(root, "images", "2.jpg"), "blue")
    rows = [["A girl stands in grass.", "girl,stand,grass", "dog,stand,grass", "True", "False", "False", 1, 2, "u1",
             "u2"],
            ["A man eats.", "man,eat,food", "man,drink,food", "False", "True", "False", 1, 3, "u1", "u3"],  # 3 missing
            ["Two flags.", "x", "y", "True", "True", "False", 1, 2, "u", "u"],                          # two kinds
            ["Short row", "a"],
            ["An escape.", "a,b,c", "a,b,d", "False", "False", "True",
             os.path.relpath(outside, os.path.join(root, "images"))[:-4], 2, "u", "u"]]
    with open(os.path.join(root, "svo_probes.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(rows)
    return root


def test_rows_become_two_image_items_by_negative_kind(tmp_path):
    outside = image(str(tmp_path / "outside.jpg"), "red")
    root = write_svo(str(tmp_path / "svo"), outside)
    items, report = load(root)
    assert len(items) == 1 and items[0].category == "subject" and items[0].texts == ["A girl stands in grass."]
    assert [os.path.basename(p) for p in items[0].images] == ["1.jpg", "2.jpg"]
    assert report["missing_images"] == 1 and report["malformed"] == 3
    assert any("could leave" in w for w in report["warnings"])
    out = __import__("evaluate").summarize("svo", [(items[0], dict(correct=True))])
    assert out["metrics"]["Subject"] == 100.0 and out["metrics"]["Verb"] is None


def test_download_counts_dead_urls(tmp_path, monkeypatch):
    from benchmarks import svo
    root = str(tmp_path / "svo")
    os.makedirs(root)
    with open(os.path.join(root, "svo_probes.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerow(["s", "a", "b", "True", "False", "False", 5, 6, "https://x/5.jpg", "https://x/6.jpg"])
    fetched = []
    monkeypatch.setattr(fetching, "fetch", lambda url, path, *a, **k: "present")

    def fake_images(jobs, tally, *a, **k):
        for name, sources in jobs:
            fetched.append(sources[0][0])
            svo.count(tally, name, "failed" if name == "6.jpg" else "fetched", "HTTP 404")
    monkeypatch.setattr(svo, "fetch_images", fake_images)
    tally = svo.fetch(root)
    assert sorted(fetched) == ["https://x/5.jpg", "https://x/6.jpg"]
    assert tally["fetched"] == 1 and tally["failed"] == [("6.jpg", "HTTP 404")]
    assert datasets.REGISTRY["svo"].source is svo
