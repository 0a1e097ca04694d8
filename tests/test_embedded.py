"""benchmarks/embedded.py and `evaluate.py --suite`: the shapes world in every suite task's published format, read by
the task's own loader; one table per suite, one row per method, the bias table; real data found by folder."""
import json
import os

import pytest
import torch

import datasets
import evaluate
from benchmarks import embedded
from support import FakeModel, image, write_top10


@pytest.mark.parametrize("name", sorted({n for s in datasets.SUITES.values() for n in s
                                         if datasets.REGISTRY[n].embedded}))
def test_each_instance_is_written_once_and_read_by_its_loader(name, tmp_path):
    root = str(tmp_path / name)
    options = embedded.write(datasets.REGISTRY[name].embedded, root)
    items, report = datasets.load_items(name, root, **options)
    assert items and report["malformed"] == report["missing_images"] == 0
    assert all(os.path.realpath(p).startswith(os.path.realpath(root)) for it in items for p in it.images)
    stamp = {f: os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs}
    again = embedded.write(datasets.REGISTRY[name].embedded, root)           # present: not written again
    assert again.keys() == options.keys()
    assert stamp == {f: os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs}
    second, _ = datasets.load_items(name, root, **again)
    assert [(i.texts, list(map(str, i.images))) for i in second] == [(i.texts, list(map(str, i.images)))
                                                                     for i in items]


def test_true_candidates_are_true_in_the_world(tmp_path):
    """The written captions say what the images show: the first text names the true image's scene."""
    root = str(tmp_path / "vgr")
    embedded.write(embedded.aro_relation, root)
    recs = json.load(open(os.path.join(root, "visual_genome_relation.json")))
    assert all(r["true_caption"] != r["false_caption"] and sorted(r["true_caption"].split()) ==
               sorted(r["false_caption"].split()) for r in recs)                  # the same words, swapped
    assert embedded.tag("a red circle left of a blue square") == [
        ("a", "DT"), ("red", "JJ"), ("circle", "NN"), ("left", "RB"), ("of", "IN"), ("a", "DT"), ("blue", "JJ"),
        ("square", "NN")]


def test_suite_offline_prints_one_table_per_suite_and_the_bias_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluate.methods, "build", lambda method, args, checkpoint=None: FakeModel())
    assert evaluate.main(["--suite", "gdbench", "--output", "r.json"]) == 0
    printed = capsys.readouterr().out
    res = json.load(open("r.json"))
    assert set(res["datasets"]) == set(datasets.SUITES["gdbench"])
    assert list(res["methods"]) == ["discffusion", "diffusion_itm"]            # no CLIP offline
    assert set(res["tables"]) == {"gdbench", "gdbench_parts"}
    assert "Flickr30K image retrieval" in res["tables"]["gdbench"]
    assert set(res["tables"]["gdbench_parts"]) == {"SVO-Probes", "CLEVR"}
    assert "GDBench (Krojer et al., 2023)" in printed and "Bias test (MMBias)" in printed
    assert list(res["datasets"]["mmbias"]["bias"]) == ["Blue-Red"]             # pleasant colour first
    assert os.path.isdir(os.path.join("data", "embedded_gdbench", "flickr30k"))


