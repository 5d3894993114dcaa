"""One training run end to end on `digits`: the API, resume, checkpoints, the CLI, bad input."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from wsml.checkpoint import load_checkpoint, save_checkpoint
from wsml.config import TrainConfig
from wsml.errors import CheckpointError, ConfigError, TrainingDiverged
from wsml.train import run

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


def test_resume_continues_exactly_with_llcp_corrections(tmp_path):
    cfg = TrainConfig(scheme="LL-Cp", delta_rel=5.0, **SMALL)
    full = run(cfg, log=None)

    saved = {}

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


@pytest.mark.parametrize("scheme", ["full", "AN", "WAN", "LSAN", "EPR", "ROLE", "LL-Ct"])
def test_every_scheme_trains(scheme):
    result = run(TrainConfig(scheme=scheme, **{**SMALL, "epochs": 1}), log=None)
    assert 0 < result.test_map <= 100 and result.best_epoch == 1


def test_linear_init_trains_head_then_end_to_end(tmp_path):
    lines = []
    cfg = TrainConfig(scheme="LL-R", mode="linear-init", linear_init_epochs=2, cache_dir=str(tmp_path),
                      stop_drop=None, **SMALL)   # all 3 epochs, whatever val mAP does
    result = run(cfg, log=lines.append)
    assert sum(line.startswith("linear-init epoch") for line in lines) == 2
    assert len(result.history) == 3
    assert any((tmp_path / "features").iterdir())   # features extracted once, into the shared cache


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
    (tmp_path / "c.pt.sha256").unlink()      # even without the checksum file, a torn zip is caught
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "wsml.train", *args], capture_output=True, text=True, cwd=cwd)


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


def test_cli_bad_input_one_line_no_output(tmp_path):
    out = tmp_path / "run"
    bad = _cli("--dataset", "imagenet", "--out", str(out))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert "unknown data set" in bad.stderr and not out.exists()
    missing = _cli("--dataset", "pascal", "--data-root", str(tmp_path / "nope"), "--weights", "none",
                   "--out", str(out))
    assert missing.returncode == 2 and "error:" in missing.stderr and not (out / "metrics.json").exists()


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
    assert len(result.history) == 2 and 0 <= result.test_map <= 100
    assert list((tmp_path / "cache" / "images").iterdir())   # decoded once, into the shared cache


def test_hflip_is_a_data_set_default():
    assert TrainConfig(dataset="digits").resolve().hflip is False      # a mirrored digit is not a digit
    assert TrainConfig(dataset="pascal").resolve().hflip is True       # the paper's augmentation
    with pytest.raises(ConfigError, match="hflip"):
        TrainConfig(hflip="yes").resolve()
    small = {**SMALL, "epochs": 2, "stop_drop": None}
    plain, flipped = (run(TrainConfig(scheme="AN", hflip=f, **small), log=None) for f in (False, True))
    assert plain.history[-1]["train_loss"] != flipped.history[-1]["train_loss"]   # the flag reaches training
