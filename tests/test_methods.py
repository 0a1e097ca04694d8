"""Every method (Discffusion and the baselines of §5.3 / Table 8) runs end to end through train.py and evaluate.py."""
import json

import pytest

import evaluate
import train
from clip_baselines import make_random_clip
from tests.test_train import write_comvg

METHODS = ("discffusion", "diffusion_itm", "clip_ft", "clip_prompt")


@pytest.fixture(scope="module")
def setup(tiny_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return dict(sd=tiny_sd, clip=make_random_clip(str(root / "clip")), data=write_comvg(str(root / "comvg"), 10),
                out=root)


@pytest.mark.parametrize("method", METHODS)
def test_train_every_method(setup, method):
    out = str(setup["out"] / f"run_{method}")
    res = train.main(["--dataset", "comvg", "--data-root", setup["data"], "--model", setup["sd"], "--clip-model",
                      setup["clip"], "--method", method, "--shots", "4", "--steps", "2", "--batch-size", "2",
                      "--output-dir", out, "--device", "cpu", "--eval-limit", "3", "--itm-timesteps", "2"])
    assert res["train"]["steps"] == 2 and res["split"] == {"train": 4, "test": 3, "seed": 0, "shots": "4"}
    for key in ("zero_shot", "few_shot"):
        assert set(res[key]["metrics"]) == {"Subjects", "Objects", "Predicate", "Average"}
    saved = json.load(open(f"{out}/results.json"))
    assert saved["few_shot"]["n_items"] == 3 and saved["args"]["method"] == method


def test_evaluate_all_methods_side_by_side(setup, capsys):
    ckpts = []
    for method in METHODS:
        name = "prompt_deltas" if method == "discffusion" else f"trained_{method}"
        path = setup["out"] / f"run_{method}" / f"{name}.safetensors"
        if path.exists():
            ckpts += ["--checkpoint", f"{method}={path}"]
    out = str(setup["out"] / "all.json")
    evaluate.main(["--dataset", "comvg", "--data-root", setup["data"], "--model", setup["sd"], "--clip-model",
                   setup["clip"], "--methods", ",".join(METHODS), "--device", "cpu", "--limit", "4",
                   "--itm-timesteps", "2", "--output", out, *ckpts])
    printed = capsys.readouterr().out
    for method in METHODS:
        assert f"\n{method}" in printed                                   # one table row per method
    res = json.load(open(out))
    assert list(res["methods"]) == list(METHODS)
    assert all(res["methods"][m]["datasets"]["comvg"]["n_items"] == 4 for m in METHODS)
    assert res["methods"]["diffusion_itm"]["model"]["variant"] == "itm"
