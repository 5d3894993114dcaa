"""The paper's tables as tidy frames built from the runs (`orchestration.report.runs`): Table 1 (a row per
method, a column per data set x mode), the BoostLU table, the recent-methods table, the OpenImages groups,
and per sweep the best configuration, its cost and the estimate made at its start."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from wsml import schemes

from orchestration import common as T
from orchestration.report import paper, paper_boostlu
from orchestration.common import method_name
from orchestration.report.runs import FINISHED, NOT_RECORDED, num

# Params that are bookkeeping, never part of "the best configuration".
_NOT_CONFIG = {"seed", "scheme", "mode", "dataset", "trial_id", "data_root", "cache_dir", "device", T.PARAM_DATA}


def _stats(values: np.ndarray) -> tuple[float, float, int]:
    """mean, sample std (ddof=1; NaN when n < 2), n."""
    values = values[np.isfinite(values)]
    n = int(values.size)
    if n == 0:
        return math.nan, math.nan, 0
    return float(values.mean()), float(values.std(ddof=1)) if n > 1 else math.nan, n


def _dataset_order(datasets) -> list[str]:
    present = [d for d in dict.fromkeys(datasets) if d]
    known = [d for d in paper.DATASETS if d in present or d in paper.PAPER_DATASETS]
    return known + sorted(d for d in present if d not in paper.DATASETS)


def _method_order(methods) -> list[str]:
    """The paper's rows first, each followed by its BoostLU row (as in the BoostLU paper), then the other
    schemes in the registry's order (wsml/schemes.py), then the rest."""
    methods = [m for m in dict.fromkeys(methods) if m]
    out = []
    for m in paper.METHODS + tuple(n for n in schemes.names() if n not in paper.METHODS):
        out += [x for x in (m, method_name(m, 1.0)) if x in methods]
    return out + sorted(m for m in methods if m not in out)


def _mode_order(modes) -> list[str]:
    modes = [m for m in dict.fromkeys(modes) if m]
    return [m for m in paper.MODES if m in modes] + sorted(m for m in modes if m not in paper.MODES)


def _final_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[(runs["role"] == T.ROLE_FINAL) & (runs["status"] == FINISHED)
                & ~runs["outcome"].isin(["failed", "unfinished"])]


def _pick_experiment(group: pd.DataFrame, label: str, notes: list[str]) -> pd.DataFrame:
    """Final runs of one cell: those of the experiment whose final runs started last, of one data (runs of
    other data are other results: never averaged together, whichever experiment holds them)."""
    latest = group.groupby(["experiment", "data"])["start_time"].max().sort_values()
    if len(latest) <= 1:
        return group
    chosen, data = latest.index[-1]
    exps = list(dict.fromkeys(e for e, _ in latest.index))
    datas = list(dict.fromkeys(d or NOT_RECORDED for _, d in latest.index))
    if len(datas) > 1:
        notes.append(f"{label}: final runs trained on {len(datas)} different data ({', '.join(datas)}) in "
                     f"{', '.join(map(repr, exps))}, never averaged together; using the latest: data "
                     f"{data or NOT_RECORDED} of {chosen!r}")
    else:
        notes.append(f"{label}: final runs in {len(exps)} experiments ({', '.join(exps)}); "
                     f"using the latest, {chosen!r}")
    return group[(group["experiment"] == chosen) & (group["data"] == data)]


def _cell(finals: pd.DataFrame, method: str | None, ds: str, mode: str, ref: float | None, label: str,
          notes: list[str], metric: str = T.TEST_MAP) -> dict:
    """One table cell from the final runs of (method, data set, mode): mean, std, n beside the paper's number."""
    cell = finals[(finals["dataset"] == ds) & (finals["mode"] == mode) & (finals["scheme"] == method)]
    cell = _pick_experiment(cell, label, notes) if len(cell) else cell
    mean, std, n = _stats(cell[metric].to_numpy(dtype=float))
    return {"dataset": ds, "dataset_label": paper.DATASET_LABELS.get(ds, ds),
            "mode": mode, "mode_label": paper.MODE_LABELS.get(mode, mode), "mean": mean, "std": std, "n": n,
            "paper": math.nan if ref is None else ref,
            "diff": round(mean - ref, 9) if (n and ref is not None) else math.nan,
            "experiment": ", ".join(sorted(set(cell["experiment"]))),
            "seeds": ", ".join(sorted(cell["seed"].astype(str), key=_seed_key)),
            "data": _data_label(cell)}


