"""Aggregate the sweeps in an MLflow store into the paper's tables.

    python orchestration/aggregate.py [--mlflow-uri URI] [--experiment NAME ...] [--out DIR]

reads every run with `mlflow.search_runs` (the schema is in
`orchestration/tracking.py`) and writes under DIR (default `results/`):

* `table1.md`, `table1.csv`, `table1.tex` - the paper's Table 1 layout: a row
  per scheme, a column per data set x mode, each cell the test mAP of the
  final-seed runs (role=final) as mean +- sample std (ddof=1; left blank when
  n = 1), n, the paper's number and the difference ours - paper;
* `openimages.md`, `openimages.csv` - G1-G5 and all, when OpenImages runs exist;
* `sweeps.md`, `sweeps.csv` - per sweep and scheme: the best configuration
  (by best_val_map over the search trials), trials run, ASHA stops, epochs and
  GPU-hours spent;
* `figures/*.png` - see `orchestration/figures.py`.

Files are written atomically (temp file, then rename) and only when there is
something to write. An empty or missing store, an unknown experiment or an
experiment without finished runs raises `AggregateError` (the CLI prints its
one-line message and exits 1) before any file is touched.

Where final runs for the same (scheme, data set, mode) sit in more than one
experiment, the table uses the experiment whose final runs started last (a
note says so); pass `--experiment` to choose.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from wsml.files import atomic_write
from wsml.progress import Progress

from orchestration import paper, paper_boostlu, store
from orchestration import common as T
from orchestration.common import AggregateError, first_line, method_name, redact

__all__ = ["AggregateResult", "aggregate", "load_runs", "main"]

FINISHED = "FINISHED"
FAILED_STATUSES = ("FAILED", "KILLED")
UNFINISHED_STATUSES = ("RUNNING", "SCHEDULED")
EMPTY = "–"           # marks a cell without runs
# Params that are bookkeeping, never part of "the best configuration".
_NOT_CONFIG = {"seed", "scheme", "mode", "dataset", "trial_id", "data_root", "cache_dir", "device"}


@dataclass
class AggregateResult:
    """What `aggregate` found and wrote."""

    out_dir: Path
    experiments: list[str]
    runs: pd.DataFrame                  # one row per run, normalised (see load_runs)
    table1: pd.DataFrame | None         # tidy: method, dataset, mode, mean, std, n, paper, diff, ...
    openimages: pd.DataFrame | None     # tidy: method, mode, group, mean, std, n, paper, diff, ...
    sweeps: pd.DataFrame                # one row per (sweep, dataset, mode, scheme) + "all" rows
    files: list[Path] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    importance: pd.DataFrame | None = None   # per scheme, Optuna's importance of each searched value


# --------------------------------------------------------------------------- reading

def _check_store(uri: str) -> None:
    """The store can be read: a server answers (within seconds), a local store exists (and is not
    created by reading it)."""
    try:
        store.check_uri(uri)
    except T.TrackingError as err:
        raise AggregateError(str(err)) from None
    path = store.local_path(uri)
    if path is not None and not path.exists():
        raise AggregateError(f"no MLflow store at {redact(uri)} ({path} does not exist): run a sweep first or "
                             "pass --mlflow-uri")


def _runs_frame(client, experiment_ids: list[str]) -> pd.DataFrame:
    """Every active run of the experiments, one row each: run_id, experiment_id, status, start_time,
    and a `tags.*`, `params.*`, `metrics.*` column per name (as `mlflow.search_runs` lays them out)."""
    from mlflow.entities import ViewType

    rows, token = [], None
    while True:
        page = client.search_runs(experiment_ids, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                  page_token=token)
        for r in page:
            row = {"run_id": r.info.run_id, "experiment_id": r.info.experiment_id, "status": r.info.status,
                   "start_time": pd.to_datetime(r.info.start_time, unit="ms", utc=True),
                   "end_time": pd.to_datetime(r.info.end_time, unit="ms", utc=True)}
            row.update({f"tags.{k}": v for k, v in r.data.tags.items()})
            row.update({f"params.{k}": v for k, v in r.data.params.items()})
            row.update({f"metrics.{k}": v for k, v in r.data.metrics.items()})
            rows.append(row)
        token = page.token
        if not token:
            return pd.DataFrame(rows)


def _col(df: pd.DataFrame, name: str, default=None) -> pd.Series:
    if name in df.columns:
        return df[name]
    return pd.Series([default] * len(df), index=df.index, dtype=object)


def _text(series: pd.Series) -> pd.Series:
    """Tags/params as plain strings, missing -> ""."""
    return series.astype(object).where(series.notna(), "").astype(str)


def _num(series: pd.Series) -> pd.Series:
    return pd.to_numeric(series, errors="coerce").astype(float)


def _normalise(raw: pd.DataFrame, names: dict[str, str]) -> pd.DataFrame:
    """One row per run with the project's fields as plain columns."""
    if raw.empty:
        raw = pd.DataFrame({c: pd.Series(dtype=object)
                            for c in ("run_id", "experiment_id", "status", "start_time", "end_time")})
    df = pd.DataFrame(index=raw.index)
    df["run_id"] = raw["run_id"].astype(str)
    df["experiment_id"] = raw["experiment_id"].astype(str)
    df["experiment"] = df["experiment_id"].map(names).fillna("")
    df["status"] = _text(raw["status"])
    df["start_time"] = raw["start_time"]
    df["end_time"] = _col(raw, "end_time")
    df["run_name"] = _text(_col(raw, "tags.mlflow.runName"))
    df["parent_run_id"] = _text(_col(raw, f"tags.{T.TAG_PARENT}"))

    def tag_or_param(tag: str, param: str, default: str = "") -> pd.Series:
        t = _text(_col(raw, f"tags.{tag}"))
        p = _text(_col(raw, f"params.{param}"))
        return t.where(t != "", p).where(lambda s: s != "", default)

    role = _text(_col(raw, f"tags.{T.TAG_ROLE}"))
    # A nested run without a role tag is a search trial (e.g. logged by Ray's callback).
    role = role.where((role != "") | (df["parent_run_id"] == ""), T.ROLE_TRIAL)
    df["role"] = role
    df["dataset"] = tag_or_param(T.TAG_DATASET, "dataset")
    df["base_scheme"] = tag_or_param(T.TAG_SCHEME, "scheme")
    # The table row: "<scheme> + BoostLU" for runs with the BoostLU head (tag, else the param).
    boostlu = ~_text(_col(raw, "params.boostlu_alpha")).isin(["", "None", "nan"])
    derived = df["base_scheme"].where(~boostlu, df["base_scheme"] + " + BoostLU")
    df["scheme"] = _text(_col(raw, f"tags.{T.TAG_METHOD}")).where(lambda m: m != "", derived)
    df["mode"] = tag_or_param(T.TAG_MODE, "mode", "end-to-end")
    df["seed"] = tag_or_param(T.TAG_SEED, "seed")
    df["trial_id"] = _text(_col(raw, f"tags.{T.TAG_TRIAL_ID}"))
    df["end_reason"] = _text(_col(raw, f"tags.{T.TAG_STATUS_REASON}"))
    df["epochs_cfg"] = _num(_col(raw, "params.epochs"))
    for metric in (T.TEST_MAP, T.BEST_VAL_MAP, T.BEST_EPOCH, T.EPOCHS_RUN, T.GPU_HOURS,
                   T.TRAIN_HOURS, T.REUSED_PROPOSALS, *paper.OPENIMAGES_METRICS.values()):
        df[metric] = _num(_col(raw, f"metrics.{metric}", np.nan))
    params = [c for c in raw.columns if c.startswith("params.")]
    for c in params:
        df[c] = raw[c]
    df["outcome"] = _outcomes(df)
    return df.reset_index(drop=True)


