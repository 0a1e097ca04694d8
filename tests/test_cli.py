"""The command lines' handling of bad input, faults and stops (evaluate.py, train.py and the tools): every bad input
is one `error: ...` line naming what and where (exit 2, no traceback) or a counted skip, before any model is built or
any file is created; nothing a user computed is lost (signals, full disks, read-only places); no file given runs code
or makes the program read outside its data folder. What each module does with good input is tested in its own file;
resuming is tested in test_resume.py."""
import csv
import errno
import json
import math
import os
import pathlib
import pickle
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import common
import datasets
import evaluate
import methods
import prompt_delta
import train
from benchmarks import shapes as world
from common import read_checkpoint, save_tensors
from discffusion import Discffusion
from support import (BadScores, FakeModel, REPO, assert_stopped_at_step_1, error_line, image, main_of, mount_tmpfs,
                     train_argv, umount, write_coco, write_comvg, write_refcocog, write_train_comvg, write_vlchecklist,
                     write_vqa_paper, write_vqav2, write_winoground)
from tools import benchmark, cli, download, figures, pretrain_shapes, resume, shapes
from tools.cli import run_cli


TINY_SHAPES = os.path.join(REPO, "models", "tiny-shapes-sd")


# ---- bounded sizes: refused at the command line, before any data or model ---------------------------------------

SIZES = [
    (evaluate, ["--resolution", "100000"], "argument --resolution: must be a multiple of 8 from 8 to 2048, got 100000"),
    (evaluate, ["--resolution", "100"], "argument --resolution: must be a multiple of 8 from 8 to 2048, got 100"),
    (evaluate, ["--resolution", "2056"], "argument --resolution: must be a multiple of 8 from 8 to 2048, got 2056"),
    (evaluate, ["--resize-via", "100000"], "argument --resize-via: must be from 1 to 2048, got 100000"),
    (evaluate, ["--resize-via", "0"], "argument --resize-via: must be from 1 to 2048, got 0"),
    (train, ["--dataset", "comvg", "--resolution", "100000"],
     "argument --resolution: must be a multiple of 8 from 8 to 2048, got 100000"),
    (shapes, ["--out", "x", "--size", "20000"], "argument --size: must be from 1 to 2048, got 20000"),
    (shapes, ["--out", "x", "--size", "0"], "argument --size: must be from 1 to 2048, got 0"),
]


@pytest.mark.parametrize("module, argv, message", SIZES, ids=[f"{m.__name__} {' '.join(a)}" for m, a, _ in SIZES])
def test_sizes_are_bounded_before_anything_is_allocated(module, argv, message, tmp_path, capsys, no_model,
                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)                                    # shapes.py --out x: nothing may appear here
    monkeypatch.setattr(world, "render", lambda *a, **k: pytest.fail("an image was drawn before the refusal"))
    code = module.main(argv) if module is evaluate else run_cli(module.main, argv)
    assert code == 2 and error_line(capsys) == f"error: {message} (see --help)" and os.listdir(tmp_path) == []
    if module is evaluate:                                          # --help states the bounds
        text = " ".join(evaluate.build_parser().format_help().split())
        assert "a multiple of 8 up to 2048" in text and "1 to 2048 pixels" in text
    # the bounds themselves are accepted
    ok = {"--resolution": "2048", "--resize-via": "2048", "--size": "2048"}
    parse = cli.image_size(8) if argv[-2] == "--resolution" else cli.image_size()
    assert parse(ok[argv[-2]]) == 2048 and parse("8") == 8


# ---- unreadable training images: skipped and counted, as in evaluation -------------------------------------------

@pytest.mark.parametrize("which", ["one item", "a whole micro-batch", "every item"])
def test_unreadable_training_images_are_skipped_and_counted(which, tiny_sd, tmp_path, capsys):
    """3 steps of 2 items: one pass over the 6 training items. Their unreadable images (not JPEG bytes) skip those
    items, counted in results.json and said in a line; a micro-batch with nothing readable adds zero gradients; if no
    training item can be read at all, that is one error line."""
    root = write_train_comvg(str(tmp_path / "comvg"))
    items, _ = datasets.load_items("comvg", root)
    train_items, _ = datasets.split_items(items, "6", 0)
    args = train.parse_args(train_argv(tiny_sd, root, tmp_path / "out", "--steps", "3"))
    first = [train_items[i] for i in train.batch_indices(0, 0, args, len(train_items))]
    bad = {"one item": first[:1], "a whole micro-batch": first, "every item": train_items}[which]
    for it in bad:
        with open(it.images[1], "wb") as f:
            f.write(b"not a JPEG")
    code = run_cli(train.main, train_argv(tiny_sd, root, tmp_path / "out", "--steps", "3"))
    if which == "every item":
        assert code == 2
        assert error_line(capsys).startswith("error: no training item can be read: the images of all 6 are "
                                             "unreadable (first: ")
        assert not (tmp_path / "out" / "prompt_deltas.safetensors").exists()
        return
    assert code == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())["train"]
    assert res["unreadable"] == len(bad)
    assert sorted(u.split(":")[0] for u in res["unreadable_items"]) == sorted(it.id for it in bad)
    assert [h["items"] for h in res["history"]] == [2 - len(bad), 2, 2]
    assert all(math.isfinite(h["loss"]) for h in res["history"])
    out = capsys.readouterr()
    assert f"training: {len(bad)} items with unreadable images skipped" in out.out
    assert out.err.count("warning: training item ") == len(bad) and "Traceback" not in out.err
    deltas = load_file(tmp_path / "out" / "prompt_deltas.safetensors")
    assert all(torch.isfinite(t).all() for t in deltas.values())
    assert any(deltas[k].abs().sum() > 0 for k in deltas if k.startswith("delta_k"))  # the readable items trained


# ---- file-system problems and corrupt weights: one error line, exit 2 -------------------------------------------

