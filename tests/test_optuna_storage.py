"""The per-scheme Optuna studies in a journal file in the sweep's folder, named after the sweep and the group:
told every trial's value, continued by --resume without a trial twice, shown by optuna-dashboard; kept in
memory with a one-line warning where the journal cannot be written.

The searcher is driven by hand first (Tune's calls, no Ray); then a digits sweep is killed, resumed and its
journal opened in optuna-dashboard.
"""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.storages import InMemoryStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend

from orchestration.search import known, per_scheme, study
from orchestration.search.space import Group, load_space
from tests.helpers import SWEEP, clean_env, free_port, kill_at_epoch, poll, ray_trials, run_cli, write_space

LLR = Group("LL-R", "end-to-end")


def journal_studies(path: Path) -> dict[str, list]:
    """study name -> its trials, read from the journal file as a new process would."""
    storage = JournalStorage(JournalFileBackend(str(path)))
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).get_trials()
            for s in storage.get_all_studies()}


def run_trial(search, tid: str, config: dict, epochs: int) -> list[float]:
    """Tune's calls for one trial whose val mAP is 50 + epoch + delta_rel."""
    curve = [50 + e + config["delta_rel"] for e in range(1, epochs + 1)]
    for e, v in enumerate(curve, 1):
        search.on_trial_result(tid, {"epoch": e, "val_map": v, "training_iteration": e})
    search.on_trial_complete(tid, {"epoch": epochs, "val_map": curve[-1]})
    return curve


def llr_space(tmp_path: Path, epochs: int = 4):
    return load_space("digits", write_space(tmp_path / "s.yaml", num_samples=4, epochs=epochs, schemes="[LL-R]"))


# ------------------------------------------------------------------ fast: the searcher by hand
def test_where_the_studies_are_and_their_names():
    assert study.journal_path("/shared/ray_results/demo/") == "/shared/ray_results/demo/optuna.journal"
    assert study.journal_path("s3://bucket/ray_results/demo") is None     # no file to append to
    assert study.study_name("demo", LLR) == "demo/LL-R/end-to-end"
    assert study.study_name("demo", Group("LL-Ct", "linear-init", True)) == "demo/LL-Ct + BoostLU/linear-init"
    assert study.dashboard_command("/a b/demo/optuna.journal") == "optuna-dashboard '/a b/demo/optuna.journal'"


def test_studies_are_in_the_journal_with_warm_start_records_and_every_value(tmp_path, capsys):
    space = llr_space(tmp_path)
    exp = tmp_path / "ray_results" / "s1"
    done = known.Known(group=LLR, values={"scheme": "LL-R", "mode": "end-to-end", "optimizer": "adam",
                                          "lr": 2e-3, "delta_rel": 3.0},
                       curve=[(1, 60.0), (2, 70.0), (3, 69.0), (4, 68.0)], complete=True, sweep="earlier",
                       trial_id="x1")
    search, _ = per_scheme.build(space, "val_map", "max", known=[done], experiment=str(exp), sweep="s1")
    assert capsys.readouterr().err == ""
    assert search.journal == str(exp / "optuna.journal")
    a = search.suggest("a")
    curve = run_trial(search, "a", a, epochs=4)
    [(name, trials)] = journal_studies(exp / "optuna.journal").items()
    assert name == "s1/LL-R/end-to-end"
    assert [(t.state.name, t.value) for t in trials] == [("COMPLETE", 70.0), ("COMPLETE", max(curve))]
    assert trials[1].params == {"lr": a["lr"], "delta_rel": a["delta_rel"]}
    assert trials[1].intermediate_values == dict(enumerate(curve, 1))


def test_the_result_that_stops_a_trial_is_in_its_study(tmp_path):
    """Tune passes the result on which ASHA says STOP (the last epoch's too) to on_trial_complete only: the
    study still gets that epoch, and the value told counts it."""
    space = llr_space(tmp_path, epochs=3)
    exp = tmp_path / "ray_results" / "s1"
    search, _ = per_scheme.build(space, "val_map", "max", experiment=str(exp), sweep="s1")
    a = search.suggest("a")
    for e, v in ((1, 50.0), (2, 55.0)):
        search.on_trial_result("a", {"epoch": e, "val_map": v, "training_iteration": e})
    search.on_trial_complete("a", {"epoch": 3, "val_map": 60.0, "training_iteration": 3})
    [trial] = journal_studies(exp / "optuna.journal")["s1/LL-R/end-to-end"]
    assert trial.state.name == "COMPLETE" and trial.value == 60.0
    assert trial.intermediate_values == {1: 50.0, 2: 55.0, 3: 60.0}
    assert search.known[known.key(known.searched_values(a))].curve == [(1, 50.0), (2, 55.0), (3, 60.0)]


