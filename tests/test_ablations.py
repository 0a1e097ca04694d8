"""tools/ablations.py (Fig. 3-6, Tables 5, 7, 11): a sweep's points equal the evaluate.py calls they stand for, intervals
hold their point, derived deltas files keep exactly the scored layers, figures are drawn, training runs are reused,
bad input is one error line."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import methods
from common import read_checkpoint, save_tensors
from tools import ablations


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shapes"))          # the loader writes the shapes world there on first use


@pytest.fixture(scope="module")
def deltas(random_deltas):
    return random_deltas(scale=1.0, seed=0)


def cli(tiny_sd, root, tmp_path, *extra):
    return list(extra) + ["--model", tiny_sd, "--data-root", root, "--device", "cpu", "--limit", "6",
                          "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")]


def evaluate_py(tmp_path, *argv):
    out = str(tmp_path / "evaluate.json")
    assert evaluate.main(list(argv) + ["--device", "cpu", "--methods", "discffusion", "--output", out]) == 0
    return json.load(open(out))["datasets"]["shapes"]


def test_two_point_sweep_equals_evaluate_py_and_intervals_hold_the_point(tiny_sd, shapes_root, deltas, tmp_path):
    done = ablations.run(ablations.parse_args(cli(tiny_sd, shapes_root, tmp_path, "fig4", "--checkpoint", deltas)))
    points = dict(done["fig4"]["points"])
    assert list(points) == ["plain average", "dynamic weighting"]
    meta, tensors = read_checkpoint(deltas)                     # the plain average, written here independently
    plain = str(tmp_path / "plain.safetensors")
    save_tensors(plain, {k: torch.zeros_like(t) if k.startswith("head_logits.") else t for k, t in tensors.items()},
                 meta)
    base = ["--dataset", "shapes", "--model", tiny_sd, "--data-root", shapes_root, "--limit", "6"]
    for label, ckpt in (("dynamic weighting", deltas), ("plain average", plain)):
        got = evaluate_py(tmp_path, *base, "--checkpoint", ckpt)
        assert got["metrics"] == points[label]["metrics"] and got["counts"] == points[label]["counts"]
        assert points[label]["n_items"] == got["n_items"] == 6
    for _, p in points.items():
        for col, value in p["metrics"].items():
            if value is not None:
                low, high = p["ci"][col]
                assert low <= value <= high
        assert p["interval"] == p["ci"]["Average"] and p["accuracy"] == p["metrics"]["Average"]
    data = json.load(open(tmp_path / "out" / "fig4.json"))
    assert [label for label, _ in data["points"]] == list(points)
    assert Image.open(tmp_path / "out" / "fig4.png").size == ablations.SIZES["fig4"]


def test_zero_shot_layer_points_equal_evaluate_py(tiny_sd, shapes_root, tmp_path):
    runner = ablations.Runner(ablations.parse_args(cli(tiny_sd, shapes_root, tmp_path, "fig3", "--zero-shot")))
    p = runner.point(layers=2)
    got = evaluate_py(tmp_path, "--dataset", "shapes", "--model", tiny_sd, "--data-root", shapes_root, "--limit", "6",
                      "--layers", "2")
    assert got["metrics"] == p["metrics"] and p["config"]["n_layers"] == 2 and p["checkpoint"] is None
    assert runner.point(layers=2) is p                          # the same configuration is scored once


def test_derived_deltas_keep_the_scored_layers(tiny_sd, shapes_root, deltas, tmp_path):
    runner = ablations.Runner(ablations.parse_args(cli(tiny_sd, shapes_root, tmp_path, "fig3", "--checkpoint", deltas)))
    meta, full = read_checkpoint(deltas)
    sub = runner.derived(deltas, last=2)
    sub_meta, kept = read_checkpoint(sub)
    assert sub_meta["layers"] == meta["layers"][-2:]
    assert set(kept) == {f"{kind}.{n}" for n in meta["layers"][-2:] for kind in ("delta_k", "delta_v", "head_logits")}
    assert all(torch.equal(kept[k], full[k]) for k in kept)
    model = methods.build("discffusion", ablations.evaluate.build_parser().parse_args(
        ["--dataset", "shapes", "--model", tiny_sd, "--device", "cpu", "--layers", "2"]), sub)
    name = meta["layers"][-1]
    assert torch.equal(model.capture.deltas.k[name.replace(".", "_")], full[f"delta_k.{name}"])
    plain = read_checkpoint(runner.derived(deltas, plain_heads=True))[1]
    assert set(plain) == set(full)
    assert all(torch.equal(plain[k], torch.zeros_like(t) if k.startswith("head_logits.") else t)
               for k, t in full.items())


def test_training_sweep_trains_once_per_point_and_reuses_runs(tiny_sd, shapes_root, tmp_path):
    argv = cli(tiny_sd, shapes_root, tmp_path, "table5", "--shots", "8", "--steps", "1")
    table = ablations.run(ablations.parse_args(argv))["table5"]
    runs = sorted(table["training"])
    assert [os.path.basename(os.path.dirname(r)) for r in runs] == ["margin-shots1-steps1", "margin-shots8-steps1"]
    assert [methods.recorded_options(r)["shots"] for r in runs] == ["1", "8"]
    stamps = [os.path.getmtime(r) for r in runs]
    again = ablations.run(ablations.parse_args(argv))["table5"]
    assert [os.path.getmtime(r) for r in runs] == stamps        # reused, not retrained
    assert [p["metrics"] for _, p in again["points"]] == [p["metrics"] for _, p in table["points"]]
    assert "Extreme few-shot (1)" in open(tmp_path / "out" / "table5.txt").read()


def test_extreme_shots_is_a_tenth():
    assert ablations.extreme_shots("0.05") == "0.005" and ablations.extreme_shots("60") == "6"
    assert ablations.extreme_shots("5") == "1"
    assert ablations.even_levels(4) == "0.2,0.4,0.6,0.8" and ablations.even_levels(1) == "0.5"


def point(acc, low, high, seconds=0.5):
    return {"accuracy": acc, "interval": [low, high], "seconds_per_item": seconds}


@pytest.mark.parametrize("name", sorted(ablations.FIGURES))
def test_each_figure_writes_a_png_of_its_size_and_the_json(name, tmp_path):
    labels = {"fig3": ["1", "2", "3", "all (7)"], "fig4": ["plain average", "dynamic weighting"],
              "fig5": ["cosine", "max", "LogSumExp", "level 0.4", "level 0.8", "ensemble"],
              "fig6": ["1", "2", "4", "8"]}[name]
    pts = [[label, point(50 + 5 * i, 40 + 5 * i, 60 + 5 * i, 0.2 * (i + 1))] for i, label in enumerate(labels)]
    data = dict(title=f"{name} test", metric="Average", chance=50.0, points=pts)
    path = ablations.write_figure(name, data, str(tmp_path))
    im = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert Image.open(path).size == ablations.SIZES[name]
    assert im.std() > 10 and (im < 128).mean() > 0.01           # drawn, not blank
    assert json.load(open(tmp_path / f"{name}.json")) == data


@pytest.mark.parametrize("argv, says", [(["fig9"], "unknown sweep"), (["table11", "--zero-shot"], "drop --zero-shot"),
                                        (["--checkpoint", "nowhere.safetensors"], "does not exist"),
                                        (["fig3", "--zero-shot", "--checkpoint", "x"], "drop --checkpoint")])
def test_bad_input_is_one_error_line(argv, says, capsys):
    assert ablations.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0]
