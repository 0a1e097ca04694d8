"""evaluate.py (Tables 1, 8, 10): metric functions on hand-made score matrices, the CLI on fixture data sets."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import datasets
import evaluate
import methods
import train
from datasets import Item
from discffusion import Discffusion
from support import (BadScores, FakeModel, REPO, T, random_trainable, write_comvg, write_refcocog, write_vlchecklist,
                     write_vqav2, write_winoground)
from tools import tables


@pytest.fixture
def fake(monkeypatch):
    model = FakeModel()
    monkeypatch.setattr(evaluate.methods, "build", lambda method, args, checkpoint=None: model)
    return model


# ---- metrics on hand-made matrices ---------------------------------------------------------------------------------

def test_winoground_text_image_group():
    assert datasets.winoground_hits(T([[2., 1.], [0., 3.]])) == (True, True, True)
    # each image prefers its caption (text), but caption 1 prefers image 0 (s[0,1]=2.5 > s[1,1]=2): image fails
    assert datasets.winoground_hits(T([[3., 2.5], [1., 2.]])) == (True, False, False)
    # each caption prefers its image (image), but image 1 prefers caption 0 (s[1,0]=2 > s[1,1]=1.5): text fails
    assert datasets.winoground_hits(T([[3., 1.], [2., 1.5]])) == (False, True, False)
    assert datasets.winoground_hits(T([[0., 1.], [1., 0.]])) == (False, False, False)
    assert datasets.winoground_hits(T([[1., 1.], [0., 2.]])) == (False, True, False)  # a tie is not a win


def test_rank_top_k_and_pairs():
    s = T([[0.5, 0.9, 0.1, 0.7, 0.6, 0.8, 0.2, 0.3, 0.0, 0.55]])  # true text ranks 6th (5 others above it)
    assert datasets.true_text_rank(s) == 5
    assert not datasets.top_k(s, 1) and not datasets.top_k(s, 5) and datasets.top_k(s, 6)
    assert datasets.true_text_rank(T([[0.5, 0.5, 0.1]])) == 1  # ties count against the true text
    assert datasets.item_metrics("refcocog", T([[1.0, 0.2, 0.3]])) == dict(top1=True, top5=True, rank=0)
    assert datasets.pos_image_wins(T([[0.3], [0.2]])) and not datasets.pos_image_wins(T([[0.2], [0.2]]))
    assert datasets.pos_text_wins(T([[0.3, 0.2]])) and not datasets.pos_text_wins(T([[0.1, 0.2]]))


def test_vqav2_paper_form_metrics_one_text_against_ten_images():
    s = torch.zeros(10, 1)
    s[0, 0] = 1.0
    assert datasets.item_metrics("vqav2", s) == dict(correct=True)       # its own image beats the 9 others
    s[7, 0] = 1.0
    assert datasets.item_metrics("vqav2", s) == dict(correct=False)      # a tie is not a win
    s[7, 0] = 2.0
    assert datasets.item_metrics("vqav2", s) == dict(correct=False)
    assert datasets.item_metrics("vqav2", T([[0.9] + [0.1] * 9])) == dict(correct=True)     # Other: 1 image, 10 texts
    assert datasets.item_metrics("vqav2", T([[0.1, 0.9] + [0.0] * 8])) == dict(correct=False)
    items = [Item("b1", ["i"] * 10, ["t"], "yes/no"), Item("b2", ["i"] * 10, ["t"], "yes/no"),
             Item("o1", ["i"], ["t"] * 10, "other")]
    mats = [T([[2.0]] + [[1.0]] * 9), T([[0.0]] + [[1.0]] * 9), T([[3.0] + [1.0] * 9])]
    out = evaluate.summarize("vqav2", [(it, datasets.item_metrics("vqav2", m)) for it, m in zip(items, mats)])
    assert out["metrics"] == {"Binary": 50.0, "Other": 100.0, "All": pytest.approx(200 / 3)}
    assert out["counts"] == {"Binary": 2, "Other": 1, "All": 3}


def test_summarize_columns_and_counts():
    recs = [(Item("a", [], [], "subject"), dict(correct=True)), (Item("b", [], [], "subject"), dict(correct=False)),
            (Item("c", [], [], "verb"), dict(correct=True)), (Item("d", [], [], "verb"), dict(correct=True))]
    out = evaluate.summarize("comvg", recs)
    assert out["metrics"] == {"Subjects": 50.0, "Objects": None, "Predicate": 100.0, "Average": 75.0}
    assert out["counts"] == {"Subjects": 2, "Objects": 0, "Predicate": 2, "Average": 4}
    assert out["macro_average"] == 75.0
    vqa = evaluate.summarize("vqav2", [(Item("a", [], [], "yes/no"), dict(correct=True)),
                                       (Item("b", [], [], "number"), dict(correct=False)),
                                       (Item("c", [], [], "other"), dict(correct=True))])
    assert vqa["metrics"] == {"Binary": 100.0, "Other": 50.0, "All": pytest.approx(200 / 3)}


def test_groups_fill_batch_with_pairs():
    items = [Item(str(i), ["x", "y"], ["t"]) for i in range(5)]  # 2 pairs each
    assert [len(g) for g in evaluate.pair_chunks(items, 4)] == [2, 2, 1]
    assert [len(g) for g in evaluate.pair_chunks(items, 1)] == [1] * 5


def test_format_table_for_train_rows():
    text = tables.format_table("comvg", {"zero_shot": {"Subjects": 50.0, "Average": 62.5}, "few_shot": {}})
    assert "Subjects" in text and "Predicate" in text and "50.00" in text and "62.50" in text and "-" in text


# ---- the CLI with a fake model -------------------------------------------------------------------------------------

def test_comvg_cli_reports_malformed_and_missing(tmp_path, fake, capsys):
    root = write_comvg(str(tmp_path / "comvg"))
    out = str(tmp_path / "r.json")
    assert evaluate.main(["--dataset", "comvg", "--data-root", root, "--output", out, "--pairs-per-call", "4"]) == 0
    res = json.load(open(out))
    d = res["datasets"]["comvg"]
    assert d["metrics"] == {"Subjects": 100.0, "Objects": 100.0, "Predicate": 100.0, "Average": 100.0}
    assert d["counts"]["Average"] == 3 and d["report"]["malformed"] == 1 and d["report"]["missing_images"] == 1
    assert fake.calls == [2, 1]  # 4 pairs per call: 2 ComVG items, then the last one
    assert res["model"] == {"model": "fake"} and res["args"]["dataset"] == "comvg"
    assert res["tables"]["table1"]["Compositional Visual Genome"]["Average"] == 100.0
    cap = capsys.readouterr()
    assert "comvg.csv:5" in cap.err and "Table 1" in cap.out and "100.00" in cap.out
    assert "1 malformed records, 1 items with missing images" in cap.out


def test_corrupt_image_skips_item_and_continues(tmp_path, fake, capsys):
    root = write_comvg(str(tmp_path / "comvg"), bad_line=False, missing=False)
    with open(os.path.join(root, "VG_100K_2", "12.jpg"), "wb") as f:
        f.write(b"\xff\xd8 not really a jpeg")
    out = str(tmp_path / "r.json")
    assert evaluate.main(["--dataset", "comvg", "--data-root", root, "--output", out]) == 0
    d = json.load(open(out))["datasets"]["comvg"]
    assert d["n_items"] == 1 and d["unreadable"] == 2 and d["metrics"]["Subjects"] == 100.0
    assert d["metrics"]["Objects"] is None and len(d["unreadable_items"]) == 2
    assert "2 items with unreadable images" in capsys.readouterr().out


def test_all_data_sets_under_root(tmp_path, fake, capsys):
    data = tmp_path / "data"
    write_comvg(str(data / "ComVG"), bad_line=False, missing=False)
    write_refcocog(str(data / "refcocog"))
    write_vqav2(str(data / "vqav2"))
    write_winoground(str(data / "winoground"))
    write_vlchecklist(str(data / "VL-CheckList"))
    out = str(tmp_path / "r.json")
    assert evaluate.main(["--data-root", str(data), "--output", out]) == 0
    res = json.load(open(out))
    ds = res["datasets"]
    assert sorted(ds) == ["comvg", "refcocog", "vlchecklist", "vqav2", "winoground"]
    assert ds["vqav2"]["metrics"] == {"Binary": 0.0, "Other": 100.0, "All": pytest.approx(200 / 3)}
    w = ds["winoground"]
    assert w["metrics"] == {"Text": pytest.approx(200 / 3), "Image": pytest.approx(200 / 3),
                            "Group": pytest.approx(200 / 3)}
    assert w["per_tag"]["Both"] == {"Text": 0.0, "Image": 0.0, "Group": 0.0, "n": 1}
    assert w["per_tag"]["Object"]["Group"] == 100.0
    assert ds["vlchecklist"]["metrics"]["Attribute"] == 100.0 and ds["vlchecklist"]["counts"]["Relation"] == 1
    assert ds["vlchecklist"]["per_file"][os.path.join("Attribute", "vg", "color.json")]["n"] == 2
    assert ds["refcocog"]["split"] == "val" and ds["refcocog"]["n_items"] == 12
    # RefCOCOg by hand: the true text wins if no negative names the image's colour (ties count against it)
    items, _ = datasets.load_items("refcocog", str(data / "refcocog"), split="val")
    ranks = [sum(it.texts[0].split()[1] in t.split() for t in it.texts[1:]) for it in items]
    assert ds["refcocog"]["metrics"]["Top-1"] == pytest.approx(100 * sum(r < 1 for r in ranks) / 12)
    assert ds["refcocog"]["metrics"]["Top-5"] == pytest.approx(100 * sum(r < 5 for r in ranks) / 12)
    printed = capsys.readouterr().out
    for word in ("Table 1", "Table 8", "Table 10", "Subjects", "Top-5", "Binary", "Group", "Relation", "66.67"):
        assert word in printed
    assert set(res["tables"]) == {"table1", "table8", "table10"}


def test_bad_input_in_process(tmp_path, fake, capsys):
    assert evaluate.main(["--data-root", str(tmp_path), "--output", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no data set found") and err.count("\n") == 1
    for name in ("comvg", "refcocog", "vqav2", "winoground", "vlchecklist"):
        assert os.path.join(str(tmp_path), name) in err
    assert evaluate.main(["--annotations", "x.csv", "--output", str(tmp_path / "r.json")]) == 2
    assert "--annotations needs --dataset" in capsys.readouterr().err


def test_missing_root_exits_2_without_traceback(tmp_path):
    missing = str(tmp_path / "nowhere")
    r = subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), "--dataset", "comvg", "--data-root",
                        missing, "--output", str(tmp_path / "r.json")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1   # one line
    assert r.stderr.startswith(f"error: ComVG data root not found: {missing} is not a folder; ")
    for said in ("compositional_visual_genome.csv", "python -m tools.download comvg", "--dataset shapes"):
        assert said in r.stderr                       # what goes where, how to fetch it, the offline alternative


def test_missing_data_set_from_train_says_how_to_fetch_it(tmp_path, capsys):
    from tools.cli import run_cli
    out = ["--output-dir", str(tmp_path / "run")]                      # tests write only under their tmp dirs
    assert run_cli(train.main, ["--dataset", "vqav2", "--data-root", str(tmp_path / "none"), *out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "test.txt + vqa_text_test.csv" in err
    assert "python -m tools.download vqav2" in err and "--dataset shapes" in err
    (tmp_path / "empty").mkdir()                      # a folder without its files: the same guidance
    assert run_cli(train.main, ["--dataset", "comvg", "--data-root", str(tmp_path / "empty"), *out]) == 2
    err = capsys.readouterr().err
    assert "compositional_visual_genome.csv" in err and "python -m tools.download comvg" in err and err.count("\n") == 1


def test_first_run_in_an_empty_folder_evaluates_the_shapes_world(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), "--limit", "2", "--itm-timesteps", "2"],
                       capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    first = r.stdout.splitlines()[0]
    assert "evaluating the embedded shapes world" in first and "python -m tools.download comvg" in first
    assert "Shapes (ComVG format)" in r.stdout and "discffusion zero-shot" in r.stdout
    res = json.load(open(tmp_path / "results.json"))
    assert res["datasets"]["shapes"]["n_items"] == 2 and (tmp_path / "data" / "shapes" / "comvg.csv").exists()


# ---- end to end on the tiny random Stable Diffusion (the same loading path as real weights) -------------------------

def test_end_to_end_tiny_sd(tmp_path, tiny_sd, capsys):
    comvg = write_comvg(str(tmp_path / "comvg"))
    wino = write_winoground(str(tmp_path / "winoground"))
    common = ["--model", tiny_sd, "--device", "cpu", "--dtype", "fp32", "--pairs-per-call", "8", "--levels", "0.4,0.8"]
    out = str(tmp_path / "comvg.json")
    assert evaluate.main(common + ["--dataset", "comvg", "--data-root", comvg, "--output", out]) == 0
    res = json.load(open(out))
    d = res["datasets"]["comvg"]
    assert d["n_items"] == 3 and d["counts"]["Average"] == 3 and d["report"]["missing_images"] == 1
    parts = [d["metrics"][c] for c in ("Subjects", "Objects", "Predicate")]  # one item each
    assert all(v in (0.0, 100.0) for v in parts) and d["metrics"]["Average"] == pytest.approx(sum(parts) / 3)
    assert res["model"]["levels"] == [0.4, 0.8] and res["model"]["model"] == tiny_sd
    out2 = str(tmp_path / "wino.json")
    assert evaluate.main(common + ["--dataset", "winoground", "--data-root", wino, "--output", out2]) == 0
    w = json.load(open(out2))["datasets"]["winoground"]
    assert w["n_items"] == 3 and set(w["per_tag"]) == {"Object", "Relation", "Both"}
    assert "Table 10" in capsys.readouterr().out
    # the same run twice gives the same numbers (seeded noise, seeded negatives)
    assert evaluate.main(common + ["--dataset", "winoground", "--data-root", wino, "--output", out2]) == 0
    assert json.load(open(out2))["datasets"]["winoground"]["metrics"] == w["metrics"]


def test_scorer_options_from_the_command_line_the_checkpoint_or_the_data_set(tmp_path, tiny_sd):
    """--lam / --pooling / --itm-timesteps / --shots from the command line, else the checkpoint's recorded values,
    else the data set's default (shapes: lambda 100, 50 timesteps, 60 shots), else lambda 1, LogSumExp, 10 timesteps;
    train.py resolves the same; and the scores are the trained model's."""
    trained = Discffusion.from_pretrained(tiny_sd, device="cpu", lam=8.0, pooling="max")
    random_trainable(trained, 0.05)
    ckpt = str(tmp_path / "deltas.safetensors")
    trained.save_trained(ckpt, {"shots": "30"})                # the file records the scorer's own lambda and pooling
    parse = lambda *a: evaluate.build_parser().parse_args(["--model", tiny_sd, "--device", "cpu", *a])  # noqa: E731
    keys = ("lam", "pooling", "itm_timesteps", "shots")
    opts = lambda args, ckpt=None: {k: methods.option(args, k, methods.recorded_options(ckpt)) for k in keys}  # noqa
    assert opts(parse()) == {"lam": 1.0, "pooling": "lse", "itm_timesteps": 10, "shots": "0.05"}
    assert opts(parse("--dataset", "comvg")) == {"lam": 1.0, "pooling": "lse", "itm_timesteps": 10, "shots": "0.05"}
    assert opts(parse("--dataset", "shapes")) == {"lam": 100.0, "pooling": "lse", "itm_timesteps": 50, "shots": "60"}
    assert opts(parse("--dataset", "shapes"), ckpt) == {"lam": 8.0, "pooling": "max", "itm_timesteps": 50,
                                                        "shots": "30"}
    assert opts(parse("--lam", "3", "--itm-timesteps", "4"), ckpt) == {"lam": 3.0, "pooling": "max",
                                                                      "itm_timesteps": 4, "shots": "30"}
    for name, want in (("shapes", (100.0, "lse", 50)), ("comvg", (1.0, "lse", 10))):   # train.py fills the same
        a = train.parse_args(["--dataset", name])
        assert (a.lam, a.pooling, a.itm_timesteps) == want
    images = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    texts = ["a red circle", "a blue square", "a green one"]
    with torch.no_grad():
        want = trained.score(images, texts)
        got = methods.build("discffusion", parse(), ckpt)
        assert got.config["lam"] == 8.0 and got.config["pooling"] == "max"
        assert torch.allclose(got.score(images, texts), want, atol=1e-6)
        at_one = methods.build("discffusion", parse("--lam", "1", "--pooling", "lse"), ckpt)
        assert not torch.allclose(at_one.score(images, texts), want, atol=1e-4)


