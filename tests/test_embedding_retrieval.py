"""tools/embedding_retrieval.py (App. E, Table 4): retrieval by embeddings alone, against the direct computation."""
import json

import numpy as np
import pytest
import torch

from datasets import load_items, split_items
from discffusion import Discffusion
from families.loading import load_components
from support import scenes
from tools import embedding_retrieval, generation
from tools.sd_configs import make_random_clip


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