def _outcomes(df: pd.DataFrame) -> pd.Series:
    """completed / asha_stopped / stop_drop / failed / unfinished for every run."""
    out = []
    for status, reason, run, cfg in zip(df["status"], df["end_reason"], df[T.EPOCHS_RUN],
                                        df["epochs_cfg"]):
        if status in FAILED_STATUSES or reason.startswith("failed"):
            out.append("failed")
        elif status in UNFINISHED_STATUSES:
            out.append("unfinished")
        elif reason in ("asha_stopped", "stop_drop", "completed"):
            out.append(reason)
        elif math.isfinite(run) and math.isfinite(cfg) and run < cfg:
            out.append("asha_stopped")   # no end-reason tag: a short run was stopped by ASHA
        else:
            out.append("completed")
    return pd.Series(out, index=df.index, dtype=object)


def load_runs(mlflow_uri: str | None = None,
              experiments: list[str] | None = None) -> tuple[pd.DataFrame, list[str], str]:
    """Read the sweep runs of the store: (normalised runs, experiment names, uri).

    Raises AggregateError when the store is missing or empty, an experiment is
    unknown, or a named experiment holds no finished runs.
    """
    from mlflow.entities import ViewType

    uri = store.resolve_uri(mlflow_uri) if mlflow_uri else store.default_uri()
    _check_store(uri)
    shown = redact(uri)
    try:
        client = store.client(uri)
        all_exps, token = [], None
        while True:
            page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                             page_token=token)
            all_exps += list(page)
            token = page.token
            if not token:
                break
    except Exception as err:  # noqa: BLE001 - any store failure becomes one clear line
        raise AggregateError(f"cannot read MLflow store {shown}: {first_line(err)}") from None
    by_name = {e.name: e for e in all_exps}
    if experiments:
        unknown = [n for n in experiments if n not in by_name]
        if unknown:
            known = ", ".join(sorted(by_name)) or "none"
            raise AggregateError(f"unknown experiment {', '.join(map(repr, unknown))} in MLflow store "
                                 f"{shown} (experiments there: {known})")
        chosen = [by_name[n] for n in dict.fromkeys(experiments)]
    else:
        chosen = all_exps
    if not chosen:
        raise AggregateError(f"MLflow store {shown} holds no experiments: run a sweep first")
    chosen.sort(key=lambda e: (int(e.experiment_id) if e.experiment_id.isdigit() else math.inf,
                               e.experiment_id))     # creation order
    names = {e.experiment_id: e.name for e in chosen}
    try:
        raw = _runs_frame(client, list(names))
    except Exception as err:  # noqa: BLE001
        raise AggregateError(f"cannot read runs from MLflow store {shown}: {first_line(err)}") from None
    runs = _normalise(raw, names)
    runs = runs[runs["role"].isin([T.ROLE_SWEEP, T.ROLE_TRIAL, T.ROLE_FINAL])].reset_index(drop=True)
    done = runs[runs["role"].isin([T.ROLE_TRIAL, T.ROLE_FINAL]) & (runs["status"] == FINISHED)]
    if experiments:
        for name in dict.fromkeys(experiments):
            mine = runs[(runs["experiment"] == name) & runs["role"].isin([T.ROLE_TRIAL, T.ROLE_FINAL])]
            if not (done["experiment"] == name).any():
                states = ", ".join(f"{n} {s.lower()}" for s, n in mine["status"].value_counts().items())
                what = f"{len(mine)} trial/final run(s): {states}" if len(mine) else "no trial or final runs"
                raise AggregateError(f"experiment {name!r} in {shown} has no finished runs ({what})")
        used = list(dict.fromkeys(experiments))
    else:
        used = [names[i] for i in names if (done["experiment"] == names[i]).any()]
        if not used:
            if runs.empty:
                raise AggregateError(f"MLflow store {shown} holds no sweep runs: run a sweep first")
            raise AggregateError(f"MLflow store {shown} holds sweep runs but none finished")
    runs = runs[runs["experiment"].isin(used)].reset_index(drop=True)
    return runs, used, uri


