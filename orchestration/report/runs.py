"""The runs of an MLflow store as one pandas frame: one row per sweep, trial and final run, with the
project's tags and params as plain columns and each run's outcome (completed, asha_stopped, stop_drop,
failed, unfinished). `load_runs` raises `AggregateError` with one line when there is nothing to read."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from orchestration import common as T
from orchestration.report import paper
from orchestration.tracking import store
from orchestration.common import AggregateError, first_line, redact

FINISHED = "FINISHED"
FAILED_STATUSES = ("FAILED", "KILLED")
UNFINISHED_STATUSES = ("RUNNING", "SCHEDULED")
NOT_RECORDED = "not recorded"       # the data of runs logged before its identity was


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


def col(df: pd.DataFrame, name: str, default=None) -> pd.Series:
    if name in df.columns:
        return df[name]
    return pd.Series([default] * len(df), index=df.index, dtype=object)


def _text(series: pd.Series) -> pd.Series:
    """Tags/params as plain strings, missing -> ""."""
    return series.astype(object).where(series.notna(), "").astype(str)


def num(series: pd.Series) -> pd.Series:
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
    df["end_time"] = col(raw, "end_time")
    df["run_name"] = _text(col(raw, "tags.mlflow.runName"))
    df["parent_run_id"] = _text(col(raw, f"tags.{T.TAG_PARENT}"))

    def tag_or_param(tag: str, param: str, default: str = "") -> pd.Series:
        t = _text(col(raw, f"tags.{tag}"))
        p = _text(col(raw, f"params.{param}"))
        return t.where(t != "", p).where(lambda s: s != "", default)

    role = _text(col(raw, f"tags.{T.TAG_ROLE}"))
    # A nested run without a role tag is a search trial (e.g. logged by Ray's callback).
    role = role.where((role != "") | (df["parent_run_id"] == ""), T.ROLE_TRIAL)
    df["role"] = role
    df["dataset"] = tag_or_param(T.TAG_DATASET, "dataset")
    df["data"] = tag_or_param(T.TAG_DATA, T.PARAM_DATA)
    df["base_scheme"] = tag_or_param(T.TAG_SCHEME, "scheme")
    # The table row: "<scheme> + BoostLU" for runs with the BoostLU head (tag, else the param).
    boostlu = ~_text(col(raw, "params.boostlu_alpha")).isin(["", "None", "nan"])
    derived = df["base_scheme"].where(~boostlu, df["base_scheme"] + " + BoostLU")
    df["scheme"] = _text(col(raw, f"tags.{T.TAG_METHOD}")).where(lambda m: m != "", derived)
    df["mode"] = tag_or_param(T.TAG_MODE, "mode", "end-to-end")
    df["seed"] = tag_or_param(T.TAG_SEED, "seed")
    df["trial_id"] = _text(col(raw, f"tags.{T.TAG_TRIAL_ID}"))
    df["end_reason"] = _text(col(raw, f"tags.{T.TAG_STATUS_REASON}"))
    df["epochs_cfg"] = num(col(raw, "params.epochs"))
    for metric in (T.TEST_MAP, T.BEST_VAL_MAP, T.BEST_EPOCH, T.EPOCHS_RUN, T.GPU_HOURS,
                   T.TRAIN_HOURS, T.REUSED_PROPOSALS, *paper.OPENIMAGES_METRICS.values()):
        df[metric] = num(col(raw, f"metrics.{metric}", np.nan))
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
