"""The Ray Tune function trainable: one trial = one `wsml.train.run`.

After every epoch the trainer's complete state is saved with
`wsml.checkpoint.save_checkpoint` into a fresh folder and handed to
`tune.report(metrics, checkpoint=...)`, which persists it to the sweep's
storage. A trial that Tune starts again (a failed trial retried by
`FailureConfig`, a trial of a sweep continued with `--resume`, a trial moved
off a lost node) finds that folder in `tune.get_checkpoint()` and continues
after the saved epoch, bit for bit (the trainer restores RNG states, LL-Cp's
corrected labels and the ROLE estimator). When that checkpoint is unusable
(truncated, checksum mismatch), the trial's earlier checkpoints that Tune
kept beside it (`keep_checkpoints` >= 2) are tried, newest first.

A trial whose training loss becomes NaN or infinite ends at once with its
last metrics and `wsml_error` (the MLflow run is marked FAILED with the
reason); it is not retried, since it would diverge again.

Besides the trainer's metrics each report carries:
  restored_from_epoch  the epoch this attempt resumed after (0 = started fresh)
  train_seconds        wall seconds trained, summed over attempts
  gpu_seconds          train_seconds x GPU fraction when the trial ran on CUDA
  trainer_stop         1.0 when the trainer's own stop rule (stop_drop) fired
  node_id, device      where the attempt ran
"""
from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

STATE_FILE = "state.pt"
META_FILE = "meta.json"

# Config keys that are not TrainConfig fields.
META_KEYS = ("wsml_role", "wsml_sweep", "wsml_source_trial", "point", "train")


def train_config(config: dict[str, Any]):
    """The trial's `TrainConfig` (resolved and validated) from a Tune config dict.

    The config holds the searched values (scheme, mode, delta_rel, lr) at top
    level, the sweep's constants (dataset, epochs, seed, data_root), the fixed
    settings of the space under `train`, and for final runs the chosen
    configuration and seed under `point`.
    """
    from wsml.config import LL_SCHEMES, TrainConfig

    values = {k: v for k, v in config.items() if k not in META_KEYS}
    values.update(config.get("train") or {})
    values.update(config.get("point") or {})
    values.pop("wsml_source_trial", None)
    if values.get("scheme") not in LL_SCHEMES:
        values.pop("delta_rel", None)      # irrelevant for baselines: keep the default
    return TrainConfig.from_dict(values).resolve()


def _fresh_checkpoint_dir() -> Path:
    """A per-process folder in the node's temp dir for the state handed to `tune.report`.

    Tune copies the folder into the sweep's storage before `report` returns.
    A trial stopped inside `report` (ASHA) may not clean up, so folders of
    processes that no longer exist are removed here first.
    """
    base = Path(tempfile.gettempdir())
    for p in base.glob("wsml-ckpt-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError, IndexError):
            pass
    d = base / f"wsml-ckpt-{os.getpid()}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def _read_checkpoint(checkpoint) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer state, meta) of one Tune checkpoint; CheckpointError when it is unusable."""
    from wsml.checkpoint import load_checkpoint
    from wsml.errors import CheckpointError

    with checkpoint.as_directory() as d:
        state = load_checkpoint(Path(d) / STATE_FILE)
        meta_path = Path(d) / META_FILE
        try:
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        except ValueError as err:
            raise CheckpointError(f"{meta_path} is not valid JSON ({err})") from None
    return state, meta


def _earlier_checkpoints(checkpoint) -> list:
    """The trial's checkpoints older than `checkpoint` still in its storage folder, newest first."""
    import pyarrow.fs
    from ray import tune

    m = re.fullmatch(r"checkpoint_(\d+)", posixpath.basename(checkpoint.path.rstrip("/")))
    if m is None:
        return []
    fs, folder = checkpoint.filesystem, posixpath.dirname(checkpoint.path.rstrip("/"))
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(folder))
    except OSError:
        return []
    found = []
    for info in infos:
        k = re.fullmatch(r"checkpoint_(\d+)", info.base_name)
        if info.type == pyarrow.fs.FileType.Directory and k and int(k.group(1)) < int(m.group(1)):
            found.append((int(k.group(1)), info.path))
    return [tune.Checkpoint(path, filesystem=fs) for _, path in sorted(found, reverse=True)]


