"""Loaders of §5.1 on tiny fixture files written in each publisher's exact format."""
import inspect
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
from benchmarks.coco import load as load_coco
from benchmarks.comvg import load as load_comvg
from benchmarks.refcocog import load as load_refcocog
from benchmarks.shapes import load as load_shapes
from benchmarks.vlchecklist import load as load_vlchecklist
from benchmarks.vqav2 import load as load_vqav2
from benchmarks.winoground import load as load_winoground
from datasets import InputError, REGISTRY
from support import (COLORS, FIXTURES, image, write_coco, write_comvg, write_refcocog, write_vlchecklist,
                     write_vqa_paper, write_vqav2, write_winoground)


# ---- ComVG -------------------------------------------------------------------------------------------------------

def test_comvg_reads_csv_and_counts_bad_rows(tmp_path):
    root = write_comvg(str(tmp_path))
    items, report = load_comvg(root)
    assert [it.id for it in items] == ["1", "2", "3"]
    assert [it.category for it in items] == ["subject", "object", "verb"]
    assert items[0].texts == ["a red circle"]
    assert items[0].images == [os.path.join(root, "VG_100K", "10.jpg"), os.path.join(root, "VG_100K", "11.jpg")]
    assert items[1].images[1] == os.path.join(root, "VG_100K_2", "12.jpg")
    assert report["records"] == 5 and report["items"] == 3
    assert report["malformed"] == 1 and "comvg.csv:5" in report["warnings"][0]
    assert report["missing_images"] == 1 and report["missing_files"] == ["99.jpg"]


def test_comvg_explicit_annotations_and_flat_folder(tmp_path):
    root = write_comvg(str(tmp_path / "a"), bad_line=False, missing=False)
    flat = str(tmp_path / "flat")
    for sub in ("VG_100K", "VG_100K_2"):
        for name in os.listdir(os.path.join(root, sub)):
            os.makedirs(flat, exist_ok=True)
            os.replace(os.path.join(root, sub, name), os.path.join(flat, name))
    csv_path = str(tmp_path / "elsewhere.csv")
    os.replace(os.path.join(root, "comvg.csv"), csv_path)
    items, report = load_comvg(flat, annotations=csv_path)
    assert len(items) == 3 and report["malformed"] == 0 and report["files"] == [csv_path]


def test_comvg_missing_root_csv_and_images(tmp_path):
    with pytest.raises(InputError, match="not a folder"):
        load_comvg(str(tmp_path / "nope"))
    with pytest.raises(InputError) as e:
        load_comvg(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in ("compositional_visual_genome.csv", "ComVG.csv", "comvg.csv"))
    root = write_comvg(str(tmp_path / "c"))
    for sub in ("VG_100K", "VG_100K_2"):
        for name in os.listdir(os.path.join(root, sub)):
            os.remove(os.path.join(root, sub, name))
    with pytest.raises(InputError) as e:
        load_comvg(root)
    msg = str(e.value)
    assert "no ComVG images found" in msg and "\n" not in msg
    for sub in ("VG_100K", "VG_100K_2", "vg_concept", "images"):
        assert os.path.join(root, sub) in msg


def test_comvg_wrong_header(tmp_path):
    with open(tmp_path / "comvg.csv", "w") as f:
        f.write("id,text\n1,a\n")
    with pytest.raises(InputError, match="lacks the column"):
        load_comvg(str(tmp_path))


# ---- RefCOCOg ----------------------------------------------------------------------------------------------------

def test_refcocog_ten_texts_reproducible_and_split(tmp_path):
    root = write_refcocog(str(tmp_path))
    items, report = load_refcocog(root, split="val")
    assert len(items) == 12 and all(it.split == "val" for it in items)
    assert report["malformed"] == 1 and "refs(umd).p[24]" in report["warnings"][0]
    it = items[0]
    assert it.texts[0] == "the red thing 0" and len(it.texts) == 10 and len(set(it.texts)) == 10
    assert it.images == [os.path.join(root, "train2014", "COCO_train2014_000000000001.jpg")]
    val_texts = {i.texts[0] for i in items}
    assert not set(it.texts[1:]) <= val_texts  # negatives: any other ref (the official code's), here a train one too
    same, _ = load_refcocog(root, split="val", negatives="split")
    assert all(set(i.texts[1:]) <= val_texts - {i.texts[0]} for i in same)  # --ref-negatives split
    again, _ = load_refcocog(root, split="val")
    assert [i.texts for i in again] == [i.texts for i in items]
    other, _ = load_refcocog(root, split="val", seed=1)
    assert [i.texts for i in other] != [i.texts for i in items]
    everything, _ = load_refcocog(root)
    assert {i.split for i in everything} == {"train", "val"} and len(everything) == 24


