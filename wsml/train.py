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
import shlex
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsml.config import EpochReport, RunResult, TrainConfig, resume_mismatch
from wsml.data.loading import WSMLData, fingerprint_changes, load_data
from wsml.errors import CheckpointError, DataChanged, TrainingDiverged, WSMLError
from wsml.files import atomic_write
from wsml.large_loss import LargeLossRule, clean_rate
from wsml.losses import init_role_estimator, scheme_loss
from wsml.metrics import mean_average_precision
from wsml.model import IMAGENET_MEAN, IMAGENET_STD, Classifier, build_model, weights_id
from wsml.progress import Progress

StateFn = Callable[[], dict]
EpochCallback = Callable[[EpochReport, StateFn], "bool | None"]

# SGD as the paper's published code builds it (github:snucml/LargeLossMatters, train.py:
# `torch.optim.SGD(opt_params, lr=P['lr'], momentum=0.9, weight_decay=0.001)`); the authors'
# best VOC setting uses it (SGD, lr 5e-3; LargeLossMatters issue #4).
SGD_MOMENTUM = 0.9
SGD_WEIGHT_DECAY = 1e-3
# ROLE's label estimator learns at 10x the phase's lr, in the linear phase of LinearInit
# too (single-positive work, train.py: `P['lr_mult'] = 10.0`, "learning rate multiplier
# for the parameters of g", one Adam over the classifier f and the estimator g).
ESTIMATOR_LR_MULT = 10.0
# Settings added after checkpoints existed, with the value a checkpoint without them was made with.
ADDED_LATER = {"optimizer": "adam", "boostlu_alpha": None}
# LinearInit's feature cache: bump when the same backbone and images would give other features, so that
# entries made the old way are never read again. 2: BatchNorm statistics estimated on the training images
# before extraction where nothing had set them (version 1's keys have no version field).
FEATURE_VERSION = 2
# The guard at the switch from LinearInit's linear phase to fine-tuning: the head is
# saturated when more than SATURATED_SHARE of its logits on the first fine-tuning batch are past
# +-SATURATED_LOGIT. At |logit| 10 the sigmoid is within 5e-5 of 0 or 1. The heads of the runs that
# collapsed after a linear phase on features fine-tuning does not compute (digits, AN, BatchNorm
# statistics never set) had 76-100 % of their logits there, every head fitted to the right features 0 %
# (docs/method.md); half lies between with room on both sides. A warning, not an error: a head may be
# that sure and right.
SATURATED_LOGIT = 10.0
SATURATED_SHARE = 0.5


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA where a device exists, else the CPU (a GPU trial on a node
    without CUDA still runs)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise WSMLError(f"--device {name} asked for CUDA but none is available: use --device auto or cpu")
    return torch.device(name)


class _BatchReader(torch.utils.data.Dataset):
    """Reads whole batches of uint8 images by (sorted) index: one sequential memmap read per batch
    (the compact cache: the batch's JPEGs decoded here, in the DataLoader worker).

    `encoded`: hand over the compact cache's JPEG bytes instead, for decoding on the GPU.
    """

    def __init__(self, images, batches: list[np.ndarray], encoded: bool = False):
        self.images, self.batches, self.encoded = images, batches, encoded

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        index = self.batches[i]
        if self.encoded:
            return torch.from_numpy(index), self.images.encoded(index)
        return torch.from_numpy(index), torch.from_numpy(np.ascontiguousarray(self.images[index]))


