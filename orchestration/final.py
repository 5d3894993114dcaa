"""The final stage of a sweep: rerun each scheme's best configuration with several seeds.

For every (scheme, mode) searched, the trial with the highest validation mAP
(`best_val_map`, the best epoch of the trial) is picked; its configuration is
trained again with seeds 0..n-1 to the full number of epochs, with no
scheduler, as the trials of a second Tuner (`<sweep>-final`, a grid over the
(configuration, seed) points) so they run in parallel on the cluster with the
same resources, checkpoints and failure handling as the search. Each rerun is
an MLflow child run of the sweep with role=final; the tables report the mean
and standard deviation of their test mAP.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from wsml.config import LL_SCHEMES

FINAL_SUFFIX = "-final"


def result_rows(results) -> pd.DataFrame:
    """One row per trial of a ResultGrid: its configuration and last metrics."""
    rows = []
    for r in results:
        m = r.metrics or {}
        cfg = r.config or {}
        point = {**cfg, **(cfg.get("point") or {})}
        rows.append({
            "trial_id": m.get("trial_id") or cfg.get("trial_id"),
            "scheme": point.get("scheme"),
            "mode": point.get("mode", "end-to-end"),
            "delta_rel": point.get("delta_rel") if point.get("scheme") in LL_SCHEMES else math.nan,
            "lr": point.get("lr"),
            "seed": point.get("seed", 0),
            "epochs_run": m.get("epoch"),
            "best_val_map": m.get("best_val_map"),
            "best_epoch": m.get("best_epoch"),
            "test_map": m.get("test_map_at_best"),
            "error": (str(r.error).strip().splitlines() or [""])[-1] if r.error else (m.get("wsml_error") or ""),
        })
    return pd.DataFrame(rows, columns=["trial_id", "scheme", "mode", "delta_rel", "lr", "seed", "epochs_run",
                                       "best_val_map", "best_epoch", "test_map", "error"])


def best_per_scheme(rows: pd.DataFrame) -> pd.DataFrame:
    """The best trial (by best_val_map) of each (scheme, mode); failed trials are left out."""
    ok = rows[(rows["error"] == "") & rows["best_val_map"].notna()]
    if ok.empty:
        return ok
    idx = ok.groupby(["scheme", "mode"])["best_val_map"].idxmax()
    return ok.loc[idx].sort_values(["mode", "scheme"]).reset_index(drop=True)


def final_points(best: pd.DataFrame, seeds: int) -> list[dict[str, Any]]:
    points = []
    for row in best.itertuples(index=False):
        for seed in range(seeds):
            p: dict[str, Any] = {"scheme": row.scheme, "mode": row.mode, "lr": float(row.lr), "seed": seed,
                                 "wsml_source_trial": str(row.trial_id)}
            if row.scheme in LL_SCHEMES and not pd.isna(row.delta_rel):
                p["delta_rel"] = float(row.delta_rel)
            points.append(p)
    return points


def summarize_final(rows: pd.DataFrame) -> pd.DataFrame:
    """mean +- std (ddof=1) of the final runs' test mAP per (scheme, mode)."""
    ok = rows[(rows["error"] == "") & rows["test_map"].notna()]
    if ok.empty:
        return pd.DataFrame(columns=["scheme", "mode", "test_map_mean", "test_map_std", "n"])
    g = ok.groupby(["scheme", "mode"])["test_map"]
    out = pd.DataFrame({"test_map_mean": g.mean(), "test_map_std": g.std(ddof=1), "n": g.size()})
    return out.reset_index()


def run_final(*, name: str, storage: str, trainable, param_space: dict[str, Any], points: list[dict[str, Any]],
              callback, reporter, max_failures: int, keep_checkpoints: int, resume: bool):
    """Run (or, on resume, continue) the final Tuner; returns its ResultGrid."""
    from ray import tune

    from orchestration.trainable import trial_dirname

    final_name = name + FINAL_SUFFIX
    path = f"{storage.rstrip('/')}/{final_name}"
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        return tuner.fit()
    tuner = tune.Tuner(
        trainable,
        param_space={**param_space, "point": tune.grid_search(points)},
        tune_config=tune.TuneConfig(metric="val_map", mode="max", num_samples=1, reuse_actors=True,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=final_name, storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=[callback],
            progress_reporter=reporter,
            verbose=1,
        ),
    )
    return tuner.fit()
