"""Accuracy per UNet evaluation: noise draws, adaptive candidate elimination, level weights (discffusion.py,
baselines/diffusion_itm.py, train.py --level-weights / --fit-level-weights)."""
import pytest
import torch

import evaluate
from baselines.diffusion_itm import DiffusionITM
from common import InputError
from discffusion import Discffusion, eliminate, elimination_order, plan_units, van_der_corput
from support import error_line, main_of, random_images


TEXTS = ["a red circle left of a blue square", "a dog on the table", "the man riding a ball", "cat", "a blue cube"]


@pytest.fixture(scope="module")
def model(tiny_sd):
    return Discffusion.from_pretrained(tiny_sd, device="cpu", levels=(0.3, 0.7), draws=2)


# ---- draws -------------------------------------------------------------------------------------------------------

def test_draws_extend_the_paper_ensemble_and_are_batch_independent(model, tiny_sd):
    """Draw 0 is the one-draw model's eps; each draw is a function of (seed, level, draw); a pair's score with draws
    is the mean of its per-unit scores and does not depend on its batch-mates."""
    one = Discffusion.from_pretrained(tiny_sd, device="cpu", levels=(0.3, 0.7))
    levels, noise = model.units((4, 8, 8))
    assert levels == (0.3, 0.7, 0.3, 0.7)
    assert torch.equal(noise[:2], one.level_noise((4, 8, 8))) and not torch.allclose(noise[2:], noise[:2])
    assert torch.equal(noise, model.units((4, 8, 8))[1])
    ims = random_images(2, seed=3)
    S = model.score(ims, TEXTS[:3])
    per = model.score_items([(ims, TEXTS[:3])], per_unit=True)[0]                     # (4, 2, 3)
    assert per.shape == (4, 2, 3) and torch.allclose(per.mean(0), S, atol=1e-6)
    assert torch.allclose(per[:2].mean(0), one.score(ims, TEXTS[:3]), atol=1e-6)    # draw 0 = the paper's
    assert model.score([ims[1]], [TEXTS[2]])[0, 0].item() == pytest.approx(S[1, 2].item(), abs=1e-5)
    assert torch.equal(model.score(ims, TEXTS[:3]), S)                               # a rerun (a resume) repeats it


# ---- adaptive elimination -------------------------------------------------------------------------------------------

def table_run(table, calls):
    """run / pool over a fixed table of per-unit scores (n_units, P), recording which pairs ran which units."""
    def run(active, units):
        calls.append((active.tolist(), list(units)))
        return [table[u, active] for u in units]

    def pool(values, units):
        out = 0.0
        for v in values:
            out = out + v
        return out
    return run, pool


def test_eliminated_candidates_never_outrank_a_survivor():
    """Every stage keeps the best `keep` of an adaptive item by its mean so far; an eliminated candidate scores below
    every candidate that went further; a (2, 2) item and a two-candidate item get every unit."""
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 10), (7, 1), (2, 2), (1, 2)]
    P = sum(a * b for a, b in shapes)
    table = torch.randn(16, P, generator=g)
    calls, order = [], elimination_order(4, 4)
    assert order[:4] == [0, 2, 1, 3] and sorted(order) == list(range(16))            # 0.2, 0.6, 0.4, 0.8 first
    scores, evals = eliminate(shapes, [(4, 5), (8, 2), (16, None)], order, *table_run(table, calls))
    assert [c[1] for c in calls] == [order[:4], order[4:8], order[8:]]
    ranges = [(0, 10), (10, 17)]
    for lo, hi in ranges:
        e, s = evals[lo:hi], scores[lo:hi]
        assert sorted(e.tolist()) == sorted([4] * (hi - lo - 5) + [8] * 3 + [16] * 2)
        first = table[order[:4], lo:hi].mean(0)
        assert set((e > 4).nonzero().flatten().tolist()) == set(first.topk(5).indices.tolist())
        for a in range(hi - lo):
            for b in range(hi - lo):
                if e[a] < e[b]:
                    assert s[a] < s[b]                                  # stopped earlier: ranked below
                if e[a] == e[b]:                                        # the same units: their means' order
                    ma, mb = table[order[:e[a]], lo + a].mean(), table[order[:e[b]], lo + b].mean()
                    assert (s[a] > s[b]) == (ma > mb)
        top = (e == 16).nonzero().flatten()
        assert torch.allclose(s[top], table[:, lo + top].mean(0))
    assert (evals[17:] == 16).all() and torch.allclose(scores[17:], table[:, 17:].mean(0))


