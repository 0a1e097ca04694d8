"""tools/failures.py (App. I, Fig. 11): the most negative margins, drawn with the evaluated scores."""
import json

import numpy as np
import pytest

import evaluate
from tools import failures


def test_failures_draws_the_most_negative_margins_with_the_evaluated_scores(tiny_sd, deltas_file, tmp_path):
    res = tmp_path / "results.json"
    assert evaluate.main(["--dataset", "shapes", "--data-root", str(tmp_path / "shapes"), "--model", tiny_sd,
                          "--methods", "discffusion", "--checkpoint", deltas_file, "--limit", "8", "--levels",
                          "0.5", "--device", "cpu", "--output", str(res)]) == 0
    assert failures.main([str(res), "-n", "3", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "fig11_failures.json").read_text())
    items = json.loads(res.read_text())["datasets"]["shapes"]["items"]
    margins = sorted(it["scores"][0][0] - it["scores"][1][0] for it in items)[:3]
    assert [f["margin"] for f in rec["failures"]] == pytest.approx(margins)
    for f in rec["failures"]:                                                  # same model, options and deltas
        assert f["redrawn_scores"] == pytest.approx([f["evaluated_scores"][0][0], f["evaluated_scores"][1][0]],
                                                    rel=1e-4, abs=1e-6)
        assert np.asarray(f["maps"]["positive"]).shape[0] == len(f["words"])
    assert (tmp_path / "fig11_failures.png").exists()
    assert failures.main([str(tmp_path / "missing.json")]) == 2
