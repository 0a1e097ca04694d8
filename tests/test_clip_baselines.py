"""CLIP baselines (§5.3) on a tiny random CLIP built from a config: own parameters only, learning, save/load."""
import pytest
import torch
from PIL import Image

from baselines.clip_baselines import ClipMatcher
from common import InputError
from discffusion import to_rgb
from tools.sd_configs import make_random_clip

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
IMAGES = {c: Image.new("RGB", (40, 40), v) for c, v in COLORS.items()}
# every ordered pair of colours: image 0 matches text 0, image 1 / text 1 are the negatives
ITEMS = [([IMAGES[a], IMAGES[b]], [f"a {a} circle", f"a {b} circle"]) for a in COLORS for b in COLORS if a != b]
OWN = {"clip_ft": {"clip.visual_projection.weight", "clip.text_projection.weight"},
       "clip_prompt": {"ctx", "meta_net.0.weight", "meta_net.0.bias", "meta_net.2.weight", "meta_net.2.bias"}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_random_clip(str(tmp_path_factory.mktemp("tiny_clip")), seed=0)


def margin_loss(S, margin=0.1):
    """eq. 6 with the hardest negative: S (n_img, n_txt), positive S[0,0], negatives S[0,1:] and S[1:,0]."""
    negatives = torch.cat([S[0, 1:], S[1:, 0]])
    return torch.relu(-S[0, 0] + negatives.max() + margin), bool(S[0, 0] > negatives.max())


def step(m, opt):
    losses, correct = zip(*[margin_loss(S) for S in m.score_items(ITEMS, train=True)])
    loss = torch.stack(losses).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item(), sum(correct) / len(correct)


def trained(folder, method, steps, **kw):
    m = ClipMatcher.from_pretrained(folder, method=method, device="cpu", **kw)
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    return m, [step(m, opt) for _ in range(steps)]


@pytest.mark.parametrize("method", ["clip_ft", "clip_prompt"])
def test_trains_only_its_own_parameters(tiny_clip, method):
    m = ClipMatcher.from_pretrained(tiny_clip, method=method, device="cpu")
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names == OWN[method]
    assert {id(p) for p in m.trainable_parameters()} == {id(p) for n, p in m.named_parameters() if n in OWN[method]}
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    step(m, torch.optim.AdamW(m.trainable_parameters(), lr=1e-2))
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]) != (n in OWN[method]), n


@pytest.mark.parametrize("method,steps", [("clip_ft", 20), ("clip_prompt", 60)])
def test_loss_falls_and_accuracy_rises(tiny_clip, method, steps):
    _, history = trained(tiny_clip, method, steps)
    (loss0, acc0), (loss1, acc1) = history[0], history[-1]
    assert loss1 < 0.8 * loss0
    assert acc1 > acc0


def test_manual_text_path_equals_stock_clip(tiny_clip):
    """clip_prompt runs the text tower from embeddings; with no context it must equal CLIPModel.get_text_features."""
    m = ClipMatcher.from_pretrained(tiny_clip, method="clip_ft", device="cpu")
    ids, mask = m.tokenize(["a red circle", "a photo of a blue square on the table"])  # padded: mask matters
    with torch.no_grad():
        stock = m.clip.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        mine = m.encode_embeds(m.clip.text_model.embeddings.token_embedding(ids), mask)
    torch.testing.assert_close(mine, stock)


def test_context_init_and_long_captions_fit(tiny_clip):
    m = ClipMatcher.from_pretrained(tiny_clip, method="clip_prompt", device="cpu", n_ctx=4)
    ids = m.tokenizer("a photo of a", add_special_tokens=False).input_ids
    assert torch.equal(m.ctx.data, m.clip.text_model.embeddings.token_embedding.weight[ids])
    long = " ".join(["red circle"] * 20)  # far beyond the 16 positions once the context is inserted
    assert m.score([IMAGES["red"]], [long, "a red circle"]).shape == (1, 2)
    other = ClipMatcher.from_pretrained(tiny_clip, method="clip_prompt", device="cpu", n_ctx=3)
    assert other.ctx.shape == (3, 32) and other.ctx.std() < 0.05  # no 3-token init: normal(0, 0.02)


