"""families/flux.py and families/joint_capture.py on tiny random Flux.1-dev / schnell built from configs: the captured
transformer returns the stock output bit for bit (fp32, bf16, fp16), the map is a direct computation from q and k
after the RMS norms and the rotary embedding, eq. 5 on single-stream blocks acts on the text rows only, the
conditioning / packing / timestep are FluxPipeline's, and train.py / evaluate.py run on it."""
import json
import os

import pytest
import torch
import torch.nn as nn

import evaluate
import train
from attention_capture import AttentionCapture, CallRecord
from common import layer_key, read_checkpoint
from discffusion import Discffusion
from families import flux
from tools.cli import run_cli
from support import check_mmdit_loras, random_images
from tools.mmdit_configs import PRESETS, make_random_flux

TEXTS = ["a red circle left of a blue square", "a dog on the table", "cat"]
T5_LEN = 12


def transformer(dtype=torch.float32):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return FluxTransformer2DModel(**PRESETS["tiny-flux"]["flux"]).eval().to(dtype)


def inputs(tr, dtype=torch.float32, B=2, L=6, side=4):
    from diffusers import FluxPipeline
    g = torch.Generator().manual_seed(3)
    cfg = tr.config
    kw = dict(hidden_states=torch.randn(B, side * side, cfg.in_channels, generator=g).to(dtype),
              encoder_hidden_states=torch.randn(B, L, cfg.joint_attention_dim, generator=g).to(dtype),
              pooled_projections=torch.randn(B, cfg.pooled_projection_dim, generator=g).to(dtype),
              timestep=torch.tensor([0.3, 0.8]), guidance=torch.tensor([3.5, 3.5]),
              txt_ids=torch.zeros(L, 3), img_ids=FluxPipeline._prepare_latent_image_ids(B, side, side, "cpu", dtype))
    return kw, torch.tensor([[True] * 4 + [False] * 2, [True] * 2 + [False] * 4])


def capture(tr, reading="text"):
    return AttentionCapture(tr, "all", "lse", 1.0, True, reading=reading, **flux.capture_kwargs(tr))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return {p: make_random_flux(p, str(root / p)) for p in ("tiny-flux", "tiny-flux-schnell")}


@pytest.fixture(scope="module")
def models(folders):
    return {p: Discffusion.from_pretrained(f, device="cpu", max_sequence_length=T5_LEN, resolution=16)
            for p, f in folders.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_capture_returns_exactly_the_stock_output(dtype):
    tr = transformer(dtype)
    kw, mask = inputs(tr, dtype)
    cap = capture(tr)
    assert cap.layers == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn",
                          "single_transformer_blocks.1.attn"]
    with torch.no_grad():
        stock = tr(**kw).sample
        with cap:
            record = CallRecord(mask)
            got = tr(**kw, joint_attention_kwargs={"record": record}).sample
            cap.add_trainable()
            again = tr(**kw, joint_attention_kwargs={"record": CallRecord(mask)}).sample
    assert torch.equal(stock, got) and torch.equal(stock, again)
    assert all(record.maps[n].shape == (2, 2, 16, 6) for n in cap.layers)
    assert cap.deltas.k[layer_key(cap.layers[1])].shape == tr.get_submodule(cap.layers[1]).to_k.weight.shape


class Hooks:
    """Outputs of to_q, to_k, add_k_proj and the attention's image_rotary_emb argument."""

    def __init__(self, attn):
        self.out = {}
        for name in ("to_q", "to_k", "add_k_proj"):
            if hasattr(attn, name):
                getattr(attn, name).register_forward_hook(lambda m, a, o, name=name: self.out.__setitem__(name, o))
        attn.register_forward_pre_hook(lambda m, a, k: self.out.__setitem__("rope", k["image_rotary_emb"]),
                                       with_kwargs=True)


