"""One training run: `run(config, on_epoch)` for callers, `python -m wsml.train` for people.

The mutable label matrix (LL-Cp's corrections) lives in this process, on the
training device, looked up by image index; DataLoader workers only read
images. Everything needed to continue a run exactly (model, optimizer, epoch,
labels, ROLE's estimator, history, best-so-far, RNG) is in `get_state()`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsml.config import EpochReport, RunResult, TrainConfig
from wsml.data.loading import WSMLData, load_data
from wsml.errors import CheckpointError, TrainingDiverged, WSMLError
from wsml.large_loss import LargeLossRule, clean_rate
from wsml.losses import init_role_estimator, scheme_loss
from wsml.metrics import mean_average_precision
from wsml.model import IMAGENET_MEAN, IMAGENET_STD, Classifier, build_model, weights_id

StateFn = Callable[[], dict]
EpochCallback = Callable[[EpochReport, StateFn], "bool | None"]

# Config fields that may differ between a checkpoint and the run resuming it.
_RESUME_FREE = {"device", "num_workers", "data_root", "cache_dir", "precision", "channels_last", "epochs",
                "skip_bad_images"}


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA where a device exists, else the CPU (a GPU trial on a node
    without CUDA still runs)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise WSMLError(f"--device {name} asked for CUDA but none is available: use --device auto or cpu")
    return torch.device(name)


class _BatchReader(torch.utils.data.Dataset):
    """Reads whole batches of uint8 images by (sorted) index: one sequential memmap read per batch."""

    def __init__(self, images, batches: list[np.ndarray]):
        self.images, self.batches = images, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        index = self.batches[i]
        return torch.from_numpy(index), torch.from_numpy(np.ascontiguousarray(self.images[index]))


class Trainer:
    def __init__(self, cfg: TrainConfig, data: WSMLData, device: torch.device, log: Callable[[str], None]):
        self.cfg, self.data, self.device, self.log = cfg, data, device, log
        cuda = device.type == "cuda"
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
        self.autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use_bf16
                         else nullcontext())
        self.channels_last = cfg.channels_last and cuda
        if cuda:
            torch.backends.cudnn.benchmark = True   # fixed input sizes: pick the fastest kernels once
        self.pin = cuda
        torch.manual_seed(cfg.seed)
        self.model: Classifier = build_model(cfg.arch, data.num_classes, cfg.weights).to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # on the 0-255 scale, so normalising is one subtract and one divide in place
        self.mean = 255 * torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = 255 * torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.observed = torch.as_tensor(data.train_observed, dtype=torch.int8, device=device)
        self.complete = torch.as_tensor(data.train.labels, dtype=torch.int8, device=device)
        self.estimator = None
        if cfg.scheme == "ROLE":
            g = torch.Generator().manual_seed(cfg.seed)
            self.estimator = nn.Parameter(init_role_estimator(self.observed.cpu(), g).to(device))
        self.use_graph = cfg.cuda_graph and device.type == "cuda"
        self._graph_warm = False
        self.optimizer = self._optimizer(cfg.lr)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best = {"val_map": -math.inf, "epoch": 0, "test_map": None}

    def _optimizer(self, lr: float) -> torch.optim.Optimizer:
        head_lr = lr * self.cfg.lr_head_mult
        groups = [{"params": self.model.backbone.parameters(), "lr": lr},
                  {"params": self.model.head.parameters(), "lr": head_lr}]
        if self.estimator is not None:
            groups.append({"params": [self.estimator], "lr": head_lr})
        # fused: one kernel for all parameters instead of several per tensor (the eager step is
        # launch-bound on fast GPUs); capturable keeps the step counters on the GPU for CUDA graphs
        cuda = self.device.type == "cuda"
        return torch.optim.Adam(groups, fused=cuda or None, capturable=self.use_graph)

    # -- input pipeline -------------------------------------------------
    def _loader(self, images, batches: list[np.ndarray]):
        workers = 0 if isinstance(images, np.ndarray) and not isinstance(images, np.memmap) else self.cfg.num_workers
        return torch.utils.data.DataLoader(_BatchReader(images, batches), batch_size=None, shuffle=False,
                                           num_workers=workers, pin_memory=self.pin)

    def _to_input(self, batch: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 NHWC -> normalised float NCHW on the device; the flip is done here, not per image on a CPU."""
        x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        if flip is not None and flip.any():
            flipped = flip.nonzero().squeeze(1)        # a CPU mask: no device sync
            x[flipped] = x[flipped].flip(3)
        x.sub_(self.mean).div_(self.std)
        # NHWC permuted is already channels_last in memory; contiguous() keeps it so for CUDA
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def _predict(self, images, features: bool = False) -> np.ndarray:
        self.model.eval()
        bs = 2 * self.cfg.batch_size
        batches = [np.arange(i, min(i + bs, len(images))) for i in range(0, len(images), bs)]
        out = []
        with torch.no_grad(), self.autocast:
            for _, batch in self._loader(images, batches):
                x = self._to_input(batch)
                y = self.model.features(x) if features else torch.sigmoid(self.model(x))
                out.append(y.float().cpu())
        return torch.cat(out).numpy()

    def evaluate(self, split: str) -> float:
        s = getattr(self.data, split)
        return mean_average_precision(self._predict(s.images), s.labels, self.data.observed_only_metric).map

    # -- LinearInit -----------------------------------------------------
    def linear_init(self) -> None:
        """Train the head alone on features of the frozen backbone, keep the best head by validation mAP."""
        from wsml.data.cache import cached_array

        cfg = self.cfg
        feats = {}
        for split in ("train", "val"):
            images = getattr(self.data, split).images
            key = {"kind": "features", "images": self.data.image_key, "split": split, "n": len(images),
                   "backbone": weights_id(cfg.arch, cfg.weights),
                   # a randomly initialised backbone depends on the seed
                   "seed": cfg.seed if cfg.weights == "none" else None}

            def build(out, images=images):
                out[:] = self._predict(images, features=True)

            dim = self.model.head.in_features
            feats[split] = torch.from_numpy(np.array(
                cached_array(Path(cfg.cache_dir) / "features", key, (len(images), dim), np.float32, build)))
        head = self.model.head
        opt = torch.optim.Adam(head.parameters(), lr=cfg.linear_init_lr)
        train_x = feats["train"].to(self.device)
        val_x = feats["val"].to(self.device)
        best = (-math.inf, None)
        g = torch.Generator().manual_seed(cfg.seed)
        for epoch in range(1, cfg.linear_init_epochs + 1):
            head.train()
            for idx in torch.randperm(len(train_x), generator=g).split(cfg.linear_init_batch_size):
                idx = idx.to(self.device)
                est = self.estimator[idx] if self.estimator is not None else None
                out = scheme_loss(cfg.scheme, head(train_x[idx]), self.observed[idx], self.complete[idx],
                                  1, cfg.delta_rel, self.data.expected_positives, est)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
            with torch.no_grad():
                scores = torch.sigmoid(head(val_x)).cpu().numpy()
            val_map = mean_average_precision(scores, self.data.val.labels, self.data.observed_only_metric).map
            if val_map > best[0]:
                best = (val_map, {k: v.clone() for k, v in head.state_dict().items()})
            self.log(f"linear-init epoch {epoch}/{cfg.linear_init_epochs}  val mAP {val_map:.2f}")
        head.load_state_dict(best[1])
        self.optimizer = self._optimizer(cfg.lr)   # fresh Adam state for end-to-end training

    # -- one epoch -------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, n = self.cfg, len(self.data.train.labels)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)   # resumable without RNG state
        perm = torch.randperm(n, generator=g).numpy()
        flips = torch.rand(n, generator=g) < 0.5 if cfg.hflip else None
        # sorted within a batch: the memmap is read in order, labels are looked up by index anyway
        batches = [np.sort(perm[i:i + cfg.batch_size]) for i in range(0, n, cfg.batch_size)]
        self.model.train()
        zero = torch.zeros((), device=self.device)
        loss_sum, modified, modified_pos = zero.clone(), zero.clone(), zero.clone()
        start = time.perf_counter()
        graph = None
        for b, (index, images) in enumerate(self._loader(self.data.train.images, batches)):
            flip = None if flips is None else flips[b * cfg.batch_size: b * cfg.batch_size + len(index)]
            x = self._to_input(images, flip)
            index = index.to(self.device, non_blocking=True)
            if self.use_graph and len(index) == cfg.batch_size:
                graph = graph or _GraphedStep(self, epoch, x, index, warmup=not self._graph_warm)
                self._graph_warm = True
                loss, selected, complete = graph(x, index)
            else:
                loss, selected, complete = self._step(x, index, epoch)
            loss_sum += loss * len(index)
            modified += selected.sum()
            modified_pos += (selected & (complete == 1)).sum()
        seconds = time.perf_counter() - start
        loss = float(loss_sum) / n
        if not math.isfinite(loss):
            raise TrainingDiverged(f"training loss became {loss} in epoch {epoch} (scheme {cfg.scheme}, "
                                   f"lr {cfg.lr:g}): lower the learning rate")
        modified, modified_pos = float(modified), float(modified_pos)
        return {"train_loss": loss, "modified_frac": modified / (n * self.data.num_classes),
                "modified_true_pos_frac": modified_pos / modified if modified else math.nan,
                "train_seconds": seconds, "images_per_s": n / seconds}

    def _step(self, x: torch.Tensor, index: torch.Tensor, epoch: int):
        """Forward, the scheme's loss, backward, optimizer step; LL-Cp writes its flips."""
        cfg = self.cfg
        observed = self.observed[index]
        complete = self.complete[index]
        with self.autocast:
            logits = self.model(x)
        est = self.estimator[index] if self.estimator is not None else None
        out = scheme_loss(cfg.scheme, logits, observed, complete, epoch, cfg.delta_rel,
                          self.data.expected_positives, est)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        if cfg.scheme == "LL-Cp":
            # permanent correction: an observed positive from now on, no longer a candidate
            self.observed[index] = torch.where(out.selected, torch.ones_like(observed), observed)
        return out.loss.detach(), out.selected, complete

    # -- state -----------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        state = {"config": self.cfg.to_dict(), "epoch": self.epoch,
                 "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "observed": self.observed.cpu(), "history": list(self.history), "best": dict(self.best),
                 "rng_torch": torch.get_rng_state()}
        if self.estimator is not None:
            state["estimator"] = self.estimator.detach().cpu()
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        saved = state.get("config", {})
        for key, value in self.cfg.to_dict().items():
            if key not in _RESUME_FREE and key in saved and saved[key] != value:
                raise CheckpointError(f"the checkpoint was made with {key}={saved[key]!r} but this run has "
                                      f"{key}={value!r}: resume with the same settings or start in a new folder")
        self.model.load_state_dict(state["model"])
        if self.estimator is not None:
            with torch.no_grad():
                self.estimator.copy_(state["estimator"].to(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.observed = state["observed"].to(self.device, dtype=torch.int8)
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best = dict(state["best"])
        torch.set_rng_state(state["rng_torch"])
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)


class _GraphedStep:
    """`Trainer._step` captured once per epoch as one CUDA graph (k changes per epoch).

    Shapes are static (full batches; the top-k is a sort and a mask), so each
    replay does exactly what the eager step does. The first capture of a run is
    preceded by three real eager steps on a side stream, as CUDA graph capture
    requires; they are training steps like any other.
    """

    def __init__(self, trainer: Trainer, epoch: int, x: torch.Tensor, index: torch.Tensor, warmup: bool):
        self.trainer, self.epoch = trainer, epoch
        self.x, self.index = x.clone(), index.clone()
        self.pending_warmup = 3 if warmup else 0
        self.graph = None

    def __call__(self, x: torch.Tensor, index: torch.Tensor):
        if self.pending_warmup:
            self.pending_warmup -= 1
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = self.trainer._step(x, index, self.epoch)
            torch.cuda.current_stream().wait_stream(stream)
            return out
        self.x.copy_(x, non_blocking=True)
        self.index.copy_(index, non_blocking=True)
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            self.trainer.optimizer.zero_grad(set_to_none=True)
            # thread_local: the DataLoader's pin-memory thread may call CUDA during the capture
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = self.trainer._step(self.x, self.index, self.epoch)
        self.graph.replay()
        return self.outputs


def run(cfg: TrainConfig, on_epoch: EpochCallback | None = None, resume_state: dict | None = None,
        log: Callable[[str], None] | None = print) -> RunResult:
    """Train and evaluate one configuration.

    `on_epoch(report, get_state)` is called after every epoch; `get_state()`
    returns the complete state to checkpoint, and `resume_state` (such a
    state) continues the run after its epoch. Returning True from `on_epoch`
    stops training after that epoch.
    """
    cfg = cfg.resolve()
    log = log or (lambda _msg: None)
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    trainer = Trainer(cfg, data, device, log)
    if resume_state is not None:
        trainer.load_state(resume_state)
        log(f"resumed after epoch {trainer.epoch}")
    elif cfg.mode == "linear-init":
        trainer.linear_init()
    rule = LargeLossRule(cfg.scheme, cfg.delta_rel)
    stopped = any(h.get("stop") for h in trainer.history)
    while trainer.epoch < cfg.epochs and not stopped:
        epoch = trainer.epoch + 1
        start = time.perf_counter()
        stats = trainer.train_epoch(epoch)
        val_map = trainer.evaluate("val")
        if val_map > trainer.best["val_map"]:
            # test mAP is only needed at the best validation epoch, so evaluate it only there
            trainer.best = {"val_map": val_map, "epoch": epoch, "test_map": trainer.evaluate("test")}
        stopped = cfg.stop_drop is not None and val_map < trainer.best["val_map"] - cfg.stop_drop
        report = EpochReport(
            epoch=epoch, val_map=val_map, train_loss=stats["train_loss"], modified_frac=stats["modified_frac"],
            modified_true_pos_frac=stats["modified_true_pos_frac"], clean_rate=clean_rate(epoch, rule),
            best_val_map=trainer.best["val_map"], best_epoch=trainer.best["epoch"],
            test_map_at_best=trainer.best["test_map"], epoch_seconds=time.perf_counter() - start,
            images_per_s=stats["images_per_s"], stop=stopped)
        trainer.epoch = epoch
        trainer.history.append({**report.metrics(), "stop": stopped})
        log(_epoch_line(report, cfg.epochs))
        if on_epoch is not None and on_epoch(report, trainer.get_state):
            break
    if trainer.best["test_map"] is None:
        raise WSMLError("no epoch was trained: set --epochs to 1 or more")
    # classes with no positive in the test set get AP 0, as in the published code; say how many
    empty = int(((data.test.labels == 1).sum(axis=0) == 0).sum())
    return RunResult(test_map=trainer.best["test_map"], best_val_map=trainer.best["val_map"],
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
    p.add_argument("--dataset", default="digits")
    p.add_argument("--scheme", default="LL-R", help="full, AN, WAN, LSAN, EPR, ROLE, LL-R, LL-Ct or LL-Cp")
    p.add_argument("--delta-rel", type=float, help="percent of label entries per epoch (paper: 0.1-0.5)")
    p.add_argument("--lr", type=float, help="backbone learning rate; the head gets 10x")
    p.add_argument("--lr-head-mult", type=float, default=10.0)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--mode", default="end-to-end", help="end-to-end or linear-init")
    p.add_argument("--linear-init-epochs", type=int)
    p.add_argument("--weights", help="imagenet, none, or a local ResNet-50 state-dict file")
    p.add_argument("--arch", help="resnet50 or smallcnn (default: by data set)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--data-root", help="folder in the published layout (default data/<dataset>)")
    p.add_argument("--cache-dir", help="decoded-image and feature cache (default .cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--obs-seed", type=int, default=1200, help="which positive stays observed")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA), bf16 or fp32")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--cuda-graph", action="store_true", help="capture each training step as one CUDA graph")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flip in training (default: on, off for digits)")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images (counted)")
    p.add_argument("--max-train-images", type=int, help="train on the first N images only (quick checks)")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt and metrics.json; rerun to resume")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        dataset=args.dataset, scheme=args.scheme, delta_rel=args.delta_rel, lr=args.lr,
        lr_head_mult=args.lr_head_mult, epochs=args.epochs, batch_size=args.batch_size, mode=args.mode,
        linear_init_epochs=args.linear_init_epochs, weights=args.weights, arch=args.arch,
        image_size=args.image_size, data_root=args.data_root, cache_dir=args.cache_dir, seed=args.seed,
        obs_seed=args.obs_seed, device=args.device, precision=args.precision, num_workers=args.num_workers,
        skip_bad_images=args.skip_bad_images, cuda_graph=args.cuda_graph, hflip=args.hflip, max_train_images=args.max_train_images).resolve()


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def _check_out_dir(out: Path) -> None:
    """Fail before training when --out cannot hold the checkpoint (a file in the way, no write access)."""
    base = out.absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise WSMLError(f"--out {out}: {base} is not a writable folder: pass a folder you can write to")


def main(argv: list[str] | None = None) -> int:
    from wsml.checkpoint import load_checkpoint, save_checkpoint

    args = _parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        out = Path(args.out)
        _check_out_dir(out)
        ckpt = out / "checkpoint.pt"
        resume = load_checkpoint(ckpt) if ckpt.exists() else None

        def on_epoch(_report: EpochReport, get_state: StateFn) -> None:
            save_checkpoint(ckpt, get_state())

        result = run(cfg, on_epoch, resume)
    except WSMLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _write_json_atomic(out / "metrics.json", {
        "test_map": result.test_map, "best_val_map": result.best_val_map, "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early, "empty_test_classes": result.empty_test_classes,
        "history": result.history, "config": result.config})
    print(f"test mAP {result.test_map:.2f} (best validation mAP {result.best_val_map:.2f} at epoch "
          f"{result.best_epoch}); wrote {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
