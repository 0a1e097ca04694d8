"""Core scorer (§4.2-4.4): equivalence with direct computations, invariances, determinism, bad input."""
import copy
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

import datasets
import evaluate
import triplet_loss
from attention_capture import CallRecord, cross_attention_layers
from benchmarks.reading import Item
from common import InputError
from discffusion import Discffusion, preprocess
from support import colour_image, random_images, random_trainable
from tools.sd_configs import make_random_sd


TEXTS = ["a red circle left of a blue square", "a dog on the table", "the man riding a ball", "cat"]


@pytest.fixture(scope="module")
def model(tiny_sd):
    return Discffusion.from_pretrained(tiny_sd, device="cpu")


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
    ims, txt = random_images(1), TEXTS[:1]
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
    ims, txt = random_images(3), TEXTS
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
    ims, txt = random_images(2), TEXTS[:2]
    a = model.score(ims, txt)
    b = Discffusion.from_pretrained(tiny_sd, device="cpu").score(ims, txt)
    c = Discffusion.from_pretrained(tiny_sd, device="cpu", seed=1).score(ims, txt)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_options_change_the_score(tiny_sd, model):
    ims, txt = random_images(2), TEXTS[:2]
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


def test_a_large_image_is_held_at_the_models_input_size(tmp_path, model):
    """A 4000 x 3000 photo: a scoring group holds what the model encodes, (R, R, 3) (not 36 MB), and its scores are
    bit-identical to those of the decoded image, whose pixels are the direct to_rgb / resize_via / bicubic ones."""
    x, y = np.arange(4000, dtype=np.uint8), np.arange(3000, dtype=np.uint8)[:, None]
    pixels = np.empty((3000, 4000, 3), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = x, y, x * y                  # stripes every 256 px
    path = str(tmp_path / "big.bmp")
    Image.fromarray(pixels).save(path)
    via = copy.copy(model)
    via.resize_via = 24
    for m in (model, via):
        decoded, R = datasets.open_image(path), m.resolution
        direct = decoded.resize((24, 24), Image.BICUBIC) if m.resize_via else decoded
        direct = np.asarray(direct.resize((R, R), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0   # (R, R, 3)
        seen = []

        class Recording:  # the model, recording what each scoring call is handed
            prepare_image = m.prepare_image

            def score_items(self, items, spent=None):
                seen.extend(im for ims, _ in items for im in ims)
                return m.score_items(items, spent=spent)
        (_, s, _), = evaluate.score_groups(Recording(), [[Item("big", [path], TEXTS[:2])]])[0]
        assert [im.shape for im in seen] == [(R, R, 3)]                   # held at the input size, not 4000 x 3000
        assert torch.equal(preprocess(seen, R, m.resize_via)[0], torch.from_numpy(direct).permute(2, 0, 1))
        assert torch.equal(s, m.score([decoded], TEXTS[:2]))


def test_long_caption_truncated_with_one_warning(model):
    long = " ".join(["red circle"] * 40)
    model._warned_truncation = False
    with pytest.warns(UserWarning, match="truncated"):
        S = model.score(random_images(1), [long])
    assert torch.isfinite(S).all()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.score(random_images(1), [long])                                # no second warning in the same run


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


# ---- the real-token mask with SD 2.1's real tokenizer and SD 1.5's padding -----------------------------------------

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "sd21_tokenizer")


SHAPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "tiny-shapes-sd")


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.from_pretrained(FIXTURE)


@pytest.fixture(scope="module")
def sd21_model(tmp_path_factory):
    """The tiny SD 2.x sd21_model with SD 2.1's real tokenizer (vocabulary 49,408, 77 positions)."""
    folder = make_random_sd("tiny", str(tmp_path_factory.mktemp("sd21tok")), tokenizer=FIXTURE)
    return Discffusion.from_pretrained(folder, device="cpu")


def real_positions(mask):
    return mask.nonzero().flatten().tolist()


def test_the_fixture_is_sd21s_tokenizer(tok):
    assert len(tok) == 49408 and tok.model_max_length == 77 and tok.padding_side == "right"
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == (49406, 49407, "!", 0)
    # CLIP's own ids (openai/CLIP's tokenizer, the same merges)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[7:] == [0] * 70


def test_mask_is_the_captions_tokens(sd21_model, tok):
    texts = ["a photo of a cat", "Two dogs, playing with a frisbee in the park."]
    hidden, mask = sd21_model.encode_texts(texts)
    assert hidden.shape[:2] == mask.shape == (2, 77)
    for text, m in zip(texts, mask):
        n = len(tok(text).input_ids)                                  # BOS + caption + EOS
        assert real_positions(m) == list(range(1, n - 1)), text


def test_a_real_exclamation_mark_counts_though_it_is_the_pad_id(sd21_model, tok):
    """SD 2.x pads with "!" (id 0), and transformers tokenizes a caption's "!" as that same id 0 (the pad token is a
    special token), as SD 2.x's own pipeline does; the mask tells them apart by the tokenizer's attention mask."""
    ids = tok("a cat!").input_ids
    assert ids == [49406, 320, 2368, 0, 49407]
    mask = sd21_model.encode_texts(["a cat!"])[1][0]
    assert real_positions(mask) == [1, 2, 3]                          # a, cat, ! - not the 73 pads of id 0
    # the "!" changes the score: it is attended to like any other word
    image = [Image.new("RGB", (16, 16), "red")]
    assert not torch.equal(sd21_model.score(image, ["a cat!"]), sd21_model.score(image, ["a cat"]))


def test_more_than_77_tokens_is_truncated_to_75_caption_tokens_with_one_warning(sd21_model):
    long = " ".join(["a red circle left of a blue square"] * 12)      # 96 caption tokens
    sd21_model._warned_truncation = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mask = sd21_model.encode_texts([long, "a cat"])[1]
        sd21_model.encode_texts([long])
    assert real_positions(mask[0]) == list(range(1, 76)) and real_positions(mask[1]) == [1, 2]
    assert sum("truncated" in str(w.message) for w in caught) == 1


def test_a_literal_endoftext_is_not_a_real_token(sd21_model, tok):
    """A caption's literal "<|endoftext|>" is tokenized as the pipelines tokenize it (EOS, 49407); it is not a real
    token, and the words after it still are (the caption does not end there)."""
    text = "a cat <|endoftext|> on a table"
    ids = tok(text).input_ids
    assert ids.count(49407) == 2 and ids[3] == 49407
    mask = sd21_model.encode_texts([text])[1][0]
    assert real_positions(mask) == [1, 2, 4, 5, 6]
    assert real_positions(sd21_model.encode_texts(["<|endoftext|>"])[1][0]) == []


def test_an_empty_caption_is_an_error_naming_the_item(sd21_model):
    image = [Image.new("RGB", (16, 16), "red")]
    for empty in ("", "   ", "<|endoftext|>"):
        with pytest.raises(InputError, match=r"item 1 of this call, text 0: .* has no caption tokens"):
            sd21_model.score_items([(image, ["a cat"]), (image, [empty, "a dog"])])


def test_sd15_pad_is_eos_and_left_padding(tmp_path):
    """SD 1.5 pads with EOS (the mask must not end at the first pad); the shapes sd21_model's tokenizer pads on the left."""
    m = Discffusion.from_pretrained(make_random_sd("tiny-sd15", str(tmp_path / "sd15")), device="cpu")
    assert m.tokenizer.pad_token_id == m.tokenizer.eos_token_id
    n = len(m.tokenizer("a red circle").input_ids)
    assert real_positions(m.encode_texts(["a red circle"])[1][0]) == list(range(1, n - 1))
    shapes = Discffusion.from_pretrained(SHAPES, device="cpu")
    assert shapes.tokenizer.padding_side == "left"
    ids = shapes.tokenizer("a red circle").input_ids
    L, n = shapes.tokenizer.model_max_length, len(ids)
    assert real_positions(shapes.encode_texts(["a red circle"])[1][0]) == list(range(L - n + 1, L - 1))


def items(n_items=3, n_texts=5):
    """RefCOCOg-like items: 1 image x n_texts candidates (the first true)."""
    words = ["red", "blue", "green", "yellow"]
    return [([colour_image(words[k % 4], k)], [f"a {words[(k + j) % 4]} {('circle', 'square')[j % 2]}"
                                               for j in range(n_texts)]) for k in range(n_items)]


# ---- a training step's memory is bounded by pairs_per_call, not by the candidates ------------------------------------
def step_grads(folder, chunk, loss, checkpointing=False):
    m = Discffusion.from_pretrained(folder, device="cpu", pairs_per_call=chunk)
    params = random_trainable(m, 0.02)
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
