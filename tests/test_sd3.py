"""families/sd3.py: tiny random SD3 and SD3.5 (three text encoders, T5 with a Unigram tokenizer, 16-channel VAE with a
shift factor, flow-matching scheduler) built from configs and loaded through Discffusion.from_pretrained(folder): the
conditioning, timestep and noise are StableDiffusion3Pipeline's / the scheduler's; the real-token mask; scores; eq. 5
through train.py and evaluate.py; DiffusionITM's flow target; the real-size presets."""
import json
import os

import pytest
import torch
from PIL import Image

import evaluate
import train
from baselines.diffusion_itm import DiffusionITM
from common import InputError
from discffusion import Discffusion
from tools.cli import run_cli
from support import check_mmdit_loras, error_line, random_images
from tools.mmdit_configs import PRESETS, make_random_mmdit

TEXTS = ["a red circle left of a blue square", "a dog on the table", "cat"]
T5_LEN = 12


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmdit")
    return {p: make_random_mmdit(p, str(root / p)) for p in ("tiny-sd3", "tiny-sd35")}


@pytest.fixture(scope="module")
def models(folders):
    return {p: Discffusion.from_pretrained(f, device="cpu", max_sequence_length=T5_LEN) for p, f in folders.items()}


class Recorder:
    def __init__(self, module):
        self.calls = []
        module.register_forward_pre_hook(lambda mod, args, kw: self.calls.append(dict(kw)), with_kwargs=True)