@pytest.mark.parametrize("name", ["transformer_blocks.0.attn", "single_transformer_blocks.1.attn"])
@pytest.mark.parametrize("reading", ["text", "joint"])
def test_map_is_computed_after_norms_and_rotary(name, reading):
    from diffusers.models.embeddings import apply_rotary_emb
    tr = transformer()
    kw, mask = inputs(tr)
    attn = tr.get_submodule(name)
    hooks = Hooks(attn)
    with torch.no_grad(), capture(tr, reading):
        record = CallRecord(mask)
        tr(**kw, joint_attention_kwargs={"record": record})
    L = mask.shape[1]
    split = (lambda x: x.unflatten(-1, (attn.heads, -1)))                  # (B, S, h, d)
    q, k = attn.norm_q(split(hooks.out["to_q"])), attn.norm_k(split(hooks.out["to_k"]))
    if "add_k_proj" in hooks.out:                                          # dual stream: text first
        ck = attn.norm_added_k(split(hooks.out["add_k_proj"]))
        q = torch.cat([torch.zeros_like(ck), q], 1)
        k = torch.cat([ck, k], 1)
    q = apply_rotary_emb(q, hooks.out["rope"], sequence_dim=1).transpose(1, 2)[:, :, L:]  # (B, h, N, d) image queries
    k = apply_rotary_emb(k, hooks.out["rope"], sequence_dim=1).transpose(1, 2)            # (B, h, L + N, d)
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    want = logits[..., :L].softmax(-1) if reading == "text" else logits.softmax(-1)[..., :L]
    assert torch.allclose(record.maps[name], want, atol=1e-6)


class RowsLinear(nn.Module):
    """x -> linear(x) with weight W + p on the first L rows (the text of a single-stream block)."""

    def __init__(self, linear, p, L):
        super().__init__()
        self.linear, self.p, self.L = linear, p, L

    def forward(self, x):
        out = self.linear(x)
        return torch.cat([out[:, :self.L] + x[:, :self.L] @ self.p.T, out[:, self.L:]], 1)


def test_single_stream_deltas_act_on_the_text_rows_only():
    tr, edited = transformer(), transformer()
    kw, mask = inputs(tr)
    cap = capture(tr)
    cap.add_trainable()
    name = "single_transformer_blocks.0.attn"
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for store, proj in ((cap.deltas.k, "to_k"), (cap.deltas.v, "to_v")):
            p = store[layer_key(name)]
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
            attn = edited.get_submodule(name)
            setattr(attn, proj, RowsLinear(getattr(attn, proj), p.clone(), mask.shape[1]))
        want = edited(**kw).sample
        stock = tr(**kw).sample
        with cap:
            got = tr(**kw, joint_attention_kwargs={"record": CallRecord(mask)}).sample
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, stock, atol=1e-4)