def restore(checkpoint, log) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of `checkpoint`, or of the newest earlier one when it is unusable."""
    from wsml.errors import CheckpointError

    try:
        return _read_checkpoint(checkpoint)
    except CheckpointError as err:
        problem = str(err)
    for earlier in _earlier_checkpoints(checkpoint):
        try:
            state, meta = _read_checkpoint(earlier)
        except CheckpointError as err:
            log(f"# checkpoint {earlier.path} is unusable too: {err}")
            continue
        log(f"# checkpoint {checkpoint.path} is unusable ({problem}); resuming from the earlier {earlier.path}")
        return state, meta
    raise CheckpointError(f"{problem} (and the trial has no usable earlier checkpoint; delete the trial's "
                          "checkpoint_* folders to start it over)")


def _gpu_fraction() -> float:
    from ray import tune

    try:
        res = tune.get_context().get_trial_resources()
        return float(res.required_resources.get("GPU", 0.0))
    except Exception:  # noqa: BLE001 - outside Tune (tests calling the function directly)
        return 0.0


def train_trial(config: dict[str, Any]) -> None:
    """Tune function trainable (see the module docstring)."""
    import ray
    import torch
    from ray import tune

    from wsml.checkpoint import save_checkpoint
    from wsml.errors import TrainingDiverged
    from wsml.train import run

    # one "Checkpoint successfully created" line per epoch and trial is noise
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    cfg = train_config(config)

    try:
        trial_dir = Path(tune.get_context().get_trial_dir())
    except Exception:  # noqa: BLE001
        trial_dir = Path.cwd()
    log_path = trial_dir / "train.log"

    def log(*parts: Any) -> None:
        with open(log_path, "a") as f:
            print(*parts, file=f)

    meta: dict[str, Any] = {"epoch": 0, "train_seconds": 0.0, "gpu_seconds": 0.0}
    resume_state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        resume_state, saved_meta = restore(checkpoint, log)
        meta.update(saved_meta)
    restored_from = int(meta["epoch"])

    node_id = ray.get_runtime_context().get_node_id()
    on_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    device = "cuda" if on_cuda else "cpu"
    gpu_frac = _gpu_fraction() if on_cuda else 0.0

    log(f"# attempt on node {node_id} ({device}), resuming after epoch {restored_from}: {cfg.to_dict()}")
    attempt = dict(restored_from_epoch=restored_from, node_id=node_id, device=device)
    # what the trial reported last: the restored epoch's metrics, or (fresh) none yet
    previous = dict(resume_state["history"][-1]) if resume_state and resume_state.get("history") else {}
    previous.pop("stop", None)
    last = {"t": time.monotonic(),
            "metrics": {"epoch": restored_from, "val_map": math.nan, **previous, **attempt,
                        "train_seconds": meta["train_seconds"], "gpu_seconds": meta["gpu_seconds"],
                        "trainer_stop": 0.0}}

    def on_epoch(report, get_state) -> bool | None:
        now = time.monotonic()
        seconds = now - last["t"]
        meta["train_seconds"] += seconds
        meta["gpu_seconds"] += seconds * gpu_frac
        meta["epoch"] = int(report.epoch)
        metrics = dict(report.metrics())
        metrics.update(attempt, train_seconds=meta["train_seconds"], gpu_seconds=meta["gpu_seconds"],
                       trainer_stop=float(bool(report.stop)))
        last["metrics"] = metrics
        d = _fresh_checkpoint_dir()
        try:
            save_checkpoint(d / STATE_FILE, get_state())
            (d / META_FILE).write_text(json.dumps(meta))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(d)))
        finally:
            shutil.rmtree(d, ignore_errors=True)
        last["t"] = time.monotonic()
        return None

    try:
        run(cfg, on_epoch=on_epoch, resume_state=resume_state, log=log)
    except TrainingDiverged as err:
        # Deterministic: retrying from the checkpoint would diverge again, so
        # the trial is not failed (FailureConfig would retry it) but ended with
        # its last metrics (val_map NaN when it diverged in its first epoch)
        # and the reason; the MLflow callback marks its run FAILED.
        log(f"# diverged: {err}")
        tune.report({**last["metrics"], "wsml_error": f"{type(err).__name__}: {err}"})


def trial_dirname(trial) -> str:
    """Short trial folder names: `trial_003_LL-Ct_1a2b3c4d` (Tune's default packs the whole config in)."""
    config = trial.config or {}
    point = {**config, **(config.get("point") or {})}
    index = (trial.experiment_tag or "0").split("_", 1)[0]
    kind = "final" if "point" in config else "trial"
    seed = f"_seed{point.get('seed', 0)}" if kind == "final" else ""
    return f"{kind}_{int(index):03d}_{point.get('scheme', 'x')}{seed}_{trial.trial_id}"
