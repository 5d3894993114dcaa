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
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd

if __package__ in (None, ""):  # run as a script: make `orchestration` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestration import paper, tracking as T  # noqa: E402
from wsml.errors import WSMLError  # noqa: E402

__all__ = ["AggregateError", "AggregateResult", "aggregate", "load_runs", "main"]

FINISHED = "FINISHED"
FAILED_STATUSES = ("FAILED", "KILLED")
UNFINISHED_STATUSES = ("RUNNING", "SCHEDULED")
EMPTY = "–"           # marks a cell without runs
# Params that are bookkeeping, never part of "the best configuration".
_NOT_CONFIG = {"seed", "scheme", "mode", "dataset", "trial_id", "data_root", "cache_dir", "device"}


class AggregateError(WSMLError):
    """Nothing to aggregate (empty/missing store, unknown experiment, no finished runs)."""


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


# --------------------------------------------------------------------------- reading

def _default_uri() -> str:
    import mlflow
    return mlflow.get_tracking_uri()


def _check_store_exists(uri: str) -> None:
    """A local store that does not exist is an error (and must not be created)."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        # sqlite:///relative.db, sqlite:////abs/path.db
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else parsed.path
        path = unquote(path.split("?", 1)[0])
        if path in ("", ":memory:") or not Path(path).is_file():
            raise AggregateError(f"no MLflow store at {uri} (file {path or '?'} does not exist): "
                                 "run a sweep first or pass --mlflow-uri")
    elif parsed.scheme in ("", "file"):
        path = unquote(parsed.path) if parsed.scheme == "file" else uri
        if not Path(path).is_dir():
            raise AggregateError(f"no MLflow store at {uri} (folder {path} does not exist): "
                                 "run a sweep first or pass --mlflow-uri")


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """Point the fluent MLflow API at `uri` and restore the caller's setting after."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tu

    if mlflow.get_tracking_uri() == uri:
        yield
        return
    old_global = tu._tracking_uri
    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_global)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


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
                            for c in ("run_id", "experiment_id", "status", "start_time")})
    df = pd.DataFrame(index=raw.index)
    df["run_id"] = raw["run_id"].astype(str)
    df["experiment_id"] = raw["experiment_id"].astype(str)
    df["experiment"] = df["experiment_id"].map(names).fillna("")
    df["status"] = _text(raw["status"])
    df["start_time"] = raw["start_time"]
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
    df["scheme"] = tag_or_param(T.TAG_SCHEME, "scheme")
    df["mode"] = tag_or_param(T.TAG_MODE, "mode", "end-to-end")
    df["seed"] = tag_or_param(T.TAG_SEED, "seed")
    df["trial_id"] = _text(_col(raw, f"tags.{T.TAG_TRIAL_ID}"))
    df["end_reason"] = _text(_col(raw, f"tags.{T.TAG_STATUS_REASON}"))
    df["epochs_cfg"] = _num(_col(raw, "params.epochs"))
    for metric in (T.TEST_MAP, T.BEST_VAL_MAP, T.BEST_EPOCH, T.EPOCHS_RUN, T.GPU_HOURS,
                   T.TRAIN_HOURS, *paper.OPENIMAGES_METRICS.values()):
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
    import mlflow
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    uri = mlflow_uri or _default_uri()
    _check_store_exists(uri)
    try:
        client = MlflowClient(tracking_uri=uri)
        all_exps, token = [], None
        while True:
            page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                             page_token=token)
            all_exps += list(page)
            token = page.token
            if not token:
                break
    except Exception as err:  # noqa: BLE001 - any store failure becomes one clear line
        raise AggregateError(f"cannot read MLflow store {uri}: {_first_line(err)}") from err
    by_name = {e.name: e for e in all_exps}
    if experiments:
        unknown = [n for n in experiments if n not in by_name]
        if unknown:
            known = ", ".join(sorted(by_name)) or "none"
            raise AggregateError(f"unknown experiment {', '.join(map(repr, unknown))} in MLflow store "
                                 f"{uri} (experiments there: {known})")
        chosen = [by_name[n] for n in dict.fromkeys(experiments)]
    else:
        chosen = all_exps
    if not chosen:
        raise AggregateError(f"MLflow store {uri} holds no experiments: run a sweep first")
    chosen.sort(key=lambda e: (int(e.experiment_id) if e.experiment_id.isdigit() else math.inf,
                               e.experiment_id))     # creation order
    names = {e.experiment_id: e.name for e in chosen}
    try:
        with _tracking_uri(uri):
            raw = mlflow.search_runs(experiment_ids=list(names), output_format="pandas",
                                     run_view_type=ViewType.ACTIVE_ONLY)
    except Exception as err:  # noqa: BLE001
        raise AggregateError(f"cannot read runs from MLflow store {uri}: {_first_line(err)}") from err
    runs = _normalise(raw, names)
    runs = runs[runs["role"].isin([T.ROLE_SWEEP, T.ROLE_TRIAL, T.ROLE_FINAL])].reset_index(drop=True)
    done = runs[runs["role"].isin([T.ROLE_TRIAL, T.ROLE_FINAL]) & (runs["status"] == FINISHED)]
    if experiments:
        for name in dict.fromkeys(experiments):
            mine = runs[(runs["experiment"] == name) & runs["role"].isin([T.ROLE_TRIAL, T.ROLE_FINAL])]
            if not (done["experiment"] == name).any():
                states = ", ".join(f"{n} {s.lower()}" for s, n in mine["status"].value_counts().items())
                what = f"{len(mine)} trial/final run(s): {states}" if len(mine) else "no trial or final runs"
                raise AggregateError(f"experiment {name!r} in {uri} has no finished runs ({what})")
        used = list(dict.fromkeys(experiments))
    else:
        used = [names[i] for i in names if (done["experiment"] == names[i]).any()]
        if not used:
            if runs.empty:
                raise AggregateError(f"MLflow store {uri} holds no sweep runs: run a sweep first")
            raise AggregateError(f"MLflow store {uri} holds sweep runs but none finished")
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
    methods = [m for m in dict.fromkeys(methods) if m]
    return [m for m in paper.METHODS if m in methods] + sorted(m for m in methods if m not in paper.METHODS)


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
                cell = finals[(finals["dataset"] == ds) & (finals["mode"] == mode)
                              & (finals["scheme"] == method)]
                label = f"{method} {paper.DATASET_LABELS.get(ds, ds)} {paper.MODE_LABELS.get(mode, mode)}"
                cell = _pick_experiment(cell, label, notes) if len(cell) else cell
                mean, std, n = _stats(cell[T.TEST_MAP].to_numpy(dtype=float))
                ref = paper.table1(method, ds, mode)
                rows.append({
                    "method": method, "dataset": ds,
                    "dataset_label": paper.DATASET_LABELS.get(ds, ds),
                    "mode": mode, "mode_label": paper.MODE_LABELS.get(mode, mode),
                    "mean": mean, "std": std, "n": n,
                    "paper": math.nan if ref is None else ref,
                    "diff": round(mean - ref, 9) if (n and ref is not None) else math.nan,
                    "experiment": ", ".join(sorted(set(cell["experiment"]))),
                    "seeds": ", ".join(sorted(cell["seed"].astype(str), key=_seed_key)),
                })
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


