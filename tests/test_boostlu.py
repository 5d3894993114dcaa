"""BoostLU (Kim et al., CVPR 2023): the boosted-CAM head, its config, the CLI and resume."""
import copy
import functools
import json
import math
import subprocess
import sys

import pytest
import torch

from wsml.config import SCHEMES, TrainConfig
from wsml.errors import ConfigError
from wsml.model import boostlu_cam, build_model
from wsml.train import run

SMALL = dict(dataset="digits", max_train_images=96, epochs=1, num_workers=0, device="cpu")
# (arch, input side): ResNet-50 at 64 px has a 2 x 2 last map, enough for a CAM with several locations
ARCHS = [("smallcnn", 32), ("resnet50", 64)]


@functools.cache
def _built(arch: str, alpha: float | None, seed: int):
    torch.manual_seed(seed)
    return build_model(arch, 10, "none", alpha).double().eval()


def _model(arch: str, alpha: float | None, seed: int = 0):
    """A fresh copy (building ResNet-50 is the slow part of these tests)."""
    return copy.deepcopy(_built(arch, alpha, seed))


def _input(side: int) -> torch.Tensor:
    return torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("arch,side", ARCHS)
def test_same_parameters_and_initialisation_as_the_plain_model(arch, side):
    plain, boosted = _model(arch, None), _model(arch, 5.0)
    a, b = plain.state_dict(), boosted.state_dict()
    assert list(a) == list(b)      # same names in the same order: checkpoints and caches stay valid
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = _input(side)
    with torch.no_grad():           # the map BoostLU works on is the one the plain model pools
        torch.testing.assert_close(plain.feature_map(x).mean(dim=(2, 3)), plain.features(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch,side", ARCHS)
def test_alpha_one_is_the_linear_head(arch, side):
    plain, boosted = _model(arch, None, seed=0), _model(arch, 1.0, seed=7)
    boosted.load_state_dict(plain.state_dict())
    with torch.no_grad():           # a head whose CAM has both signs, so the boost's where() is exercised
        plain.head.bias.copy_(torch.linspace(-1, 1, 10))
        boosted.head.bias.copy_(torch.linspace(-1, 1, 10))
    x = _input(side)
    logits_p, logits_b = plain(x), boosted(x)
    torch.testing.assert_close(logits_b, logits_p, rtol=1e-10, atol=1e-12)
    weights = torch.randn(logits_p.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (logits_p * weights).sum().backward()
    (logits_b * weights).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), boosted.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=f"gradient of {name}")


@pytest.mark.parametrize("arch,side", ARCHS)
def test_alpha_scales_exactly_the_positive_cam_entries(arch, side):
    alpha = 5.0
    model = _model(arch, alpha)
    with torch.no_grad():
        model.head.bias.copy_(torch.linspace(-1, 1, 10))
        x = _input(side)
        fmap = model.feature_map(x)
        # the CAM computed independently: the head's affine map at every location
        cam = torch.einsum("ndhw,cd->nchw", fmap, model.head.weight) + model.head.bias[:, None, None]
        boosted = boostlu_cam(fmap, model.head, alpha)
        positive = cam > 0
        assert positive.any() and (~positive).any()
        torch.testing.assert_close(boosted[positive], alpha * cam[positive], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(boosted[~positive], cam[~positive], rtol=1e-12, atol=1e-12)
        assert torch.equal(boosted > 0, positive)          # no entry changes sign
        torch.testing.assert_close(model(x), boosted.mean(dim=(2, 3)), rtol=1e-12, atol=1e-12)
        # differs from the plain head wherever a class has a positive CAM entry
        plain_logits = cam.mean(dim=(2, 3))
        assert not torch.allclose(model(x)[positive.any(dim=(2, 3))], plain_logits[positive.any(dim=(2, 3))])


@pytest.mark.parametrize("alpha", [0, -1.0, math.nan, math.inf, "5", True])
def test_bad_alpha_is_refused(alpha):
    with pytest.raises(ConfigError, match="invalid boostlu_alpha"):
        TrainConfig(boostlu_alpha=alpha).resolve()


def test_alpha_one_and_off_are_valid():
    assert TrainConfig(boostlu_alpha=1.0).resolve().boostlu_alpha == 1.0
    assert TrainConfig().resolve().boostlu_alpha is None


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_trains_with_boostlu(scheme):
    # EM+APL pseudo-labels after its warm-up epoch, which must come before the last
    longer = {"epochs": 2, "scheme_params": {"apl_warmup_epoch": 1}} if scheme == "EM+APL" else {}
    result = run(TrainConfig(scheme=scheme, boostlu_alpha=5.0, **{**SMALL, **longer}), log=None)
    assert 0 < result.test_map <= 100 and result.config["boostlu_alpha"] == 5.0


def test_linear_init_trains_the_plain_head_then_fine_tunes_boosted(tmp_path):
    lines, results, cached = {}, {}, {}
    for alpha in (None, 5.0):
        lines[alpha] = []
        cfg = TrainConfig(scheme="LL-Ct", mode="linear-init", linear_init_epochs=2, cache_dir=str(tmp_path),
                          stop_drop=None, boostlu_alpha=alpha, **{**SMALL, "epochs": 2})
        results[alpha] = run(cfg, log=lines[alpha].append)
        cached[alpha] = sorted(p.name for p in (tmp_path / "features").iterdir())
    assert cached[5.0] == cached[None]              # the pooled-feature cache is shared, not rebuilt
    head_phase = {a: [line for line in lines[a] if line.startswith("linear-init epoch")] for a in lines}
    assert len(head_phase[None]) == 2
    assert head_phase[5.0] == head_phase[None]     # alpha = 1 on the cached features: the same head
    # the fine-tuning that follows does use the boost
    assert results[5.0].history[0]["train_loss"] != results[None].history[0]["train_loss"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "wsml.train", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_cli_trains_records_alpha_and_refuses_another_on_resume(tmp_path):
    from wsml.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "run"
    args = ["--dataset", "digits", "--scheme", "LL-R", "--epochs", "2", "--max-train-images", "300",
            "--device", "cpu", "--num-workers", "0", "--out", str(out)]
    first = _cli(*args, "--boostlu-alpha", "5")
    assert first.returncode == 0, first.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["boostlu_alpha"] == 5.0 and [h["epoch"] for h in metrics["history"]] == [1, 2]
    for other, saved_as in ((["--boostlu-alpha", "3"], "5.0"), ([], "5.0")):
        refused = _cli(*args, *other)
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]
        assert f"boostlu_alpha={saved_as}" in refused.stderr
    # a checkpoint made before the setting existed was made without BoostLU
    state = load_checkpoint(out / "checkpoint.pt")
    del state["config"]["boostlu_alpha"]
    save_checkpoint(out / "checkpoint.pt", {k: v for k, v in state.items() if k != "format"})
    (out / "metrics.json").unlink()      # else the finished run's metrics.json answers first
    old = _cli(*args, "--boostlu-alpha", "5")
    assert old.returncode == 2 and "boostlu_alpha=None" in old.stderr