def test_bad_model_path_exits_2(tmp_path, capsys):
    comvg = write_comvg(str(tmp_path / "comvg"), bad_line=False, missing=False)
    assert evaluate.main(["--model", str(tmp_path / "no_model"), "--device", "cpu", "--dataset", "comvg",
                          "--data-root", comvg, "--output", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no_model" in err


def test_ties_and_duplicates_in_the_summary_and_the_json(tmp_path, monkeypatch, capsys):
    """ComVG with one row repeated (same id) and one copied under a new id (same images and texts); the model ties
    on 'a red circle'. Duplicates are warned about and still scored; ties are counted wrong and reported."""
    root = write_comvg(str(tmp_path / "comvg"), bad_line=False, missing=False)
    with open(os.path.join(root, "comvg.csv"), "a", newline="") as f:
        csv.writer(f).writerows([("1", "a red circle", "circle,is,red", "circle,is,blue", "10", "11", "subject"),
                                 ("7", "a blue square", "square,is,blue", "square,is,green", "11", "12", "object")])
    monkeypatch.setattr(methods, "build", lambda *a, **k: BadScores("a red circle", 0.0))
    out = tmp_path / "r.json"
    assert evaluate.main(["--dataset", "comvg", "--data-root", root, "--output", str(out)]) == 0
    d = json.load(open(out))["datasets"]["comvg"]
    assert d["report"]["duplicates"] == 2 and d["n_items"] == 5 and d["counts"]["Average"] == 5
    assert d["ties"] == 2 and d["tied_items"] == ["1", "1"]
    assert d["metrics"]["Subjects"] == 0.0 and d["metrics"]["Average"] == 60.0   # 3 of 5: the tied two count wrong
    cap = capsys.readouterr()
    assert "warning: 2 duplicate records" in cap.err
    assert "; ties with a wrong candidate (counted wrong): 2; duplicate records (scored as loaded): 2" in cap.out


def test_threads_option_is_applied_and_recorded(tmp_path, fake):
    root = write_comvg(str(tmp_path / "comvg"), bad_line=False, missing=False)
    out = str(tmp_path / "r.json")
    before = torch.get_num_threads()
    try:
        assert evaluate.main(["--dataset", "comvg", "--data-root", root, "--output", out, "--threads", "3"]) == 0
        assert torch.get_num_threads() == 3 and json.load(open(out))["args"]["threads"] == 3
    finally:
        torch.set_num_threads(before)