def truncated_model(tmp_path, part):
    """A copy of the committed tiny model with `part`'s weight file cut in half."""
    folder = tmp_path / "truncated-sd"
    shutil.copytree(TINY_SHAPES, folder)
    path = next(p for p in (folder / part).iterdir() if p.suffix == ".safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return str(folder), str(path)


def nan_deltas(tmp_path):
    """A prompt-delta file for the tiny shapes model whose p^k of one layer is NaN."""
    model = Discffusion.from_pretrained(TINY_SHAPES, device="cpu")
    model.add_trainable()
    path = str(tmp_path / "nan.safetensors")
    state = prompt_delta.state(model.capture)
    next(t for k, t in state.items() if k.startswith("delta_k")).data.fill_(float("nan"))
    prompt_delta.save(path, model.capture, TINY_SHAPES)
    return path


FS_CASES = ["shapes world under a data root that is a file", "shapes world in a read-only working directory",
            "train: shapes world in a read-only data root", "shapes.py --out a file", "shapes.py --out inside a file",
            "shapes.py repeated colour", "shapes.py repeated relation",
            "download: data root is a file", "download: data root read-only", "download: a folder where a file goes",
            "figures: output is a file", "figures: truncated base model", "figures: NaN deltas",
            "evaluate: NaN deltas", "benchmark: output inside a file", "benchmark: cache folder is a file",
            "benchmark: truncated text encoder", "evaluate: truncated text encoder"]


@pytest.mark.parametrize("case", FS_CASES)
def test_file_system_problems_are_one_error_line(case, tmp_path, monkeypatch, capsys, request):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    ro = request.getfixturevalue("read_only") if "read-only" in case else None
    out = ["--output", str(tmp_path / "r.json")]
    if case == "shapes world under a data root that is a file":
        code, says = evaluate.main(["--dataset", "shapes", "--data-root", str(a_file), *out]), \
            f"cannot write {a_file}: it is a file, not a folder"
    elif case == "shapes world in a read-only working directory":
        monkeypatch.chdir(ro)                                        # no data/ here: the shapes world on first use
        code, says = evaluate.main(out), f"cannot write {ro / 'data' / 'shapes'}: "
    elif case == "train: shapes world in a read-only data root":
        code, says = run_cli(train.main, ["--dataset", "shapes", "--data-root", str(ro / "shapes"), "--output-dir",
                                          str(tmp_path / "run")]), f"cannot write {ro / 'shapes'}: "
    elif case.startswith("shapes.py"):
        argv = {"shapes.py --out a file": ["--out", str(a_file)],
                "shapes.py --out inside a file": ["--out", str(a_file / "world")],
                "shapes.py repeated colour": ["--out", str(tmp_path / "w"), "--colors", "red,blue,red"],
                "shapes.py repeated relation": ["--out", str(tmp_path / "w"), "--relations", "above,below,above"]}[case]
        code = run_cli(shapes.main, argv)
        says = {"shapes.py --out a file": f"cannot write {a_file}: it is a file, not a folder",
                "shapes.py --out inside a file": f"cannot write {a_file / 'world'}: not a directory",
                "shapes.py repeated colour": "colour(s) 'red' given twice",
                "shapes.py repeated relation": "relation(s) 'above' given twice"}[case]
        assert not (tmp_path / "w").exists()
    elif case.startswith("download"):
        dead = "http://127.0.0.1:9"                                   # never reached: the error comes first
        if case == "download: data root is a file":
            root, says = a_file, f"cannot write {a_file / 'comvg'}: not a directory"
        elif case == "download: data root read-only":
            root, says = ro, f"cannot write {ro / 'comvg'}: "
        else:
            root = tmp_path / "data"
            (root / "comvg" / "compositional_visual_genome.csv").mkdir(parents=True)
            says = (f"cannot write {root / 'comvg' / 'compositional_visual_genome.csv'}: a folder is in the way of "
                    "the file (move it away)")
        code = run_cli(download.main, ["comvg", "--data-root", str(root), "--mirror", dead])
        if case == "download: a folder where a file goes":
            assert (root / "comvg" / "compositional_visual_genome.csv").is_dir()   # nothing of the user's removed
    elif case == "figures: output is a file":
        code, says = run_cli(figures.main, ["curves", "x.json", "--out", str(a_file)]), \
            f"cannot write {a_file}: it is a file, not a folder"
    elif case == "figures: truncated base model":
        model, weights = truncated_model(tmp_path, "unet")
        deltas = str(tmp_path / "d.safetensors")
        m = Discffusion.from_pretrained(TINY_SHAPES, device="cpu")
        m.add_trainable()
        prompt_delta.save(deltas, m.capture, TINY_SHAPES)
        code, says = run_cli(figures.main, ["deltas", deltas, "--model", model, "--out", str(tmp_path / "f")]), \
            f"base model weights {weights} are not a readable safetensors file (SafetensorError"
    elif case == "figures: NaN deltas":
        path = nan_deltas(tmp_path)
        code, says = run_cli(figures.main, ["deltas", path, "--out", str(tmp_path / "f")]), \
            f"{path}: delta_k."
    elif case == "evaluate: NaN deltas":
        path = nan_deltas(tmp_path)
        code = evaluate.main(["--dataset", "shapes", "--data-root", str(tmp_path / "shapes"), "--checkpoint", path,
                              "--methods", "discffusion", "--limit", "1", "--device", "cpu", *out])
        says = f"checkpoint {path} (base model {TINY_SHAPES}): delta_k."
    elif case.startswith("benchmark"):
        argv = ["--preset", "tiny", "--device", "cpu", "--no-memory", "--quick", "--threads", "1",
                "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "b.json")]
        if case == "benchmark: output inside a file":
            argv[-1], says = str(a_file / "b.json"), f"cannot write {a_file / 'b.json'}: {a_file} is a file"
        elif case == "benchmark: cache folder is a file":
            argv[-3], says = str(a_file), f"cannot write {a_file}: it is a file, not a folder"
        else:
            model, _ = truncated_model(tmp_path, "text_encoder")
            argv += ["--model", model]
            says = f"could not load model {model!r} (text_encoder/): Error while deserializing header"
        code = run_cli(benchmark.main, argv)
    else:  # evaluate: truncated text encoder
        model, _ = truncated_model(tmp_path, "text_encoder")
        code = evaluate.main(["--dataset", "shapes", "--data-root", str(tmp_path / "shapes"), "--model", model,
                              "--methods", "discffusion", "--limit", "1", "--device", "cpu", *out])
        says = f"could not load model {model!r} (text_encoder/): Error while deserializing header"
    assert code == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {says}"), line
    if "read-only" in case:
        assert "read-only file system" in line or "permission denied" in line
    if case in ("figures: NaN deltas", "evaluate: NaN deltas"):
        assert "holds non-finite values (NaN or inf)" in line
    assert a_file.read_text() == "x" and not (tmp_path / "r.json").exists()


# ---- oversized CSV fields and deeply nested JSON: loaded, or one error line / a counted malformed record ----------

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("case", ["csv field over 131072 characters", "vlchecklist json nested 100000 deep",
                                  "winoground line nested 100000 deep", "results.json nested 100000 deep",
                                  "checkpoint metadata nested 100000 deep"])
def test_oversized_fields_and_deep_json(case, tmp_path, capsys, monkeypatch):
    if case == "csv field over 131072 characters":
        root = write_comvg(str(tmp_path / "comvg"), bad_line=False, missing=False)
        long = "a red circle " + "very " * 40_000                      # 200,013 characters in one field
        with open(os.path.join(root, "comvg.csv"), "a", newline="") as f:
            csv.writer(f).writerow(["9", long, "circle,is,red", "circle,is,blue", "10", "11", "subject"])
        items, report = datasets.load_items("comvg", root)
        assert len(items) == 4 and items[-1].texts == [long.strip()] and report["malformed"] == 0
        monkeypatch.setattr(methods, "build", lambda *a, **k: FakeModel())
        assert evaluate.main(["--dataset", "comvg", "--data-root", root, "--output", str(tmp_path / "r.json")]) == 0
        assert json.loads((tmp_path / "r.json").read_text())["datasets"]["comvg"]["n_items"] == 4
        return
    if case == "winoground line nested 100000 deep":
        root = write_winoground(str(tmp_path / "wino"))
        before, base = datasets.load_items("winoground", root)
        with open(os.path.join(root, "examples.jsonl"), "a") as f:
            f.write(DEEP + "\n")
        items, report = datasets.load_items("winoground", root)
        assert report["malformed"] == base["malformed"] + 1 and len(items) == len(before)
        assert any("not JSON (nested too deeply)" in w for w in report["warnings"])
        return
    if case == "checkpoint metadata nested 100000 deep":
        path = tmp_path / "deep.safetensors"
        save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "x", "layers": DEEP})
        meta, _ = common.read_checkpoint(path, tensors=False)      # kept as text, never a RecursionError
        assert meta["layers"] == DEEP and meta["format"] == "x"
        return
    if case == "vlchecklist json nested 100000 deep":
        root = write_vlchecklist(str(tmp_path / "vlc"))
        path = os.path.join(root, "data", "Attribute", "vg", "color.json")
        with open(path, "w") as f:
            f.write(DEEP)
        code = evaluate.main(["--dataset", "vlchecklist", "--data-root", root, "--output", str(tmp_path / "r.json")])
        says = f"VL-CheckList file {path} is nested too deeply"
    else:
        path = tmp_path / "results.json"
        path.write_text(DEEP)
        code = run_cli(figures.main, ["curves", str(path), "--out", str(tmp_path / "f")])
        says = f"results file {path} is nested too deeply"
    assert code == 2 and error_line(capsys).startswith(f"error: {says}")


# ---- nothing is created before the inputs are checked -------------------------------------------------------------

@pytest.mark.parametrize("case", ["train: unknown --dataset, default output dir", "train: missing data",
                                  "evaluate: missing data, output in a new folder", "benchmark: bad model"])
def test_nothing_is_created_before_the_inputs_are_checked(case, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)                                         # the default runs/<name> would land here
    if case == "train: unknown --dataset, default output dir":
        code = run_cli(train.main, ["--dataset", "nope"])
        assert "unknown data set 'nope'" in error_line(capsys)
    elif case == "train: missing data":
        code = run_cli(train.main, ["--dataset", "comvg", "--data-root", str(tmp_path / "none"),
                                    "--output-dir", str(work / "runs" / "deep" / "comvg")])
        error_line(capsys)
    elif case == "evaluate: missing data, output in a new folder":
        code = evaluate.main(["--dataset", "comvg", "--data-root", str(tmp_path / "none"), "--output",
                              str(work / "new" / "r.json")])
        error_line(capsys)
    else:
        code = run_cli(benchmark.main, ["--model", str(tmp_path / "none"), "--device", "cpu", "--no-memory",
                                        "--output", str(work / "runs" / "b.json")])
        error_line(capsys)
    assert code == 2 and os.listdir(work) == []


# ---- numeric options and usage errors: parse-level, no model --------------------------------------------------------

