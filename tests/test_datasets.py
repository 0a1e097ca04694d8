"""Loaders of §5.1 on tiny fixture files written in each publisher's exact format."""
import csv
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import inspect

from benchmarks.coco import load as load_coco
from benchmarks.comvg import load as load_comvg
from benchmarks.refcocog import load as load_refcocog
from benchmarks.shapes import load as load_shapes
from benchmarks.vlchecklist import load as load_vlchecklist
from benchmarks.vqav2 import load as load_vqav2
from benchmarks.winoground import load as load_winoground
from datasets import REGISTRY, InputError

COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40)}


def image(path, color, size=16):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size, size), COLORS[color]).save(path)  # the format follows the extension (.jpg -> JPEG)
    return path


# ---- fixture writers (also used by test_evaluate.py) -------------------------------------------------------------

def write_comvg(root, bad_line=True, missing=True):
    """comvg.csv: 3 good rows (subject, object, verb), optionally a short row and a row with a missing image."""
    rows = [("1", "a red circle", "circle,is,red", "circle,is,blue", "10", "11", "subject"),
            ("2", "a blue square", "square,is,blue", "square,is,green", "11", "12", "object"),
            ("3", "a green triangle", "t,is,green", "t,is,red", "12", "10", "verb")]
    if bad_line:
        rows.append(("4", "a yellow ball", "x"))                                              # line 5: short
    if missing:
        rows.append(("5", "a yellow circle", "c,is,yellow", "c,is,red", "99", "10", "subject"))  # 99.jpg missing
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "comvg.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "sentence", "pos_triplet", "neg_triplet", "pos_image_id", "neg_image_id", "neg_value"])
        w.writerows(rows)
    image(os.path.join(root, "VG_100K", "10.jpg"), "red")
    image(os.path.join(root, "VG_100K", "11.jpg"), "blue")
    image(os.path.join(root, "VG_100K_2", "12.jpg"), "green")
    return root


REF_WORDS = ["red", "green", "blue", "yellow"]


def write_refcocog(root, n=24):
    """refcocog/refs(umd).p (n refs over 4 images, splits train/val alternating, one bad ref) + instances.json."""
    refs = []
    for i in range(n):
        color = REF_WORDS[i % 4]
        refs.append(dict(ref_id=i, ann_id=100 + i, image_id=i % 4 + 1, split=("val", "train")[i % 2],
                         category_id=1, sentences=[dict(raw=f"the {color} thing {i}", sent=f"the {color} thing {i}",
                                                        tokens=["the", color], sent_id=1000 + i)]))
    refs.append(dict(ref_id=999, image_id=1, split="val"))  # malformed: no ann_id, no sentences
    os.makedirs(os.path.join(root, "refcocog"), exist_ok=True)
    with open(os.path.join(root, "refcocog", "refs(umd).p"), "wb") as f:
        pickle.dump(refs, f, protocol=2)
    images = [dict(id=k, file_name=f"COCO_train2014_{k:012d}.jpg") for k in range(1, 5)]
    with open(os.path.join(root, "refcocog", "instances.json"), "w") as f:
        json.dump(dict(images=images, annotations=[], categories=[]), f)
    for k in range(1, 5):
        image(os.path.join(root, "train2014", f"COCO_train2014_{k:012d}.jpg"), REF_WORDS[(k - 1) % 4])
    return root


def write_vqav2(root):
    """val2014 questions + annotations: 12 questions on 4 images, one question without annotation."""
    answers = ["red", "green", "blue", "yellow", "two", "three", "cat", "dog", "ball", "table", "man", "woman"]
    qs, anns = [], []
    for i in range(12):
        img = i % 4 + 1
        if i < 4:
            q, a, kind, given = "is it red?", ("yes" if img == 1 else "no"), "yes/no", ["yes", "no"]
        else:
            q, a, kind, given = "what color is it?", REF_WORDS[img - 1], "other", [REF_WORDS[img - 1], "dog"]
        qs.append(dict(image_id=img, question=q, question_id=500 + i))
        anns.append(dict(question_id=500 + i, image_id=img, answer_type=kind, multiple_choice_answer=a,
                         answers=[dict(answer=x, answer_confidence="yes", answer_id=k + 1)
                                  for k, x in enumerate(given)]))
    for x in answers:  # more frequent answers for the candidate pool (annotations of other, image-less questions)
        anns.append(dict(question_id=900 + len(anns), image_id=77, answer_type="other", multiple_choice_answer=x,
                         answers=[dict(answer=x)]))
    qs.append(dict(image_id=2, question="orphan?", question_id=12345))  # no annotation: malformed
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "v2_OpenEnded_mscoco_val2014_questions.json"), "w") as f:
        json.dump(dict(data_subtype="val2014", questions=qs), f)
    with open(os.path.join(root, "v2_mscoco_val2014_annotations.json"), "w") as f:
        json.dump(dict(data_subtype="val2014", annotations=anns), f)
    for k in range(1, 5):
        image(os.path.join(root, "val2014", f"COCO_val2014_{k:012d}.jpg"), REF_WORDS[k - 1])
    return root


