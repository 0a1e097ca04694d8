"""Trust (issue 22): a file the user gives runs no code, no name in a data file leads out of its data root, a resumed
result is never stale, an output never replaces an input, nothing is silently coerced, corrupt state is one line or
is repaired. One test per class of problem; the cases of a class are its parameters."""
import csv
import json
import os
import pickle

import pytest
import torch

import datasets
from baselines import diffusion_itm
import evaluate
import methods
import train
from common import read_checkpoint, save_tensors
from tools.cli import run_cli
from discffusion import Discffusion
from test_datasets import (image, write_coco, write_comvg, write_refcocog, write_vlchecklist, write_vqa_paper,
                           write_vqav2, write_winoground)
from test_evaluate import FakeModel
from test_reliability import error_line, no_model  # noqa: F401 - no_model is a fixture
from test_train import write_comvg as write_train_comvg


def train_argv(tiny_sd, root, out, *extra):
    return ["--dataset", "comvg", "--data-root", root, "--model", tiny_sd, "--shots", "6", "--batch-size", "2",
            "--lr", "0.05", "--output-dir", str(out), "--device", "cpu", "--no-zero-shot", "--eval-limit", "2", *extra]


def deltas_file(tiny_sd, path, **model_options):
    m = Discffusion.from_pretrained(tiny_sd, device="cpu", **model_options)
    with torch.no_grad():
        for i, p in enumerate(m.add_trainable()):
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    m.save_trained(str(path))
    return str(path)


# ---- a crafted pickle runs no code ---------------------------------------------------------------------------------

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


# ---- a checkpoint that cannot be resumed is one error line naming it -----------------------------------------------

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
    assert not os.path.exists(out / "checkpoint.pt.tmp")


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


# ---- a resumed evaluation keeps only the scores of unchanged items ---------------------------------------------------

class Crash(Exception):
    pass


class CrashingModel(FakeModel):
    """FakeModel that dies in its `crash_at`-th scoring call (a kill during the run)."""
    def __init__(self, crash_at=None):
        super().__init__()
        self.crash_at = crash_at

    def score_items(self, items):
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


# ---- train.py --resume with a changed option: applied from the resumed step and recorded, or refused --------------

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
    assert not os.path.exists(tmp_path / "out" / "checkpoint.pt") and not os.path.exists(tmp_path / "r.items.tmp")


# ---- silent coercions are errors or counted skips --------------------------------------------------------------------

COERCIONS = ["VL-CheckList POS a string", "VL-CheckList NEG holds a number", "Winoground caption a list",
             "Winoground caption a dict", "VQAv2 question a list", "COCO caption a dict", "ComVG column twice", "VQAv2 column twice", "checkpoint lam -1",
             "checkpoint lam 0", "checkpoint lam nan", "checkpoint pooling bogus", "--methods twice",
             "--compare twice"]


@pytest.mark.parametrize("case", COERCIONS)
def test_a_value_of_the_wrong_kind_is_an_error_or_a_counted_skip(case, tiny_sd, tmp_path, capsys):
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
        good = deltas_file(tiny_sd, tmp_path / "good.safetensors")
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


# ---- corrupt state: one error line naming the file, or repaired ------------------------------------------------------

CORRUPT = ["a partial line garbled (power cut)", "a partial line that is JSON but no record",
           "a partial record of the wrong shape", "fingerprint.json truncated", "fingerprint.json a list",
           "deltas lack layers", "deltas scorer is 3", "deltas training_args a list", "LoRA file lacks lora"]


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_state_is_repaired_or_one_error_line_naming_the_file(case, tiny_sd, tmp_path, monkeypatch, capsys):
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
    good = deltas_file(tiny_sd, tmp_path / "good.safetensors")
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
