"""Latent consistency distillation (LCM paper, Luo et al. 2023, "Latent Consistency Models", Algorithm 1) of a
Stable Diffusion in diffusers layout, on CPU; it makes the LCM of the shapes world, `models/tiny-shapes-lcm`.

Not a paper section of Discffusion: it gives Table 3's "Discffusion (LCM)" row an LCM on the embedded shapes world.
The recipe is diffusers' `examples/consistency_distillation/train_lcm_distill_sd_wds.py`, step for step:
    teacher   eps_phi(z, t, c): the frozen SD UNet; the text encoder and VAE frozen too
    student   f_theta(z, w, t, c) = c_skip(t) z + c_out(t) x0(eps_theta(z, t, c, timestep_cond=emb(w)))
              a copy of the teacher UNet with time_cond_proj_dim (the guidance embedding of w, as diffusers'
              LatentConsistencyModelPipeline.get_guidance_scale_embedding computes it), teacher weights (strict=False)
    target    f_theta-: the same, theta- an EMA of theta (decay 0.95)
    per step  z = E(x) * s;  n ~ U{0..N-1} over N = 50 DDIM timesteps t_n = 20 (n + 1) - 1 (skip k = 1000 / N = 20)
              z_{t+k} = sqrt(a) z + sqrt(1 - a) eps;     w ~ U[w_min, w_max]
              eps_w   = eps_phi(z_{t+k}, c) + w (eps_phi(z_{t+k}, c) - eps_phi(z_{t+k}, ""))   (the LCM paper's CFG)
              z_t     = DDIM step (DDIMScheduler.step, eta 0) from t+k to t with eps_w
              loss    = d( f_theta(z_{t+k}, w, t+k, c),  f_theta-(z_t, w, t, c) )    d: L2 (default) or Huber
              theta- <- 0.95 theta- + 0.05 theta
c_skip / c_out are LCMScheduler.get_scalings_for_boundary_condition_discrete (sigma_data 0.5, timestep scaling 10).
One choice of ours: the new guidance projection (time_embedding.cond_proj) starts at zero, so the student starts as
the teacher exactly (the diffusers script leaves it random; for a few hundred CPU steps a random start costs steps).
The saved folder is a LatentConsistencyModelPipeline (LCMScheduler in scheduler/) with the teacher's VAE, text
encoder and tokenizer, which `Discffusion.from_pretrained(folder)` loads as family "lcm".

    python -m tools.distill_lcm --teacher models/tiny-shapes-sd --out models/tiny-shapes-lcm
"""
import copy
import random
import sys
import time

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel

from common import InputError
from tools.cli import ArgumentParser, number, positive_int, run_cli
from families.lcm import guidance_embedding
from families.loading import load_components
from benchmarks import shapes
from tools.pretrain_shapes import draw_grid, encode, to_tensor, tokenize
from tools.sd_configs import save_sd

GRID_CAPTIONS = ("a red circle left of a blue square", "a blue square left of a red circle",
                 "a green triangle above a yellow circle", "a yellow circle above a green triangle",
                 "a yellow square right of a red triangle", "a blue circle below a green square")


def log(msg, t0=[time.time()]):
    print(f"[{time.time() - t0[0]:7.1f}s] {msg}", flush=True)


