"""Core scorer (§4.2-4.4): equivalence with direct computations, invariances, determinism, bad input."""
import copy
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image

from attention_capture import CallRecord, cross_attention_layers
from common import InputError
from discffusion import Discffusion, preprocess
from lse_pool import lse_pool, pool


def images(n, size=(24, 20)):
    g = torch.Generator().manual_seed(1)
    return [Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


TEXTS = ["a red circle left of a blue square", "a dog on the table", "the man riding a ball", "cat"]


@pytest.fixture(scope="module")
def model(tiny_sd):
    return Discffusion.from_pretrained(tiny_sd, device="cpu")


def test_lse_pool_matches_eq3_eq4_by_hand():
    torch.manual_seed(0)
    A = torch.rand(2, 3, 5, 6).softmax(-1)                          # (B, heads, N_img, L)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    for lam in (1.0, 4.0):
        got = lse_pool(A, mask, lam)
        for b in range(2):
            for h in range(3):
                real = [j for j in range(6) if mask[b, j]]
                S = [math.log(sum(math.exp(lam * A[b, h, i, j].item()) for i in range(5))) / lam for j in real]
                assert got[b, h].item() == pytest.approx(sum(S) / len(S), rel=1e-6)
    # padding really is ignored: changing masked columns does not move the score
    A2 = A.clone()
    A2[0, :, :, 4:] = 0.9
    assert torch.allclose(lse_pool(A2, mask)[0], lse_pool(A, mask)[0])
    # large lambda tends to max pooling
    assert torch.allclose(lse_pool(A, mask, 1e4), pool("max", A, mask), atol=1e-3)


def test_official_pooling_is_lse_over_all_text_tokens_of_logits():
    logits = torch.randn(2, 3, 5, 6)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    got = pool("official", logits.softmax(-1), mask, logits=logits)
    want = torch.stack([torch.stack([torch.tensor([math.log(sum(math.exp(v) for v in logits[b, h, i].tolist()))
                                                   for i in range(5)]).mean() for h in range(3)]) for b in range(2)])
    assert torch.allclose(got, want, atol=1e-5)


def test_capture_leaves_unet_output_unchanged(tiny_sd, model):
    from diffusers import UNet2DConditionModel
    stock = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in stock.attn_processors.values())
    torch.manual_seed(0)
    z, hid = torch.randn(3, 4, 8, 8), torch.randn(3, 16, 32)
    t = torch.tensor([100, 500, 900])
    record = CallRecord(torch.ones(3, 16, dtype=torch.bool))
    with torch.no_grad(), model.capture:
        diff = (stock(z, t, hid).sample - model.unet(z, t, hid, cross_attention_kwargs={"record": record}).sample
                ).abs().max().item()
        # only attn2 layers carry the capture processor; self-attention keeps the stock one
        kinds = {k: type(p).__name__ for k, p in model.unet.attn_processors.items()}
    assert diff < 1e-5
    assert all(v == "CaptureProcessor" for k, v in kinds.items() if "attn2" in k)
    assert all(v == "AttnProcessor2_0" for k, v in kinds.items() if "attn1" in k)


def test_score_equals_direct_computation_from_the_maps(tiny_sd):
    """f = mean over levels, layers, heads of eq. 3-4, recomputed by hand from the captured attention maps."""
    m = Discffusion.from_pretrained(tiny_sd, device="cpu", keep_maps=True, lam=2.0)
    ims, txt = images(1), TEXTS[:1]
    latents, (hidden, mask) = m.encode_images(ims), m.encode_texts(txt)
    noise = m.level_noise(latents.shape[1:])
    want = 0.0
    with torch.no_grad():
        for level, eps in zip(m.levels, noise):
            z_t, ts = m.add_noise(latents, eps, m.timestep(level))
            maps = {}
            m.unet_pass(z_t, ts, hidden, mask, maps)
            real = mask[0].nonzero().flatten().tolist()
            per_layer = []
            for name in m.capture.layers:
                A = maps[name][0]                              # (heads, N_img, L)
                assert torch.allclose(A.sum(-1), torch.ones(A.shape[:2]), atol=1e-5)
                S = torch.logsumexp(2.0 * A[:, :, real], dim=1) / 2.0     # (heads, n_real)
                per_layer.append(S.mean(1).mean(0))
            want += torch.stack(per_layer).mean() / len(m.levels)
    assert m.score(ims, txt)[0, 0].item() == pytest.approx(want.item(), rel=1e-5)
    # the mask is the caption's tokens: no BOS, no EOS, no padding
    ids = m.tokenizer(txt[0]).input_ids
    assert mask[0].sum().item() == len(ids) - 2 and not mask[0, 0] and not mask[0, len(ids) - 1]
    # padding on the left (the shapes model's tokenizer): the mask still marks exactly the caption's tokens
    m.tokenizer.padding_side = "left"
    left = m.encode_texts(txt)[1][0]
    L, n = left.shape[0], len(ids)
    assert left.tolist() == [False] * (L - n + 1) + [True] * (n - 2) + [False]