# --------------------------------------------------------------------------- tables

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
    """The paper's rows first, each followed by its BoostLU row (as in the BoostLU paper), then the rest."""
    methods = [m for m in dict.fromkeys(methods) if m]
    out = []
    for m in paper.METHODS:
        out += [x for x in (m, method_name(m, 1.0)) if x in methods]
    return out + sorted(m for m in methods if m not in out)


def _mode_order(modes) -> list[str]:
    modes = [m for m in dict.fromkeys(modes) if m]
    return [m for m in paper.MODES if m in modes] + sorted(m for m in modes if m not in paper.MODES)


def _final_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[(runs["role"] == T.ROLE_FINAL) & (runs["status"] == FINISHED)
                & ~runs["outcome"].isin(["failed", "unfinished"])]


def _pick_experiment(group: pd.DataFrame, label: str, notes: list[str]) -> pd.DataFrame:
    """Final runs of one cell: those of the experiment whose final runs started last."""
    exps = group.groupby("experiment")["start_time"].max().sort_values()
    if len(exps) <= 1:
        return group
    chosen = exps.index[-1]
    notes.append(f"{label}: final runs in {len(exps)} experiments ({', '.join(exps.index)}); "
                 f"using the latest, {chosen!r}")
    return group[group["experiment"] == chosen]


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
            "seeds": ", ".join(sorted(cell["seed"].astype(str), key=_seed_key))}


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
                 "final_epochs", "final_gpu_hours"]


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
        rows.append({"sweep": sweep, "device": est["device"], "slots": _num(pd.Series([est["slots"]])).iloc[0],
                     "epochs_estimated": float(est["epochs"]), "epochs_most": float(est["epochs_most"]),
                     "epochs_spent": float(np.nansum(nested[T.EPOCHS_RUN].to_numpy(dtype=float))),
                     "trial_hours_estimated": float(est["trial_hours"]),
                     "trial_hours_spent": float(np.nansum(nested[T.TRAIN_HOURS].to_numpy(dtype=float))),
                     "gpu_hours_estimated": float(est["gpu_hours"]),
                     "gpu_hours_spent": float(np.nansum(nested[T.GPU_HOURS].to_numpy(dtype=float))),
                     "wall_s_estimated": float(est["wall_s"]), "wall_s_spent": wall,
                     "reused_proposals": float(np.nan_to_num(p.get(T.REUSED_PROPOSALS, np.nan)))})
    return pd.DataFrame(rows, columns=ESTIMATE_COLUMNS)


