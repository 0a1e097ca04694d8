"""Every command in README.md and docs/*.md runs as written: each `python ...` line of a bash block (joined across
trailing backslashes; `accelerate launch [its options]` stripped) names a script or module of ours that exists, and
that CLI's own argument parser (its `parse_args`, else `build_parser().parse_args`, with the checks that follow it)
accepts the arguments. Nothing runs: no model is loaded, no data read. A command for a GPU (`--device cuda`) is
checked as on a machine with one."""
import glob
import importlib
import os
import re
import shlex

import pytest
import torch

from common import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
NOT_OURS = {"pip", "pytest"}  # `python -m pip ...`, `python -m pytest -q`: the set-up, not a CLI of this project


def bash_commands(text):
    """[(line number, command)] of the lines starting with `python` or `accelerate launch` inside ```bash blocks,
    continuation lines (a trailing backslash) joined."""
    out, block, pending = [], False, None
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            block = line.strip() in ("```bash", "```sh") if not block else False
            continue
        if not block:
            continue
        if pending is not None:
            pending = (pending[0], pending[1] + " " + line.strip())
        elif re.match(r"(python|accelerate launch)\b", line):
            pending = (n, line.strip())
        else:
            continue
        if pending[1].endswith("\\"):
            pending = (pending[0], pending[1][:-1].rstrip())
        else:
            out.append(pending)
            pending = None
    return out


def target(argv):
    """(module name, its arguments) of a command's argv; `accelerate launch --opt value ... script.py` -> script's;
    None for a module that is not ours (pip, pytest)."""
    if argv[:2] == ["accelerate", "launch"]:
        rest = argv[2:]
        i = next((k for k, a in enumerate(rest) if a.endswith(".py") or a == "-m"), None)
        if i is None:
            raise AssertionError("accelerate launch without a script")
        argv = ["python"] + rest[i:]
    if argv[0] != "python":
        raise AssertionError(f"not a python command: {argv[0]}")
    if argv[1] == "-m":
        if argv[2].split(".")[0] in NOT_OURS:
            return None
        name, args = argv[2], argv[3:]
        path = os.path.join(ROOT, *name.split(".")) + ".py"
    else:
        name, args = argv[1][:-3].replace("/", "."), argv[2:]
        path = os.path.join(ROOT, argv[1])
    if not os.path.isfile(path):
        raise AssertionError(f"{path} does not exist")
    return name, args


def check(command):
    """Raise AssertionError unless `command` names one of our CLIs and its parser accepts the arguments."""
    t = target(shlex.split(command, comments=True))
    if t is None:
        return
    name, args = t
    module = importlib.import_module(name)
    parse = getattr(module, "parse_args", None) or module.build_parser().parse_args
    try:
        parse(args)
    except InputError as e:
        raise AssertionError(f"{name} refuses {shlex.join(args)}: {e}") from None
    except SystemExit as e:  # --help, or a parser that is not cli.ArgumentParser
        raise AssertionError(f"{name} exited {e.code} on {shlex.join(args)}") from None


def test_the_pages_have_commands():
    commands = {p: bash_commands(open(os.path.join(ROOT, p)).read()) for p in PAGES}
    assert len(commands["README.md"]) >= 10 and sum(map(len, commands.values())) >= 40
    assert any(c == "python train.py --dataset shapes" for _, c in commands["README.md"]
               for c in [re.sub(r"\s+#.*", "", c)])
    assert any(c == "python -m pytest -q" for _, c in commands["README.md"])


@pytest.mark.parametrize("page", PAGES)
def test_every_command_runs_as_written(page, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # `--device cuda` commands are for a GPU machine
    failures = []
    for n, command in bash_commands(open(os.path.join(ROOT, page)).read()):
        try:
            check(command)
        except AssertionError as e:
            failures.append(f"{page}:{n}: {command}\n    {e}")
    assert not failures, "\n".join(failures)


def test_the_checker_catches_wrong_commands(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check("python train.py --dataset shapes --lam 1 --compare ''  # a comment")
    check("accelerate launch --multi_gpu --num_processes 2 evaluate.py --dataset shapes --device cpu")
    check("python -m tools.download comvg --data-root data")
    check("python -m pytest -q")
    wrong = ["python train.py --dataset shapes --no-such-flag",             # unknown flag
             "python train.py --dataset shapes --method clip_vit",            # bad choice
             "python train.py --lam 1",                                       # a required option missing
             "python train.py --dataset shapes --lam nan",                    # a bad value
             "python evaluate.py --pooling median",
             "python -m tools.ablations --dataset imagenet",
             "python -m tools.download imagenet",                             # refused after parsing
             "python -m tools.figures attention --no-such-flag",
             "python -m tools.shapes --n 5",                                  # --out is required
             "python benchmark.py --preset small",                            # the old path: moved to tools/
             "python -m tools.nothing",
             "accelerate launch --num_processes 2 train.py --dataset shapes --batch-size 0"]
    for command in wrong:
        with pytest.raises(AssertionError):
            check(command)


def test_bash_blocks_are_read_with_their_continuations():
    text = ("x\n```bash\npython a.py --x 1 \\\n    --y 2   # note\nls\npython b.py\n```\n"
            "python outside.py\n```python\npython_api()\n```\n")
    assert bash_commands(text) == [(3, "python a.py --x 1 --y 2   # note"), (6, "python b.py")]


def test_the_readme_reads_in_order_within_its_first_80_lines():
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    head = "\n".join(lines[:80])
    at = {s: head.find(s) for s in ("torch==2.13.0", "pip install -r requirements.txt", "python -m pytest -q",
                                    "python train.py --dataset shapes", "| Discffusion few-shot",
                                    "## Reading the code beside the paper")}
    assert all(v >= 0 for v in at.values()), [s for s, v in at.items() if v < 0]
    assert list(at.values()) == sorted(at.values()), at      # the CPU note before the install command, and so on
    reading = head[at["## Reading the code beside the paper"]:]
    order = [reading.find(f"`{f}`") for f in ("discffusion.py", "attention_capture.py", "lse_pool.py",
                                              "prompt_delta.py", "triplet_loss.py", "train.py", "evaluate.py")]
    assert min(order) >= 0 and order == sorted(order), order
    assert all(f"`{f}`" in reading.split("\n\n", 2)[2] for f in ("discffusion.py", "lse_pool.py", "prompt_delta.py",
                                                                 "triplet_loss.py", "evaluate.py"))  # the map


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_and_image_resolves(page):
    text = open(os.path.join(ROOT, page)).read()
    links = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]
    missing = [t for t in links if t and not os.path.exists(os.path.join(ROOT, os.path.dirname(page), t))]
    assert not missing, f"{page}: {missing}"
