"""How the code is laid out: every module imports, no import cycle, dependencies point one way."""
from __future__ import annotations

import ast
import graphlib
import importlib
import pkgutil
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("wsml", "orchestration")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules that `name` imports anywhere in its file (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.rsplit(".", node.level)[0] if path.name != "__init__.py" or node.level > 1 else name
                base = f"{pkg}.{base}" if base else pkg
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:     # `from pkg import module` names the module; `import a.b.c` the deepest
                t = t.rpartition(".")[0]
            if t and t != name and t not in PACKAGES:
                found.add(t)
    return found


def test_every_module_imports():
    for name in _modules():
        importlib.import_module(name)


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(path, name, set(modules)) for name, path in modules.items()}
    assert graph["orchestration.sweep"] >= {"orchestration.space", "orchestration.tuner"}   # the graph is real
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")
    assert order.index("orchestration.common") < order.index("orchestration.sweep")


def test_the_trainer_never_imports_ray_or_mlflow():
    for name, path in _modules().items():
        if not name.startswith("wsml"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                assert n.split(".")[0] not in ("ray", "mlflow", "orchestration"), f"{name} imports {n}"


def test_private_apis_only_behind_one_module():
    """Private Ray and MLflow modules are reached from orchestration/private.py alone."""
    private = re.compile(r"^(ray|mlflow)(\..*)?\._")
    for name, path in _modules().items():
        if name == "orchestration.private":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                assert not private.match(n), f"{name} imports the private {n}: go through orchestration.private"


def test_no_reference_to_notes_outside_the_project():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"DESIGN\.md|DESIGN section|NOTES\.md|\.\./shared")
    hits = [f for f in files if not f.startswith("tests/") and (ROOT / f).is_file()
            and pattern.search((ROOT / f).read_text(errors="replace"))]
    assert hits == []


def test_scripts_do_not_edit_sys_path():
    """The project is installed (`pip install -e .`): scripts import it without path tricks."""
    files = [p for pkg in ("orchestration", "bench", "wsml") for p in (ROOT / pkg).rglob("*.py")]
    assert [str(p.relative_to(ROOT)) for p in files if "sys.path.insert" in p.read_text()] == []


def test_modules_are_importable_as_installed():
    """`python orchestration/sweep.py` works from any folder: the packages come from the install."""
    import orchestration
    import wsml

    assert Path(orchestration.__file__).parent.parent == Path(wsml.__file__).parent.parent
    assert any(m.name == "sweep" for m in pkgutil.iter_modules(orchestration.__path__))