class Trainer:
    def __init__(self, cfg: TrainConfig, data: WSMLData, device: torch.device, log: Callable[[str], None],
                 safe_point: Callable[[], None] | None = None):
        self.cfg, self.data, self.device, self.log = cfg, data, device, log
        self.safe_point = safe_point or (lambda: None)
        cuda = device.type == "cuda"
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
        self.autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use_bf16
                         else nullcontext())
        self.channels_last = cfg.channels_last and cuda
        if cuda:
            torch.backends.cudnn.benchmark = True   # fixed input sizes: pick the fastest kernels once
        self.pin = cuda
        # nvJPEG in this process, only asked for: DataLoader workers decode in parallel with the
        # GPU step, whereas GPU decoding takes turns with it (docs/performance.md)
        self.gpu_decoder = None
        if cuda and cfg.image_decode == "gpu":
            from wsml.data.compact import GpuDecoder
            self.gpu_decoder = GpuDecoder(device, cfg.image_size)
        torch.manual_seed(cfg.seed)
        self.model: Classifier = build_model(cfg.arch, data.num_classes, cfg.weights, cfg.boostlu_alpha).to(device)
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
        self.on_batch: Callable[[StateFn], None] | None = None    # see `run`
        self.in_epoch: dict[str, Any] | None = None    # the epoch in progress, as far as done (a state's "in_epoch")

    def _optimizer(self, lr: float) -> torch.optim.Optimizer:
        """End-to-end: the backbone at `lr`, the head at `lr * lr_head_mult`, ROLE's estimator at 10x `lr`."""
        groups = [{"params": self.model.backbone.parameters(), "lr": lr},
                  {"params": self.model.head.parameters(), "lr": lr * self.cfg.lr_head_mult}]
        if self.estimator is not None:
            # no weight decay (SGD): it would pull every estimate toward 0.5 whatever the loss says
            groups.append({"params": [self.estimator], "lr": lr * ESTIMATOR_LR_MULT, "weight_decay": 0.0})
        # fused: one kernel for all parameters instead of several per tensor (the eager step is
        # launch-bound on fast GPUs)
        cuda = self.device.type == "cuda"
        if self.cfg.optimizer == "sgd":
            # SGD keeps no step counter, only momentum buffers on the parameters' device, so its
            # step needs no `capturable` to be replayed in a CUDA graph
            return torch.optim.SGD(groups, momentum=SGD_MOMENTUM, weight_decay=SGD_WEIGHT_DECAY,
                                   fused=cuda or None)
        # capturable keeps Adam's step counters on the GPU for CUDA graphs
        return torch.optim.Adam(groups, fused=cuda or None, capturable=self.use_graph)

    def _linear_optimizer(self) -> torch.optim.Adam:
        """Linear phase: Adam over the head at `linear_init_lr` and ROLE's estimator, jointly, at 10x it."""
        groups = [{"params": self.model.head.parameters(), "lr": self.cfg.linear_init_lr}]
        if self.estimator is not None:
            groups.append({"params": [self.estimator], "lr": self.cfg.linear_init_lr * ESTIMATOR_LR_MULT})
        return torch.optim.Adam(groups)

    # -- input pipeline -------------------------------------------------
    def _loader(self, images, batches: list[np.ndarray]):
        workers = 0 if isinstance(images, np.ndarray) and not isinstance(images, np.memmap) else self.cfg.num_workers
        encoded = self.gpu_decoder is not None and hasattr(images, "encoded")
        return torch.utils.data.DataLoader(_BatchReader(images, batches, encoded), batch_size=None, shuffle=False,
                                           num_workers=workers, pin_memory=self.pin)

    def _to_input(self, batch, flip: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 NHWC (or JPEG bytes and lengths, decoded here on the GPU) -> normalised float NCHW on
        the device; the flip is done here, not per image on a CPU."""
        if isinstance(batch, (tuple, list)):
            x = self.gpu_decoder(*batch).float()
        else:
            x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        if flip is not None and flip.any():
            flipped = flip.nonzero().squeeze(1)        # a CPU mask: no device sync
            x[flipped] = x[flipped].flip(3)
        x.sub_(self.mean).div_(self.std)
        # NHWC permuted is already channels_last in memory; contiguous() keeps it so for CUDA
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def _predict(self, images, features: bool = False, progress: str | None = None) -> np.ndarray:
        """Scores (or with `features` the backbone's features) of `images`; `progress` names the
        step for a progress bar (a long one: the features of a whole training split)."""
        self.model.eval()
        bs = 2 * self.cfg.batch_size
        batches = [np.arange(i, min(i + bs, len(images))) for i in range(0, len(images), bs)]
        out = []
        shown = None if progress is None else Progress(
            len(images), progress, "img", log=None if self.log is print else self.log)
        with torch.no_grad(), self.autocast:
            for _, batch in self._loader(images, batches):
                self.safe_point()
                x = self._to_input(batch)
                y = self.model.features(x) if features else torch.sigmoid(self.model(x))
                out.append(y.float().cpu())
                if shown is not None:
                    shown.update(len(y))
        if shown is not None:
            shown.close()
        return torch.cat(out).numpy()

    def evaluate(self, split: str) -> float:
        s = getattr(self.data, split)
        return mean_average_precision(self._predict(s.images), s.labels, self.data.observed_only_metric).map

    # -- LinearInit -----------------------------------------------------
    def linear_init(self) -> float:
        """Train the head (and ROLE's estimator) on features of the frozen backbone, as fine-tuning will
        start it (BatchNorm statistics estimated first where nothing set them); returns the share of the
        head's logits past +-SATURATED_LOGIT on the first fine-tuning batch, logged as a warning above
        SATURATED_SHARE.

        The head and the estimates of the best validation epoch are kept and
        fine-tuning starts from both, as in the single-positive work (its
        `train` keeps the best weights of f and g; `linear_init` passes them on).

        With BoostLU this phase trains the plain linear head (alpha = 1) and fine-tuning then uses
        alpha: the cached pooled features cannot express the boost (it acts on each CAM location
        before pooling, and the mean of boosted values is not the boost of the mean), and caching
        whole feature maps instead would take the map's h*w times the memory. The published BoostLU
        code has no LinearInit phase (it trains end to end only), so there is nothing to follow.
        """
        from wsml.data.cache import cached_array

        cfg = self.cfg
        # Without weights nothing has set BatchNorm's statistics; pretrained ones keep theirs, as the single-
        # positive work's precomputed ImageNet features did (measured: docs/method.md, "What the head is
        # trained on"). Done whether or not the features are cached, so that the model fine-tuning starts
        # from is the same either way.
        estimate = cfg.weights == "none"
        if estimate:
            self._estimate_batchnorm()
        feats = {}
        for split in ("train", "val"):
            images = getattr(self.data, split).images
            key = {"kind": "features", "version": FEATURE_VERSION, "images": self.data.image_key, "split": split,
                   "n": len(images), "backbone": weights_id(cfg.arch, cfg.weights),
                   # a randomly initialised backbone depends on the seed
                   "seed": cfg.seed if cfg.weights == "none" else None,
                   # estimated statistics depend on the training images they came from and the batch size
                   "batchnorm": ({"train_images": len(self.data.train.images), "batch_size": cfg.batch_size}
                                 if estimate else "as loaded")}

            def build(out, images=images, split=split):
                out[:] = self._predict(images, features=True, progress=f"linear-init: {split} features")

            dim = self.model.head.in_features
            feats[split] = torch.from_numpy(np.array(
                cached_array(Path(cfg.cache_dir) / "features", key, (len(images), dim), np.float32, build)))
        head = self.model.head
        opt = self._linear_optimizer()
        train_x = feats["train"].to(self.device)
        val_x = feats["val"].to(self.device)
        best = (-math.inf, None, None)
        g = torch.Generator().manual_seed(cfg.seed)
        for epoch in range(1, cfg.linear_init_epochs + 1):
            head.train()
            for idx in torch.randperm(len(train_x), generator=g).split(cfg.linear_init_batch_size):
                self.safe_point()
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
                best = (val_map, {k: v.clone() for k, v in head.state_dict().items()},
                        None if self.estimator is None else self.estimator.detach().clone())
            self.log(f"linear-init epoch {epoch}/{cfg.linear_init_epochs}  val mAP {val_map:.2f}")
        head.load_state_dict(best[1])
        if self.estimator is not None:
            with torch.no_grad():
                self.estimator.copy_(best[2])
        self.optimizer = self._optimizer(cfg.lr)   # fresh optimizer state for end-to-end training
        share = self._switch_saturation()
        line = f"linear-init: {share:.0%} of the head's logits on the first fine-tuning batch are past +-{SATURATED_LOGIT:g}"
        if share > SATURATED_SHARE:
            line = (f"warning: {line} (over {SATURATED_SHARE:.0%}): the head is saturated, fine-tuning may stay "
                    "at the label prior; the linear phase saw other features than fine-tuning computes, or its "
                    "lr is too high")
        self.log(line)
        return share

    def _estimate_batchnorm(self) -> None:
        """Set the backbone's BatchNorm statistics to their average over the training images.

        One train-mode pass without gradients, in batches of the training batch size, averaging each
        batch's statistics with equal weight (torch's `update_bn`: momentum None); no weight changes.
        Eval-mode features then match what fine-tuning computes in train mode from each batch's own
        statistics; with the initial mean 0 / variance 1 they were about 100x smaller on digits.
        """
        images, bs = self.data.train.images, self.cfg.batch_size
        batches = [np.arange(i, min(i + bs, len(images))) for i in range(0, len(images), bs)]
        shown = Progress(len(images), "linear-init: BatchNorm statistics", "img",
                         log=None if self.log is print else self.log)

        def inputs():
            for index, batch in self._loader(images, batches):
                self.safe_point()
                yield self._to_input(batch)
                shown.update(len(index))

        with self.autocast:
            torch.optim.swa_utils.update_bn(inputs(), self.model.backbone)
        shown.close()

    def _switch_saturation(self) -> float:
        """Share of the head's logits past +-SATURATED_LOGIT on the first batch fine-tuning trains on,
        computed as that step computes them (train mode, its flips); the BatchNorm statistics this forward
        pass updates are put back."""
        batches, flips = self._epoch_plan(1)
        index, batch = next(iter(self._loader(self.data.train.images, batches[:1])))
        x = self._to_input(batch, None if flips is None else flips[:len(index)])
        saved = [b.clone() for b in self.model.buffers()]
        self.model.train()
        with torch.no_grad():
            with self.autocast:
                logits = self.model(x).float()
            for b, value in zip(self.model.buffers(), saved, strict=True):
                b.copy_(value)
        return float((logits.abs() > SATURATED_LOGIT).float().mean())

    # -- one epoch -------------------------------------------------------
    def _epoch_plan(self, epoch: int) -> tuple[list[np.ndarray], torch.Tensor | None]:
        """The batches of `epoch` (image indices) and the flip of each position in them (None: no flip)."""
        cfg, n = self.cfg, len(self.data.train.labels)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)   # resumable without RNG state
        perm = torch.randperm(n, generator=g).numpy()
        flips = torch.rand(n, generator=g) < 0.5 if cfg.hflip else None
        # sorted within a batch: the memmap is read in order, labels are looked up by index anyway
        return [np.sort(perm[i:i + cfg.batch_size]) for i in range(0, n, cfg.batch_size)], flips

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, n = self.cfg, len(self.data.train.labels)
        batches, flips = self._epoch_plan(epoch)
        self.model.train()
        zero = torch.zeros((), device=self.device)
        loss_sum, modified, modified_pos = zero.clone(), zero.clone(), zero.clone()
        first = 0       # a state saved within this epoch continues after its batches, its sums included
        if self.in_epoch is not None and self.in_epoch["epoch"] == epoch:
            first = int(self.in_epoch["batch"])
            loss_sum += self.in_epoch["loss_sum"]
            modified += self.in_epoch["modified"]
            modified_pos += self.in_epoch["modified_pos"]
        self.in_epoch = None
        start = time.perf_counter()
        graph = None
        for b, (index, images) in enumerate(self._loader(self.data.train.images, batches[first:]), start=first):
            self.safe_point()
            if self.on_batch is not None:
                # nothing in a step draws from torch's global RNG (the flips and the order come from the
                # epoch's own generator), so a run continued from here trains as this one goes on
                self.in_epoch = {"epoch": epoch, "batch": b, "sums": (loss_sum, modified, modified_pos)}
                self.on_batch(self.get_state)
                self.in_epoch = None
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
                "train_seconds": seconds, "images_per_s": (n - min(n, first * cfg.batch_size)) / seconds}

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
                 "rng_torch": torch.get_rng_state(), "data": dict(self.data.fingerprint)}
        if self.estimator is not None:
            state["estimator"] = self.estimator.detach().cpu()
        if self.in_epoch is not None:
            sums = dict(zip(("loss_sum", "modified", "modified_pos"), (float(t) for t in self.in_epoch["sums"])))
            state["in_epoch"] = {"epoch": self.in_epoch["epoch"], "batch": self.in_epoch["batch"], **sums}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        # checkpoints from before a setting existed were made with its value then (Adam, no BoostLU)
        mismatch = resume_mismatch({**ADDED_LATER, **state.get("config", {})}, self.cfg.to_dict())
        if mismatch:
            raise CheckpointError(f"the checkpoint was made with {mismatch}: resume with the same settings "
                                  "or start in a new folder")
        if "data" not in state:
            self.log("note: the checkpoint records no fingerprint of its data (written before they were "
                     "recorded): not checked")
        changed = fingerprint_changes(state.get("data", {}), self.data.fingerprint)
        if changed:
            where = "" if self.cfg.dataset == "digits" else f" (data root {self.cfg.data_root})"
            raise CheckpointError(f"the training data changed since the checkpoint was made: {', '.join(changed)} "
                                  f"differ{where}: resume on the data it was made with, or start the run over "
                                  "without this checkpoint")
        self.model.load_state_dict(state["model"])
        if self.estimator is not None:
            with torch.no_grad():
                self.estimator.copy_(state["estimator"].to(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.observed = state["observed"].to(self.device, dtype=torch.int8)
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best = dict(state["best"])
        self.in_epoch = state.get("in_epoch")
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
        log: Callable[[str], None] | None = print, safe_point: Callable[[], None] | None = None,
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
    within that epoch (a checkpoint at a spot notice: orchestration/trainable.py).
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
        switch = trainer.linear_init()
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
            images_per_s=stats["images_per_s"], linear_init_saturated_frac=switch, stop=stopped)
        switch = None
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
    p.add_argument("--optimizer", default="adam",
                   help="adam or sgd (momentum 0.9, weight decay 1e-3, as the paper's code)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--mode", default="end-to-end", help="end-to-end or linear-init")
    p.add_argument("--linear-init-epochs", type=int)
    p.add_argument("--linear-init-lr", type=float, help="Adam lr of the linear phase (default: per scheme)")
    p.add_argument("--linear-init-batch-size", type=int)
    p.add_argument("--weights", help="imagenet, none, or a local ResNet-50 state-dict file")
    p.add_argument("--arch", help="resnet50 or smallcnn (default: by data set)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--data-root", help="folder in the published layout (default data/<dataset>)")
    p.add_argument("--cache-dir", help="decoded-image and feature cache (default .cache)")
    p.add_argument("--image-cache", default="auto", choices=("auto", "raw", "compact"),
                   help="raw uint8 pixels, JPEG shards, or auto: raw up to 16 GB of pixels (default auto)")
    p.add_argument("--image-decode", default="cpu", choices=("cpu", "gpu"),
                   help="compact cache: decode in the DataLoader workers, or batched on the GPU (nvJPEG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--obs-seed", type=int, default=1200, help="which positive stays observed")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA), bf16 or fp32")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--cuda-graph", action="store_true", help="capture each training step as one CUDA graph")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flip in training (default: on, off for digits)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable images (counted); refused past 1 %% of a split's images, or when a class "
                        "loses every observed positive of the training split")
    p.add_argument("--max-train-images", type=int, help="train on the first N images only (quick checks)")
    p.add_argument("--boostlu-alpha", type=float, metavar="A",
                   help="BoostLU (CVPR 2023): multiply positive class-activation-map values by A before "
                        "pooling (the authors use 5; default: off)")
    p.add_argument("--out", required=True,
                   help="output folder: new, empty, or this run's own (rerun the command to resume); it keeps "
                        "checkpoint.pt, checkpoint.pt.sha256 and metrics.json, and any other file is refused")
    p.add_argument("--accept-unverified-checkpoint", action="store_true",
                   help="resume from a checkpoint.pt whose checkpoint.pt.sha256 is missing")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        dataset=args.dataset, scheme=args.scheme, delta_rel=args.delta_rel, lr=args.lr,
        lr_head_mult=args.lr_head_mult, optimizer=args.optimizer, epochs=args.epochs,
        batch_size=args.batch_size, mode=args.mode, linear_init_epochs=args.linear_init_epochs,
        linear_init_lr=args.linear_init_lr, linear_init_batch_size=args.linear_init_batch_size,
        weights=args.weights, arch=args.arch,
        image_size=args.image_size, data_root=args.data_root, cache_dir=args.cache_dir,
        image_cache=args.image_cache, image_decode=args.image_decode, seed=args.seed,
        obs_seed=args.obs_seed, device=args.device, precision=args.precision, num_workers=args.num_workers,
        skip_bad_images=args.skip_bad_images, cuda_graph=args.cuda_graph, hflip=args.hflip,
        max_train_images=args.max_train_images, boostlu_alpha=args.boostlu_alpha).resolve()


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

    result = run(cfg, on_epoch, found.resume, safe_point=stop.check)
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
