"""Proposals made while other trials of the same study are still running are not independent draws."""
from __future__ import annotations

import optuna
import pytest
from optuna.samplers import TPESampler

from orchestration.search import per_scheme
from orchestration.search.study import tpe_sampler
from orchestration.common import METRIC, MODE
from orchestration.search.space import load_space
from tests.helpers import write_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


def samplers(tmp_path, num_samples=24):
    space = load_space("digits", write_space(tmp_path / "s.yaml", num_samples=num_samples, epochs=4))
    searcher, _ = per_scheme.build(space, METRIC, MODE)
    return {g: s._ot_study.sampler for g, s in searcher.searchers.items()}


def test_every_study_is_built_with_the_constant_liar(tmp_path):
    for sampler in samplers(tmp_path).values():
        assert isinstance(sampler, TPESampler)
        assert sampler._constant_liar is True


def pending_proposals(sampler: TPESampler, n: int) -> list[float]:
    """A study told 12 results that peak at x = 0.3, then asked `n` times with nothing told back (in flight)."""
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for i in range(12):
        x = i / 11
        study.add_trial(optuna.trial.create_trial(
            params={"x": x}, distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
            value=-abs(x - 0.3)))
    return [study.ask().suggest_float("x", 0, 1) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tpe_with_trials_in_flight_spreads_its_proposals(tmp_path, seed):
    # the sweep's settings: per_scheme.build's TPESampler, whatever its seed
    shipped = tpe_sampler(seed=seed, share=8)
    liar = pending_proposals(shipped, 8)
    plain = pending_proposals(TPESampler(seed=seed, multivariate=shipped._multivariate, constant_liar=False,
                                         n_startup_trials=shipped._n_startup_trials), 8)
    assert liar != plain            # the pending trials change what is proposed next
    # without the liar the 8 proposals crowd around the best known point; with it they spread out
    spread = lambda xs: max(xs) - min(xs)   # noqa: E731
    assert spread(liar) > spread(plain)


def test_proposals_in_flight_stay_running_in_their_study_for_the_liar_to_see(tmp_path):
    space = load_space("digits", write_space(tmp_path / "s.yaml", num_samples=24, epochs=4))
    searcher, _ = per_scheme.build(space, METRIC, MODE)
    for i in range(9):                  # 3 per scheme, none told a result yet
        searcher.suggest(f"t{i}")
    for s in searcher.searchers.values():
        running = s._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        assert len(running) == 3


def test_slots_count_alive_nodes_and_the_workers_an_autoscaler_may_start():
    """The default max_concurrent (orchestration/cluster/slots.py): trials a node holds by CPUs and GPUs, and
    per worker type `max_workers` nodes, the largest first, within the cluster's `max_workers`."""
    from orchestration.cluster import slots

    assert slots.fits({"CPU": 8, "GPU": 4}, cpus=2, gpus=1) == 4          # GPUs bind
    assert slots.fits({"CPU": 8, "GPU": 4}, cpus=4, gpus=1) == 2          # CPUs bind
    assert slots.fits({"CPU": 8}, cpus=1, gpus=1) == 0                    # no GPU: no GPU trial
    assert slots.fits({"CPU": 8, "GPU": 1}, cpus=0, gpus=0.5) == 2
    config = {"head_node_type": "head", "max_workers": 3, "available_node_types": {
        "head": {"resources": {"CPU": 8}, "max_workers": 0},
        "gpu_4x": {"resources": {"CPU": 32, "GPU": 4}, "max_workers": 2},
        "gpu_1x": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 5},
        "cpu": {"resources": {"CPU": 16}, "max_workers": 4}}}
    assert slots.autoscaled(config, cpus=4, gpus=1) == 4 + 4 + 1          # 3 nodes: two 4x, one 1x
    assert slots.autoscaled(config, cpus=4, gpus=0) == 8 + 8 + 4          # CPU trials: the largest nodes
    assert slots.autoscaled(None, cpus=1, gpus=1) == 0                    # no autoscaler: what is alive