def test_suite_on_real_data_takes_what_is_found_and_counts_what_is_not(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    write_top10(str(data / "flickr30k"), image(str(tmp_path / "o.jpg"), "red"))
    monkeypatch.setattr(evaluate.methods, "build", lambda method, args, checkpoint=None: FakeModel())
    out = str(tmp_path / "r.json")
    assert evaluate.main(["--suite", "gdbench", "--data-root", str(data), "--output", out,
                          "--methods", "discffusion,clip"]) == 0
    res = json.load(open(out))
    assert set(res["datasets"]) == {"flickr30k", "flickr30k_text"}            # found in data/flickr30k
    assert "flickr30k_order" in res["skipped"] and "flickr30k_val.json" in res["skipped"]["flickr30k_order"]
    assert "flickr30k_order: skipped" in capsys.readouterr().out
    with pytest.raises(datasets.InputError, match="invalid choice"):
        evaluate.build_parser().parse_args(["--suite", "nope"])
    assert evaluate.main(["--suite", "compositional", "--data-root", str(tmp_path / "none")]) == 2


def test_tie_rules_through_evaluate_items():
    items = [datasets.Item("a", ["x.jpg"], ["t0", "t1"]), datasets.Item("b", ["x.jpg"], ["t0", "t1"])]

    class Tie:
        def score_items(self, batch, spent=None):
            return [torch.tensor([[0.5, 0.5]]), torch.tensor([[0.6, 0.5]])][:len(batch)]
    import evaluate as ev
    orig = ev.ImageCache.load
    ev.ImageCache.load = lambda self, paths: [None]
    try:
        strict = ev.evaluate_items(Tie(), "vg_attribution", items, pairs=4)
        first = ev.evaluate_items(Tie(), "vg_attribution", items, pairs=4, ties="first")
    finally:
        ev.ImageCache.load = orig
    assert strict["metrics"]["Accuracy"] == 50.0 and strict["ties"] == 1
    assert first["metrics"]["Accuracy"] == 100.0 and first["tie_rule"] == "first"


def test_the_suite_runs_the_real_scorers_on_a_tiny_model(tmp_path, tiny_sd, monkeypatch):
    """Every task type through Discffusion and DiffusionITM themselves (one item each): cropped regions, 10-image
    and 10-text retrieval, 5-way order sets, the bias set; finite scores of each item's shape."""
    monkeypatch.chdir(tmp_path)
    assert evaluate.main(["--suite", "gdbench", "--model", tiny_sd, "--device", "cpu", "--levels", "0.5",
                          "--itm-timesteps", "2", "--limit", "1", "--output", "r.json"]) == 0
    res = json.load(open("r.json"))
    for m in ("discffusion", "diffusion_itm"):
        for name, r in res["methods"][m]["datasets"].items():
            assert r["n_items"] == 1, (m, name)
            item = r["items"][0]
            s = torch.tensor(item["scores"])
            assert torch.isfinite(s).all() and s.numel() > 1 and (1 in s.shape or name == "winoground"), (m, name)
    assert res["methods"]["diffusion_itm"]["model"]["timesteps"] == [255, 745]      # 2 midpoints of [10, 990)


def test_a_bare_run_skips_a_set_that_only_shares_another_sets_folder(tmp_path, monkeypatch):
    """data/flickr30k/ with the top-10 lists only: flickr30k and flickr30k_text run, flickr30k_order (whose folder
    it also is) is skipped and counted, not an error ending the run."""
    data = tmp_path / "data"
    write_top10(str(data / "flickr30k"), image(str(tmp_path / "o.jpg"), "red"))
    monkeypatch.setattr(evaluate.methods, "build", lambda method, args, checkpoint=None: FakeModel())
    out = str(tmp_path / "r.json")
    assert evaluate.main(["--data-root", str(data), "--output", out]) == 0
    res = json.load(open(out))
    assert set(res["datasets"]) == {"flickr30k", "flickr30k_text"} and list(res["skipped"]) == ["flickr30k_order"]
    assert evaluate.main(["--dataset", "flickr30k_order", "--data-root", str(data / "flickr30k")]) == 2


def test_more_distinct_scenes_than_the_world_has_is_one_line():
    """The image-retrieval instance asks for 10 distinct scenes per item; beyond the world's 144 it says so (it would
    otherwise draw forever)."""
    import random

    from benchmarks import embedded
    from common import InputError
    assert len(embedded.distinct_scenes(random.Random(0), embedded.MAX_SCENES)) == 144
    with pytest.raises(InputError, match="at most 14 items"):
        embedded.distinct_scenes(random.Random(0), embedded.MAX_SCENES + 1)
