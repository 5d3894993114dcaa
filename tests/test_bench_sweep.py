"""The sweep benchmark's measure and its simulation (bench/sweep.py): per scheme, epochs until one of its
trials is within reach of that scheme's grid best; the real searcher and ASHA driven with trials in flight."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_sweep", ROOT / "bench" / "sweep.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_sweep"] = bench      # its dataclasses look their module up
_spec.loader.exec_module(bench)


def test_per_scheme_epochs_counts_only_that_schemes_results_until_its_target():
    rows = [{"scheme": s, "best_val_map": b} for s, b in
            [("A", 10), ("B", 50), ("A", 20), ("B", 60), ("A", 79.9), ("A", 80), ("B", 61)]]
    assert bench.per_scheme_epochs(rows, {"A": 80.0, "B": 60.0, "C": 1.0}) == {"A": 4, "B": 2, "C": None}


def synthetic_curves(settings):
    """Every configuration's val mAP rises to a plateau that depends on (scheme, delta_rel, lr)."""
    out = {}
    for i, s in enumerate(settings["schemes"]):
        for j, d in enumerate(settings["deltas"]):
            for k, lr in enumerate(settings["lrs"]):
                top, best, curve = 60 + 3 * j - 4 * abs(k - 1) + i, 0.0, []
                for e in range(1, settings["epochs"] + 1):
                    v = top * (1 - 0.5 ** e)
                    best = max(best, v)
                    curve.append({"epoch": e, "val_map": v, "best_val_map": best})
                out[(s, d, lr)] = curve
    return out


def test_simulation_drives_the_sweeps_searcher_and_asha_with_trials_in_flight():
    settings = {"epochs": 4, "schemes": ["LL-R", "LL-Ct", "LL-Cp"], "deltas": [1.0, 2.0, 3.0],
                "lrs": [5e-4, 1e-3, 2e-3], "max_train_images": None}
    curves = synthetic_curves(settings)
    space = bench.bench_space(settings, 12, 1, bench.VARIANTS["shipped"])
    space.scheduler.grace_period = 2
    rows = bench.simulate(space, bench.VARIANTS["shipped"], curves, gpus=4)
    trials = {r["trial"] for r in rows}
    assert len(trials) == 12                                   # num_samples trained, none twice
    per_trial = {t: [r["epoch"] for r in rows if r["trial"] == t] for t in trials}
    assert all(e == list(range(1, len(e) + 1)) for e in per_trial.values())
    assert any(len(e) < 4 for e in per_trial.values())        # ASHA stopped some at its rung
    no_asha = bench.simulate(space, bench.variant_of("noasha"), curves, gpus=4)
    assert len(no_asha) == 12 * 4
    assert bench.variant_of("random+g3+rf3+gpus") == bench.Variant(
        "random+g3+rf3+gpus", sampler="random", grace_period=3, reduction_factor=3.0, ahead="gpus")
