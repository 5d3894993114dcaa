"""Which searched value mattered: Optuna's parameter importances over a sweep's finished trials, per scheme.

For every (sweep, data set, mode, scheme), the search trials that ended
without failing are turned back into an Optuna study, from the MLflow runs
(their params and `best_val_map`, what the search maximised), and Optuna's
fANOVA evaluator (`FanovaImportanceEvaluator`, seeded, so the same runs give
the same numbers) splits the variance of `best_val_map` among the searched
values that varied (`lr`, `delta_rel`, `optimizer`, `linear_init_lr`).
Importances sum to 1 per scheme. A scheme needs `MIN_TRIALS` such trials:
with fewer, any split of the variance is noise (with two trials fANOVA gives
the same 0.66 / 0.34 whatever the values). With few more they are still
rough: the frame keeps the number of trials, and the figure shows it.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from orchestration import common as T
from orchestration import trial as trial_config

COLUMNS = ["sweep", "dataset", "mode", "scheme", "param", "importance", "trials"]
LOG_SCALE = ("lr", "linear_init_lr")        # searched on a log scale (search_spaces/*.yaml)
SEED = 0
MIN_TRIALS = 5


def _distribution(name: str, values: pd.Series):
    """Optuna's distribution spanning the values the trials took, or None when they did not vary."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().all():
        low, high = float(numbers.min()), float(numbers.max())
        if not low < high:
            return None, None
        log = name in LOG_SCALE and low > 0
        return FloatDistribution(low, high, log=log), numbers.astype(float)
    choices = sorted(set(values.astype(str)))
    return (CategoricalDistribution(choices), values.astype(str)) if len(choices) > 1 else (None, None)


def group_importances(trials: pd.DataFrame) -> dict[str, float]:
    """{param: importance} for one scheme's trials (rows of the aggregate's runs frame); {} when fewer
    than `MIN_TRIALS` trials or nothing varied."""
    import optuna

    ok = trials[np.isfinite(trials[T.BEST_VAL_MAP].to_numpy(dtype=float))]
    if len(ok) < MIN_TRIALS:
        return {}
    dists, columns = {}, {}
    for name in trial_config.SEARCHED[2:]:
        col = f"params.{name}"
        if col not in ok.columns or ok[col].isna().any() or (ok[col].astype(str) == "").any():
            continue
        dist, values = _distribution(name, ok[col])
        if dist is not None:
            dists[name], columns[name] = dist, values.tolist()
    if not dists:
        return {}
    study = optuna.create_study(direction="maximize")
    for i, value in enumerate(ok[T.BEST_VAL_MAP].to_numpy(dtype=float)):
        study.add_trial(optuna.trial.create_trial(
            params={n: columns[n][i] for n in dists}, distributions=dists, value=float(value)))
    found = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=SEED))
    return {k: float(v) for k, v in found.items() if math.isfinite(v)}


def importances(runs: pd.DataFrame) -> pd.DataFrame:
    """Tidy importances of every (sweep, data set, mode, scheme) with `MIN_TRIALS` finished search trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)    # one "study created" line per scheme otherwise
    trials = runs[(runs["role"] == T.ROLE_TRIAL) & (runs["status"] == "FINISHED") & (runs["outcome"] != "failed")]
    rows = []
    for (sweep, ds, mode, scheme), grp in trials.groupby(["experiment", "dataset", "mode", "scheme"], sort=False):
        n = int(np.isfinite(grp[T.BEST_VAL_MAP].to_numpy(dtype=float)).sum())
        for param, value in group_importances(grp).items():
            rows.append({"sweep": sweep, "dataset": ds, "mode": mode, "scheme": scheme, "param": param,
                         "importance": value, "trials": n})
    return pd.DataFrame(rows, columns=COLUMNS)
