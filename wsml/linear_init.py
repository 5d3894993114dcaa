"""LinearInit's linear phase: the head (and ROLE's estimator) trained on cached features of the frozen
backbone before fine-tuning, with the backbone's BatchNorm statistics estimated first where nothing set
them, and a guard that warns when the head is saturated at the switch to fine-tuning."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from wsml.config import filled
from wsml.metrics import mean_average_precision
from wsml.model import weights_id
from wsml.trainer import ESTIMATOR_LR_MULT, Trainer

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


def linear_init(trainer: Trainer) -> float:
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
    cfg, data, device, estimator = trainer.cfg, trainer.data, trainer.device, trainer.estimator
    epochs = filled(cfg.linear_init_epochs, "linear_init_epochs")
    batch_size = filled(cfg.linear_init_batch_size, "linear_init_batch_size")
    # Without weights nothing has set BatchNorm's statistics; pretrained ones keep theirs, as the single-
    # positive work's precomputed ImageNet features did (measured: docs/method.md, "What the head is
    # trained on"). Done whether or not the features are cached, so that the model fine-tuning starts
    # from is the same either way.
    estimate = cfg.weights == "none"
    if estimate:
        estimate_batchnorm(trainer)
    feats = _features(trainer, estimate)
    head = trainer.model.head
    opt = linear_optimizer(trainer)
    train_x = feats["train"].to(device)
    val_x = feats["val"].to(device)
    best_map, best_head, best_estimates = -math.inf, head.state_dict(), None
    g = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(1, epochs + 1):
        head.train()
        for idx in torch.randperm(len(train_x), generator=g).split(batch_size):
            trainer.safe_point()
            idx = idx.to(device)
            # epoch 0: no large-loss selection yet (it starts in epoch 2), no pseudo-labels yet (EM+APL: EM),
            # GR's schedules at their start values
            out = trainer.loss(head(train_x[idx]), idx, trainer.observed[idx], trainer.complete[idx], 0)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
        with torch.no_grad():
            scores = torch.sigmoid(head(val_x)).cpu().numpy()
        val_map = mean_average_precision(scores, data.val.labels, data.observed_only_metric).map
        if val_map > best_map:
            best_map, best_head = val_map, {k: v.clone() for k, v in head.state_dict().items()}
            best_estimates = None if estimator is None else estimator.detach().clone()
        trainer.log(f"linear-init epoch {epoch}/{epochs}  val mAP {val_map:.2f}")
    head.load_state_dict(best_head)
    if estimator is not None and best_estimates is not None:
        with torch.no_grad():
            estimator.copy_(best_estimates)
    trainer.optimizer = trainer.end_to_end_optimizer()   # fresh optimizer state for end-to-end training
    share = switch_saturation(trainer)
    line = f"linear-init: {share:.0%} of the head's logits on the first fine-tuning batch are past +-{SATURATED_LOGIT:g}"
    if share > SATURATED_SHARE:
        line = (f"warning: {line} (over {SATURATED_SHARE:.0%}): the head is saturated, fine-tuning may stay "
                "at the label prior; the linear phase saw other features than fine-tuning computes, or its "
                "lr is too high")
    trainer.log(line)
    return share


def linear_optimizer(trainer: Trainer) -> torch.optim.Adam:
    """Linear phase: Adam over the head at `linear_init_lr` and ROLE's estimator, jointly, at 10x it."""
    lr = filled(trainer.cfg.linear_init_lr, "linear_init_lr")
    groups = [{"params": trainer.model.head.parameters(), "lr": lr}]
    if trainer.estimator is not None:
        groups.append({"params": [trainer.estimator], "lr": lr * ESTIMATOR_LR_MULT})
    return torch.optim.Adam(groups)


def _features(trainer: Trainer, estimated: bool) -> dict[str, torch.Tensor]:
    """The backbone's features of the training and validation images, from the feature cache (built there
    first where missing); `estimated`: BatchNorm's statistics were estimated on the training images."""
    from wsml.data.cache import cached_array

    cfg, data = trainer.cfg, trainer.data
    feats = {}
    for split in ("train", "val"):
        images = getattr(data, split).images
        key = {"kind": "features", "version": FEATURE_VERSION, "images": data.image_key, "split": split,
               "n": len(images), "backbone": weights_id(filled(cfg.arch, "arch"), filled(cfg.weights, "weights")),
               # a randomly initialised backbone depends on the seed
               "seed": cfg.seed if cfg.weights == "none" else None,
               # estimated statistics depend on the training images they came from and the batch size
               "batchnorm": ({"train_images": len(data.train.images), "batch_size": cfg.batch_size}
                             if estimated else "as loaded")}

        def build(out, images=images, split=split):
            out[:] = trainer.predict(images, features=True, progress=f"linear-init: {split} features")

        dim = trainer.model.head.in_features
        feats[split] = torch.from_numpy(np.array(
            cached_array(Path(filled(cfg.cache_dir, "cache_dir")) / "features", key, (len(images), dim),
                         np.dtype(np.float32), build)))
    return feats


def estimate_batchnorm(trainer: Trainer) -> None:
    """Set the backbone's BatchNorm statistics to their average over the training images.

    One train-mode pass without gradients, in batches of the training batch size, averaging each
    batch's statistics with equal weight (torch's `update_bn`: momentum None); no weight changes.
    Eval-mode features then match what fine-tuning computes in train mode from each batch's own
    statistics; with the initial mean 0 / variance 1 they were about 100x smaller on digits.
    """
    images, bs = trainer.data.train.images, trainer.batch_size
    batches = [np.arange(i, min(i + bs, len(images))) for i in range(0, len(images), bs)]
    shown = trainer.progress(len(images), "linear-init: BatchNorm statistics")

    def inputs():
        for index, batch in trainer.loader(images, batches):
            trainer.safe_point()
            yield trainer.to_input(batch)
            shown.update(len(index))

    with trainer.autocast:
        torch.optim.swa_utils.update_bn(inputs(), trainer.model.backbone)
    shown.close()


def switch_saturation(trainer: Trainer) -> float:
    """Share of the head's logits past +-SATURATED_LOGIT on the first batch fine-tuning trains on,
    computed as that step computes them (train mode, its flips); the BatchNorm statistics this forward
    pass updates are put back."""
    model = trainer.model
    batches, flips = trainer.epoch_plan(1)
    index, batch = next(iter(trainer.loader(trainer.data.train.images, batches[:1])))
    x = trainer.to_input(batch, None if flips is None else flips[:len(index)])
    saved = [b.clone() for b in model.buffers()]
    model.train()
    with torch.no_grad():
        with trainer.autocast:
            logits = model(x).float()
        for b, value in zip(model.buffers(), saved, strict=True):
            b.copy_(value)
    return float((logits.abs() > SATURATED_LOGIT).float().mean())