def test_a_schedule_that_keeps_everyone_equals_the_full_ensemble_bit_for_bit(tiny_sd):
    full = Discffusion.from_pretrained(tiny_sd, device="cpu", levels=(0.2, 0.5, 0.8), draws=2)
    kept = Discffusion.from_pretrained(tiny_sd, device="cpu", levels=(0.2, 0.5, 0.8), adaptive=[(2, 5), (6, None)])
    assert kept.draws == 2                                          # as many as the last stage needs
    item = [(random_images(1, seed=3), TEXTS)]
    spent = []
    assert torch.equal(full.score_items(item)[0], kept.score_items(item, spent=spent)[0])
    assert spent[0]["rows"] == 30 and (spent[0]["evaluations"] == 6).all()
    d_full = DiffusionITM.from_pretrained(tiny_sd, device="cpu", n_timesteps=4)
    d_kept = DiffusionITM.from_pretrained(tiny_sd, device="cpu", n_timesteps=4, adaptive=[(1, 5), (4, None)])
    d_cut = DiffusionITM.from_pretrained(tiny_sd, device="cpu", n_timesteps=4, adaptive=[(1, 2), (4, None)])
    item = [(random_images(1, seed=3), TEXTS[:5])]
    spent = []
    assert torch.equal(d_full.score_items(item)[0], d_kept.score_items(item, spent=spent)[0])
    assert spent[0]["rows"] == 4 * 6                                # 5 texts and the shared "" row, 4 timesteps
    spent = []
    S = d_cut.score_items(item, spent=spent)[0]
    assert spent[0]["rows"] == 6 + 3 * 3                            # then 2 survivors and "" for 3 more timesteps
    assert sorted(spent[0]["evaluations"].flatten().tolist()) == [1, 1, 1, 4, 4]
    top = spent[0]["evaluations"][0] == 4
    assert torch.allclose(S[0, top], d_full.score_items(item)[0][0, top], atol=1e-6)
    assert S[0, top].min() > S[0, ~top].max()


def test_schedules_and_draws_are_checked():
    assert plan_units(None, 4) == (1, None) and plan_units([(4, 5), (16, 1)], 4) == (4, [(4, 5), (16, 1)])
    for bad in ([(4, 5), (4, 1)], [(0, 5), (4, None)], [(4, None), (8, None)]):
        with pytest.raises(InputError, match="increase"):
            plan_units(bad, 4)
    with pytest.raises(InputError, match="raise --draws"):
        plan_units([(4, 5), (16, 1)], 4, draws=2)


def test_cli_refuses_bad_schedules(no_model, capsys):
    for value in ("4:5,3:1", "a:b", "4:0,8", "4,8"):
        assert main_of(evaluate, ["--dataset", "shapes", "--adaptive", value]) == 2
        assert "--adaptive" in error_line(capsys), value


# ---- level weights -------------------------------------------------------------------------------------------------

def test_level_weights_zero_is_uniform_trained_is_the_weighted_ensemble_and_they_round_trip(tiny_sd, tmp_path):
    m = Discffusion.from_pretrained(tiny_sd, device="cpu", levels=(0.2, 0.4, 0.6, 0.8))
    ims = random_images(2, seed=3)
    S = m.score(ims, TEXTS[:2])
    per = m.score_items([(ims, TEXTS[:2])], per_unit=True)[0]                         # (4, 2, 2)
    logits = m.add_level_weights()
    assert torch.equal(m.score(ims, TEXTS[:2]), S)                                  # 4 levels: bit for bit
    with torch.no_grad():
        logits.copy_(torch.tensor([2.0, -1.0, 0.5, 0.0]))
    want = (logits.softmax(0)[:, None, None] * per).sum(0)
    assert torch.allclose(m.score(ims, TEXTS[:2]), want, atol=1e-6)
    path = str(tmp_path / "w.safetensors")
    m.save_trained(path)
    back = Discffusion.from_pretrained(tiny_sd, device="cpu", levels=(0.2, 0.4, 0.6, 0.8))
    back.load_trained(path)
    assert torch.equal(back.level_logits.detach(), logits.detach())
    other = Discffusion.from_pretrained(tiny_sd, device="cpu", levels=(0.2, 0.8))
    with pytest.raises(InputError, match="learned for noise levels"):
        other.load_trained(path)
    d = DiffusionITM.from_pretrained(tiny_sd, device="cpu", n_timesteps=3)
    with torch.no_grad():
        d.add_level_weights().copy_(torch.tensor([1.0, 0.0, -1.0]))
    d.save_trained(path)                                            # the timestep weights alone, no LoRA
    d2 = DiffusionITM.from_pretrained(tiny_sd, device="cpu", n_timesteps=3)
    d2.load_trained(path)
    assert torch.equal(d2.score(ims, TEXTS[:2]), d.score(ims, TEXTS[:2]))


def test_level_weights_train_with_the_deltas(tiny_sd):
    """A training step with --level-weights weighs its one drawn level by n_levels x softmax(w): at w = 0 the same
    loss as without, and the logits get a gradient."""
    import triplet_loss
    m = Discffusion.from_pretrained(tiny_sd, device="cpu", levels=(0.2, 0.4, 0.6, 0.8))
    m.add_trainable()
    batch = [(random_images(1, seed=3), TEXTS[:3])]
    with m.capture:
        plain = triplet_loss.margin_loss(m.score_items(batch, True, torch.Generator().manual_seed(1)))
        logits = m.add_level_weights()
        loss = triplet_loss.margin_loss(m.score_items(batch, True, torch.Generator().manual_seed(1)))
        loss.backward()
    assert loss.item() == pytest.approx(plain.item(), abs=1e-7)
    assert any(p is logits for p in m.trainable_parameters()) and logits.grad is not None and logits.grad.abs().sum() > 0


