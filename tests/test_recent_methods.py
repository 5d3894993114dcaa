"""EM, EM+APL and GR as schemes of the trainer (its label state, resume, LinearInit), in the tables
(Table 1 rows, the recent-methods table) and in a sweep. The losses themselves: tests/test_spml_losses.py."""
from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest
import torch

from wsml.checkpoint import load_checkpoint
from wsml.config import TrainConfig
from wsml.methods.ack_the_unknown import apl_params, apl_per_class_count, apl_update
from wsml.train import run
from wsml.trainer import Trainer

from tests.helpers import checkpoint_saver, run_cli

SMALL = dict(dataset="digits", max_train_images=256, num_workers=0, device="cpu")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, NaN where NaN."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _trainer(**kw) -> Trainer:
    from wsml.data.loading import load_data

    cfg = TrainConfig.from_dict({**SMALL, **kw}).resolve()
    return Trainer(cfg, load_data(cfg), torch.device("cpu"), log=lambda _m: None)


@pytest.mark.slow
def test_apl_pseudo_labels_are_the_published_update_of_the_eval_models_predictions():
    trainer = _trainer(scheme="EM+APL", epochs=3, apl_warmup_epoch=1)
    params = apl_params(trainer.cfg)
    assert trainer.soft_labels is not None and trainer.soft_labels.isnan().all()      # none before the warm-up
    before = trainer.soft_labels
    first = trainer.train_epoch(1)
    assert first["modified_frac"] == 0
    # after epoch 1's training pass: the eval-mode model on every training image, no flips
    preds = torch.from_numpy(trainer.predict(trainer.data.train.images))
    assert _same(trainer.soft_labels, apl_update(trainer.observed, before, preds, 1, 3, params))
    per_class = (~trainer.soft_labels.isnan()).sum(0).tolist()
    assert per_class == apl_per_class_count(trainer.observed, 3, params)            # int(0.8 * U_c / (3 - 1))
    assert (trainer.observed[~trainer.soft_labels.isnan()] == 0).all()
    # epoch 2 trains with them: each image once, so the entries it reports as modified are all of them
    second = trainer.train_epoch(2)
    assert second["modified_frac"] == pytest.approx(sum(per_class) / trainer.soft_labels.numel())
    assert second["modified_true_pos_frac"] < 0.5
    labelled = trainer.soft_labels.clone()
    trainer.train_epoch(3)                                  # the last epoch: no update (it would train nothing)
    assert _same(trainer.soft_labels, labelled)


@pytest.mark.slow
def test_em_apl_resumed_after_an_epoch_equals_an_uninterrupted_run(tmp_path):
    """Stopped after epoch 2 (pseudo-labels assigned after it), resumed to epoch 4: the same final state,
    bit for bit, as the run that was never stopped (the update after epoch 3 happens in the resumed run)."""
    cfg = TrainConfig(scheme="EM+APL", epochs=4, scheme_params={"apl_warmup_epoch": 2}, stop_drop=None, **SMALL)

    full = run(cfg, checkpoint_saver(tmp_path / "full"), log=None)
    after_two = load_checkpoint(tmp_path / "full" / "epoch2.pt")
    assert (~after_two["soft_labels"].isnan()).any()
    resumed = run(cfg, checkpoint_saver(tmp_path / "resumed"), resume_state=after_two, log=None)
    for key in ("val_map", "train_loss", "modified_frac", "test_map_at_best"):     # the timings differ
        assert [h[key] for h in resumed.history] == [h[key] for h in full.history], key
    assert resumed.test_map == full.test_map and len(resumed.history) == 4
    final, again = (load_checkpoint(tmp_path / d / "epoch4.pt") for d in ("full", "resumed"))
    assert _same(again["soft_labels"], final["soft_labels"])
    three = load_checkpoint(tmp_path / "full" / "epoch3.pt")["soft_labels"]
    assert (~three.isnan()).sum() > (~after_two["soft_labels"].isnan()).sum()
    assert torch.equal(again["observed"], final["observed"])
    for name, value in final["model"].items():
        assert torch.equal(again["model"][name], value), name
    for key, value in final["optimizer"]["state"].items():
        for k, v in value.items():
            assert torch.equal(again["optimizer"]["state"][key][k], v), (key, k)
    # another number of epochs is another run for EM+APL (its per-update count divides by it)
    from wsml.errors import CheckpointError
    with pytest.raises(CheckpointError, match="epochs=4 but this run has epochs=5"):
        run(TrainConfig(**{**cfg.to_dict(), "epochs": 5}), resume_state=after_two, log=None)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["EM", "EM+APL", "GR"])