def test_refcocog_missing_refs_names_places(tmp_path):
    with pytest.raises(InputError) as e:
        load_refcocog(str(tmp_path))
    msg = str(e.value)
    assert "refs(umd).p" in msg and "refs(google).p" in msg and os.path.join(str(tmp_path), "refcocog") in msg


def test_refcocog_missing_images_counted(tmp_path):
    root = write_refcocog(str(tmp_path))
    os.remove(os.path.join(root, "train2014", "COCO_train2014_000000000003.jpg"))
    items, report = load_refcocog(root, split="val")
    assert len(items) == 6 and report["missing_images"] == 6 and report["n_missing_files"] == 1


# ---- VQAv2 -------------------------------------------------------------------------------------------------------

def test_vqav2_candidates(tmp_path):
    root = write_vqav2(str(tmp_path))
    items, report = load_vqav2(root)
    assert len(items) == 12 and report["malformed"] == 1 and "questions.json[12]" in report["warnings"][0]
    yn = items[0]
    assert yn.category == "yes/no" and yn.texts[0] == "is it red? yes" and len(yn.texts) == 10
    assert not any(t in ("is it red? no", "is it red? yes") for t in yn.texts[1:])  # annotator answers excluded
    other = items[5]
    assert other.category == "other" and other.texts[0] == "what color is it? green"
    assert "what color is it? dog" not in other.texts
    assert len(set(other.texts)) == 10 and other.split == "val"
    assert load_vqav2(root)[0][5].texts == other.texts


def test_vqav2_missing_files(tmp_path):
    with pytest.raises(InputError) as e:
        load_vqav2(str(tmp_path))
    assert "v2_mscoco_val2014_annotations.json" in str(e.value) and os.path.join(str(tmp_path), "annotations") in \
        str(e.value)


# ---- Winoground --------------------------------------------------------------------------------------------------

def test_winoground_jsonl(tmp_path):
    root = write_winoground(str(tmp_path))
    os.remove(os.path.join(root, "images", "ex_2_img_1.png"))
    items, report = load_winoground(root)
    assert [it.category for it in items] == ["Object", "Relation"]
    assert items[0].texts == ["a red circle", "a blue circle"]
    assert items[0].images[1] == os.path.join(root, "images", "ex_0_img_1.png")
    assert report["malformed"] == 1 and "examples.jsonl:4" in report["warnings"][0]
    assert report["missing_images"] == 1 and report["missing_files"] == ["ex_2_img_1.png"]


def test_winoground_missing_image_folder(tmp_path):
    with open(tmp_path / "examples.jsonl", "w") as f:
        f.write("{}\n")
    (tmp_path / "images.zip").write_bytes(b"PK")
    with pytest.raises(InputError, match="unzip"):
        load_winoground(str(tmp_path))


# ---- VL-CheckList ------------------------------------------------------------------------------------------------

def test_vlchecklist_pairs_and_categories(tmp_path):
    root = write_vlchecklist(str(tmp_path))
    items, report = load_vlchecklist(root)
    by_cat = {}
    for it in items:
        by_cat.setdefault(it.category, []).append(it)
    assert sorted(by_cat) == ["Attribute", "Relation"]
    assert len(by_cat["Attribute"]) == 2 and len(by_cat["Relation"]) == 1  # 2 (POS, NEG) pairs, one record: 1 item
    assert by_cat["Relation"][0].texts == ["ball on red table", "ball under blue table"]  # POS[0] vs NEG[0]
    assert by_cat["Attribute"][0].images == [os.path.join(root, "vg", "VG_100K", "1.jpg")]
    assert by_cat["Attribute"][0].meta["file"] == os.path.join("Attribute", "vg", "color.json")
    assert report["malformed"] == 1 and "color.json[2]" in report["warnings"][0]
    assert report["missing_images"] == 1 and report["missing_files"] == ["VG_100K/404.jpg"]


def test_vlchecklist_no_corpus(tmp_path):
    with pytest.raises(InputError) as e:
        load_vlchecklist(str(tmp_path))
    assert "Attribute/" in str(e.value) and os.path.join(str(tmp_path), "data") in str(e.value)


# ---- MS-COCO -----------------------------------------------------------------------------------------------------

def test_coco_negatives_from_other_images(tmp_path):
    root = write_coco(str(tmp_path))
    items, report = load_coco(root, n_negatives=4)
    assert len(items) == 12 and report["malformed"] == 1
    it = items[0]
    assert it.texts[0] == "a red thing number 0" and len(it.texts) == 5
    assert not any(t.startswith("a red") for t in it.texts[1:])


