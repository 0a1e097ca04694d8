"""The fixtures every test file may use: the offline switches, one thread, the tiny random SD in diffusers layout (and
its SD 2.x-layout variant), random trained deltas for it, a guard that no model is built, a read-only folder. Shared
helpers that are not fixtures are in support.py."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub: tests never touch the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys

import pytest
import torch

# the repository root: the paper's files import by plain name, the folders as packages (tools.shapes, baselines.X)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)  # a busy second core stalls small ops badly

import methods  # noqa: E402 - after the offline switches and the path
from discffusion import Discffusion  # noqa: E402
from support import mount_tmpfs, sd_folder, umount  # noqa: E402
from tools.sd_configs import make_random_sd  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny random Stable Diffusion saved in diffusers layout (the same loading path as real weights)."""
    return make_random_sd("tiny", str(tmp_path_factory.mktemp("tiny_sd")), seed=0)


@pytest.fixture(scope="session")
def random_deltas(tiny_sd, tmp_path_factory):
    """random_deltas(scale, seed, **model_options) -> a deltas file for the tiny model with random p^k, p^v and head
    logits (normal, times scale), as if trained, saved the way train.py saves them (model_options as its
    training_args)."""
    def make(scale=1.0, seed=0, **model_options):
        model = Discffusion.from_pretrained(tiny_sd, device="cpu", **model_options)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.add_trainable():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        path = str(tmp_path_factory.mktemp("deltas") / "prompt_deltas.safetensors")
        model.save_trained(path, model_options or None)
        return path
    return make


@pytest.fixture(scope="session")
def deltas_file(random_deltas):
    """One random deltas file for the tiny model (normal * 0.3, seed 3), shared by the tools' tests."""
    return random_deltas(scale=0.3, seed=3)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any model is built: the error must come first."""
    def build(*a, **k):
        raise AssertionError("a model was built before the error")
    monkeypatch.setattr(methods, "build", build)


@pytest.fixture
def read_only(tmp_path):
    """A read-only folder: a read-only tmpfs (root) or a mode-555 folder (others)."""
    path = tmp_path / "ro"
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    why = mount_tmpfs(path, "ro,size=64k")
    if why:
        pytest.skip(why)
    yield path
    umount(path)


@pytest.fixture(scope="session")
def sd2_layout(tmp_path_factory):
    """The tiny model with an SD 2.x-layout UNet (linear projections, head counts per block)."""
    return sd_folder(str(tmp_path_factory.mktemp("sd2_layout")))
