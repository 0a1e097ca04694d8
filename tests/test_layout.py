"""The project's shape: the top level holds the paper's files (the design card's eight, plus common.py and methods.py),
the data sets sit in benchmarks/, the model families in families/, the tooling in tools/ and the baselines in
baselines/; imports among all these
modules run one way (no circle of any length, across the folders too), the paper's library files never reach tools/,
and no module of ours is imported inside a function (lazy imports are for heavy optional dependencies, not for
dodging a circle)."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("tools", "baselines", "benchmarks", "families")
TOP = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
MODULES = TOP + list(PACKAGES) + sorted(f"{d}.{f[:-3]}" for d in PACKAGES for f in os.listdir(os.path.join(ROOT, d))
                                       if f.endswith(".py") and f != "__init__.py")


def source(name):
    """The file of a dotted module name: tools.shapes -> tools/shapes.py, tools -> tools/__init__.py."""
    path = os.path.join(ROOT, *name.split("."))
    return open(os.path.join(path, "__init__.py") if name in PACKAGES else path + ".py").read()


def resolve(name, modules):
    """The module of ours a dotted import path names (its longest prefix that is one of ours), or None."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in modules:
            return ".".join(parts[:k])
    return None


def imports(name, modules=MODULES, text=None):
    """{module of ours: is it imported at the top level?} for one module (`from tools import shapes` is tools.shapes;
    a relative import resolves against the module's package)."""
    tree = ast.parse(text if text is not None else source(name))
    top = set(map(id, tree.body))
    package = name if name in PACKAGES else name.rpartition(".")[0]
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - (node.level - 1)] if package else []
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" if base else a.name for a in node.names]
        else:
            continue
        for t in targets:
            m = resolve(t, modules)
            if m and m != name:
                out[m] = out.get(m, False) or id(node) in top
    return out


def find_cycle(graph):
    """One import circle as [a, b, ..., a], or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = "done"
        stack.pop()
        return None
    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circle_and_no_lazy_import_of_our_modules():
    graph = {m: imports(m) for m in MODULES}
    cycle = find_cycle({m: set(d) for m, d in graph.items()})
    assert cycle is None, "import circle: " + " -> ".join(cycle)
    lazy = [f"{m} imports {d} inside a function" for m, deps in graph.items() for d, top in deps.items() if not top]
    assert not lazy, lazy


def test_the_cycle_finder_finds_circles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_resolve_across_the_folders():
    mods = ["common", "train", "tools", "tools.shapes", "tools.sd_configs", "baselines", "baselines.diffusion_itm"]
    text = ("import common\nfrom tools import shapes\nfrom tools.sd_configs import make_random_sd\n"
            "from . import sd_configs\nimport torch\ndef f():\n    from baselines.diffusion_itm import hardneg_loss\n")
    assert imports("tools.figures", mods, text) == {"common": True, "tools.shapes": True, "tools.sd_configs": True,
                                                    "baselines.diffusion_itm": False}
    # a circle through a folder: datasets -> tools.shapes -> datasets
    graph = {"datasets": set(imports("datasets", ["datasets", "tools", "tools.shapes"], "from tools import shapes")),
             "tools.shapes": set(imports("tools.shapes", ["datasets", "tools", "tools.shapes"], "import datasets")),
             "tools": set()}
    assert find_cycle(graph) == ["datasets", "tools.shapes", "datasets"]


def test_the_top_level_is_the_paper_and_the_rest_is_one_folder_down():
    # the design card's files (the paper) and the two the paper's files and both scripts share; the rest in folders
    paper = {"attention_capture", "lse_pool", "prompt_delta", "triplet_loss", "datasets", "train", "evaluate",
             "discffusion"}
    assert set(TOP) <= paper | {"common", "methods"}, f"top-level files beyond the paper's: {sorted(set(TOP) - paper)}"
    for d in PACKAGES:
        doc = ast.get_docstring(ast.parse(source(d)))
        assert doc, f"{d}/__init__.py has no docstring saying what is there"
    # every command in tools/ is named in the package's docstring as it is run
    doc = " ".join(ast.get_docstring(ast.parse(source("tools"))).split())
    clis = [m for m in MODULES if m.startswith("tools.") and re.search(r'^if __name__ == "__main__":', source(m), re.M)]
    assert len(clis) >= 6
    missing = [m for m in clis if f"python -m {m}" not in doc]
    assert not missing, f"tools/__init__.py does not say how to run {missing}"


def test_the_paper_files_never_reach_the_tooling():
    """datasets.py, discffusion.py and the method's files import nothing of tools/, not even through another module."""
    graph = {m: set(imports(m)) for m in MODULES}
    for start in ("datasets", "discffusion", "attention_capture", "lse_pool", "prompt_delta", "triplet_loss"):
        seen, todo = set(), [start]
        while todo:
            for d in graph[todo.pop()] - seen:
                seen.add(d)
                todo.append(d)
        assert not {d for d in seen if d == "tools" or d.startswith("tools.")}, f"{start} reaches {sorted(seen)}"
