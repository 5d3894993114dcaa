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
kept beside it (`keep_checkpoints` >= 2) are tried, newest first; when they
are all gone, the trial starts over from epoch 1.

At EC2's spot interruption notice the spot watcher (orchestration/cluster/spot_watch.py)
announces it on the node; the trial then saves its state at the next batch into
`within_epoch/` in its folder on the sweep's storage (not a Tune checkpoint: Tune
would take it for an epoch's result) and says so. A later attempt of the trial
resumes from it when it continues the same epoch as Tune's checkpoint, so at
most a batch is trained again instead of up to an epoch (17 minutes: COCO on an A10G).

A trial that asked for a GPU on a node where torch sees no CUDA device (an
NVIDIA driver too old for the CUDA 13 wheels, none at all) fails at once with
one line naming the node, the driver, torch's CUDA and the fix
(`orchestration.gpu_check`), instead of training on the node's few CPUs.
It is retried like any failure (`max_failures`): the fault is the node's, the
attempt costs seconds, and the retry may land on a sound node; where none is,
every attempt ends the same way within seconds. On machines whose Ray GPUs are
declared without being there (tests: Ray's fake multi-node cluster, `ray start
--num-gpus` on a CPU machine) WSML_FAKE_GPUS=1 in the nodes' environment lets
such trials train on the CPU. A trial that asked for no GPU trains on the CPU.

A trial whose training loss becomes NaN or infinite ends at once with its
last metrics and `wsml_error` (the MLflow run is marked FAILED with the
reason); it is not retried, since it would diverge again. So does a trial
that `skip_bad_images` left with too few readable images (the same files fail
the same way again). A trial whose data is not the data the sweep was planned
on (`wsml_data`: another copy on its node, or the data set changed since)
fails and is retried like a node's fault: another node may hold the right copy.

Besides the trainer's metrics each report carries:
  restored_from_epoch  the epoch this attempt resumed after (0 = started fresh)
  train_seconds        wall seconds trained, summed over attempts
  gpu_seconds          train_seconds x GPU fraction when the trial ran on CUDA
  trainer_stop         1.0 when the trainer's own stop rule (stop_drop) fired
  checkpoints_lost     1.0 when this attempt started over because the trial's checkpoints were gone
  node_id, device      where the attempt ran

Every attempt appends to the trial's `train.log` in its folder on the sweep's
storage (an `# attempt` line, the epochs, restores, divergence, a refused
config), so the log of a trial moved between nodes or continued by `--resume`
is one file.
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

from orchestration import gpu_check
from orchestration.run import private
from orchestration import trial as trial_config
from orchestration.common import first_line

STATE_FILE = "state.pt"
META_FILE = "meta.json"
LOG_FILE = "train.log"
# Beside the trial's checkpoints: its state saved within an epoch at a spot notice (`save_within_epoch`).
WITHIN_EPOCH = "within_epoch"

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


def _holds_state(checkpoint) -> bool:
    import pyarrow.fs

    info = checkpoint.filesystem.get_file_info(posixpath.join(checkpoint.path, STATE_FILE))
    return info.type != pyarrow.fs.FileType.NotFound


def restore(checkpoint, log) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(state, meta) of `checkpoint`, or of the newest earlier one when it is unusable.

    None when the trial's checkpoints are gone (deleted, or the empty folder
    `orchestration.run.tuner.restore` puts where Tune expects one): the trial then
    starts over from epoch 1. A checkpoint that is there but damaged, with no
    usable earlier one, raises CheckpointError (retraining would hide it).
    """
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
    if not _holds_state(checkpoint):
        log(f"# the checkpoints of this trial are gone ({checkpoint.path} holds no {STATE_FILE}): starting over "
            "from epoch 1")
        return None
    raise CheckpointError(f"{problem} (and the trial has no usable earlier checkpoint; delete the trial's "
                          "checkpoint_* folders to start it over)")


class TrialLog:
    """The trial's `train.log` in its folder on the sweep's storage, appended by every attempt: retries,
    sessions continued with --resume, other nodes (through pyarrow's file system, as Tune's storage)."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    @classmethod
    def of_trial(cls) -> TrialLog:
        import pyarrow.fs
        from ray import tune

        try:
            storage = tune.get_context().get_storage()
            return cls(storage.storage_filesystem, posixpath.join(storage.trial_fs_path, LOG_FILE))
        except Exception:  # noqa: BLE001 - outside Tune (a test calling the function directly)
            return cls(pyarrow.fs.LocalFileSystem(), str(Path.cwd() / LOG_FILE))

    def __call__(self, *parts: Any) -> None:
        data = (" ".join(str(p) for p in parts) + "\n").encode()
        self.fs.create_dir(posixpath.dirname(self.path), recursive=True)
        try:
            with self.fs.open_append_stream(self.path) as f:
                f.write(data)
        except (NotImplementedError, OSError):      # object stores cannot append: rewrite the whole file
            try:
                with self.fs.open_input_stream(self.path) as f:
                    data = f.read() + data
            except (FileNotFoundError, OSError):
                pass
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)


