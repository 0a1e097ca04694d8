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


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny random Stable Diffusion saved in diffusers layout (the same loading path as real weights)."""
    from tools.sd_configs import make_random_sd
    return make_random_sd("tiny", str(tmp_path_factory.mktemp("tiny_sd")), seed=0)