def _data_label(runs: pd.DataFrame) -> str:
    """The data the runs were trained on: its identity, "not recorded", or "" without runs."""
    return ", ".join(sorted({d or NOT_RECORDED for d in runs["data"]}))


def table1_frame(runs: pd.DataFrame, notes: list[str] | None = None) -> pd.DataFrame:
    """Tidy Table 1: one row per (method, dataset, mode), empty cells with n = 0."""
    notes = [] if notes is None else notes
    finals = _final_runs(runs)
    nested = runs[runs["role"].isin([T.ROLE_TRIAL, T.ROLE_FINAL])]
    datasets = _dataset_order(nested["dataset"])
    modes = _mode_order(list(paper.MODES) + list(nested["mode"]))
    methods = _method_order(list(paper.METHODS) + list(nested["scheme"]))
    rows = []
    for mode in modes:
        for ds in datasets:
            for method in methods:
                label = f"{method} {paper.DATASET_LABELS.get(ds, ds)} {paper.MODE_LABELS.get(mode, mode)}"
                rows.append({"method": method, **_cell(finals, method, ds, mode, paper.table1(method, ds, mode),
                                                       label, notes)})
    return pd.DataFrame(rows)


def boostlu_frame(runs: pd.DataFrame, notes: list[str] | None = None) -> pd.DataFrame | None:
    """Tidy BoostLU table: the rows of the BoostLU paper's single-positive table (its published numbers),
    per data set (its four, then every other data set with runs), our final runs beside them; None
    when no run used BoostLU."""
    notes = [] if notes is None else notes
    nested = runs[runs["role"].isin([T.ROLE_TRIAL, T.ROLE_FINAL])]
    if not nested["scheme"].str.endswith(method_name("", 1.0)).any():
        return None
    finals = _final_runs(runs)
    datasets = list(paper_boostlu.DATASETS) + [d for d in _dataset_order(nested["dataset"])
                                               if d not in paper_boostlu.DATASETS + ("openimages",)]
    rows = []
    for ds in datasets:
        for key, row in paper_boostlu.SINGLE_POSITIVE_ROWS.items():
            method = method_name(row.scheme, 1.0 if row.boostlu else None) if row.scheme else None
            label = f"{key} {paper.DATASET_LABELS.get(ds, ds)} (BoostLU table)"
            cell = _cell(finals, method, ds, row.mode, paper_boostlu.single_positive(key, ds), label, notes)
            rows.append({"method": key, **cell, "mode_label": "single positive label"})
    return pd.DataFrame(rows)


def recent_frame(runs: pd.DataFrame, notes: list[str] | None = None) -> pd.DataFrame | None:
    """Tidy recent-methods table: the registry's methods since 2022 (`recent`: EM, EM+APL, GR), each beside
    its own paper's test mAP (end-to-end on the four benchmarks), per data set (those four, then every other
    with runs) and mode (end-to-end, and LinearInit where one of them has runs); None when none has runs.
    Its columns are those with runs or a published number, so the papers' numbers are shown beside ours
    whichever data sets were run."""
    notes = [] if notes is None else notes
    recent = schemes.names("recent")
    nested = runs[runs["role"].isin([T.ROLE_TRIAL, T.ROLE_FINAL])]
    mine = nested[nested["scheme"].isin(recent)]
    if mine.empty:
        return None
    finals = _final_runs(runs)
    datasets = list(paper.PAPER_DATASETS) + [d for d in _dataset_order(nested["dataset"])
                                             if d not in paper.PAPER_DATASETS]
    rows = []
    for mode in _mode_order(["end-to-end"] + list(mine["mode"])):
        for ds in datasets:
            for name in recent:
                label = (f"{name} {paper.DATASET_LABELS.get(ds, ds)} {paper.MODE_LABELS.get(mode, mode)} "
                         "(recent-methods table)")
                ref = schemes.REGISTRY[name].published.get((ds, mode))
                rows.append({"method": name, **_cell(finals, name, ds, mode, ref, label, notes)})
    tidy = pd.DataFrame(rows)
    column = [tidy["dataset"], tidy["mode"]]
    shown = tidy["n"].gt(0).groupby(column).transform("any") | tidy["paper"].notna().groupby(column).transform("any")
    return tidy[shown].reset_index(drop=True)


def _seed_key(s: str):
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, 0.0, s)


