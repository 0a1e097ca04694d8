"""DiffusionITM baseline (seed 002 §3.1-3.2): definitions by hand, UNet call counts, invariances, LoRA, save/load."""
import pytest
import torch
from diffusers import DDPMScheduler

import triplet_loss
from baselines.diffusion_itm import DiffusionITM, hardneg_loss, spread_timesteps
from common import InputError
from discffusion import Discffusion
from support import colour_image, random_images

TEXTS = ["a red circle left of a blue square", "a dog on the table", "the man riding a ball", "cat"]


@pytest.fixture(scope="module")
def itm(tiny_sd):
    return DiffusionITM.from_pretrained(tiny_sd, device="cpu", n_timesteps=3)


def count_rows(m, uncond_hidden):
    """Forward pre-hook on the UNet: number of calls, batch rows, and rows conditioned on the "" text."""
    seen = dict(calls=0, rows=0, uncond=0)

    def hook(module, args, kwargs):
        hid = kwargs["encoder_hidden_states"]                              # (b, L, D)
        seen["calls"] += 1
        seen["rows"] += hid.shape[0]
        seen["uncond"] += int(((hid - uncond_hidden).abs().flatten(1).amax(1) < 1e-5).sum())
    return seen, m.core.unet.register_forward_pre_hook(hook, with_kwargs=True)


def test_timesteps_spread_over_10_990():
    assert spread_timesteps(3, 1000) == [173, 500, 827]
    ts = spread_timesteps(10, 1000)
    assert ts[0] == 59 and ts[-1] == 941 and all(10 <= t < 990 for t in ts)
    assert spread_timesteps(2, 2000) == [510, 1490]                        # scaled to num_train_timesteps


def test_empty_text_scores_exactly_zero(itm):
    S = itm.score(random_images(2), ["", TEXTS[1], "", TEXTS[3]])
    assert torch.equal(S[:, 0], torch.zeros(2)) and torch.equal(S[:, 2], torch.zeros(2))
    assert (S[:, [1, 3]] != 0).all()


def test_unconditional_pass_once_per_image_and_timestep(tiny_sd, itm):
    ims, txt = random_images(2), TEXTS[:3]
    uncond = itm.core.encode_texts([""])[0]
    small = DiffusionITM.from_pretrained(tiny_sd, device="cpu", n_timesteps=3, pairs_per_call=4)
    seen, handle = count_rows(small, uncond)
    try:
        S = small.score(ims, txt)
    finally:
        handle.remove()
    assert torch.allclose(S, itm.score(ims, txt), atol=1e-5)             # chunking does not change a score
    n_t, rows = 3, 2 + 2 * 3                                               # per timestep: 2 images "" + 6 pairs
    assert seen == dict(calls=n_t * 2, rows=n_t * rows, uncond=n_t * 2)
    cls = DiffusionITM(itm.core, variant="classifier", n_timesteps=3)     # no unconditional term at all
    seen, handle = count_rows(cls, uncond)
    try:
        cls.score(ims, txt)
    finally:
        handle.remove()
    assert seen["rows"] == n_t * 6 and seen["uncond"] == 0


