"""tools/runs.py: evaluate.py's rows for the shapes world come in train.py's (and the README's) order."""
from types import SimpleNamespace

from tools import runs


def test_shapes_rows_in_train_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                  # no runs/shapes here: no few-shot row
    args = SimpleNamespace(methods=None, checkpoint=None)
    assert [r[0] for r in runs.default_runs(args, ["shapes"])] == ["discffusion zero-shot", "diffusion_itm zero-shot"]
    deltas = tmp_path / "runs" / "shapes" / "prompt_deltas.safetensors"
    deltas.parent.mkdir(parents=True)
    deltas.write_bytes(b"")
    rows = runs.default_runs(args, ["shapes"])
    assert [r[0] for r in rows] == ["discffusion zero-shot", "discffusion few-shot", "diffusion_itm zero-shot"]
    assert rows[1][2] == runs.SHAPES_RUN + "/prompt_deltas.safetensors"