def render_table1(tidy: pd.DataFrame, experiments: list[str], notes: list[str]) -> tuple[str, str, str]:
    """(markdown, csv, latex) of Table 1."""
    wide = table1_wide(tidy)
    md = ["# Table 1: test mAP, ours vs. the paper", "",
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
        label="tab:table1")
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


def render_sweeps(sweeps: pd.DataFrame) -> tuple[str, str]:
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
    csv = sweeps.to_csv(index=False, float_format="%.6g")
    return "\n".join(md), csv


# --------------------------------------------------------------------------- writing

def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "sweep"


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
    if oi is not None:
        result.openimages = oi
        md, csv = render_openimages(oi, notes)
        outputs += [("openimages.md", md), ("openimages.csv", csv)]
    if not sw.empty:
        md, csv = render_sweeps(sw)
        outputs += [("sweeps.md", md), ("sweeps.csv", csv)]
    if not outputs:  # cannot happen after load_runs' checks, but never write empty files
        raise AggregateError(f"nothing to aggregate in {', '.join(used)}")

    figs: list[tuple[str, bytes]] = []
    if figures:
        from orchestration import figures as F
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=uri)
        cache: dict[tuple[str, str], list[tuple[int, float]]] = {}

        def history(run_id: str, key: str) -> list[tuple[int, float]]:
            if (run_id, key) not in cache:
                ms = client.get_metric_history(run_id, key)
                cache[(run_id, key)] = sorted((int(m.step), float(m.value)) for m in ms)
            return cache[(run_id, key)]

        try:
            figs = F.render_figures(runs, result.table1, sw, history)
        except Exception as err:  # noqa: BLE001 - the tables are still worth writing
            notes.append(f"figures not drawn: {type(err).__name__}: {_first_line(err)}")

    for name, text in outputs:
        result.files.append(atomic_write(out / name, text))
    for name, png in figs:
        result.figures.append(atomic_write(out / "figures" / name, png))
    return result


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="aggregate.py",
        description="Aggregate sweeps in an MLflow store into Table 1 (ours vs. the paper), the "
                    "OpenImages table, a per-sweep summary and figures.")
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
        print(f"aggregate: {err}", file=sys.stderr)
        return 1
    print(f"aggregated {', '.join(res.experiments)}")
    for note in res.notes:
        print(f"note: {note}")
    for p in res.files + res.figures:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
