"""The project's shape: imports among its modules run one way (no circle of any length), and no module of ours is
imported inside a function (lazy imports are for heavy optional dependencies, not for dodging a circle)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def imports(name):
    """{module of ours: is it imported at the top level?} for one module."""
    tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
    top = set(map(id, tree.body))
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        else:
            continue
        for n in names:
            if n in MODULES and n != name:
                out[n] = out.get(n, False) or id(node) in top
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
