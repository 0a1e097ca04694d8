"""Real-precision behaviour (issue 21): fp16 training with loss scaling, the capture under upcast_attention, the
v-prediction target, and the training step at memory bounded by the chunk size (gradient caching)."""
import functools
import os

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from safetensors.torch import load_file

import train
import triplet_loss
from attention_capture import CallRecord
from baselines.diffusion_itm import DiffusionITM, hardneg_loss
from common import InputError
from discffusion import Discffusion
from families.loading import load_components
from tools import benchmark
from tools.sd_configs import make_random_sd
from test_train import colour_image, run_train, write_comvg

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


@pytest.fixture(scope="module")
def sd2_layout(tmp_path_factory):
    return sd_folder(str(tmp_path_factory.mktemp("sd2_layout")))


def items(n_items=3, n_texts=5):
    """RefCOCOg-like items: 1 image x n_texts candidates (the first true)."""
    words = ["red", "blue", "green", "yellow"]
    return [([colour_image(words[k % 4], k)], [f"a {words[(k + j) % 4]} {('circle', 'square')[j % 2]}"
                                               for j in range(n_texts)]) for k in range(n_items)]


# ---- 1. fp16 training learns from the gradients fp32 sees ------------------------------------------------------------
def one_step(folder, root, out, precision, *extra):
    run_train(folder, root, out, "--steps", "1", "--precision", precision, "--margin", "1.0", "--lr", "1e-3",
              "--batch-size", "1", "--grad-accum", "6", *extra)  # a micro-batch's loss / 6: smaller gradients
    return load_file(os.path.join(out, "prompt_deltas.safetensors"))


def stuck_share(d32, d16):
    """Of the delta entries one fp32 step moves, the share one fp16 step leaves exactly at zero."""
    moved = sum(int((d32[k] != 0).sum()) for k in d32 if k.startswith("delta_"))
    stuck = sum(int(((d32[k] != 0) & (d16[k] == 0)).sum()) for k in d32 if k.startswith("delta_"))
    return stuck / moved, moved


def test_fp16_step_moves_what_fp32_moves(sd2_layout, tmp_path, monkeypatch):
    root = write_comvg(str(tmp_path / "comvg"))
    d32 = one_step(sd2_layout, root, str(tmp_path / "fp32"), "fp32")
    d16 = one_step(sd2_layout, root, str(tmp_path / "fp16"), "fp16")
    share, moved = stuck_share(d32, d16)
    assert moved > 0.9 * sum(d32[k].numel() for k in d32 if k.startswith("delta_")) and share < 0.01, share
    ck = torch.load(tmp_path / "fp16" / "checkpoint.pt", weights_only=True)
    assert ck["scaler"]["scale"] == 2.0 ** 16 and ck["history"][0] == dict(ck["history"][0], skipped=False)
    assert torch.load(tmp_path / "fp32" / "checkpoint.pt", weights_only=True)["scaler"] == {}    # fp32: no scaler
    # chunked (gradient caching: 1 UNet row per pass, under autocast, the scale in dL/dscore): the same step
    chunked = one_step(sd2_layout, root, str(tmp_path / "fp16_chunked"), "fp16", "--eval-batch-size", "1")
    assert stuck_share(d32, chunked)[0] < 0.01
    flipped = sum(int(((chunked[k] - d16[k]).abs() > 1e-3).sum()) for k in d16)   # AdamW's first step: ~lr sign(g)
    assert flipped < 0.01 * sum(v.numel() for v in d16.values())                  # fp16 noise (fp32 vs fp16: 0.1 %)
    # the same step without loss scaling (the scaler off) leaves more of them at zero
    real = torch.amp.GradScaler
    monkeypatch.setattr(train.torch.amp, "GradScaler", lambda *a, **k: real(*a, **dict(k, enabled=False)))
    unscaled, _ = stuck_share(d32, one_step(sd2_layout, root, str(tmp_path / "fp16_unscaled"), "fp16"))
    assert unscaled > 0.005 and share < unscaled / 10, (unscaled, share)          # here 1.1 % and 0


