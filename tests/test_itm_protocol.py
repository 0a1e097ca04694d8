"""DiffusionITM's protocol options (baselines/diffusion_itm.py): its own timestep grid range(10, 990, 1000 // S)."""
import pytest

import evaluate
import methods
from baselines.diffusion_itm import DiffusionITM, itm_grid
from common import InputError


def test_grid_is_diffusion_itms_range():
    assert itm_grid(10) == list(range(10, 990, 100)) == [10, 110, 210, 310, 410, 510, 610, 710, 810, 910]
    assert itm_grid(250) == list(range(10, 990, 4)) and len(itm_grid(250)) == 245
    args = evaluate.build_parser().parse_args(["--itm-timesteps", "grid:10"])
    assert methods.option(args, "itm_timesteps") == "grid:10"
    with pytest.raises(InputError):
        evaluate.build_parser().parse_args(["--itm-timesteps", "grid:0"])


def test_the_model_scores_at_the_grid(tiny_sd):
    m = DiffusionITM.from_pretrained(tiny_sd, n_timesteps="grid:10", device="cpu")
    assert m.timesteps == itm_grid(10) and m.config["timesteps"] == itm_grid(10)