def test_resume_continues_the_journal_without_a_trial_twice(tmp_path):
    """Tune restores the searcher from its last checkpoint, while the journal went on until the driver
    died: a trial asked after the checkpoint ends FAIL, one told after it is not told again; the sweep's
    folder moved meanwhile (--resume with another --storage) and its journal is found there."""
    space = llr_space(tmp_path)
    exp = tmp_path / "ray_results" / "rs"
    search, _ = per_scheme.build(space, "val_map", "max", experiment=str(exp), sweep="rs")
    initial = pickle.dumps(search)                      # what Ray's tuner.pkl holds
    a = search.suggest("a")
    state = tmp_path / "searcher-state.pkl"
    search.save(str(state))                             # Tune's last checkpoint of the searcher
    search.suggest("b")                                 # after it: b asked, a told; then the driver dies
    curve = run_trial(search, "a", a, epochs=4)

    moved = tmp_path / "elsewhere" / "rs"
    moved.parent.mkdir()
    shutil.move(str(exp), str(moved))
    fresh = pickle.loads(initial)
    fresh.relocate(str(moved))
    fresh.restore(str(state))
    run_trial(fresh, "a", a, epochs=4)                  # Tune runs a again from its checkpoint: no error
    c = fresh.suggest("c")
    run_trial(fresh, "c", c, epochs=4)
    assert fresh.journal == str(moved / "optuna.journal") and not exp.exists()
    trials = journal_studies(moved / "optuna.journal")["rs/LL-R/end-to-end"]
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]       # a, b, c: each once
    assert trials[0].value == max(curve) and trials[0].params == {"lr": a["lr"], "delta_rel": a["delta_rel"]}
    assert trials[2].params == {"lr": c["lr"], "delta_rel": c["delta_rel"]}
    assert fresh.known.keys() == {known.key(known.searched_values(x)) for x in (a, c)}


@pytest.mark.parametrize("where", ["under-a-file", "bucket"])
def test_a_journal_that_cannot_be_written_leaves_the_studies_in_memory_with_one_warning(tmp_path, capsys, where):
    space = llr_space(tmp_path)
    (tmp_path / "file").write_text("not a folder")
    exp = str(tmp_path / "file" / "s1") if where == "under-a-file" else "s3://bucket/ray_results/s1"
    search, _ = per_scheme.build(space, "val_map", "max", experiment=exp, sweep="s1")
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("warning: the Optuna studies are kept in memory (") and "optuna-dashboard" in err
    assert search.journal is None and all(isinstance(s, InMemoryStorage) for s in search.storages.values())
    a = search.suggest("a")                             # the search works as with in-memory studies
    run_trial(search, "a", a, epochs=4)
    assert search.suggest("b") is not None
    copy = pickle.loads(pickle.dumps(search))
    assert len(copy.searchers[LLR]._ot_study.trials) == 2


# ------------------------------------------------------------------ a real sweep, killed and resumed
@pytest.mark.slow
@pytest.mark.service
@pytest.mark.timeout(900)
def test_sweep_studies_in_the_journal_resumed_and_in_optuna_dashboard(tmp_path, ray_address):
    space = write_space(tmp_path / "space.yaml", num_samples=6, epochs=4, schemes="[LL-R, LL-Ct]",
                        train_images=200)
    args = ["--dataset", "digits", "--space", str(space), "--name", "os", "--address", ray_address]
    exp_dir = tmp_path / "ray_results" / "os"
    journal = exp_dir / "optuna.journal"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(SWEEP), *args], cwd=tmp_path, env=clean_env(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        kill_at_epoch(proc, exp_dir, 3, tmp_path / "first.log")     # killed mid-trial, its studies half told
    assert set(journal_studies(journal)) == {"os/LL-R/end-to-end", "os/LL-Ct/end-to-end"}

    r = run_cli(["--dataset", "digits", "--name", "os", "--resume", "--address", ray_address], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert f"Optuna studies: {journal}" in r.stdout and f"optuna-dashboard {journal}" in r.stdout
    assert "kept in memory" not in r.stdout + r.stderr

    # every trial Ray ran is once in its group's study, finished, with its value (COMPLETE: its best
    # val mAP; PRUNED: stopped by ASHA) and its val mAP per epoch
    studies = journal_studies(journal)
    trials = ray_trials(exp_dir)
    assert len(trials) == 6
    for name, group_trials in studies.items():
        scheme = name.split("/")[1]
        ran = {(t["config"]["lr"], t["config"]["delta_rel"]): t for t in trials.values()
               if t["config"]["scheme"] == scheme}
        ended = [t for t in group_trials if t.state.name in ("COMPLETE", "PRUNED")]
        told = [(t.params["lr"], t.params["delta_rel"]) for t in ended]
        assert sorted(told) == sorted(ran), name                    # none missing, none twice
        assert [t for t in group_trials if t.state.name in ("RUNNING", "WAITING")] == [], name
        for t in ended:
            rows = ran[(t.params["lr"], t.params["delta_rel"])]["results"]
            epochs = {row["epoch"]: row["val_map"] for row in rows}
            if t.state.name == "COMPLETE":
                assert max(epochs) == 4 and t.value == pytest.approx(rows[-1]["best_val_map"])
            else:                                       # Optuna's value of a pruned trial: its last epoch's
                assert max(epochs) < 4 and t.value == pytest.approx(epochs[max(epochs)])
            assert t.intermediate_values == pytest.approx(epochs), name

    # optuna-dashboard answers for that journal with the sweep's studies and their trials
    port = free_port()
    dashboard = subprocess.Popen([str(Path(sys.executable).parent / "optuna-dashboard"), str(journal),
                                  "--host", "127.0.0.1", "--port", str(port), "--quiet"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=clean_env())
    try:
        def get(path: str) -> dict:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
                return json.loads(resp.read())

        listed = poll("optuna-dashboard's /api/studies", lambda: get("/api/studies")["study_summaries"], 60,
                      on_timeout=dashboard.kill)
        assert {s["study_name"] for s in listed} == set(studies)
        for s in listed:
            detail = get(f"/api/studies/{s['study_id']}")
            assert detail["name"] == s["study_name"]
            assert len(detail["trials"]) == len(studies[s["study_name"]])
            complete = [t for t in studies[s["study_name"]] if t.state.name == "COMPLETE"]
            shown = sorted(v for t in detail["trials"] if t["state"] == "Complete" for v in t["values"])
            assert shown == pytest.approx(sorted(t.value for t in complete))
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)
