"""Bad input and interruptions (issue 15): every bad option, data file or output location is one `error: ...` line
(exit 2, no traceback); a non-finite score is an error naming the item; a full disk keeps the last good checkpoint;
Ctrl-C checkpoints and resumes bit-identically; ties and duplicate records are counted and reported."""
import csv
import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import datasets
import evaluate
import methods
import train
from tools.cli import run_cli
from tools import benchmark, download, pretrain_shapes, resume, shapes
from test_datasets import write_comvg, write_vlchecklist, write_winoground
from test_evaluate import FakeModel, color_of
from test_train import write_comvg as write_train_comvg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = torch.tensor


def cli(module, argv):
    """The exit code of `python module.py argv`, run in-process."""
    return module.main(argv) if module is evaluate else run_cli(module.main, argv)


def error_line(capsys):
    """The one `error: ...` line on stderr (asserting there is exactly one and no traceback)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any model is built: the error must come first."""
    def build(*a, **k):
        raise AssertionError("a model was built before the error")
    monkeypatch.setattr(methods, "build", build)


def mount_tmpfs(path, options):
    """Mount a tmpfs at `path` -> None, or the reason it cannot be done here."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return "mounting needs root and mount(8)"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    return None if r.returncode == 0 else f"mount -t tmpfs refused: {r.stderr.strip()}"


def umount(path):
    if subprocess.run(["umount", str(path)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


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
    assert cli(module, argv) == 2
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
    assert cli(train, argv) == 2
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
    assert cli(module, argv + model) == 2
    assert error_line(capsys).startswith("error: --device cuda: CUDA is not available here")


# ---- a non-finite score is an error naming the item ----------------------------------------------------------------

class BadScores(FakeModel):
    """FakeModel's colour scores, but `value` for every candidate of the item whose caption is `text`."""
    def __init__(self, text, value):
        super().__init__()
        self.text, self.value = text, value

    def score_items(self, items):
        return [T([[self.value if texts[0] == self.text else float(color_of(im) in t.split()) for t in texts]
                   for im in images]) for images, texts in items]


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
        assert cli(train, ["--dataset", "comvg", "--data-root", nowhere, "--output-dir", str(target)]) == 2
    else:
        assert cli(evaluate, ["--dataset", "comvg", "--data-root", nowhere, "--output", str(target)]) == 2
    why = {"train: output dir is a file": f"{a_file}: it is a file, not a folder",
           "train: output dir inside a file": f"{a_file / 'run'}: not a directory",
           "evaluate: output is a folder": f"{tmp_path}: it is a folder",
           "evaluate: output inside a file": f"{target}: {a_file} is a file, not a folder"}[case]
    assert error_line(capsys) == f"error: cannot write {why}"
    assert a_file.read_text() == "x"


@pytest.fixture
def read_only(tmp_path):
    """A read-only folder: a read-only tmpfs (root) or a mode-555 folder (others)."""
    path = tmp_path / "ro"
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    why = mount_tmpfs(path, "ro,size=64k")
    if why:
        pytest.skip(why)
    yield path
    umount(path)


@pytest.mark.parametrize("module", [train, evaluate])
def test_read_only_output_location(module, read_only, tmp_path, capsys, no_model):
    nowhere = str(tmp_path / "no-data")
    if module is train:
        argv = ["--dataset", "comvg", "--data-root", nowhere, "--output-dir", str(read_only / "run")]
    else:
        argv = ["--dataset", "comvg", "--data-root", nowhere, "--output", str(read_only / "r.json")]
    assert cli(module, argv) == 2
    line = error_line(capsys)
    assert str(read_only) in line and ("read-only file system" in line or "permission denied" in line)


def train_argv(tiny_sd, root, out, *extra):
    return ["--dataset", "comvg", "--data-root", root, "--model", tiny_sd, "--shots", "6", "--batch-size", "2",
            "--lr", "0.05", "--output-dir", str(out), "--device", "cpu", "--no-zero-shot", "--eval-limit", "2", *extra]


def assert_stopped_at_step_1(out, capsys):
    ckpt = out / "checkpoint.pt"
    assert error_line(capsys) == f"error: cannot write {ckpt}: no space left on device"
    assert sorted(os.listdir(out)) == ["checkpoint.pt"]                   # no .tmp, no deltas, no results
    assert torch.load(ckpt, weights_only=False)["step"] == 1               # the last good checkpoint


