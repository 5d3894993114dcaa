"""End-to-end sweeps of `digits` on CPUs: Optuna + ASHA + checkpoints + MLflow + resume + bad input.

The sweeps join one Ray cluster started for this module (`Cluster`, 2 CPUs);
the MLflow-server test starts Ray in-process, as the CLI does by default.
"""
from __future__ import annotations

import glob
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import SWEEP, clean_env, free_port, history, kill_at_epoch, mlflow_runs, ray_trials, run_cli, write_space

pytestmark = [pytest.mark.slow, pytest.mark.service, pytest.mark.timeout(900)]


# ------------------------------------------------------------ the main sweep
def test_sweep_optuna_asha_mlflow_final(tmp_path, ray_address):
    """12 trials of 3 schemes, epochs 4, grace 2: each scheme its own study with 4 trials, its default
    first; ASHA stops some; Optuna's proposals are the configs run; MLflow (local default: mlflow.db in
    the working directory) mirrors Ray's results; each scheme's best is rerun with 2 seeds."""
    space = write_space(tmp_path / "space.yaml", num_samples=12, epochs=4, final_seeds=2, train_images=200)
    t0 = time.time()
    r = run_cli(["--dataset", "digits", "--space", str(space), "--name", "main", "--address", ray_address],
                cwd=tmp_path)
    print(f"main sweep took {time.time() - t0:.0f}s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    assert db.is_file()                                   # MLflow's local default, in the working directory
    out = r.stdout
    assert "best configuration per scheme" in out
    assert f"mlflow ui --backend-store-uri {uri}" in out
    # the default progress: a line per trial event under its MLflow run name, no Ray table
    assert re.search(r"^\[\d+:\d\d\] end +LL-(R|Ct|Cp) d=\S+ lr=\S+ #t\d+  epoch [234]/4  val mAP ", out, re.M)
    assert "stopped early by ASHA" in out and "== Status ==" not in out

    exp_dir = tmp_path / "ray_results" / "main"
    trials = ray_trials(exp_dir)
    assert len(trials) == 12
    last_epochs = {tid: t["results"][-1]["epoch"] for tid, t in trials.items()}
    assert any(e < 4 for e in last_epochs.values()), last_epochs          # ASHA stopped some early
    assert any(e == 4 for e in last_epochs.values()), last_epochs
    assert all(e >= 2 for e in last_epochs.values()), last_epochs         # never before the grace period

    # each scheme was its own study with its share of the trials, and Optuna proposed exactly the
    # configurations that ran (searcher state saved by Tune)
    [state_file] = glob.glob(str(exp_dir / "searcher-state-*.pkl"))
    with open(state_file, "rb") as f:
        state = pickle.load(f)
    assert set(state["owner"]) == set(trials)
    assert state["assigned"] == {(sc, "end-to-end", False): 4 for sc in ("LL-R", "LL-Ct", "LL-Cp")}
    for tid, t in trials.items():
        group = state["owner"][tid]
        cfg = t["config"]
        assert group == (cfg["scheme"], cfg["mode"], False)
        params = state["studies"][group]["_ot_trials"][tid].params
        assert params["lr"] == pytest.approx(cfg["lr"], rel=1e-12)
        assert params["delta_rel"] == pytest.approx(cfg["delta_rel"], rel=1e-12)
    # the paper's defaults (digits: lr 1e-3, delta_rel 2) ran first, one per scheme
    first = sorted(trials.values(), key=lambda t: int(t["dir"].name.split("_")[1]))[:3]   # trial_001_...
    assert {t["config"]["scheme"] for t in first} == {"LL-R", "LL-Ct", "LL-Cp"}
    assert all(t["config"]["lr"] == 1e-3 and t["config"]["delta_rel"] == 2.0 for t in first)

    runs = mlflow_runs(uri, "main")
    [parent] = runs["sweep"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["wsml.dataset"] == "digits" and parent.data.tags["wsml.sweep"] == "main"
    assert "--space" in parent.data.params["command"] and parent.data.params["git_commit"]
    assert parent.data.params["space.scheme"] == "LL-R,LL-Ct,LL-Cp" and parent.data.params["num_samples"] == "12"

    children = runs["trial"]
    assert sorted(c.data.tags["wsml.trial_id"] for c in children) == sorted(trials)   # one per trial
    for c in children:
        t = trials[c.data.tags["wsml.trial_id"]]
        tags, metrics = c.data.tags, c.data.metrics
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert c.info.status == "FINISHED"
        assert tags["wsml.dataset"] == "digits" and tags["wsml.mode"] == "end-to-end" and tags["wsml.seed"] == "0"
        assert tags["wsml.scheme"] == t["config"]["scheme"] == c.data.params["scheme"]
        assert float(c.data.params["lr"]) == pytest.approx(t["config"]["lr"])
        assert re.fullmatch(r"LL-(R|Ct|Cp) d=\S+ lr=\S+ #t\d+", c.info.run_name), c.info.run_name
        ray_hist = [(row["epoch"], row["val_map"]) for row in t["results"]]
        assert history(uri, c.info.run_id) == [(e, pytest.approx(v)) for e, v in ray_hist]
        assert len(history(uri, c.info.run_id, "modified_frac")) == len(ray_hist)
        last = t["results"][-1]
        assert metrics["epochs_run"] == last["epoch"]
        assert metrics["test_map"] == pytest.approx(last["test_map_at_best"])
        assert metrics["best_val_map"] == pytest.approx(max(v for _, v in ray_hist))
        assert metrics["train_hours"] > 0 and metrics["gpu_hours"] == 0
        assert tags["wsml.end_reason"] == ("completed" if last["epoch"] == 4 else "asha_stopped")

    # final stage: each scheme's best trial rerun with seeds 0 and 1 to the full 4 epochs
    finals = runs["final"]
    assert len(finals) == 6
    best = {}
    for tid, t in trials.items():
        s = t["config"]["scheme"]
        if s not in best or t["results"][-1]["best_val_map"] > trials[best[s]]["results"][-1]["best_val_map"]:
            best[s] = tid
    for f in finals:
        assert f.info.status == "FINISHED" and f.data.tags["wsml.end_reason"] == "completed"
        assert f.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert f.data.metrics["epochs_run"] == 4 and "test_map" in f.data.metrics
        assert f.data.tags["wsml.source_trial"] == best[f.data.tags["wsml.scheme"]]
        assert f.data.tags["wsml.dataset"] == "digits" and f.data.tags["wsml.mode"] == "end-to-end"
    assert sorted((f.data.tags["wsml.scheme"], f.data.tags["wsml.seed"]) for f in finals) == \
        [("LL-Cp", "0"), ("LL-Cp", "1"), ("LL-Ct", "0"), ("LL-Ct", "1"), ("LL-R", "0"), ("LL-R", "1")]
    # each scheme's chosen configuration is at least as good as its default, which every study ran
    for scheme, tid in best.items():
        [default] = [t for t in trials.values() if t["config"]["scheme"] == scheme
                     and t["config"]["lr"] == 1e-3 and t["config"]["delta_rel"] == 2.0]
        chosen = trials[tid]["results"][-1]["best_val_map"]
        assert chosen >= default["results"][-1]["best_val_map"], scheme
    assert "final runs (2 seeds each)" in out
    # the aggregation ran
    assert "tables: results/" in out and (tmp_path / "results" / "table1.md").is_file()


# ------------------------------------------------------- kill, then --resume
def test_resume_after_driver_killed(tmp_path, ray_address):
    space = write_space(tmp_path / "space.yaml", num_samples=6, epochs=4)
    args = ["--dataset", "digits", "--space", str(space), "--name", "rs", "--address", ray_address]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, str(SWEEP), *args], cwd=tmp_path, env=clean_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    exp_dir = tmp_path / "ray_results" / "rs"
    try:
        # Kill once a trial is past the grace period and mid-run (3 of 4 epochs reported, so
        # Tune's experiment state already names one of its checkpoints).
        kill_at_epoch(proc, exp_dir, 3, tmp_path / "first.log")
    finally:
        log.close()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = mlflow_runs(uri, "rs")
    assert before["sweep"][0].info.status == "RUNNING"        # the killed driver could not end it

    r = run_cli(["--dataset", "digits", "--name", "rs", "--resume", "--address", ray_address], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "resuming sweep rs" in r.stdout

    trials = ray_trials(exp_dir)
    assert len(trials) == 6
    runs = mlflow_runs(uri, "rs")
    [parent] = runs["sweep"]
    assert parent.info.status == "FINISHED" and parent.data.tags.get("wsml.resumed") == "1"
    children = runs["trial"]
    # trials that were running when the driver died continued from their checkpoints
    assert any(int(c.data.tags.get("wsml.restored_from_epoch", "0")) >= 1 for c in children)
    ids = [c.data.tags["wsml.trial_id"] for c in children]
    assert len(ids) == len(set(ids)) == len(trials)           # no duplicates
    assert set(ids) == set(trials)
    for c in children:
        assert c.info.status == "FINISHED", (c.info.run_name, c.info.status)
        steps = [s for s, _ in history(uri, c.info.run_id)]
        assert steps == list(range(1, int(c.data.metrics["epochs_run"]) + 1))   # each epoch once
        assert c.data.tags["wsml.end_reason"] in ("completed", "asha_stopped")

    # the finished sweep cannot be started again under the same name
    again = run_cli(args, cwd=tmp_path, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_resume_after_a_kill_between_tunes_trials_and_its_searcher_makes_no_extra_trial(tmp_path, ray_address):
    """Tune saves its trials, then its searcher: a driver killed between the two leaves trials the searcher
    never saw. Made here by putting back an earlier searcher state after the kill; --resume must adopt
    those trials (no more than num_samples in all, each trained once, its result told to its study)."""
    import optuna

    space = write_space(tmp_path / "space.yaml", num_samples=6, epochs=4)
    args = ["--dataset", "digits", "--space", str(space), "--name", "win", "--address", ray_address,
            "--max-concurrent", "2"]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, str(SWEEP), *args], cwd=tmp_path, env=clean_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    exp_dir = tmp_path / "ray_results" / "win"

    def counter() -> tuple[int, dict]:
        files = {Path(f).name: Path(f).read_bytes() for pattern in ("search_gen_state-*.json", "searcher-state-*.pkl")
                 for f in glob.glob(str(exp_dir / pattern))}
        gen = [pickle.loads(v) for k, v in files.items() if k.endswith(".json")]     # Tune pickles it
        return (gen[0]["counter"] if gen and len(files) == 2 else 0), files

    earlier = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            n, files = counter()
            if n == 2 and earlier is None:
                earlier = files                     # the searcher as saved with two trials made
            if earlier is not None and n >= 3:
                break
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.05)
        else:
            pytest.fail("the searcher never saved a third trial")
    finally:
        proc.kill()
        proc.wait()
        log.close()
    for name, data in earlier.items():
        (exp_dir / name).write_bytes(data)

    r = run_cli(["--dataset", "digits", "--name", "win", "--resume", "--address", ray_address], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    trials = ray_trials(exp_dir)
    assert len(trials) == 6, sorted(t["config"]["scheme"] for t in trials.values())
    configs = [(t["config"]["scheme"], t["config"]["lr"], t["config"]["delta_rel"]) for t in trials.values()]
    assert len(set(configs)) == 6                           # no configuration trained twice
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    children = mlflow_runs(uri, "win")["trial"]
    assert sorted(c.data.tags["wsml.trial_id"] for c in children) == sorted(trials)
    assert all(c.info.status == "FINISHED" for c in children)
    # every trial's result reached its study: one COMPLETE or PRUNED Optuna trial per Tune trial
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(exp_dir / "optuna.journal")))
    ended = [t for s in optuna.get_all_study_summaries(storage)
             for t in optuna.load_study(study_name=s.study_name, storage=storage).get_trials(deepcopy=False)
             if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(ended) == 6, [(t.number, t.state, t.params) for t in ended]


# --------------------------------------------------- a real MLflow server
def test_sweep_with_mlflow_server_and_local_ray(tmp_path, mlflow_server):
    uri = mlflow_server.url
    work = tmp_path / "cwd"
    work.mkdir()
    space = write_space(tmp_path / "space.yaml", num_samples=2, epochs=2, schemes="[LL-R, LL-Cp]", train_images=200)
    # no --address: Ray starts in-process; --verbose: Ray's own lines and progress table
    r = run_cli(["--dataset", "digits", "--space", str(space), "--name", "srv", "--mlflow-uri", uri, "--verbose"],
                cwd=work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "Started a local Ray instance" in r.stderr
    assert "== Status ==" in r.stdout and not re.search(r"^\[\d+:\d\d\] (start|end) ", r.stdout, re.M)
    assert not (work / "mlflow.db").exists()
    runs = mlflow_runs(uri, "srv")
    assert len(runs["sweep"]) == 1 and runs["sweep"][0].info.status == "FINISHED"
    assert len(runs["trial"]) == 2
    for c in runs["trial"]:
        assert c.info.status == "FINISHED"
        assert [s for s, _ in history(uri, c.info.run_id)] == [1, 2]
    assert f"MLflow store: {uri}" in r.stdout
    # the sweep's tables, attached to its run through the server (no final stage here: no Table 1)
    from mlflow import MlflowClient

    attached = {f.path for f in MlflowClient(uri).list_artifacts(runs["sweep"][0].info.run_id)}
    assert {"sweeps.md", "sweeps.csv"} <= attached and "table1.md" not in attached


# --------------------------------------------------------------- bad input
def _bad_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    good = write_space(tmp_path / "good.yaml", num_samples=2, epochs=2, schemes="[LL-R, LL-Cp]")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("dataset: digits\nsearch: {scheme: [LL-R\n")
    lr_neg = tmp_path / "neg.yaml"
    lr_neg.write_text(good.read_text().replace("low: 2.0e-4", "low: -2.0e-4"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    workers = tmp_path / "workers.yaml"
    workers.write_text(good.read_text().replace("num_workers: 0", "num_workers: -3"))
    bomb = tmp_path / "bomb.yaml"           # "billion laughs": 9 levels of aliases expand to ~10^9 items
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "dataset: digits\n")
    other = tmp_path / "other"
    for name, text in (("cut", '{"dataset": "digits", "na'), ("list", "[1, 2]")):
        (other / name).mkdir(parents=True)
        (other / name / "wsml_sweep.json").write_text(text)
    dead = free_port()
    return [
        (["--dataset", "mnist"], "unknown data set 'mnist'"),
        (["--dataset", "digits", "--space", str(bad_yaml)], "malformed YAML"),
        (["--dataset", "digits", "--space", str(lr_neg)], "search.lr.low=-0.0002"),
        (["--dataset", "digits", "--space", str(good), "--epochs", "1"], "scheduler.grace_period=2"),
        (["--dataset", "digits", "--space", str(good), "--gpus-per-trial", "-1"], "resources.gpus_per_trial"),
        (["--dataset", "digits", "--space", str(good), "--max-concurrent", "0"], "max_concurrent=0"),
        (["--dataset", "digits", "--space", str(good), "--schemes", "LL-R,LL-Q"], "unknown scheme 'LL-Q'"),
        (["--dataset", "digits", "--num-samples", "many"], "invalid int value"),
        (["--dataset", "digits", "--space", str(good), "--address", f"127.0.0.1:{dead}"], "unreachable"),
        (["--dataset", "digits", "--space", str(good), "--address", "nonsense"], "host:port"),
        (["--dataset", "digits", "--space", str(good), "--mlflow-uri", f"http://127.0.0.1:{dead}"], "unreachable"),
        (["--dataset", "digits", "--space", str(good), "--mlflow-uri", f"sqlite:///{a_file}/x.db"],
         "not writable"),
        (["--dataset", "digits", "--space", str(good), "--storage", str(a_file / "sub")], "--storage"),
        (["--dataset", "digits", "--space", str(good), "--storage", "/proc/wsml-sweeps"], "no file can be written"),
        (["--dataset", "digits", "--space", str(good), "--mlflow-uri", "sqlite:////proc/wsml.db"], "not writable"),
        (["--dataset", "digits", "--space", str(good), "--search-seed", str(2**32)], "search_seed=4294967296"),
        (["--dataset", "digits", "--space", str(good), "--name", "x" * 101], "at most 100"),
        (["--dataset", "digits", "--space", str(good), "--results-dir", str(a_file)], "--results-dir"),
        (["--dataset", "digits", "--space", str(workers)], "train: invalid num_workers=-3"),
        (["--dataset", "digits", "--space", str(bomb)], "aliases are not allowed"),
        (["--dataset", "digits", "--resume", "--name", "cut", "--storage", str(other)], "not valid JSON"),
        (["--dataset", "digits", "--resume", "--name", "list", "--storage", str(other)], "not a sweep record"),
        (["--dataset", "digits", "--resume"], "nothing to resume"),
        (["--dataset", "digits", "--resume", "--name", "nope"], "nothing to resume"),
        (["--dataset", "pascal", "--data-root", str(tmp_path / "no-data")], "not found"),
        (["--dataset", "digits", "--space", str(good), "--name", "bad/name"], "--name"),
    ]


def test_bad_input_one_line_nothing_created(tmp_path, monkeypatch, capsys):
    from orchestration.sweep import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for args, expected in _bad_cases(tmp_path):
        t0 = time.time()
        rc = main(args)
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2, (args, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
        assert expected in lines[0], (args, lines[0])
        assert time.time() - t0 < 20, (args, "too slow")
        assert not (tmp_path / "ray_results").exists(), args
        assert not (tmp_path / "mlflow.db").exists(), args
        assert not (tmp_path / "mlruns").exists(), args


def test_bad_input_through_the_script(tmp_path):
    r = run_cli(["--dataset", "mnist"], cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: unknown data set 'mnist': choose one of digits, pascal, coco, nuswide, cub, openimages"]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------- the MLflow callback, without Ray
class _FakeTrial:
    def __init__(self, tid: str, index: int, **config):
        self.trial_id, self.experiment_tag = tid, f"{index}_x"
        self.config = {"dataset": "digits", "epochs": 4, "seed": 0, "train": {"num_workers": 0}, **config}
        self.last_result: dict = {}
        self.num_failures = 0

    def get_error(self):
        return "Traceback ...\nwsml.errors.DataError: broken image 7"


def _result(epoch: int, **extra) -> dict:
    return {"epoch": epoch, "val_map": 10.0 + epoch, "train_loss": 1.0 / epoch, "modified_frac": 0.01 * epoch,
            "modified_true_pos_frac": 0.3, "clean_rate": 1 - 0.02 * (epoch - 1), "best_val_map": 10.0 + epoch,
            "best_epoch": epoch, "test_map_at_best": 20.0 + epoch, "train_seconds": 36.0 * epoch,
            "gpu_seconds": 0.0, "node_id": "n1", "device": "cpu", "restored_from_epoch": 0, **extra}


def test_mlflow_callback_exactly_once_and_end_states(tmp_path):
    from mlflow import MlflowClient

    from orchestration import common as T
    from orchestration.tracking import store
    from orchestration.common import TrackingError
    from orchestration.tracking.mlflow_callback import MLflowTrialLogger

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    c = MlflowClient(uri)
    exp, parent = store.start_parent(c, "cb", "digits", {"command": "x"}, resume=False)
    with pytest.raises(TrackingError, match="already holds this sweep's run: pass --resume"):
        store.start_parent(c, "cb", "digits", {"command": "x"}, resume=False)
    cb = MLflowTrialLogger(uri, exp, parent, "cb", "digits", T.ROLE_TRIAL, epochs=4)
    cb.outbox.background = False        # sent in this thread: each step checked at once
    done, asha, drop, fail, diverged, cut = (
        _FakeTrial(f"t{i}", i, scheme=s, mode="end-to-end", lr=1e-3, delta_rel=2.0)
        for i, s in enumerate(["LL-R", "LL-Ct", "LL-Cp", "LL-R", "LL-R", "AN"], start=1))
    trials = [done, asha, drop, fail, diverged, cut]
    for t in trials:
        cb.log_trial_start(t)
    for t, epochs in ((done, 4), (asha, 2), (drop, 3), (fail, 1), (diverged, 2), (cut, 2)):
        for e in range(1, epochs + 1):
            t.last_result = _result(e, trainer_stop=float(t is drop and e == 3))
            if t is done and e == 1:    # LinearInit's check of the head at the switch, reported with epoch 1
                t.last_result[T.LINEAR_INIT_SATURATED_FRAC] = 0.75
            cb.log_trial_result(0, t, t.last_result)
    cb.log_trial_result(0, done, _result(4))                          # a repeated epoch is logged once
    diverged.last_result = {**_result(2), "wsml_error": "TrainingDiverged: loss became nan"}
    for t in (done, asha, drop, diverged):
        cb.log_trial_end(t, failed=False)
    cb.log_trial_end(fail, failed=True)
    assert cb.finish(wait_s=1) == 0                                  # `cut` was never ended: interrupted

    def run_of(t):
        [r] = store.find_runs(c, exp, **{T.TAG_TRIAL_ID: t.trial_id})
        return r

    expect = {done: ("FINISHED", "completed"), asha: ("FINISHED", "asha_stopped"),
              drop: ("FINISHED", "stop_drop"), fail: ("FAILED", "failed: wsml.errors.DataError: broken image 7"),
              diverged: ("FAILED", "failed: TrainingDiverged: loss became nan"), cut: ("KILLED", "interrupted")}
    for t, (status, reason) in expect.items():
        r = run_of(t)
        assert (r.info.status, r.data.tags[T.TAG_STATUS_REASON]) == (status, reason), t.trial_id
        assert r.data.tags[T.TAG_PARENT] == parent
    r = run_of(done)
    assert [s for s, _ in history(uri, r.info.run_id)] == [1, 2, 3, 4]
    assert r.data.metrics[T.TEST_MAP] == 24.0 and r.data.metrics[T.EPOCHS_RUN] == 4
    assert r.data.metrics[T.TRAIN_HOURS] == pytest.approx(4 * 36 / 3600)
    assert [(m.step, m.value) for m in c.get_metric_history(r.info.run_id, T.LINEAR_INIT_SATURATED_FRAC)] == [(1, 0.75)]
    assert r.info.run_name == "LL-R d=2 lr=0.001 #t1"
    assert run_of(cut).info.run_name == "AN lr=0.001 #t6" and "delta_rel" not in run_of(cut).data.params
    assert run_of(cut).data.metrics[T.EPOCHS_RUN] == 2              # its last result's metrics are kept

    # a new driver (--resume) unpickles the callback: it finds the runs again, reopens the
    # interrupted one and logs only the epochs it has not seen
    cb2 = pickle.loads(pickle.dumps(cb))
    assert cb2._runs == {} and cb2._client is None
    cb2.outbox.background = False
    cb2.log_trial_start(cut)
    assert run_of(cut).info.status == "RUNNING"
    for e in (2, 3, 4):                                              # restored from epoch 1's checkpoint
        cut.last_result = _result(e, restored_from_epoch=1)
        cb2.log_trial_result(0, cut, cut.last_result)
    cb2.log_trial_end(cut)
    assert cb2.finish(wait_s=1) == 0
    r = run_of(cut)
    assert (r.info.status, r.data.tags[T.TAG_STATUS_REASON]) == ("FINISHED", "completed")
    assert [s for s, _ in history(uri, r.info.run_id)] == [1, 2, 3, 4]
    assert r.data.tags["wsml.restored_from_epoch"] == "1"
    assert run_of(done).info.status == "FINISHED"                  # untouched by the second driver
    assert len(store.find_runs(c, exp, **{T.TAG_ROLE: T.ROLE_TRIAL})) == 6


def test_storage_and_cache_dir_default_to_the_cluster_files_paths(tmp_path, monkeypatch):
    """--storage defaults to $WSML_STORAGE; --cache-dir to the shared cache for a compact image cache (built
    once, read by every node) and to the node's own disk for a raw one (read again every epoch)."""
    import numpy as np

    from orchestration.run import preflight
    from orchestration import sweep

    shared, local = tmp_path / "shared" / "cache", tmp_path / "nvme"
    for k in ("WSML_STORAGE", "WSML_CACHE", "WSML_SHARED_CACHE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    assert sweep.parse_args(["--dataset", "digits"]).storage == "ray_results"
    assert preflight.resolve_cache_dir(None, "digits", None, {}) == str(tmp_path / ".cache")
    monkeypatch.setenv("WSML_STORAGE", str(tmp_path / "shared" / "ray_results"))
    monkeypatch.setenv("WSML_SHARED_CACHE", str(shared))
    monkeypatch.setenv("WSML_CACHE", str(local))
    assert sweep.parse_args(["--dataset", "digits"]).storage == str(tmp_path / "shared" / "ray_results")
    assert sweep.parse_args(["--dataset", "digits", "--storage", "x"]).storage == "x"

    def data(n_images: int):
        root = tmp_path / f"data{n_images}"
        root.mkdir()
        for split, n in (("train", n_images), ("val", 2)):
            np.save(root / f"formatted_{split}_images.npy", np.array([f"img/{i}.jpg" for i in range(n)]))
            np.save(root / f"formatted_{split}_labels.npy", np.eye(3, dtype=np.int8)[np.arange(n) % 3])
        return str(root)

    resolve = preflight.resolve_cache_dir
    assert resolve(None, "digits", None, {}) == str(local)                         # in memory; features: local
    assert resolve(None, "pascal", data(100), {}) == str(local)                    # auto: 100 images stay raw
    assert resolve(None, "coco", data(30_000), {}) == str(shared)                  # auto: 18 GB of pixels: compact
    assert resolve(None, "pascal", data(101), {"image_cache": "compact"}) == str(shared)
    assert resolve(None, "coco", str(tmp_path / "elsewhere"), {}) == str(shared)   # not visible here: shared
    assert resolve("mine", "coco", None, {}) == str(tmp_path / "mine")
