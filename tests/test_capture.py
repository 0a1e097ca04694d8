"""The capture as a context (§4.3): installed on enter, the UNet's own processors back on exit, re-entrant, one
CallRecord per UNet call through cross_attention_kwargs, no warnings, explicit attaching of the trainable tensors."""
import contextlib
import logging
import os

import pytest
import torch
from PIL import Image
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor

import triplet_loss
from attention_capture import ATTN_LOGGER, CallRecord
from baselines.diffusion_itm import DiffusionITM
from discffusion import Discffusion
from families.loading import load_components
from support import colour_image, items_for, random_trainable, sd_folder
from tools import figures


@pytest.fixture(scope="module")
def model(tiny_sd):
    return Discffusion.from_pretrained(tiny_sd, device="cpu", keep_maps=True)


class Lines(logging.Handler):
    """The messages diffusers' attention logger lets through."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def red_image():
    return Image.new("RGB", (16, 16), "red")


def kinds(unet):
    return {k: type(p).__name__ for k, p in unet.attn_processors.items()}


def test_enter_installs_exit_restores_the_same_processor_objects_and_nesting_is_a_no_op(model):
    before = model.unet.attn_processors
    assert all(v == "AttnProcessor2_0" for v in kinds(model.unet).values())   # the capture is not installed for good
    with model.capture:
        inside = kinds(model.unet)
        with model.capture:                                                  # nested: nothing changes ...
            assert kinds(model.unet) == inside
        assert kinds(model.unet) == inside                                   # ... also on its exit
        model.score([red_image()], ["a red circle"])                     # score enters it too: still installed
        assert kinds(model.unet) == inside
    assert all(v == ("CaptureProcessor" if "attn2" in k else "AttnProcessor2_0") for k, v in inside.items())
    after = model.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)   # the very objects
    with pytest.raises(ValueError), model.capture:                          # an error inside: restored all the same
        raise ValueError
    assert all(model.unet.attn_processors[k] is before[k] for k in before) and model.capture.depth == 0


def test_one_record_per_unet_call_carries_its_own_mask(model):
    """Two UNet calls inside one capture: each record gets the pooled values of its own mask; nothing is kept on the
    capture between calls."""
    latents = model.encode_images([red_image()])
    hidden, mask = model.encode_texts(["a red circle left of a blue square", "a red circle"])
    z_t, ts = model.add_noise(latents.expand(2, -1, -1, -1), model.level_noise(latents.shape[1:])[0], 400)
    kw = model.unet_kwargs(hidden)
    with torch.no_grad(), model.capture:
        full, short = CallRecord(mask), CallRecord(mask[[1, 1]])
        model.unet(z_t, ts, **kw, cross_attention_kwargs={"record": full})
        model.unet(z_t, ts, **kw, cross_attention_kwargs={"record": short})
        f_full, f_short = model.capture.combine(full), model.capture.combine(short)
    assert set(full.pooled) == set(model.capture.layers) and set(full.maps) == set(model.capture.layers)
    assert f_full[1] == f_short[1] and f_full[0] != f_short[0]                # row 0: another mask, another value
    assert not any(isinstance(v, (CallRecord, torch.Tensor)) for v in vars(model.capture).values())
    att, _ = model.unet_pass(z_t, ts, hidden, mask)
    assert torch.equal(att, f_full)


def test_no_warning_about_the_record_argument(model, tiny_sd):
    lines = Lines()
    ATTN_LOGGER.addHandler(lines)
    try:
        model.score([red_image()], ["a red circle", "a blue square"])
        itm = DiffusionITM(Discffusion.from_pretrained(tiny_sd, device="cpu"), variant="combined", n_timesteps=1)
        itm.score([red_image()], ["a red circle"])
        with model.capture:
            with itm.capture:                                                # another model's capture, nested
                pass
            model.score([red_image()], ["a red circle"])                     # still quiet after its exit
        assert lines.lines == []
        # the same call without the capture active warns (the filter is on only inside the capture)
        latents = model.encode_images([red_image()])
        hidden, mask = model.encode_texts(["a red circle"])
        z_t, ts = model.add_noise(latents, model.level_noise(latents.shape[1:])[0], 400)
        with torch.no_grad():
            model.unet(z_t, ts, **model.unet_kwargs(hidden), cross_attention_kwargs={"record": CallRecord(mask)})
        assert lines.lines and all("['record'] are not expected" in x for x in lines.lines)
    finally:
        ATTN_LOGGER.removeHandler(lines)


@pytest.mark.parametrize("chunk", [16, 2])                                   # one plain pass; CachedScores
def test_checkpointed_step_needs_the_capture_held_and_then_matches(tiny_sd, chunk):
    grads = []
    for ckpt in (False, True):
        m = Discffusion.from_pretrained(tiny_sd, device="cpu", pairs_per_call=chunk)
        params = random_trainable(m, 0.01)
        if ckpt:
            m.unet.enable_gradient_checkpointing()
            with pytest.raises(RuntimeError, match="hold `with model.capture:`"):
                m.score_items(items_for(2), train=True, generator=torch.Generator().manual_seed(0))
        with m.capture:
            mats = m.score_items(items_for(2), train=True, generator=torch.Generator().manual_seed(0))
            loss = triplet_loss.margin_loss(mats, margin=1.0)
            loss.backward()
        grads.append((loss.item(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert any(g.abs().sum() > 0 for g in grads[0][1])
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-9)


def test_chunked_backward_outside_the_capture_equals_inside(tiny_sd):
    """Without checkpointing the capture need not be held: CachedScores' backward enters it for its recompute."""
    out = []
    for held in (False, True):
        m = Discffusion.from_pretrained(tiny_sd, device="cpu", pairs_per_call=2)
        params = random_trainable(m, 0.01)
        with m.capture if held else contextlib.nullcontext():
            loss = triplet_loss.margin_loss(m.score_items(items_for(2), train=True,
                                                          generator=torch.Generator().manual_seed(0)), margin=1.0)
        loss.backward()
        out.append([p.grad.clone() for p in params if p.grad is not None])
    assert out[0] and len(out[0]) == len(out[1]) and all(torch.equal(a, b) for a, b in zip(*out))


