"""Every command of tools/ (a module with a `__main__` block) prints its usage for --help, exit 0, and nothing on
stderr (no library notice first); the run machinery modules, which have no command, are the ones the README lists
as such. One subprocess for all of them (a fresh interpreter, so import-time notices show)."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "tools")) if f.endswith(".py") and f != "__init__.py")
COMMANDS = [t for t in TOOLS if '__name__ == "__main__"' in open(os.path.join(ROOT, "tools", t + ".py")).read()]

SCRIPT = """
import contextlib, io, runpy, sys, warnings
warnings.filterwarnings("ignore", message=".*found in sys.modules")  # runpy: one process runs every module
for name in sys.argv[1:]:
    out = io.StringIO()
    sys.argv = ["python -m tools." + name, "--help"]
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module("tools." + name, run_name="__main__", alter_sys=True)
            code = None
        except SystemExit as e:
            code = e.code
    print(name, code, out.getvalue().startswith("usage: python -m tools." + name + " "), len(out.getvalue()))
"""


def test_every_tool_command_prints_its_usage_and_no_notice():
    assert "sd_configs" in COMMANDS and "generation" in COMMANDS and "distill_lcm" in COMMANDS
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, *COMMANDS], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stderr == "", out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == COMMANDS
    for line in lines:
        name, code, usage, size = line.split()
        assert code in ("0", "None") and usage == "True" and int(size) > 200, line


def test_the_readme_names_the_tools_without_a_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    row = next(ln for ln in readme.splitlines() if "`tools/cli.py`" in ln)
    listed = set(re.findall(r"`(?:tools/)?(\w+)\.py`", row)) & set(TOOLS)
    assert listed == set(TOOLS) - set(COMMANDS), listed


def test_tools_write_under_runs_by_default():
    """No tool overwrites a committed file (docs/, models/) unless told to: every output default is under runs/."""
    import importlib
    parsed = {}
    for name in ("ablations", "benchmark", "figures"):
        parsed[name] = importlib.import_module(f"tools.{name}").parse_args([])
    for name in ("distill_lcm", "embedding_retrieval", "failures", "generation", "pretrain_shapes"):
        parsed[name] = importlib.import_module(f"tools.{name}").build_parser().parse_args([])
    seen = 0
    for name, args in parsed.items():
        for key in ("out", "output", "grid", "runs"):
            value = getattr(args, key, None)
            if value:
                seen += 1
                assert os.path.normpath(value).split(os.sep)[0] == "runs", (name, key, value)
    assert seen >= 10