def test_conditioning_packing_and_timestep_are_the_flux_pipelines(folders, models):
    """FluxPipeline's transformer call (one step, guidance 3.5): the same T5 states, CLIP pooled output, text and
    image ids, guidance and timestep (timestep(1.0) / 1000); our packing of the latents is the pipeline's."""
    from diffusers import FluxPipeline
    m = models["tiny-flux"]
    pipe = FluxPipeline.from_pretrained(folders["tiny-flux"])
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda mod, a, k: calls.append(dict(k)), with_kwargs=True)
    R = m.resolution
    pipe(TEXTS[:2], num_inference_steps=1, guidance_scale=3.5, height=R, width=R, output_type="latent",
         max_sequence_length=T5_LEN)
    got = calls[0]
    hidden, mask = m.encode_texts(TEXTS[:2])
    ours = flux.unet_kwargs(m, hidden)
    for key in ("encoder_hidden_states", "pooled_projections", "txt_ids", "guidance"):
        assert torch.allclose(got[key], ours[key], atol=1e-6), key
    seen = []
    m.unet.register_forward_pre_hook(lambda mod, a, k: seen.append(dict(k)), with_kwargs=True)
    z = torch.randn(2, 16, R // m.vae_scale, R // m.vae_scale)
    with torch.no_grad(), m.capture:
        v = flux.denoise(m, z, torch.full((2,), m.timestep(1.0)), hidden, CallRecord(mask))
    assert torch.equal(seen[0]["img_ids"], got["img_ids"])
    assert torch.allclose(seen[0]["timestep"], got["timestep"], atol=1e-6)
    assert torch.equal(seen[0]["hidden_states"], FluxPipeline._pack_latents(z, 2, 16, *z.shape[2:]))
    assert v.shape == z.shape
    # the mask is T5's caption tokens alone
    ids = m.tokenizer_2(TEXTS[:2], padding="max_length", max_length=T5_LEN).input_ids
    assert mask.shape == (2, T5_LEN) and mask.sum(1).tolist() == [len(t.split()) for t in TEXTS[:2]]
    assert all(ids[i][int(mask[i].sum())] == m.tokenizer_2.eos_token_id for i in range(2))


def test_timesteps_are_the_schedulers_with_its_shift(models):
    """dev: dynamic shift with the pipeline's mu for the image's packed length; schnell: its static shift (1.0)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    for preset, m in models.items():
        sched = type(m.scheduler).from_config(m.scheduler.config)
        n = (m.resolution // m.vae_scale // 2) ** 2
        c = sched.config
        mu = calculate_shift(n, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        for level in m.levels:
            sched.set_timesteps(sigmas=[level], mu=mu if c.use_dynamic_shifting else None)
            assert m.timestep(level) == pytest.approx(sched.timesteps[0].item(), rel=1e-5), preset
        assert (m.config["guidance_scale"] is None) == (preset == "tiny-flux-schnell")


def test_scores_without_batch_mixing(models):
    ims = random_images(2)
    for preset, m in models.items():
        S = m.score(ims, TEXTS)
        assert S.shape == (2, 3) and torch.isfinite(S).all(), preset
        assert m.score([ims[1]], [TEXTS[2]])[0, 0].item() == pytest.approx(S[1, 2].item(), abs=1e-5), preset


def test_train_and_evaluate_on_flux(folders, tmp_path):
    data = str(tmp_path / "shapes")
    base = ["--dataset", "shapes", "--model", folders["tiny-flux"], "--data-root", data, "--device", "cpu",
            "--resolution", "16"]
    out = str(tmp_path / "run")
    assert run_cli(train.main, base + ["--shots", "4", "--steps", "2", "--batch-size", "2", "--eval-limit", "2",
                                       "--itm-timesteps", "2", "--output-dir", out]) == 0
    path = os.path.join(out, "prompt_deltas.safetensors")
    meta, tensors = read_checkpoint(path)
    assert meta["family"] == "flux"
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if k.startswith("delta_k.single"))
    result = str(tmp_path / "eval.json")
    assert evaluate.main(base + ["--limit", "2", "--itm-timesteps", "2", "--output", result, "--checkpoint", path]) == 0
    assert json.load(open(result))["model"]["family"] == "flux"


def test_real_size_flux_dev_has_the_published_parameter_count():
    """FLUX.1-dev's transformer: 11.9 B parameters, 19 dual- and 38 single-stream layers captured."""
    from diffusers import FluxTransformer2DModel
    with torch.device("meta"):
        tr = FluxTransformer2DModel(**PRESETS["flux-dev"]["flux"])
    assert round(sum(p.numel() for p in tr.parameters()) / 1e9, 1) == 11.9
    names = flux.capture_kwargs(tr)["all_layers"]
    assert len(names) == 57 and names[18] == "transformer_blocks.18.attn" and names[19].startswith("single")


def test_lora_merges_into_the_transformer_and_hardneg_lora_trains(folders, tmp_path):
    check_mmdit_loras(folders["tiny-flux"], "FluxPipeline", str(tmp_path / "lora"), max_sequence_length=T5_LEN,
                      resolution=16)