def test_scores_equal_direct_computation(tiny_sd, itm):
    """itm, classifier and combined recomputed by hand with a stock diffusers UNet."""
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    ims, txt = random_images(1), [TEXTS[0]]
    z = itm.core.encode_images(ims)
    hid = itm.core.encode_texts(txt + [""])[0]
    noise = torch.randn((3, *z.shape[1:]), generator=torch.Generator().manual_seed(0))     # seed 0, one per t
    itm_s = cls_s = 0.0
    with torch.no_grad():
        for t, eps in zip([173, 500, 827], noise):
            ts = torch.tensor([t])
            z_t = itm.core.scheduler.add_noise(z, eps[None], ts)
            e_c = (eps - unet(z_t, ts, hid[:1]).sample[0]).norm()
            e_u = (eps - unet(z_t, ts, hid[1:]).sample[0]).norm()
            itm_s += -(e_c - e_u).item() / 3
            cls_s += -e_c.item() / 3
    assert itm.score(ims, txt)[0, 0].item() == pytest.approx(itm_s, rel=1e-4, abs=1e-6)
    cls = DiffusionITM.from_pretrained(tiny_sd, device="cpu", n_timesteps=3, variant="classifier")
    assert cls.score(ims, txt)[0, 0].item() == pytest.approx(cls_s, rel=1e-5)
    # combined = Discffusion's attention score at the same timesteps + the itm term
    ims, txt = random_images(2), TEXTS[:2]
    comb = DiffusionITM.from_pretrained(tiny_sd, device="cpu", n_timesteps=3, variant="combined")
    att = Discffusion.from_pretrained(tiny_sd, device="cpu", levels=(0.173, 0.5, 0.827)).score(ims, txt)
    assert torch.allclose(comb.score(ims, txt), att + itm.score(ims, txt), atol=1e-5)


def test_v_prediction_target_is_the_velocity(tiny_sd):
    from diffusers import DDPMScheduler
    m = DiffusionITM.from_pretrained(tiny_sd, device="cpu", n_timesteps=1, variant="classifier")
    m.core.scheduler = DDPMScheduler.from_config(m.core.scheduler.config, prediction_type="v_prediction")
    ims, txt = random_images(1), [TEXTS[1]]
    z, (hid, _) = m.core.encode_images(ims), m.core.encode_texts(txt)
    eps = torch.randn((1, *z.shape[1:]), generator=torch.Generator().manual_seed(0))
    ts = torch.tensor([500])
    with torch.no_grad(), m.core.capture:
        z_t = m.core.scheduler.add_noise(z, eps, ts)
        v = m.core.scheduler.get_velocity(z, eps, ts)
        want = -(v - m.core.unet(z_t, ts, hid).sample).norm().item()
    assert not torch.allclose(v, eps)
    assert m.score(ims, txt)[0, 0].item() == pytest.approx(want, rel=1e-5)
    assert m.config["prediction_type"] == "v_prediction"


def test_no_batch_mixing_and_permutation(itm):
    ims, txt = random_images(3), TEXTS
    S = itm.score(ims, txt)
    assert S.shape == (3, 4)
    for i, j in [(0, 0), (2, 3), (1, 2)]:
        assert itm.score([ims[i]], [txt[j]])[0, 0].item() == pytest.approx(S[i, j].item(), abs=1e-5)
    pi, pj = [2, 0, 1], [3, 1, 0, 2]
    assert torch.allclose(itm.score([ims[k] for k in pi], [txt[k] for k in pj]), S[pi][:, pj], atol=1e-5)
    parts = itm.score_items([(ims[:1], txt[:2]), (ims[1:], txt[2:])])   # several items in one call
    assert torch.allclose(parts[0], S[:1, :2], atol=1e-5) and torch.allclose(parts[1], S[1:, 2:], atol=1e-5)


def test_bad_options(tiny_sd):
    with pytest.raises(InputError, match="variant"):
        DiffusionITM.from_pretrained(tiny_sd, device="cpu", variant="bogus")
    with pytest.raises(InputError, match="n_timesteps"):
        DiffusionITM.from_pretrained(tiny_sd, device="cpu", n_timesteps=0)
    with pytest.raises(InputError, match="levels"):
        DiffusionITM.from_pretrained(tiny_sd, device="cpu", levels=(0.5,))


@pytest.fixture(scope="module")
def trained(tiny_sd):
    """A model after one AdamW step of hardneg_loss on LoRA, with snapshots of everything else."""
    m = DiffusionITM.from_pretrained(tiny_sd, device="cpu", n_timesteps=2)
    base = {f"{k}.{n}": p.detach().clone() for k in ("unet", "vae", "text_encoder")
            for n, p in getattr(m.core, k).named_parameters()}
    before = m.score(random_images(2), TEXTS[:2])
    params = m.add_lora(rank=4)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ims = random_images(3)
    items = [(ims[:1], [TEXTS[0], TEXTS[1]]), (ims[1:3], [TEXTS[2]])]   # a text negative, an image negative
    loss = hardneg_loss(m, items, torch.Generator().manual_seed(0))
    loss.backward()
    opt.step()
    return m, base, before, loss, params


