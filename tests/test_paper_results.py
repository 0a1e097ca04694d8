"""tools/: Table 4 (embedding retrieval), App. G (generation with the deltas merged, FID / IS, the shapes pixel reader)
and Fig. 11 (failure cases), on tiny random models."""
import json

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
from PIL import Image

import evaluate
from benchmarks import shapes
from datasets import load_items, split_items
from discffusion import Discffusion
from families.loading import load_components
from tools.sd_configs import make_random_clip
from tools import embedding_retrieval, failures, generation


@pytest.fixture(scope="module")
def deltas_file(tiny_sd, tmp_path_factory):
    """Random p^k, p^v and head logits for the tiny random model, saved the way train.py saves them."""
    model = Discffusion.from_pretrained(tiny_sd, device="cpu")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.add_trainable():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp_path_factory.mktemp("run") / "prompt_deltas.safetensors"
    model.save_trained(str(path))
    return str(path)


def scenes(n, seed=0):
    ims, caps = shapes.training_pairs(n, seed=seed)
    return [Image.fromarray(im) for im in ims], [c[0] for c in caps]


# ---- App. G: the deltas merged into W^k, W^v ------------------------------------------------------------------------

def test_merged_weights_equal_the_capture_processors_deltas_and_are_restored(tiny_sd, deltas_file):
    model = Discffusion.from_pretrained(tiny_sd, device="cpu")
    model.load_trained(deltas_file)                                            # eq. 5 via PromptDeltas.project
    unet = load_components(tiny_sd, torch.float32)["unet"]                     # stock processors
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([300, 700])
    text = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        with model.capture:                                                    # eq. 5 in the capture processors
            want = model.unet(z, t, encoder_hidden_states=text).sample
        base = unet(z, t, encoder_hidden_states=text).sample
        with generation.deltas_applied(unet, generation.read_deltas(deltas_file)):
            got = unet(z, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - base).abs().max() > 1e-3                                     # the deltas matter
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_a_delta_file_for_another_unet_is_refused(tiny_sd, deltas_file):
    unet = load_components(tiny_sd, torch.float32)["unet"]
    deltas = generation.read_deltas(deltas_file)
    name = next(iter(deltas))
    with pytest.raises(generation.InputError, match="shape"):
        with generation.deltas_applied(unet, {name: (deltas[name][0][:, :3], deltas[name][1])}):
            pass
    with pytest.raises(generation.InputError, match="not in this UNet"):
        with generation.deltas_applied(unet, {"up_blocks.9.attn2": deltas[name]}):
            pass


def test_same_seeds_give_the_same_samples_and_the_deltas_change_them(tiny_sd, deltas_file):
    pipe = generation.load_pipeline(tiny_sd, "cpu")
    prompts = ["a red circle left of a blue square", "a green triangle above a yellow circle"]
    a = generation.sample(pipe, prompts, [0, 1], steps=3, guidance=2.0)
    b = generation.sample(pipe, prompts[::-1], [1, 0], steps=3, guidance=2.0, batch=1)  # other batch-mates
    assert np.array_equal(np.asarray(a[0][0]), np.asarray(b[1][1]))
    with generation.deltas_applied(pipe.unet, generation.read_deltas(deltas_file)):
        c = generation.sample(pipe, prompts, [0], steps=3, guidance=2.0)
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(c[0][0]))


class TinyLogits(nn.Module):
    """A fixed random 'classifier' of uint8 images: the test's stand-in for Inception (no download)."""

    def __init__(self, classes=5):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3 * 4 * 4, classes)

    def forward(self, x):
        return self.lin(nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1))


