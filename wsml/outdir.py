"""The `--out` folder of `python -m wsml.train`: what it may hold and what a rerun does with it.

A run keeps three files there: `checkpoint.pt` (replaced after every epoch),
`checkpoint.pt.sha256` and `metrics.json` (written at the end). The folder may
be new or empty (the run starts), or hold those files of this same run: the
same settings apart from `RESUME_FREE` ones (device, workers, where the data
lives, epochs, ...). Then the run continues after the checkpoint's epoch, or,
when `metrics.json` says it already trained all its epochs (or stopped early),
prints that result and trains nothing. Anything else is refused before any
data is read, since writing there would replace another run's results: a
checkpoint or metrics.json of other settings, a metrics.json this trainer did
not write, any other file or folder.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsml.checkpoint import load_checkpoint
from wsml.config import TrainConfig, resume_mismatch
from wsml.errors import WSMLError

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
OWN_FILES = (CHECKPOINT, CHECKPOINT + ".sha256", METRICS)
# temporary files of an atomic write cut short (SIGKILL, power loss): ours, removed
_LEFTOVER = re.compile(r"\.(checkpoint\.pt(\.sha256)?|metrics\.json)\.[A-Za-z0-9_]+\.tmp")   # wsml.files.atomic_write's


@dataclass
class OutFolder:
    resume: dict[str, Any] | None = None     # the checkpoint's state to continue from
    finished: dict[str, Any] | None = None   # metrics.json of this run when it has nothing left to train
    notes: list[str] = field(default_factory=list)


def inspect_out(out: Path, cfg: TrainConfig, accept_unverified: bool = False) -> OutFolder:
    """What `out` holds for a run of `cfg`; WSMLError when it must not be written to."""
    found = OutFolder()
    if not out.is_dir():
        return found
    entries = sorted(out.iterdir())
    foreign = [p.name + ("/" if p.is_dir() else "") for p in entries
               if not (p.name in OWN_FILES and p.is_file()) and not _LEFTOVER.fullmatch(p.name)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise WSMLError(f"--out {out} holds files this trainer did not write ({shown}): pass a new or empty "
                        f"folder (a run keeps only {', '.join(OWN_FILES)} there), or delete them")
    now = cfg.to_dict()
    metrics = _read_metrics(out / METRICS)
    if metrics is not None:
        mismatch = resume_mismatch(metrics["config"], now)
        if mismatch:
            raise WSMLError(f"--out {out} holds the results of another run (its {METRICS} has {mismatch}): "
                            f"pass another --out, or delete {out} to replace them")
    trained = len(metrics["history"]) if metrics else 0
    if (out / CHECKPOINT).is_file():
        state = load_checkpoint(out / CHECKPOINT, accept_unverified=accept_unverified)
        if not (out / (CHECKPOINT + ".sha256")).is_file():
            found.notes.append(f"note: resuming from {out / CHECKPOINT} unverified (--accept-unverified-checkpoint)")
        mismatch = resume_mismatch(state.get("config", {}), now)
        if mismatch:
            raise WSMLError(f"--out {out} holds a checkpoint of another run (made with {mismatch}): "
                            f"pass another --out, or delete {out} to start over")
        found.resume = state
        trained = max(trained, int(state["epoch"]))
    if cfg.epochs is None:
        raise ValueError("inspect_out: resolve() the configuration first (epochs is unset)")
    if trained > cfg.epochs:
        raise WSMLError(f"--out {out} holds a run already trained for {trained} epochs, more than --epochs "
                        f"{cfg.epochs}: pass --epochs {trained} or more, or another --out")
    if metrics is not None and trained == len(metrics["history"]):
        history = metrics["history"]
        if len(history) == cfg.epochs or (history and history[-1].get("stop")):
            found.finished = metrics
    if metrics is not None and found.resume is None and found.finished is None:
        found.notes.append(f"note: {out} has no {CHECKPOINT} to continue its {len(metrics['history'])} epoch(s) "
                           f"from: training from epoch 1, {METRICS} will be replaced")
    for p in entries:
        if _LEFTOVER.fullmatch(p.name):
            p.unlink(missing_ok=True)
    return found


def _read_metrics(path: Path) -> dict[str, Any] | None:
    """metrics.json as this trainer writes it, None when absent; WSMLError when it is something else."""
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
        ok = (isinstance(metrics, dict) and isinstance(metrics.get("config"), dict)
              and isinstance(metrics.get("history"), list) and "test_map" in metrics
              and all(isinstance(h, dict) for h in metrics["history"]))
        why = "no config, history and test_map"
    except (ValueError, UnicodeDecodeError) as err:
        ok, why = False, f"not valid JSON: {err}"
    if not ok:
        raise WSMLError(f"--out {path.parent} holds a {path.name} that python -m wsml.train did not write ({why}): "
                        f"pass another --out, or delete {path}")
    return metrics
