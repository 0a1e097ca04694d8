"""What several test files share that is not a fixture: data sets written in their published formats (tiny, with
coloured images whose colour is their content), the colour models that stand in for a scorer, the command lines'
arguments and exit codes, the reader of a command's one error line, subprocess and tmpfs helpers, and the SD 2.x-layout
model. Fixtures live in conftest.py; no test file imports another."""
import csv
import json
import os
import pickle
import shutil
import subprocess
import time

import torch
from PIL import Image
from diffusers import UNet2DConditionModel

import evaluate
import train
from benchmarks import shapes
from tools.cli import run_cli
from tools.sd_configs import make_random_sd

COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40)}


def image(path, color, size=16):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size, size), COLORS[color]).save(path)  # the format follows the extension (.jpg -> JPEG)
    return path


def write_comvg(root, bad_line=True, missing=True):
    """comvg.csv: 3 good rows (subject, object, verb), optionally a short row and a row with a missing image."""
    rows = [("1", "a red circle", "circle,is,red", "circle,is,blue", "10", "11", "subject"),
            ("2", "a blue square", "square,is,blue", "square,is,green", "11", "12", "object"),
            ("3", "a green triangle", "t,is,green", "t,is,red", "12", "10", "verb")]
    if bad_line:
        rows.append(("4", "a yellow ball", "x"))                                              # line 5: short
    if missing:
        rows.append(("5", "a yellow circle", "c,is,yellow", "c,is,red", "99", "10", "subject"))  # 99.jpg missing
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "comvg.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "sentence", "pos_triplet", "neg_triplet", "pos_image_id", "neg_image_id", "neg_value"])
        w.writerows(rows)
    image(os.path.join(root, "VG_100K", "10.jpg"), "red")
    image(os.path.join(root, "VG_100K", "11.jpg"), "blue")
    image(os.path.join(root, "VG_100K_2", "12.jpg"), "green")
    return root


REF_WORDS = ["red", "green", "blue", "yellow"]


def write_refcocog(root, n=24):
    """refcocog/refs(umd).p (n refs over 4 images, splits train/val alternating, one bad ref) + instances.json."""
    refs = []
    for i in range(n):
        color = REF_WORDS[i % 4]
        refs.append(dict(ref_id=i, ann_id=100 + i, image_id=i % 4 + 1, split=("val", "train")[i % 2],
                         category_id=1, sentences=[dict(raw=f"the {color} thing {i}", sent=f"the {color} thing {i}",
                                                        tokens=["the", color], sent_id=1000 + i)]))
    refs.append(dict(ref_id=999, image_id=1, split="val"))  # malformed: no ann_id, no sentences
    os.makedirs(os.path.join(root, "refcocog"), exist_ok=True)
    with open(os.path.join(root, "refcocog", "refs(umd).p"), "wb") as f:
        pickle.dump(refs, f, protocol=2)
    images = [dict(id=k, file_name=f"COCO_train2014_{k:012d}.jpg") for k in range(1, 5)]
    with open(os.path.join(root, "refcocog", "instances.json"), "w") as f:
        json.dump(dict(images=images, annotations=[], categories=[]), f)
    for k in range(1, 5):
        image(os.path.join(root, "train2014", f"COCO_train2014_{k:012d}.jpg"), REF_WORDS[(k - 1) % 4])
    return root


def write_vqav2(root):
    """val2014 questions + annotations: 12 questions on 4 images, one question without annotation."""
    answers = ["red", "green", "blue", "yellow", "two", "three", "cat", "dog", "ball", "table", "man", "woman"]
    qs, anns = [], []
    for i in range(12):
        img = i % 4 + 1
        if i < 4:
            q, a, kind, given = "is it red?", ("yes" if img == 1 else "no"), "yes/no", ["yes", "no"]
        else:
            q, a, kind, given = "what color is it?", REF_WORDS[img - 1], "other", [REF_WORDS[img - 1], "dog"]
        qs.append(dict(image_id=img, question=q, question_id=500 + i))
        anns.append(dict(question_id=500 + i, image_id=img, answer_type=kind, multiple_choice_answer=a,
                         answers=[dict(answer=x, answer_confidence="yes", answer_id=k + 1)
                                  for k, x in enumerate(given)]))
    for x in answers:  # more frequent answers for the candidate pool (annotations of other, image-less questions)
        anns.append(dict(question_id=900 + len(anns), image_id=77, answer_type="other", multiple_choice_answer=x,
                         answers=[dict(answer=x)]))
    qs.append(dict(image_id=2, question="orphan?", question_id=12345))  # no annotation: malformed
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "v2_OpenEnded_mscoco_val2014_questions.json"), "w") as f:
        json.dump(dict(data_subtype="val2014", questions=qs), f)
    with open(os.path.join(root, "v2_mscoco_val2014_annotations.json"), "w") as f:
        json.dump(dict(data_subtype="val2014", annotations=anns), f)
    for k in range(1, 5):
        image(os.path.join(root, "val2014", f"COCO_val2014_{k:012d}.jpg"), REF_WORDS[k - 1])
    return root


