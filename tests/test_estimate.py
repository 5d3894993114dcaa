"""What a sweep will cost: ASHA's expected epochs, images per epoch, the throughput table, `--dry-run`."""
from __future__ import annotations

import math
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest

from orchestration.cost import estimate, throughput
from orchestration.search import per_scheme
from orchestration.common import SweepError
from orchestration.search.space import load_space
from tests.helpers import ROOT, run_cli, sweep_in_process, write_space

SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))


# ------------------------------------------------------------------ ASHA
@pytest.mark.parametrize("grace,rf,max_t,trials", [(2, 2, 10, 8), (2, 3, 10, 10), (1, 2, 16, 12), (3, 2, 12, 5)])
def test_asha_epochs_match_rays_scheduler_decision_for_decision(grace, rf, max_t, trials):
    """The simulator stops exactly the trials Ray's ASHAScheduler stops, fed the same metrics in the same
    order (each trial's metric the same at every rung, the trials reaching each rung in index order)."""
    from ray.tune.schedulers import ASHAScheduler

    rng = np.random.default_rng(7)
    for _ in range(20):
        values = rng.random(trials)
        sched = ASHAScheduler(time_attr="epoch", metric="val_map", mode="max", max_t=max_t,
                              grace_period=grace, reduction_factor=rf)
        ts = [SimpleNamespace(trial_id=f"t{i}") for i in range(trials)]
        for t in ts:
            sched.on_trial_add(None, t)
        ray_epochs = np.full(trials, float(max_t))
        alive = set(range(trials))
        for rung in estimate.asha_rungs(grace, rf, max_t):
            if rung >= max_t:
                break
            for i in sorted(alive):
                if sched.on_trial_result(None, ts[i], {"epoch": rung, "val_map": values[i]}) == "STOP":
                    ray_epochs[i] = rung
                    alive.discard(i)
        ours = estimate.asha_epochs(values, grace, rf, max_t)[0]
        assert ours.tolist() == ray_epochs.tolist()


def test_asha_expected_epochs_bounds_and_determinism():
    e = estimate.asha_expected_epochs(8, 2, 2, 10)
    assert 2 < e < 10                                 # some trials stopped, the first at each rung never
    assert e == estimate.asha_expected_epochs(8, 2, 2, 10)         # seeded: the same inputs, the same number
    assert estimate.asha_expected_epochs(1, 2, 2, 10) == 10        # alone in its group: never compared
    assert estimate.asha_expected_epochs(30, 2, 3, 10) < estimate.asha_expected_epochs(30, 2, 2, 10)
    assert estimate.asha_rungs(2, 2, 10) == [2, 4, 8]
    assert estimate.asha_rungs(2, 3, 10) == [2, 6]


# ------------------------------------------------------------------ data
def test_data_sizes_official_prepared_and_digits(tmp_path):
    voc = estimate.data_sizes("pascal", str(tmp_path / "missing"), {})
    assert (voc.train, voc.val, voc.test) == (5717 - 1143, 1143, 5823)       # 20 % of 5,717 to validation
    assert "official" in voc.source and "not prepared" in voc.source
    # a prepared folder: its own label arrays' lengths (read memory-mapped)
    np.save(tmp_path / "formatted_train_labels.npy", np.zeros((50, 3), np.int8))
    np.save(tmp_path / "formatted_val_labels.npy", np.zeros((7, 3), np.int8))
    mine = estimate.data_sizes("pascal", str(tmp_path), {"max_train_images": 30})
    assert (mine.train, mine.val, mine.test) == (30, 10, 7) and "prepared" in mine.source
    digits = estimate.data_sizes("digits", None, {})
    assert (digits.train, digits.val, digits.test) == (3000, 500, 500)


def test_throughput_table_scales_by_tflops_and_names_its_sources():
    h200 = throughput.gpu_rate("H200", "resnet50", 448, cuda_graph=True)
    a10g = throughput.gpu_rate("A10G", "resnet50", 448, cuda_graph=True)
    assert h200.train == pytest.approx(849 / 938 * 937)
    assert a10g.train / h200.train == pytest.approx(125 / 989)
    assert "measured" in h200.source and "estimated" in a10g.source
    assert throughput.gpu_rate("H200", "resnet50", 224, False).train == pytest.approx(
        4 * throughput.gpu_rate("H200", "resnet50", 448, False).train)
    assert throughput.find_gpu("NVIDIA A100-SXM4-80GB").name == "A100"
    assert throughput.find_gpu("Tesla K80") is None
    with pytest.raises(SweepError, match="--gpu-type"):
        throughput.gpu_rate("K80", "resnet50", 448, False)