def save_within_epoch(log: TrialLog, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """The trial's state within an epoch into WITHIN_EPOCH/ of its folder (where `log` writes)."""
    import pyarrow.fs

    from wsml.checkpoint import save_checkpoint

    d = _fresh_checkpoint_dir()
    try:
        save_checkpoint(d / STATE_FILE, state)
        (d / META_FILE).write_text(json.dumps(meta))
        dest = posixpath.join(posixpath.dirname(log.path), WITHIN_EPOCH)
        log.fs.create_dir(dest, recursive=True)
        pyarrow.fs.copy_files(str(d), dest, source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=log.fs)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def within_epoch(log: TrialLog, after_epoch: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(state, meta) saved within the epoch after `after_epoch` (`save_within_epoch`), None when there is
    none for that epoch (none saved, or one of an earlier epoch) or it is unusable (said in the log)."""
    import pyarrow.fs

    from wsml.checkpoint import load_checkpoint
    from wsml.errors import CheckpointError

    src = posixpath.join(posixpath.dirname(log.path), WITHIN_EPOCH)
    if log.fs.get_file_info(posixpath.join(src, STATE_FILE)).type == pyarrow.fs.FileType.NotFound:
        return None
    d = _fresh_checkpoint_dir()
    try:
        pyarrow.fs.copy_files(src, str(d), source_filesystem=log.fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        state = load_checkpoint(d / STATE_FILE)
        meta = json.loads((d / META_FILE).read_text())
    except (CheckpointError, OSError, ValueError) as err:
        log(f"# the state saved within an epoch is unusable ({first_line(err)}): resuming after epoch {after_epoch}")
        return None
    finally:
        shutil.rmtree(d, ignore_errors=True)
    if int(state["epoch"]) != after_epoch or "in_epoch" not in state:
        return None
    return state, meta


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

    from orchestration.cluster.spot_watch import Notice
    from wsml.checkpoint import save_checkpoint
    from wsml.errors import CheckpointError, TooManySkipped, TrainingDiverged
    from wsml.logs import show_on_stderr
    from wsml.train import run

    logging.getLogger(private.RAY_STORAGE_LOGGER).setLevel(logging.WARNING)
    show_on_stderr()        # the data and cache lines of wsml's modules, in the trial's log as on a command line
    log = TrialLog.of_trial()
    try:
        trial = trial_config.Trial.parse(config)
        cfg = trial.train_config()
    except Exception as err:
        log(f"# attempt refused: {type(err).__name__}: {err}")
        raise

    node_id = ray.get_runtime_context().get_node_id()
    if _gpu_fraction() > 0 and not torch.cuda.is_available() and os.environ.get(gpu_check.FAKE_GPUS_ENV) != "1":
        line = gpu_check.check(node_id) or "torch sees no CUDA device"
        log(f"# failed: {line}")
        raise gpu_check.NoCudaError(line)

    meta: dict[str, Any] = {"epoch": 0, "train_seconds": 0.0, "gpu_seconds": 0.0}
    resume_state, started_over = None, False
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        restored = restore(checkpoint, log)
        if restored is None:
            started_over = True
        else:
            resume_state, saved_meta = restored
            meta.update(saved_meta)
    if not started_over and (within := within_epoch(log, int(meta["epoch"]))) is not None:
        resume_state, saved_meta = within
        meta.update(saved_meta)
        log(f"# resuming within epoch {int(meta['epoch']) + 1} at batch {resume_state['in_epoch']['batch']}, "
            "from the state saved at a spot notice")
    restored_from = int(meta["epoch"])

    on_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    device = "cuda" if on_cuda else "cpu"
    gpu_frac = _gpu_fraction() if on_cuda else 0.0

    log(f"# attempt on node {node_id} ({device}), resuming after epoch {restored_from}: {cfg.to_dict()}")
    attempt = dict(restored_from_epoch=restored_from, node_id=node_id, device=device,
                   checkpoints_lost=float(started_over))
    # what the trial reported last: the restored epoch's metrics, or (fresh) none yet
    previous = dict(resume_state["history"][-1]) if resume_state and resume_state.get("history") else {}
    previous.pop("stop", None)
    last: dict[str, Any] = {"t": time.monotonic(),
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

    notice = Notice()
    saved: list[bool] = []      # [True] once this attempt saved at the notice

    def on_batch(get_state) -> None:
        if saved or not notice.announced():
            return
        saved.append(True)
        now = time.monotonic()
        seconds = now - last["t"]
        meta["train_seconds"] += seconds
        meta["gpu_seconds"] += seconds * gpu_frac
        last["t"] = now
        state = get_state()
        save_within_epoch(log, state, meta)
        notice.saved(os.getpid())
        log(f"# spot notice: saved within epoch {state['in_epoch']['epoch']} at batch {state['in_epoch']['batch']}")

    try:
        notice.register(os.getpid())
    except OSError as err:      # the trial trains all the same, only without a save at a spot notice
        log(f"# spot notice folder {notice.folder} unusable ({first_line(err)}): no save within an epoch at a notice")
    try:
        run(cfg, on_epoch=on_epoch, resume_state=resume_state, log=log, data_id=trial.data_id,
            on_batch=on_batch)
    except (TrainingDiverged, CheckpointError, TooManySkipped) as err:
        # Deterministic (a divergence, a checkpoint of other data, too many unreadable images):
        # retrying would fail again, so the trial is not failed (FailureConfig would retry it) but ended with
        # its last metrics (val_map NaN when it diverged in its first epoch)
        # and the reason; the MLflow callback marks its run FAILED.
        log(f"# {'diverged' if isinstance(err, TrainingDiverged) else 'failed'}: {err}")
        tune.report({**last["metrics"], "wsml_error": f"{type(err).__name__}: {err}"})
    except Exception as err:
        log(f"# failed: {type(err).__name__}: {first_line(err)}")
        raise
    finally:
        notice.unregister(os.getpid())

