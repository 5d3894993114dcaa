"""One training run end to end on `digits`: the API, resume, checkpoints, the CLI, bad input."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import checkpoint_saver
import torch

from wsml.checkpoint import load_checkpoint, save_checkpoint
from wsml.config import TrainConfig
from wsml.errors import CheckpointError, ConfigError, TrainingDiverged
from wsml.linear_init import linear_init, linear_optimizer
from wsml.train import run
from wsml.trainer import Trainer

SMALL = dict(dataset="digits", max_train_images=256, epochs=3, num_workers=0, device="cpu")


def test_digits_data_is_deterministic_and_multilabel():
    from wsml.data.digits import make_digits
    a, b = make_digits(), make_digits()
    for split in ("train", "val", "test"):
        assert np.array_equal(a[split][0], b[split][0]) and np.array_equal(a[split][1], b[split][1])
    images, labels = a["train"]
    assert images.shape == (3000, 32, 32, 3) and images.dtype == np.uint8
    positives = labels.sum(1)
    assert positives.min() >= 1 and positives.max() <= 4
    assert 2.0 < positives.mean() < 2.6


def test_protocol_split_and_single_positive():
    from wsml.data.protocol import observe_single_positive, split_train_val
    train, val = split_train_val(100, 0.2, 1200)
    assert len(val) == 20 and len(train) == 80 and not set(train) & set(val)
    labels = np.array([[1, 1, 0, -1], [0, 1, 1, 1], [1, 0, 0, 0]], dtype=np.int8)
    obs = observe_single_positive(labels, 1200)
    assert (obs == 1).sum(1).tolist() == [1, 1, 1]
    assert np.all(labels[obs == 1] == 1)           # the kept one is a true positive
    assert obs[0, 3] == -1                         # observed negatives stay observed
    assert np.array_equal(obs, observe_single_positive(labels, 1200))


@pytest.mark.slow
def test_resume_continues_exactly_with_llcp_corrections(tmp_path):
    cfg = TrainConfig(scheme="LL-Cp", delta_rel=5.0, **SMALL)
    full = run(cfg, log=None)

    def stop_after_two(report, get_state):
        if report.epoch == 2:
            save_checkpoint(tmp_path / "ckpt.pt", get_state())
            return True
        return None

    partial = run(cfg, stop_after_two, log=None)
    assert len(partial.history) == 2
    state = load_checkpoint(tmp_path / "ckpt.pt")
    initial_observed = int((state["observed"] == 1).sum())
    # LL-Cp's flips are in the checkpoint: more observed positives than one per image
    assert initial_observed > 256
    resumed = run(cfg, resume_state=state, log=None)
    assert [h["val_map"] for h in resumed.history] == [h["val_map"] for h in full.history]
    assert resumed.test_map == full.test_map
    assert len(resumed.history) == 3


def test_modified_entries_and_true_positive_fraction_reported():
    result = run(TrainConfig(scheme="LL-R", delta_rel=4.0, **SMALL), log=None)
    first, second, third = result.history
    assert first["modified_frac"] == 0 and math.isnan(first["modified_true_pos_frac"])
    # k = ceil(32 * 10 * (t-1) * 4 / 100) per full batch of 32: 13 in epoch 2, 26 in epoch 3 (8 batches)
    assert math.isclose(second["modified_frac"], 13 * 8 / 2560)
    assert math.isclose(third["modified_frac"], 26 * 8 / 2560)
    assert 0 < second["modified_true_pos_frac"] <= 1


def _chance_map(cfg: TrainConfig) -> float:
    """The mAP of scores that ignore the image: each class's AP is then its positive rate."""
    from wsml.data.loading import load_data

    return 100 * float((load_data(cfg.resolve()).test.labels == 1).mean(0).mean())


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["full", "AN", "WAN", "LSAN", "EPR", "ROLE", "LL-Ct"])
def test_every_scheme_trains(scheme):
    cfg = TrainConfig(scheme=scheme, **{**SMALL, "epochs": 1})
    result = run(cfg, log=None)
    assert result.best_epoch == 1 and result.test_map == result.history[0]["test_map_at_best"]
    assert result.test_map > _chance_map(cfg) + 2          # one epoch on 256 mosaics learns something


