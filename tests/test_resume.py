"""tools/resume.py: a stopped run goes on where it stopped. A training run resumed from its checkpoint (SIGTERM,
Ctrl-C, a kill, a full disk) ends bit-identical to an uninterrupted one; an evaluation resumed from its partial files
writes the identical results and rescores only what changed; a checkpoint or partial file that cannot be used is one
error line naming it, or is repaired."""
import errno
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import evaluate
import methods
import train
from baselines import diffusion_itm
from common import InputError, read_checkpoint, save_tensors
from discffusion import Discffusion
from support import (FakeModel, REPO, WAIT, assert_stopped_at_step_1, child_env, error_line, image, main_of,
                     random_trainable, run_train, train_argv, wait_for, write_comvg, write_train_comvg)
from tools.cli import run_cli


# ---- training: resumed equals uninterrupted ------------------------------------------------------------------------

def test_resume_equals_an_uninterrupted_run(tiny_sd, tmp_path, monkeypatch):
    root = write_train_comvg(str(tmp_path / "comvg"))
    run_train(tiny_sd, root, str(tmp_path / "full"), "--steps", "4", "--save-every", "2")
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt                                        # killed during step 4
        return real_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run_train(tiny_sd, root, str(tmp_path / "cut"), "--steps", "4", "--save-every", "2")
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["step"] == 2
    assert not os.path.exists(tmp_path / "cut" / "prompt_deltas.safetensors")
    res = run_train(tiny_sd, root, str(tmp_path / "cut"), "--steps", "4", "--save-every", "2", "--resume")
    assert res["train"]["steps"] == 4
    a = load_file(tmp_path / "full" / "prompt_deltas.safetensors")
    b = load_file(tmp_path / "cut" / "prompt_deltas.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if k.startswith("delta_k"))


# ---- training: stopped by a signal or a full disk, resumed ---------------------------------------------------------


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
    assert main_of(train, train_argv(tiny_sd, root, tmp_path / "out", "--steps", "3", "--save-every", "1")) == 2
    assert_stopped_at_step_1(tmp_path / "out", capsys)


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


@pytest.mark.parametrize("case", ["truncated", "empty", "garbage", "a list", "lacks the optimizer", "other --layers",
                                  "other tensor shapes"])
def test_a_checkpoint_that_cannot_be_resumed_is_one_error_line(case, tiny_sd, tmp_path, capsys):
    root = write_train_comvg(str(tmp_path / "comvg"))
    out = tmp_path / "out"
    layers = ["--layers", "2"] if case in ("other --layers", "other tensor shapes") else []
    train.main(train_argv(tiny_sd, root, out, "--steps", "1", *layers))
    path = out / "checkpoint.pt"
    good = path.read_bytes()
    state = torch.load(path, weights_only=True)                # what train.py writes loads with weights_only
    if case == "truncated":
        path.write_bytes(good[:len(good) // 2])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(b"\x00 not a checkpoint " * 10)
    elif case == "a list":
        torch.save([1, 2, 3], path)
    elif case == "lacks the optimizer":
        torch.save({k: v for k, v in state.items() if k != "optimizer"}, path)
    elif case == "other tensor shapes":                        # layers not recorded (an edited or older file)
        torch.save(dict(state, args={k: v for k, v in state["args"].items() if k != "layers"}), path)
    assert run_cli(train.main, train_argv(tiny_sd, root, out, "--steps", "2", "--resume")) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: --resume: {path} ")
    want = {"truncated": "is not a checkpoint train.py wrote: RuntimeError: PytorchStreamReader failed",
            "empty": "is not a checkpoint train.py wrote: EOFError",
            "garbage": "is not a checkpoint train.py wrote: UnpicklingError",
            "a list": "is not a checkpoint train.py wrote (no step, params, optimizer, rng, history, args)",
            "lacks the optimizer": "is not a checkpoint train.py wrote (no optimizer)",
            "other --layers": "was written with --layers 2, this run has the default; rerun without --resume",
            "other tensor shapes": f"holds {len(state['params'])} trained tensors that do not fit this model's "}[case]
    assert want in line, line
    assert not [p for p in os.listdir(out) if p.startswith("checkpoint.pt.tmp")]    # no temporary file left


def test_a_resumed_training_applies_a_changed_learning_rate_and_records_it(tiny_sd, tmp_path, monkeypatch, capsys):
    root = write_train_comvg(str(tmp_path / "comvg"))
    out = tmp_path / "out"
    train.main(train_argv(tiny_sd, root, out, "--steps", "2", "--save-every", "1"))
    seen, real = [], torch.optim.AdamW.step

    def step(self, *a, **k):
        seen.append((self.param_groups[0]["lr"], self.param_groups[0]["weight_decay"], self.state_dict()["state"]
                     and int(next(iter(self.state_dict()["state"].values()))["step"])))
        return real(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    argv = train_argv(tiny_sd, root, out, "--steps", "4", "--resume", "--weight-decay", "0.5")
    res = train.main([a if a != "0.05" else "0.01" for a in argv])
    assert seen == [(0.01, 0.5, 2), (0.01, 0.5, 3)]   # the new values, on the restored optimizer state (step 2)
    want = [{"option": "--lr", "was": 0.05, "now": 0.01, "from_step": 3},
            {"option": "--weight-decay", "was": 0.01, "now": 0.5, "from_step": 3},
            {"option": "--steps", "was": 2, "now": 4, "from_step": 3}]
    assert res["args"]["changes"] == want and res["args"]["lr"] == 0.01
    assert json.load(open(out / "results.json"))["args"]["changes"] == want
    meta, _ = read_checkpoint(out / "prompt_deltas.safetensors", tensors=False)
    assert meta["training_args"]["changes"] == want and meta["training_args"]["lr"] == 0.01
    assert "resumed from" in capsys.readouterr().out
    assert run_cli(train.main, train_argv(tiny_sd, root, out, "--steps", "5", "--resume", "--seed", "3")) == 2
    assert "was written with --seed 0, this run has 3" in error_line(capsys)   # what defines the run: refused


# ---- training: the fp16 grad scaler --------------------------------------------------------------------------------


def test_resume_restores_the_grad_scaler(sd2_layout, tmp_path):
    root = write_train_comvg(str(tmp_path / "comvg"))
    out = str(tmp_path / "out")
    run_train(sd2_layout, root, out, "--steps", "1", "--precision", "fp16")
    path = os.path.join(out, "checkpoint.pt")
    ck = torch.load(path, weights_only=True)
    ck["scaler"]["scale"] = 1024.0                                       # as if overflows had lowered it
    torch.save(ck, path)
    run_train(sd2_layout, root, out, "--steps", "2", "--precision", "fp16", "--resume")
    hist = torch.load(path, weights_only=True)["history"]
    assert [h["loss_scale"] for h in hist] == [2.0 ** 16, 1024.0]
    with pytest.raises(InputError, match="--precision fp16, this run has fp32"):
        run_train(sd2_layout, root, out, "--steps", "3", "--precision", "fp32", "--resume")


# ---- evaluation: partial files -------------------------------------------------------------------------------------


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
    def score_items(self, items, spent=None):
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


class Crash(Exception):
    pass


class CrashingModel(FakeModel):
    """FakeModel that dies in its `crash_at`-th scoring call (a kill during the run)."""
    def __init__(self, crash_at=None):
        super().__init__()
        self.crash_at = crash_at

    def score_items(self, items, spent=None):
        if len(self.calls) + 1 == self.crash_at:
            raise Crash
        return super().score_items(items)


def interrupted_run(tmp_path, monkeypatch):
    """ComVG's 3 items, one per scoring call, killed in the third: items 1 and 2 are in the partial file."""
    root = write_comvg(str(tmp_path / "comvg"), bad_line=False, missing=False)
    argv = ["--dataset", "comvg", "--data-root", root, "--eval-batch-size", "2"]
    monkeypatch.setattr(methods, "build", lambda *a, **k: CrashingModel(crash_at=3))
    with pytest.raises(Crash):
        evaluate.main(argv + ["--output", str(tmp_path / "r.json")])
    part = tmp_path / "r.items" / "comvg" / "discffusion" / "part-0.jsonl"
    assert [json.loads(line)["id"] for line in part.read_text().splitlines()] == ["1", "2"]
    return root, argv, part


def fresh_and_resumed(tmp_path, monkeypatch, argv):
    model = CrashingModel()
    monkeypatch.setattr(methods, "build", lambda *a, **k: model)
    assert evaluate.main(argv + ["--output", str(tmp_path / "r.json"), "--resume"]) == 0
    resumed, calls = json.load(open(tmp_path / "r.json"))["datasets"]["comvg"], len(model.calls)
    monkeypatch.setattr(methods, "build", lambda *a, **k: FakeModel())
    assert evaluate.main(argv + ["--output", str(tmp_path / "fresh.json")]) == 0
    return resumed, json.load(open(tmp_path / "fresh.json"))["datasets"]["comvg"], calls


@pytest.mark.parametrize("edit", ["sentence edited, same id", "image replaced, same name", "nothing"])
def test_a_resumed_evaluation_rescores_items_whose_texts_or_images_changed(edit, tmp_path, monkeypatch):
    root, argv, _ = interrupted_run(tmp_path, monkeypatch)
    if edit.startswith("sentence"):                  # item 1: 'a red circle' -> 'a blue circle' (now wrong)
        path = os.path.join(root, "comvg.csv")
        text = open(path).read()
        open(path, "w").write(text.replace("a red circle", "a blue circle"))
    elif edit.startswith("image"):                   # item 1's true image 10.jpg turns blue (a tie: wrong)
        image(os.path.join(root, "VG_100K", "10.jpg"), "blue")
    resumed, fresh, calls = fresh_and_resumed(tmp_path, monkeypatch, argv)
    assert resumed == fresh
    assert fresh["metrics"]["Average"] == (100.0 if edit == "nothing" else pytest.approx(200 / 3))
    assert calls == (1 if edit == "nothing" else 2)  # item 3 only; or items 1 and 3 (item 2 kept)
    assert not os.path.exists(tmp_path / "r.items")


CORRUPT = ["a partial line garbled (power cut)", "a partial line that is JSON but no record",
           "a partial record of the wrong shape", "fingerprint.json truncated", "fingerprint.json a list",
           "deltas lack layers", "deltas scorer is 3", "deltas training_args a list", "LoRA file lacks lora"]


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_state_is_repaired_or_one_error_line_naming_the_file(case, tiny_sd, random_deltas, tmp_path, monkeypatch,
                                                                     capsys):
    if case.startswith(("a partial", "fingerprint")):
        root, argv, part = interrupted_run(tmp_path, monkeypatch)
        lines = part.read_bytes().splitlines(keepends=True)
        fp = part.parent / "fingerprint.json"
        if "garbled" in case:
            part.write_bytes(b"\x00" * 40 + b"\n" + lines[1])
        elif "JSON but" in case:
            part.write_bytes(b"[1, 2]\n" + lines[1])
        elif "wrong shape" in case:
            part.write_bytes(json.dumps(dict(json.loads(lines[0]), scores=[[1.0, 0.0]])).encode() + b"\n" + lines[1])
        elif "truncated" in case:
            fp.write_bytes(fp.read_bytes()[:30])
        else:
            fp.write_text("[1, 2]")
        if case.startswith("fingerprint"):
            monkeypatch.setattr(methods, "build", lambda *a, **k: FakeModel())
            assert evaluate.main(argv + ["--output", str(tmp_path / "r.json"), "--resume"]) == 2
            assert error_line(capsys) == (f"error: --resume: {fp} is not a fingerprint (cut short or overwritten?): "
                                          "the scores beside it cannot be matched to this run; rerun without "
                                          "--resume to start over")
            return
        resumed, fresh, calls = fresh_and_resumed(tmp_path, monkeypatch, argv)
        assert resumed == fresh and calls == 2           # item 1 scored again, item 2 kept, item 3 scored
        return
    root = write_comvg(str(tmp_path / "comvg"), bad_line=False, missing=False)
    good = random_deltas(scale=0.05)
    meta, tensors = read_checkpoint(good)
    path = str(tmp_path / "bad.safetensors")
    method = "discffusion"
    if case == "deltas lack layers":
        meta.pop("layers")
        why = "its metadata 'layers' is absent, not a list of layer names"
    elif case == "deltas scorer is 3":
        meta["scorer"] = 3
        why = "its metadata 'scorer' is 3, not a dict"
    elif case == "deltas training_args a list":
        meta["training_args"] = [1]
        why = "its metadata 'training_args' is [1], not a dict"
    else:
        method, meta = "diffusion_itm", {"format": diffusion_itm.FORMAT, "model": tiny_sd}
        why = "its metadata 'lora' is absent, not a dict of rank, targets and alpha"
    save_tensors(path, tensors, meta)
    argv = ["--dataset", "comvg", "--data-root", root, "--model", tiny_sd, "--device", "cpu", "--methods", method,
            "--checkpoint", path, "--output", str(tmp_path / "r.json"), "--itm-timesteps", "2"]
    assert evaluate.main(argv) == 2
    assert error_line(capsys) == f"error: checkpoint {path}: {why}"


ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


LAUNCH_TIMEOUT = 300  # a hung gloo collective fails the test instead of CI


def test_killed_evaluation_resumes_to_the_identical_json_and_refuses_other_options(tmp_path, tiny_sd, monkeypatch,
                                                                                    capsys):
    root = write_train_comvg(str(tmp_path / "comvg"), n=15)
    ckpts = []
    for seed in (0, 1):
        m = Discffusion.from_pretrained(tiny_sd, device="cpu", lam=4.0)
        random_trainable(m, 0.05, seed=10 * seed)
        ckpts.append(str(tmp_path / f"deltas{seed}.safetensors"))
        m.save_trained(ckpts[-1])
    argv = ["--dataset", "comvg", "--data-root", root, "--model", tiny_sd, "--device", "cpu", "--eval-batch-size", "2",
            "--checkpoint", ckpts[0], "--output", "r.json"]
    (tmp_path / "cut").mkdir(), (tmp_path / "whole").mkdir()
    part = tmp_path / "cut" / "r.items" / "comvg" / "discffusion" / "part-0.jsonl"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "evaluate.py"), *argv], cwd=tmp_path / "cut", env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not (part.exists() and part.read_text().count("\n") >= 2) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)                                    # one item per scoring call: 15 calls
    proc.wait()
    assert not (tmp_path / "cut" / "r.json").exists()
    kept = part.read_text().count("\n")
    assert 2 <= kept < 15
    monkeypatch.chdir(tmp_path / "cut")
    assert evaluate.main(argv + ["--resume", "--lam", "5"]) == 2       # other options, other checkpoint: refused
    err = capsys.readouterr().err
    assert err.startswith("error: --resume:") and "lam (4.0 there, 5.0 now)" in err and err.count("\n") == 1
    assert evaluate.main([a.replace(ckpts[0], ckpts[1]) for a in argv] + ["--resume"]) == 2
    assert "another checkpoint (" in capsys.readouterr().err
    assert evaluate.main(argv + ["--resume"]) == 0
    resumed_out = capsys.readouterr().out
    assert f"discffusion comvg: {kept} of 15 items already scored" in resumed_out
    monkeypatch.chdir(tmp_path / "whole")
    assert evaluate.main(argv) == 0
    assert (tmp_path / "cut" / "r.json").read_text() == (tmp_path / "whole" / "r.json").read_text()


# ---- a checkpoint whose fields have the wrong types: one line, before any of them is used ---------------------------

def test_checkpoint_fields_of_the_wrong_type_are_one_line(tiny_sd, tmp_path, capsys):
    root = write_train_comvg(str(tmp_path / "comvg"))
    out = tmp_path / "out"
    train.main(train_argv(tiny_sd, root, out, "--steps", "1"))
    path = out / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    spoiled = {"step": dict(state, step="1"), "history": dict(state, history="none"),
               "rng": dict(state, rng=torch.zeros(3)), "optimizer": dict(state, optimizer=[1]),
               "batch_size": dict(state, args=dict(state["args"], batch_size="2"))}
    for field, bad in spoiled.items():
        torch.save(bad, path)
        assert run_cli(train.main, train_argv(tiny_sd, root, out, "--steps", "2", "--resume")) == 2
        line = error_line(capsys)
        assert line.startswith(f"error: --resume: {path} is not a checkpoint train.py wrote: its '{field}' is a "), line
    torch.save(state, path)                                               # the file as written resumes
    assert train.main(train_argv(tiny_sd, root, out, "--steps", "2", "--resume"))["train"]["steps"] == 2
