"""The final stage's choices: each scheme's best configuration, rerun with several seeds.

For every (scheme, mode) searched, the trial with the highest validation mAP
(`best_val_map`, the best epoch of the trial) is picked; its configuration is
trained again with seeds 0..n-1 to the full number of epochs, with no
scheduler (`orchestration.run.tuner`, role final), so the reruns run in parallel on
the cluster with the same resources, checkpoints and failure handling as the
search. The tables report the mean and standard deviation of their test mAP.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from orchestration import trial as trial_config
from orchestration.common import TEST_MAP_AT_BEST, TRIAL_ERROR, first_line

ROW_COLUMNS = ["trial_id", "method", "scheme", "mode", "delta_rel", "lr", "seed", "epochs_run", "best_val_map",
               "best_epoch", "test_map", "error", "config"]


def result_rows(results) -> pd.DataFrame:
    """One row per trial of a ResultGrid: its configuration and last metrics."""
    rows = []
    for r in results:
        m, config = r.metrics or {}, r.config or {}
        point = trial_config.Point.of(config)
        rows.append({
            "trial_id": m.get("trial_id"), "method": point.method, "scheme": point.scheme, "mode": point.mode,
            "delta_rel": point.values.get("delta_rel", math.nan), "lr": point.values.get("lr", math.nan),
            "seed": point.seed, "epochs_run": m.get("epoch"), "best_val_map": m.get("best_val_map"),
            "best_epoch": m.get("best_epoch"), "test_map": m.get(TEST_MAP_AT_BEST),
            "error": first_line(str(r.error), last=True) if r.error else (m.get(TRIAL_ERROR) or ""),
            "config": config,
        })
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def best_per_scheme(rows: pd.DataFrame) -> pd.DataFrame:
    """The best trial (by best_val_map) of each table row (method) and mode; failed trials are left out."""
    ok = rows[(rows["error"] == "") & rows["best_val_map"].notna()]
    if ok.empty:
        return ok
    idx = ok.groupby(["method", "mode"])["best_val_map"].idxmax()
    return ok.loc[idx].sort_values(["mode", "method"]).reset_index(drop=True)


def final_points(best: pd.DataFrame, seeds: int) -> list[dict[str, Any]]:
    """The (configuration, seed) points of the final stage."""
    return [trial_config.final_point(row.config, seed, str(row.trial_id))
            for row in best.itertuples(index=False) for seed in range(seeds)]


def summarize_final(rows: pd.DataFrame) -> pd.DataFrame:
    """mean +- std (ddof=1) of the final runs' test mAP per (method, mode)."""
    ok = rows[(rows["error"] == "") & rows["test_map"].notna()]
    if ok.empty:
        return pd.DataFrame(columns=["method", "mode", "test_map_mean", "test_map_std", "n"])
    g = ok.groupby(["method", "mode"])["test_map"]
    out = pd.DataFrame({"test_map_mean": g.mean(), "test_map_std": g.std(ddof=1), "n": g.size()})
    return out.reset_index()
