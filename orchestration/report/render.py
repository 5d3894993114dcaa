"""The tables as text: Markdown (pandas' `to_markdown`), CSV and LaTeX (pandas' Styler), each cell our mean
± std (n) beside the paper's number."""
from __future__ import annotations

import math

import pandas as pd

from orchestration.report import paper

EMPTY = "–"           # marks a cell without runs


def format_cell(mean: float, std: float, n: int, ref: float) -> str:
    """"85.31 ± 0.42 (n=3) · paper 85.1 · Δ +0.21"; "– · paper 85.1" without runs."""
    if n:
        ours = f"{mean:.2f}" + (f" ± {std:.2f}" if n > 1 and math.isfinite(std) else "") + f" (n={n})"
    else:
        ours = EMPTY
    parts = [ours]
    if math.isfinite(ref):
        # to the published digits: Table 1 gives one decimal, the recent methods' papers two
        parts.append(f"paper {ref:.1f}" if round(ref, 1) == ref else f"paper {ref:.2f}")
        if n:
            parts.append(f"Δ {mean - ref:+.2f}")
    return " · ".join(parts)


def _pipe(value):
    """A cell or label with its `|` escaped: a name holding one would split the Markdown row."""
    return value.replace("|", "\\|") if isinstance(value, str) else value


def to_markdown(df: pd.DataFrame, **kw) -> str:
    """`df.to_markdown`, every `|` in a cell, the index or a column name escaped."""
    out = df.map(_pipe)
    out.index = out.index.map(_pipe)
    out.index.name = _pipe(df.index.name)
    out.columns = [_pipe(c) for c in df.columns]
    return out.to_markdown(**kw)


def columns_with_runs(tidy: pd.DataFrame) -> pd.DataFrame:
    """The cells of the (data set, mode) columns where some method has runs (all of them when none has)."""
    ran = tidy.groupby(["dataset", "mode"])["n"].transform("max") > 0
    return tidy[ran] if ran.any() else tidy


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
                  title: str = "Table 1: test mAP, ours vs. the paper", label: str = "tab:table1",
                  all_columns: bool = False) -> tuple[str, str, str]:
    """(markdown, csv, latex) of Table 1 (or of a table laid out as it: the BoostLU table). The Markdown and
    LaTeX show the (data set, mode) columns that have runs (`all_columns`: the paper's whole grid); the CSV
    always holds every cell."""
    wide = table1_wide(tidy if all_columns else columns_with_runs(tidy))
    md = [f"# {title}", "",
          f"Sweeps: {', '.join(experiments)}. {LEGEND}", "",
          to_markdown(_flat(wide)), ""]
    if notes:
        md += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    csv = tidy[["method", "dataset", "dataset_label", "mode", "mode_label", "mean", "std", "n",
                "paper", "diff", "experiment", "seeds", "data"]].to_csv(index=False, float_format="%.6g")
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
          to_markdown(wide), ""]
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
        md += [f"## {sweep} ({paper.DATASET_LABELS.get(ds, ds)}, {paper.MODE_LABELS.get(mode, mode)})", "",
               f"Trained on data {', '.join(dict.fromkeys(grp['data']))} (`wsml.data`).", "",
               to_markdown(part, index=False), ""]
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
        md += [to_markdown(shown, index=False), ""]
    csv = sweeps.to_csv(index=False, float_format="%.6g")
    return "\n".join(md), csv