@pytest.mark.parametrize("method", ["clip_ft", "clip_prompt"])
def test_score_ignores_batch_mates(tiny_clip, method):
    m = ClipMatcher.from_pretrained(tiny_clip, method=method, device="cpu")
    images = [IMAGES[c] for c in COLORS]
    texts = ["a red circle", "a blue square on the table", "a green dog", "yellow"]
    full = m.score(images, texts)
    assert full.shape == (4, 4) and full.dtype == torch.float32 and not full.requires_grad
    torch.testing.assert_close(m.score(images[2:3], texts[1:2])[0, 0], full[2, 1], rtol=0, atol=1e-6)
    perm = [3, 1, 0, 2]
    torch.testing.assert_close(m.score([images[i] for i in perm], texts[::-1]), full[perm][:, [3, 2, 1, 0]],
                               rtol=0, atol=1e-6)
    per_item = m.score_items([(images[:2], texts[:3]), (images[2:], texts[3:])])
    torch.testing.assert_close(per_item[0], full[:2, :3], rtol=0, atol=1e-6)
    torch.testing.assert_close(per_item[1], full[2:, 3:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["clip_ft", "clip_prompt"])
def test_save_load_round_trip(tiny_clip, tmp_path, method):
    m, _ = trained(tiny_clip, method, 3)
    path = str(tmp_path / f"{method}.safetensors")
    m.save_trained(path, {"steps": 3, "split": "train"})
    fresh = ClipMatcher.from_pretrained(tiny_clip, method=method, device="cpu", seed=1)
    assert not torch.equal(fresh.score(*ITEMS[0]), m.score(*ITEMS[0]))
    meta = fresh.load_trained(path)
    assert meta["training_args"]["steps"] == 3 and meta["method"] == method and meta["model"] == tiny_clip
    for (k, a), b in zip(m.trained_state().items(), fresh.trained_state().values()):
        assert torch.equal(a, b), k
    assert torch.equal(fresh.score(*ITEMS[0]), m.score(*ITEMS[0]))


def test_load_onto_mismatched_model_fails_clearly(tiny_clip, tmp_path):
    path = str(tmp_path / "prompt.safetensors")
    ClipMatcher.from_pretrained(tiny_clip, method="clip_prompt", device="cpu", n_ctx=4).save_trained(path, {})
    with pytest.raises(InputError, match=r"ctx has shape \(4, 32\) in the file, \(2, 32\)"):
        ClipMatcher.from_pretrained(tiny_clip, method="clip_prompt", device="cpu", n_ctx=2).load_trained(path)
    with pytest.raises(InputError, match="method 'clip_prompt', this model is 'clip_ft'"):
        ClipMatcher.from_pretrained(tiny_clip, method="clip_ft", device="cpu").load_trained(path)


def test_bad_clip_model_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="could not load CLIP model"):
        ClipMatcher.from_pretrained(str(tmp_path / "nowhere"))


def test_text_path_uses_no_deprecated_argument(tiny_clip):
    """The embeddings path calls transformers' create_causal_mask without a deprecated keyword (past_key_values is
    removed in transformers 5.40): no warning at all from the call."""
    import warnings
    m = ClipMatcher.from_pretrained(tiny_clip, method="clip_ft", device="cpu")
    ids, mask = m.tokenize(["a red circle"])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        m.encode_embeds(m.clip.text_model.embeddings.token_embedding(ids), mask)


def test_an_image_is_held_as_the_pixels_clip_reads(tiny_clip):
    """prepare_image (what the image cache keeps): CLIP's input size, the processor's pixels for the whole batch, and
    scores bit-identical to the decoded images'."""
    m = ClipMatcher.from_pretrained(tiny_clip, method="clip", device="cpu")
    wide = Image.new("RGB", (400, 300), COLORS["blue"])
    wide.paste(COLORS["red"], (0, 0, 200, 300))
    ims, texts = [wide, IMAGES["green"].convert("LA")], ["a red circle", "a green circle"]
    held = [m.prepare_image(im) for im in ims]
    size = m.image_processor.crop_size
    assert [tuple(h.shape) for h in held] == [(3, size["height"], size["width"])] * 2
    batch = m.image_processor([to_rgb(im) for im in ims], return_tensors="pt").pixel_values   # (2, 3, H, W)
    assert torch.equal(torch.stack(held), batch)
    assert torch.equal(m.score(held, texts), m.score(ims, texts))
