"""The one real digits sweep that several test modules read: the demo as `scripts/demo.sh` runs it
(its space file, Ray in-process, default output, MLflow's default store in the working folder), shrunk
to 1 trial per scheme, 2 epochs, 2 final seeds and 200 training mosaics.

Run once per session by the `digits_sweep` fixture (tests/conftest.py); read by tests/test_demo.py
(what a person sees), tests/test_aggregate.py (every table cell against the store) and
tests/test_mlflow_ui.py (the sweep's artifacts).
"""
from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import yaml

from tests.helpers import ROOT, run_cli

FINAL_SEEDS = 2
EPOCHS = 2
NAME = "demo"


def demo_space_path() -> Path:
    """The space file scripts/demo.sh runs (read from the script, not assumed)."""
    words = shlex.split((ROOT / "scripts" / "demo.sh").read_text().splitlines()[-1])
    assert words[:3] == ["exec", ".venv/bin/python", "orchestration/sweep.py"] and words[-1] == "$@"
    return ROOT / words[words.index("--space") + 1]


def shrunk_demo(cwd: Path) -> dict:
    """The shrunk demo in `cwd`, run there unless an earlier call (another xdist worker, under the
    caller's lock) ran it; {"cwd", "out", "err", "space", "groups", "uri"}."""
    done = cwd / "outcome.json"
    if not done.is_file():
        cwd.mkdir(parents=True, exist_ok=True)
        outcome = _run(cwd)
        done.write_text(json.dumps({k: v for k, v in outcome.items() if k != "cwd"}))
        return outcome
    return {**json.loads(done.read_text()), "cwd": cwd}


def _run(cwd: Path) -> dict:
    space = yaml.safe_load(demo_space_path().read_text())
    space["train"]["max_train_images"] = 200
    (cwd / "space.yaml").write_text(yaml.safe_dump(space))
    groups = len(space["search"]["scheme"])
    t0 = time.time()
    r = run_cli(["--dataset", "digits", "--space", "space.yaml", "--name", NAME, "--num-samples", str(groups),
                 "--epochs", str(EPOCHS), "--final-seeds", str(FINAL_SEEDS)], cwd=cwd)
    print(f"shrunk demo took {time.time() - t0:.0f} s, {len(r.stdout.splitlines())} lines")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return {"cwd": cwd, "out": r.stdout, "err": r.stderr, "space": space, "groups": groups,
            "uri": f"sqlite:///{cwd / 'mlflow.db'}"}
