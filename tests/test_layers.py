"""The package's layers: modules import only downward (no cycle, function-level imports
included), and the compute layer imports neither transformers nor PEFT."""
import ast
import subprocess
import sys
from pathlib import Path

import ptuning_fast

PACKAGE = Path(ptuning_fast.__file__).resolve().parent
COMPUTE = ("ptuning_fast.reference", "ptuning_fast.kernels", "ptuning_fast.ops")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set:
    """Every ptuning_fast module ``path`` imports, at any depth of the file (functions too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("ptuning_fast")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("ptuning_fast"):
                found.add(target)
                found |= {f"{target}.{alias.name}" for alias in node.names}
    return found


def graph() -> dict:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = {t for t in imports_of(path) if t in modules and t != name}
        # importing a.b also runs a/__init__.py: a package's own __init__ is not a dependency of its modules
        edges[name] = {t for t in targets if not name.startswith(t + ".")}
    return edges


def test_no_import_cycle():
    edges = graph()
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_compute_layer_imports_only_the_compute_layer_and_the_base():
    base = ("ptuning_fast._validation", "ptuning_fast._extension", "ptuning_fast.backend", "ptuning_fast._deprecation",
            "ptuning_fast._timing")
    for name, targets in graph().items():
        if name.startswith(COMPUTE):
            upward = sorted(t for t in targets if not t.startswith(COMPUTE + base) and t != "ptuning_fast")
            assert not upward, f"{name} imports {upward}"


def test_the_compute_layer_imports_without_transformers_and_peft():
    code = ("import sys, ptuning_fast, ptuning_fast.ops, ptuning_fast.reference, ptuning_fast.kernels; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft')); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
