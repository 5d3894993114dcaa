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
    tree = ast.parse(path.read_text())
    # imports for annotations only (`if TYPE_CHECKING:`) are not run: they make no cycle
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
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
    assert graph["orchestration.run.runner"] >= {"orchestration.search.plan", "orchestration.run.tuner"}    # the graph is real
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
    """Private Ray and MLflow modules are reached from orchestration/run/private.py alone."""
    private = re.compile(r"^(ray|mlflow)(\..*)?\._")
    for name, path in _modules().items():
        if name == "orchestration.run.private":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                assert not private.match(n), f"{name} imports the private {n}: go through orchestration.run.private"


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


def test_orchestration_top_level_holds_entry_scripts_and_the_base():
    """`orchestration/` is subpackages by job (search, run, tracking, cluster, cost, report); at its top level
    only the command lines and the base every subpackage imports (`common`, the trial schema `trial`)."""
    base = {"__init__", "common", "trial"}
    stray = [p.name for p in (ROOT / "orchestration").glob("*.py")
             if p.stem not in base and 'if __name__ == "__main__"' not in p.read_text()]
    assert stray == [], f"library modules at orchestration/'s top level: move them into a subpackage: {stray}"
    packages = {p.parent.name for p in (ROOT / "orchestration").glob("*/__init__.py")}
    assert packages == {"search", "run", "tracking", "cluster", "cost", "report"}


def test_no_module_over_400_lines():
    """One job per module: a module past 400 lines has a seam to split along."""
    files = [p for pkg in ("orchestration", "wsml") for p in (ROOT / pkg).rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def _foreign_private_names(cls) -> set[str]:
    """Private attribute names that Ray, MLflow and Optuna classes among `cls`'s bases define or set."""
    import inspect

    names: set[str] = set()
    for base in cls.__mro__[1:]:
        if base.__module__.split(".")[0] not in ("ray", "mlflow", "optuna"):
            continue
        names |= {n for n in vars(base) if n.startswith("_") and not n.startswith("__")}
        try:
            source = inspect.getsource(base)
        except (OSError, TypeError):
            continue
        names |= set(re.findall(r"self\.(_[a-zA-Z]\w*)", source))
    return names


def test_private_attributes_only_behind_one_module():
    """Ray's (and MLflow's, Optuna's) private attributes are touched in orchestration/run/private.py alone:
    no `obj.__dict__` of another object, and no class of ours that subclasses theirs reads or sets one
    of their private attributes through `self` (as `self._metric = ...` on a TrialScheduler did)."""
    import inspect

    for name, path in _modules().items():
        if name == "orchestration.run.private":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "__dict__":
                assert isinstance(node.value, ast.Name) and node.value.id == "self", \
                    f"{name}:{node.lineno} reads another object's __dict__: go through orchestration.run.private"
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != name:
                continue
            foreign = _foreign_private_names(cls)
            if not foreign:
                continue
            cls_node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
            used = {n.attr for n in ast.walk(cls_node) if isinstance(n, ast.Attribute)
                    and isinstance(n.value, (ast.Name, ast.Call)) and n.attr.startswith("_")
                    and not n.attr.startswith("__")
                    and (getattr(n.value, "id", None) == "self" or isinstance(n.value, ast.Call))}
            own = {n.name for n in cls_node.body if isinstance(n, (ast.FunctionDef, ast.Assign))
                   and getattr(n, "name", None)}
            bad = (used & foreign) - own
            assert not bad, f"{name}.{cls.__name__} touches {sorted(bad)} of a Ray/MLflow/Optuna base class"