# --------------------------------------------------------------------------- rendering

def format_cell(mean: float, std: float, n: int, ref: float) -> str:
    """"85.31 ± 0.42 (n=3) · paper 85.1 · Δ +0.21"; "– · paper 85.1" without runs."""
    if n:
        ours = f"{mean:.2f}" + (f" ± {std:.2f}" if n > 1 and math.isfinite(std) else "") + f" (n={n})"
    else:
        ours = EMPTY
    parts = [ours]
    if math.isfinite(ref):
        parts.append(f"paper {ref:.1f}")
        if n:
            parts.append(f"Δ {mean - ref:+.2f}")
    return " · ".join(parts)


def table1_wide(tidy: pd.DataFrame) -> pd.DataFrame:
    """Rows = methods, columns = (mode label, data set label), cells = format_cell strings."""
    cells = tidy.assign(cell=[format_cell(r.mean, r.std, r.n, r.paper) for r in tidy.itertuples()])
    cols = list(dict.fromkeys(zip(cells["mode_label"], cells["dataset_label"])))
    wide = cells.pivot(index="method", columns=["mode_label", "dataset_label"], values="cell")
    wide = wide.reindex(index=list(dict.fromkeys(cells["method"])),
                        columns=pd.MultiIndex.from_tuples(cols))
    wide.index.name = "method"
    return wide


def _flat(wide: pd.DataFrame) -> pd.DataFrame:
    flat = wide.copy()
    flat.columns = [" ".join(c) for c in wide.columns]
    return flat


