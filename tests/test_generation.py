"""tools/generation.py (App. G, Fig. 9, Table 12): the deltas merged into W^k, W^v, seeded samples, FID / IS, the
shapes pixel reader, the command line; on tiny random models."""
import json
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
from diffusers import DDPMScheduler
from PIL import Image

from baselines.diffusion_itm import DiffusionITM
from benchmarks import shapes
from discffusion import Discffusion
from families.loading import load_components
from methods import TINY_MODEL
from support import scenes
from tools import generation


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


# ---- the committed model's scheduler: steps_offset 1 (Stable Diffusion's), so the DDIM pipeline loads without the
# outdated-config deprecation; Discffusion's and DiffusionITM's scores (DDPM add_noise at chosen t) do not read it ----

def test_committed_model_loads_into_the_ddim_pipeline_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = generation.load_pipeline(TINY_MODEL, device="cpu")
    assert pipe.scheduler.config.steps_offset == 1     # what the pipeline itself set when the file said 0


def test_scores_do_not_depend_on_steps_offset():
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    texts = ["a red circle left of a blue square", "a blue square left of a red circle"]
    for make in (lambda: Discffusion.from_pretrained(TINY_MODEL, device="cpu", lam=100),
                 lambda: DiffusionITM.from_pretrained(TINY_MODEL, device="cpu", n_timesteps=4)):
        a, b = make(), make()
        core = getattr(b, "core", b)
        core.scheduler = DDPMScheduler.from_config(core.scheduler.config, steps_offset=0)
        assert getattr(a, "core", a).scheduler.config.steps_offset == 1
        assert torch.equal(a.score(images, texts), b.score(images, texts))
