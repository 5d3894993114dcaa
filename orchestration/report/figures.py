"""Figures of the aggregated sweeps (matplotlib, Agg backend, PNG).

`render_figures` is called by `orchestration/aggregate.py`, which writes the
PNGs atomically under `<out>/figures/`:

* `<sweep>-val_map.png` - validation mAP per epoch of every search trial,
  coloured by scheme; a trial stopped early ends early, with a marker at the
  stop (x: ASHA, v: validation mAP dropped, !: failed);
* `<sweep>-memorization.png` - for the best trial of each scheme: per epoch,
  the fraction of modified label entries that were truly positive
  (modified_true_pos_frac), beside the fraction of entries modified
  (modified_frac). Only schemes that modify labels (the LL schemes) have these;
* `table1_vs_paper.png` - our Table 1 against the paper's, a grouped bar chart
  per data set x mode (ours with +- std error bars, the paper hatched);
* `<sweep>-importance.png` - per scheme, how much of the variance of the
  trials' best validation mAP each searched value explains (Optuna's fANOVA,
  `orchestration/report/importance.py`), with the number of trials it rests on.
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from orchestration import common as T
from orchestration.report import paper
from orchestration.common import safe_name

History = Callable[[str, str], list[tuple[int, float]]]

# One fixed colour per scheme, the same in every figure.
_PALETTE = tuple(matplotlib.color_sequences["tab10"])     # the colours of the tab10 colormap
SCHEME_COLORS = {s: _PALETTE[i] for i, s in enumerate(paper.METHODS)}
STOP_MARKERS = {"asha_stopped": ("x", "stopped by ASHA"),
                "stop_drop": ("v", "stopped: val mAP dropped"),
                "failed": ("$!$", "failed")}


def scheme_color(scheme: str):
    if scheme not in SCHEME_COLORS:
        SCHEME_COLORS[scheme] = _PALETTE[len(SCHEME_COLORS) % len(_PALETTE)]
    return SCHEME_COLORS[scheme]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _title(sweep: str, trials: pd.DataFrame) -> str:
    ds = ", ".join(paper.DATASET_LABELS.get(d, d) for d in dict.fromkeys(trials["dataset"]) if d)
    modes = ", ".join(paper.MODE_LABELS.get(m, m) for m in dict.fromkeys(trials["mode"]) if m)
    return f"{sweep} ({ds}; {modes})"


def plot_val_map(sweep: str, trials: pd.DataFrame, history: History):
    """Validation mAP per epoch of every trial, coloured by scheme, stops marked."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    schemes_seen: list[str] = []
    stops_seen: set[str] = set()
    max_epoch = 1
    drawn = 0
    order = [s for s in paper.METHODS if s in set(trials["scheme"])] + \
        sorted(set(trials["scheme"]) - set(paper.METHODS))
    for scheme in order:
        for _, run in trials[trials["scheme"] == scheme].iterrows():
            pts = history(run["run_id"], T.VAL_MAP)
            if not pts:
                continue
            x = [p[0] for p in pts]
            y = [p[1] for p in pts]
            color = scheme_color(scheme)
            ax.plot(x, y, color=color, alpha=0.75, linewidth=1.4,
                    marker="." if len(x) == 1 else None)
            drawn += 1
            max_epoch = max(max_epoch, max(x), int(run["epochs_cfg"]) if math.isfinite(run["epochs_cfg"]) else 1)
            if run["outcome"] in STOP_MARKERS:
                marker, _ = STOP_MARKERS[run["outcome"]]
                ax.plot([x[-1]], [y[-1]], linestyle="none", marker=marker, markersize=9,
                        markeredgewidth=2, color=color)
                stops_seen.add(run["outcome"])
            if scheme not in schemes_seen:
                schemes_seen.append(scheme)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation mAP (%)")
    ax.set_xlim(0.8, max_epoch + 0.2)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    n_stopped = int(trials["outcome"].isin(list(STOP_MARKERS)).sum())
    ax.set_title(f"Validation mAP per epoch, {drawn} trials ({n_stopped} stopped early)\n"
                 f"{_title(sweep, trials)}", fontsize=11)
    handles = [Line2D([], [], color=scheme_color(s), linewidth=2, label=s) for s in schemes_seen]
    handles += [Line2D([], [], color="0.3", linestyle="none", marker=STOP_MARKERS[k][0],
                       markersize=9, markeredgewidth=2, label=STOP_MARKERS[k][1])
                for k in STOP_MARKERS if k in stops_seen]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def plot_memorization(sweep: str, best: pd.DataFrame, history: History):
    """modified_true_pos_frac and modified_frac per epoch for the best trial of each scheme."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    drawn = 0
    for _, run in best.iterrows():
        tp = history(run["run_id"], T.MODIFIED_TRUE_POS_FRAC)
        mf = history(run["run_id"], T.MODIFIED_FRAC)
        if not tp and not mf:
            continue
        color = scheme_color(run["scheme"])
        label = f"{run['scheme']} ({run['run_name'] or run['trial_id']})"
        if tp:
            ax1.plot([p[0] for p in tp], [100 * p[1] for p in tp], color=color, marker="o",
                     markersize=4, linewidth=1.8, label=label)
        if mf:
            ax2.plot([p[0] for p in mf], [100 * p[1] for p in mf], color=color, marker="o",
                     markersize=4, linewidth=1.8, label=label)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax1.set_title("Modified label entries that were truly positive", fontsize=11)
    ax1.set_ylabel("% of modified entries (modified_true_pos_frac)")
    ax1.set_ylim(-2, 102)
    ax2.set_title("Label entries modified", fontsize=11)
    ax2.set_ylabel("% of label entries (modified_frac)")
    ax2.set_ylim(bottom=0)
    for ax in (ax1, ax2):
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax1.legend(fontsize=9, loc="best")
    fig.suptitle(f"Memorization analysis, best trial per scheme: {_title(sweep, best)}", fontsize=12)
    fig.tight_layout()
    return fig


def plot_table1(table1: pd.DataFrame):
    """Grouped bars per (data set, mode) that has our final runs: ours (+- std) vs the paper."""
    panels = [(ds, mode) for (mode, ds), g in table1.groupby(["mode", "dataset"], sort=False)
              if (g["n"] > 0).any()]
    if not panels:
        return None
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.9 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (ds, mode) in zip(axes.flat, panels):
        g = table1[(table1["dataset"] == ds) & (table1["mode"] == mode)]
        g = g[(g["n"] > 0) | np.isfinite(g["paper"])]
        x = np.arange(len(g))
        w = 0.4
        colors = [scheme_color(m) for m in g["method"]]
        ours = g["mean"].to_numpy(dtype=float)
        err = np.nan_to_num(g["std"].to_numpy(dtype=float))
        ax.bar(x - w / 2, np.nan_to_num(ours), w, yerr=err, color=colors, edgecolor="black",
               linewidth=0.6, capsize=3, label="ours")
        ax.bar(x + w / 2, np.nan_to_num(g["paper"].to_numpy(dtype=float)), w, color=colors,
               alpha=0.35, hatch="//", edgecolor="black", linewidth=0.6, label="paper")
        refs = g["paper"].to_numpy(dtype=float)
        for xi, (n, v, e, r) in enumerate(zip(g["n"], ours, err, refs)):
            if n == 0:
                ax.text(xi - w / 2, 1, "–", ha="center", va="bottom", fontsize=9)
            elif math.isfinite(r):   # the difference, above the pair
                ax.text(xi, max(v + e, r) + 0.6, f"{v - r:+.1f}", ha="center", va="bottom",
                        fontsize=7, rotation=90)
        vals = np.concatenate([ours[np.isfinite(ours)] + err[np.isfinite(ours)],
                               g["paper"].to_numpy(dtype=float)])
        vals = vals[np.isfinite(vals)]
        top = float(vals.max()) if vals.size else 100.0
        ax.set_ylim(0, min(105.0, top * 1.15 + 1))
        ax.set_xticks(x, g["method"], rotation=45, ha="right", fontsize=9)
        ax.set_title(f"{paper.DATASET_LABELS.get(ds, ds)}, {paper.MODE_LABELS.get(mode, mode)}",
                     fontsize=11)
        ax.set_ylabel("test mAP (%)")
        ax.grid(True, axis="y", alpha=0.3)
    handles = [matplotlib.patches.Patch(facecolor="0.5", edgecolor="black", label="ours (mean ± std)"),
               matplotlib.patches.Patch(facecolor="0.5", alpha=0.35, hatch="//", edgecolor="black",
                                        label="paper (CVPR 2022, Table 1)"),
               matplotlib.patches.Patch(facecolor="none", edgecolor="none",
                                        label="numbers: ours − paper; –: no final runs")]
    fig.legend(handles=handles, loc="upper center", ncol=3, frameon=False,
               bbox_to_anchor=(0.5, 1.0 + 0.02 / nrows))
    fig.suptitle("Test mAP: our final-seed runs vs. the paper", y=1.0 + 0.08 / nrows, fontsize=12)
    fig.tight_layout()
    return fig


def plot_importance(sweep: str, frame: pd.DataFrame):
    """One panel per (mode, scheme): a horizontal bar per searched value, its share of the variance."""
    groups = list(frame.groupby(["mode", "scheme"], sort=False))
    if not groups:
        return None
    order = {s: i for i, s in enumerate(paper.METHODS)}
    groups.sort(key=lambda g: (_mode_rank(g[0][0]), order.get(g[0][1], 99)))
    ncols = min(4, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.6 * nrows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, ((mode, scheme), g) in zip(axes.flat, groups):
        g = g.sort_values("importance")
        ax.barh(g["param"], g["importance"], color=scheme_color(scheme), edgecolor="black", linewidth=0.6)
        for y, v in enumerate(g["importance"]):
            ax.text(min(v + 0.02, 0.9), y, f"{v:.2f}", va="center", fontsize=8)
        ax.set_xlim(0, 1.05)
        label = scheme + ("" if mode == "end-to-end" else f", {paper.MODE_LABELS.get(mode, mode)}")
        ax.set_title(f"{label} ({int(g['trials'].iloc[0])} trials)", fontsize=10)
        ax.set_xlabel("importance (share of variance)")
        ax.grid(True, axis="x", alpha=0.3)
    few = int(frame["trials"].min()) < 10
    fig.suptitle(f"Which searched value mattered for the best validation mAP (Optuna fANOVA): {sweep}"
                 + ("\nfewer than 10 trials per scheme: a rough guide only" if few else ""), fontsize=11)
    fig.tight_layout()
    return fig


def _mode_rank(mode: str) -> int:
    return list(paper.MODES).index(mode) if mode in paper.MODES else len(paper.MODES)


def best_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The best (highest best_val_map) non-failed trial of each scheme."""
    ok = trials[(trials["outcome"] != "failed") & np.isfinite(trials[T.BEST_VAL_MAP])]
    if ok.empty:
        return ok
    ok = ok.sort_values([T.BEST_VAL_MAP, "start_time"], ascending=[False, True], kind="stable")
    best = ok.groupby("scheme", sort=False).head(1)
    order = {s: i for i, s in enumerate(paper.METHODS)}
    return best.sort_values("scheme", key=lambda s: s.map(lambda v: order.get(v, 99)))


