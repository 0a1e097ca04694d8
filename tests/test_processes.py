"""tools/processes.py, scale-out: evaluation and training on two CPU processes (`accelerate launch`) equal one
process, and a two-process training resumes under the launcher."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import evaluate
import train
from support import write_train_comvg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
LAUNCH_TIMEOUT = 300  # a hung gloo collective fails the test instead of CI
# two processes x 2 items vs one process x 4 items, 3 AdamW steps at lr 0.05, on p^k, p^v and head logits (|x| ~0.15):
# measured max |difference| 2.3e-4, relative L2 2.4e-5 (float rounding of other GEMM shapes and of the gradient
# sum, which Adam's g / sqrt(v) turns into up to a few % of one step where a gradient is near zero); see docs/scaleout.md
DELTA_TOL, DELTA_REL_TOL = 1e-3, 1e-4


def launch(script, *args, processes=2, cwd=REPO):
    """`accelerate launch --multi_gpu --num_processes N script args` (args with --device cpu) -> CompletedProcess."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), os.path.join(REPO, script), *args]
    r = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def tables_of(stdout):
    """The printed tables and summary lines (tqdm and launcher chatter go to stderr)."""
    return [line for line in stdout.splitlines() if not line.startswith("results written")]


def test_two_processes_score_like_one(tmp_path, tiny_sd, monkeypatch, capsys):
    """7 items, 2 per scoring call -> 4 calls dealt out 2 + 2 (4 items + 3 items): the same per-item scores, metrics,
    intervals, paired differences, JSON and printed tables as one process."""
    root = write_train_comvg(str(tmp_path / "comvg"), n=7)
    argv = ["--dataset", "comvg", "--data-root", root, "--model", tiny_sd, "--device", "cpu", "--levels", "0.4,0.8",
            "--eval-batch-size", "4", "--methods", "discffusion,diffusion_itm", "--itm-timesteps", "2",
            "--output", "r.json"]
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    monkeypatch.chdir(tmp_path / "one")
    assert evaluate.main(argv) == 0
    one_out = capsys.readouterr().out
    two = launch("evaluate.py", *argv, cwd=tmp_path / "two")
    one_json, two_json = (json.loads((tmp_path / d / "r.json").read_text()) for d in ("one", "two"))
    assert two_json == one_json
    assert tables_of(two.stdout) == tables_of(one_out)                 # printed once, by the main process
    assert re.search(r"discffusion comvg: 100%.* 4/4 ", two.stderr)     # which scored 4 of the 7 items
    d = one_json["datasets"]["comvg"]
    assert [r["id"] for r in d["items"]] == [str(k) for k in range(7)] and d["n_items"] == 7
    assert all(len(r["scores"]) == 2 and len(r["scores"][0]) == 1 for r in d["items"])
    for col, (low, high) in d["ci"].items():
        assert low <= d["metrics"][col] <= high
    diff = one_json["differences"]["comvg"]["diffusion_itm - discffusion"]["Average"]
    itm = one_json["methods"]["diffusion_itm"]["datasets"]["comvg"]["metrics"]["Average"]
    assert diff["difference"] == pytest.approx(itm - d["metrics"]["Average"]) and diff["n"] == 7
    assert diff["ci"][0] <= diff["difference"] <= diff["ci"][1]
    assert f"{d['metrics']['Average']:.2f} [{d['ci']['Average'][0]:.1f}, {d['ci']['Average'][1]:.1f}]" in one_out
    assert "paired difference" in one_out
    assert not os.path.exists(tmp_path / "two" / "r.items")            # partial files go once the JSON is written


def test_global_batch_is_dealt_out_in_one_process_order():
    args = train.parse_args(["--dataset", "comvg", "--batch-size", "3", "--grad-accum", "2"])
    one = train.parse_args(["--dataset", "comvg", "--batch-size", "6", "--grad-accum", "2"])
    for step in range(4):
        for micro in range(2):
            two = [i for rank in range(2) for i in train.batch_indices(step, micro, args, 10, rank, 2)]
            assert two == train.batch_indices(step, micro, one, 10)


def test_two_process_training_matches_one_and_resumes_under_the_launcher(tmp_path, tiny_sd):
    """Global batch 4: two processes x 2 items (stopped after 2 steps, resumed to 3 under the launcher) against one
    process x 4 items: the same trained tensors to DELTA_TOL."""
    root = write_train_comvg(str(tmp_path / "comvg"), n=12)
    common = ["--dataset", "comvg", "--data-root", root, "--model", tiny_sd, "--shots", "8", "--lr", "0.05",
              "--device", "cpu", "--no-zero-shot", "--eval-limit", "1", "--compare", "", "--save-every", "1"]
    train.main(common + ["--batch-size", "4", "--steps", "3", "--output-dir", str(tmp_path / "one")])
    two = ["--batch-size", "2", "--output-dir", str(tmp_path / "two")]
    launch("train.py", *common, *two, "--steps", "2")
    ck = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 2 and ck["args"]["processes"] == 2
    r = launch("train.py", *common, *two, "--steps", "3", "--resume")
    assert "resumed from" in r.stdout and r.stdout.count("Compositional Visual Genome: accuracy") == 1
    a, b = (load_file(tmp_path / d / "prompt_deltas.safetensors") for d in ("one", "two"))
    assert a.keys() == b.keys() and any(a[k].abs().max() > 1e-3 for k in a)
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a])
    rel = (diff.norm() / torch.cat([a[k].flatten() for k in a]).norm()).item()
    print(f"two processes - one process, over the trained tensors: max {diff.abs().max():.3g}, relative L2 {rel:.3g}")
    assert diff.abs().max() <= DELTA_TOL and rel <= DELTA_REL_TOL
    one, two = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False)["history"] for d in ("one", "two"))
    assert [h["loss"] for h in two] == pytest.approx([h["loss"] for h in one], rel=1e-5)   # global-batch losses