def openimages_frame(runs: pd.DataFrame, notes: list[str] | None = None) -> pd.DataFrame | None:
    """Tidy OpenImages table (method, mode, group), or None without OpenImages runs."""
    notes = [] if notes is None else notes
    oi = runs[(runs["dataset"] == "openimages") & runs["role"].isin([T.ROLE_TRIAL, T.ROLE_FINAL])]
    if oi.empty:
        return None
    finals = _final_runs(oi)
    paper_methods = sorted({m for m, _ in paper.OPENIMAGES}, key=paper.METHODS.index)
    methods = _method_order(paper_methods + list(oi["scheme"]))
    modes = _mode_order([paper.OPENIMAGES_MODE] + list(oi["mode"]))
    rows = []
    for mode in modes:
        for method in methods:
            cell = finals[(finals["mode"] == mode) & (finals["scheme"] == method)]
            label = f"{method} OpenImages {paper.MODE_LABELS.get(mode, mode)}"
            cell = _pick_experiment(cell, label, notes) if len(cell) else cell
            for group, metric in paper.OPENIMAGES_METRICS.items():
                mean, std, n = _stats(cell[metric].to_numpy(dtype=float))
                ref = paper.openimages(method, group, mode)
                rows.append({
                    "method": method, "mode": mode, "mode_label": paper.MODE_LABELS.get(mode, mode),
                    "group": group, "metric": metric, "mean": mean, "std": std, "n": n,
                    "paper": math.nan if ref is None else ref,
                    "diff": round(mean - ref, 9) if (n and ref is not None) else math.nan,
                    "experiment": ", ".join(sorted(set(cell["experiment"]))),
                })
    return pd.DataFrame(rows)


def _fmt_value(v) -> str:
    if isinstance(v, float):
        if v == int(v) and abs(v) < 1e6:
            return str(int(v))
        return f"{v:.3g}"
    return str(v)


def _config_string(row: pd.Series, keys: list[str]) -> str:
    parts = []
    for k in keys:
        v = row.get(f"params.{k}")
        if v is None or (isinstance(v, float) and math.isnan(v)) or v == "":
            continue
        num = pd.to_numeric(pd.Series([v]), errors="coerce").iloc[0]
        parts.append(f"{k}={_fmt_value(float(num)) if pd.notna(num) else v}")
    return ", ".join(parts)


def _searched_keys(trials: pd.DataFrame) -> list[str]:
    """Params that vary across a sweep's trials (its search space), plus delta_rel and lr."""
    keys = []
    for c in trials.columns:
        if not c.startswith("params."):
            continue
        k = c[len("params."):]
        if k in _NOT_CONFIG or k.startswith("config/"):
            continue
        if trials[c].dropna().astype(str).nunique() > 1 or k in ("delta_rel", "lr"):
            keys.append(k)
    first = [k for k in ("delta_rel", "lr") if k in keys]
    return first + sorted(k for k in keys if k not in first)


SWEEP_COLUMNS = ["sweep", "dataset", "mode", "scheme", "trials", "completed", "asha_stopped",
                 "stop_drop", "failed", "unfinished", "epochs", "gpu_hours", "best_val_map",
                 "best_trial", "best_run_id", "best_config", "final_runs", "final_test_map",
                 "final_epochs", "final_gpu_hours", "data"]


