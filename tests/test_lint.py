"""The project's tools agree with its code: ruff clean, the declared dependencies match the pins, and the
command lines are installed as console scripts."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_ruff_is_clean():
    out = subprocess.run([str(BIN / "ruff"), "check", "--output-format", "concise", "wsml", "orchestration"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]


def test_declared_dependencies_are_the_pinned_ones():
    """pyproject.toml's dependencies (what the code imports) and requirements.txt (what setup.sh installs)
    name the same packages at the same versions."""
    def specs(lines):
        out = {}
        for ln in lines:
            ln = ln.split("#")[0].strip()
            if ln:
                name = re.match(r"[A-Za-z0-9_.-]+", ln).group(0).lower()
                out[name] = re.sub(r"^[A-Za-z0-9_.-]+(\[[^\]]*\])?", "", ln)
        return out

    project = _pyproject()["project"]
    declared = specs(project["dependencies"] + project["optional-dependencies"]["test"])
    pinned = specs((ROOT / "requirements.txt").read_text().splitlines())
    assert declared == pinned


def test_command_lines_are_console_scripts():
    """Each console script is installed in the venv and answers --help with its usage line."""
    scripts = _pyproject()["project"]["scripts"]
    assert {"wsml-sweep", "wsml-aggregate", "wsml-train"} <= set(scripts)
    for name, target in scripts.items():
        module, func = target.split(":")
        path = ROOT / (module.replace(".", "/") + ".py")
        assert f"def {func}(" in path.read_text(), f"{name}: {target} is not a function of {path.name}"
        assert (BIN / name).is_file(), f"{name} is not installed: rerun bash scripts/setup.sh"
    out = subprocess.run([str(BIN / "wsml-aggregate"), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage:")


def test_mypy_is_clean():
    """mypy, as pyproject.toml's [tool.mypy] configures it (wsml/ and orchestration/), finds no error."""
    out = subprocess.run([str(BIN / "mypy")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]