def test_overflowing_fp16_step_is_skipped_not_an_error(sd2_layout, tmp_path, monkeypatch):
    """A loss scale far too large makes the fp16 gradients inf: GradScaler skips the step and halves the scale;
    training goes on (a non-finite loss stays an error: test_train)."""
    root = write_comvg(str(tmp_path / "comvg"))
    monkeypatch.setattr(train.torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 100))
    d = one_step(sd2_layout, root, str(tmp_path / "out"), "fp16")
    assert all(not d[k].any() for k in d if k.startswith("delta_"))                      # nothing moved
    ck = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert ck["history"][0]["skipped"] is True and ck["scaler"]["scale"] == 2.0 ** 99


def test_resume_restores_the_grad_scaler(sd2_layout, tmp_path):
    root = write_comvg(str(tmp_path / "comvg"))
    out = str(tmp_path / "out")
    run_train(sd2_layout, root, out, "--steps", "1", "--precision", "fp16")
    path = os.path.join(out, "checkpoint.pt")
    ck = torch.load(path, weights_only=True)
    ck["scaler"]["scale"] = 1024.0                                       # as if overflows had lowered it
    torch.save(ck, path)
    run_train(sd2_layout, root, out, "--steps", "2", "--precision", "fp16", "--resume")
    hist = torch.load(path, weights_only=True)["history"]
    assert [h["loss_scale"] for h in hist] == [2.0 ** 16, 1024.0]
    with pytest.raises(InputError, match="--precision fp16, this run has fp32"):
        run_train(sd2_layout, root, out, "--steps", "3", "--precision", "fp32", "--resume")


# ---- 2. the capture under upcast_attention ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def upcast_sd(tmp_path_factory):
    """An SD 2.1-768-like UNet (upcast_attention=True) whose attn2 Q K^T exceeds the fp16 range."""
    folder = sd_folder(str(tmp_path_factory.mktemp("upcast")), upcast_attention=True)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    with torch.no_grad():
        for name, mod in unet.named_modules():
            if name.endswith("attn2"):
                mod.to_q.weight.mul_(250)
                mod.to_k.weight.mul_(250)
    unet.save_pretrained(os.path.join(folder, "unet"))
    return folder


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("pooling", ["lse", "official"])
def test_capture_equals_the_stock_processor_under_upcast(upcast_sd, precision, pooling):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    m = Discffusion.from_pretrained(upcast_sd, device="cpu", dtype=precision, pooling=pooling, levels=(0.4,))
    stock = load_components(upcast_sd, dtype)["unet"].eval().requires_grad_(False)   # frozen, as m.unet (CPU fp16
    # linear layers take another kernel for weights that require grad)
    assert stock.config.upcast_attention
    stock.set_attn_processor({k: AttnProcessor() if "attn2" in k else p for k, p in stock.attn_processors.items()})
    g = torch.Generator().manual_seed(0)
    z, hid = torch.randn(2, 4, 8, 8, generator=g).to(dtype), m.encode_texts(["a red circle", "a dog"])[0]
    t = torch.tensor([400, 400])
    logits = {}

    def peek(name):                     # the largest |Q K^T| / sqrt(d) of each attn2 over its heads, in fp32
        def hook(module, args, kwargs):
            x, ctx = args[0].float(), kwargs["encoder_hidden_states"].float()
            q = module.head_to_batch_dim(x @ module.to_q.weight.float().T)          # (B * heads, N, d)
            k = module.head_to_batch_dim(ctx @ module.to_k.weight.float().T)        # (B * heads, L, d)
            logits[name] = (q @ k.transpose(1, 2)).abs().max().item() * module.scale
        return hook
    handles = [mod.register_forward_pre_hook(peek(n), with_kwargs=True) for n, mod in stock.named_modules()
               if n.endswith("attn2")]
    record = CallRecord(torch.ones(2, hid.shape[1], dtype=torch.bool))
    with torch.no_grad(), m.capture:
        want = stock(z, t, hid).sample
        for h in handles:
            h.remove()
        got = m.unet(z, t, hid, cross_attention_kwargs={"record": record}).sample
    assert max(logits.values()) > 65504                                  # beyond fp16: naive fp16 logits are inf
    assert torch.isfinite(want).all() and torch.equal(got, want), (got - want).abs().max()
    ims, txt = [colour_image("red", 0)], ["a red circle", "a blue square"]
    scores = m.score(ims, txt)
    assert torch.isfinite(scores).all()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):      # as train.py runs the forward
        assert torch.equal(m.score(ims, txt), scores)                             # the upcast survives autocast


