"""tools/benchmark.py (App. B, §5.5) on the tiny preset: it runs end to end and writes its JSON; the official-style loop
and `Discffusion.score` give the same attention scores and make the same number of (image, text, timestep)
evaluations, with the work split the way each method splits it. Nothing here reads a clock."""
import json

import pytest
import torch

from common import InputError
from discffusion import Discffusion
from tools import benchmark


@pytest.fixture(scope="module")
def model(tiny_sd):
    m = Discffusion.from_pretrained(tiny_sd, device="cpu")
    # random weights give near-uniform attention, so every text scores about the same; sharpened keys make the
    # candidates' scores differ, so that agreement between the two loops is a real check
    with torch.no_grad():
        for name in m.capture.layers:
            m.unet.get_submodule(name).to_k.weight.mul_(30)
    return m


def processor_kinds(unet):
    return {k.rsplit(".", 2)[-2]: type(p).__name__ for k, p in unet.attn_processors.items()}


def test_official_loop_attention_scores_equal_score(model):
    images, texts = benchmark.workload(2, 3, model.resolution, seed=0)
    S = model.score(images, texts)                                    # (2, 3)
    off = benchmark.official_scores(model, images, texts)
    spread = (S.max(1).values - S.min(1).values).min().item()
    assert spread > 1e-3                                              # the texts really score differently
    assert off["attention"].shape == S.shape
    assert torch.allclose(off["attention"], S, atol=1e-5, rtol=0)     # cond row of [uncond, cond] == score's pair
    assert torch.isfinite(off["itm"]).all()
    # the loop's explicit self-attention was switched in for the loop only
    assert processor_kinds(model.unet) == {"attn1": "AttnProcessor2_0", "attn2": "AttnProcessor2_0"}  # the originals


def test_same_number_of_evaluations_split_differently(model):
    n_img, n_txt, n_lev = 2, 3, len(model.levels)
    images, texts = benchmark.workload(n_img, n_txt, model.resolution, seed=1)
    with benchmark.Counter(model) as ours:
        model.score(images, texts)
    with benchmark.Counter(model) as off:
        result = benchmark.official_scores(model, images, texts)
    evaluations = n_img * n_txt * n_lev
    assert ours["unet_rows"] == evaluations == result["evaluations"] == off["unet_rows"] // 2
    assert ours["unet_calls"] == n_lev and off["unet_calls"] == evaluations    # one batch per level vs per pair and t
    assert off["unet_rows"] == 2 * off["unet_calls"]                           # [uncond, cond] every time
    assert ours["vae_rows"] == n_img and off["vae_rows"] == evaluations        # once per image vs per pair and t
    assert ours["text_rows"] == n_txt and off["text_rows"] == 2 * n_img * n_txt
    with benchmark.Counter(model) as after:                                    # the hooks are gone on exit
        pass
    model.score(images[:1], texts[:1])
    assert after["unet_calls"] == 0


def test_capture_overhead_restores_the_capture(model):
    images, texts = benchmark.workload(1, 2, model.resolution)
    before = model.score(images, texts)
    res = benchmark.bench_capture_overhead(model, images, texts, iters=1, device="cpu")
    assert res["batch"] == 2 and len(res["stock"]["seconds_all"]) == 1
    assert {"stock", "capture", "capture_overhead", "official_attention_overhead_cpu_time"} <= set(res)
    assert processor_kinds(model.unet) == {"attn1": "AttnProcessor2_0", "attn2": "AttnProcessor2_0"}  # the originals
    assert torch.equal(model.score(images, texts), before)


def test_train_step_updates_only_the_prompt_deltas(tiny_sd):
    m = Discffusion.from_pretrained(tiny_sd, device="cpu")
    m.unet.enable_gradient_checkpointing()
    frozen = {k: v.clone() for k, v in m.unet.state_dict().items()}
    images, texts = benchmark.workload(1, 2, m.resolution)
    loss = benchmark.train_step(m, images, texts, torch.Generator().manual_seed(0))
    assert loss > 0                                                   # zero deltas: equal-ish scores, hinge active
    assert any(p.abs().sum() > 0 for p in m.capture.deltas.parameters())
    assert all(torch.equal(v, m.unet.state_dict()[k]) for k, v in frozen.items())


def test_end_to_end_tiny_preset_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark.main(["--preset", "tiny", "--device", "cpu", "--images", "1", "--texts", "1", "--repeats", "1",
                    "--iters", "1", "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--output", str(out)])
    res = json.loads(out.read_text())
    assert {"config", "workload", "throughput", "capture_overhead", "memory", "targets"} <= set(res)
    tp = res["throughput"]
    for key in ("ours", "official"):
        assert {"seconds", "pairs_per_s", "evaluations", "unet_calls", "unet_rows", "vae_rows"} <= set(tp[key])
        assert tp[key]["evaluations"] == 1 * 1 * res["workload"]["timesteps"] == 4
    assert tp["ratio"] > 0 and tp["agreement"]["max_abs_diff_attention"] < 1e-5
    for kind in ("score_batch1", "official_pair", "train_step"):
        assert "error" not in res["memory"][kind], res["memory"][kind]
        assert res["memory"][kind]["peak_bytes"] >= res["memory"][kind]["base_bytes"] > 0
    assert res["memory"]["train_step"]["gradient_checkpointing"] is True
    assert set(res["targets"]) == {"ratio_at_least_3x", "capture_overhead_at_most_10pct"}
    printed = capsys.readouterr().out
    assert "pairs/s" in printed and "ours/official" in printed and "capture on attn2" in printed


def test_benchmark_train_steps_side_by_side_and_fp16_check(tiny_sd, capsys):
    args = benchmark.parse_args(["--device", "cpu", "--threads", "1", "--model", tiny_sd, "--train-texts", "2,5",
                                 "--train-chunk", "2", "--no-gradient-checkpointing"])
    mem = benchmark.run_memory_child(args)
    assert [mem[k]["pairs"] for k in ("train_step", "train_step_5")] == [2, 5]
    assert all(mem[k]["unet_batch"] == 2 and mem[k]["peak_bytes"] > 0 for k in ("train_step", "train_step_5"))
    fc = benchmark.fp16_check(tiny_sd, args)
    assert fc["moved_in_fp32"] > 0 and fc["fp16"]["left_at_zero"] < 0.01
    assert fc["fp16"]["left_at_zero"] <= fc["fp16_unscaled"]["left_at_zero"]
    with pytest.raises(InputError, match="at least 2"):
        benchmark.parse_args(["--train-texts", "1,10"])


def test_quick_workload_is_not_judged_against_the_targets():
    from types import SimpleNamespace
    res = {"config": {"sd2_architecture": False}, "throughput": {"ratio": 1.5, "ratio_cpu_time": 1.4},
           "capture_overhead": {"capture_overhead": 0.5, "capture_overhead_cpu_time": 0.4}}
    for quick, verdict, met in ((False, "MISSED", False), (True, "not judged (--quick)", None)):
        args = SimpleNamespace(device="cpu", precision="fp32", quick=quick)
        for t in benchmark.targets(res, args).values():
            assert (t["met"], t["verdict"]) == (met, verdict)
    res["throughput"]["ratio"], res["capture_overhead"]["capture_overhead"] = 3.5, 0.05
    args = SimpleNamespace(device="cpu", precision="fp32", quick=False)
    assert all(t["verdict"] == "met" for t in benchmark.targets(res, args).values())