def predicted_x0(out, z, t, alphas_cumprod, prediction_type):
    """The UNet's output at timesteps t (B,) on z (B, C, H, W) -> its clean latent x0 (B, C, H, W)."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    if prediction_type == "v_prediction":
        return a.sqrt() * z - (1 - a).sqrt() * out
    return (z - (1 - a).sqrt() * out) / a.sqrt()


def consistency(unet, z, t, cond, w_emb, lcm, alphas_cumprod, prediction_type):
    """f(z, w, t, c) = c_skip(t) z + c_out(t) x0: the consistency function with its boundary condition f(z, 0) = z."""
    c_skip, c_out = (c.view(-1, 1, 1, 1) for c in lcm.get_scalings_for_boundary_condition_discrete(t.float()))
    out = unet(z, t, encoder_hidden_states=cond, timestep_cond=w_emb).sample                 # (B, 4, H, W)
    return c_skip * z + c_out * predicted_x0(out, z, t, alphas_cumprod, prediction_type)


def make_student(teacher, cond_dim):
    """A copy of the teacher UNet with a guidance embedding input (time_cond_proj_dim); its new projection at zero."""
    student = UNet2DConditionModel.from_config(teacher.config, time_cond_proj_dim=cond_dim)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def distill_step(batch, student, target, teacher, ddim, lcm, uncond, a):
    """One step of Algorithm 1 on a batch (z (B, 4, H, W) scaled latents, cond (B, L, D) text states): the loss."""
    z, cond = batch
    B = len(z)
    alphas_cumprod = ddim.alphas_cumprod
    pred_type = ddim.config.prediction_type
    T, N = ddim.config.num_train_timesteps, a.ddim_steps
    k = T // N
    n = torch.randint(0, N, (B,))
    t_start = (n + 1) * k - 1                                                    # (B,) t_{n+k} in {19, 39, ..., 999}
    t_end = (t_start - k).clamp(min=0)                                           # (B,) t_n
    eps = torch.randn_like(z)
    z_start = ddim.add_noise(z, eps, t_start)                                    # (B, 4, H, W)
    w = a.w_min + (a.w_max - a.w_min) * torch.rand(B)                            # (B,)
    w_emb = guidance_embedding(w, student.config.time_cond_proj_dim)             # (B, 256)
    pred = consistency(student, z_start, t_start, cond, w_emb, lcm, alphas_cumprod, pred_type)
    with torch.no_grad():
        out_c, out_u = teacher(torch.cat([z_start, z_start]), torch.cat([t_start, t_start]),
                               torch.cat([cond, uncond.expand_as(cond)])).sample.chunk(2)  # (B, 4, H, W) each
        out_w = out_c + w.view(-1, 1, 1, 1) * (out_c - out_u)
        z_end = torch.cat([ddim.step(out_w[i:i + 1], int(t_start[i]), z_start[i:i + 1]).prev_sample
                           for i in range(B)])                                   # (B, 4, H, W) one DDIM step back
        tgt = consistency(target, z_end, t_end, cond, w_emb, lcm, alphas_cumprod, pred_type)
    if a.loss == "huber":
        return (torch.sqrt((pred - tgt) ** 2 + a.huber_c ** 2) - a.huber_c).mean()
    return F.mse_loss(pred, tgt)


@torch.no_grad()
def ema_update(target, student, decay):
    for p_t, p_s in zip(target.parameters(), student.parameters()):
        p_t.mul_(decay).add_(p_s, alpha=1 - decay)


@torch.no_grad()
def sample(folder, captions, n=6, steps=4, guidance=4.0, seed=0):
    """diffusers' LatentConsistencyModelPipeline on the saved folder: images (len(captions), n, H, W, 3) uint8."""
    pipe = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    x = pipe(list(captions), num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=n,
             height=size, width=size, generator=torch.Generator().manual_seed(seed), output_type="np").images
    x = (x * 255).round().astype("uint8")                                        # (C*n, H, W, 3)
    return x.reshape(len(captions), n, *x.shape[1:])


