"""Helpers shared by the test modules: running the sweep CLI, reading Ray's and MLflow's records of it,
and an `mlflow server` on loopback. The fixtures built on them are in conftest.py."""
from __future__ import annotations

import glob
import json
import os
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


CALLERS_SETTINGS = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "WSML_STORAGE", "WSML_CACHE", "WSML_SHARED_CACHE",
                    "WSML_FAKE_GPUS")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess under test: no cluster or store of the caller's, no telemetry."""
    env = dict(os.environ)
    for k in CALLERS_SETTINGS:
        env.pop(k, None)
    # RAY_ADDRESS=local: a sweep without --address starts its own Ray, never joins a cluster that another
    # test started with `ray start` on this machine (which a sweep on a cluster's head joins)
    env.update(RAY_ADDRESS="local", RAY_USAGE_STATS_ENABLED="0", RAY_USAGE_STATS_REPORT_URL="http://127.0.0.1:9/",
               MLFLOW_DISABLE_TELEMETRY="true", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(what: str, fn, timeout: float = 60.0, interval: float = 0.25, on_timeout=None):
    """Call fn until it returns something truthy (exceptions count as not yet); fail after timeout."""
    end = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < end:
        try:
            value = fn()
            if value:
                return value
        except Exception as err:  # noqa: BLE001 - not there yet
            last = err
        time.sleep(interval)
    if on_timeout:
        on_timeout()
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                         + (f" (last error: {type(last).__name__}: {last})" if last else ""))


# ------------------------------------------------------------------ sweeps
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


def write_grid_space(path: Path, *, dataset: str = "digits", deltas: str, lrs: str, start_with: str,
                     num_samples: int, epochs: int, max_failures: int, train: str) -> Path:
    """A space file of LL-R over a grid (`deltas`, `lrs`: YAML lists), each configuration once at most;
    `train` the fixed settings (a YAML mapping's body)."""
    path.write_text(textwrap.dedent(f"""\
        dataset: {dataset}
        search:
          scheme: [LL-R]
          delta_rel: {{values: {deltas}}}
          lr: {{values: {lrs}}}
        start_with: {start_with}
        num_samples: {num_samples}
        epochs: {epochs}
        search_seed: 0
        scheduler: {{grace_period: 2, reduction_factor: 2}}
        resources: {{cpus_per_trial: 1, gpus_per_trial: 0}}
        final_seeds: 0
        max_failures: {max_failures}
        train: {{{train}}}
        """))
    return path


def run_cli(args: list[str], cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SWEEP), *args], cwd=cwd, env=clean_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def sweep_in_process(args: list[str], cwd: Path, capsys) -> subprocess.CompletedProcess:
    """`orchestration/sweep.py ARGS` run in this process (where the process boundary is not what a test is
    about: it saves the imports of a new interpreter), in `cwd`, with the environment of `clean_env` and
    restored afterwards; its output as a CompletedProcess, like `run_cli`'s."""
    from orchestration.sweep import main

    before, here = dict(os.environ), os.getcwd()
    os.environ.clear()
    os.environ.update(clean_env())
    capsys.readouterr()
    try:
        os.chdir(cwd)
        code = main(list(args))
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(before)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


class SweepProcess:
    """The sweep CLI in a subprocess (its own process group), its output in files."""

    def __init__(self, cwd: Path, args: list[str], **env: str):
        self.log_path = cwd / "driver.log"
        self.err_path = cwd / "driver.err"
        self._out, self._err = open(self.log_path, "w"), open(self.err_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(SWEEP), *args], cwd=cwd, env=clean_env(**env),
                                     stdout=self._out, stderr=self._err, start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text()[-3000:] + self.err_path.read_text()[-4000:]

    def wait_until(self, what: str, predicate, timeout: float = 300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = predicate()
            if value:
                return value
            assert self.proc.poll() is None, f"sweep ended while waiting for {what}: " + self.output()
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}: " + self.output())

    def finish(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout=timeout)

    def __enter__(self) -> "SweepProcess":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._out.close()
        self._err.close()


