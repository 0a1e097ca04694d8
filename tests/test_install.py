"""The project installs as a package (pyproject.toml, `pip install -e .`): every top-level module and package of ours
is declared, the requirements are declared once (requirements.txt, read by pyproject), and the API and the README's
API example work from another folder with the repository only on the import path, as an installed package has it."""
import os
import re
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_every_module_and_package_is_declared():
    setup = pyproject()["tool"]["setuptools"]
    top = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    packages = {d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py")) and d != "tests"}
    assert set(setup["py-modules"]) == top
    assert set(setup["packages"]) == packages


def test_requirements_are_declared_once():
    project = pyproject()["project"]
    assert "dependencies" not in project and project["dynamic"] == ["dependencies"]
    assert pyproject()["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    names = [re.split(r"[<>=!~ ;\[]", line)[0].lower() for line in open(os.path.join(ROOT, "requirements.txt"))
             if line.strip() and not line.startswith("#")]
    assert "torch" in names and "diffusers" in names and len(names) == len(set(names))
    assert sys.version_info >= tuple(int(v) for v in project["requires-python"].lstrip(">=").split("."))


def readme_api_example():
    """The README's python block that loads the shapes model and its trained deltas."""
    blocks = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(), re.S)
    return next(b for b in blocks if "load_trained" in b)


def test_readme_api_example_runs_from_another_folder(tmp_path):
    """In a fresh folder (deltas written where the example reads them, after a train.py run): the example loads the
    tiny model at lambda 100 and the deltas, and scores; the deltas change the scores; nothing else is written there."""
    script = f"""
import os, torch
from PIL import Image
torch.set_num_threads(1)
from discffusion import Discffusion
from methods import TINY_MODEL
m = Discffusion.from_pretrained(TINY_MODEL, device="cpu", lam=100)
with torch.no_grad():
    for p in m.add_trainable():
        p.normal_(std=0.05)
m.save_trained("runs/shapes/prompt_deltas.safetensors")
images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
texts = ["a red circle", "a blue square"]
trained = m.score(images, texts)
{readme_api_example()}
assert model.config["lam"] == 100.0, model.config
assert torch.equal(scores, trained), (scores, trained)
assert not torch.equal(scores, Discffusion.from_pretrained(TINY_MODEL, device="cpu", lam=100).score(images, texts))
print("ok", sorted(os.listdir(".")))
"""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "ok ['runs']"
