"""families/joint_capture.py on tiny random SD3 / SD3.5 transformers built from configs: the captured transformer
returns what the stock JointAttnProcessor2_0 returns, bit for bit (fp32, bf16, fp16), with zero p^k, p^v too; the
recorded map equals a direct computation from the layer's q and k in both readings; eq. 5 equals editing add_k_proj /
add_v_proj."""
import pytest
import torch

from attention_capture import AttentionCapture, CallRecord
from common import layer_key
from families import sd3
from tools.mmdit_configs import PRESETS

PRESET_NAMES = ("tiny-sd3", "tiny-sd35")


def transformer(preset, dtype=torch.float32):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    return SD3Transformer2DModel(**PRESETS[preset]["transformer"]).eval().to(dtype)


def inputs(tr, B=2, L=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    cfg = tr.config
    z = torch.randn(B, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g).to(dtype)
    kw = dict(encoder_hidden_states=torch.randn(B, L, cfg.joint_attention_dim, generator=g).to(dtype),
              pooled_projections=torch.randn(B, cfg.pooled_projection_dim, generator=g).to(dtype),
              timestep=torch.tensor([300.0, 800.0]))
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 2 + [False] * 4])
    return z, kw, mask


def capture(tr, reading="text", keep_maps=True):
    return AttentionCapture(tr, "all", "lse", 1.0, keep_maps, reading=reading, **sd3.capture_kwargs(tr))


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_capture_returns_exactly_the_stock_output(preset, dtype):
    tr = transformer(preset, dtype)
    z, kw, mask = inputs(tr, dtype=dtype)
    cap = capture(tr)
    assert cap.layers == [f"transformer_blocks.{i}.attn" for i in range(tr.config.num_layers)]
    with torch.no_grad():
        stock = tr(z, **kw).sample
        with cap:
            record = CallRecord(mask)
            got = tr(z, **kw, joint_attention_kwargs={"record": record}).sample
            cap.add_trainable()                                            # zero p^k, p^v: still bit for bit
            again = tr(z, **kw, joint_attention_kwargs={"record": CallRecord(mask)}).sample
    assert torch.equal(stock, got) and torch.equal(stock, again)
    assert set(record.pooled) == set(cap.layers)
    heads = tr.config.num_attention_heads
    assert all(v.shape == (2, heads) and torch.isfinite(v).all() for v in record.pooled.values())
    if preset == "tiny-sd35":                                              # MMDiT-X: attn2 exists, is not captured
        assert tr.transformer_blocks[0].attn2 is not None and tr.transformer_blocks[0].attn.norm_q is not None
        assert not any("attn2" in n for n in cap.all_layers)


class QK:
    """Forward hooks on one layer's to_q, to_k, add_k_proj: their outputs."""

    def __init__(self, attn):
        self.out = {}
        for name in ("to_q", "to_k", "add_k_proj"):
            getattr(attn, name).register_forward_hook(lambda m, a, o, name=name: self.out.__setitem__(name, o))


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("reading", ["text", "joint"])
def test_recorded_map_is_the_softmax_of_the_layers_q_and_k(preset, reading):
    """A from hooks on the projections, through the layer's own norms (RMSNorm on SD3.5): the text reading is the
    softmax over text keys (rows sum to 1), the joint reading the text columns of softmax over [image; text] keys."""
    tr = transformer(preset)
    z, kw, mask = inputs(tr)
    name = "transformer_blocks.1.attn"
    attn = tr.get_submodule(name)
    hooks = QK(attn)
    cap = capture(tr, reading)
    with torch.no_grad(), cap:
        record = CallRecord(mask)
        tr(z, **kw, joint_attention_kwargs={"record": record})
    h = attn.heads

    def split(x):
        return x.view(x.shape[0], x.shape[1], h, -1).transpose(1, 2)       # (B, h, N, d)
    norm = (lambda n, x: n(x) if n is not None else x)
    q = norm(attn.norm_q, split(hooks.out["to_q"]))
    k = norm(attn.norm_k, split(hooks.out["to_k"]))
    ck = norm(attn.norm_added_k, split(hooks.out["add_k_proj"]))
    d = q.shape[-1]
    if reading == "text":
        want = (q @ ck.transpose(-1, -2) / d ** 0.5).softmax(-1)
    else:
        want = (q @ torch.cat([k, ck], 2).transpose(-1, -2) / d ** 0.5).softmax(-1)[..., k.shape[2]:]
    got = record.maps[name]
    assert got.shape == (2, h, q.shape[2], ck.shape[2])
    assert torch.allclose(got, want, atol=1e-6)
    sums = got.sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-6) if reading == "text" else (sums < 1).all()
    # eq. 3-4 from the map: LSE over image tokens, mean over the real tokens of each row
    S = torch.logsumexp(want, dim=2)                                       # (B, h, L)
    pooled = torch.stack([S[b][:, mask[b]].mean(-1) for b in range(2)])
    assert torch.allclose(record.pooled[name], pooled, atol=1e-6)


def test_prompt_deltas_act_as_edited_text_projections():
    """eq. 5: p^k, p^v on add_k_proj / add_v_proj give the output and maps of a transformer whose text key / value
    weights are W + p (the image stream's to_k / to_v untouched); gradients reach them."""
    tr, edited = transformer("tiny-sd3"), transformer("tiny-sd3")
    z, kw, mask = inputs(tr)
    cap = capture(tr)
    params = cap.add_trainable()
    g = torch.Generator().manual_seed(5)
    name = cap.layers[0]
    with torch.no_grad():
        for store, proj in ((cap.deltas.k, "add_k_proj"), (cap.deltas.v, "add_v_proj")):
            p = store[layer_key(name)]
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
            w = getattr(edited.get_submodule(name), proj).weight
            assert p.shape == w.shape
            w += p
    with torch.no_grad():
        want = edited(z, **kw).sample
    with cap:
        record = CallRecord(mask)
        got = tr(z, **kw, joint_attention_kwargs={"record": record}).sample
        assert torch.allclose(got, want, atol=1e-5)
        cap.combine(record).sum().backward()
    assert all(p.grad is not None for p in params[:2]) and params[0].grad.abs().sum() > 0


def test_map_stays_fp32_under_autocast_and_official_pooling_reads_the_text_logits():
    """Under bf16 autocast (training) A is still the fp32 softmax of the layer's q, k; the official pooling gets the
    image-query x text-key logits: logsumexp over all text keys, mean over image tokens."""
    tr = transformer("tiny-sd3")
    z, kw, mask = inputs(tr)
    name = "transformer_blocks.0.attn"
    attn = tr.get_submodule(name)
    hooks = QK(attn)
    cap = AttentionCapture(tr, "all", "official", 1.0, True, **sd3.capture_kwargs(tr))
    with torch.no_grad(), cap, torch.autocast("cpu", dtype=torch.bfloat16):
        record = CallRecord(mask)
        tr(z, **kw, joint_attention_kwargs={"record": record})
    h = attn.heads
    q = hooks.out["to_q"].float().unflatten(-1, (h, -1)).transpose(1, 2)
    ck = hooks.out["add_k_proj"].float().unflatten(-1, (h, -1)).transpose(1, 2)
    logits = q @ ck.transpose(-1, -2) / q.shape[-1] ** 0.5                # (B, h, N, L)
    assert record.maps[name].dtype == torch.float32
    assert torch.allclose(record.maps[name], logits.softmax(-1), atol=1e-6)
    assert torch.allclose(record.pooled[name], torch.logsumexp(logits, -1).mean(-1), atol=1e-5)