def kill_at_epoch(proc: subprocess.Popen, exp_dir: Path, epoch: int, log: Path, timeout: float = 300) -> None:
    """SIGKILL the sweep `proc` once one of its trials has reported `epoch` or more (mid-sweep, Tune's state
    naming a checkpoint), and wait for it; fail the test if none does within `timeout` or the sweep ends
    first. (A busy driver may write a trial's next epoch before a poll sees this one.)"""
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            counts = [len(Path(f).read_text().splitlines()) for f in glob.glob(str(exp_dir / "*/result.json"))]
            if any(c >= epoch for c in counts):
                break
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        else:
            pytest.fail(f"no trial reached epoch {epoch} within {timeout:.0f} s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def trial_result(epoch: int, seconds_per_epoch: float = 2.0) -> dict:
    """A trial's report for `epoch` as Tune hands it to the MLflow callback (made-up, increasing values)."""
    return {"epoch": epoch, "val_map": 10.0 + epoch, "train_loss": 1.0 / epoch, "best_val_map": 10.0 + epoch,
            "best_epoch": epoch, "test_map_at_best": 20.0 + epoch, "train_seconds": seconds_per_epoch * epoch,
            "node_id": "n1", "device": "cpu", "restored_from_epoch": 0}


def checkpoint_saver(folder: Path):
    """An on_epoch callback of `wsml.train.run` that saves each epoch's state as <folder>/epoch<N>.pt."""
    from wsml.checkpoint import save_checkpoint

    def on_epoch(report, get_state):
        save_checkpoint(folder / f"epoch{report.epoch}.pt", get_state())
    return on_epoch


def rows_by_trial(exp_dir: Path) -> dict[str, list[dict]]:
    """Ray's result.json rows of each trial, also while the sweep runs (a line being written is skipped)."""
    out = {}
    for f in glob.glob(str(exp_dir / "*/result.json")):
        rows = []
        for line in Path(f).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def ray_trials(exp_dir: Path) -> dict[str, dict]:
    """trial id -> {"config": params.json, "results": [result.json rows], "dir"} read from Ray's folder."""
    out = {}
    for d in sorted(p for p in exp_dir.iterdir() if p.is_dir() and (p / "params.json").exists()):
        rows = [json.loads(ln) for ln in (d / "result.json").read_text().splitlines() if ln.strip()] \
            if (d / "result.json").exists() else []
        tid = rows[0]["trial_id"] if rows else None
        if tid:
            out[tid] = {"config": json.loads((d / "params.json").read_text()), "results": rows, "dir": d}
    return out


# ------------------------------------------------------------------ MLflow
def mlflow_runs(uri: str, experiment: str) -> dict[str, list]:
    """The runs of an experiment by their wsml.role tag."""
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment} in {uri}"
    by_role: dict[str, list] = {}
    for r in c.search_runs([exp.experiment_id], max_results=1000):
        by_role.setdefault(r.data.tags.get("wsml.role"), []).append(r)
    return by_role


def history(uri: str, run_id: str, key: str = "val_map") -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return sorted((int(m.step), float(m.value)) for m in MlflowClient(uri).get_metric_history(run_id, key))


class MlflowServer:
    """`mlflow server` on 127.0.0.1 against a SQLite store (its own process group); `url` once started."""

    def __init__(self, db: Path, artifacts: Path, log: Path, port: int | None = None):
        self.db, self.artifacts, self.log = db, artifacts, log
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "MlflowServer":
        env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                 "--port", str(self.port), "--backend-store-uri", f"sqlite:///{self.db}",
                 "--default-artifact-root", str(self.artifacts), "--workers", "1"],
                cwd=self.db.parent, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def healthy():
            if self.proc.poll() is not None:
                raise AssertionError(f"mlflow server exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200

        poll("mlflow server /health", healthy, timeout=timeout, interval=0.3)
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)          # the server stops its workers
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)    # its own session: only what it started
            self.proc.wait(timeout=10)


def write_image(path, rng, w: int, h: int, mode: str) -> None:
    """A w x h image of smooth shapes plus noise, saved in `mode` (RGB, L, RGBA, P) and the format of its name."""
    import numpy as np
    from PIL import Image

    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(pixels[: h // 4 + 1, : w // 4 + 1]).resize((w, h), Image.BICUBIC))
    im = Image.fromarray(smooth // 2 + pixels // 2)
    if mode == "P":
        im = im.quantize(16)
    elif mode != "RGB":
        im = im.convert(mode)
    im.save(path)


def small_images(folder: Path) -> list[str]:
    """36 small images of varied size, mode and format (JPEG RGB/L, PNG RGB/RGBA/palette) in `folder`."""
    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir()
    kinds = [("jpg", "RGB"), ("jpg", "L"), ("png", "RGB"), ("png", "RGBA"), ("png", "P"), ("jpg", "RGB")]
    paths = []
    for i in range(36):
        ext, mode = kinds[i % len(kinds)]
        p = folder / f"{i:03d}.{ext}"
        write_image(p, rng, int(rng.integers(12, 90)), int(rng.integers(12, 90)), mode)
        paths.append(str(p))
    return paths
