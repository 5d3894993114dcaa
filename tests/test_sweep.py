"""End-to-end sweeps of `digits` on CPUs: Optuna + ASHA + checkpoints + MLflow + resume + bad input.

The sweeps join one Ray cluster started for this module (`Cluster`, 2 CPUs);
the MLflow-server test starts Ray in-process, as the CLI does by default.
"""
from __future__ import annotations

import glob
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ROOT / "orchestration" / "sweep.py"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


# ------------------------------------------------------------------ helpers
def clean_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_USAGE_STATS_REPORT_URL="http://127.0.0.1:9/",
               MLFLOW_DISABLE_TELEMETRY="true", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_space(path: Path, *, num_samples: int, epochs: int, grace: int = 2, final_seeds: int = 0,
                schemes: str = "[LL-R, LL-Ct, LL-Cp]", cpus: float = 1, gpus: float = 0,
                max_failures: int = 2, train_images: int = 300) -> Path:
    path.write_text(textwrap.dedent(f"""\
        dataset: digits
        search:
          scheme: {schemes}
          delta_rel: {{low: 0.5, high: 4.0}}
          lr: {{low: 2.0e-4, high: 5.0e-3, log: true}}
        num_samples: {num_samples}
        epochs: {epochs}
        search_seed: 0
        scheduler: {{grace_period: {grace}, reduction_factor: 2}}
        resources: {{cpus_per_trial: {cpus}, gpus_per_trial: {gpus}}}
        final_seeds: {final_seeds}
        max_failures: {max_failures}
        train: {{num_workers: 0, max_train_images: {train_images}, stop_drop: null}}
        """))
    return path


def run_cli(args: list[str], cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SWEEP), *args], cwd=cwd, env=clean_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def ray_trials(exp_dir: Path) -> dict[str, dict]:
    """trial id -> {"config": params.json, "results": [result.json rows]} read from Ray's folder."""
    out = {}
    for d in sorted(p for p in exp_dir.iterdir() if p.is_dir() and (p / "params.json").exists()):
        rows = [json.loads(ln) for ln in (d / "result.json").read_text().splitlines() if ln.strip()] \
            if (d / "result.json").exists() else []
        tid = rows[0]["trial_id"] if rows else None
        if tid:
            out[tid] = {"config": json.loads((d / "params.json").read_text()), "results": rows, "dir": d}
    return out


def mlflow_runs(uri: str, experiment: str) -> dict[str, list]:
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment} in {uri}"
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    by_role: dict[str, list] = {}
    for r in runs:
        by_role.setdefault(r.data.tags.get("wsml.role"), []).append(r)
    return by_role