def test_fid_and_inception_score_equal_their_formulas_with_a_tiny_feature_module():
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (40, 3, 16, 16), generator=g, dtype=torch.uint8)
    fake = (real.float() * 0.6 + 40).to(torch.uint8)
    got = generation.fid_is(real, fake, generation.Thumbnail(2), TinyLogits(), splits=1, batch=7)
    f_r, f_f = (generation.Thumbnail(2)(x).double().numpy() for x in (real, fake))
    mu_r, mu_f, c_r, c_f = f_r.mean(0), f_f.mean(0), np.cov(f_r, rowvar=False), np.cov(f_f, rowvar=False)
    fid = ((mu_r - mu_f) ** 2).sum() + np.trace(c_r + c_f - 2 * scipy.linalg.sqrtm(c_r @ c_f).real)
    assert got["fid"] == pytest.approx(fid, rel=1e-3)
    p = TinyLogits()(fake).softmax(1).detach().double()
    kl = (p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean().exp()
    assert got["is"] == pytest.approx(float(kl), rel=1e-5)
    same = generation.fid_is(real, real, generation.Thumbnail(2), None)
    assert abs(same["fid"]) < 1e-3 and "is" not in same


def test_the_pixel_reader_reads_the_worlds_drawings_and_catches_wrong_captions():
    images, captions = scenes(60, seed=5)
    shares = generation.match_shares(captions, images)
    assert shares["all"] >= 95
    recoloured = []
    for c in captions:
        words = c.split(" ")
        other = next(x for x in shapes.COLORS if x not in (words[1], words[-2]))
        recoloured.append(" ".join(words[:1] + [other] + words[2:]))
    assert generation.match_shares(recoloured, images)["colours"] == 0
    swapped = [c.replace("left of", "RIGHT").replace("right of", "left of").replace("RIGHT", "right of")
               .replace("above", "UP").replace("below", "above").replace("UP", "below") for c in captions]
    assert generation.match_shares(swapped, images)["relation"] <= 5
    blank = Image.new("RGB", (32, 32), shapes.BACKGROUND)
    assert generation.caption_match(captions[0], blank) == dict(colours=False, shapes=False, relation=False,
                                                                all=False)


def test_generation_cli_writes_fig9_and_table12(tiny_sd, deltas_file, tmp_path, capsys):
    code = generation.main(["--model", tiny_sd, "--checkpoint", deltas_file, "--prompt", "a red circle left of a "
                            "blue square", "--n-seeds", "1", "--steps", "2", "--n-captions", "4", "--out",
                            str(tmp_path), "--device", "cpu"])
    assert code == 0
    rec = json.loads((tmp_path / "table12_generation.json").read_text())
    rows = rec["table12"]["rows"]
    assert set(rows) == {"Stable Diffusion", "Discffusion", "real images (the reader's ceiling)"}
    assert rows["real images (the reader's ceiling)"]["caption_match"]["all"] == 100
    assert np.isfinite(rows["Discffusion"]["fid"])
    assert (tmp_path / "fig9_generation.png").exists() and "Table 12" in capsys.readouterr().out
    assert generation.main(["--model", tiny_sd, "--checkpoint", str(tmp_path / "none.safetensors")]) == 2


# ---- Table 4: embeddings alone ------------------------------------------------------------------------------------

def test_discffusion_embedding_is_the_direct_computation(tiny_sd, deltas_file):
    model = Discffusion.from_pretrained(tiny_sd, device="cpu", levels=(0.3, 0.7))
    model.load_trained(deltas_file)
    emb = embedding_retrieval.DiscffusionEmbedding(model)
    images, texts = scenes(3)
    got_img, got_txt = emb.image_embeddings(images), emb.text_embeddings(texts)
    # direct: a stock UNet with W^k + p^k, W^v + p^v merged, the query features of each layer hooked
    parts = load_components(tiny_sd, torch.float32)
    unet, deltas = parts["unet"], generation.read_deltas(deltas_file)
    qs = {}
    for n in model.capture.layers:
        unet.get_submodule(n).to_q.register_forward_hook(lambda m, i, o, n=n: qs.__setitem__(n, o))
    z = model.encode_images(images)
    empty, _ = model.encode_texts([""])
    want = 0
    with torch.no_grad(), generation.deltas_applied(unet, deltas):
        for level, eps in zip(model.levels, model.level_noise(z.shape[1:])):
            z_t, ts = model.add_noise(z, eps, model.timestep(level))
            unet(z_t, ts, encoder_hidden_states=empty.expand(3, -1, -1))
            want = want + torch.stack([torch.nn.functional.normalize(
                qs[n].mean(1) @ unet.get_submodule(n).to_k.weight, dim=-1) for n in model.capture.layers]).mean(0)
    torch.testing.assert_close(got_img, torch.nn.functional.normalize(want, dim=-1), rtol=1e-4, atol=1e-5)
    tok = parts["tokenizer"](texts, padding="max_length", max_length=parts["tokenizer"].model_max_length,
                             return_tensors="pt")
    hidden = parts["text_encoder"](tok.input_ids).last_hidden_state
    eos = hidden[torch.arange(3), (tok.input_ids == parts["tokenizer"].eos_token_id).int().argmax(1)]
    torch.testing.assert_close(got_txt, torch.nn.functional.normalize(eos, dim=-1))
    emb.model.tokenizer.padding_side = "left"                                  # pad = EOS on the left: still its own EOS
    left = emb.model.tokenizer(texts, padding="max_length", max_length=parts["tokenizer"].model_max_length,
                               return_tensors="pt").input_ids
    h = parts["text_encoder"](left).last_hidden_state[:, -1]
    torch.testing.assert_close(emb.text_embeddings(texts), torch.nn.functional.normalize(h, dim=-1))
    emb.model.tokenizer.padding_side = "right"
    s = emb.score_items([(images[:2], texts), (images[2:], texts[:1])])
    torch.testing.assert_close(s[0], got_img[:2] @ got_txt.T)
    torch.testing.assert_close(s[1], got_img[2:] @ got_txt[:1].T)               # no batch mixing
    zero = embedding_retrieval.DiscffusionEmbedding(Discffusion.from_pretrained(tiny_sd, device="cpu",
                                                                                levels=(0.3, 0.7)))
    assert (zero.image_embeddings(images) - got_img).abs().max() > 1e-3       # the deltas enter through p^k


def test_embedding_cli_prints_table4_for_clip_and_discffusion(tiny_sd, deltas_file, tmp_path, capsys):
    clip = make_random_clip(str(tmp_path / "clip"))
    out = tmp_path / "t4.json"
    code = embedding_retrieval.main(["--dataset", "shapes", "--data-root", str(tmp_path / "shapes"), "--model",
                                     tiny_sd, "--clip-model", clip, "--checkpoint", deltas_file, "--limit", "6",
                                     "--levels", "0.5", "--device", "cpu", "--output", str(out)])
    assert code == 0
    rec = json.loads(out.read_text())
    assert list(rec["rows"]) == ["CLIP-embedding (zero-shot)", "Discffusion-embedding (zero-shot)",
                                 "Discffusion-embedding"]
    assert rec["n_items"] == 6 and "Table 4" in capsys.readouterr().out
    items = rec["results"]["Discffusion-embedding"]["items"]
    test = split_items(load_items("shapes", str(tmp_path / "shapes"))[0], "60", 0)[1]   # train.py's held-out split
    assert [it["id"] for it in items] == [it.id for it in test[:6]]
    hits = [it["scores"][0][0] > it["scores"][1][0] for it in items]
    assert rec["rows"]["Discffusion-embedding"]["Average"] == pytest.approx(100 * np.mean(hits))
    assert all(-1 <= v <= 1 for it in items for row in it["scores"] for v in row)   # cosines


# ---- Fig. 11: failures -------------------------------------------------------------------------------------------

def test_failures_draws_the_most_negative_margins_with_the_evaluated_scores(tiny_sd, deltas_file, tmp_path):
    res = tmp_path / "results.json"
    assert evaluate.main(["--dataset", "shapes", "--data-root", str(tmp_path / "shapes"), "--model", tiny_sd,
                          "--methods", "discffusion", "--checkpoint", deltas_file, "--limit", "8", "--levels",
                          "0.5", "--device", "cpu", "--output", str(res)]) == 0
    assert failures.main([str(res), "-n", "3", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "fig11_failures.json").read_text())
    items = json.loads(res.read_text())["datasets"]["shapes"]["items"]
    margins = sorted(it["scores"][0][0] - it["scores"][1][0] for it in items)[:3]
    assert [f["margin"] for f in rec["failures"]] == pytest.approx(margins)
    for f in rec["failures"]:                                                  # same model, options and deltas
        assert f["redrawn_scores"] == pytest.approx([f["evaluated_scores"][0][0], f["evaluated_scores"][1][0]],
                                                    rel=1e-4, abs=1e-6)
        assert np.asarray(f["maps"]["positive"]).shape[0] == len(f["words"])
    assert (tmp_path / "fig11_failures.png").exists()
    assert failures.main([str(tmp_path / "missing.json")]) == 2