def _latex_text(s: str) -> str:
    s = s.replace("\\", r"\textbackslash{}")
    for a, b in (("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        s = s.replace(a, b)
    return (s.replace(" ± ", r" $\pm$ ").replace(EMPTY, "--").replace("Δ ", r"$\Delta$ ")
             .replace(" · ", "; "))


LEGEND = ("Cells: test mAP (%) of the final-seed runs (role=final) as mean ± sample std "
          "(ddof=1; left out when n = 1) (n = runs), the paper's number, and Δ = ours − paper. "
          f"{EMPTY} = no final runs.")


def render_table1(tidy: pd.DataFrame, experiments: list[str], notes: list[str],
                  title: str = "Table 1: test mAP, ours vs. the paper", label: str = "tab:table1") -> tuple[str, str, str]:
    """(markdown, csv, latex) of Table 1 (or of a table laid out as it: the BoostLU table)."""
    wide = table1_wide(tidy)
    md = [f"# {title}", "",
          f"Sweeps: {', '.join(experiments)}. {LEGEND}", "",
          _flat(wide).to_markdown(), ""]
    if notes:
        md += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    csv = tidy[["method", "dataset", "dataset_label", "mode", "mode_label", "mean", "std", "n",
                "paper", "diff", "experiment", "seeds"]].to_csv(index=False, float_format="%.6g")
    tex_df = wide.map(_latex_text)
    tex_df.index = [_latex_text(i) for i in tex_df.index]
    tex_df.index.name = None
    tex_df.columns = pd.MultiIndex.from_tuples([tuple(_latex_text(x) for x in c) for c in wide.columns])
    tex = tex_df.style.to_latex(
        hrules=True, multicol_align="c", column_format="l" + "l" * len(wide.columns),
        caption="Test mAP (\\%): mean $\\pm$ sample std over final seeds (n); paper; "
                "$\\Delta$ = ours $-$ paper. -- = no final runs.",
        label=label)
    return "\n".join(md), csv, tex


def render_openimages(tidy: pd.DataFrame, notes: list[str]) -> tuple[str, str]:
    cells = tidy.assign(
        cell=[format_cell(r.mean, r.std, r.n, r.paper) for r in tidy.itertuples()],
        row=[r.method if r.mode == paper.OPENIMAGES_MODE else f"{r.method} ({r.mode_label})"
             for r in tidy.itertuples()])
    wide = cells.pivot(index="row", columns="group", values="cell")
    wide = wide.reindex(index=list(dict.fromkeys(cells["row"])), columns=list(paper.OPENIMAGES_GROUPS))
    wide.index.name = "method"
    md = ["# OpenImages V3: mAP by class-frequency group, ours vs. the paper", "",
          LEGEND + " Groups G1-G5 are read from test_map_g1..g5, All from test_map.", "",
          wide.to_markdown(), ""]
    oi_notes = [n for n in notes if "OpenImages" in n]
    if oi_notes:
        md += ["Notes:", ""] + [f"- {n}" for n in oi_notes] + [""]
    csv = tidy[["method", "mode", "group", "metric", "mean", "std", "n", "paper", "diff",
                "experiment"]].to_csv(index=False, float_format="%.6g")
    return "\n".join(md), csv


def render_sweeps(sweeps: pd.DataFrame, estimates: pd.DataFrame | None = None) -> tuple[str, str]:
    md = ["# Sweeps", "",
          "Per scheme: search trials (role=trial) and how they ended (asha_stopped = stopped early "
          "by ASHA; stop_drop = validation mAP fell too far below its best), epochs and GPU-hours "
          "spent by the search, the best configuration by best_val_map, and the final-seed reruns "
          "of that configuration (mean test mAP).", ""]
    shown = ["scheme", "trials", "completed", "asha_stopped", "stop_drop", "failed", "epochs",
             "gpu_hours", "best_val_map", "best_trial", "best_config", "final_runs",
             "final_test_map", "final_gpu_hours"]
    for (sweep, ds, mode), grp in sweeps.groupby(["sweep", "dataset", "mode"], sort=False):
        part = grp[shown].copy()
        if (grp["unfinished"] > 0).any():
            part.insert(6, "unfinished", grp["unfinished"])
        part["epochs"] = part["epochs"].map(lambda v: f"{v:g}")
        part["gpu_hours"] = part["gpu_hours"].map(lambda v: f"{v:.3f}")
        part["final_gpu_hours"] = part["final_gpu_hours"].map(lambda v: f"{v:.3f}")
        for c in ("best_val_map", "final_test_map"):
            part[c] = part[c].map(lambda v: f"{v:.2f}" if math.isfinite(v) else EMPTY)
        md += [f"## {sweep} ({paper.DATASET_LABELS.get(ds, ds)}, {paper.MODE_LABELS.get(mode, mode)})",
               "", part.to_markdown(index=False), ""]
    if estimates is not None and not estimates.empty:
        md += ["## Estimated at the start vs spent", "",
               "What `orchestration/sweep.py` estimated when the sweep started (`--dry-run` prints the same, "
               "with its assumptions) beside what its search and final stage spent: epochs (expected; at "
               "most), trial-hours, GPU-hours, and the sweep's wall time (first start to end; `–` while it "
               "has not finished). Reused: proposals answered from recorded results instead of trained.", ""]
        shown = pd.DataFrame({
            "sweep": estimates["sweep"], "device": estimates["device"],
            "trials at once": estimates["slots"].map(lambda v: f"{v:g}"),
            "epochs est. (most)": [f"{e:g} ({m:g})" for e, m in zip(estimates["epochs_estimated"],
                                                                     estimates["epochs_most"])],
            "epochs spent": estimates["epochs_spent"].map(lambda v: f"{v:g}"),
            "trial-h est.": estimates["trial_hours_estimated"].map(lambda v: f"{v:.3g}"),
            "trial-h spent": estimates["trial_hours_spent"].map(lambda v: f"{v:.3g}"),
            "GPU-h est.": estimates["gpu_hours_estimated"].map(lambda v: f"{v:.3g}"),
            "GPU-h spent": estimates["gpu_hours_spent"].map(lambda v: f"{v:.3g}"),
            "wall est.": estimates["wall_s_estimated"].map(lambda v: f"{v:,.0f} s"),
            "wall spent": estimates["wall_s_spent"].map(lambda v: f"{v:,.0f} s" if math.isfinite(v) else EMPTY),
            "reused": estimates["reused_proposals"].map(lambda v: f"{v:g}")})
        md += [shown.to_markdown(index=False), ""]
    csv = sweeps.to_csv(index=False, float_format="%.6g")
    return "\n".join(md), csv


# --------------------------------------------------------------------------- writing

def aggregate(mlflow_uri: str | None = None, experiments: list[str] | None = None,
              out_dir: str | Path = "results", *, figures: bool = True) -> AggregateResult:
    """Read the store, build the tables (and figures) and write them under `out_dir`.

    `mlflow_uri` None: MLflow's current tracking URI (by default sqlite mlflow.db in
    the working directory). `experiments` None: every experiment holding finished
    sweep runs. Raises AggregateError, writing nothing, when there is nothing to aggregate.
    """
    runs, used, uri = load_runs(mlflow_uri, experiments)
    notes: list[str] = []
    t1 = table1_frame(runs, notes)
    oi = openimages_frame(runs, notes)
    boost = boostlu_frame(runs, notes)
    sw = sweeps_frame(runs)
    out = Path(out_dir)
    result = AggregateResult(out_dir=out, experiments=used, runs=runs, table1=None, openimages=None,
                             sweeps=sw, notes=notes)

    outputs: list[tuple[str, str]] = []
    if (t1["n"] > 0).any():
        result.table1 = t1
        md, csv, tex = render_table1(t1, used, notes)
        outputs += [("table1.md", md), ("table1.csv", csv), ("table1.tex", tex)]
    else:
        notes.append("no finished final-seed runs (role=final) yet: table1 not written")
    if boost is not None and (boost["n"] > 0).any():
        md, csv, tex = render_table1(boost, used, [], title="BoostLU (CVPR 2023), single positive label: test "
                                     "mAP, ours vs. the BoostLU paper", label="tab:boostlu")
        outputs += [("boostlu.md", md), ("boostlu.csv", csv), ("boostlu.tex", tex)]
    if oi is not None:
        result.openimages = oi
        md, csv = render_openimages(oi, notes)
        outputs += [("openimages.md", md), ("openimages.csv", csv)]
    if not sw.empty:
        md, csv = render_sweeps(sw, estimates_frame(runs))
        outputs += [("sweeps.md", md), ("sweeps.csv", csv)]
    if not outputs:  # cannot happen after load_runs' checks, but never write empty files
        raise AggregateError(f"nothing to aggregate in {', '.join(used)}")

    figs: list[tuple[str, bytes]] = []
    if figures:
        from orchestration import figures as F
        from orchestration import importance

        try:
            result.importance = importance.importances(runs)
        except Exception as err:  # noqa: BLE001 - the other figures are still worth drawing
            notes.append(f"parameter importances not computed: {type(err).__name__}: {first_line(err)}")
        client = store.client(uri)
        cache: dict[tuple[str, str], list[tuple[int, float]]] = {}

        def history(run_id: str, key: str) -> list[tuple[int, float]]:
            if (run_id, key) not in cache:
                ms = client.get_metric_history(run_id, key)
                cache[(run_id, key)] = sorted((int(m.step), float(m.value)) for m in ms)
            return cache[(run_id, key)]

        try:
            # one request per run: the long part of a large sweep's aggregation, shown as it goes
            trial_ids = runs.loc[runs["role"] == T.ROLE_TRIAL, "run_id"]
            with Progress(len(trial_ids), "aggregate: reading metric histories", "runs", lines=0) as shown:
                for run_id in trial_ids:
                    history(run_id, T.VAL_MAP)
                    shown.update()
            figs = F.render_figures(runs, result.table1, sw, history, result.importance)
        except Exception as err:  # noqa: BLE001 - the tables are still worth writing
            notes.append(f"figures not drawn: {type(err).__name__}: {first_line(err)}")

    for name, text in outputs:
        result.files.append(atomic_write(out / name, text))
    for name, png in figs:
        result.figures.append(atomic_write(out / "figures" / name, png))
    return result


# --------------------------------------------------------------------------- CLI

# `--help` starts with these (argparse prints them after "usage: ")
EXAMPLES = """python orchestration/aggregate.py                                   # every sweep in ./mlflow.db -> results/
       python orchestration/aggregate.py --experiment digits-20260101-120000 --out results/one   # one sweep
       python orchestration/aggregate.py --mlflow-uri http://127.0.0.1:5000 --no-figures          # a tracking server, tables only"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage's three examples and the error
        print(f"aggregate: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(
        prog="aggregate.py", usage=EXAMPLES,
        description="Aggregate sweeps in an MLflow store into Table 1 (ours vs. the paper), the "
                    "OpenImages table, a per-sweep summary and figures.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mlflow-uri", default=None,
                    help="tracking URI (default: MLflow's default, sqlite:///mlflow.db in the "
                         "working directory, or $MLFLOW_TRACKING_URI)")
    ap.add_argument("--experiment", action="append", default=None, metavar="NAME",
                    help="experiment (= sweep) name; repeat for several (default: every "
                         "experiment holding finished sweep runs)")
    ap.add_argument("--out", default="results", help="output folder (default: results)")
    ap.add_argument("--no-figures", action="store_true", help="write the tables only")
    args = ap.parse_args(argv)
    try:
        res = aggregate(args.mlflow_uri, args.experiment, args.out, figures=not args.no_figures)
    except AggregateError as err:
        print(f"aggregate: {first_line(err)}", file=sys.stderr)
        return 1
    print(f"aggregated {', '.join(res.experiments)}")
    for note in res.notes:
        print(f"note: {note}")
    for p in res.files + res.figures:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
