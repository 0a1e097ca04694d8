"""tools/figures.py (Fig. 7, 8, 10): each figure writes a non-blank PNG of its size and a JSON of the numbers behind it."""
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

import common
from benchmarks import shapes
from tools import cli, figures

CAPTION = "a red circle left of a blue square"


def read_png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), im.size


def assert_picture(path, size):
    pixels, got = read_png(path)
    assert got == tuple(round(v * figures.DPI) for v in size)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10   # not blank: many colours


@pytest.fixture(scope="module")
def deltas_file(random_deltas):
    return random_deltas(scale=0.05, seed=3, lam=4.0)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    g = torch.Generator().manual_seed(1)
    path = tmp_path_factory.mktemp("img") / "pic.png"
    Image.fromarray((torch.rand(20, 24, 3, generator=g) * 255).byte().numpy()).save(path)  # 24 wide, 20 high
    return str(path)


def test_to_grid_puts_a_token_where_it_lies():
    """All mass on image token k of a 4x4 layer: the brightest cell of the 16x16 grid is inside k's 4x4 region."""
    for k in range(16):
        amap = torch.zeros(16)
        amap[k] = 1.0
        grid = figures.to_grid(amap, 16)                                         # (16, 16)
        r, c = divmod(int(grid.argmax()), 16)
        assert (r // 4, c // 4) == divmod(k, 4)
    batch = torch.rand(3, 5, 64)
    assert figures.to_grid(batch, 8).shape == (3, 5, 8, 8) and torch.equal(figures.to_grid(batch, 8),
                                                                            batch.reshape(3, 5, 8, 8))
    with pytest.raises(ValueError):
        figures.to_grid(torch.rand(12), 8)


def test_attention_figure_on_a_tiny_random_model(tiny_sd, deltas_file, image_file, tmp_path):
    from discffusion import Discffusion
    texts = ["a red circle", "a dog"]
    argv = ["attention", "--model", tiny_sd, "--checkpoint", deltas_file, "--image", image_file, "--out",
            str(tmp_path)] + [a for t in texts for a in ("--text", t)]
    assert cli.run_cli(figures.main, argv) == 0
    rec = json.loads((tmp_path / "fig10_attention.json").read_text())
    assert rec["lam"] == 4.0                                      # the scorer lambda the deltas were saved with
    assert [p["words"] for p in rec["pairs"]] == [["a", "red", "circle"], ["a", "dog"]]
    # the scores in the titles are the model's own, before and after the deltas
    model = Discffusion.from_pretrained(tiny_sd, device="cpu", lam=4.0)
    image = Image.open(image_file)
    before = model.score([image], texts)[0]
    model.load_trained(deltas_file)
    after = model.score([image], texts)[0]
    for j, p in enumerate(rec["pairs"]):
        assert p["stages"]["before"]["score"] == pytest.approx(float(before[j]), abs=1e-5)
        assert p["stages"]["after"]["score"] == pytest.approx(float(after[j]), abs=1e-5)
        for stage in ("before", "after"):
            maps = np.array(p["stages"][stage]["maps"])     # (n_words, G, G)
            assert maps.shape == (len(p["words"]), 8, 8) and (maps >= 0).all()
            assert (maps.sum(0) <= 1 + 1e-4).all()                # a token's share of each image token's attention
    assert not np.allclose(rec["pairs"][0]["stages"]["before"]["maps"],
                           rec["pairs"][0]["stages"]["after"]["maps"])
    ncols = 1 + 3
    assert_picture(tmp_path / "fig10_attention.png", figures.blocks_figsize(ncols, [4]))
    groups = sorted(rec["grid_sides"])
    assert groups == ["down_blocks", "mid_block", "up_blocks"]
    grec = json.loads((tmp_path / "fig10_groups.json").read_text())
    assert [p["text"] for p in grec["pairs"]] == texts
    for stage in ("before", "after"):
        assert sorted(grec["pairs"][0]["maps"][stage]) == groups
        assert np.array(grec["pairs"][0]["maps"][stage]["mid_block"]).shape == (3, 8, 8)
    # one block per caption: rows down / mid / up, each before and after
    assert_picture(tmp_path / "fig10_groups.png", figures.blocks_figsize(ncols, [6, 6]))


def test_deltas_figure_norms_are_the_files(deltas_file, tiny_sd, tmp_path):
    png, js = figures.deltas_figure(deltas_file, str(tmp_path), model=tiny_sd)
    rec = json.loads(open(js).read())
    meta, tensors = common.read_checkpoint(deltas_file)
    assert rec["layers"] == meta["layers"]
    for name in meta["layers"]:
        assert rec["per_layer"][name]["norm_k"] == pytest.approx(float(torch.linalg.norm(tensors[f"delta_k.{name}"])))
        assert rec["per_layer"][name]["norm_v"] == pytest.approx(float(torch.linalg.norm(tensors[f"delta_v.{name}"])))
        assert 0 < rec["per_layer"][name]["rel_norm_k"] < 10
    n = sum(t.numel() for k, t in tensors.items() if k.startswith("delta_k."))
    assert sum(rec["histogram"]["counts"]["p_k"]) == n == rec["entries"]["p_k"]["n"]
    assert_picture(png, (16, 4.8))


def test_curves_figure_losses_are_the_results(tmp_path):
    paths = []
    for run, n in (("a", 30), ("b", 50)):
        rng = random.Random(run)
        hist = [{"step": s + 1, "loss": rng.random(), "train_acc": rng.choice([0, 0.5, 1])} for s in range(n)]
        (tmp_path / run).mkdir()
        path = tmp_path / run / "results.json"
        path.write_text(json.dumps({"args": {"loss": "margin"}, "train": {"history": hist},
                                    "few_shot": {"metrics": {"Subjects": 70.0, "Average": 80.0}}}))
        paths.append(str(path))
    out = tmp_path / "out"
    out.mkdir()
    assert cli.run_cli(figures.main, ["curves", *paths, "--out", str(out)]) == 0
    rec = json.loads((out / "fig7_curves.json").read_text())
    for run, path in zip(rec["runs"], paths):
        hist = json.loads(open(path).read())["train"]["history"]
        assert run["loss"] == [h["loss"] for h in hist] and run["train_acc"] == [h["train_acc"] for h in hist]
    assert [r["label"] for r in rec["runs"]] == ["a", "b"]
    assert rec["runs"][0]["test"] == {"few_shot": {"metric": "Average", "percent": 80.0}}
    assert_picture(out / "fig7_curves.png", (13, 4.8))


def test_named_shape_share_of_a_map_on_the_subject():
    """A word map with all its mass on the subject's pixels: on_named 1 for the subject words, 0 for the object's."""
    scene = ("red circle", "left of", "blue square")
    image = shapes.render(scene, random.Random(0), size=32)
    item = type("Item", (), {"meta": {"pos_triplet": ",".join(scene)}})()
    red = figures.colour_mask(image, shapes.COLORS["red"], 16)                  # (16, 16) covered fractions
    inside = (red > 0.99).float()                                               # cells wholly on the red circle
    assert inside.sum() > 0
    words = CAPTION.split()
    entry = {"words": words, "maps": {"all": inside.expand(len(words), 16, 16)}}
    got = figures.named_shape_shares(item, image, entry)
    assert got["1:red"]["on_named"] == pytest.approx(1) and got["2:circle"]["on_shapes"] == pytest.approx(1)
    assert got["6:blue"]["on_named"] == pytest.approx(0)
    assert figures.neg_caption(type("Item", (), {"meta": {"neg_triplet": str(scene)}})()) == CAPTION


@pytest.mark.parametrize("argv, says", [
    (["deltas", "no/such.safetensors"], "does not exist"),
    (["curves", "no/results.json"], "does not exist"),
    (["attention", "--image", "x.png"], "--image and --text"),
    (["attention", "--image", "no.png", "--text", "a"], "image no.png does not exist"),
    (["attention", "--model", "./nowhere", "--image", "IMG", "--text", "a"], "neither a local diffusers folder"),
])
def test_bad_input_is_one_error_line(argv, says, image_file, tmp_path, capsys):
    argv = [image_file if a == "IMG" else a for a in argv] + ["--out", str(tmp_path)]
    assert cli.run_cli(figures.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0]


def test_curves_without_history_is_an_error(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"few_shot": {}}))
    assert cli.run_cli(figures.main, ["curves", str(path), "--out", str(tmp_path)]) == 2
    assert "no training history" in capsys.readouterr().err
