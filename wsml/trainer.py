"""The trainer of one run: model, optimizer, input pipeline, one epoch of training, evaluation, and its
complete state.

The label state a scheme keeps (wsml/schemes.py, `Scheme.state`: LL-Cp's corrections in the label
matrix, ROLE's estimator, EM+APL's soft pseudo-labels) lives in this process, on the training device,
looked up by image index; DataLoader workers only read images. Everything needed to continue a run
exactly (model, optimizer, epoch, labels, label state, history, best-so-far, RNG) is in `get_state()`.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, TypedDict, cast

import numpy as np
import torch
from torch import nn

from wsml import schemes
from wsml.config import TrainConfig, filled, resume_mismatch
from wsml.data.loading import WSMLData, fingerprint_changes
from wsml.errors import CheckpointError, TrainingDiverged
from wsml.losses import LossOutput, init_role_estimator, scheme_loss
from wsml.methods.ack_the_unknown import apl_initial_soft_labels, apl_params, apl_update, apl_update_due
from wsml.metrics import mean_average_precision
from wsml.model import IMAGENET_MEAN, IMAGENET_STD, Classifier, build_model
from wsml.progress import Progress

if TYPE_CHECKING:     # nvJPEG's decoder is imported only when asked for
    from wsml.data.compact_images import GpuDecoder

StateFn = Callable[[], dict]
# A step's outputs: the batch's mean loss, the entries the scheme selected, the batch's complete labels
StepOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

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


class Best(TypedDict):
    """The best validation epoch so far, and the test mAP there (None before the first epoch)."""

    val_map: float
    epoch: int
    test_map: float | None


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
    """Trains `cfg` (resolved) on `data`; `log` gets its lines, `safe_point()` is called before every batch."""

    def __init__(self, cfg: TrainConfig, data: WSMLData, device: torch.device, log: Callable[[str], None],
                 safe_point: Callable[[], None] | None = None):
        self.cfg, self.data, self.device, self.log = cfg, data, device, log
        self.safe_point = safe_point or (lambda: None)
        # the settings resolve() filled in, typed as filled
        self.lr, self.batch_size = filled(cfg.lr, "lr"), filled(cfg.batch_size, "batch_size")
        self.delta_rel = filled(cfg.delta_rel, "delta_rel")
        cuda = device.type == "cuda"
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
        self.autocast: AbstractContextManager = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                                                 if use_bf16 else nullcontext())
        self.channels_last = cfg.channels_last and cuda
        if cuda:
            torch.backends.cudnn.benchmark = True   # fixed input sizes: pick the fastest kernels once
        self.pin = cuda
        # nvJPEG in this process, only asked for: DataLoader workers decode in parallel with the
        # GPU step, whereas GPU decoding takes turns with it (docs/performance.md)
        self.gpu_decoder: GpuDecoder | None = None
        if cuda and cfg.image_decode == "gpu":
            from wsml.data.compact_images import GpuDecoder
            self.gpu_decoder = GpuDecoder(device, filled(cfg.image_size, "image_size"))
        torch.manual_seed(cfg.seed)
        self.model: Classifier = build_model(filled(cfg.arch, "arch"), data.num_classes, filled(cfg.weights, "weights"),
                                             cfg.boostlu_alpha).to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # on the 0-255 scale, so normalising is one subtract and one divide in place
        self.mean = 255 * torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = 255 * torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.observed = torch.as_tensor(data.train_observed, dtype=torch.int8, device=device)
        self.complete = torch.as_tensor(data.train.labels, dtype=torch.int8, device=device)
        self.scheme = schemes.REGISTRY[cfg.scheme]
        self.epochs = filled(cfg.epochs, "epochs")
        self.estimator: nn.Parameter | None = None
        if self.scheme.state == schemes.ROLE_ESTIMATOR:
            g = torch.Generator().manual_seed(cfg.seed)
            self.estimator = nn.Parameter(init_role_estimator(self.observed.cpu(), g).to(device))
        # EM+APL: the soft pseudo-negative labels of the training set (N x C, NaN: none), replaced after the
        # training passes `apl_update_due` names; never written in place (a state holds the tensor itself)
        self.soft_labels: torch.Tensor | None = None
        if self.scheme.state == schemes.APL_SOFT_LABELS:
            self.soft_labels = apl_initial_soft_labels(self.observed)
        self.use_graph = cfg.cuda_graph and device.type == "cuda"
        self._graph_warm = False
        self.optimizer = self.end_to_end_optimizer()
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best = Best(val_map=-math.inf, epoch=0, test_map=None)
        self.on_batch: Callable[[StateFn], None] | None = None    # see `wsml.train.run`
        self.in_epoch: dict[str, Any] | None = None    # the epoch in progress, as far as done (a state's "in_epoch")

    def end_to_end_optimizer(self) -> torch.optim.Optimizer:
        """A fresh optimizer: the backbone at `lr`, the head at `lr * lr_head_mult`, ROLE's estimator at 10x `lr`."""
        lr = self.lr
        groups: list[dict[str, Any]] = [
            {"params": self.model.backbone.parameters(), "lr": lr},
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

    # -- input pipeline -------------------------------------------------
    def loader(self, images, batches: list[np.ndarray]) -> torch.utils.data.DataLoader:
        """(index, images) of each batch of `images`, read in DataLoader workers (none for in-memory arrays)."""
        workers = 0 if isinstance(images, np.ndarray) and not isinstance(images, np.memmap) else self.cfg.num_workers
        encoded = self.gpu_decoder is not None and hasattr(images, "encoded")
        return torch.utils.data.DataLoader(_BatchReader(images, batches, encoded), batch_size=None, shuffle=False,
                                           num_workers=workers, pin_memory=self.pin)

    def to_input(self, batch, flip: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 NHWC (or JPEG bytes and lengths, decoded here on the GPU) -> normalised float NCHW on
        the device; the flip is done here, not per image on a CPU."""
        if isinstance(batch, (tuple, list)):
            assert self.gpu_decoder is not None     # the loader hands over bytes only to a decoder
            x = self.gpu_decoder(*batch).float()
        else:
            x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        if flip is not None and flip.any():
            flipped = flip.nonzero().squeeze(1)        # a CPU mask: no device sync
            x[flipped] = x[flipped].flip(3)
        x.sub_(self.mean).div_(self.std)
        # NHWC permuted is already channels_last in memory; contiguous() keeps it so for CUDA
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def progress(self, total: int, desc: str) -> Progress:
        """Progress of a long step over `total` images: a bar on the command line's terminal (`log` is
        print there), else lines to `log`."""
        return Progress(total, desc, "img", log=None if self.log is print else self.log)

    def predict(self, images, features: bool = False, progress: str | None = None) -> np.ndarray:
        """Scores (or with `features` the backbone's features) of `images`; `progress` names the
        step for a progress bar (a long one: the features of a whole training split)."""
        self.model.eval()
        bs = 2 * self.batch_size
        batches = [np.arange(i, min(i + bs, len(images))) for i in range(0, len(images), bs)]
        out = []
        shown = None if progress is None else self.progress(len(images), progress)
        with torch.no_grad(), self.autocast:
            for _, batch in self.loader(images, batches):
                self.safe_point()
                x = self.to_input(batch)
                y = self.model.features(x) if features else torch.sigmoid(self.model(x))
                out.append(y.float().cpu())
                if shown is not None:
                    shown.update(len(y))
        if shown is not None:
            shown.close()
        return torch.cat(out).numpy()

    def evaluate(self, split: str) -> float:
        s = getattr(self.data, split)
        return mean_average_precision(self.predict(s.images), s.labels, self.data.observed_only_metric).map

    # -- one epoch -------------------------------------------------------
    def epoch_plan(self, epoch: int) -> tuple[list[np.ndarray], torch.Tensor | None]:
        """The batches of `epoch` (image indices) and the flip of each position in them (None: no flip)."""
        cfg, n, bs = self.cfg, len(self.data.train.labels), self.batch_size
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)   # resumable without RNG state
        perm = torch.randperm(n, generator=g).numpy()
        flips = torch.rand(n, generator=g) < 0.5 if cfg.hflip else None
        # sorted within a batch: the memmap is read in order, labels are looked up by index anyway
        return [np.sort(perm[i:i + bs]) for i in range(0, n, bs)], flips

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, n, bs = self.cfg, len(self.data.train.labels), self.batch_size
        batches, flips = self.epoch_plan(epoch)
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
        for b, (index, images) in enumerate(self.loader(self.data.train.images, batches[first:]), start=first):
            self.safe_point()
            if self.on_batch is not None:
                # nothing in a step draws from torch's global RNG (the flips and the order come from the
                # epoch's own generator), so a run continued from here trains as this one goes on
                self.in_epoch = {"epoch": epoch, "batch": b, "sums": (loss_sum, modified, modified_pos)}
                self.on_batch(self.get_state)
                self.in_epoch = None
            flip = None if flips is None else flips[b * bs: b * bs + len(index)]
            x = self.to_input(images, flip)
            index = index.to(self.device, non_blocking=True)
            if self.use_graph and len(index) == bs:
                graph = graph or _GraphedStep(self, epoch, x, index, warmup=not self._graph_warm)
                self._graph_warm = True
                loss, selected, complete = graph(x, index)
            else:
                loss, selected, complete = self._step(x, index, epoch)
            loss_sum += loss * len(index)
            modified += selected.sum()
            modified_pos += (selected & (complete == 1)).sum()
        seconds = time.perf_counter() - start
        mean_loss = float(loss_sum) / n
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"training loss became {mean_loss} in epoch {epoch} (scheme {cfg.scheme}, "
                                   f"lr {self.lr:g}): lower the learning rate")
        n_modified, n_modified_pos = float(modified), float(modified_pos)
        self.after_training_pass(epoch)
        return {"train_loss": mean_loss, "modified_frac": n_modified / (n * self.data.num_classes),
                "modified_true_pos_frac": n_modified_pos / n_modified if n_modified else math.nan,
                "train_seconds": seconds, "images_per_s": (n - min(n, first * bs)) / seconds}

    def after_training_pass(self, epoch: int) -> None:
        """EM+APL: after the training pass of `epoch`, where `apl_update_due`, new pseudo-labels from the
        eval-mode model's predictions on every training image. Made with the evaluation transform (no
        flips), where the published code predicted on its training loader's (flipped) images
        (AckTheUnknown main.py, its pseudo-labelling pass): our choice, so that the labels depend on the
        model alone, not on the epoch's flips."""
        if self.soft_labels is None or not apl_update_due(epoch, self.epochs, apl_params(self.cfg)):
            return
        images = self.data.train.images
        # a bar where the pass takes a while (a benchmark's training split), not for digits' 3,000 images
        preds = torch.from_numpy(self.predict(images, progress="APL: training-set predictions"
                                              if len(images) > 20_000 else None))
        self.soft_labels = apl_update(self.observed, self.soft_labels, preds, epoch, self.epochs, apl_params(self.cfg))

    def loss(self, logits: torch.Tensor, index: torch.Tensor, observed: torch.Tensor, complete: torch.Tensor,
             epoch: int) -> LossOutput:
        """The scheme's loss of the batch of training images `index` (epoch 0: LinearInit's linear phase)."""
        est = self.estimator[index] if self.estimator is not None else None
        soft = self.soft_labels[index] if self.soft_labels is not None else None
        return scheme_loss(self.cfg.scheme, logits, observed, complete, epoch, self.delta_rel,
                           self.data.expected_positives, est, soft_labels=soft, epochs=self.epochs, config=self.cfg)

    def _step(self, x: torch.Tensor, index: torch.Tensor, epoch: int) -> StepOutputs:
        """Forward, the scheme's loss, backward, optimizer step; LL-Cp writes its flips."""
        observed = self.observed[index]
        complete = self.complete[index]
        with self.autocast:
            logits = self.model(x)
        out = self.loss(logits, index, observed, complete, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        if self.scheme.state == schemes.LL_FLIPS:
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
        if self.soft_labels is not None:
            state["soft_labels"] = self.soft_labels.cpu()
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
        if self.soft_labels is not None:
            if "soft_labels" not in state:
                raise CheckpointError(f"the checkpoint holds no soft labels of {self.cfg.scheme}: start the run over "
                                      "without it")
            self.soft_labels = state["soft_labels"].to(self.device, dtype=torch.float32)
        self.optimizer.load_state_dict(state["optimizer"])
        self.observed = state["observed"].to(self.device, dtype=torch.int8)
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best = cast(Best, dict(state["best"]))   # as get_state wrote it
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
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: StepOutputs | None = None

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> StepOutputs:
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
        if self.graph is None or self.outputs is None:
            self.graph = torch.cuda.CUDAGraph()
            self.trainer.optimizer.zero_grad(set_to_none=True)
            # thread_local: the DataLoader's pin-memory thread may call CUDA during the capture
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = self.trainer._step(self.x, self.index, self.epoch)
        self.graph.replay()
        return self.outputs