@pytest.mark.slow
def test_reported_test_map_is_the_map_of_the_best_epochs_model():
    """test_map is scikit-learn's per-class AP, averaged, of the best validation epoch's model on the
    test set, recomputed here from that epoch's saved state."""
    from sklearn.metrics import average_precision_score

    from wsml.data.loading import load_data
    from wsml.model import IMAGENET_MEAN, IMAGENET_STD, build_model

    cfg = TrainConfig(scheme="LL-R", stop_drop=None, **SMALL).resolve()
    weights = {}     # the state's tensors are the live parameters: copy them at each epoch

    def keep(report, get_state):
        weights[report.epoch] = {k: v.clone() for k, v in get_state()["model"].items()}

    result = run(cfg, on_epoch=keep, log=None)
    data = load_data(cfg)
    model = build_model(cfg.arch, data.num_classes, cfg.weights)
    model.load_state_dict(weights[result.best_epoch])
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(data.test.images)).permute(0, 3, 1, 2).float()
    x = (x - 255 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / (255 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    with torch.no_grad():
        scores = torch.sigmoid(model(x)).numpy()
    labels = data.test.labels == 1
    expected = 100 * np.mean([average_precision_score(labels[:, c], scores[:, c]) for c in range(labels.shape[1])])
    # the trainer scores in batches, this in one: the kernels' float sums differ (4e-4 mAP points seen with
    # torch 2.14.1's cu130 wheel on a CPU), far below what an epoch changes
    assert result.test_map == pytest.approx(expected, abs=5e-3)
    assert result.test_map > _chance_map(cfg) + 5


@pytest.mark.slow
def test_linear_init_trains_head_then_end_to_end(tmp_path):
    lines = []
    cfg = TrainConfig(scheme="LL-R", mode="linear-init", linear_init_epochs=2, cache_dir=str(tmp_path),
                      stop_drop=None, **SMALL)   # all 3 epochs, whatever val mAP does
    result = run(cfg, log=lines.append)
    assert sum(line.startswith("linear-init epoch") for line in lines) == 2
    assert len(result.history) == 3
    assert any((tmp_path / "features").iterdir())   # features extracted once, into the shared cache


def _role_trainer(tmp_path, **kw):
    from wsml.data.loading import load_data
    settings = {**SMALL, "scheme": "ROLE", "mode": "linear-init", "linear_init_epochs": 2,
                "cache_dir": str(tmp_path), **kw}
    cfg = TrainConfig(**settings).resolve()
    return Trainer(cfg, load_data(cfg), torch.device("cpu"), log=lambda _m: None)


@pytest.mark.slow
def test_role_estimator_learns_in_the_linear_phase_and_fine_tuning_starts_from_it(tmp_path):
    trainer = _role_trainer(tmp_path)
    cfg = trainer.cfg
    initial = trainer.estimator.detach().clone()
    # one Adam over the head and the estimator, the estimator at 10x the linear phase's lr
    linear = linear_optimizer(trainer)
    assert [g["lr"] for g in linear.param_groups] == [cfg.linear_init_lr, 10 * cfg.linear_init_lr]
    assert linear.param_groups[1]["params"] == [trainer.estimator]
    linear_init(trainer)
    after_linear = trainer.estimator.detach().clone()
    changed = (after_linear != initial)
    assert changed.float().mean() > 0.5        # the estimates moved in the linear phase
    # fine-tuning optimises this very estimator (not a fresh one), at 10x the fine-tuning lr
    estimator_group = trainer.optimizer.param_groups[2]
    assert estimator_group["params"] == [trainer.estimator] and estimator_group["lr"] == 10 * cfg.lr
    assert torch.equal(trainer.get_state()["estimator"], after_linear)
    trainer.train_epoch(1)
    assert not torch.equal(trainer.estimator.detach(), after_linear)    # and it keeps learning in fine-tuning


@pytest.mark.slow
def test_role_linear_init_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = TrainConfig(scheme="ROLE", mode="linear-init", linear_init_epochs=2, cache_dir=str(tmp_path),
                      stop_drop=None, **SMALL)

    full = run(cfg, checkpoint_saver(tmp_path / "full"), log=None)
    after_two = load_checkpoint(tmp_path / "full" / "epoch2.pt")
    init = _role_trainer(tmp_path).estimator.detach()
    assert after_two["estimator"].shape == init.shape and not torch.equal(after_two["estimator"], init)
    resumed = run(cfg, checkpoint_saver(tmp_path / "resumed"), resume_state=after_two, log=None)
    assert [h["val_map"] for h in resumed.history] == [h["val_map"] for h in full.history]
    assert resumed.test_map == full.test_map
    final, final_resumed = (load_checkpoint(tmp_path / d / "epoch3.pt") for d in ("full", "resumed"))
    assert torch.equal(final_resumed["estimator"], final["estimator"])
    for name, value in final["model"].items():
        assert torch.equal(final_resumed["model"][name], value), name


def test_linear_phase_defaults_follow_the_single_positive_work():
    # its train.py, lookup['linear_init_params'] and 25 epochs; the other schemes take the closest loss
    role = TrainConfig(dataset="pascal", scheme="ROLE").resolve()
    assert (role.linear_init_epochs, role.linear_init_lr, role.linear_init_batch_size) == (25, 1e-3, 16)
    lsan = TrainConfig(dataset="nuswide", scheme="LSAN").resolve()
    assert (lsan.linear_init_epochs, lsan.linear_init_lr, lsan.linear_init_batch_size) == (25, 1e-4, 16)
    assert TrainConfig(dataset="cub", scheme="ROLE").resolve().linear_init_batch_size == 8
    assert TrainConfig(dataset="coco", scheme="EPR").resolve().linear_init_lr == 1e-3
    assert TrainConfig(dataset="coco", scheme="LL-Ct").resolve().linear_init_lr == 1e-4
    assert TrainConfig(dataset="coco", scheme="ROLE", linear_init_lr=3e-4).resolve().linear_init_lr == 3e-4


def test_sgd_is_built_as_the_papers_code_builds_it(tmp_path):
    trainer = _role_trainer(tmp_path, optimizer="sgd", lr=0.01, mode="end-to-end")
    opt = trainer.optimizer
    assert isinstance(opt, torch.optim.SGD)
    backbone, head, estimator = opt.param_groups
    assert (backbone["lr"], head["lr"], estimator["lr"]) == (0.01, 0.1, 0.1)
    assert backbone["momentum"] == head["momentum"] == 0.9
    assert backbone["weight_decay"] == head["weight_decay"] == 1e-3 and estimator["weight_decay"] == 0
    with pytest.raises(ConfigError, match="optimizer='rmsprop'"):
        TrainConfig(optimizer="rmsprop").resolve()


@pytest.mark.slow
def test_divergence_is_reported():
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        run(TrainConfig(scheme="AN", lr=1e30, **{**SMALL, "epochs": 2}), log=None)


def test_bad_config_values():
    with pytest.raises(ConfigError, match="unknown data set 'imagenet'"):
        TrainConfig(dataset="imagenet").resolve()
    with pytest.raises(ConfigError, match="delta_rel"):
        TrainConfig(delta_rel=-1).resolve()
    with pytest.raises(ConfigError, match="scheme"):
        TrainConfig(scheme="LL-X").resolve()


def test_truncated_checkpoint_detected(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(1000)})
    assert load_checkpoint(path)["epoch"] == 1
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    (tmp_path / "c.pt.sha256").unlink()      # without the checksum file: refused unless accepted
    with pytest.raises(CheckpointError, match="has no c.pt.sha256 beside it"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="cannot be read"):   # accepted, a torn zip is still caught
        load_checkpoint(path, accept_unverified=True)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "wsml.train", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow
def test_cli_writes_metrics_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", "digits", "--scheme", "LL-Ct", "--epochs", "2", "--max-train-images", "128",
            "--device", "cpu", "--out", str(out)]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("epoch ") >= 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"test_map", "best_val_map", "best_epoch", "history"} <= set(metrics)
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert {"epoch", "val_map", "train_loss"} <= set(metrics["history"][0])
    # a longer budget on the same folder continues after epoch 2 instead of starting over
    more = _cli(*args[:4], "--epochs", "3", *args[6:])
    assert more.returncode == 0, more.stderr
    assert "resumed after epoch 2" in more.stdout and "epoch 1/3" not in more.stdout
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 3
    # a different setting on the same folder is refused, naming the key
    other = _cli(*[a if a != "LL-Ct" else "LL-R" for a in args])
    assert other.returncode == 2 and "scheme='LL-Ct'" in other.stderr and len(other.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_sgd_trains_and_refuses_to_resume_with_adam(tmp_path):
    out = tmp_path / "sgd"
    args = ["--dataset", "digits", "--scheme", "LL-R", "--lr", "0.01", "--epochs", "2", "--max-train-images", "128",
            "--device", "cpu", "--out", str(out)]
    first = _cli(*args, "--optimizer", "sgd")
    assert first.returncode == 0, first.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["optimizer"] == "sgd" and len(metrics["history"]) == 2
    assert 0 < metrics["test_map"] <= 100
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["config"]["optimizer"] == "sgd"
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values())   # SGD's state, not Adam's
    before = (out / "metrics.json").read_bytes(), (out / "checkpoint.pt").read_bytes()
    other = _cli(*args, "--epochs", "3", "--optimizer", "adam")
    lines = other.stderr.strip().splitlines()
    assert other.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "optimizer='sgd'" in lines[0] and "optimizer='adam'" in lines[0]
    assert ((out / "metrics.json").read_bytes(), (out / "checkpoint.pt").read_bytes()) == before


