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