def history(uri: str, run_id: str, key: str = "val_map") -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return sorted((int(m.step), float(m.value)) for m in MlflowClient(uri).get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def ray_address():
    """One Ray cluster (2 CPUs) for the sweeps of this module; they join it with --address."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        yield cluster.address
    finally:
        cluster.shutdown()


# ------------------------------------------------------------ the main sweep
def test_sweep_optuna_asha_mlflow_final(tmp_path, ray_address):
    """8 trials, epochs 4, grace 2: ASHA stops some; Optuna's proposals are the configs run;
    MLflow (local default: mlflow.db in the working directory) mirrors Ray's results; final reruns."""
    space = write_space(tmp_path / "space.yaml", num_samples=8, epochs=4, final_seeds=2,
                        schemes="[LL-R, LL-Cp]")
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
    assert "scheme" in out and "val_map" in out and "delta_rel" in out   # the progress table's columns

    exp_dir = tmp_path / "ray_results" / "main"
    trials = ray_trials(exp_dir)
    assert len(trials) == 8
    last_epochs = {tid: t["results"][-1]["epoch"] for tid, t in trials.items()}
    assert any(e < 4 for e in last_epochs.values()), last_epochs          # ASHA stopped some early
    assert any(e == 4 for e in last_epochs.values()), last_epochs
    assert all(e >= 2 for e in last_epochs.values()), last_epochs         # never before the grace period

    # Optuna proposed exactly the configurations that ran (searcher state saved by Tune)
    [state_file] = glob.glob(str(exp_dir / "searcher-state-*.pkl"))
    with open(state_file, "rb") as f:
        state = pickle.load(f)
    ot_trials = state["_ot_trials"]
    assert set(ot_trials) == set(trials)
    for tid, t in trials.items():
        params = ot_trials[tid].params
        cfg = t["config"]
        assert params["scheme"] == cfg["scheme"]
        assert params["lr"] == pytest.approx(cfg["lr"], rel=1e-12)
        assert params["delta_rel"] == pytest.approx(cfg["delta_rel"], rel=1e-12)
    # the paper's defaults (digits: lr 1e-3, delta_rel 2) ran first, one per scheme
    first = sorted(trials.values(), key=lambda t: int(t["dir"].name.split("_")[1]))[:2]   # trial_001_...
    assert {t["config"]["scheme"] for t in first} == {"LL-R", "LL-Cp"}
    assert all(t["config"]["lr"] == 1e-3 and t["config"]["delta_rel"] == 2.0 for t in first)

    runs = mlflow_runs(uri, "main")
    [parent] = runs["sweep"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["wsml.dataset"] == "digits" and parent.data.tags["wsml.sweep"] == "main"
    assert "--space" in parent.data.params["command"] and parent.data.params["git_commit"]
    assert parent.data.params["space.scheme"] == "LL-R,LL-Cp" and parent.data.params["num_samples"] == "8"

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
        assert re.fullmatch(r"LL-(R|Cp) d=\S+ lr=\S+ #t\d+", c.info.run_name), c.info.run_name
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
    assert len(finals) == 4
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
        [("LL-Cp", "0"), ("LL-Cp", "1"), ("LL-R", "0"), ("LL-R", "1")]
    assert "final runs (2 seeds each)" in out
    # the aggregation ran (once orchestration/aggregate.py exists)
    if (ROOT / "orchestration" / "aggregate.py").exists():
        assert "tables:" in out and any((tmp_path / "results").iterdir())


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
        deadline = time.time() + 300
        while time.time() < deadline:
            counts = [len(Path(f).read_text().splitlines()) for f in glob.glob(str(exp_dir / "*/result.json"))]
            if 3 in counts:
                break
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("no trial reached epoch 3 within 300 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
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


# --------------------------------------------------- a real MLflow server
def test_sweep_with_mlflow_server_and_local_ray(tmp_path):
    port = free_port()
    srv_env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen([str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"],
                              cwd=tmp_path, env=srv_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        work = tmp_path / "cwd"
        work.mkdir()
        space = write_space(tmp_path / "space.yaml", num_samples=2, epochs=2, train_images=200)
        # no --address: Ray starts in-process
        r = run_cli(["--dataset", "digits", "--space", str(space), "--name", "srv", "--mlflow-uri", uri],
                    cwd=work)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        assert "Started a local Ray instance" in r.stderr
        assert not (work / "mlflow.db").exists()
        runs = mlflow_runs(uri, "srv")
        assert len(runs["sweep"]) == 1 and runs["sweep"][0].info.status == "FINISHED"
        assert len(runs["trial"]) == 2
        for c in runs["trial"]:
            assert c.info.status == "FINISHED"
            assert [s for s, _ in history(uri, c.info.run_id)] == [1, 2]
        assert f"MLflow store: {uri}" in r.stdout
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


# --------------------------------------------------------------- bad input
def _bad_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    good = write_space(tmp_path / "good.yaml", num_samples=2, epochs=2)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("dataset: digits\nsearch: {scheme: [LL-R\n")
    lr_neg = tmp_path / "neg.yaml"
    lr_neg.write_text(good.read_text().replace("low: 2.0e-4", "low: -2.0e-4"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    dead = free_port()
    return [
        (["--dataset", "mnist"], "unknown data set 'mnist'"),
        (["--dataset", "digits", "--space", str(bad_yaml)], "malformed YAML"),
        (["--dataset", "digits", "--space", str(lr_neg)], "search.lr.low=-0.0002"),
        (["--dataset", "digits", "--space", str(good), "--epochs", "1"], "scheduler.grace_period=2"),
        (["--dataset", "digits", "--space", str(good), "--gpus-per-trial", "-1"], "resources.gpus_per_trial"),
        (["--dataset", "digits", "--space", str(good), "--schemes", "LL-R,LL-Q"], "unknown scheme 'LL-Q'"),
        (["--dataset", "digits", "--num-samples", "many"], "invalid int value"),
        (["--dataset", "digits", "--space", str(good), "--address", f"127.0.0.1:{dead}"], "unreachable"),
        (["--dataset", "digits", "--space", str(good), "--address", "nonsense"], "host:port"),
        (["--dataset", "digits", "--space", str(good), "--mlflow-uri", f"http://127.0.0.1:{dead}"], "unreachable"),
        (["--dataset", "digits", "--space", str(good), "--mlflow-uri", f"sqlite:///{a_file}/x.db"],
         "not writable"),
        (["--dataset", "digits", "--space", str(good), "--storage", str(a_file / "sub")], "not a writable folder"),
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
        self.status, self.num_failures = "RUNNING", 0

    def get_error(self):
        return "Traceback ...\nwsml.errors.DataError: broken image 7"


def _result(epoch: int, **extra) -> dict:
    return {"epoch": epoch, "val_map": 10.0 + epoch, "train_loss": 1.0 / epoch, "modified_frac": 0.01 * epoch,
            "modified_true_pos_frac": 0.3, "clean_rate": 1 - 0.02 * (epoch - 1), "best_val_map": 10.0 + epoch,
            "best_epoch": epoch, "test_map_at_best": 20.0 + epoch, "train_seconds": 36.0 * epoch,
            "gpu_seconds": 0.0, "node_id": "n1", "device": "cpu", "restored_from_epoch": 0, **extra}


def test_mlflow_callback_exactly_once_and_end_states(tmp_path):
    import pickle as _pickle

    from mlflow import MlflowClient

    from orchestration import mlflow_log as M
    from orchestration import tracking as T

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    c = MlflowClient(uri)
    exp, parent = M.start_parent(c, "cb", "digits", {"command": "x"}, resume=False)
    with pytest.raises(M.TrackingError, match="--resume"):
        M.start_parent(c, "cb", "digits", {"command": "x"}, resume=False)
    cb = M.MLflowTrialLogger(uri, exp, parent, "cb", "digits", T.ROLE_TRIAL, epochs=4)
    done, asha, drop, fail, diverged, cut = (
        _FakeTrial(f"t{i}", i, scheme=s, mode="end-to-end", lr=1e-3, delta_rel=2.0)
        for i, s in enumerate(["LL-R", "LL-Ct", "LL-Cp", "LL-R", "LL-R", "AN"], start=1))
    trials = [done, asha, drop, fail, diverged, cut]
    cb.on_step_begin(0, trials)
    for t in trials:
        cb.on_trial_start(0, trials, t)
    for t, epochs in ((done, 4), (asha, 2), (drop, 3), (fail, 1), (diverged, 2), (cut, 2)):
        for e in range(1, epochs + 1):
            t.last_result = _result(e, trainer_stop=float(t is drop and e == 3))
            cb.on_trial_result(0, trials, t, t.last_result)
    cb.on_trial_result(0, trials, done, _result(4))                  # a repeated epoch is logged once
    diverged.last_result = {**_result(2), "wsml_error": "TrainingDiverged: loss became nan"}
    for t in (done, asha, drop, diverged):
        t.status = "TERMINATED"
        cb.on_trial_complete(0, trials, t)
    fail.status = "ERROR"
    cb.on_trial_error(0, trials, fail)
    cut.status = "TERMINATED"                                       # Ctrl-C: Tune stops it, no completion
    cb.on_experiment_end(trials)
    assert M.EXPERIMENT_INTERRUPTED[("cb", T.ROLE_TRIAL)] is True

    def run_of(t):
        [r] = M.find_runs(c, exp, **{T.TAG_TRIAL_ID: t.trial_id})
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
    assert r.info.run_name == "LL-R d=2 lr=0.001 #t1"
    assert run_of(cut).info.run_name == "AN lr=0.001 #t6" and "delta_rel" not in run_of(cut).data.params

    # a new driver (--resume) unpickles the callback: it finds the runs again, reopens the
    # interrupted one and logs only the epochs it has not seen
    cb2 = _pickle.loads(_pickle.dumps(cb))
    assert cb2._runs == {} and cb2._client is None
    cut.status = "RUNNING"
    cb2.on_step_begin(0, trials)
    cb2.on_trial_start(0, trials, cut)
    assert run_of(cut).info.status == "RUNNING"
    for e in (2, 3, 4):                                              # restored from epoch 1's checkpoint
        cut.last_result = _result(e, restored_from_epoch=1)
        cb2.on_trial_result(0, trials, cut, cut.last_result)
    cut.status = "TERMINATED"
    cb2.on_trial_complete(0, trials, cut)
    cb2.on_experiment_end(trials)
    assert M.EXPERIMENT_INTERRUPTED[("cb", T.ROLE_TRIAL)] is False
    r = run_of(cut)
    assert (r.info.status, r.data.tags[T.TAG_STATUS_REASON]) == ("FINISHED", "completed")
    assert [s for s, _ in history(uri, r.info.run_id)] == [1, 2, 3, 4]
    assert r.data.tags["wsml.restored_from_epoch"] == "1"
    assert run_of(done).info.status == "FINISHED"                  # untouched by the second driver
    assert len(M.find_runs(c, exp, **{T.TAG_ROLE: T.ROLE_TRIAL})) == 6