def test_evaluate_records_each_items_evaluations_and_rows(tiny_sd, tmp_path):
    """evaluate_items keeps each candidate's evaluations and the item's UNet rows, and their mean per item; with
    an adaptive schedule the rows fall and the survivors' scores are the full ensemble's."""
    from benchmarks.reading import Item
    paths = []
    for k, im in enumerate(random_images(2, seed=3)):
        paths.append(str(tmp_path / f"{k}.png"))
        im.save(paths[-1])
    items = [Item(str(k), [p], TEXTS) for k, p in enumerate(paths)]
    full = Discffusion.from_pretrained(tiny_sd, device="cpu", levels=(0.2, 0.8), draws=2)
    cut = Discffusion.from_pretrained(tiny_sd, device="cpu", levels=(0.2, 0.8), adaptive=[(1, 2), (4, None)])
    a = evaluate.evaluate_items(full, "flickr30k_text", items)
    b = evaluate.evaluate_items(cut, "flickr30k_text", items)
    assert a["rows_per_item"] == 20 and all(r["rows"] == 20 and r["evaluations"] == [[4] * 5] for r in a["items"])
    assert b["rows_per_item"] == 5 + 2 * 3
    for ra, rb in zip(a["items"], b["items"]):
        kept = [j for j, e in enumerate(rb["evaluations"][0]) if e == 4]
        assert len(kept) == 2 and all(rb["scores"][0][j] == pytest.approx(ra["scores"][0][j], abs=1e-6) for j in kept)
        assert min(rb["scores"][0][j] for j in kept) > max(s for j, s in enumerate(rb["scores"][0]) if j not in kept)


def test_the_curves_reading_of_a_schedule_equals_the_models_adaptive_path(tiny_sd):
    """tools.curve reads each point off the per-unit tables; a schedule read that way gives the scores and UNet rows
    (DiffusionITM's shared "" row included) of the model's own adaptive path."""
    from tools import curve
    assert van_der_corput(8) == [0, 4, 2, 6, 1, 5, 3, 7]
    item = [(random_images(1, seed=3), TEXTS)]
    d = DiffusionITM.from_pretrained(tiny_sd, device="cpu", n_timesteps=4)
    table = d.score_items(item, per_unit=True)[0]                                     # (4, 1, 5)
    cut = DiffusionITM.from_pretrained(tiny_sd, device="cpu", n_timesteps=4, adaptive=[(1, 2), (4, None)])
    spent = []
    S = cut.score_items(item, spent=spent)[0]
    hits, rows, mats = curve.point("flickr30k_text", [table], elimination_order(4, 1), True, [(1, 2), (4, None)])
    assert rows == [spent[0]["rows"]] and torch.allclose(mats[0], S, atol=1e-5)
    assert hits == [float(S[0].argmax() == 0 and (S[0, 0] > S[0, 1:]).all())]


def test_train_fits_level_weights_alone_and_evaluate_uses_them(tmp_path):
    """train.py --fit-level-weights on the shapes world: the per-level scores of the training split once, the weights
    fit (the training loss falls), saved with the (zero) deltas; evaluate.py --checkpoint scores with them."""
    import json

    import train
    from safetensors import safe_open
    out = tmp_path / "fit"
    assert main_of(train, ["--dataset", "shapes", "--data-root", str(tmp_path / "shapes"), "--shots", "8",
                           "--fit-level-weights", "--fit-steps", "50", "--no-zero-shot", "--eval-limit", "4",
                           "--compare", "", "--output-dir", str(out), "--device", "cpu", "--threads", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    fit = res["level_fit"]
    assert fit["items"] == 8 and fit["fitted"]["loss"] < fit["uniform"]["loss"]
    assert sum(fit["weights"]) == pytest.approx(1.0) and res["train"]["steps"] == 0
    with safe_open(str(out / "prompt_deltas.safetensors"), "pt") as f:
        assert torch.allclose(f.get_tensor("level_logits").softmax(0), torch.tensor(fit["weights"]), atol=1e-6)
    assert main_of(evaluate, ["--dataset", "shapes", "--data-root", str(tmp_path / "shapes"), "--limit", "4",
                              "--checkpoint", str(out / "prompt_deltas.safetensors"), "--device", "cpu",
                              "--output", str(tmp_path / "r.json"), "--shots", "8", "--methods", "discffusion"]) == 0
    got = json.loads((tmp_path / "r.json").read_text())["datasets"]["shapes"]["items"]
    assert [r["scores"] for r in got] == [r["scores"] for r in res["few_shot"]["items"]]