def sweeps_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (sweep, dataset, mode, scheme): best config, trials, ASHA stops, cost; plus an "all" row per sweep."""
    nested = runs[runs["role"].isin([T.ROLE_TRIAL, T.ROLE_FINAL])]
    rows = []
    for sweep in dict.fromkeys(runs["experiment"]):
        mine = nested[nested["experiment"] == sweep]
        if mine.empty:
            continue
        trials_all = mine[mine["role"] == T.ROLE_TRIAL]
        keys = _searched_keys(trials_all)
        groups = mine.groupby(["dataset", "mode"], sort=False)
        for (ds, mode), grp in sorted(groups, key=lambda g: (_dataset_order(mine["dataset"]).index(g[0][0]),
                                                            _mode_order(mine["mode"]).index(g[0][1]))):
            summary = []
            for scheme in _method_order(grp["scheme"]):
                srows = grp[grp["scheme"] == scheme]
                summary.append(_sweep_row(sweep, ds, mode, scheme, srows, keys))
            rows.extend(summary)
            if len(summary) > 1:
                rows.append(_sweep_row(sweep, ds, mode, "all", grp, keys, best_config=False))
    return pd.DataFrame(rows, columns=SWEEP_COLUMNS)


def _sweep_row(sweep, ds, mode, scheme, runs, keys, best_config=True) -> dict:
    trials = runs[runs["role"] == T.ROLE_TRIAL]
    finals = _final_runs(runs)
    counts = trials["outcome"].value_counts()
    ok = trials[~trials["outcome"].isin(["failed"]) & np.isfinite(trials[T.BEST_VAL_MAP])]
    best = None
    if len(ok):
        best = ok.sort_values([T.BEST_VAL_MAP, "start_time"], ascending=[False, True],
                              kind="stable").iloc[0]
    # The mean over several schemes' final runs means nothing: left out of the "all" row.
    final_mean = _stats(finals[T.TEST_MAP].to_numpy(dtype=float))[0] if best_config else math.nan
    return {
        "sweep": sweep, "dataset": ds, "mode": mode, "scheme": scheme,
        "trials": len(trials),
        **{k: int(counts.get(k, 0)) for k in ("completed", "asha_stopped", "stop_drop", "failed",
                                              "unfinished")},
        "epochs": float(np.nansum(trials[T.EPOCHS_RUN].to_numpy(dtype=float))),
        "gpu_hours": float(np.nansum(trials[T.GPU_HOURS].to_numpy(dtype=float))),
        "best_val_map": float(best[T.BEST_VAL_MAP]) if best is not None else math.nan,
        "best_trial": (best["trial_id"] or best["run_name"]) if best is not None else "",
        "best_run_id": best["run_id"] if best is not None else "",
        "best_config": _config_string(best, keys) if (best is not None and best_config) else "",
        "final_runs": len(finals),
        "final_test_map": final_mean,
        "final_epochs": float(np.nansum(finals[T.EPOCHS_RUN].to_numpy(dtype=float))),
        "final_gpu_hours": float(np.nansum(finals[T.GPU_HOURS].to_numpy(dtype=float))),
        "data": _data_label(runs),
    }


ESTIMATE_COLUMNS = ["sweep", "device", "slots", "epochs_estimated", "epochs_most", "epochs_spent",
                    "trial_hours_estimated", "trial_hours_spent", "gpu_hours_estimated", "gpu_hours_spent",
                    "wall_s_estimated", "wall_s_spent", "reused_proposals"]


def estimates_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """Per sweep whose run holds the estimate made at its start (`estimate.*` params): it beside what the
    search and the final stage spent (epochs, trial-hours, GPU-hours) and the sweep run's wall time."""
    rows = []
    for sweep in dict.fromkeys(runs["experiment"]):
        mine = runs[runs["experiment"] == sweep]
        parent = mine[mine["role"] == T.ROLE_SWEEP]
        col = f"params.{T.ESTIMATE_PREFIX}epochs"
        if parent.empty or col not in parent.columns or not str(parent.iloc[0].get(col) or ""):
            continue
        p = parent.iloc[0]
        est = {k: p.get(f"params.{T.ESTIMATE_PREFIX}{k}") for k in ("device", "slots", "epochs", "epochs_most",
                                                                    "trial_hours", "gpu_hours", "wall_s")}
        nested = mine[mine["role"].isin([T.ROLE_TRIAL, T.ROLE_FINAL])]
        wall = ((p["end_time"] - p["start_time"]).total_seconds()
                if p["status"] == FINISHED and pd.notna(p.get("end_time")) else math.nan)
        rows.append({"sweep": sweep, "device": est["device"], "slots": num(pd.Series([est["slots"]])).iloc[0],
                     "epochs_estimated": float(est["epochs"]), "epochs_most": float(est["epochs_most"]),
                     "epochs_spent": float(np.nansum(nested[T.EPOCHS_RUN].to_numpy(dtype=float))),
                     "trial_hours_estimated": float(est["trial_hours"]),
                     "trial_hours_spent": float(np.nansum(nested[T.TRAIN_HOURS].to_numpy(dtype=float))),
                     "gpu_hours_estimated": float(est["gpu_hours"]),
                     "gpu_hours_spent": float(np.nansum(nested[T.GPU_HOURS].to_numpy(dtype=float))),
                     "wall_s_estimated": float(est["wall_s"]), "wall_s_spent": wall,
                     "reused_proposals": float(np.nan_to_num(p.get(T.REUSED_PROPOSALS, np.nan)))})
    return pd.DataFrame(rows, columns=ESTIMATE_COLUMNS)
