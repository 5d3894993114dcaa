"""The sweep benchmark's measure: epochs until the running best is within reach of the grid's best."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_sweep", ROOT / "bench" / "sweep.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def rows(*best):
    return [{"best_val_map": b} for b in best]


def test_epochs_to_target_counts_every_trial_result_until_the_running_best_arrives():
    # results of two trials interleaved; the 4th result is the first at or above 80
    assert bench.epochs_to_target(rows(30, 50, 79.9, 80.0, 99), 80.0) == 4
    assert bench.epochs_to_target(rows(81), 80.0) == 1
    assert bench.epochs_to_target(rows(30, 79.99), 80.0) is None
    assert bench.epochs_to_target([], 80.0) is None


def test_curves_of_groups_a_configuration_by_epoch():
    grid = [{"scheme": "LL-R", "delta_rel": 2, "epoch": 2, "val_map": 5.0},
            {"scheme": "LL-Cp", "delta_rel": 1, "epoch": 1, "val_map": 3.0},
            {"scheme": "LL-R", "delta_rel": 2.0, "epoch": 1, "val_map": 4.0}]
    curves = bench.curves_of(grid)
    assert [r["val_map"] for r in curves[("LL-R", 2.0)]] == [4.0, 5.0]
    assert list(curves) == [("LL-R", 2.0), ("LL-Cp", 1.0)]
