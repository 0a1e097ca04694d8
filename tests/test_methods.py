"""Every method (Discffusion and the baselines of §5.3 / Table 8) runs end to end through train.py and evaluate.py."""
import json
import os

import pytest

import evaluate
import train
from support import write_coco, write_refcocog, write_train_comvg, write_winoground
from tools.sd_configs import make_random_clip

METHODS = ("discffusion", "diffusion_itm", "clip_ft", "clip_prompt")


@pytest.fixture(scope="module")
def setup(tiny_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return dict(sd=tiny_sd, clip=make_random_clip(str(root / "clip")), data=write_train_comvg(str(root / "comvg"), 10),
                out=root)


@pytest.fixture(scope="module")
def trained(setup):
    """Each method trained once through train.py: {method: (its results, its checkpoint, its output folder)}."""
    runs = {}
    for method in METHODS:
        out = str(setup["out"] / f"run_{method}")
        res = train.main(["--dataset", "comvg", "--data-root", setup["data"], "--model", setup["sd"], "--clip-model",
                          setup["clip"], "--method", method, "--shots", "4", "--steps", "2", "--batch-size", "2",
                          "--output-dir", out, "--device", "cpu", "--eval-limit", "3", "--itm-timesteps", "2"])
        name = "prompt_deltas" if method == "discffusion" else f"trained_{method}"
        runs[method] = (res, os.path.join(out, f"{name}.safetensors"), out)
    return runs


@pytest.mark.parametrize("method", METHODS)
def test_train_every_method(trained, method):
    res, checkpoint, out = trained[method]
    assert res["train"]["steps"] == 2 and res["split"] == {"train": 4, "test": 3, "seed": 0, "shots": "4"}
    for key in ("zero_shot", "few_shot"):
        assert set(res[key]["metrics"]) == {"Subjects", "Objects", "Predicate", "Average"}
    saved = json.load(open(f"{out}/results.json"))
    assert saved["few_shot"]["n_items"] == 3 and saved["args"]["method"] == method
    assert os.path.isfile(checkpoint)


def test_evaluate_all_methods_side_by_side(setup, trained, capsys):
    ckpts = [arg for m in METHODS for arg in ("--checkpoint", f"{m}={trained[m][1]}")]
    out = str(setup["out"] / "all.json")
    assert evaluate.main(["--dataset", "comvg", "--data-root", setup["data"], "--model", setup["sd"], "--clip-model",
                          setup["clip"], "--methods", ",".join(METHODS), "--device", "cpu", "--limit", "4",
                          "--itm-timesteps", "2", "--output", out, *ckpts]) == 0
    printed = capsys.readouterr().out
    for method in METHODS:
        assert f"\n{method}" in printed                                   # one table row per method
    res = json.load(open(out))
    assert list(res["methods"]) == list(METHODS)
    assert all(res["methods"][m]["datasets"]["comvg"]["n_items"] == 4 for m in METHODS)
    assert all(res["methods"][m]["checkpoint"] for m in METHODS)          # each evaluated with its trained tensors
    assert res["methods"]["diffusion_itm"]["model"]["variant"] == "itm"


def test_train_on_coco_then_test_on_winoground_and_refcocog_splits(setup, tmp_path):
    """Table 8's zero-shot transfer (train on MS-COCO captions, test on Winoground) and a data set with its own
    split (RefCOCOg: shots from 'train', test on 'val') through the same train.py."""
    coco, wino, ref = tmp_path / "coco", tmp_path / "wino", tmp_path / "ref"
    for fn, root in ((write_coco, coco), (write_winoground, wino), (write_refcocog, ref)):
        root.mkdir()
        fn(str(root))
    common = ["--model", setup["sd"], "--steps", "1", "--batch-size", "2", "--device", "cpu", "--no-zero-shot"]
    res = train.main(["--dataset", "coco", "--data-root", str(coco), "--shots", "2", "--eval-dataset", "winoground",
                      "--eval-data-root", str(wino), "--output-dir", str(tmp_path / "t8"), *common])
    assert res["eval_dataset"] == "winoground" and res["split"]["train"] >= 2
    assert set(res["few_shot"]["metrics"]) == {"Text", "Image", "Group"} and res["few_shot"]["n_items"] >= 1
    res = train.main(["--dataset", "refcocog", "--data-root", str(ref), "--shots", "3", "--eval-limit", "2",
                      "--output-dir", str(tmp_path / "ref_run"), *common])
    assert res["split"]["train"] >= 3 and set(res["few_shot"]["metrics"]) == {"Top-1", "Top-5"}
