"""One training run: `run(config, on_epoch)` for callers, `python -m wsml.train` for people.

`run` loads the data, builds the `wsml.trainer.Trainer`, runs LinearInit's linear phase where asked
(`wsml.linear_init`), then trains epoch by epoch, evaluating, reporting and stopping; the command
line's options are `TrainConfig`'s fields made with `wsml.config.option`, and `--out` keeps the run's
checkpoint and metrics.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import signal
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import Field, fields
from pathlib import Path

import torch

from wsml import schemes
from wsml.config import EpochReport, RunResult, TrainConfig, filled
from wsml.data.loading import load_data
from wsml.errors import DataChanged, WSMLError
from wsml.files import atomic_write
from wsml.large_loss import LargeLossRule, clean_rate
from wsml.linear_init import linear_init
from wsml.logs import show_on_stderr
from wsml.trainer import Best, StateFn, Trainer

EpochCallback = Callable[[EpochReport, StateFn], "bool | None"]

_logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA where a device exists, else the CPU (a GPU trial on a node
    without CUDA still runs)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise WSMLError(f"--device {name} asked for CUDA but none is available: use --device auto or cpu")
    return torch.device(name)


def run(cfg: TrainConfig, on_epoch: EpochCallback | None = None, resume_state: dict | None = None,
        log: Callable[[str], None] | None = _logger.info, safe_point: Callable[[], None] | None = None,
        data_id: str | None = None, on_batch: Callable[[StateFn], None] | None = None) -> RunResult:
    """Train and evaluate one configuration.

    `on_epoch(report, get_state)` is called after every epoch; `get_state()`
    returns the complete state to checkpoint, and `resume_state` (such a
    state) continues the run after its epoch; on other data than the state's
    (its fingerprint) it is refused. Returning True from `on_epoch` stops
    training after that epoch. `safe_point()` is called before every batch of
    training and evaluation, where raising abandons the run cleanly (the
    command line's Ctrl-C and SIGTERM). `data_id`: the identity of the data
    the caller records the result under (`wsml.data.loading.data_id`); other
    data raises DataChanged before anything is trained. `on_batch(get_state)`
    is called before every training batch: a state got there holds the epoch in
    progress as far as done ("in_epoch"), and a run resumed from it continues
    within that epoch (a checkpoint at a spot notice: orchestration/run/trainable.py).
    `log` gets the run's lines (default: this module's logger; None: nowhere).
    """
    cfg = cfg.resolve()
    log = log or (lambda _msg: None)
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    if data_id is not None and data.data_id != data_id:
        where = "the generated digits" if cfg.dataset == "digits" else f"the data set at {cfg.data_root}"
        raise DataChanged(f"{where} is not the data this run was planned on (data {data.data_id}, expected "
                          f"{data_id}): it changed, or this node holds another copy; give every node the same "
                          "prepared data set, or start a new sweep on the data as it is now")
    trainer = Trainer(cfg, data, device, log, safe_point)
    trainer.on_batch = on_batch
    switch = None   # LinearInit: the head's saturation at the switch to fine-tuning, reported with epoch 1
    if resume_state is not None:
        trainer.load_state(resume_state)
        within = f", batch {trainer.in_epoch['batch']} of epoch {trainer.epoch + 1}" if trainer.in_epoch else ""
        log(f"resumed after epoch {trainer.epoch}{within}")
    elif cfg.mode == "linear-init":
        switch = linear_init(trainer)
    rule = LargeLossRule(cfg.scheme, trainer.delta_rel)
    epochs = filled(cfg.epochs, "epochs")
    stopped = any(h.get("stop") for h in trainer.history)
    while trainer.epoch < epochs and not stopped:
        epoch = trainer.epoch + 1
        start = time.perf_counter()
        stats = trainer.train_epoch(epoch)
        val_map = trainer.evaluate("val")
        if val_map > trainer.best["val_map"]:
            # test mAP is only needed at the best validation epoch, so evaluate it only there
            trainer.best = Best(val_map=val_map, epoch=epoch, test_map=trainer.evaluate("test"))
        stopped = cfg.stop_drop is not None and val_map < trainer.best["val_map"] - cfg.stop_drop
        report = EpochReport(
            epoch=epoch, val_map=val_map, train_loss=stats["train_loss"], modified_frac=stats["modified_frac"],
            modified_true_pos_frac=stats["modified_true_pos_frac"], clean_rate=clean_rate(epoch, rule),
            best_val_map=trainer.best["val_map"], best_epoch=trainer.best["epoch"],
            test_map_at_best=trainer.best["test_map"], epoch_seconds=time.perf_counter() - start,
            images_per_s=stats["images_per_s"], linear_init_saturated_frac=switch, stop=stopped)
        switch = None
        trainer.epoch = epoch
        trainer.history.append({**report.metrics(), "stop": stopped})
        log(_epoch_line(report, epochs))
        if on_epoch is not None and on_epoch(report, trainer.get_state):
            break
    test_map = trainer.best["test_map"]
    if test_map is None:
        raise WSMLError("no epoch was trained: set --epochs to 1 or more")
    # classes with no positive in the test set get AP 0, as in the published code; say how many
    empty = int(((data.test.labels == 1).sum(axis=0) == 0).sum())
    return RunResult(test_map=test_map, best_val_map=trainer.best["val_map"],
                     best_epoch=trainer.best["epoch"], history=trainer.history, config=cfg.to_dict(),
                     empty_test_classes=empty, stopped_early=stopped)


def _epoch_line(r: EpochReport, epochs: int) -> str:
    true_pos = "" if math.isnan(r.modified_true_pos_frac) else f" ({r.modified_true_pos_frac:.0%} truly positive)"
    return (f"epoch {r.epoch}/{epochs}  loss {r.train_loss:.4f}  val mAP {r.val_map:.2f}  "
            f"best {r.best_val_map:.2f} @ {r.best_epoch}  modified {r.modified_frac:.2%}{true_pos}  "
            f"{r.images_per_s:.0f} img/s  {r.epoch_seconds:.1f}s" + ("  [stop: val mAP dropped]" if r.stop else ""))


# -- command line ---------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m wsml.train",
                                description="Train and evaluate one configuration (like the paper's main.py).")
    types = typing.get_type_hints(TrainConfig)
    for f in _option_fields():
        # the field's type sets the option's: `float | None` -> float; a bool is a flag
        kind = next(t for t in typing.get_args(types[f.name]) or (types[f.name],) if t is not type(None))
        settings = dict(f.metadata["option"])
        if kind is bool:
            settings["action"] = "store_true" if f.default is False else argparse.BooleanOptionalAction
        elif kind is not str:
            settings["type"] = kind
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, **settings)
    for name in schemes.hyper_names(with_dataset_defaults=False):    # the methods' own: scheme_params
        h = schemes.hyper(name)
        help_ = f"{h.help} (default: the authors' value for the data set, digits ours; {h.source})"
        p.add_argument("--" + name.replace("_", "-"), type=int if h.integer else float, default=None,
                       help=help_.replace("%", "%%"))
    p.add_argument("--out", required=True,
                   help="output folder: new, empty, or this run's own (rerun the command to resume); it keeps "
                        "checkpoint.pt, checkpoint.pt.sha256 and metrics.json, and any other file is refused")
    p.add_argument("--accept-unverified-checkpoint", action="store_true",
                   help="resume from a checkpoint.pt whose checkpoint.pt.sha256 is missing")
    return p


def _option_fields() -> list[Field]:
    return [f for f in fields(TrainConfig) if "option" in f.metadata]


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    params = {name: v for name in schemes.hyper_names(with_dataset_defaults=False)
              if (v := getattr(args, name)) is not None}
    return TrainConfig(**{f.name: getattr(args, f.name) for f in _option_fields()}, scheme_params=params).resolve()


def _check_out_dir(out: Path) -> None:
    """Fail before training when --out cannot hold the checkpoint (a file in the way, no write access)."""
    base = out.absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise WSMLError(f"--out {out}: {base} is not a writable folder: pass a folder you can write to")


def main(argv: list[str] | None = None) -> int:
    """The command line; exit status 0, 2 for bad input, 128 + the signal when interrupted."""
    from wsml.interrupt import StopOnSignal

    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    show_on_stderr()
    out = Path(args.out)
    saved = {"epoch": 0}   # the epoch DIR/checkpoint.pt holds
    with StopOnSignal() as stop:
        try:
            return _train(args, out, stop, saved)
        except BaseException as err:
            if stop.signum is not None:
                # Interrupted, or what the same signal did to a helper process (a DataLoader worker)
                kept = (f"{out / 'checkpoint.pt'} keeps epoch {saved['epoch']}, the epoch in progress is dropped"
                        if saved["epoch"] else "no epoch was completed, nothing is kept")
                print(f"interrupted by {signal.Signals(stop.signum).name}: {kept}; continue with the same command: "
                      f"python -m wsml.train {shlex.join(argv)}", file=sys.stderr)
                return 128 + stop.signum
            if isinstance(err, WSMLError):
                print(f"error: {err}", file=sys.stderr)
                return 2
            raise


def _train(args: argparse.Namespace, out: Path, stop, saved: dict[str, int]) -> int:
    from wsml.checkpoint import save_checkpoint
    from wsml.outdir import CHECKPOINT, METRICS, inspect_out

    cfg = config_from_args(args)
    _check_out_dir(out)
    found = inspect_out(out, cfg, args.accept_unverified_checkpoint)
    for note in found.notes:
        print(note, file=sys.stderr)
    if found.finished is not None:
        m = found.finished
        print(f"already finished: test mAP {m['test_map']:.2f} (best validation mAP {m['best_val_map']:.2f} at "
              f"epoch {m['best_epoch']}) in {out / METRICS}; nothing trained (to train again, pass another "
              f"--out or delete {out})")
        return 0
    if found.resume is not None:
        saved["epoch"] = int(found.resume["epoch"])

    def on_epoch(report: EpochReport, get_state: StateFn) -> None:
        with stop.deferred():
            save_checkpoint(out / CHECKPOINT, get_state())
            saved["epoch"] = report.epoch

    result = run(cfg, on_epoch, found.resume, log=print, safe_point=stop.check)
    with stop.deferred():
        atomic_write(out / METRICS, json.dumps({
            "test_map": result.test_map, "best_val_map": result.best_val_map, "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early, "empty_test_classes": result.empty_test_classes,
            "history": result.history, "config": result.config}, indent=2, default=float) + "\n")
    print(f"test mAP {result.test_map:.2f} (best validation mAP {result.best_val_map:.2f} at epoch "
          f"{result.best_epoch}); wrote {out / METRICS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