@pytest.mark.slow
def test_cli_bad_input_one_line_no_output(tmp_path):
    out = tmp_path / "run"
    bad = _cli("--dataset", "imagenet", "--out", str(out))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert "unknown data set" in bad.stderr and not out.exists()
    missing = _cli("--dataset", "pascal", "--data-root", str(tmp_path / "nope"), "--weights", "none",
                   "--out", str(out))
    assert missing.returncode == 2 and "error:" in missing.stderr and not (out / "metrics.json").exists()


@pytest.mark.slow
def test_benchmark_path_prepared_voc_through_image_cache(tmp_path):
    """Official VOC layout -> prepare -> protocol split + single positives -> image cache -> ResNet-50 run."""
    from tests.fixtures_official import make_voc
    from wsml.data.prepare import prepare

    make_voc(tmp_path / "raw")
    prepare("pascal", tmp_path / "raw", tmp_path / "pascal")
    cfg = TrainConfig(dataset="pascal", data_root=str(tmp_path / "pascal"), cache_dir=str(tmp_path / "cache"),
                      weights="none", image_size=32, epochs=2, batch_size=4, scheme="LL-R", delta_rel=10.0,
                      device="cpu", num_workers=0, val_frac=0.34)
    result = run(cfg, log=None)
    assert len(result.history) == 2 and math.isfinite(result.test_map)
    assert result.test_map == result.history[result.best_epoch - 1]["test_map_at_best"]
    assert list((tmp_path / "cache" / "images").iterdir())   # decoded once, into the shared cache


@pytest.mark.slow
def test_hflip_is_a_data_set_default():
    assert TrainConfig(dataset="digits").resolve().hflip is False      # a mirrored digit is not a digit
    assert TrainConfig(dataset="pascal").resolve().hflip is True       # the paper's augmentation
    with pytest.raises(ConfigError, match="hflip"):
        TrainConfig(hflip="yes").resolve()
    small = {**SMALL, "epochs": 2, "stop_drop": None}
    plain, flipped = (run(TrainConfig(scheme="AN", hflip=f, **small), log=None) for f in (False, True))
    assert plain.history[-1]["train_loss"] != flipped.history[-1]["train_loss"]   # the flag reaches training