def build_parser():
    p = ArgumentParser(prog="python -m tools.distill_lcm", description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="models/tiny-shapes-sd", help="a Stable Diffusion folder in diffusers layout")
    p.add_argument("--out", default="runs/tiny-shapes-lcm",
                   help="default %(default)s (the committed one: models/tiny-shapes-lcm)")
    p.add_argument("--seed", type=number(int, low=0), default=0)
    p.add_argument("--images", type=positive_int, default=4000, help="shapes-world training images (drawn once)")
    p.add_argument("--steps", type=positive_int, default=160)
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--lr", type=number(above=0, high=10), default=3e-4)
    p.add_argument("--warmup", type=number(int, low=0), default=20)
    p.add_argument("--ema", type=number(low=0, high=1), default=0.95, help="EMA decay of the target UNet")
    p.add_argument("--w-min", type=number(low=0), default=2.0, help="guidance w, LCM form: eps_c + w (eps_c - eps_u)")
    p.add_argument("--w-max", type=number(low=0), default=8.0)
    p.add_argument("--ddim-steps", type=positive_int, default=50, help="DDIM timesteps N of the solver (skip 1000/N)")
    p.add_argument("--cond-dim", type=positive_int, default=256, help="time_cond_proj_dim of the guidance embedding")
    p.add_argument("--loss", choices=("l2", "huber"), default="l2")
    p.add_argument("--huber-c", type=number(above=0), default=1e-3)
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads")
    p.add_argument("--grid", default="runs/shapes_lcm_grid.png", help="4-step samples of the saved model ('' none; "
                   "default %(default)s)")
    p.add_argument("--grid-steps", type=positive_int, default=4)
    p.add_argument("--grid-guidance", type=number(low=1), default=4.0, help="the pipeline's guidance_scale (w + 1)")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.w_max < a.w_min:
        raise InputError(f"--w-max {a.w_max} is below --w-min {a.w_min}")
    t_start = time.time()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    parts = load_components(a.teacher, torch.float32)
    tok, text_encoder, vae, teacher = (parts[k] for k in ("tokenizer", "text_encoder", "vae", "unet"))
    if teacher.config.get("time_cond_proj_dim") or teacher.config.get("addition_embed_type"):
        raise InputError(f"teacher {a.teacher}: expected an SD 1.x / 2.x UNet (no time_cond_proj_dim, no SDXL "
                         "added conditions)")
    for m in (text_encoder, vae, teacher):
        m.requires_grad_(False).eval()
    ddim = DDIMScheduler.from_config(parts["scheduler"].config, timestep_spacing="trailing", set_alpha_to_one=False)
    ddim.set_timesteps(a.ddim_steps)                                             # step() skips 1000 / N timesteps
    lcm = LCMScheduler.from_config(parts["scheduler"].config, original_inference_steps=a.ddim_steps)

    size = teacher.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    log(f"drawing {a.images} shapes-world images ({size} px) and encoding them")
    images, captions = shapes.training_pairs(a.images, seed=20_000 + a.seed, size=size)
    z_all = encode(vae, to_tensor(images)) * vae.config.scaling_factor           # (N, 4, h, w)
    ids = tokenize(tok, [c for pair in captions for c in pair]).view(len(captions), 2, -1)  # (N, 2, L)
    with torch.no_grad():
        uncond = text_encoder(tokenize(tok, [""])).last_hidden_state                # (1, L, D)

    student = make_student(teacher, a.cond_dim).train()
    target = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=a.lr, weight_decay=1e-2)
    log(f"student {sum(q.numel() for q in student.parameters()) / 1e6:.2f}M parameters; {a.steps} steps of "
        f"batch {a.batch}, w in [{a.w_min}, {a.w_max}], {a.ddim_steps} DDIM timesteps")
    g = torch.Generator().manual_seed(a.seed)
    avg = None
    for step in range(a.steps):
        for group in opt.param_groups:
            group["lr"] = a.lr * min(1.0, (step + 1) / max(1, a.warmup))
        idx = torch.randint(0, len(z_all), (a.batch,), generator=g)
        which = torch.randint(0, 2, (a.batch,), generator=g)
        with torch.no_grad():
            cond = text_encoder(ids[idx, which]).last_hidden_state                  # (B, L, D)
        loss = distill_step((z_all[idx], cond), student, target, teacher, ddim, lcm, uncond, a)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(target, student, a.ema)
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if step % 25 == 0 or step == a.steps - 1:
            log(f"step {step:4d}  consistency loss {avg:.5f}")
    minutes = (time.time() - t_start) / 60
    # the online student is the saved unet/, as in the diffusers script (which also keeps the EMA one as unet_target/)
    save_sd(a.out, student.eval(), vae, text_encoder, LCMScheduler.from_config(lcm.config), tok,
            pipeline="LatentConsistencyModelPipeline")
    log(f"saved {a.out} (distillation {minutes:.1f} min)")
    if a.grid:
        draw_grid(sample(a.out, GRID_CAPTIONS, steps=a.grid_steps, guidance=a.grid_guidance, seed=a.seed),
                  GRID_CAPTIONS, a.grid)
        log(f"wrote {a.grid} ({a.grid_steps} steps, guidance_scale {a.grid_guidance})")
    log(f"done in {(time.time() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(run_cli(main))
