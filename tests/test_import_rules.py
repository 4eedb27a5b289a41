"""The layering of ARCHITECTURE.md, enforced by walking every import with ast."""

import ast
import sys
from pathlib import Path

import longctx

PACKAGE = Path(longctx.__file__).parent

# Which longctx subpackages each subpackage may import (besides itself).
ALLOWED = {
    "ops": set(),
    "cache": {"ops"},
    "layers": {"ops", "cache"},
    "model": {"ops", "cache", "layers", "data"},  # data: the tokenizers that model files carry (GGUF)
    "data": set(),
    "generation": {"ops", "cache", "layers", "model", "data"},
    "eval": {"ops", "cache", "layers", "model", "data", "generation"},
    "train": {"ops", "cache", "layers", "model", "data", "generation", "eval", "distributed", "configs"},
    "distributed": {"ops", "cache", "layers", "model"},
    "configs": set(),
    "serve": {"ops", "cache", "layers", "model", "data", "generation"},
}
# Top-level modules every layer may import: they import nothing from longctx.
SHARED = {"validation"}


def _imports(path: Path):
    """(longctx subpackage or None, top-level module name) for every import in a file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom):
            continue  # relative imports stay inside their own subpackage
        else:
            continue
        for name in names:
            parts = name.split(".")
            yield (parts[1] if parts[0] == "longctx" and len(parts) > 1 else None), parts[0]


def test_subpackages_import_only_what_their_layer_allows():
    problems = []
    for sub in sorted(p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        if sub.name == "cli":
            continue  # cli wires everything
        assert sub.name in ALLOWED, f"new subpackage {sub.name}: add its layer to ALLOWED"
        for file in sub.rglob("*.py"):
            for target, top in _imports(file):
                if top == "longctx" and target not in (None, sub.name, *SHARED) and target not in ALLOWED[sub.name]:
                    problems.append(f"{file.relative_to(PACKAGE)} imports longctx.{target}")
    assert not problems, "\n".join(problems)


# The exceptions: the CPU kernels (selective scan, Mamba decode step, quantized matvecs, attention-block decode step) are
# compiled with numba (which brings numpy and llvmlite).
OPS_EXTRA = {"numba_math.py": {"numba", "numpy", "llvmlite"}, "kernels.py": {"numba", "numpy"},
             "autograd.py": {"numba", "numpy"}, "mamba_decode.py": {"numpy"},
             "quantized_kernels.py": {"numba", "numpy"}, "decode_kernels.py": {"numba", "numpy"}}


def test_shared_modules_import_nothing_from_longctx():
    for name in SHARED:
        assert all(top != "longctx" for _, top in _imports(PACKAGE / f"{name}.py")), f"longctx.{name} imports longctx"


def test_ops_import_torch_only():
    for file in (PACKAGE / "ops").rglob("*.py"):
        allowed = {"torch"} | OPS_EXTRA.get(file.name, set())
        for target, top in _imports(file):
            third_party = top not in sys.stdlib_module_names and top not in ("longctx", "__future__")
            assert not third_party or top in allowed, f"{file.name} imports {top}"
            assert top != "longctx" or target in ("ops", *SHARED), f"{file.name} imports longctx.{target}"


def _module_graph() -> dict[str, set[str]]:
    """longctx module -> the longctx modules it imports (at any depth in the file)."""
    files = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    graph = {}
    for name, file in files.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                deps.add(base)
                deps.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_import_cycles():
    """No module imports, directly or through others, a module that imports it."""
    graph = _module_graph()
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
