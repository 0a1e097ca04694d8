"""benchmarks/flickr30k.py and flickr30k_text.py on DiffusionITM's top-10 files written in their published format."""
import os

import pytest

import datasets
from benchmarks.flickr30k import load
from benchmarks.flickr30k_text import load as load_text
from support import image, write_top10



def test_image_retrieval_reads_the_frozen_lists(tmp_path):
    outside = image(str(tmp_path / "outside.jpg"), "red")
    root = write_top10(str(tmp_path / "flickr30k"), outside)
    items, report = load(root, every=1)
    assert [it.texts for it in items] == [["a red thing"], ["a green thing"]]
    assert len(items[0].images) == 10 and items[0].images[0] == os.path.join(root, "images", "0.jpg")
    assert items[1].images[0].endswith("1.jpg")                         # the file's order: the true image first
    assert report["records"] == 5 and report["malformed"] == 2 and report["missing_images"] == 1
    assert any("could leave the data folder" in w for w in report["warnings"])
    assert all(os.path.realpath(p).startswith(os.path.realpath(root)) for it in items for p in it.images)
    # DiffusionITM's default: every 5th caption key (keys 0 and 5, ...): here key 0 only
    items5, report5 = load(root)
    assert [it.id for it in items5] == ["q0"] and report5["records"] == 1


def test_text_retrieval_and_the_registry_judge(tmp_path):
    outside = image(str(tmp_path / "outside.jpg"), "red")
    root = write_top10(str(tmp_path / "flickr30k"), outside)
    items, report = load_text(root)
    assert len(items) == 1 and items[0].texts[0] == "a red thing" and len(items[0].texts) == 10
    assert report["malformed"] == 2 and report["missing_images"] == 1
    # flickr30k_text finds the flickr30k folder (alias) under a data root
    assert datasets.default_root("flickr30k_text", str(tmp_path)) == root


def test_ranked_images_judge_rank_ties_and_the_first_wins_rule():
    import torch
    s = torch.tensor([[0.5], [0.9], [0.8], [0.7], [0.6], [0.5], [0.0], [0.4], [0.45], [0.1]])  # (10 images, 1 text)
    assert datasets.item_metrics("flickr30k", s) == dict(top1=False, top5=False, rank=5)   # 4 above, 1 tie
    assert datasets.tied("flickr30k", s)
    first = datasets.item_metrics("flickr30k", datasets.prefer_true(s))                 # DiffusionITM: tie won
    assert first == dict(top1=False, top5=True, rank=4)
    s2 = torch.tensor([[0.7], [0.7], [0.1]])
    assert not datasets.item_metrics("flickr30k", s2)["top1"]
    assert datasets.item_metrics("flickr30k", datasets.prefer_true(s2))["top1"]
    above = torch.tensor([[0.7], [torch.nextafter(torch.tensor(0.7), torch.tensor(1.0)).item()]])
    assert not datasets.item_metrics("flickr30k", datasets.prefer_true(above))["top1"]   # a real loss stays lost


def test_missing_files_are_one_error_naming_them(tmp_path):
    os.makedirs(tmp_path / "f")
    with pytest.raises(datasets.InputError, match="val_top10_RN50x64.json"):
        datasets.load_items("flickr30k", str(tmp_path / "f"))