def test_attaching_is_an_action_the_getter_has_no_side_effect(tiny_sd):
    m = Discffusion.from_pretrained(tiny_sd, device="cpu")
    with pytest.raises(RuntimeError, match="add_trainable"):
        m.trainable_parameters()
    assert m.capture.deltas is None                                          # the getter attached nothing
    params = m.add_trainable()
    assert m.add_trainable() == params and m.trainable_parameters() == params   # once; then a plain getter
    itm = DiffusionITM(Discffusion.from_pretrained(tiny_sd, device="cpu"), n_timesteps=1)
    with pytest.raises(RuntimeError, match="add_trainable"):
        itm.trainable_parameters()
    assert itm.lora is None and itm.capture is itm.core.capture
    assert itm.add_trainable() == itm.trainable_parameters() and itm.lora["rank"] == 4


def test_layer_sides_from_the_unet_structure_equal_the_maps(model):
    latents = model.encode_images([red_image()])
    hidden, mask = model.encode_texts(["a red circle"])
    z_t, ts = model.add_noise(latents, model.level_noise(latents.shape[1:])[0], 400)
    maps = {}
    with torch.no_grad():
        model.unet_pass(z_t, ts, hidden, mask, maps)
    want = {}
    for name, A in maps.items():                                             # (1, heads, N_img, L)
        want.setdefault(name.split(".")[0], set()).add(int(round(A.shape[2] ** 0.5)))
    assert figures.layer_sides(model) == {g: sorted(s, reverse=True) for g, s in want.items()}


# ---- the capture under upcast_attention ------------------------------------------------------------------------------
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
