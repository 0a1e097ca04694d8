"""Every stop resumes, sizes are bounded, and the remaining tracebacks are one line (issue 22, its stops and bounds):
SIGTERM ends training as Ctrl-C does (exit 143) and --resume ends with the deltas of an uninterrupted run; Ctrl-C and
SIGTERM in evaluate.py are one line with the resume command, the partial files kept and resumed; image sizes are
refused before anything is allocated; unreadable training images are skipped and counted; file-system problems,
oversized CSV fields and deeply nested JSON are one `error:` line (exit 2); nothing is created before the inputs are
checked."""
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

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
from tools import benchmark, cli, download, figures, shapes
from tools.cli import run_cli
from discffusion import Discffusion
from test_datasets import write_comvg, write_vlchecklist, write_winoground
from test_evaluate import FakeModel
from test_reliability import error_line, no_model, read_only  # noqa: F401 - fixtures
from test_train import write_comvg as write_train_comvg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SHAPES = os.path.join(REPO, "models", "tiny-shapes-sd")
WAIT = 300  # seconds: the most any subprocess wait may take (a deadline on time.monotonic, not a measurement)


def wait_for(path, proc, seconds=WAIT):
    """Until `path` exists or `proc` has ended, at most `seconds`."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def child_env(tmp_path):
    return dict(os.environ, MARKER=str(tmp_path / "marker"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))


# ---- SIGTERM in training: the step ends, the checkpoint is written, exit 143, --resume is bit-identical ------------

TRAIN_CHILD = r"""
import os, runpy, signal, sys, time
import torch
real, calls = torch.optim.AdamW.step, []
def step(self, *a, **k):  # in step 1: tell the parent, wait (at most 120 s) until its SIGTERM has been handled
    calls.append(1)
    if len(calls) == 1:
        ours = signal.getsignal(signal.SIGTERM)
        open(os.environ["MARKER"], "w").close()
        deadline = time.monotonic() + 120
        while signal.getsignal(signal.SIGTERM) is ours and time.monotonic() < deadline:
            time.sleep(0.01)
    return real(self, *a, **k)
torch.optim.AdamW.step = step
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def shapes_train_argv(data, out, *extra):
    """The embedded default (shapes world + models/tiny-shapes-sd), a few steps on a tiny batch."""
    return ["--dataset", "shapes", "--data-root", str(data), "--output-dir", str(out), "--steps", "3",
            "--batch-size", "2", "--save-every", "100", "--device", "cpu", "--no-zero-shot", "--eval-limit", "2",
            "--compare", "", *extra]


