"""The shapes world (tools/shapes.py) and the committed tiny Stable Diffusion trained on it (models/tiny-shapes-sd)."""
import ast
import csv
import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from benchmarks import shapes
from benchmarks.comvg import load as load_comvg

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
    items, report = load_comvg(world)
    assert len(items) == 24 and {it.category for it in items} == {"subject", "object", "verb"}
    assert all(os.path.exists(p) for it in items for p in it.images)


def test_cli(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "tools.shapes", "--out", str(out), "--n", "2", "--seed", "3",
                    "--colors", "red,blue", "--shapes", "circle,square", "--relations", "left of,above"], cwd=ROOT,
                   check=True)
    rs = rows(str(out))
    assert len(rs) == 6 and all(set(r["sentence"].split()) <= {"a", "red", "blue", "circle", "square", "left", "of",
                                                                 "above"} for r in rs)


def test_bad_vocabulary(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "tools.shapes", "--out", str(tmp_path), "--colors", "mauve"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "mauve" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---- the committed model -------------------------------------------------------------------------------------------

def test_model_folder_is_diffusers_layout():
    import json
    from families.loading import load_components
    with open(os.path.join(MODEL, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert part in index and os.path.isdir(os.path.join(MODEL, part))
    parts = load_components(MODEL, None)                                         # each part's stock from_pretrained
    unet, vae, text_encoder, tok, sched = (parts[k] for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"))
    assert sched.config.num_train_timesteps == 1000 and sched.config.prediction_type == "epsilon"
    assert unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1) == 32
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    assert vae.config.scaling_factor != 0.18215  # calibrated on the shapes latents
    for word in shapes.words():  # every word of the world is one token
        assert len(tok(word).input_ids) == 3, word
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(MODEL) for f in fs)
    assert size < 20e6


def test_model_loads_through_discffusion():
    from discffusion import Discffusion
    model = Discffusion.from_pretrained(MODEL, device="cpu")
    assert model.resolution == 32
    # its tokenizer pads on the left (pretrain_shapes.shapes_tokenizer); the mask is the caption's words wherever
    # the padding sits: 8 words, each one token, at the end of the 16 positions just before EOS
    assert model.tokenizer.padding_side == "left"
    _, mask = model.encode_texts(["a red circle left of a blue square"])
    assert mask[0].tolist() == [False] * 7 + [True] * 8 + [False]
    img = Image.new("RGB", (32, 32), shapes.BACKGROUND)
    s = model.score([img, img], ["a red circle left of a blue square", "a green square above a yellow circle"])
    assert s.shape == (2, 2) and bool(s.isfinite().all())


def test_zero_shot_diffusion_itm_well_above_chance(tmp_path):
    """Zero-shot DiffusionITM on a fixed split of subject and object swaps (seed 123, 48 items, 10 timesteps).

    A scorer that ignores the text, the image or the unconditional term scores near 0.5; the committed model scores
    0.85 here, and 0.70 (34 of 48; P < 0.003 for a coin) cannot be passed by chance."""
    from baselines.diffusion_itm import DiffusionITM
    shapes.write_comvg(str(tmp_path), n=24, seed=123)
    items = [it for it in load_comvg(str(tmp_path))[0] if it.category in ("subject", "object")]
    m = DiffusionITM.from_pretrained(MODEL, device="cpu", n_timesteps=10, pairs_per_call=64)
    out = m.score_items([([Image.open(p) for p in it.images], it.texts) for it in items])
    acc = float(np.mean([float(s[0, 0] > s[1, 0]) for s in out]))
    assert acc >= 0.70, acc


def test_pretraining_is_reproducible(tmp_path):
    """Two tiny runs of tools/pretrain_shapes.py with one seed write identical weights, in diffusers layout."""
    from tools import pretrain_shapes
    from families.loading import load_components
    args = ["--images", "32", "--vae-steps", "2", "--vae-batch", "4", "--steps", "2", "--batch", "4", "--grid", "",
            "--threads", "1"]
    for run in ("a", "b"):
        pretrain_shapes.main(["--out", str(tmp_path / run)] + args)
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        assert (tmp_path / "a" / part).read_bytes() == (tmp_path / "b" / part).read_bytes(), part
    assert set(load_components(str(tmp_path / "a"), None)) == {"tokenizer", "text_encoder", "vae", "unet", "scheduler"}


def test_embedded_default_runs_end_to_end(tmp_path, capsys):
    """`train.py --dataset shapes` then `evaluate.py --dataset shapes`, with only the paths and the length cut short:
    the world is written on first use, the committed model is the default, and both print the Discffusion and
    DiffusionITM rows."""
    import json
    import evaluate
    import train
    data, run = str(tmp_path / "shapes"), str(tmp_path / "run")
    res = train.main(["--dataset", "shapes", "--data-root", data, "--output-dir", run, "--steps", "2",
                      "--eval-limit", "4", "--itm-timesteps", "2"])
    assert os.path.exists(os.path.join(data, "comvg.csv"))                       # written on first use
    assert os.path.samefile(res["args"]["model"], MODEL)                         # the committed model by default
    assert res["split"]["train"] == 60 and res["train"]["steps"] == 2
    assert set(res["compare"]) == {"diffusion_itm"}
    out = capsys.readouterr().out
    for row in ("discffusion zero-shot", "discffusion few-shot", "diffusion_itm zero-shot"):
        assert row in out, row
    deltas = os.path.join(run, "prompt_deltas.safetensors")
    results = str(tmp_path / "results.json")
    assert evaluate.main(["--dataset", "shapes", "--data-root", data, "--limit", "4", "--itm-timesteps", "2",
                          "--checkpoint", deltas, "--methods", "discffusion", "--output", results]) == 0
    with open(results) as f:
        ours = json.load(f)
    assert ours["model"]["lam"] == res["model"]["lam"] == 100.0                 # the shapes lambda, in both scripts
    ours = ours["datasets"]["shapes"]
    assert ours["n_items"] == 4
    few = res["few_shot"]["metrics"]                                             # the same deltas, the same 4 items
    assert ours["metrics"] == few
