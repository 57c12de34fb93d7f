"""The package's architecture, checked on its source: a few rooms named by job, imports
that only run one way, and weights code that the models never import."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vim_jax"
KERNELS = ROOT / "kernels"  # installed as vim_jax.kernels
ROOMS = {"data", "kernels", "mixers", "models", "parallel", "train", "weights"}
COMMANDS = {"convert.py", "export.py", "launch.py", "predict.py"}  # python -m vim_jax.<name>


def _modules() -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for vim_jax and its installed kernels."""
    out = {}
    for base, prefix in ((PACKAGE, "vim_jax"), (KERNELS, "vim_jax.kernels")):
        for f in base.rglob("*.py"):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = f
    return out


def _imports(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """Module -> the vim_jax modules it imports, at any depth of its code (an import inside a
    function counts as much as one at the top)."""
    graph = {}
    for name, f in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module in modules:
                    deps.add(node.module)
                # "from package import module" imports the module
                deps |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
        graph[name] = deps - {name}
    return graph


def _reach(graph, start) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for d in graph[todo.pop()]:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_the_top_level_is_a_few_rooms_and_the_commands():
    entries = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__" and not p.name.endswith(".egg-info")}
    assert entries == (ROOMS - {"kernels"}) | COMMANDS | {"__init__.py"}, sorted(entries)


def test_no_import_runs_back_to_a_module_that_imports_it():
    graph = _imports(_modules())
    loops = sorted(m for m in graph if m in _reach(graph, m))
    assert not loops, f"modules that import themselves through others: {loops}"


def test_weights_flow_one_way():
    """Building an architecture never imports the weights code, the training code or the
    data pipeline; the mixers and kernels import no model; the parallel package nothing."""
    graph = _imports(_modules())
    below = {"vim_jax.models": ("vim_jax.weights", "vim_jax.train", "vim_jax.data", "vim_jax.export",
                                "vim_jax.predict", "vim_jax.convert"),
             "vim_jax.mixers": ("vim_jax.models", "vim_jax.weights", "vim_jax.train"),
             "vim_jax.kernels": ("vim_jax.mixers", "vim_jax.models", "vim_jax.weights", "vim_jax.parallel"),
             "vim_jax.parallel": ("vim_jax.mixers", "vim_jax.models", "vim_jax.weights", "vim_jax.train"),
             "vim_jax.weights": ("vim_jax.train", "vim_jax.data")}
    bad = []
    for room, forbidden in below.items():
        for m in graph:
            if m == room or m.startswith(room + "."):
                bad += [(m, r) for r in sorted(_reach(graph, m)) if r.startswith(forbidden)]
    assert not bad, bad


def test_the_checker_sees_a_loop():
    """The loop finder on a made-up graph: it is not vacuous."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert sorted(m for m in graph if m in _reach(graph, m)) == ["a", "b", "c"]