def write_winoground(root, bad_line=True):
    """examples.jsonl: 3 examples (Object, Relation, Both) + optionally a broken line 4; images/*.png."""
    exs = [dict(id=0, image_0="ex_0_img_0", image_1="ex_0_img_1", caption_0="a red circle", caption_1="a blue circle",
                tag="Noun", secondary_tag="", num_main_preds=1, collapsed_tag="Object"),
           dict(id=1, image_0="ex_1_img_0", image_1="ex_1_img_1", caption_0="a green square",
                caption_1="a yellow square", tag="Adjective-Color", secondary_tag="", num_main_preds=1,
                collapsed_tag="Relation"),
           dict(id=2, image_0="ex_2_img_0", image_1="ex_2_img_1", caption_0="a blue dog", caption_1="a red dog",
                tag="Scope", secondary_tag="Symbolic", num_main_preds=2, collapsed_tag="Both")]
    colors = [("red", "blue"), ("green", "yellow"), ("red", "blue")]  # example 2 is mismatched on purpose
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "examples.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(e) for e in exs) + "\n")
        if bad_line:
            f.write('{"id": 3, "image_0": "ex_3_img_0"\n')  # line 4: truncated JSON
    for e, (c0, c1) in zip(exs, colors):
        image(os.path.join(root, "images", f"{e['image_0']}.png"), c0)
        image(os.path.join(root, "images", f"{e['image_1']}.png"), c1)
    return root


def write_vlchecklist(root):
    """data/Attribute/vg/color.json (3 records, 1 malformed), data/relation/vg/spatial.json (lowercase folder)."""
    attr = [["VG_100K/1.jpg", {"POS": ["a red ball"], "NEG": ["a blue ball"]}],
            ["VG_100K_2/2.jpg", {"POS": ["a green ball"], "NEG": ["a red ball"]}],
            ["VG_100K/1.jpg", {"POS": ["a red ball"]}]]  # index 2: no NEG
    rel = [["VG_100K/1.jpg", {"POS": ["ball on red table", "red ball"], "NEG": ["ball under blue table", "blue ball"]}],
           ["VG_100K/404.jpg", {"POS": ["a cat"], "NEG": ["a dog"]}]]  # image missing
    for rel_path, data in (("data/Attribute/vg/color.json", attr), ("data/relation/vg/spatial.json", rel)):
        os.makedirs(os.path.dirname(os.path.join(root, rel_path)), exist_ok=True)
        with open(os.path.join(root, rel_path), "w") as f:
            json.dump(data, f)
    image(os.path.join(root, "vg", "VG_100K", "1.jpg"), "red")
    image(os.path.join(root, "vg", "VG_100K_2", "2.jpg"), "green")
    return root


def write_coco(root):
    images = [dict(id=k, file_name=f"COCO_train2014_{k:012d}.jpg") for k in range(1, 5)]
    anns = [dict(image_id=k, id=10 * k + j, caption=f"a {REF_WORDS[k - 1]} thing number {j}")
            for k in range(1, 5) for j in range(3)]
    anns.append(dict(image_id=1, id=999))  # no caption
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", "captions_train2014.json"), "w") as f:
        json.dump(dict(images=images, annotations=anns), f)
    for k in range(1, 5):
        image(os.path.join(root, "train2014", f"COCO_train2014_{k:012d}.jpg"), REF_WORDS[k - 1])
    return root


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

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "download")


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


def write_vqa_paper(root, n_binary=12):
    """The official code's test.txt (real lines of its format) and vqa_text_test.csv (its real first rows)."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(FIXTURES, "test.txt")) as f:
        real = f.read().splitlines()
    lines = [f"COCO_val2014_{100 + k:012d}.jpg*The question is asking about yes or no: is it {k}? it is {k}"
             for k in range(n_binary)]
    with open(os.path.join(root, "test.txt"), "w") as f:
        f.write("\n".join(real + lines) + "\n")
    with open(os.path.join(FIXTURES, "vqa_text_test.csv")) as f:
        (tmp := os.path.join(root, "vqa_text_test.csv")) and open(tmp, "w").write(f.read())
    names = [l.split("*")[0] for l in real + lines] + ["COCO_val2014_000000108327.jpg"]
    for k, name in enumerate(names):
        image(os.path.join(root, "val2014", name), REF_WORDS[k % 4])
    return root


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