def test_every_loader_has_the_same_signature(tmp_path):
    for name, row in REGISTRY.items():
        params = list(inspect.signature(row.source.load).parameters.values())
        assert [p.name for p in params[:4]] == ["root", "annotations", "split", "seed"], name
        assert [p.default for p in params[1:4]] == [None, None, 0], name
        assert all(p.default is not inspect.Parameter.empty for p in params[1:]), name  # options are keywords
        assert set(row.options.values()) <= {p.name for p in params}, name               # its CLI options exist
        if name == "shapes":                       # the embedded world is written on first use instead
            continue
        with pytest.raises(InputError):
            row.source.load(str(tmp_path / "missing"), annotations=None, split=None, seed=0)


def test_shapes_world_is_written_on_first_use_and_read_as_comvg(tmp_path):
    items, report = load_shapes(str(tmp_path / "shapes"), n=4)
    assert len(items) == 12 and report["malformed"] == report["missing_images"] == 0
    assert {it.category for it in items} == {"subject", "object", "verb"}
    again, _ = load_shapes(str(tmp_path / "shapes"), n=4)            # read back, not rewritten
    assert [(i.texts, i.images) for i in again] == [(i.texts, i.images) for i in items]


# ---- the paper's items: VL-CheckList's evaluator, the official VQAv2 files, RefCOCOg's google split and masking ------


def test_vlchecklist_one_item_per_record_and_the_per_file_cap(tmp_path):
    """A SWiG record with 3 POS / 3 NEG is one item (POS[0] vs NEG[0]); the cap counts records whose image exists."""
    swig = [[f"img_{k}.jpg", {"POS": [f"a man {k}", "x", "y"], "NEG": [f"a woman {k}", "u", "v"]}] for k in range(5)]
    path = tmp_path / "data" / "Object" / "Location" / "swig_agent_center.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(swig))
    for k in (0, 2, 3, 4):                                                # img_1 missing: skipped before the cap
        image(str(tmp_path / "images" / "swig" / f"img_{k}.jpg"), "red")
    items, report = load_vlchecklist(str(tmp_path))
    assert len(items) == 4 and all(len(it.texts) == 2 for it in items)
    assert items[0].texts == ["a man 0", "a woman 0"] and items[0].category == "Object"
    assert report["missing_images"] == 1 and report["over_cap"] == 0
    capped, report = load_vlchecklist(str(tmp_path), max_per_file=2)
    assert [it.id.rsplit("[", 1)[1] for it in capped] == ["0]", "2]"] and report["over_cap"] == 2
    real = tmp_path / "real" / "data" / "Attribute" / "vaw" / "action.json"  # its ANNO_PATH, IMG_ROOT vg
    real.parent.mkdir(parents=True)
    real.write_text(open(os.path.join(FIXTURES, "vlc_action.json")).read())
    image(str(tmp_path / "real" / "vg" / "VG_100K" / "2372476.jpg"), "red")
    items, report = load_vlchecklist(str(tmp_path / "real"))
    assert [it.texts for it in items] == [["skiing slope", "snowboarding slope"]] and report["missing_images"] == 2
    assert items[0].category == "Attribute" and items[0].meta["file"] == os.path.join("Attribute", "vaw", "action.json")


def test_vqav2_paper_form_binary_is_text_to_10_images_other_is_image_to_10_texts(tmp_path):
    root = write_vqa_paper(str(tmp_path))
    items, report = load_vqav2(root, split="val")
    assert report["form"] == "paper" and report["other_lines"] == 2 and report["malformed"] == 0
    binary = [it for it in items if it.category == "yes/no"]
    other = [it for it in items if it.category == "other"]
    assert len(binary) == 13 and len(other) == 2                          # 1 real + 12 yes/no lines; 2 CSV rows
    b = binary[0]
    assert (len(b.images), len(b.texts)) == (10, 1)
    assert b.texts == ["are the suitcases for sale? the suitcases are not for sale"]
    assert os.path.basename(b.images[0]) == "COCO_val2014_000000119630.jpg"
    assert b.images[0] not in b.images[1:] and len(set(b.images[1:])) == 9  # 9 other lines' images
    o = other[0]
    assert (len(o.images), len(o.texts)) == (1, 10) and o.texts[0] == "What baseball team is on the hat? la"
    assert o.texts[9] == "What baseball team is on the hat? handlebars"
    assert os.path.basename(o.images[0]) == "COCO_val2014_000000108327.jpg"
    again, _ = load_vqav2(root)
    assert [it.images for it in again] == [it.images for it in items]     # reproducible with the seed
    assert [it.images for it in load_vqav2(root, seed=1)[0]] != [it.images for it in items]
    with pytest.raises(InputError, match="val2014 test items"):
        load_vqav2(root, split="train")
    json_form = load_vqav2(write_vqav2(str(tmp_path / "json")))[1]
    assert json_form["form"] == "json"


