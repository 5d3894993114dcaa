"""LinearInit's linear phase sees the features fine-tuning will compute (issue 25).

On `digits` the backbone is trained from scratch (`weights=none`): its BatchNorm statistics were never
set, so features extracted in eval mode with the initial mean 0 / variance 1 were ~100x smaller than
fine-tuning's train-mode ones on the same images, the head saturated on them and several seeds
collapsed. The trainer now estimates the statistics on the training images before it extracts
features, keys the feature cache by that, and checks the head at the switch to fine-tuning.
"""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import wsml.linear_init
from wsml.config import TrainConfig
from wsml.data.cache import cached_array
from wsml.data.loading import load_data
from wsml.model import weights_id
from wsml.linear_init import FEATURE_VERSION, SATURATED_LOGIT, SATURATED_SHARE, linear_init, switch_saturation
from wsml.train import run
from wsml.trainer import Trainer

pytestmark = pytest.mark.slow

# "a few hundred images": enough for seed 1 to saturate the head the old way
SMALL = dict(dataset="digits", scheme="AN", mode="linear-init", max_train_images=300, num_workers=0, device="cpu")


def _trainer(cache: Path, **kw) -> Trainer:
    cfg = TrainConfig(**{**SMALL, "cache_dir": str(cache), **kw}).resolve()
    return Trainer(cfg, load_data(cfg), torch.device("cpu"), log=lambda _m: None)


def _cache_entries(cache: Path, split: str) -> list[tuple[dict, np.ndarray]]:
    """(key, features) of every feature-cache entry of `split`, read from disk as a later trial would."""
    found = []
    for entry in sorted((cache / "features").iterdir()):
        if entry.is_dir():
            key = json.loads((entry / "key.json").read_text())
            if key["split"] == split:
                found.append((key, np.load(entry / "array.npy")))
    return found


def _train_mode_features(trainer: Trainer) -> torch.Tensor:
    """The training images' features as fine-tuning computes them: train mode, in its batch size (on a copy,
    whose BatchNorm statistics this pass moves)."""
    model = copy.deepcopy(trainer.model).train()
    images, bs = trainer.data.train.images, trainer.cfg.batch_size
    with torch.no_grad():
        return torch.cat([model.features(trainer.to_input(torch.from_numpy(np.ascontiguousarray(images[i:i + bs]))))
                          for i in range(0, len(images), bs)])


def _centred_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the two feature matrices after each loses its mean feature vector (a constant offset
    between them, which the head's bias absorbs, does not count)."""
    a, b = a - a.mean(0), b - b.mean(0)
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("seed", [0, 1])
def test_cached_features_match_what_fine_tuning_computes(tmp_path, seed):
    # before the fix: size ratio 124 (seed 0) and 91 (seed 1), centred cosine 0.71 and 0.80, and seed 1's
    # head gave logits up to 22.5 on fine-tuning's features (76 % of them past 10)
    trainer = _trainer(tmp_path, seed=seed)
    linear_init(trainer)
    [(_, cached)] = _cache_entries(tmp_path, "train")
    cached = torch.from_numpy(cached)
    live = _train_mode_features(trainer)
    ratio = float(live.norm(dim=1).mean() / cached.norm(dim=1).mean())
    assert 0.8 < ratio < 1.25
    assert _centred_cosine(cached, live) > 0.95
    with torch.no_grad():
        logits = trainer.model.head(live)
    assert logits.abs().max() < 10


def test_features_and_model_are_the_same_with_a_cold_or_a_warm_cache(tmp_path):
    cold = _trainer(tmp_path, seed=1)
    linear_init(cold)
    [(_, built)] = _cache_entries(tmp_path, "train")
    warm = _trainer(tmp_path, seed=1)
    linear_init(warm)
    [(_, read)] = _cache_entries(tmp_path, "train")       # no second entry: the warm run read the first
    assert np.array_equal(built, read)
    # the model fine-tuning starts from (estimated statistics included) is the one the cache was built with
    for name, value in cold.model.state_dict().items():
        assert torch.equal(warm.model.state_dict()[name], value), name
    assert np.array_equal(warm.predict(warm.data.train.images, features=True), read)


def test_features_cached_the_old_way_are_never_read(tmp_path):
    trainer = _trainer(tmp_path, seed=1)
    cfg = trainer.cfg
    dim = trainer.model.head.in_features
    for split in ("train", "val"):
        images = getattr(trainer.data, split).images
        # the key every entry had before issue 25, with features as tiny as the unset statistics gave them
        old = {"kind": "features", "images": trainer.data.image_key, "split": split, "n": len(images),
               "backbone": weights_id(cfg.arch, cfg.weights), "seed": cfg.seed}
        cached_array(tmp_path / "features", old, (len(images), dim), np.float32, lambda out: out.fill(5e-3))
    linear_init(trainer)
    entries = _cache_entries(tmp_path, "train")
    assert len(entries) == 2
    [(key, features)] = [(k, f) for k, f in entries if k.get("version") == FEATURE_VERSION]
    assert key["batchnorm"] == {"train_images": 300, "batch_size": cfg.batch_size}
    assert np.array_equal(trainer.predict(trainer.data.train.images, features=True), features)


def test_the_switch_check_sees_the_first_fine_tuning_batch_and_changes_nothing(tmp_path):
    trainer = _trainer(tmp_path, seed=0, hflip=True)    # with flips: the check must flip as the step does
    linear_init(trainer)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    seen = []
    trainer.model.head.register_forward_hook(lambda _m, _x, out: seen.append(out.detach().clone()))
    share = switch_saturation(trainer)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[name]), name     # BatchNorm's statistics put back
    trainer.train_epoch(1)
    assert torch.equal(seen[0], seen[1])                  # the very logits of fine-tuning's first step
    assert share == float((seen[0].abs() > SATURATED_LOGIT).float().mean())


def test_a_saturated_head_is_reported_in_the_log_and_the_metrics(tmp_path, monkeypatch):
    # the bug itself: features extracted with the statistics never set (seed 1 saturated 76 % of logits)
    monkeypatch.setattr(wsml.linear_init, "estimate_batchnorm", lambda trainer: None)
    lines, reports = [], []
    cfg = TrainConfig(**SMALL, seed=1, epochs=2, stop_drop=None, cache_dir=str(tmp_path))
    result = run(cfg, lambda report, _state: reports.append(report), log=lines.append)
    share = result.history[0]["linear_init_saturated_frac"]
    assert share > SATURATED_SHARE and reports[0].linear_init_saturated_frac == share
    assert "linear_init_saturated_frac" not in result.history[1]      # measured once, at the switch
    [warning] = [line for line in lines if line.startswith("warning:")]
    assert f"{share:.0%} of the head's logits on the first fine-tuning batch are past +-10" in warning


def test_a_healthy_head_is_reported_without_a_warning(tmp_path):
    lines = []
    cfg = TrainConfig(**SMALL, seed=1, epochs=1, cache_dir=str(tmp_path))
    result = run(cfg, log=lines.append)
    assert result.history[0]["linear_init_saturated_frac"] < SATURATED_SHARE
    assert not any(line.startswith("warning:") for line in lines)
    assert any(line.startswith("linear-init: ") and "past +-10" in line for line in lines)