# ---- 3. v-prediction everywhere a target is used ---------------------------------------------------------------------
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


# ---- 4. a training step's memory is bounded by the chunk, not by the candidates --------------------------------------
def step_grads(folder, chunk, loss, checkpointing=False):
    m = Discffusion.from_pretrained(folder, device="cpu", pairs_per_call=chunk)
    params = m.add_trainable()
    with torch.no_grad():
        for i, p in enumerate(params):
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(i))
    if checkpointing:
        m.unet.enable_gradient_checkpointing()
    rows = []
    hook = m.unet.register_forward_pre_hook(lambda mod, a, kw: rows.append(a[0].shape[0]), with_kwargs=True)
    with m.capture:                                        # as train.py: held across the forward and the backward
        mats = m.score_items(items(), train=True, generator=torch.Generator().manual_seed(0))
        value = triplet_loss.margin_loss(mats, 1.0) if loss == "margin" else triplet_loss.ce_loss(mats)
        value.backward()
    hook.remove()
    return value.item(), [torch.zeros_like(p) if p.grad is None else p.grad for p in params], rows


@pytest.mark.parametrize("loss", ["margin", "ce"])
def test_chunked_training_step_equals_the_unchunked_one(sd2_layout, loss):
    full_loss, full, full_rows = step_grads(sd2_layout, 1000, loss)
    assert full_rows == [15]                                              # 3 items x 5 texts: one plain pass
    for checkpointing in (False, True):
        got_loss, got, rows = step_grads(sd2_layout, 2, loss, checkpointing)
        assert max(rows) == 2 and sum(rows) == 2 * 15                     # forward and backward, 2 rows at a time
        assert got_loss == pytest.approx(full_loss, rel=1e-6)
        assert any(g.abs().sum() > 0 for g in got)
        for a, b in zip(full, got):
            # fp32 noise of other batch sizes; a head logit's gradient is a difference of near-equal heads' scores
            assert (a - b).norm() <= 5e-3 * a.norm()
        flat = lambda g: torch.cat([x.flatten() for x in g])                      # noqa: E731
        assert (flat(full) - flat(got)).norm() <= 1e-4 * flat(full).norm()


def test_benchmark_train_steps_side_by_side_and_fp16_check(tiny_sd, capsys):
    args = benchmark.parse_args(["--device", "cpu", "--threads", "1", "--model", tiny_sd, "--train-texts", "2,5",
                                 "--train-chunk", "2", "--no-gradient-checkpointing"])
    mem = benchmark.run_memory_child(args)
    assert [mem[k]["pairs"] for k in ("train_step", "train_step_5")] == [2, 5]
    assert all(mem[k]["unet_batch"] == 2 and mem[k]["peak_bytes"] > 0 for k in ("train_step", "train_step_5"))
    fc = benchmark.fp16_check(tiny_sd, args)
    assert fc["moved_in_fp32"] > 0 and fc["fp16"]["left_at_zero"] < 0.01
    assert fc["fp16"]["left_at_zero"] <= fc["fp16_unscaled"]["left_at_zero"]
    with pytest.raises(InputError, match="at least 2"):
        benchmark.parse_args(["--train-texts", "1,10"])