def test_refcocog_google_preferred_split_by_and_masking(tmp_path):
    root = write_refcocog(str(tmp_path))
    umd = load_refcocog(root, split="val")[1]
    assert umd["refs_file"] == "refs(umd).p"                              # the only one there
    with open(os.path.join(root, "refcocog", "refs(umd).p"), "rb") as f:
        refs = pickle.load(f)[:-1]
    for r in refs:
        r["split"] = "train" if r["ref_id"] < 20 else "val"               # google: another split of the same refs
    with open(os.path.join(root, "refcocog", "refs(google).p"), "wb") as f:
        pickle.dump(refs, f, protocol=2)
    items, report = load_refcocog(root, split="val")
    assert report["refs_file"] == "refs(google).p" and len(items) == 4
    assert load_refcocog(root, split="val", split_by="umd")[1]["refs_file"] == "refs(umd).p"
    with open(os.path.join(root, "refcocog", "instances.json")) as f:
        inst = json.load(f)
    inst["annotations"] = [dict(id=100 + i, image_id=i % 4 + 1, bbox=[2, 3, 8, 5]) for i in range(24)]
    with open(os.path.join(root, "refcocog", "instances.json"), "w") as f:
        json.dump(inst, f)
    masked, _ = load_refcocog(root, split="val", mask_object=True)
    from datasets import ImageCache
    two = Image.new("RGB", (16, 16), COLORS["red"])
    two.paste(COLORS["blue"], (0, 0, 16, 6))
    two.save(items[0].images[0])                                           # two colours: the mean is neither
    cache = ImageCache()                                                   # one cache: the mask is part of the key
    plain, cover = cache.get(items[0].images[0]), cache.get(masked[0].images[0])
    assert masked[0].images[0] == items[0].images[0] and masked[0].images[0].box == (2, 3, 8, 5)
    a, b = (torch.from_numpy(np.asarray(im).copy()).int() for im in (plain, cover))       # (16, 16, 3)
    assert torch.equal(a[3:8, 2:10] * 0 + b[3, 2], b[3:8, 2:10])          # the box: one colour, the image's mean
    assert (b[3, 2] - a.float().mean((0, 1))).abs().max() <= 1 and not torch.equal(a, b)
    box = torch.zeros(16, 16, dtype=torch.bool)
    box[3:8, 2:10] = True
    assert torch.equal(a[~box], b[~box])                                  # outside the box: untouched


T = torch.tensor


@pytest.mark.parametrize("name, s, flag", [
    ("comvg", [[1.], [1.]], "correct"), ("comvg", [[1.], [2.]], None), ("shapes", [[3.], [3.]], "correct"),
    ("vlchecklist", [[0.5, 0.5]], "correct"), ("vlchecklist", [[0.5, 0.4]], None),
    ("winoground", [[2., 2.], [0., 3.]], "text"), ("winoground", [[2., 1.], [2., 3.]], "image"),
    ("winoground", [[2., 1.], [0., 3.]], None), ("refcocog", [[0.5, 0.1, 0.5]], "top1"),
    ("refcocog", [[0.5, 0.1, 0.6]], None), ("vqav2", [[0.2, 0.2, 0.1]], "correct"), ("coco", [[0.9, 0.1]], None)])
def test_a_tie_is_reported_and_counted_wrong(name, s, flag):
    """`tied` finds exactly the items where a tie decides a metric: counted wrong, and right once the true
    candidates score a little higher."""
    s = T(s)
    assert datasets.tied(name, s) == (flag is not None)
    if flag:
        true = torch.eye(*s.shape) if name == "winoground" else torch.zeros_like(s).index_put_((T(0), T(0)), T(1.))
        assert not datasets.item_metrics(name, s)[flag] and datasets.item_metrics(name, s + 1e-3 * true)[flag]


def test_an_empty_folder_is_not_a_data_set(tmp_path):
    """A failed download's empty data/comvg: a bare evaluate.py still falls back to the shapes world."""
    from datasets import found_under, has_table_data
    (tmp_path / "comvg").mkdir()
    assert not has_table_data(str(tmp_path)) and found_under(str(tmp_path)) == []
    (tmp_path / "comvg" / "comvg.csv").write_text("x\n")
    assert has_table_data(str(tmp_path)) and found_under(str(tmp_path)) == [("comvg", str(tmp_path / "comvg"))]