def write_winoground(root, bad_line=True):
    """examples.jsonl: 3 examples (Object, Relation, Both) + optionally a broken line 4; images/*.png."""
    exs = [dict(id=0, image_0="ex_0_img_0", image_1="ex_0_img_1", caption_0="a red circle", caption_1="a blue circle",
                tag="Noun", secondary_tag="", num_main_preds=1, collapsed_tag="Object"),
           dict(id=1, image_0="ex_1_img_0", image_1="ex_1_img_1", caption_0="a green square",
                caption_1="a yellow square", tag="Adjective-Color", secondary_tag="", num_main_preds=1,
                collapsed_tag="Relation"),
           dict(id=2, image_0="ex_2_img_0", image_1="ex_2_img_1", caption_0="a blue dog", caption_1="a red dog",
                tag="Scope", secondary_tag="Symbolic", num_main_preds=2, collapsed_tag="Both")]
    colors = [("red", "blue"), ("green", "yellow"), ("red", "blue")]  # example 2 is mismatched on purpose
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "examples.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(e) for e in exs) + "\n")
        if bad_line:
            f.write('{"id": 3, "image_0": "ex_3_img_0"\n')  # line 4: truncated JSON
    for e, (c0, c1) in zip(exs, colors):
        image(os.path.join(root, "images", f"{e['image_0']}.png"), c0)
        image(os.path.join(root, "images", f"{e['image_1']}.png"), c1)
    return root


def write_vlchecklist(root):
    """data/Attribute/vg/color.json (3 records, 1 malformed), data/relation/vg/spatial.json (lowercase folder)."""
    attr = [["VG_100K/1.jpg", {"POS": ["a red ball"], "NEG": ["a blue ball"]}],
            ["VG_100K_2/2.jpg", {"POS": ["a green ball"], "NEG": ["a red ball"]}],
            ["VG_100K/1.jpg", {"POS": ["a red ball"]}]]  # index 2: no NEG
    rel = [["VG_100K/1.jpg", {"POS": ["ball on red table", "red ball"], "NEG": ["ball under blue table", "blue ball"]}],
           ["VG_100K/404.jpg", {"POS": ["a cat"], "NEG": ["a dog"]}]]  # image missing
    for rel_path, data in (("data/Attribute/vg/color.json", attr), ("data/relation/vg/spatial.json", rel)):
        os.makedirs(os.path.dirname(os.path.join(root, rel_path)), exist_ok=True)
        with open(os.path.join(root, rel_path), "w") as f:
            json.dump(data, f)
    image(os.path.join(root, "vg", "VG_100K", "1.jpg"), "red")
    image(os.path.join(root, "vg", "VG_100K_2", "2.jpg"), "green")
    return root


def write_coco(root):
    images = [dict(id=k, file_name=f"COCO_train2014_{k:012d}.jpg") for k in range(1, 5)]
    anns = [dict(image_id=k, id=10 * k + j, caption=f"a {REF_WORDS[k - 1]} thing number {j}")
            for k in range(1, 5) for j in range(3)]
    anns.append(dict(image_id=1, id=999))  # no caption
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", "captions_train2014.json"), "w") as f:
        json.dump(dict(images=images, annotations=anns), f)
    for k in range(1, 5):
        image(os.path.join(root, "train2014", f"COCO_train2014_{k:012d}.jpg"), REF_WORDS[k - 1])
    return root


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "download")


