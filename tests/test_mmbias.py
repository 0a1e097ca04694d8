"""benchmarks/mmbias.py: MMBias' layout, phi, the effect size (population std, own groups), the permutation p-value
against exact enumeration, the bootstrap interval, and the bias table through evaluate."""
import itertools
import json
import os

import numpy as np
import pytest
import torch

import datasets
import evaluate
from benchmarks import mmbias
from support import image


def write_mmbias(root, pleasant=("good",), unpleasant=("bad",)):
    for cat, group, color in (("Religion", "Christian", "red"), ("Religion", "Muslim", "blue"),
                              ("Religion", "Jewish", "green")):
        for k in range(2):
            image(os.path.join(root, "data", "Images", cat, group, f"{k}.jpg"), color)
    with open(os.path.join(root, "data", "Images", "Religion", "Christian", "notes.txt"), "w") as f:
        f.write("not an image")
    json.dump({"pleasant_phrases": list(pleasant), "unpleasant_phrases": list(unpleasant)},
              open(os.path.join(root, "textual_phrases.txt"), "w"))
    return root


def test_layout_items_and_bad_phrase_files(tmp_path):
    root = write_mmbias(str(tmp_path / "mmbias"), ("nice", "kind"), ("awful", "cruel"))
    items, report = mmbias.load(root)
    assert len(items) == 6 and {it.category for it in items} == {"Christian", "Muslim", "Jewish"}
    assert items[0].texts == ["nice", "kind", "awful", "cruel"] and items[0].meta["category"] == "Religion"
    json.dump({"pleasant_phrases": ["a"], "unpleasant_phrases": ["b", "c"]},
              open(os.path.join(root, "textual_phrases.txt"), "w"))
    with pytest.raises(datasets.InputError, match="1 pleasant and 2 unpleasant"):
        mmbias.load(root)
    os.remove(os.path.join(root, "textual_phrases.txt"))
    with pytest.raises(datasets.InputError, match="textual_phrases.txt"):
        datasets.load_items("mmbias", root)


def test_phi_and_effect_size_by_hand_with_the_population_std():
    s = torch.tensor([[0.4, 0.2, 0.1, 0.3]])                     # pleasant 0.4, 0.2; unpleasant 0.1, 0.3
    assert mmbias.phi(s) == pytest.approx(0.1)
    x, y = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0])
    # mean x 2, mean y 0.5; union {1,2,3,0,1}: mean 1.4, population variance (0.16+0.36+2.56+1.96+0.16)/5 = 1.04
    assert mmbias.effect_size(x, y) == pytest.approx(1.5 / 1.04 ** 0.5)
    assert mmbias.effect_size(x, y) == pytest.approx((x.mean() - y.mean()).item() / np.concatenate([x, y]).std())


def test_each_pair_uses_its_own_groups_spread():
    phis = {"Christian": [5.0, 6.0, 7.0], "Buddhist": [0.0, 1.0], "Hindu": [1.0, 3.0], "Jewish": [2.0, 2.5]}
    recs = [(datasets.Item(f"{g}{k}", [], [], category=g), dict(phi=v)) for g, vs in phis.items()
            for k, v in enumerate(vs)]
    out = mmbias.bias_test(recs, permutations=2000, resamples=200)["bias"]
    assert set(out) == {"Christian-Jewish", "Buddhist-Christian", "Buddhist-Hindu", "Buddhist-Jewish"}
    b, h = np.array(phis["Buddhist"]), np.array(phis["Hindu"])
    assert out["Buddhist-Hindu"]["d"] == pytest.approx((b.mean() - h.mean()) / np.concatenate([b, h]).std())
    c = np.array(phis["Christian"])                              # the original's divisor, not ours
    assert out["Buddhist-Hindu"]["d"] != pytest.approx((b.mean() - h.mean()) / np.concatenate([c, h]).std())
    assert out["Buddhist-Christian"]["n_x"] == 2 and out["Buddhist-Christian"]["n_y"] == 3


def test_permutation_p_value_matches_exact_enumeration():
    x = torch.tensor([0.9, 1.4, 0.7, 1.1], dtype=torch.float64)
    y = torch.tensor([0.2, 0.8, 0.5, 0.6, 1.0], dtype=torch.float64)
    z = torch.cat([x, y])
    observed = abs(x.mean() - y.mean())
    splits = list(itertools.combinations(range(9), 4))             # all 126 relabellings
    exact = sum(abs(z[list(a)].mean() - z[[i for i in range(9) if i not in a]].mean()) >= observed - 1e-12
                for a in splits) / len(splits)
    p = mmbias.permutation_p(x, y, permutations=20000, seed=0)
    assert p == pytest.approx(exact, abs=3 * (exact * (1 - exact) / 20000) ** 0.5 + 1e-9)
    assert mmbias.permutation_p(x, y, permutations=20000, seed=0) == p          # seeded
    assert mmbias.PERMUTATIONS >= 10_000


def test_bootstrap_interval_covers_d_and_shrinks_with_more_images():
    g = torch.Generator().manual_seed(0)
    small = torch.randn(10, generator=g, dtype=torch.float64) + 1, torch.randn(10, generator=g, dtype=torch.float64)
    big = torch.randn(400, generator=g, dtype=torch.float64) + 1, torch.randn(400, generator=g, dtype=torch.float64)
    lo, hi = mmbias.bootstrap_d(*small)
    assert lo <= mmbias.effect_size(*small) <= hi
    lo2, hi2 = mmbias.bootstrap_d(*big)
    assert lo2 <= mmbias.effect_size(*big) <= hi2 and hi2 - lo2 < hi - lo


def test_the_bias_table_through_evaluate(tmp_path, monkeypatch, capsys):
    root = write_mmbias(str(tmp_path / "mmbias"))

    class Model:  # pleasant score 1 for red images, unpleasant 1 for blue: Christian > Muslim
        config = {"model": "fake"}

        def score_items(self, batch, spent=None):
            out = []
            for images, texts in batch:
                r, _, b = images[0].convert("RGB").getpixel((0, 0))
                out.append(torch.tensor([[float(r > 128), float(b > 128)]]))
            return out
    monkeypatch.setattr(evaluate.methods, "build", lambda method, args, checkpoint=None: Model())
    out = str(tmp_path / "r.json")
    assert evaluate.main(["--dataset", "mmbias", "--data-root", root, "--output", out]) == 0
    bias = json.load(open(out))["datasets"]["mmbias"]["bias"]
    assert set(bias) == {"Christian-Muslim", "Christian-Jewish", "Jewish-Muslim"}
    assert bias["Christian-Muslim"]["d"] > 0 and bias["Christian-Muslim"]["n_x"] == 2
    assert "Bias test (MMBias)" in capsys.readouterr().out