def test_disk_full_at_a_checkpoint_keeps_the_last_one(tiny_sd, tmp_path, monkeypatch, capsys):
    """Simulated: the second checkpoint write fills half a file, then fails with ENOSPC."""
    root = write_train_comvg(str(tmp_path / "comvg"))
    real, calls = torch.save, []

    def full_disk(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            pathlib.Path(f).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f)
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    assert cli(train, train_argv(tiny_sd, root, tmp_path / "out", "--steps", "3", "--save-every", "1")) == 2
    assert_stopped_at_step_1(tmp_path / "out", capsys)


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
        assert cli(train, train_argv(tiny_sd, root, mnt / "run", "--steps", "3", "--save-every", "1")) == 2
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


# ---- Ctrl-C --------------------------------------------------------------------------------------------------------

CHILD = r"""
import os, runpy, signal, sys, time
import torch
real, calls = torch.optim.AdamW.step, []
def step(self, *a, **k):  # in step 2: tell the parent, and wait (at most 120 s) until its Ctrl-C has been handled
    calls.append(1)
    if len(calls) == 2:
        open(os.environ["MARKER"], "w").close()
        t = time.monotonic()
        while signal.getsignal(signal.SIGINT) is not signal.default_int_handler and time.monotonic() - t < 120:
            time.sleep(0.01)
    return real(self, *a, **k)
torch.optim.AdamW.step = step
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def test_ctrl_c_checkpoints_and_resumes_bit_identically(tiny_sd, tmp_path):
    """A real SIGINT to a training process in step 2 of 4: it finishes the step, writes a checkpoint, prints one line
    with the resume command and exits 130; --resume then ends with the deltas of an uninterrupted run, bit for bit."""
    root = write_train_comvg(str(tmp_path / "comvg"))
    argv = train_argv(tiny_sd, root, tmp_path / "cut", "--steps", "4", "--save-every", "100")
    env = dict(os.environ, MARKER=str(tmp_path / "in-step-2"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *argv], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(6000):  # at most 300 s
            if os.path.exists(env["MARKER"]) or proc.poll() is not None:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.startswith("interrupted at step")]
    assert len(lines) == 1 and "Traceback" not in err and "error:" not in err, err
    assert lines[0].startswith(f"interrupted at step 2 of 4 (checkpoint {tmp_path / 'cut' / 'checkpoint.pt'}); "
                               "resume with: python train.py --dataset comvg") and lines[0].endswith(" --resume")
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["step"] == 2
    assert not (tmp_path / "cut" / "prompt_deltas.safetensors").exists()
    assert train.main(argv + ["--resume"])["train"]["steps"] == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # the handler is given back
    train.main(train_argv(tiny_sd, root, tmp_path / "full", "--steps", "4", "--save-every", "100"))
    a = load_file(tmp_path / "full" / "prompt_deltas.safetensors")
    b = load_file(tmp_path / "cut" / "prompt_deltas.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if k.startswith("delta_k"))


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


# ---- ties and duplicate records: counted, reported, metrics unchanged ----------------------------------------------

@pytest.mark.parametrize("name, s, flag", [
    ("comvg", [[1.], [1.]], "correct"), ("comvg", [[1.], [2.]], None), ("shapes", [[3.], [3.]], "correct"),
    ("vlchecklist", [[0.5, 0.5]], "correct"), ("vlchecklist", [[0.5, 0.4]], None),
    ("winoground", [[2., 2.], [0., 3.]], "text"), ("winoground", [[2., 1.], [2., 3.]], "image"),
    ("winoground", [[2., 1.], [0., 3.]], None), ("refcocog", [[0.5, 0.1, 0.5]], "top1"),
    ("refcocog", [[0.5, 0.1, 0.6]], None), ("vqav2", [[0.2, 0.2, 0.1]], "correct"), ("coco", [[0.9, 0.1]], None)])
def test_a_tie_is_reported_and_counted_wrong(name, s, flag):
    """`tied` finds exactly the items where a tie decides a metric: counted wrong, and right once the true
    candidates score a little higher."""
    s = T(s)
    assert datasets.tied(name, s) == (flag is not None)
    if flag:
        true = torch.eye(*s.shape) if name == "winoground" else torch.zeros_like(s).index_put_((T(0), T(0)), T(1.))
        assert not datasets.item_metrics(name, s)[flag] and datasets.item_metrics(name, s + 1e-3 * true)[flag]


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
