"""Latent consistency distillation (tools/distill_lcm.py, LCM paper Alg. 1) and the committed shapes LCM: the student
starts as the teacher, the boundary condition holds, the consistency loss falls on a fixed batch, and the written
folder loads as family "lcm" and scores."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from discffusion import Discffusion
from families import family_of
from families.loading import load_components
from tools import distill_lcm
from tools.sd_configs import make_random_sd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(REPO, "models", "tiny-shapes-lcm")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_random_sd("tiny", str(tmp_path_factory.mktemp("teacher")), seed=0)


def parts_and_args(folder, argv=()):
    parts = load_components(folder, torch.float32)
    a = distill_lcm.build_parser().parse_args(list(argv))
    ddim = distill_lcm.DDIMScheduler.from_config(parts["scheduler"].config, timestep_spacing="trailing",
                                                 set_alpha_to_one=False)
    ddim.set_timesteps(a.ddim_steps)
    lcm = distill_lcm.LCMScheduler.from_config(parts["scheduler"].config)
    return parts, a, ddim, lcm


def test_student_starts_as_the_teacher_and_f_is_identity_at_t0(teacher):
    parts, a, ddim, lcm = parts_and_args(teacher)
    unet = parts["unet"]
    student = distill_lcm.make_student(unet, 256)
    assert student.config.time_cond_proj_dim == 256 and family_of(student.config).NAME == "lcm" and family_of(unet.config).NAME == "sd"
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, unet.config.sample_size, unet.config.sample_size, generator=g)
    t = torch.tensor([0, 499, 999])
    cond = torch.randn(3, 16, unet.config.cross_attention_dim, generator=g)
    emb = distill_lcm.guidance_embedding(torch.tensor([2.0, 5.0, 8.0]), 256)          # (3, 256)
    with torch.no_grad():
        assert torch.allclose(student(z, t, cond, timestep_cond=emb).sample, unet(z, t, cond).sample, atol=1e-5)
        f = distill_lcm.consistency(student, z, t, cond, emb, lcm, ddim.alphas_cumprod, "epsilon")
        eps = unet(z, t, cond).sample
    a_t = ddim.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.equal(f[0], z[0])                                      # boundary condition: f(z, t=0) = z
    x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    assert torch.allclose(f[2], x0[2], atol=1e-3 * x0[2].abs().max())  # c_out ~ 1 far from 0: the x0 prediction


def test_consistency_loss_falls_on_a_fixed_batch(teacher):
    """A learning test: the same batch, noise, timesteps and w at every step (reseeded); 12 steps at lr 1e-4."""
    parts, a, ddim, lcm = parts_and_args(teacher)
    unet, te, tok = parts["unet"].requires_grad_(False), parts["text_encoder"], parts["tokenizer"]
    student = distill_lcm.make_student(unet, a.cond_dim).train()
    target = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 4, unet.config.sample_size, unet.config.sample_size, generator=g)  # (4, 4, h, w)
    with torch.no_grad():
        cond = te(distill_lcm.tokenize(tok, ["a red circle", "a blue square", "a cat", "a dog"])).last_hidden_state
        uncond = te(distill_lcm.tokenize(tok, [""])).last_hidden_state
    losses = []
    for _ in range(12):
        torch.manual_seed(0)
        loss = distill_lcm.distill_step((z, cond), student, target, unet, ddim, lcm, uncond, a)
        loss.backward()
        opt.step()
        opt.zero_grad()
        distill_lcm.ema_update(target, student, a.ema)
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.5 * losses[0], losses


def test_distill_cli_writes_a_folder_discffusion_loads_as_lcm(teacher, tmp_path):
    out = str(tmp_path / "lcm")
    distill_lcm.main(["--teacher", teacher, "--out", out, "--images", "8", "--steps", "2", "--batch", "4",
                      "--grid", "", "--threads", "1"])
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert index["_class_name"] == "LatentConsistencyModelPipeline" and index["scheduler"][1] == "LCMScheduler"
    m = Discffusion.from_pretrained(out, device="cpu", levels=(0.4,))
    assert m.family == "lcm" and m.unet.config.time_cond_proj_dim == 256
    from PIL import Image
    imgs = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    s = m.score(imgs, ["a red circle", "a blue square"])                    # (2, 2)
    assert s.shape == (2, 2) and torch.isfinite(s).all()
    # the teacher's frozen parts are saved unchanged
    t_parts, o_parts = load_components(teacher, torch.float32), load_components(out, torch.float32)
    for name in ("vae", "text_encoder"):
        for (k, p), (k2, q) in zip(t_parts[name].state_dict().items(), o_parts[name].state_dict().items()):
            assert k == k2 and torch.equal(p, q)


def test_bad_w_range_is_one_error_line(teacher, tmp_path):
    r = subprocess.run([sys.executable, "-m", "tools.distill_lcm", "--teacher", teacher, "--out", str(tmp_path / "x"),
                        "--w-min", "5", "--w-max", "2"], capture_output=True, text=True, cwd=REPO)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and errors == ["error: --w-max 2.0 is below --w-min 5.0"], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(not os.path.isdir(COMMITTED), reason="models/tiny-shapes-lcm not committed")
def test_committed_lcm_loads_as_lcm_and_evaluates(tmp_path):
    m = Discffusion.from_pretrained(COMMITTED, device="cpu")
    assert m.family == "lcm" and m.config["guidance_scale"] == 8.5
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    out = str(tmp_path / "lcm.json")
    r = subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), "--dataset", "shapes", "--model", COMMITTED, "--methods", "discffusion", "--limit", "2",
                        "--output", out], capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.load(open(out))["datasets"]["shapes"]
    assert d["n_items"] == 2 and json.load(open(out))["model"]["model"] == COMMITTED