def render_figures(runs: pd.DataFrame, table1: pd.DataFrame | None, sweeps: pd.DataFrame,
                   history: History, importance: pd.DataFrame | None = None) -> list[tuple[str, bytes]]:
    """[(file name, PNG bytes)] for every figure there is data for (`importance`: the tidy frame of
    `orchestration.report.importance.importances`)."""
    out: list[tuple[str, bytes]] = []
    trials = runs[runs["role"] == T.ROLE_TRIAL]
    for sweep in dict.fromkeys(trials["experiment"]):
        mine = trials[trials["experiment"] == sweep]
        fig = plot_val_map(sweep, mine, history)
        if fig is not None:
            out.append((f"{safe_name(sweep)}-val_map.png", _png(fig)))
        best = best_trials(mine)
        if len(best):
            fig = plot_memorization(sweep, best, history)
            if fig is not None:
                out.append((f"{safe_name(sweep)}-memorization.png", _png(fig)))
        if importance is not None and (importance["sweep"] == sweep).any():
            fig = plot_importance(sweep, importance[importance["sweep"] == sweep])
            if fig is not None:
                out.append((f"{safe_name(sweep)}-importance.png", _png(fig)))
    if table1 is not None:
        fig = plot_table1(table1)
        if fig is not None:
            out.append(("table1_vs_paper.png", _png(fig)))
    return out