def write_vqa_paper(root, n_binary=12):
    """The official code's test.txt (real lines of its format) and vqa_text_test.csv (its real first rows)."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(FIXTURES, "test.txt")) as f:
        real = f.read().splitlines()
    lines = [f"COCO_val2014_{100 + k:012d}.jpg*The question is asking about yes or no: is it {k}? it is {k}"
             for k in range(n_binary)]
    with open(os.path.join(root, "test.txt"), "w") as f:
        f.write("\n".join(real + lines) + "\n")
    with open(os.path.join(FIXTURES, "vqa_text_test.csv")) as f:
        (tmp := os.path.join(root, "vqa_text_test.csv")) and open(tmp, "w").write(f.read())
    names = [l.split("*")[0] for l in real + lines] + ["COCO_val2014_000000108327.jpg"]
    for k, name in enumerate(names):
        image(os.path.join(root, "val2014", name), REF_WORDS[k % 4])
    return root


COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 30)}


def random_images(n, size=(24, 20), seed=1):
    """n random RGB images of `size` (width, height), the same for a seed."""
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def colour_image(name, seed, size=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(COLOURS[name]).float()[None, None] + 20 * torch.randn(size, size, 3, generator=g)
    return Image.fromarray(x.clamp(0, 255).byte().numpy())


def write_train_comvg(root, n=12):
    """A ComVG-format folder (CSV + <image_id>.jpg): sentence 'a <colour> circle', pos/neg images of two colours."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    names = list(COLOURS)
    rows = []
    for k in range(n):
        a, b = names[k % 4], names[(k + 1 + k // 4) % 4]
        pos_id, neg_id = 1000 + 2 * k, 1001 + 2 * k
        colour_image(a, k).save(os.path.join(root, "images", f"{pos_id}.jpg"), quality=95)
        colour_image(b, 100 + k).save(os.path.join(root, "images", f"{neg_id}.jpg"), quality=95)
        rows.append([k, f"a {a} circle", f"{a},circle", f"{b},circle", pos_id, neg_id, ("subject", "object", "verb")[k % 3]])
    with open(os.path.join(root, "comvg.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "sentence", "pos_triplet", "neg_triplet", "pos_image_id", "neg_image_id", "neg_value"])
        w.writerows(rows)
    return root


def items_for(n=4):
    names = list(COLOURS)
    return [([colour_image(names[k % 4], k), colour_image(names[(k + 1) % 4], 50 + k)],
             [f"a {names[k % 4]} circle", f"a {names[(k + 2) % 4]} square"]) for k in range(n)]


def run_train(tiny_sd, root, out, *extra):
    return train.main(["--dataset", "comvg", "--data-root", root, "--model", tiny_sd, "--shots", "6",
                       "--batch-size", "2", "--lr", "0.05", "--output-dir", out, "--device", "cpu",
                       "--no-zero-shot", "--eval-limit", "2", *extra])


T = torch.tensor


def color_of(im):
    rgb = im.convert("RGB").getpixel((0, 0))
    return min(COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLORS[c], rgb)))


class FakeModel:
    """score(image, text) = 1 if the image's colour is a word of the text, else 0 (the `score_items` API)."""
    config = {"model": "fake"}

    def __init__(self):
        self.calls = []

    def score_items(self, items, spent=None):
        self.calls.append(len(items))
        return [T([[float(color_of(im) in t.split()) for t in texts] for im in images]) for images, texts in items]


class BadScores(FakeModel):
    """FakeModel's colour scores, but `value` for every candidate of the item whose caption is `text`."""
    def __init__(self, text, value):
        super().__init__()
        self.text, self.value = text, value

    def score_items(self, items, spent=None):
        return [T([[self.value if texts[0] == self.text else float(color_of(im) in t.split()) for t in texts]
                   for im in images]) for images, texts in items]


def error_line(capsys):
    """The one `error: ...` line on stderr (asserting there is exactly one and no traceback)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


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


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


WAIT = 300  # seconds: the most any subprocess wait may take (a deadline on time.monotonic, not a measurement)


def wait_for(path, proc, seconds=WAIT):
    """Until `path` exists or `proc` has ended, at most `seconds`."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def child_env(tmp_path):
    return dict(os.environ, MARKER=str(tmp_path / "marker"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))


def train_argv(tiny_sd, root, out, *extra):
    return ["--dataset", "comvg", "--data-root", root, "--model", tiny_sd, "--shots", "6", "--batch-size", "2",
            "--lr", "0.05", "--output-dir", str(out), "--device", "cpu", "--no-zero-shot", "--eval-limit", "2", *extra]


def main_of(module, argv):
    """The exit code of `python module.py argv`, run in-process."""
    return module.main(argv) if module is evaluate else run_cli(module.main, argv)


def assert_stopped_at_step_1(out, capsys):
    ckpt = out / "checkpoint.pt"
    assert error_line(capsys) == f"error: cannot write {ckpt}: no space left on device"
    assert sorted(os.listdir(out)) == ["checkpoint.pt"]                   # no .tmp, no deltas, no results
    assert torch.load(ckpt, weights_only=False)["step"] == 1               # the last good checkpoint


# the SD 2.x UNet layout (3 cross-attention down blocks + a plain one, mirrored up, linear projections), narrow
SD2_LAYOUT = dict(sample_size=16, block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  attention_head_dim=(2, 4, 4, 4), cross_attention_dim=32, use_linear_projection=True,
                  in_channels=4, out_channels=4)


def sd_folder(folder, **unet_options):
    """The tiny preset's VAE, text encoder and tokenizer with an SD 2.x-layout UNet, in diffusers layout."""
    make_random_sd("tiny", folder, seed=0)
    torch.manual_seed(1)
    UNet2DConditionModel(**SD2_LAYOUT, **unet_options).save_pretrained(os.path.join(folder, "unet"))
    return folder


def scenes(n, seed=0):
    """n shapes-world scenes and their first captions: ([PIL image], [caption])."""
    ims, caps = shapes.training_pairs(n, seed=seed)
    return [Image.fromarray(im) for im in ims], [c[0] for c in caps]


def random_trainable(model, std, seed=0):
    """Attach the model's p^k, p^v and head logits and fill them with N(0, std), tensor i from seed + i: a model as
    if trained. -> the trainable tensors."""
    params = model.add_trainable()
    with torch.no_grad():
        for i, p in enumerate(params):
            p.normal_(0, std, generator=torch.Generator().manual_seed(seed + i))
    return params


def write_top10(root, outside):
    """5 captions (keys 0..4): 0 good, 1 a missing image, 2 malformed (9 paths in a string), 3 a path climbing out to
    an existing image, 4 good; the images as datasets/flickr30k/images/<id>.jpg."""
    paths = [f"datasets/flickr30k/images/{k}.jpg" for k in range(10)]
    for k in range(10):
        image(os.path.join(root, "images", f"{k}.jpg"), list(COLORS)[k % 4])   # red, green, blue, yellow
    data = {"a red thing": paths, "a lost thing": ["datasets/flickr30k/images/99.jpg"] + paths[1:],
            "a bad record": "not a list", "an escape": [os.path.relpath(outside, root)] + paths[1:],
            "a green thing": paths[1:] + paths[:1]}
    os.makedirs(root, exist_ok=True)
    json.dump(data, open(os.path.join(root, "val_top10_RN50x64.json"), "w"))
    text = {paths[0]: ["a red thing"] + [f"caption {k}" for k in range(9)], paths[1]: "not a list",
            "datasets/flickr30k/images/99.jpg": ["x"] * 10, "/abs/olute.jpg": ["y"] * 10}
    json.dump(text, open(os.path.join(root, "val_top10_RN50x64_text.json"), "w"))
    return root


TAGS = {"man": "NN", "horse": "NN", "field": "NN", "red": "JJ", "green": "JJ", "a": "DT", "riding": "VBG",
        "in": "IN", "the": "DT", "two": "CD", "and": "CC", "dogs": "NNS", "cat": "NN", ".": "."}


def tagger(text):
    """A part-of-speech tagger for the test captions (spaCy's en_core_web_sm cannot be installed here)."""
    return [(w, TAGS.get(w.lower(), "NN")) for w in text.replace(".", " .").split()]


def check_mmdit_loras(folder, pipeline, out, **options):
    """On an MMDiT folder (SD3, Flux): a LoRA saved the standard way (a peft adapter on the transformer,
    `<pipeline>.save_lora_weights`) merges with `lora=`: the merged transformer scores as the one with the adapter
    active, not as the base; DiffusionITM's HardNeg LoRA starts as the base model (the same scores, bit for bit) and
    one AdamW step of hardneg_loss moves it."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from baselines.diffusion_itm import DiffusionITM, hardneg_loss
    from discffusion import Discffusion
    ims, texts = [colour_image("red", 0, 24), colour_image("blue", 1, 24)], ["a red circle", "a blue square"]
    m = Discffusion.from_pretrained(folder, device="cpu", **options)
    base = m.score(ims, texts)
    torch.manual_seed(3)
    m.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "add_k_proj"],
                                  init_lora_weights=False))
    getattr(diffusers, pipeline).save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(m.unet))
    merged = Discffusion.from_pretrained(folder, device="cpu", lora=out, **options)
    assert not any("lora" in n for n, _ in merged.unet.named_parameters())
    got = merged.score(ims, texts)
    assert torch.allclose(got, m.score(ims, texts), atol=1e-5) and not torch.allclose(got, base, atol=1e-4)
    itm = DiffusionITM.from_pretrained(folder, device="cpu", n_timesteps=2, **options)
    before = itm.score(ims, texts)
    params = itm.add_lora()
    assert params and torch.equal(itm.score(ims, texts), before)
    snapshot = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    hardneg_loss(itm, [(ims, texts)], torch.Generator().manual_seed(0)).backward()
    opt.step()
    assert any(not torch.equal(p, s) for p, s in zip(params, snapshot))
    assert not torch.equal(itm.score(ims, texts), before)
