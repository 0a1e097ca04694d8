"""Few-shot prompt learning (§4.5, eq. 5-6, Alg. 1): what trains, what is saved, the split, resume, learning."""
import csv
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train
import triplet_loss
from common import InputError
from datasets import Item, split_items
from discffusion import Discffusion

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 30)}


def colour_image(name, seed, size=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(COLOURS[name]).float()[None, None] + 20 * torch.randn(size, size, 3, generator=g)
    return Image.fromarray(x.clamp(0, 255).byte().numpy())


def write_comvg(root, n=12):
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


@pytest.fixture(scope="module")
def model(tiny_sd):
    return Discffusion.from_pretrained(tiny_sd, device="cpu")


def items_for(n=4):
    names = list(COLOURS)
    return [([colour_image(names[k % 4], k), colour_image(names[(k + 1) % 4], 50 + k)],
             [f"a {names[k % 4]} circle", f"a {names[(k + 2) % 4]} square"]) for k in range(n)]


def test_zero_deltas_are_the_pretrained_model_and_only_deltas_train(tiny_sd):
    m = Discffusion.from_pretrained(tiny_sd, device="cpu")
    items = items_for(2)
    before = m.score_items(items)
    params = m.add_trainable()
    after = m.score_items(items)
    assert all(torch.equal(a, b) for a, b in zip(before, after))          # bit for bit
    for name in m.capture.layers:
        attn = m.unet.get_submodule(name)
        key = name.replace(".", "_")
        assert m.capture.deltas.k[key].shape == attn.to_k.weight.shape and m.capture.deltas.v[key].shape == attn.to_v.weight.shape
    mats = m.score_items(items, train=True, generator=torch.Generator().manual_seed(0))
    triplet_loss.margin_loss(mats, margin=1.0).backward()
    assert {id(p) for p in params} == {id(p) for p in m.parameters() if p.requires_grad}
    last_v = m.capture.deltas.v[m.capture.layers[-1].replace(".", "_")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.capture.deltas.parameters() if p is not last_v)
    assert last_v.grad is None or last_v.grad.abs().sum() == 0  # the last layer's values only reach eps, never a later score
    frozen = [p for mod in (m.unet, m.vae, m.text_encoder) for p in mod.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in frozen)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_sd):
    grads = []
    for ckpt in (False, True):
        m = Discffusion.from_pretrained(tiny_sd, device="cpu")
        params = m.add_trainable()
        with torch.no_grad():
            for p in params:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(3))
        if ckpt:
            m.unet.enable_gradient_checkpointing()
        with m.capture:                                  # train.py's: held across the forward and the backward
            mats = m.score_items(items_for(2), train=True, generator=torch.Generator().manual_seed(0))
            loss = triplet_loss.margin_loss(mats, margin=1.0)
            loss.backward()
        grads.append((loss.item(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-9)                  # no double counting on re-run


def test_save_load_round_trip_and_mismatch(tiny_sd, tmp_path):
    m = Discffusion.from_pretrained(tiny_sd, device="cpu")
    with torch.no_grad():
        for i, p in enumerate(m.add_trainable()):
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    path = tmp_path / "deltas.safetensors"
    m.save_trained(path, {"lr": 0.1})
    m2 = Discffusion.from_pretrained(tiny_sd, device="cpu")
    meta = m2.load_trained(path)
    assert meta["training_args"] == {"lr": 0.1} and meta["base_model"] == tiny_sd
    for a, b in zip(m.trainable_parameters(), m2.trainable_parameters()):
        assert torch.equal(a, b)
    items = items_for(2)
    assert all(torch.equal(a, b) for a, b in zip(m.score_items(items), m2.score_items(items)))
    other = Discffusion.from_pretrained(tiny_sd, device="cpu", layers=2)
    with pytest.raises(InputError, match="other cross-attention layers"):
        other.load_trained(path)
    with pytest.raises(InputError, match="does not exist"):
        m2.load_trained(tmp_path / "nope.safetensors")


def test_margin_loss_is_eq6():
    S = torch.tensor([[0.5, 0.45, 0.7], [0.3, 0.0, 0.0]])                   # pos 0.5; negatives 0.45, 0.7, 0.3
    assert triplet_loss.margin_loss([S], 0.1).item() == pytest.approx(0.7 - 0.5 + 0.1)
    want = (max(0, 0.45 - 0.5 + 0.1) + (0.7 - 0.5 + 0.1) + 0) / 3
    assert triplet_loss.margin_loss([S], 0.1, "mean").item() == pytest.approx(want)
    assert triplet_loss.margin_loss([torch.tensor([[1.0], [0.0]])], 0.1).item() == 0.0
    logits = torch.tensor([0.5, 0.3, 0.45, 0.7])
    assert triplet_loss.ce_loss([S]).item() == pytest.approx(-torch.log_softmax(logits, 0)[0].item(), rel=1e-6)


def test_split_has_no_leakage_and_is_reproducible():
    items = [Item(str(k), [f"img{k % 7}.jpg", f"img{(k + 3) % 7}.jpg"], [f"sentence {k % 5}"]) for k in range(40)]
    train_a, test_a = split_items(items, "0.25", seed=1)
    train_b, test_b = split_items(items, "0.25", seed=1)
    assert [i.id for i in train_a] == [i.id for i in train_b] and [i.id for i in test_a] == [i.id for i in test_b]
    pairs = lambda its: {(t, im) for it in its for t in it.texts for im in it.images}  # noqa: E731
    assert not pairs(train_a) & pairs(test_a)
    assert len(train_a) + len(test_a) == 40 and len(train_a) >= 10
    assert [i.id for i in split_items(items, "0.25", seed=2)[0]] != [i.id for i in train_a]
    distinct = [Item(str(k), [f"{k}a", f"{k}b"], [f"s{k}"]) for k in range(100)]
    assert len(split_items(distinct, "0.05", 0)[0]) == 5
    assert len(split_items(distinct, "27", 0)[0]) == 27


@pytest.mark.parametrize("shots", ["0", "-3", "1.5", "100", "500", "abc"])
def test_bad_shots(shots):
    items = [Item(str(k), [f"{k}a", f"{k}b"], [f"s{k}"]) for k in range(100)]
    with pytest.raises(InputError, match="--shots"):
        split_items(items, shots, 0)


def run_train(tiny_sd, root, out, *extra):
    return train.main(["--dataset", "comvg", "--data-root", root, "--model", tiny_sd, "--shots", "6",
                       "--batch-size", "2", "--lr", "0.05", "--output-dir", out, "--device", "cpu",
                       "--no-zero-shot", "--eval-limit", "2", *extra])


def test_train_py_with_gradient_checkpointing_trains_the_same_deltas(tiny_sd, tmp_path):
    """train.py --gradient-checkpointing (the capture held through backward, where checkpointing re-runs its
    processors) learns the deltas a run without it learns, also with a step's rows in chunks (CachedScores)."""
    root = write_comvg(str(tmp_path / "comvg"))
    deltas = {}
    for name, extra in (("plain", []), ("checkpointed", ["--gradient-checkpointing"]),
                        ("checkpointed, chunks of 2 rows", ["--gradient-checkpointing", "--eval-batch-size", "2"])):
        out = str(tmp_path / name.replace(" ", "_").replace(",", ""))
        run_train(tiny_sd, root, out, "--steps", "2", *extra)
        deltas[name] = load_file(os.path.join(out, "prompt_deltas.safetensors"))
    for name, tol in (("checkpointed", 1e-6), ("checkpointed, chunks of 2 rows", 2e-3)):
        # chunks sum the gradient in another order; Adam's g / sqrt(v) turns that rounding into up to a few % of one
        # step (lr 0.05) where a gradient is near zero, as in tests/test_scaleout.py
        assert deltas[name].keys() == deltas["plain"].keys()
        for k, v in deltas["plain"].items():
            assert (deltas[name][k] - v).abs().max() <= tol, (name, k, (deltas[name][k] - v).abs().max())
    assert any(v.abs().max() > 0 for k, v in deltas["plain"].items() if k.startswith("delta_k"))  # it learned


def test_resume_equals_an_uninterrupted_run(tiny_sd, tmp_path, monkeypatch):
    root = write_comvg(str(tmp_path / "comvg"))
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


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tiny_sd, tmp_path, monkeypatch):
    root = write_comvg(str(tmp_path / "comvg"))
    real = triplet_loss.margin_loss
    calls = {"n": 0}

    def bad_loss(*a, **k):
        calls["n"] += 1
        return real(*a, **k) * (float("nan") if calls["n"] == 3 else 1.0)
    monkeypatch.setattr(triplet_loss, "margin_loss", bad_loss)
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 2; last good checkpoint"):
        run_train(tiny_sd, root, str(tmp_path / "out"), "--steps", "4", "--save-every", "1")
    assert torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)["step"] == 2


def test_prompt_learning_learns_a_matching_task(tiny_sd):
    """ComVG-style items (one caption, its image and an image of another colour): training p^k, p^v with eq. 6
    lowers the loss and lifts training-split accuracy well above its zero-shot value."""
    m = Discffusion.from_pretrained(tiny_sd, device="cpu", levels=(0.2,))
    names = list(COLOURS)
    items = [([colour_image(names[k % 4], k), colour_image(names[(k + 1 + k // 4) % 4], 100 + k)],
              [f"a {names[k % 4]} circle"]) for k in range(12)]

    def accuracy():
        with torch.no_grad():
            return sum(triplet_loss.correct(S) for S in m.score_items(items)) / len(items)
    zero_shot = accuracy()
    # lr 0.03: at 0.1 the 60-step trajectory is chaotic (a 1e-7 change in the forward decides whether it learns)
    opt = torch.optim.AdamW(m.add_trainable(), lr=0.03)
    losses = []
    for step in range(60):
        loss = triplet_loss.margin_loss(m.score_items(items, train=True, generator=torch.Generator().manual_seed(step)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    assert accuracy() >= max(0.75, zero_shot + 0.25), (zero_shot, accuracy())
