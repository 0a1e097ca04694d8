"""families/pixart.py on a tiny random PixArt-Sigma built from configs: the UNets' capture on its attn2 layers leaves the
transformer's output as the stock one with T5's padding masked, the conditioning is PixArtSigmaPipeline's, the mask is
T5's caption tokens, the prediction is the eps half of the learned-variance output, and scores do not mix rows."""
import pytest
import torch

from attention_capture import CallRecord
from discffusion import Discffusion
from families import pixart
from tools.mmdit_configs import make_random_pixart
from support import random_images

TEXTS = ["a red circle left of a blue square", "a dog on the table", "cat"]
T5_LEN = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_random_pixart(str(tmp_path_factory.mktemp("pixart") / "m"))


@pytest.fixture(scope="module")
def model(folder):
    return Discffusion.from_pretrained(folder, device="cpu", max_sequence_length=T5_LEN)


def test_conditioning_is_the_pixart_sigma_pipelines(folder, model):
    from diffusers import PixArtSigmaPipeline
    pipe = PixArtSigmaPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda mod, a, k: calls.append(dict(k)), with_kwargs=True)
    R = model.resolution
    pipe(TEXTS[:2], num_inference_steps=1, guidance_scale=1.0, height=R, width=R, output_type="latent",
         max_sequence_length=T5_LEN, clean_caption=False, use_resolution_binning=False)
    hidden, mask = model.encode_texts(TEXTS[:2])
    ours = model.unet_kwargs(hidden)
    assert torch.allclose(calls[0]["encoder_hidden_states"], ours["encoder_hidden_states"], atol=1e-6)
    assert torch.equal(calls[0]["encoder_attention_mask"].float(), ours["encoder_attention_mask"])
    assert mask.sum(1).tolist() == [len(t.split()) for t in TEXTS[:2]]                 # T5's caption tokens
    assert (ours["encoder_attention_mask"].sum(1) == mask.sum(1) + 1).all()            # attended: caption + </s>


def test_capture_leaves_the_output_and_takes_the_eps_half(folder, model):
    from diffusers import PixArtTransformer2DModel
    stock = PixArtTransformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    assert model.capture.layers == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]
    hidden, mask = model.encode_texts(TEXTS[:2])
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, model.resolution // model.vae_scale, model.resolution // model.vae_scale, generator=g)
    ts = torch.tensor([200, 700])
    with torch.no_grad(), model.capture:
        record = CallRecord(mask)
        got = pixart.denoise(model, z, ts, hidden, record)
        want = stock(z, timestep=ts, **model.unet_kwargs(hidden)).sample
    assert want.shape[1] == 8 and got.shape == z.shape
    assert torch.allclose(got, want[:, :4], atol=1e-5)
    assert set(record.pooled) == set(model.capture.layers)


def test_scores_without_batch_mixing_and_zero_deltas(model):
    ims = random_images(2)
    S = model.score(ims, TEXTS)
    assert S.shape == (2, 3) and torch.isfinite(S).all()
    assert model.score([ims[1]], [TEXTS[2]])[0, 0].item() == pytest.approx(S[1, 2].item(), abs=1e-5)
    model.add_trainable()
    assert torch.equal(model.score(ims, TEXTS), S)


def test_train_and_evaluate_on_pixart(folder, tmp_path):
    import json
    import os

    import evaluate
    import train
    from common import read_checkpoint
    from tools.cli import run_cli
    base = ["--dataset", "shapes", "--model", folder, "--data-root", str(tmp_path / "shapes"), "--device", "cpu",
            "--max-sequence-length", str(T5_LEN)]
    out = str(tmp_path / "run")
    assert run_cli(train.main, base + ["--shots", "4", "--steps", "2", "--batch-size", "2", "--eval-limit", "2",
                                       "--itm-timesteps", "2", "--output-dir", out]) == 0
    path = os.path.join(out, "prompt_deltas.safetensors")
    meta, tensors = read_checkpoint(path)
    assert meta["family"] == "pixart" and any(v.abs().sum() > 0 for k, v in tensors.items() if k.startswith("delta_k"))
    result = str(tmp_path / "eval.json")
    assert evaluate.main(base + ["--limit", "2", "--itm-timesteps", "2", "--output", result, "--checkpoint", path]) == 0
    assert json.load(open(result))["model"]["family"] == "pixart"
