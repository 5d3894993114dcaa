"""Aggregate the sweeps in an MLflow store into the paper's tables.

    python orchestration/aggregate.py [--mlflow-uri URI] [--experiment NAME ...] [--out DIR]

reads every run with `mlflow.search_runs` (the schema is in
`orchestration/common.py`) and writes under DIR (default `results/`):

* `table1.md`, `table1.csv`, `table1.tex` - the paper's Table 1 layout: a row
  per scheme, a column per data set x mode, each cell the test mAP of the
  final-seed runs (role=final) as mean +- sample std (ddof=1; left blank when
  n = 1), n, the paper's number and the difference ours - paper;
* `boostlu.md`, `boostlu.csv`, `boostlu.tex` - the BoostLU paper's table beside ours, when BoostLU runs
  exist;
* `recent.md`, `recent.csv`, `recent.tex` - the methods since 2022 (EM, EM+APL, GR: the registry's
  `recent` schemes, wsml/schemes.py), each beside its own paper's number, when their final runs exist;
* `openimages.md`, `openimages.csv` - G1-G5 and all, when OpenImages runs exist;
* `sweeps.md`, `sweeps.csv` - per sweep and scheme: the best configuration
  (by best_val_map over the search trials), trials run, ASHA stops, epochs and
  GPU-hours spent;
* `figures/*.png` - see `orchestration/report/figures.py`.

Files are written atomically (temp file, then rename) and only when there is
something to write. An empty or missing store, an unknown experiment or an
experiment without finished runs raises `AggregateError` (the CLI prints its
one-line message and exits 1) before any file is touched.

Where final runs for the same (scheme, data set, mode) sit in more than one
experiment, the table uses the experiment whose final runs started last (a
note says so); pass `--experiment` to choose. Runs trained on different data
(the identity `wsml.data`: the same data set name prepared with other labels,
another split, other observed labels) are never averaged into one cell: the
cell takes the latest experiment's runs of one data, the note says the data
differed, and `table1.csv` and `sweeps.csv` name the data of each row.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pandas as pd

from wsml.files import atomic_write
from wsml.logs import show_on_console
from wsml.progress import Progress

from orchestration import common as T
from orchestration.tracking import store
from orchestration.common import AggregateError, first_line
from orchestration.report.render import render_openimages, render_sweeps, render_table1
from orchestration.report.runs import load_runs
from orchestration.report.tables import (boostlu_frame, estimates_frame, openimages_frame, recent_frame,
                                         sweeps_frame, table1_frame)

__all__ = ["AggregateResult", "aggregate", "estimates_frame", "load_runs", "main"]


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
    recent: pd.DataFrame | None = None       # tidy, as table1: the methods since 2022 beside their papers


# --------------------------------------------------------------------------- writing

def aggregate(mlflow_uri: str | None = None, experiments: list[str] | None = None,
              out_dir: str | Path = "results", *, figures: bool = True, all_columns: bool = False) -> AggregateResult:
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
    recent_notes: list[str] = []
    recent = recent_frame(runs, recent_notes)
    sw = sweeps_frame(runs)
    out = Path(out_dir)
    result = AggregateResult(out_dir=out, experiments=used, runs=runs, table1=None, openimages=None,
                             sweeps=sw, notes=notes)

    outputs: list[tuple[str, str]] = []
    if (t1["n"] > 0).any():
        result.table1 = t1
        md, csv, tex = render_table1(t1, used, notes, all_columns=all_columns)
        outputs += [("table1.md", md), ("table1.csv", csv), ("table1.tex", tex)]
    else:
        notes.append("no finished final-seed runs (role=final) yet: table1 not written")
    if boost is not None and (boost["n"] > 0).any():
        md, csv, tex = render_table1(boost, used, [], title="BoostLU (CVPR 2023), single positive label: test "
                                     "mAP, ours vs. the BoostLU paper", label="tab:boostlu",
                                     all_columns=all_columns)
        outputs += [("boostlu.md", md), ("boostlu.csv", csv), ("boostlu.tex", tex)]
    if recent is not None and (recent["n"] > 0).any():
        result.recent = recent
        md, csv, tex = render_table1(recent, used, recent_notes, title="Methods since 2022 (EM and EM+APL, ECCV "
                                     "2022; GR, IJCAI 2024): test mAP, ours vs. each method's own paper",
                                     label="tab:recent", all_columns=True)    # its columns: recent_frame
        outputs += [("recent.md", md), ("recent.csv", csv), ("recent.tex", tex)]
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
        from orchestration.report import figures as F
        from orchestration.report import importance

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
    def error(self, message: str) -> NoReturn:  # one line, not the usage's three examples and the error
        print(f"aggregate: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    show_on_console("orchestration")
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
    ap.add_argument("--all-columns", action="store_true",
                    help="Table 1 and the BoostLU table with every data set and mode of the paper, also those "
                         "without runs (default: the columns with runs; the CSV always holds every cell)")
    args = ap.parse_args(argv)
    try:
        res = aggregate(args.mlflow_uri, args.experiment, args.out, figures=not args.no_figures,
                        all_columns=args.all_columns)
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