TRAIN = ["--dataset", "comvg"]
USAGE = [
    (evaluate, ["--lam", "0"], "argument --lam: must be finite and > 0, got 0"),
    (evaluate, ["--lam", "nan"], "argument --lam: must be finite and > 0, got nan"),
    (evaluate, ["--lam", "inf"], "argument --lam: must be finite and > 0, got inf"),
    (evaluate, ["--lam", "-1"], "argument --lam: must be finite and > 0, got -1"),
    (evaluate, ["--batch-size", "4"], "unrecognized arguments: --batch-size 4"),  # train.py's option, not an alias
    (evaluate, ["--eval-batch-size", "-2"], "argument --pairs-per-call/--eval-batch-size: must be >= 1, got -2"),
    (evaluate, ["--eval-batch-size", "2.5"], "argument --pairs-per-call/--eval-batch-size: expected a whole number, got '2.5'"),
    (evaluate, ["--levels", "0.2,1.5"], "argument --levels: each noise level must be in (0, 1], got 0.2,1.5"),
    (evaluate, ["--levels", "nan"], "argument --levels: each noise level must be in (0, 1], got nan"),
    (evaluate, ["--resolution", "0"], "argument --resolution: must be a multiple of 8 from 8 to 2048, got 0"),
    (evaluate, ["--itm-timesteps", "0"], "argument --itm-timesteps: must be >= 1, got 0"),
    (evaluate, ["--limit", "0"], "argument --limit: must be >= 1, got 0"),
    (evaluate, ["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (evaluate, ["--lam"], "argument --lam: expected one argument"),
    (evaluate, ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (evaluate, ["--dataset", "nope"], "argument --dataset: invalid choice: 'nope'"),
    (train, [], "the following arguments are required: --dataset"),
    (train, TRAIN + ["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (train, TRAIN + ["--batch-size", "-3"], "argument --batch-size: must be >= 1, got -3"),
    (train, TRAIN + ["--grad-accum", "0"], "argument --grad-accum: must be >= 1, got 0"),
    (train, TRAIN + ["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (train, TRAIN + ["--save-every", "0"], "argument --save-every: must be >= 1, got 0"),
    (train, TRAIN + ["--lr", "1e38"], "argument --lr: must be finite and > 0 and <= 10, got 1e38"),
    (train, TRAIN + ["--lr", "nan"], "argument --lr: must be finite and > 0 and <= 10, got nan"),
    (train, TRAIN + ["--lr", "0"], "argument --lr: must be finite and > 0 and <= 10, got 0"),
    (train, TRAIN + ["--margin", "-0.1"], "argument --margin: must be finite and >= 0, got -0.1"),
    (train, TRAIN + ["--weight-decay", "inf"], "argument --weight-decay: must be finite and >= 0, got inf"),
    (train, TRAIN + ["--grad-clip", "nan"], "argument --grad-clip: must be finite and >= 0, got nan"),
    (train, TRAIN + ["--epochs", "0"], "argument --epochs: must be finite and > 0, got 0"),
    (train, TRAIN + ["--eval-limit", "0"], "argument --eval-limit: must be >= 1, got 0"),
    (train, TRAIN + ["--lam", "nan"], "argument --lam: must be finite and > 0, got nan"),
    (train, TRAIN + ["--compare", "bogus"], "--compare: unknown method(s) ['bogus']"),
    (download, ["comvg", "--jobs", "0"], "argument --jobs: must be >= 1, got 0"),
    (download, [], "the following arguments are required: NAME"),
    (benchmark, ["--images", "0"], "argument --images: must be >= 1, got 0"),
    (benchmark, ["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (shapes, ["--out", "x", "--n", "0"], "argument --n: must be >= 1, got 0"),
    (pretrain_shapes, ["--lr", "1e38"], "argument --lr: must be finite and > 0 and <= 10, got 1e38"),
    (pretrain_shapes, ["--p-empty", "2"], "argument --p-empty: must be finite and >= 0 and <= 1, got 2"),
]


@pytest.mark.parametrize("module, argv, message", USAGE,
                         ids=[f"{m.__name__} {' '.join(a)}" for m, a, _ in USAGE])
def test_bad_option_is_one_error_line_with_a_help_hint(module, argv, message, capsys, no_model):
    assert main_of(module, argv) == 2
    cap = capsys.readouterr()
    lines = cap.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}") and lines[0].endswith(" (see --help)")
    assert "usage:" not in cap.out + cap.err


def test_help_still_works():
    with pytest.raises(SystemExit) as e:
        evaluate.build_parser().parse_args(["--help"])
    assert e.value.code == 0


@pytest.mark.parametrize("shots", ["nan", "inf", "NaN", "1e999"])
def test_non_finite_shots(shots, tmp_path, capsys, no_model):
    root = write_train_comvg(str(tmp_path / "comvg"))
    argv = ["--dataset", "comvg", "--data-root", root, "--shots", shots, "--output-dir", str(tmp_path / "out")]
    assert main_of(train, argv) == 2
    assert error_line(capsys) == f"error: --shots {shots}: must be a positive finite number"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("module", [train, evaluate, benchmark])
def test_device_cuda_without_cuda(module, tmp_path, capsys):
    model = ["--model", str(tmp_path / "not-loaded"), "--device", "cuda"]
    argv = {train: ["--dataset", "comvg", "--data-root", write_train_comvg(str(tmp_path / "c")), "--shots", "6",
                    "--output-dir", str(tmp_path / "out")] if module is train else [],
            evaluate: ["--dataset", "comvg", "--data-root", write_comvg(str(tmp_path / "c")),
                       "--output", str(tmp_path / "r.json")] if module is evaluate else [],
            benchmark: ["--output", str(tmp_path / "b.json")]}[module]
    assert main_of(module, argv + model) == 2
    assert error_line(capsys).startswith("error: --device cuda: CUDA is not available here")


# ---- a non-finite score is an error naming the item ----------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_score_names_the_item(value, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(methods, "build", lambda *a, **k: BadScores("a blue square", value))
    root = write_comvg(str(tmp_path / "comvg"), bad_line=False, missing=False)
    out = tmp_path / "r.json"
    assert evaluate.main(["--dataset", "comvg", "--data-root", root, "--output", str(out)]) == 2
    line = error_line(capsys)
    assert line.startswith("error: item 2 (") and "non-finite scores" in line and not out.exists()


# ---- the output side -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["train: output dir is a file", "train: output dir inside a file",
                                  "evaluate: output is a folder", "evaluate: output inside a file"])
def test_unwritable_output_is_refused_before_any_work(case, tmp_path, capsys, no_model):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    target = {"train: output dir is a file": a_file, "train: output dir inside a file": a_file / "run",
              "evaluate: output is a folder": tmp_path, "evaluate: output inside a file": a_file / "r.json"}[case]
    nowhere = str(tmp_path / "no-data")  # the data are never looked at: the output check comes first
    if case.startswith("train"):
        assert main_of(train, ["--dataset", "comvg", "--data-root", nowhere, "--output-dir", str(target)]) == 2
    else:
        assert main_of(evaluate, ["--dataset", "comvg", "--data-root", nowhere, "--output", str(target)]) == 2
    why = {"train: output dir is a file": f"{a_file}: it is a file, not a folder",
           "train: output dir inside a file": f"{a_file / 'run'}: not a directory",
           "evaluate: output is a folder": f"{tmp_path}: it is a folder",
           "evaluate: output inside a file": f"{target}: {a_file} is a file, not a folder"}[case]
    assert error_line(capsys) == f"error: cannot write {why}"
    assert a_file.read_text() == "x"


@pytest.mark.parametrize("module", [train, evaluate])
def test_read_only_output_location(module, read_only, tmp_path, capsys, no_model):
    nowhere = str(tmp_path / "no-data")
    if module is train:
        argv = ["--dataset", "comvg", "--data-root", nowhere, "--output-dir", str(read_only / "run")]
    else:
        argv = ["--dataset", "comvg", "--data-root", nowhere, "--output", str(read_only / "r.json")]
    assert main_of(module, argv) == 2
    line = error_line(capsys)
    assert str(read_only) in line and ("read-only file system" in line or "permission denied" in line)


def test_real_full_disk_on_a_small_tmpfs(tiny_sd, tmp_path, monkeypatch, capsys):
    """Real: the output folder on an 8 MB tmpfs, filled to the last byte just before the second checkpoint."""
    mnt = tmp_path / "small"
    why = mount_tmpfs(mnt, "size=8m")
    if why:
        pytest.skip(why)
    try:
        root = write_train_comvg(str(tmp_path / "comvg"))
        real, calls = resume.atomic_write, []

        def fill_then_write(path, write):
            calls.append(path)
            if len(calls) == 2:
                fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
                for chunk in (2 ** 20, 2 ** 12, 1):
                    try:
                        while True:
                            os.write(fd, b"\0" * chunk)
                    except OSError as e:
                        assert e.errno == errno.ENOSPC
                os.close(fd)
            return real(path, write)
        monkeypatch.setattr(resume, "atomic_write", fill_then_write)
        assert main_of(train, train_argv(tiny_sd, root, mnt / "run", "--steps", "3", "--save-every", "1")) == 2
        assert_stopped_at_step_1(mnt / "run", capsys)
    finally:
        umount(mnt)


def test_disk_full_writing_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(methods, "build", lambda *a, **k: FakeModel())
    root = write_comvg(str(tmp_path / "comvg"), bad_line=False, missing=False)

    real = pathlib.Path.write_text

    def full_disk(self, *a, **k):                     # the disk fills up when the results JSON is written
        if not str(self).startswith(str(out)):
            return real(self, *a, **k)
        self.open("w").write("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    out = tmp_path / "out" / "r.json"
    assert evaluate.main(["--dataset", "comvg", "--data-root", root, "--output", str(out)]) == 2
    assert error_line(capsys) == f"error: cannot write {out}: no space left on device"
    left = [os.path.relpath(os.path.join(d, f), out.parent) for d, _, fs in os.walk(out.parent) for f in fs]
    assert not [f for f in left if f.startswith("r.json")]           # no results file, no half-written temporary
    assert any(f.endswith(".jsonl") for f in left)                     # the scores made so far are kept for --resume


# ---- data files ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["comvg", "winoground", "vlchecklist"])
def test_non_utf8_annotation_file(name, tmp_path, capsys, no_model):
    writer, rel = {"comvg": (write_comvg, "comvg.csv"), "winoground": (write_winoground, "examples.jsonl"),
                   "vlchecklist": (write_vlchecklist, "data/Attribute/vg/color.json")}[name]
    root = writer(str(tmp_path / name))
    path = os.path.join(root, rel)
    data = open(path, "rb").read()
    offset = data.index(b"red") + 1
    open(path, "wb").write(data[:offset] + "\xe9".encode("latin-1") + data[offset + 1:])  # 'red' -> 'r\xe9d'
    line = data.count(b"\n", 0, offset) + 1
    assert evaluate.main(["--dataset", name, "--data-root", root, "--output", str(tmp_path / "r.json")]) == 2
    assert error_line(capsys).endswith(f"{path} is not UTF-8 text: byte 0xe9 at offset {offset} (line {line}); "
                                       "save it as UTF-8")


def test_utf8_with_a_byte_order_mark_still_loads(tmp_path):
    root = write_comvg(str(tmp_path / "comvg"), bad_line=False, missing=False)
    path = os.path.join(root, "comvg.csv")
    data = open(path, "rb").read()
    open(path, "wb").write(b"\xef\xbb\xbf" + data)
    items, report = datasets.load_items("comvg", root)
    assert len(items) == 3 and report["malformed"] == 0


# ---- crafted files, escapes, outputs that are inputs, wrong kinds --------------------------------------------------

class Crafted:
    """Unpickling this object opens (creates) `marker`: what a crafted file can do with any call it likes."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("where", ["train.py --resume checkpoint.pt", "RefCOCOg refs(umd).p"])
def test_a_crafted_pickle_is_refused_and_runs_no_code(where, tiny_sd, tmp_path, capsys):
    marker = str(tmp_path / "code-ran")
    if where.startswith("train"):
        root = write_train_comvg(str(tmp_path / "comvg"))
        path = tmp_path / "out" / "checkpoint.pt"
        path.parent.mkdir()
        torch.save({"step": 1, "params": [], "optimizer": Crafted(marker), "rng": None, "history": [], "args": {}},
                   path)
        assert run_cli(train.main, train_argv(tiny_sd, root, tmp_path / "out", "--steps", "2", "--resume")) == 2
        assert error_line(capsys) == (f"error: --resume: {path} is not a checkpoint train.py wrote: it names io.open, "
                                      "which only a crafted file does (refused, not run)")
        load = lambda: torch.load(path, weights_only=False)  # noqa: E731
    else:
        root = write_refcocog(str(tmp_path / "refcocog"))
        path = os.path.join(root, "refcocog", "refs(umd).p")
        with open(path, "wb") as f:
            pickle.dump([Crafted(marker)], f, protocol=2)
        assert evaluate.main(["--dataset", "refcocog", "--data-root", root, "--output", str(tmp_path / "r.json")]) == 2
        assert error_line(capsys) == (f"error: RefCOCOg refs {path} is not a readable plain-data pickle: "
                                      "UnpicklingError: it names io.open, which a refs file never does (refused, not "
                                      "run)")
        load = lambda: pickle.load(open(path, "rb"))  # noqa: E731
    assert not os.path.exists(marker)
    load()                                           # the file is a real threat: an unrestricted load runs its code
    assert os.path.exists(marker)


# ---- every name a data file gives stays inside its data root -------------------------------------------------------

def escape_record(name, root, bad):
    """Add to `name`'s fixture one record whose image name is `bad` -> where the record is (for the warning)."""
    if name == "comvg":
        with open(os.path.join(root, "comvg.csv"), "a", newline="") as f:
            csv.writer(f).writerow(("9", "a red circle", "c,is,red", "c,is,blue", bad, "11", "subject"))
        return "comvg.csv:5"
    if name == "winoground":
        with open(os.path.join(root, "examples.jsonl"), "a") as f:
            f.write(json.dumps(dict(id=9, image_0=bad, image_1="ex_0_img_1", caption_0="a red circle",
                                    caption_1="a blue circle", collapsed_tag="Object")) + "\n")
        return "examples.jsonl:4"
    if name == "vlchecklist":
        path = os.path.join(root, "data", "Attribute", "vg", "color.json")
        data = json.load(open(path)) + [[bad, {"POS": ["a red ball"], "NEG": ["a blue ball"]}]]
        json.dump(data, open(path, "w"))
        return "color.json[3]"
    if name == "refcocog":
        path = os.path.join(root, "refcocog", "refs(umd).p")
        refs = pickle.load(open(path, "rb")) + [dict(ref_id=77, ann_id=777, image_id=bad, split="val", category_id=1,
                                                     sentences=[dict(sent="the red thing", sent_id=7777)])]
        pickle.dump(refs, open(path, "wb"), protocol=2)
        return "refs(umd).p[ref_id 77]"
    if name == "vqav2":
        with open(os.path.join(root, "test.txt"), "a") as f:
            f.write(f"{bad}*The question is asking about yes or no: is it red? it is red\n")
        return "test.txt:"
    raise ValueError(name)


WRITERS = {"comvg": lambda r: write_comvg(r, bad_line=False, missing=False),
           "winoground": lambda r: write_winoground(r, bad_line=False), "vlchecklist": write_vlchecklist,
           "refcocog": write_refcocog, "vqav2": write_vqa_paper}


@pytest.mark.parametrize("kind", ["../", "absolute"])
@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_name_in_a_data_file_cannot_leave_the_data_root(name, kind, tmp_path):
    """The file the name points at exists outside the root (an image, so the old loaders took it): the record is
    malformed, reported with its place, and no item reads anything outside the root; a symlink the user placed
    inside the root may still point out."""
    root = WRITERS[name](str(tmp_path / "data" / name))
    ext = {"winoground": ".png"}.get(name, ".jpg")
    outside = image(str(tmp_path / f"outside{ext}"), "red")
    before, report0 = datasets.load_items(name, root)
    rel = os.path.relpath(outside, {"winoground": os.path.join(root, "images")}.get(name, root))
    bad = outside if kind == "absolute" else rel
    if name == "comvg":
        bad = bad[:-4]                                  # ComVG names an image by its id: <id>.jpg
    if name == "vqav2":                                 # test.txt: <image>*<statement>, the image in val2014/
        bad = bad if kind == "absolute" else "../outside.jpg"
    where = escape_record(name, root, bad)
    items, report = datasets.load_items(name, root)
    assert report["malformed"] == report0["malformed"] + 1 and len(items) == len(before)
    assert any(where in w for w in report["warnings"]), report["warnings"]
    real_root = os.path.realpath(root)
    assert all(os.path.realpath(p).startswith(real_root + os.sep) for it in items for p in it.images)
    if name == "comvg":                                 # a symlink placed inside the root is the user's choice
        os.symlink(os.path.dirname(outside), os.path.join(root, "linked"))
        with open(os.path.join(root, "comvg.csv"), "a", newline="") as f:
            csv.writer(f).writerow(("10", "a red circle", "c,is,red", "c,is,blue", "linked/outside", "11", "subject"))
        linked, _ = datasets.load_items(name, root)
        assert linked[-1].id == "10" and os.path.realpath(linked[-1].images[0]) == os.path.realpath(outside)


# ---- an output never replaces an input -------------------------------------------------------------------------------

OUTPUT_CASES = ["the checkpoint", "the annotation file", "under --model", "an image of the data set",
                "the annotation file found by name", "OUTPUT.items holds the checkpoint", "res.items",
                "a file at OUTPUT.items", "a name over 255 bytes", "train: output dir is the model",
                "train: the annotation file", "allowed: a new file in the data root, twice"]


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_an_output_that_is_an_input_is_refused_before_any_work(case, tmp_path, capsys, no_model, monkeypatch):
    root = write_comvg(str(tmp_path / "comvg"), bad_line=False, missing=False)
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    ckpt = tmp_path / "runs.items" / "deltas.safetensors"      # runs.json's partial folder: see that case
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"trained")
    csv_path = os.path.join(root, "comvg.csv")
    base = ["--dataset", "comvg", "--data-root", root, "--model", str(model), "--checkpoint", str(ckpt)]
    output, where = {
        "the checkpoint": (ckpt, f"it is the checkpoint {ckpt}"),
        "the annotation file": (csv_path, f"it is the annotations {csv_path}"),
        "under --model": (model / "unet" / "r.json", f"it lies inside the --model folder {model}"),
        "an image of the data set": (os.path.join(root, "VG_100K", "10.jpg"),
                                     f"it is the image {os.path.join(root, 'VG_100K', '10.jpg')}"),
        "the annotation file found by name": (csv_path, f"it is the annotation file {csv_path}"),
        "allowed: a new file in the data root, twice": (os.path.join(root, "r.json"), None),
        "OUTPUT.items holds the checkpoint": (tmp_path / "runs.json", f"it holds the checkpoint {ckpt}"),
        "res.items": (tmp_path / "res.items", "which is this name itself; choose a name not ending in .items"),
        "a file at OUTPUT.items": (tmp_path / "r.json", f"to {tmp_path / 'r.items'}: a file is there, not a folder"),
        "a name over 255 bytes": (tmp_path / ("r" * 250 + ".json"), "bytes, over this file system's limit of"),
        "train: output dir is the model": (model, f"it lies inside the --model folder {model}"),
        "train: the annotation file": (tmp_path / "out", "it is the annotations")}[case]
    if case == "a file at OUTPUT.items":
        (tmp_path / "r.items").write_text("someone's file")
    extra = ["--annotations", csv_path] if case.endswith("annotation file") else []
    if case.startswith("allowed"):                      # written where the data are, and again: not an input
        monkeypatch.setattr(methods, "build", lambda *a, **k: FakeModel())
        for _ in range(2):
            assert evaluate.main(base + ["--output", str(output)]) == 0
        assert json.load(open(output))["datasets"]["comvg"]["n_items"] == 3
        return
    if case.startswith("train"):
        if case.endswith("annotation file"):            # the CSV lies where train.py writes its results.json
            (tmp_path / "out").mkdir()
            os.replace(csv_path, tmp_path / "out" / "results.json")
            extra = ["--annotations", str(tmp_path / "out" / "results.json")]
        argv = base[:6] + ["--output-dir", str(output)] + extra
        assert run_cli(train.main, argv) == 2
    else:
        assert evaluate.main(base + extra + ["--output", str(output)]) == 2
    line = error_line(capsys)
    assert where in line, line
    assert ckpt.read_bytes() == b"trained" and os.path.getsize(os.path.join(root, "VG_100K", "10.jpg")) > 0
    assert not os.path.exists(tmp_path / "out" / "checkpoint.pt")
    assert not [p for p in os.listdir(tmp_path) if p.startswith("r.items.tmp")]


# ---- silent coercions are errors or counted skips --------------------------------------------------------------------

COERCIONS = ["VL-CheckList POS a string", "VL-CheckList NEG holds a number", "Winoground caption a list",
             "Winoground caption a dict", "VQAv2 question a list", "COCO caption a dict", "ComVG column twice", "VQAv2 column twice", "checkpoint lam -1",
             "checkpoint lam 0", "checkpoint lam nan", "checkpoint pooling bogus", "--methods twice",
             "--compare twice"]


@pytest.mark.parametrize("case", COERCIONS)
def test_a_value_of_the_wrong_kind_is_an_error_or_a_counted_skip(case, tiny_sd, random_deltas, tmp_path, capsys):
    out = str(tmp_path / "r.json")
    if case.startswith("VL-CheckList"):
        root = write_vlchecklist(str(tmp_path / "vlc"))
        path = os.path.join(root, "data", "Attribute", "vg", "color.json")
        texts = {"POS": "abc", "NEG": ["a blue ball"]} if "POS" in case else {"POS": ["a red ball"], "NEG": [7]}
        json.dump(json.load(open(path))[:2] + [["VG_100K/1.jpg", texts]], open(path, "w"))
        items, report = datasets.load_items("vlchecklist", root)
        assert report["malformed"] == 1 and f"{path}[2]" in report["warnings"][0] and len(items) == 3
        assert all(isinstance(t, str) and len(t) > 1 for it in items for t in it.texts)
    elif case.startswith("Winoground"):
        root = write_winoground(str(tmp_path / "wino"), bad_line=False)
        path = os.path.join(root, "examples.jsonl")
        lines = open(path).read().splitlines()
        ex = json.loads(lines[0])
        ex["caption_1"] = ["a", "blue circle"] if "list" in case else {"text": "a blue circle"}
        open(path, "w").write("\n".join([json.dumps(ex)] + lines[1:]) + "\n")
        items, report = datasets.load_items("winoground", root)
        assert report["malformed"] == 1 and [it.id for it in items] == ["1", "2"]
        assert report["warnings"][0].startswith(f"{path}:1: caption_1 is ")
    elif case.startswith(("VQAv2 question", "COCO")):
        vqa = case.startswith("VQAv2")
        root = (write_vqav2 if vqa else write_coco)(str(tmp_path / "d"))
        path = os.path.join(root, "v2_OpenEnded_mscoco_val2014_questions.json" if vqa else
                            os.path.join("annotations", "captions_train2014.json"))
        data = json.load(open(path))
        before, report0 = datasets.load_items("vqav2" if vqa else "coco", root)
        records = data["questions"] if vqa else data["annotations"]
        text = records[0]["question" if vqa else "caption"]
        records[0]["question" if vqa else "caption"] = text.split() if vqa else {"text": text}
        json.dump(data, open(path, "w"))
        items, report = datasets.load_items("vqav2" if vqa else "coco", root)
        assert report["malformed"] == report0["malformed"] + 1 and len(items) == len(before) - 1
        assert f"{path}[0]" in " ".join(report["warnings"])
        assert all(isinstance(t, str) and not t.startswith(("[", "{")) for it in items for t in it.texts)
    elif case.endswith("column twice"):
        if case.startswith("ComVG"):
            root = write_comvg(str(tmp_path / "comvg"), bad_line=False, missing=False)
            path, name, column = os.path.join(root, "comvg.csv"), "comvg", "sentence"
            rows = open(path).read().splitlines()
            open(path, "w").write("\n".join([rows[0] + ",sentence"] + [r + ",other text" for r in rows[1:]]) + "\n")
        else:
            root = write_vqa_paper(str(tmp_path / "vqa"))
            path, name, column = os.path.join(root, "vqa_text_test.csv"), "vqav2", "neg_sentence_3"
            rows = open(path).read().splitlines()
            open(path, "w").write("\n".join([rows[0] + ",neg_sentence_3"] + [r + ",x" for r in rows[1:]]) + "\n")
        assert evaluate.main(["--dataset", name, "--data-root", root, "--output", out]) == 2
        assert error_line(capsys).endswith(f"{path}: the header names the column {column!r} 2 times")
    elif case.startswith("checkpoint"):
        root = write_comvg(str(tmp_path / "comvg"), bad_line=False, missing=False)
        good = random_deltas(scale=0.05)
        meta, tensors = read_checkpoint(good)
        key, value = case.split()[1:]
        path = str(tmp_path / "bad.safetensors")
        save_tensors(path, tensors, dict(meta, scorer=dict(meta["scorer"], **{key: float(value) if key == "lam"
                                                                                else value})))
        argv = ["--dataset", "comvg", "--data-root", root, "--model", tiny_sd, "--device", "cpu", "--output", out]
        assert evaluate.main(argv + ["--checkpoint", path]) == 2
        rule = (f"must be finite and > 0, got {float(value)}" if key == "lam" else
                "choose from lse, max, mean, cosine, official, got 'bogus'")
        assert error_line(capsys) == f"error: checkpoint {path}: its recorded {key}: {rule}"
        assert evaluate.main(argv + ["--checkpoint", good]) == 0        # the same file with its own values loads
    elif case == "--methods twice":
        assert evaluate.main(["--methods", "discffusion,clip_ft,discffusion", "--output", out]) == 2
        assert error_line(capsys).startswith("error: argument --methods: discffusion named twice")
    else:
        assert run_cli(train.main, ["--dataset", "comvg", "--compare", "diffusion_itm,diffusion_itm"]) == 2
        assert error_line(capsys).startswith("error: --compare: diffusion_itm named twice")


# ---- the CPU threads of a run (tools/cli.py): --threads, else the cores the load average leaves free ------------

def test_default_threads_leaves_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(cli.torch, "get_num_threads", lambda: 8)
    for load, expected in ((0.0, 8), (2.4, 6), (5.6, 2), (7.9, 1), (30.0, 1)):
        monkeypatch.setattr(cli.os, "getloadavg", lambda load=load: (load, load, load))
        assert cli.default_threads() == expected, load
    monkeypatch.setattr(cli.torch, "get_num_threads", lambda: 4)   # never more than torch would use
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert cli.default_threads() == 4


def test_use_threads_sets_torch_and_returns_the_number(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert cli.use_threads(3) == 3 and torch.get_num_threads() == 3
        monkeypatch.setattr(cli, "default_threads", lambda: 2)
        assert cli.use_threads(None) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
# ---- images open as raster formats only: a PostScript file named .jpg never reaches Ghostscript ------------------

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto showpage\n"


@pytest.mark.parametrize("where", ["evaluate", "figures", "download check"])
def test_eps_named_jpg_is_never_opened_as_postscript(where, tmp_path, monkeypatch, capsys):
    from PIL import EpsImagePlugin
    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(self.fp))
    root = write_comvg(str(tmp_path / "comvg"), bad_line=False, missing=False)
    eps = os.path.join(root, "VG_100K", "10.jpg")
    pathlib.Path(eps).write_bytes(EPS)
    if where == "evaluate":
        monkeypatch.setattr(methods, "build", lambda *a, **k: FakeModel())
        assert evaluate.main(["--dataset", "comvg", "--data-root", root, "--output", str(tmp_path / "r.json")]) == 0
        res = json.loads((tmp_path / "r.json").read_text())["datasets"]["comvg"]
        assert res["n_items"] == 1 and res["unreadable"] == 2           # items 1 and 3 use 10.jpg: skipped, counted
    elif where == "figures":
        with pytest.raises(common.InputError, match="is not a readable image"):
            figures.load_image(eps)
    else:
        from benchmarks.fetching import image_check
        assert image_check(eps).startswith("not a readable image")
    assert opened == []                                                   # PIL's EPS plugin (Ghostscript) never ran


# ---- pickled weights: read with torch.load(weights_only=True); one naming a function is refused, never run --------

class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))                               # what a crafted pickle would do on load


@pytest.mark.parametrize("part", ["text_encoder", "unet", "lora", "clip"])
def test_crafted_pickled_weights_are_refused_not_run(part, tiny_sd, tmp_path):
    from baselines.clip_baselines import ClipMatcher
    from tools.sd_configs import make_random_clip
    marker = str(tmp_path / "ran")
    if part == "clip":
        folder = make_random_clip(str(tmp_path / "clip"))
    else:
        folder = shutil.copytree(tiny_sd, tmp_path / "sd")
    where = {"text_encoder": "sd/text_encoder/pytorch_model.bin", "unet": "sd/unet/diffusion_pytorch_model.bin",
             "lora": "lora/pytorch_lora_weights.bin", "clip": "clip/pytorch_model.bin"}[part]
    path = tmp_path / where
    os.makedirs(path.parent, exist_ok=True)
    for f in path.parent.glob("*.safetensors"):
        f.unlink()                                                      # the pickle is the only weight file there
    torch.save({"w": RunsCode(marker)}, path)
    with pytest.raises(common.InputError) as e, pytest.warns(UserWarning, match="weights are pickles"):
        if part == "clip":
            ClipMatcher.from_pretrained(str(folder), device="cpu")
        else:
            Discffusion.from_pretrained(str(folder), device="cpu", lora=str(path.parent) if part == "lora" else None)
    assert "it names posix.mkdir; refused, not run" in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(marker)


# ---- model configs: sizes bounded before anything is allocated; a bad config is one line --------------------------

CONFIGS = {  # case: (file, {key: value} to set, None to delete; what the line names)
    "timesteps 2e9": ("scheduler/scheduler_config.json", {"num_train_timesteps": 2_000_000_000}, "num_train_timesteps"),
    "timesteps 0": ("scheduler/scheduler_config.json", {"num_train_timesteps": 0}, "num_train_timesteps"),
    "timesteps 1": ("scheduler/scheduler_config.json", {"num_train_timesteps": 1}, "num_train_timesteps"),
    "beta schedule": ("scheduler/scheduler_config.json", {"beta_schedule": "cubic"}, "beta_schedule 'cubic'"),
    "bad betas": ("scheduler/scheduler_config.json", {"trained_betas": [0.5, -1]}, "trained_betas"),
    "beta_end": ("scheduler/scheduler_config.json", {"beta_end": 7}, "beta_end 7"),
    "sample_size 2048": ("unet/config.json", {"sample_size": 2048}, "sample_size 2048"),
    "no model_max_length": ("tokenizer/tokenizer_config.json", {"model_max_length": None}, "model_max_length not set"),
    "sizes unlike the weights": ("text_encoder/config.json", {"hidden_size": 48}, "text_encoder/"),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_model_config_bounds_and_errors(case, tiny_sd, tmp_path, monkeypatch):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    folder = shutil.copytree(tiny_sd, tmp_path / "sd")
    file, changes, named = CONFIGS[case]
    config = json.loads((folder / file).read_text())
    for k, v in changes.items():
        config.pop(k) if v is None else config.__setitem__(k, v)
    (folder / file).write_text(json.dumps(config))
    if "model_max_length" not in case and case != "sizes unlike the weights":  # refused before any weights are read
        monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", None)
        monkeypatch.setattr(DDPMScheduler, "from_pretrained", None)
    with pytest.raises(common.InputError) as e:
        Discffusion.from_pretrained(str(folder), device="cpu")
    assert named in str(e.value) and "\n" not in str(e.value), e.value


# ---- a long caption line (32 MB in the issue): only the start the 77-token cut keeps is tokenized ------------------------------------

@pytest.mark.parametrize("caption", ["a red circle " * 20_000, "a" + " " * 300_000 + "red circle"],
                         ids=["words", "whitespace"])
def test_huge_caption_tokenizes_only_what_the_cut_keeps(caption, tiny_sd):
    model = Discffusion.from_pretrained(tiny_sd, device="cpu")
    tok = model.tokenizer
    seen = []
    real = type(tok).__call__

    def spy(self, texts, *a, **k):
        seen.extend(len(t) for t in texts)
        return real(self, texts, *a, **k)
    L = tok.model_max_length
    direct = tok([caption], padding="max_length", max_length=L, truncation=True).input_ids
    with pytest.MonkeyPatch.context() as m:
        m.setattr(type(tok), "__call__", spy)
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            model.encode_texts([caption])
    assert any("truncated" in str(w.message) for w in warned) == (len(caption.split()) > L)  # the cut told
    assert max(seen) <= (L + 1) * common.CHARS_PER_TOKEN                    # never the whole 32 MB line
    assert model.tokenize(tok, [common.cut_text(caption, L + 1)]).input_ids.tolist() == direct  # the same ids


# ---- the image cache is bounded in pixels, not only in count ---------------------------------------------------------

def test_image_cache_holds_a_bounded_number_of_pixels(tmp_path):
    paths = [image(str(tmp_path / f"{i}.png"), color, size=64) for i, color in enumerate(["red", "green", "blue"] * 3)]
    cache = datasets.ImageCache(size=64, pixels=3 * 64 * 64)              # room for three 64 x 64 images
    for p in paths:
        im = cache.get(p)
        assert list(im.getdata()) == list(datasets.open_image(p).getdata())  # what open_image gives
        assert sum(i.width * i.height for i in cache.images.values()) <= 3 * 64 * 64
    assert [k[0] for k in cache.images] == paths[-3:]                   # the most recently used kept
    big = datasets.ImageCache(size=64, pixels=10)                          # one image over the budget: still served
    assert big.get(paths[0]).size == (64, 64) and len(big.images) == 1


# ---- two runs on one output: their own temporary names, and the second live run refused ----------------------------

def test_two_writers_of_one_path_never_share_a_temporary_file(tmp_path):
    path = tmp_path / "r.json"

    def outer(tmp):
        pathlib.Path(tmp).write_text("outer, first half")
        common.atomic_write(path, lambda t: pathlib.Path(t).write_text("inner"))   # another writer, meanwhile
        with open(tmp, "a") as f:
            f.write(", second half")
    common.atomic_write(path, outer)
    assert path.read_text() == "outer, first half, second half"
    assert os.listdir(tmp_path) == ["r.json"]                             # no temporary file left


@pytest.mark.parametrize("cli_name", ["evaluate", "train"])
def test_second_live_run_on_one_output_is_refused(cli_name, tmp_path, no_model, capsys):
    root = write_comvg(str(tmp_path / "comvg"), bad_line=False, missing=False)
    out = tmp_path / ("r.json" if cli_name == "evaluate" else "run")
    with cli.held(str(tmp_path / "link" / ".." / out.name), "--output"):  # the first run, still live (another spelling)
        if cli_name == "evaluate":
            code = evaluate.main(["--dataset", "comvg", "--data-root", root, "--output", str(out)])
        else:
            code = run_cli(train.main, train_argv(str(tmp_path / "no-model"), root, out))
        assert code == 2
        line = error_line(capsys)
        assert line.startswith(f"error: --output{'-dir' if cli_name == 'train' else ''} {out}: another run is "
                               "writing it now"), line
    assert not os.path.exists(out)                                        # the refused run wrote nothing
    with cli.held(str(out), "--output"):                                  # the hold ends with its run
        pass


# ---- partial files belong to their output: results.txt never deletes results.json's scores -----------------------

class StopsAfterOne(FakeModel):
    def score_items(self, items, spent=None):
        if self.calls:
            raise KeyboardInterrupt                                       # Ctrl-C during the second call
        return super().score_items(items)


def test_another_outputs_stem_cannot_delete_partial_files(tmp_path, monkeypatch, capsys):
    root = write_comvg(str(tmp_path / "comvg"), bad_line=False, missing=False)
    argv = ["--dataset", "comvg", "--data-root", root, "--pairs-per-call", "1"]
    monkeypatch.setattr(methods, "build", lambda *a, **k: StopsAfterOne())
    assert evaluate.main(argv + ["--output", str(tmp_path / "r.json")]) == 130        # killed: 1 item kept
    kept = sorted(str(p) for p in (tmp_path / "r.items").rglob("part-*.jsonl"))
    assert kept and (tmp_path / "r.items" / "owner.json").exists()
    capsys.readouterr()
    monkeypatch.setattr(methods, "build", lambda *a, **k: FakeModel())
    assert evaluate.main(argv + ["--output", str(tmp_path / "r.txt")]) == 2            # same stem, another output
    assert error_line(capsys).startswith(f"error: --output {tmp_path / 'r.txt'}: {tmp_path / 'r.items'} holds the "
                                         f"partial scores of another output, {tmp_path / 'r.json'}")
    assert sorted(str(p) for p in (tmp_path / "r.items").rglob("part-*.jsonl")) == kept
    assert evaluate.main(argv + ["--output", str(tmp_path / "r.json"), "--resume"]) == 0  # its own run resumes
    out = capsys.readouterr().out
    assert "1 of 3 items already scored" in out and not (tmp_path / "r.items").exists()


# ---- a full disk while appending partial records: one line, the records before kept for --resume -------------------

def test_disk_full_appending_partial_records(tmp_path, monkeypatch, capsys):
    root = write_comvg(str(tmp_path / "comvg"), bad_line=False, missing=False)
    argv = ["--dataset", "comvg", "--data-root", root, "--pairs-per-call", "1", "--output", str(tmp_path / "r.json")]
    monkeypatch.setattr(methods, "build", lambda *a, **k: FakeModel())
    real_open = open

    class FillsUp:                                                        # room for one record, then ENOSPC
        def __init__(self, *a, **k):
            self.f, self.writes, self.name = real_open(*a, **k), 0, a[0]

        def write(self, text):
            self.writes += 1
            if self.writes > 1:
                self.f.write(text[:7])                                    # half a line reaches the disk
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(text)

        def flush(self):
            self.f.flush()

        def close(self):
            self.f.close()
    monkeypatch.setattr(resume, "open", FillsUp, raising=False)
    assert evaluate.main(argv) == 2
    part = next((tmp_path / "r.items").rglob("part-0.jsonl"))
    assert error_line(capsys) == (f"error: cannot write {part}: no space left on device; the items scored before "
                                  "are kept there: free some space, then rerun with --resume")
    monkeypatch.undo()
    monkeypatch.setattr(methods, "build", lambda *a, **k: FakeModel())
    assert evaluate.main(argv + ["--resume"]) == 0                        # the half line dropped, one item kept
    assert "1 of 3 items already scored" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["datasets"]["comvg"]["n_items"] == 3


# ---- SIGHUP (a closed terminal) stops training like SIGTERM; a second Ctrl-C while the first is handled -----------

def test_sighup_in_training_checkpoints_the_finished_step(tiny_sd, tmp_path, monkeypatch, capsys):
    import signal
    root = write_train_comvg(str(tmp_path / "comvg"))
    out = tmp_path / "run"
    real, calls = torch.optim.AdamW.step, []
    before = signal.getsignal(signal.SIGHUP)

    def step(self, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGHUP)                          # the terminal closes during step 1
        return real(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert run_cli(train.main, train_argv(tiny_sd, root, out, "--steps", "3", "--save-every", "100")) == 129
    err = capsys.readouterr().err
    assert "SIGHUP: stopping after this step" in err and "Traceback" not in err
    assert f"interrupted at step 1 of 3 (checkpoint {out}/checkpoint.pt); resume with:" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1 and len(calls) == 1
    assert signal.getsignal(signal.SIGHUP) == before                      # the handler given back


@pytest.mark.parametrize("stop", ["KeyboardInterrupt", "Interrupted", "evaluate"])
def test_second_ctrl_c_while_the_first_is_handled(stop, tmp_path, monkeypatch):
    import signal
    import sys
    written = []

    class Stderr:                                                         # the second Ctrl-C comes as the line prints
        def write(self, text):                                            # (not in a progress bar's write, which
            if text.startswith("interrupted") and not any(w.startswith("interrupted") for w in written):
                os.kill(os.getpid(), signal.SIGINT)                       # holds tqdm's lock)
            written.append(text)

        def flush(self):
            pass
    if stop == "evaluate":
        root = write_comvg(str(tmp_path / "comvg"), bad_line=False, missing=False)
        monkeypatch.setattr(methods, "build", lambda *a, **k: StopsAfterOne())
        real_line = evaluate.interrupted_line                            # a second Ctrl-C while the line is made
        monkeypatch.setattr(evaluate, "interrupted_line", lambda *a: os.kill(os.getpid(), signal.SIGINT) or real_line(*a))
        monkeypatch.setattr(sys, "stderr", Stderr())
        code = evaluate.main(["--dataset", "comvg", "--data-root", root, "--pairs-per-call", "1",
                              "--output", str(tmp_path / "r.json")])
        monkeypatch.undo()
        lines = [w for w in written if w.startswith("interrupted")]
        assert code == 130 and len(lines) == 1 and lines[0].startswith("interrupted (Ctrl-C): the items scored so "
                                                                         "far are kept")
        return

    def main(argv):
        if stop == "Interrupted":
            raise cli.Interrupted("interrupted at step 1 of 3 (checkpoint c.pt)")
        raise KeyboardInterrupt
    monkeypatch.setattr(sys, "stderr", Stderr())
    code = run_cli(main, [])
    monkeypatch.undo()
    assert code == 130 and written[0].startswith("interrupted")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again afterwards


# ---- VQAv2's paper files: a BOM, other encodings, an id like '²'; wrong JSON types in VQAv2, RefCOCOg, COCO ---------

def test_vqav2_test_txt_with_a_bom_loads_every_item(tmp_path):
    root = write_vqa_paper(str(tmp_path / "vqa"))
    items, report = datasets.load_items("vqav2", root)
    path = os.path.join(root, "test.txt")
    pathlib.Path(path).write_bytes(b"\xef\xbb\xbf" + pathlib.Path(path).read_bytes())
    bom_items, bom_report = datasets.load_items("vqav2", root)
    assert [it.id for it in bom_items] == [it.id for it in items] and bom_report["malformed"] == report["malformed"]


@pytest.mark.parametrize("file", ["test.txt", "vqa_text_test.csv"])
def test_vqav2_paper_file_not_utf8_is_one_line(file, tmp_path, capsys):
    root = write_vqa_paper(str(tmp_path / "vqa"))
    path = os.path.join(root, file)
    with open(path, "ab") as f:
        f.write(b"COCO_val2014_000000000001.jpg*caf\xe9\n")
    assert main_of(evaluate, ["--dataset", "vqav2", "--data-root", root]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: VQAv2 {path} is not UTF-8 text: byte 0xe9 at offset "), line


def test_vqav2_image_id_in_other_digits_is_malformed(tmp_path):
    root = write_vqa_paper(str(tmp_path / "vqa"))
    path = os.path.join(root, "vqa_text_test.csv")
    items, report = datasets.load_items("vqav2", root)
    rows = list(csv.reader(open(path, encoding="utf-8")))
    rows.append(["²"] + rows[1][1:] if rows[0][0] == "pos_image_id" else
                [("²" if c == "pos_image_id" else v) for c, v in zip(rows[0], rows[1])])
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    items2, report2 = datasets.load_items("vqav2", root)
    assert len(items2) == len(items) and report2["malformed"] == report["malformed"] + 1


WRONG_TYPES = {  # data set: (file under root, how the JSON is spoiled)
    "vqav2 top level a list": ("vqav2", "v2_OpenEnded_mscoco_val2014_questions.json", lambda d: [d]),
    "vqav2 question_id a list": ("vqav2", "v2_OpenEnded_mscoco_val2014_questions.json",
                                 lambda d: dict(d, questions=[dict(d["questions"][0], question_id=[1])] + d["questions"])),
    "vqav2 annotation question_id a dict": ("vqav2", "v2_mscoco_val2014_annotations.json",
                                            lambda d: dict(d, annotations=[dict(d["annotations"][0], question_id={})]
                                                           + d["annotations"])),
    "coco images a number": ("coco", "annotations/captions_train2014.json", lambda d: dict(d, images=7)),
    "coco image_id a list": ("coco", "annotations/captions_train2014.json",
                             lambda d: dict(d, annotations=d["annotations"] + [dict(image_id=[1], id=5, caption="a")])),
    "coco image id a list": ("coco", "annotations/captions_train2014.json",
                             lambda d: dict(d, images=d["images"] + [dict(id=[2], file_name="x.jpg")])),
    "refcocog instances a list": ("refcocog", "refcocog/instances.json", lambda d: [d]),
    "refcocog image id a dict": ("refcocog", "refcocog/instances.json",
                                 lambda d: dict(d, images=d["images"] + [dict(id={}, file_name=3)])),
}


@pytest.mark.parametrize("case", WRONG_TYPES)
def test_wrong_json_types_in_annotation_files(case, tmp_path, capsys):
    name, file, spoil = WRONG_TYPES[case]
    root = {"vqav2": write_vqav2, "coco": write_coco, "refcocog": write_refcocog}[name](str(tmp_path / name))
    path = os.path.join(root, file)
    pathlib.Path(path).write_text(json.dumps(spoil(json.loads(pathlib.Path(path).read_text()))))
    try:
        items, report = datasets.load_items(name, root)
    except common.InputError as e:                                       # the file as a whole is unusable
        assert "\n" not in str(e) and (file.split("/")[-1] in str(e) or "records" in str(e)), e
        return
    assert report["malformed"] >= 1 or "instances.json" in file or "images" in case


# ---- trained files: real float tensors only, another base model warned about, a LoRA rank the tensors have --------

def respoiled(path, out, tensors=None, **meta):
    """A copy of a safetensors file with some tensors and metadata replaced."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        raw, saved = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    save_file(dict(saved, **(tensors or {})), str(out), metadata=dict(raw, **{k: json.dumps(v) for k, v in meta.items()}))
    return str(out)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64, torch.float16])
def test_deltas_of_other_dtypes(dtype, tiny_sd, random_deltas, tmp_path):
    path = random_deltas(scale=0.3, seed=3)
    key = next(k for k in load_file(path) if k.startswith("delta_k"))
    t = load_file(path)[key]
    bad = respoiled(path, tmp_path / "d.safetensors", {key: (t * 3).to(dtype)})
    model = Discffusion.from_pretrained(tiny_sd, device="cpu")
    if dtype == torch.float16:                                           # a real float: loads as float32
        model.load_trained(bad)
        return
    with pytest.raises(common.InputError, match=f"{key} is {str(dtype).replace('torch.', '')}, not a real floating"):
        model.load_trained(bad)


def test_deltas_for_another_base_model_warn(tiny_sd, random_deltas, tmp_path):
    path = random_deltas(scale=0.3, seed=3)
    other = respoiled(path, tmp_path / "d.safetensors", base_model="someone/other-model")
    model = Discffusion.from_pretrained(tiny_sd, device="cpu")
    with pytest.warns(UserWarning, match="trained on 'someone/other-model', loading onto"):
        model.load_trained(other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Discffusion.from_pretrained(tiny_sd, device="cpu").load_trained(path)   # its own base model: silent


def test_lora_file_claiming_a_huge_rank_is_refused_before_allocating(tiny_sd, tmp_path, monkeypatch):
    from baselines.diffusion_itm import DiffusionITM
    m = DiffusionITM.from_pretrained(tiny_sd, device="cpu", n_timesteps=2)
    m.add_lora(rank=2)
    path = str(tmp_path / "lora.safetensors")
    m.save_trained(path)
    lora = dict(m.lora, rank=100_000_000)
    bad = respoiled(path, tmp_path / "bad.safetensors", lora=lora)
    fresh = DiffusionITM.from_pretrained(tiny_sd, device="cpu", n_timesteps=2)
    monkeypatch.setattr(DiffusionITM, "add_lora", None)                  # nothing may be allocated first
    with pytest.raises(common.InputError, match="metadata says LoRA rank 100000000, its lora_A tensors have rank"):
        fresh.load_trained(bad)


# ---- VL-CheckList: a blank caption is a malformed record; --vlc-max-per-file must be >= 0 ---------------------------

def test_vlchecklist_blank_caption_is_counted_malformed(tmp_path, monkeypatch):
    root = write_vlchecklist(str(tmp_path / "vlc"))
    items, report = datasets.load_items("vlchecklist", root)
    path = os.path.join(root, "data", "Attribute", "vg", "color.json")
    data = json.loads(pathlib.Path(path).read_text())
    data.append(["VG_100K/1.jpg", {"POS": ["  \t"], "NEG": ["a blue ball"]}])
    pathlib.Path(path).write_text(json.dumps(data))
    items2, report2 = datasets.load_items("vlchecklist", root)
    assert len(items2) == len(items) and report2["malformed"] == report["malformed"] + 1
    monkeypatch.setattr(methods, "build", lambda *a, **k: FakeModel())     # the run goes on past it
    assert evaluate.main(["--dataset", "vlchecklist", "--data-root", root, "--output", str(tmp_path / "r.json")]) == 0


def test_vlc_max_per_file_negative_is_a_usage_error(tmp_path, no_model, capsys):
    root = write_vlchecklist(str(tmp_path / "vlc"))
    assert evaluate.main(["--dataset", "vlchecklist", "--data-root", root, "--vlc-max-per-file", "-1"]) == 2
    assert error_line(capsys) == "error: argument --vlc-max-per-file: must be >= 0 (0 = all), got -1 (see --help)"