def test_family_and_parts_read_from_the_folder(models):
    for m in models.values():
        assert m.family == "sd3" and m.config["family"] == "sd3" and m.config["reading"] == "text"
        assert type(m.unet).__name__ == "SD3Transformer2DModel"
        assert type(m.text_encoder_3).__name__ == "T5EncoderModel" and m.tokenizer_3.eos_token == "</s>"
        assert type(m.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
        assert m.capture.layers == [f"transformer_blocks.{i}.attn" for i in range(m.unet.config.num_layers)]
    assert models["tiny-sd35"].unet.config.qk_norm == "rms_norm"


def test_conditioning_and_timestep_are_the_sd3_pipelines(folders, models):
    """StableDiffusion3Pipeline's transformer call (one step, no guidance): the same joint text sequence (CLIP-L + G
    padded to T5's width, then T5), pooled projections, and timestep(1.0) is its first timestep."""
    from diffusers import StableDiffusion3Pipeline
    m = models["tiny-sd3"]
    pipe = StableDiffusion3Pipeline.from_pretrained(folders["tiny-sd3"])
    pipe.set_progress_bar_config(disable=True)
    rec = Recorder(pipe.transformer)
    R = m.resolution
    pipe(TEXTS[:2], num_inference_steps=1, guidance_scale=1.0, height=R, width=R, output_type="latent",
         max_sequence_length=T5_LEN)
    got = rec.calls[0]
    hidden, mask = m.encode_texts(TEXTS[:2])
    ours = m.unet_kwargs(hidden)
    L = m.tokenizer.model_max_length + T5_LEN
    assert ours["encoder_hidden_states"].shape == got["encoder_hidden_states"].shape == (2, L, 32)
    assert torch.allclose(got["encoder_hidden_states"], ours["encoder_hidden_states"], atol=1e-6)
    assert torch.allclose(got["pooled_projections"], ours["pooled_projections"], atol=1e-6)
    assert got["timestep"][0].item() == pytest.approx(m.timestep(1.0))


def test_real_token_mask_is_clips_caption_tokens_or_both_encoders(models, tiny_sd):
    """Over the joint sequence [CLIP (L_clip); T5 (L_t5)]: CLIP's tokens without BOS / EOS / padding and T5's without
    "</s>" / padding; every caption has the same real tokens in each half as its tokenizers give words. The default
    (text_tokens "clip") is CLIP's half alone; "t5" T5's alone."""
    m = models["tiny-sd3"]
    m.text_tokens = "both"
    _, mask = m.encode_texts(TEXTS)
    Lc = m.tokenizer.model_max_length
    assert mask.shape == (3, Lc + T5_LEN)
    clip, t5 = mask[:, :Lc], mask[:, Lc:]
    ids_c = m.tokenize(m.tokenizer, TEXTS).input_ids
    ids_t = m.tokenizer_3(TEXTS, padding="max_length", max_length=T5_LEN, truncation=True).input_ids
    for i, text in enumerate(TEXTS):
        n_clip = len(m.tokenizer(text).input_ids) - 2                      # without BOS, EOS
        n_t5 = len(m.tokenizer_3(text).input_ids) - 1                      # without </s>
        assert clip[i].sum() == n_clip and clip[i, 1:1 + n_clip].all()
        assert t5[i].sum() == min(n_t5, T5_LEN - 1) and t5[i, :t5[i].sum()].all()
        assert ids_t[i][int(t5[i].sum())] == m.tokenizer_3.eos_token_id   # the first non-caption T5 token: "</s>"
        assert not (ids_c[i][clip[i]] == m.tokenizer.eos_token_id).any()
    assert t5.sum(1).tolist() == [len(t.split()) for t in TEXTS]          # the Unigram vocabulary: a word a token
    for rule, keep in (("t5", t5), ("clip", clip), (None, clip)):             # --text-tokens: one half only
        m.text_tokens = rule
        half = m.encode_texts(TEXTS)[1]
        assert torch.equal(half, torch.cat([clip & (rule != "t5"), t5 & (rule == "t5")], 1))
        assert half.sum() == keep.sum() > 0
    m.text_tokens = None
    with pytest.raises(InputError, match="only SD3"):
        Discffusion.from_pretrained(tiny_sd, device="cpu", text_tokens="t5")


def test_flow_matching_noise_is_the_schedulers(models):
    """Each level's timestep is in the scheduler's table (with its shift 3); z_t = scale_noise(z, t, eps); the target
    is the flow eps - z; latents are (mean - shift_factor) * scaling_factor with 16 channels."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    m = models["tiny-sd3"]
    sched = FlowMatchEulerDiscreteScheduler.from_config(m.scheduler.config)
    assert sched.config.shift == 3.0
    z = m.encode_images(random_images(2))
    x = torch.stack([torch.from_numpy(__import__("numpy").asarray(im.resize((m.resolution,) * 2, Image.BICUBIC),
                                                                  dtype="float32") / 127.5 - 1).permute(2, 0, 1)
                     for im in random_images(2)])
    mean = m.vae.encode(x).latent_dist.mean
    assert z.shape[1] == 16 and m.vae.config.shift_factor != 0
    assert torch.allclose(z, (mean - m.vae.config.shift_factor) * m.vae.config.scaling_factor, atol=1e-5)
    eps = torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(0))
    for level in m.levels:
        t = m.timestep(level)
        i = (sched.timesteps - t).abs().argmin()
        assert sched.timesteps[i].item() == pytest.approx(t, abs=1e-3)
        s = level
        assert t / 1000 == pytest.approx(3 * s / (1 + 2 * s), abs=1e-6)   # sigma: the shifted level
        z_t, ts = m.add_noise(z, eps, t)
        want = sched.scale_noise(z, sched.timesteps[i:i + 1], eps.expand_as(z))
        assert torch.allclose(z_t, want, atol=1e-6) and ts.dtype == torch.float32
        assert torch.equal(m.target(z, eps, ts), eps.expand_as(z) - z)


def test_scores_without_batch_mixing_on_sd3_and_sd35(models):
    ims = random_images(2)
    for preset, m in models.items():
        S = m.score(ims, TEXTS)
        assert S.shape == (2, 3) and torch.isfinite(S).all(), preset
        assert m.score([ims[1]], [TEXTS[2]])[0, 0].item() == pytest.approx(S[1, 2].item(), abs=1e-5), preset
        m.pairs_per_call = 1
        assert torch.allclose(m.score(ims, TEXTS), S, atol=1e-5), preset
        m.pairs_per_call = 16


def test_joint_reading_is_an_option(folders, models):
    joint = Discffusion.from_pretrained(folders["tiny-sd3"], device="cpu", max_sequence_length=T5_LEN, reading="joint")
    assert joint.config["reading"] == "joint"
    assert not torch.allclose(joint.score(random_images(1), TEXTS), models["tiny-sd3"].score(random_images(1), TEXTS))
    with pytest.raises(InputError, match="reading"):
        Discffusion.from_pretrained(folders["tiny-sd3"], device="cpu", reading="both")
    with pytest.raises(InputError, match="official"):
        Discffusion.from_pretrained(folders["tiny-sd3"], device="cpu", layers="official")
    last = Discffusion.from_pretrained(folders["tiny-sd3"], device="cpu", max_sequence_length=T5_LEN, layers=1)
    assert last.capture.layers == ["transformer_blocks.1.attn"]


def test_zero_deltas_keep_scores_and_a_family_mismatch_is_refused(models, tmp_path):
    m = models["tiny-sd35"]
    before = m.score(random_images(2), TEXTS)
    m.add_trainable()
    assert torch.equal(m.score(random_images(2), TEXTS), before)
    k = m.capture.deltas.k[next(iter(m.capture.deltas.k.keys()))]
    assert k.shape == m.unet.get_submodule(m.capture.layers[0]).add_k_proj.weight.shape
    path = str(tmp_path / "d.safetensors")
    m.save_trained(path)
    from common import read_checkpoint
    assert read_checkpoint(path, tensors=False)[0]["family"] == "sd3"
    import prompt_delta
    with pytest.raises(InputError, match="trained on a sd3 model"):
        prompt_delta.load(path, m.capture, family="sdxl")


def test_diffusion_itm_error_is_against_the_flow(folders):
    """DiffusionITM on SD3: its error is ||(eps - z) - v_theta(z_t)|| at the shifted timesteps."""
    d = DiffusionITM.from_pretrained(folders["tiny-sd3"], device="cpu", n_timesteps=2, max_sequence_length=T5_LEN)
    assert d.config["prediction_type"] == "flow"
    m = d.core
    z = m.encode_images(random_images(1))
    hidden, mask = m.encode_texts(TEXTS[:1])
    eps = torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(2))
    t = d.timesteps[0]
    with torch.no_grad():
        _, err = d.errors(z, hidden, mask, t, eps)
        z_t, ts = m.add_noise(z, eps, m.timestep(t / 1000))
        assert ts[0].item() != t                                          # shifted: not the schedule index
        v = m.unet(hidden_states=z_t, timestep=ts, **m.unet_kwargs(hidden)).sample
    assert err.item() == pytest.approx((eps - z[0] - v[0]).norm().item(), rel=1e-4)
    assert torch.isfinite(d.score(random_images(1), TEXTS[:2])).all()


def test_train_and_evaluate_on_sd3(folders, tmp_path):
    """train.py moves the deltas away from zero and saves them with the family; evaluate.py loads them."""
    data = str(tmp_path / "shapes")
    base = ["--dataset", "shapes", "--model", folders["tiny-sd3"], "--data-root", data, "--device", "cpu"]
    out = str(tmp_path / "run")
    assert run_cli(train.main, base + ["--shots", "4", "--steps", "2", "--batch-size", "2", "--eval-limit", "2",
                                       "--itm-timesteps", "2", "--output-dir", out]) == 0
    path = os.path.join(out, "prompt_deltas.safetensors")
    from common import read_checkpoint
    meta, tensors = read_checkpoint(path)
    assert meta["family"] == "sd3"
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if k.startswith("delta_k."))
    result = str(tmp_path / "eval.json")
    assert evaluate.main(base + ["--limit", "2", "--itm-timesteps", "2", "--output", result, "--checkpoint", path,
                                 "--reading", "joint", "--max-sequence-length", str(T5_LEN)]) == 0
    ev = json.load(open(result))
    assert ev["datasets"]["shapes"]["n_items"] == 2 and ev["model"]["family"] == "sd3"
    assert ev["model"]["reading"] == "joint" and ev["model"]["max_sequence_length"] == T5_LEN


def test_real_size_presets_have_the_published_parameter_counts():
    """On the meta device (no memory, no download): SD3-medium's transformer 2.03 B parameters (the hub's count),
    SD3.5-medium's 2.24 B, SD3.5-large's 8.06 B, with 24, 24 and 38 joint-attention layers."""
    from diffusers import SD3Transformer2DModel
    from families import sd3
    for preset, (billions, n_layers) in {"sd3-medium": (2.03, 24), "sd35-medium": (2.24, 24),
                                         "sd35-large": (8.06, 38)}.items():
        with torch.device("meta"):
            tr = SD3Transformer2DModel(**PRESETS[preset]["transformer"])
        n = sum(p.numel() for p in tr.parameters())
        assert round(n / 1e9, 2) == billions, (preset, n)
        assert len(sd3.capture_kwargs(tr)["all_layers"]) == n_layers


@pytest.mark.parametrize("make", ["sd3", "flux"])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, make):
    """A training step's gradients on p^k, p^v with the transformer's gradient checkpointing (the capture held across
    forward and backward, its processors re-run in backward) equal those without; more rows than pairs_per_call go
    through CachedScores."""
    from support import random_trainable
    from tools.mmdit_configs import make_random_flux
    folder = make_random_mmdit("tiny-sd3", str(tmp_path / "m")) if make == "sd3" else \
        make_random_flux("tiny-flux", str(tmp_path / "m"))
    grads = []
    for checkpointing in (False, True):
        m = Discffusion.from_pretrained(folder, device="cpu", max_sequence_length=T5_LEN, resolution=16,
                                        pairs_per_call=2)
        params = random_trainable(m, 0.02)
        if checkpointing:
            m.unet.enable_gradient_checkpointing()
        with m.capture:
            S = m.score_items([(random_images(1), TEXTS)], train=True, generator=torch.Generator().manual_seed(0))[0]
            S.log_softmax(-1)[0, 0].backward()
        # None: p^v of the last layer, whose values feed no later attention map (the score reads maps only)
        grads.append([None if p.grad is None else p.grad.clone() for p in params])
    assert any(g is not None and g.abs().sum() > 0 for g in grads[0])
    assert [g is None for g in grads[0]] == [g is None for g in grads[1]]
    assert all(a is None or torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_offload_moves_the_transformer_out_before_the_text_encoders_run(folders):
    """offload: while any text encoder runs the transformer was last sent to the CPU, the encoders end on the CPU and
    the transformer on its device; the scores equal those without offload. Off on the CPU by default."""
    off = Discffusion.from_pretrained(folders["tiny-sd3"], device="cpu", max_sequence_length=T5_LEN)
    on = Discffusion.from_pretrained(folders["tiny-sd3"], device="cpu", max_sequence_length=T5_LEN, offload=True)
    assert not off.offload and on.offload
    moves, seen = [], []
    parts = {"unet": on.unet, **{f"enc{i}": e for i, e in enumerate(on.text_encoders())}}
    for name, part in parts.items():
        part.to = (lambda to, name: lambda *a, **k: moves.append((name, str(a[0]))) or to(*a, **k))(part.to, name)
        if name != "unet":
            part.register_forward_pre_hook(lambda mod, args: seen.append([m for m in moves if m[0] == "unet"][-1]))
    ims = random_images(2)
    assert torch.equal(on.score(ims, TEXTS), off.score(ims, TEXTS))
    assert len(on.text_encoders()) == 3 and len(seen) >= 3 and all(m == ("unet", "cpu") for m in seen)
    assert [m for m in moves if m[0] == "unet"] == [("unet", "cpu"), ("unet", "cpu")]   # out, back to its device (cpu)
    assert all(moves[-2 - i] == (f"enc{2 - i}", "cpu") for i in range(3)) and moves[-1][0] == "unet"


def test_lora_merges_into_the_transformer_and_hardneg_lora_trains(folders, tmp_path):
    check_mmdit_loras(folders["tiny-sd3"], "StableDiffusion3Pipeline", str(tmp_path / "lora"),
                      max_sequence_length=T5_LEN)


def test_unet_only_tools_refuse_an_mmdit_in_one_line(folders, tmp_path, capsys):
    """tools.benchmark, tools.figures attention and tools.embedding_retrieval read a UNet's own layers: an SD3 folder
    is one error line naming its family, exit 2."""
    from tools import benchmark, embedding_retrieval, figures
    f = folders["tiny-sd3"]
    for module, argv in ((benchmark, ["--model", f, "--device", "cpu", "--output", str(tmp_path / "b.json")]),
                         (figures, ["attention", "--model", f, "--out", str(tmp_path / "figs")]),
                         (embedding_retrieval, ["--dataset", "shapes", "--data-root", str(tmp_path / "shapes"),
                                                "--model", f, "--no-clip", "--output", str(tmp_path / "e.json")])):
        assert (embedding_retrieval.main(argv) if module is embedding_retrieval else run_cli(module.main, argv)) == 2
        line = error_line(capsys)
        assert "sd3 family" in line and module.__name__ in line, line