def test_estimate_adds_up(tmp_path):
    space = load_space("digits", write_space(tmp_path / "s.yaml", num_samples=6, epochs=4, final_seeds=2,
                                             train_images=300))
    est = estimate.for_resources(space, None, cpus_per_trial=1, gpus_per_trial=0, cpus=2, gpus=0, gpu_name=None,
                                 where="test")
    assert est.trials == 6 and [g.trials for g in est.groups] == [2, 2, 2]
    assert est.search_epochs_most == 24 and est.final_epochs == 3 * 2 * 4
    assert est.search_epochs_expected == pytest.approx(
        3 * 2 * estimate.asha_expected_epochs(2, 2, 2, 4))
    epoch_s = 300 / est.rate.train + 1000 / est.rate.evaluate
    assert est.epoch_seconds == pytest.approx(epoch_s)
    assert est.trial_seconds == pytest.approx((est.search_epochs_expected + 24) * epoch_s)
    assert est.slots == 2
    up = estimate.TRIAL_STARTUP_S
    assert est.startup_s == up > 0
    assert est.wall_seconds == pytest.approx((est.search_epochs_expected * epoch_s + 6 * up) / 2
                                             + math.ceil(6 / 2) * (4 * epoch_s + up))
    assert est.params()["estimate.gpu_hours"] == "0"


def test_wall_time_counts_the_final_stage_and_every_trials_start_up(tmp_path):
    def wall(final_seeds, startup_s):
        space = load_space("digits", write_space(tmp_path / f"s{final_seeds}.yaml", num_samples=6, epochs=4,
                                                 final_seeds=final_seeds, train_images=300))
        est = estimate.for_resources(space, None, cpus_per_trial=1, gpus_per_trial=0, cpus=2, gpus=0,
                                     gpu_name=None, where="test")
        est.startup_s = startup_s
        return est, est.wall_seconds

    est, search_only = wall(0, 0.0)
    full_trial = est.epochs * est.epoch_seconds
    # the final stage: 3 groups x 2 seeds = 6 runs of all epochs, 2 at once
    assert wall(2, 0.0)[1] == pytest.approx(search_only + 3 * full_trial)
    # start-up: 6 search trials and 6 final runs, each 5 s before its first epoch, 2 at once
    assert wall(2, 5.0)[1] == pytest.approx(search_only + 3 * full_trial + 6 * 5.0 / 2 + 3 * 5.0)
    assert "5 s start-up per trial" in "\n".join(wall(2, 5.0)[0].lines())


# ------------------------------------------------------------------ --dry-run
@pytest.mark.parametrize("space_file", SPACES, ids=[p.stem for p in SPACES])
def test_dry_run_estimates_every_shipped_space_and_creates_nothing(space_file, tmp_path, capsys):
    """Every shipped space file: the estimate in seconds, from the official split sizes where the data set is
    not prepared (said), and nothing created: no MLflow store, Ray results, cache or results folder."""
    dataset = space_file.stem.split("-")[0]
    t0 = time.monotonic()
    r = sweep_in_process(["--dataset", dataset, "--space", str(space_file), "--dry-run"], tmp_path, capsys)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert re.search(r"estimate: wall time [\d,]+ s ", out), out
    assert re.search(r"search: at most \d+ epochs, expected \d+", out)
    assert re.search(r"images per epoch: [\d,]+ trained", out)
    space = load_space(dataset, space_file)
    quota = per_scheme.quotas(space.search.groups(), space.num_samples)
    for g, n in quota.items():
        row = g.scheme + (" + BoostLU" if g.boostlu else "")
        assert re.search(rf"{re.escape(row)}\s+{g.mode}\s+{n} trial", out), g
    if space.resources.gpus_per_trial > 0:
        assert "GPU-hours" in out and "official" in out and "not prepared here" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == []        # nothing: no mlflow.db, ray_results, .cache
    print(f"{space_file.name}: dry run {took:.1f} s")


def test_dry_run_gpus_and_checks(tmp_path, capsys):
    r = sweep_in_process(["--dataset", "cub", "--dry-run", "--gpus", "8", "--gpu-type", "H200"], tmp_path, capsys)
    assert r.returncode == 0, r.stderr
    assert "with 8 trial(s) at once" in r.stdout and "on H200" in r.stdout
    # a real start's checks still apply: a bad option is one error line, exit 2, nothing created
    for args, message in ((["--gpu-type", "K80"], "--gpu-type 'K80' is not in the throughput table"),
                          (["--resume"], "--dry-run estimates a new sweep"),
                          (["--warm-start", "nope", "--mlflow-uri", f"sqlite:///{tmp_path}/x.db"],
                           "--warm-start: no MLflow store")):
        r = sweep_in_process(["--dataset", "digits", "--dry-run", *args], tmp_path, capsys)
        assert r.returncode == 2 and r.stderr.startswith(f"error: {message}"), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_dry_run_on_a_cluster_counts_its_cpus(tmp_path, ray_address):
    space = write_space(tmp_path / "space.yaml", num_samples=6, epochs=4)
    r = run_cli(["--dataset", "digits", "--space", str(space), "--dry-run", "--address", ray_address],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"2 CPU(s), 1 per trial; the Ray cluster at {ray_address}" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]
