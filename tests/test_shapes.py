"""The shapes world (shapes.py) and the committed tiny Stable Diffusion trained on it (models/tiny-shapes-sd)."""
import ast
import csv
import hashlib
import os

import numpy as np
import pytest
from PIL import Image

import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "tiny-shapes-sd")


def digest(folder):
    """sha256 over the csv and every image, by name."""
    h = hashlib.sha256()
    for rel in ["comvg.csv"] + sorted(os.path.join("images", f) for f in os.listdir(os.path.join(folder, "images"))):
        h.update(rel.encode())
        with open(os.path.join(folder, rel), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes"))
    shapes.write_comvg(out, n=8, seed=3)
    return out


def rows(folder):
    with open(os.path.join(folder, "comvg.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_deterministic(world, tmp_path):
    shapes.write_comvg(str(tmp_path / "again"), n=8, seed=3)
    shapes.write_comvg(str(tmp_path / "other"), n=8, seed=4)
    assert digest(world) == digest(str(tmp_path / "again"))
    assert digest(world) != digest(str(tmp_path / "other"))
    a, b = shapes.training_pairs(5, seed=1), shapes.training_pairs(5, seed=1)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]


def test_comvg_format(world):
    with open(os.path.join(world, "comvg.csv")) as f:
        assert f.readline().strip() == "id,sentence,pos_triplet,neg_triplet,pos_image_id,neg_image_id,neg_value"
    rs = rows(world)
    assert [r["neg_value"] for r in rs] == ["subject"] * 8 + ["object"] * 8 + ["verb"] * 8
    assert len({r["pos_image_id"] for r in rs} | {r["neg_image_id"] for r in rs}) == 2 * len(rs)
    slot = {"subject": 0, "verb": 1, "object": 2}
    for r in rs:
        pos, neg = tuple(r["pos_triplet"].split(",")), ast.literal_eval(r["neg_triplet"])
        assert r["sentence"] == shapes.caption(pos)
        assert [i for i in range(3) if pos[i] != neg[i]] == [slot[r["neg_value"]]]  # exactly the declared slot
        assert pos[0] != pos[2] and neg[0] != neg[2]
        for key in ("pos_image_id", "neg_image_id"):
            im = Image.open(os.path.join(world, "images", r[key] + ".jpg"))
            assert im.format == "JPEG" and im.size == (32, 32) and im.mode == "RGB"


def centroid(img, rgb):
    """Centre (x, y) of the pixels close to a colour."""
    d = np.abs(np.asarray(img, np.int32) - np.array(rgb)).sum(-1)
    ys, xs = np.nonzero(d < 90)
    return xs.mean(), ys.mean()


def test_images_show_their_scene(world):
    """Where subject and object colours differ, the colours' centroids stand in the stated relation."""
    checked = 0
    for r in rows(world):
        for key, scene in (("pos_image_id", r["pos_triplet"].split(",")), ("neg_image_id", ast.literal_eval(r["neg_triplet"]))):
            subj, rel, obj = scene
            if subj.split()[0] == obj.split()[0]:
                continue
            img = Image.open(os.path.join(world, "images", r[key] + ".jpg"))
            (sx, sy), (ox, oy) = (centroid(img, shapes.COLORS[n.split()[0]]) for n in (subj, obj))
            dx, dy = sx - ox, sy - oy
            assert {"left of": dx < -6, "right of": dx > 6, "above": dy < -6, "below": dy > 6}[rel], (r, key)
            assert (abs(dx) > abs(dy)) == (rel in ("left of", "right of")), (r, key)
            checked += 1
    assert checked > 20


def test_loader_reads_it(world):
    from datasets import load_comvg
    items, report = load_comvg(world)
    assert len(items) == 24 and {it.category for it in items} == {"subject", "object", "verb"}
    assert all(os.path.exists(p) for it in items for p in it.images)


def test_cli(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "cli"
    subprocess.run([sys.executable, os.path.join(ROOT, "shapes.py"), "--out", str(out), "--n", "2", "--seed", "3",
                    "--colors", "red,blue", "--shapes", "circle,square", "--relations", "left of,above"], check=True)
    rs = rows(str(out))
    assert len(rs) == 6 and all(set(r["sentence"].split()) <= {"a", "red", "blue", "circle", "square", "left", "of",
                                                                 "above"} for r in rs)


def test_bad_vocabulary(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, os.path.join(ROOT, "shapes.py"), "--out", str(tmp_path), "--colors", "mauve"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "mauve" in r.stderr and len(r.stderr.strip().splitlines()) == 1