def test_linear_init_then_fine_tuning(scheme, tmp_path):
    extra = {"scheme_params": {"apl_warmup_epoch": 1}} if scheme == "EM+APL" else {}
    lines: list[str] = []
    result = run(TrainConfig(scheme=scheme, mode="linear-init", linear_init_epochs=1, epochs=2, stop_drop=None,
                             cache_dir=str(tmp_path), **extra, **SMALL), log=lines.append)
    assert sum(line.startswith("linear-init epoch") for line in lines) == 1
    assert len(result.history) == 2 and all(math.isfinite(h["train_loss"]) for h in result.history)
    if scheme == "EM+APL":      # none in the linear phase or epoch 1, the update after epoch 1 in epoch 2
        assert result.history[0]["modified_frac"] == 0 < result.history[1]["modified_frac"]


# ------------------------------------------------------------------------------------------------- the tables
def test_recent_methods_table_and_table1_rows(tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestration import aggregate as A
    from tests.synthetic_runs import final_specs, write_sweep
    from tests.test_aggregate import expected_cell, md_table, read_csv

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = {"AN": [41.0, 42.0], "EM": [55.0, 56.5], "EM+APL": [57.0], "GR": [58.0, 59.0, 57.5], "LL-R": [50.0]}
    specs = [s for scheme, tests in runs.items() for s in final_specs(scheme, tests)]
    write_sweep(MlflowClient(tracking_uri=uri), "recent", "digits", "end-to-end", specs)
    res = A.aggregate(uri, None, tmp_path / "out", figures=False)
    header, table = md_table(tmp_path / "out" / "recent.md")
    assert list(table) == ["EM", "EM+APL", "GR"]
    # the benchmarks' end-to-end columns (each method's paper) and digits (ours), whichever data sets ran
    assert header[1:] == [f"End-to-end {d}" for d in ("VOC", "COCO", "NUS", "CUB", "digits")]
    assert table["GR"][0] == expected_cell(None, 89.83) == "– · paper 89.83"      # the paper's two decimals
    assert table["EM+APL"][3] == expected_cell(None, 21.84)
    for scheme in ("EM", "EM+APL", "GR"):
        assert table[scheme][4] == expected_cell(np.array(runs[scheme]), None)
    csv_rows = {(r["method"], r["dataset"]): r for r in read_csv(tmp_path / "out" / "recent.csv")}
    assert float(csv_rows[("EM", "coco")]["paper"]) == 70.70 and csv_rows[("EM", "digits")]["n"] == "2"
    assert "tab:recent" in (tmp_path / "out" / "recent.tex").read_text()
    # Table 1: the paper's rows, then the recent methods in the registry's order
    _, t1 = md_table(tmp_path / "out" / "table1.md")
    assert list(t1)[-4:] == ["LL-Cp", "EM", "EM+APL", "GR"]
    assert t1["EM"][0] == expected_cell(np.array(runs["EM"]), None)        # Table 1 has no EM number
    assert res.recent is not None
    # without their runs, no recent-methods table
    plain = f"sqlite:///{tmp_path}/plain.db"
    write_sweep(MlflowClient(tracking_uri=plain), "plain", "digits", "end-to-end", final_specs("LL-R", [50.0]))
    A.aggregate(plain, None, tmp_path / "out2", figures=False)
    assert not (tmp_path / "out2" / "recent.md").exists()


# -------------------------------------------------------------------------------------------------- a sweep
@pytest.mark.slow
@pytest.mark.service
@pytest.mark.timeout(900)
def test_a_sweep_of_em_em_apl_and_gr_fills_both_tables(tmp_path, ray_address):
    """Each method its own study from its defaults (EM+APL's warm-up searched below the 4 epochs), a final
    rerun, and the sweep's closing aggregation puts the three rows in Table 1 and in recent.md."""
    from tests.test_aggregate import md_table

    space = tmp_path / "space.yaml"
    space.write_text(textwrap.dedent("""\
        dataset: digits
        search:
          scheme: [EM, EM+APL, GR]
          lr: {low: 5.0e-4, high: 3.0e-3, log: true}
          scheme_params:
            EM: {em_alpha: {low: 0.05, high: 0.3, log: true}}
            EM+APL: {apl_warmup_epoch: {values: [2, 3]}}
            GR: {gr_q2: {low: 0.005, high: 0.05, log: true}}
        num_samples: 3
        epochs: 4
        search_seed: 0
        scheduler: {grace_period: 2, reduction_factor: 2}
        resources: {cpus_per_trial: 1, gpus_per_trial: 0}
        final_seeds: 1
        max_failures: 0
        train: {num_workers: 0, max_train_images: 200, stop_drop: null}
        """))
    r = run_cli(["--dataset", "digits", "--space", str(space), "--name", "recent", "--address", ray_address],
                cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    # the defaults ran first: the published values' digits counterparts (wsml/schemes.py)
    assert "EM+APL lr=0.001 warmup_epoch=3" in r.stdout and "EM lr=0.001 alpha=0.1" in r.stdout
    _, t1 = md_table(tmp_path / "results" / "table1.md")
    _, recent = md_table(tmp_path / "results" / "recent.md")
    for scheme in ("EM", "EM+APL", "GR"):
        assert "(n=1)" in t1[scheme][0], t1
        assert "(n=1)" in recent[scheme][-1] and "paper" in recent[scheme][0], recent