def test_no_batch_mixing_and_permutation(model):
    ims, txt = images(3), TEXTS
    S = model.score(ims, txt)
    assert S.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert model.score([ims[i]], [txt[j]])[0, 0].item() == pytest.approx(S[i, j].item(), abs=1e-5)
    pi, pj = [2, 0, 1], [3, 1, 0, 2]
    P = model.score([ims[k] for k in pi], [txt[k] for k in pj])
    assert torch.allclose(P, S[pi][:, pj], atol=1e-5)
    small = copy.copy(model)
    small.pairs_per_call = 1                                              # chunking does not change a score either
    assert torch.allclose(small.score(ims, txt), S, atol=1e-5)


def test_deterministic_for_a_seed(tiny_sd, model):
    ims, txt = images(2), TEXTS[:2]
    a = model.score(ims, txt)
    b = Discffusion.from_pretrained(tiny_sd, device="cpu").score(ims, txt)
    c = Discffusion.from_pretrained(tiny_sd, device="cpu", seed=1).score(ims, txt)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_options_change_the_score(tiny_sd, model):
    ims, txt = images(2), TEXTS[:2]
    base = model.score(ims, txt)
    for opts in (dict(pooling="max"), dict(pooling="mean"), dict(pooling="cosine"), dict(pooling="official"),
                 dict(layers=2), dict(levels=(0.4,)), dict(resize_via=8)):
        other = Discffusion.from_pretrained(tiny_sd, device="cpu", **opts)
        S = other.score(ims, txt)
        assert S.shape == (2, 2) and torch.isfinite(S).all() and not torch.equal(S, base), opts


def test_layer_selection_in_execution_order(model):
    names = cross_attention_layers(model.unet)
    assert len(names) == 7 and names[0].startswith("down_blocks.0") and names[2].startswith("mid_block")
    assert names[-1].startswith("up_blocks.1.attentions.1")
    from attention_capture import select_layers
    assert select_layers(names, 2) == names[-2:]
    assert select_layers(names, "all") == names
    with pytest.raises(ValueError):
        select_layers(names, 8)


def test_any_image_mode_and_size(model):
    base = Image.new("RGB", (37, 11), (200, 30, 40))
    modes = [base, base.convert("RGBA"), base.convert("L"), base.convert("P"), base.convert("CMYK"),
             base.convert("I;16"), base.convert("LA")]
    x = preprocess(modes, 16)
    assert x.shape == (7, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.isfinite(model.score(modes, TEXTS[:1])).all()


def test_long_caption_truncated_with_one_warning(model):
    long = " ".join(["red circle"] * 40)
    model._warned_truncation = False
    with pytest.warns(UserWarning, match="truncated"):
        S = model.score(images(1), [long])
    assert torch.isfinite(S).all()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.score(images(1), [long])                                # no second warning in the same run


def test_bad_model_paths(tmp_path, tiny_sd):
    with pytest.raises(InputError, match="not in diffusers layout"):
        Discffusion.from_pretrained(str(tmp_path))
    with pytest.raises(InputError, match="neither a local diffusers folder nor a hub id"):
        Discffusion.from_pretrained(str(tmp_path / "missing" / "model"))
    with pytest.raises(InputError, match="could not load model"):
        Discffusion.from_pretrained("nobody-here" + "/no-such-model")  # a hub id, offline: a clear error, no network
    with pytest.raises(InputError, match="pooling"):
        Discffusion.from_pretrained(tiny_sd, device="cpu", pooling="bogus")
    with pytest.raises(InputError, match="layers"):
        Discffusion.from_pretrained(tiny_sd, device="cpu", layers=99)