def test_sigterm_in_training_checkpoints_and_resumes_bit_identically(tmp_path):
    """A real SIGTERM to `python train.py` in step 1 of 3: it finishes the step, writes the checkpoint, prints one
    line with the resume command and exits 143; --resume then ends with the deltas of an uninterrupted run."""
    data = tmp_path / "shapes"
    argv = shapes_train_argv(data, tmp_path / "cut")
    env = child_env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", TRAIN_CHILD, *argv], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(env["MARKER"], proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "Traceback" not in err and "error:" not in err, err
    assert "SIGTERM: stopping after this step" in err
    assert lines[0].startswith(f"interrupted at step 1 of 3 (checkpoint {ckpt}); resume with: python train.py "
                               "--dataset shapes") and lines[0].endswith(" --resume")
    assert ckpt.exists() and not (tmp_path / "cut" / "prompt_deltas.safetensors").exists()
    res = train.main(argv + ["--resume"])
    assert [h["step"] for h in res["train"]["history"]] == [1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL       # the handlers are given back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    train.main(shapes_train_argv(data, tmp_path / "full"))
    a = load_file(tmp_path / "full" / "prompt_deltas.safetensors")
    b = load_file(tmp_path / "cut" / "prompt_deltas.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if k.startswith("delta_k"))  # it trained: not equal by being zero


# ---- Ctrl-C and SIGTERM in evaluate.py: one line, the partial files kept and resumed -----------------------------

EVAL_CHILD = r"""
import os, runpy, sys, time
import torch
import methods
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
def colour(im):
    rgb = im.convert("RGB").getpixel((0, 0))
    return min(COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLORS[c], rgb)))
class Stalls:  # the colour model of test_evaluate.FakeModel; in its second call it waits (at most 120 s) for a signal
    config = {"model": "fake"}
    calls = 0
    def score_items(self, items):
        Stalls.calls += 1
        if Stalls.calls == 2:
            open(os.environ["MARKER"], "w").close()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                time.sleep(0.01)
        return [torch.tensor([[float(colour(im) in t.split()) for t in texts] for im in images])
                for images, texts in items]
methods.build = lambda *a, **k: Stalls()
sys.argv[0] = "evaluate.py"
runpy.run_path("evaluate.py", run_name="__main__")
"""


@pytest.mark.parametrize("signum, code, name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_evaluate_stops_in_one_line_and_resumes(signum, code, name, tmp_path, monkeypatch, capsys):
    """The signal arrives while the second of three items is scored: one line naming the kept partial files and the
    command that resumes; --resume scores only the two items left and gives the results of an uninterrupted run."""
    root = write_comvg(str(tmp_path / "comvg"), bad_line=False, missing=False)
    out = tmp_path / "r.json"
    argv = ["--dataset", "comvg", "--data-root", root, "--output", str(out), "--eval-batch-size", "2"]
    env = child_env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", EVAL_CHILD, *argv], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(env["MARKER"], proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    lines = [x for x in re.split(r"[\r\n]", err) if x.startswith("interrupted")]   # tqdm's bar ends in \r
    assert "Traceback" not in err and len(lines) == 1, err
    line = lines[0]
    assert line == (f"interrupted ({name}): the items scored so far are kept in {tmp_path / 'r.items'}/; resume with: "
                    f"python evaluate.py {' '.join(argv)} --resume")
    part = tmp_path / "r.items" / "comvg" / "discffusion" / "part-0.jsonl"
    assert [json.loads(r)["id"] for r in part.read_text().splitlines()] == ["1"] and not out.exists()

    model = FakeModel()
    monkeypatch.setattr(methods, "build", lambda *a, **k: model)
    capsys.readouterr()
    assert evaluate.main(argv + ["--resume"]) == 0
    assert model.calls == [1, 1] and "1 of 3 items already scored" in capsys.readouterr().out
    resumed = json.loads(out.read_text())["datasets"]["comvg"]
    assert evaluate.main(argv) == 0
    whole = json.loads(out.read_text())["datasets"]["comvg"]
    assert resumed["items"] == whole["items"] and resumed["metrics"] == whole["metrics"] == \
        {"Subjects": 100.0, "Objects": 100.0, "Predicate": 100.0, "Average": 100.0}


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

def train_argv(tiny_sd, root, out, *extra):
    return ["--dataset", "comvg", "--data-root", root, "--model", tiny_sd, "--shots", "6", "--batch-size", "2",
            "--steps", "3", "--lr", "0.05", "--output-dir", str(out), "--device", "cpu", "--no-zero-shot",
            "--eval-limit", "2", *extra]


@pytest.mark.parametrize("which", ["one item", "a whole micro-batch", "every item"])
def test_unreadable_training_images_are_skipped_and_counted(which, tiny_sd, tmp_path, capsys):
    """3 steps of 2 items: one pass over the 6 training items. Their unreadable images (not JPEG bytes) skip those
    items, counted in results.json and said in a line; a micro-batch with nothing readable adds zero gradients; if no
    training item can be read at all, that is one error line."""
    root = write_train_comvg(str(tmp_path / "comvg"))
    items, _ = datasets.load_items("comvg", root)
    train_items, _ = datasets.split_items(items, "6", 0)
    args = train.parse_args(train_argv(tiny_sd, root, tmp_path / "out"))
    first = [train_items[i] for i in train.batch_indices(0, 0, args, len(train_items))]
    bad = {"one item": first[:1], "a whole micro-batch": first, "every item": train_items}[which]
    for it in bad:
        with open(it.images[1], "wb") as f:
            f.write(b"not a JPEG")
    code = run_cli(train.main, train_argv(tiny_sd, root, tmp_path / "out"))
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