def test_lora_only_lora_trains_and_base_weights_unchanged(trained):
    m, base, before, loss, params = trained
    assert torch.isfinite(loss) and loss.item() >= 0                   # B = 0 at the start: MSE(pos) - min(., pos)
    names = [n for n, p in m.core.unet.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert len(params) == len(names) == 2 * 4 * 14                     # A, B x (q, k, v, out) x 14 attention layers
    assert all(p.dtype == torch.float32 for p in params)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    for k in ("unet", "vae", "text_encoder"):
        for n, p in getattr(m.core, k).named_parameters():
            if "lora_" not in n:
                key = f"{k}.{n}".replace(".base_layer", "")
                assert p.grad is None and torch.equal(p, base[key]), key
    assert not torch.allclose(m.score(random_images(2), TEXTS[:2]), before)   # the step moved the scores
    assert m.trainable_parameters() == params and m.config["lora"]["rank"] == 4


def test_hardneg_loss_by_hand(tiny_sd):
    """L = MSE(pos) - min(MSE(neg), MSE(pos).detach()): its value, and MSE(pos) still pulls when L = 0."""
    m = DiffusionITM.from_pretrained(tiny_sd, device="cpu", n_timesteps=2)
    with torch.no_grad():
        for p in m.add_lora():
            p.normal_(0, 0.3)                                          # B != 0: a LoRA that changes the UNet
    ims = random_images(1)
    values = []
    for texts in (TEXTS[:2], TEXTS[1::-1]):                            # each text once the positive
        loss = hardneg_loss(m, [(ims, texts)], torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(3)
        assert int(torch.randint(1, (1,), generator=g)) == 0           # the only negative: texts[1]
        t = int(torch.randint(1000, (1,), generator=g))
        z = m.core.encode_images(ims)
        eps = torch.randn((1, *z.shape[1:]), generator=g)
        hid, mask = m.core.encode_texts(texts)
        with torch.no_grad(), m.core.capture:
            z_t = m.core.scheduler.add_noise(z, eps, torch.tensor([t]))
            pred = m.core.unet(z_t.expand(2, -1, -1, -1), torch.tensor([t, t]), hid).sample
        pos, neg = ((pred - eps) ** 2).mean((1, 2, 3)).tolist()
        assert loss.item() == pytest.approx(pos - min(neg, pos), abs=1e-7)
        m.zero_grad()
        loss.backward()
        assert sum(p.grad.abs().sum() for p in m.trainable_parameters()) > 0
        values.append(loss.item())
    assert min(values) == 0 and max(values) > 0                        # one order clipped, the other not


def test_save_load_round_trip_and_mismatch(tmp_path, tiny_sd, trained):
    m = trained[0]
    path = str(tmp_path / "lora.safetensors")
    m.save_trained(path, {"steps": 1, "dataset": "comvg"})
    fresh = DiffusionITM.from_pretrained(tiny_sd, device="cpu", n_timesteps=2)
    meta = fresh.load_trained(path)                                    # adds the file's adapters itself
    assert meta["training_args"]["steps"] == 1 and meta["lora"] == m.lora and fresh.lora == m.lora
    for (n, a), (n2, b) in zip(m.trained_state().items(), fresh.trained_state().items()):
        assert n == n2 and torch.equal(a, b)
    ims = random_images(2)
    assert torch.equal(fresh.score(ims, TEXTS[:2]), m.score(ims, TEXTS[:2]))
    other = DiffusionITM.from_pretrained(tiny_sd, device="cpu", n_timesteps=2)
    other.add_lora(rank=2)
    with pytest.raises(InputError, match="rank 4 in the file, 2 in this model"):
        other.load_trained(path)
    with pytest.raises(InputError, match="does not exist"):
        fresh.load_trained(str(tmp_path / "missing.safetensors"))
    core = Discffusion.from_pretrained(tiny_sd, device="cpu")
    core.save_trained(tmp_path / "deltas.safetensors")
    with pytest.raises(InputError, match="not a DiffusionITM LoRA file"):
        fresh.load_trained(str(tmp_path / "deltas.safetensors"))
    with pytest.raises(InputError, match="nothing to save"):
        DiffusionITM.from_pretrained(tiny_sd, device="cpu").save_trained(str(tmp_path / "x.safetensors"))


# ---- the public official code's score (eric-ai-lab/DSD), by name: --preset official ---------------------------------

def test_official_timesteps_and_layers():
    from attention_capture import select_layers
    from baselines.diffusion_itm import official_timesteps
    ts = official_timesteps(1000)
    assert ts == [989 - 33 * k for k in range(30)][::-1]                  # pipeline_dsd.sampled_timesteps, 30 steps
    sd2 = [f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in range(3) for a in range(2)] + \
          ["mid_block.attentions.0.transformer_blocks.0.attn2"] + \
          [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in range(1, 4) for a in range(3)]
    assert select_layers(sd2, "official") == [sd2[4], sd2[5], sd2[6], sd2[-3], sd2[-2], sd2[-1]]  # its six


def official_direct(sd_path, core, images_, texts):
    """The public code's score recomputed on a stock UNet, pair by pair: per timestep t = 989 - 33 k, the UNet on
    the batch [uncond, cond] at the Euler scheduler's input (z + sigma eps) / sqrt(sigma^2 + 1); its attention term
    is the mean over that batch, heads and image tokens of logsumexp over the 77 text tokens of Q K^T / sqrt(d), in
    the attn2 of the last transformer block of each Transformer2D of the last down block with cross-attention, the
    mid block and the last such up block, averaged over those layers; plus ||eps - eps_uncond|| - ||eps - eps_cond||;
    averaged over timesteps. The VAE mean stands in for its latent_dist.sample() (docs/official_code.md)."""
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet").eval()
    blocks = {"down": [b for b in unet.down_blocks if hasattr(b, "attentions")][-1], "mid": unet.mid_block,
              "up": [b for b in unet.up_blocks if hasattr(b, "attentions")][-1]}
    layers = [tr.transformer_blocks[-1].attn2 for b in blocks.values() for tr in b.attentions]
    means = []

    def hook(attn, args, kwargs):
        x, ctx = args[0], kwargs["encoder_hidden_states"]                  # (2, N, C), (2, 77, D)
        q = attn.head_to_batch_dim(attn.to_q(x))                           # (2 * heads, N, d)
        k = attn.head_to_batch_dim(attn.to_k(ctx))                         # (2 * heads, 77, d)
        means.append(torch.logsumexp(q @ k.transpose(1, 2) * attn.scale, dim=-1).mean())
    handles = [a.register_forward_pre_hook(hook, with_kwargs=True) for a in layers]
    T = core.scheduler.config.num_train_timesteps
    ts = sorted(T - 1 - i for i in range(10, T - 10, T // 30))
    abar = core.scheduler.alphas_cumprod
    z = core.encode_images(images_)                                        # (I, 4, h, w)
    noise = core.level_noise(z.shape[1:])                                  # the model's eps, one per timestep
    out = torch.zeros(len(images_), len(texts))
    try:
        with torch.no_grad():
            for j, text in enumerate(texts):
                hid = core.encode_texts(["", text])[0]                     # (2, 77, D): [uncond, cond]
                for i in range(len(images_)):
                    for t, eps in zip(ts, noise):
                        sigma = ((1 - abar[t]) / abar[t]).sqrt()
                        x = ((z[i] + sigma * eps) / (sigma ** 2 + 1).sqrt())[None].expand(2, -1, -1, -1)
                        means.clear()
                        pred = unet(x, torch.tensor(float(t)), hid).sample  # (2, 4, h, w)
                        bias = (eps - pred[0]).norm() - (eps - pred[1]).norm()
                        out[i, j] += (sum(means) / len(means) + bias).item() / len(ts)
    finally:
        for h in handles:
            h.remove()
    return out


def test_score_official_preset_equals_the_official_formula(tiny_sd):
    import methods
    args = evaluate_parser().parse_args(["--score", "official", "--model", tiny_sd, "--device", "cpu"])
    m = methods.build("discffusion", args)
    assert isinstance(m, DiffusionITM) and m.variant == "combined" and m.uncond_attention
    assert m.timesteps == [989 - 33 * k for k in range(30)][::-1] and m.core.capture.pooling == "official"
    assert m.core.capture.layers == ["down_blocks.1.attentions.0.transformer_blocks.0.attn2",
                                    "mid_block.attentions.0.transformer_blocks.0.attn2",
                                    "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                                    "up_blocks.1.attentions.1.transformer_blocks.0.attn2"]
    ims, txt = random_images(2), TEXTS[:1]                                        # image-side: the uncond half differs
    got, want = m.score(ims, txt), official_direct(tiny_sd, m.core, ims, txt)
    assert (got - want).abs().max().item() < 1e-6 * max(1.0, want.abs().max().item())
    # a switch given on the command line still wins over the preset; without the unconditional half the score moves
    args = evaluate_parser().parse_args(["--score", "official", "--model", tiny_sd, "--device", "cpu",
                                         "--itm-timesteps", "2", "--layers", "all"])
    m2 = methods.build("diffusion_itm", args)
    assert len(m2.timesteps) == 2 and len(m2.core.capture.layers) == 7 and m2.variant == "combined"
    m.uncond_attention = False
    assert (m.score(ims, txt) - got).abs().max() > 1e-4


def evaluate_parser():
    import evaluate
    return evaluate.build_parser()


# ---- v-prediction everywhere a target is used ------------------------------------------------------------------------
def test_v_prediction_target_in_diffusion_loss_and_hardneg(tiny_sd):
    m = Discffusion.from_pretrained(tiny_sd, device="cpu")
    m.scheduler = DDPMScheduler.from_config(m.scheduler.config, prediction_type="v_prediction")
    its = [([colour_image("red", 0), colour_image("blue", 1)], ["a red circle", "a blue circle"])]
    # Table 11's diffusion loss by hand: the same draws as triplet_loss.diffusion_loss, the velocity as target
    g = torch.Generator().manual_seed(0)
    z = m.encode_images([its[0][0][0]])
    hid, mask = m.encode_texts([its[0][1][0]])
    t = int(torch.randint(1000, (1,), generator=g))
    eps = torch.randn(z.shape, generator=g)
    ts = torch.tensor([t])
    with torch.no_grad():
        pred = m.unet(m.scheduler.add_noise(z, eps, ts), ts, hid).sample
        want = ((pred - m.scheduler.get_velocity(z, eps, ts)) ** 2).mean()
        got = triplet_loss.diffusion_loss(m, its, torch.Generator().manual_seed(0))
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        assert not torch.allclose(m.scheduler.get_velocity(z, eps, ts), eps)
    # HardNeg: the same target (DiffusionITM.target is Discffusion.target)
    itm = DiffusionITM(m, n_timesteps=2)
    v = itm.target(z, eps, ts)
    assert torch.equal(v, m.target(z, eps, ts)) and torch.equal(v, m.scheduler.get_velocity(z, eps, ts))
    itm.add_lora()
    assert torch.isfinite(hardneg_loss(itm, its, torch.Generator().manual_seed(0)))
    m.scheduler = DDPMScheduler.from_config(m.scheduler.config, prediction_type="sample")
    with pytest.raises(InputError, match="prediction_type 'sample'"):
        m.target(z, eps, ts)
