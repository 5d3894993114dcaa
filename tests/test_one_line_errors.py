"""Issue 30, finding 9 (the part not in tests/test_driver_lock.py): names that break the tables and
figures, and inputs that gave a traceback instead of one `error:` line.

* a `|` in a sweep's name is escaped in every Markdown table; `a/b` and `a_b` write two figure files;
* a failed MLflow write (the store refuses it or is locked) is one line, not ~80 of traceback;
* a zero-byte label `.npy` and a truncated image-path `.npy` in a prepared data set;
* a read-only TMPDIR (Ray's temporary folder), a read-only HOME (torch's cache of the ImageNet weights);
* a working directory whose name is not UTF-8;
* `--storage s3://...` whose endpoint does not answer.

Each: one `error:` line naming the problem and the fix, a non-zero exit, nothing half-written.
"""
from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_official import make_prepared
from tests.helpers import SWEEP, clean_env, free_port, run_cli, write_space


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def one_error(r: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a command that failed cleanly (no traceback)."""
    assert r.returncode != 0, r.stdout[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    [line] = error_lines(r.stderr)
    return line


# =================================================================== names in tables and figures
def _cells(line: str) -> list[str]:
    """A Markdown table row's cells; `\\|` is a pipe inside a cell."""
    return re.split(r"(?<!\\)\|", line.strip()[1:-1])


def test_a_pipe_in_a_name_is_escaped_in_every_markdown_table_and_figure_names_stay_apart(tmp_path):
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from orchestration import aggregate as A
    from tests.synthetic_runs import RunSpec, curve, final_specs, write_sweep

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    rng = np.random.default_rng(0)
    for name in ("a|b", "a/b", "a_b"):
        specs = [RunSpec("LL-R", val_map=curve(50, 3, rng)), *final_specs("LL-R", [49.0, 50.0], epochs=3)]
        _, parent, _ = write_sweep(client, name, "digits", "end-to-end", specs)
        client.log_batch(parent, params=[Param(f"estimate.{k}", v) for k, v in {
            "device": "A|10G", "slots": "1", "epochs": "3", "epochs_most": "3", "trial_hours": "0.1",
            "gpu_hours": "0.1", "wall_s": "60"}.items()])
    res = A.aggregate(uri, None, tmp_path / "results")
    for md in (tmp_path / "results").glob("*.md"):
        tables, current = [], []
        for ln in md.read_text().splitlines() + [""]:
            if ln.startswith("|"):
                current.append(len(_cells(ln)))
            elif current:
                tables.append(current)
                current = []
        assert tables, md.name
        for widths in tables:                                           # every row as wide as its header
            assert len(set(widths)) == 1, (md.name, widths)
    sweeps = (tmp_path / "results" / "sweeps.md").read_text()
    assert r"a\|b" in sweeps and r"A\|10G" in sweeps
    figures = sorted(p.name for p in res.figures if p.name.endswith("-val_map.png"))
    assert len(figures) == 3 and len(set(figures)) == 3, figures       # one file per sweep, none overwritten
    assert "a_b-val_map.png" in figures                                 # a safe name stays as it is


# =================================================================== a failed MLflow write
@pytest.mark.slow
@pytest.mark.service
@pytest.mark.timeout(600)
def test_a_failed_mlflow_write_is_one_line_and_leaves_the_name_free(tmp_path, ray_address):
    """The store is readable but cannot be written (another process holds SQLite's write lock): the
    sweep's first write fails; one line, status 2, and the same command works once the lock is gone."""
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()             # the store exists
    space = write_space(tmp_path / "space.yaml", num_samples=1, epochs=2, grace=2, schemes="[LL-R]")
    args = ["--dataset", "digits", "--space", str(space), "--name", "locked", "--address", ray_address,
            "--final-seeds", "0"]
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")                                 # SQLite's write lock, held
    try:
        r = run_cli(args, cwd=tmp_path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    line = one_error(r)
    assert r.returncode == 2 and "MLflow store" in line and "database is locked" in line, line
    assert len(r.stderr.strip().splitlines()) < 10, r.stderr        # not the ~80 lines of a traceback
    assert not (tmp_path / "ray_results" / "locked").exists()
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


def test_a_folder_as_mlflow_uri_is_refused_before_anything_starts(tmp_path, monkeypatch, capsys):
    """MLflow 3 refuses its file store (a folder as the tracking URI): said in one line at the start,
    not as a traceback once Ray runs."""
    from orchestration import sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    rc = sweep.main(["--dataset", "digits", "--mlflow-uri", str(tmp_path / "mlruns"), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "sqlite:///" in err and not (tmp_path / "mlruns").exists()


# =================================================================== a damaged prepared data set
@pytest.mark.slow
@pytest.mark.parametrize("damage", ["zero-byte labels", "zero-byte paths", "paths cut in the data",
                                    "paths cut in the header", "paths cut in the magic"])
def test_a_damaged_npy_of_a_prepared_set_is_one_line(tmp_path, damage):
    data = make_prepared(tmp_path, 12, 6)
    labels, paths = data / "formatted_train_labels.npy", data / "formatted_train_images.npy"
    target = labels if "labels" in damage else paths
    body = target.read_bytes()
    cut = {"zero-byte labels": 0, "zero-byte paths": 0, "paths cut in the data": len(body) * 2 // 3,
           "paths cut in the header": 40, "paths cut in the magic": 3}[damage]
    target.write_bytes(body[:cut])
    train = subprocess.run(
        [sys.executable, "-m", "wsml.train", "--dataset", "pascal", "--data-root", str(data), "--arch", "smallcnn",
         "--weights", "none", "--image-size", "16", "--epochs", "1", "--device", "cpu", "--num-workers", "0",
         "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300)
    line = one_error(train)
    assert target.name in line and "prepare" in line, line
    assert "object array" not in line, line                  # a cut file is no pickled array
    assert not (tmp_path / "out" / "metrics.json").exists()
    sweep = run_cli(["--dataset", "pascal", "--data-root", str(data), "--dry-run"], cwd=tmp_path)
    assert target.name in one_error(sweep)


def test_the_npy_reader_says_which_file_is_cut(tmp_path):
    from wsml.data.formats import _load
    from wsml.errors import DataError

    np.save(tmp_path / "x.npy", np.array(["a", "b"]))
    body = (tmp_path / "x.npy").read_bytes()
    for cut in (0, 3, 9, 40, len(body) - 1):
        (tmp_path / "x.npy").write_bytes(body[:cut])
        with pytest.raises(DataError, match=r"x\.npy is (empty|cut short|not a readable \.npy file)"):
            _load(tmp_path, "x.npy")


# =================================================================== the machine's own folders
def _read_only(folder: Path) -> Path:
    """`folder`, made and then read-only: a read-only bind mount where this runs as root (root writes through
    permission bits), else its mode."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return folder
    r = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot make a read-only folder as root here: {r.stderr.strip()}")
    subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
    return folder


def _writable_again(folder: Path) -> None:
    if os.geteuid() != 0:
        folder.chmod(0o755)
    else:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.slow
def test_a_read_only_tmpdir_is_one_line(tmp_path):
    """Ray started in-process keeps its session in $TMPDIR/ray: it could not start (a traceback of Ray's)."""
    folder = _read_only(tmp_path / "ro")
    try:
        space = write_space(tmp_path / "space.yaml", num_samples=1, epochs=2, grace=2, schemes="[LL-R]")
        r = run_cli(["--dataset", "digits", "--space", str(space), "--name", "ro", "--final-seeds", "0"],
                    cwd=tmp_path, timeout=600, TMPDIR=str(folder))
    finally:
        _writable_again(folder)
    line = one_error(r)
    assert r.returncode == 2 and f"{folder}/ray" in line and "TMPDIR" in line, line
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_a_read_only_home_is_one_line(tmp_path):
    """ResNet-50's ImageNet weights go to torch's cache in HOME (~/.cache/torch) unless TORCH_HOME says
    otherwise: a read-only HOME made the trainer fail with a traceback of os.makedirs."""
    home = _read_only(tmp_path / "home")
    env = clean_env(HOME=str(home))
    for name in ("TORCH_HOME", "XDG_CACHE_HOME"):
        env.pop(name, None)
    data = make_prepared(tmp_path, 12, 6)
    try:
        r = subprocess.run([sys.executable, "-m", "wsml.train", "--dataset", "digits", "--arch", "resnet50",
                            "--weights", "imagenet", "--epochs", "1", "--device", "cpu", "--num-workers", "0",
                            "--max-train-images", "50", "--out", str(tmp_path / "out")],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        # a sweep whose trials run here (the space's ResNet-50 on ImageNet weights): said before it starts
        sweep = subprocess.run([sys.executable, str(SWEEP), "--dataset", "pascal", "--data-root", str(data),
                                "--dry-run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        _writable_again(home)
    line = one_error(r)
    assert r.returncode == 2 and str(home / ".cache" / "torch") in line and "TORCH_HOME" in line, line
    assert not (tmp_path / "out" / "metrics.json").exists()
    line = one_error(sweep)
    assert sweep.returncode == 2 and str(home / ".cache" / "torch") in line and "TORCH_HOME" in line, line


def test_a_working_directory_that_is_not_utf8_is_one_line(tmp_path):
    """Ray cannot start from such a folder (it sends the driver's path as UTF-8): said first, whatever else
    the command names."""
    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9")         # Latin-1, as an old archive may unpack it
    os.mkdir(odd)
    space = write_space(tmp_path / "space.yaml", num_samples=1, epochs=2, grace=2, schemes="[LL-R]")
    for where in ([], ["--storage", str(tmp_path / "runs"), "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}",
                       "--results-dir", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache")]):
        r = subprocess.run([sys.executable, str(SWEEP), "--dataset", "digits", "--space", str(space), *where],
                           cwd=odd, env=clean_env(), capture_output=True, text=True, timeout=300)
        line = one_error(r)
        assert r.returncode == 2 and "working directory" in line and "UTF-8" in line and "caf\\xe9" in line, line
    assert os.listdir(odd) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["caf\udce9", "space.yaml"]


@pytest.mark.slow
def test_an_s3_storage_that_does_not_answer_is_one_line(tmp_path):
    """`--storage s3://...` whose endpoint is a closed port: one line, before Ray or MLflow start."""
    port = free_port()
    space = write_space(tmp_path / "space.yaml", num_samples=1, epochs=2, grace=2, schemes="[LL-R]")
    env = dict(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
               AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1")
    for args in (["--name", "s3"], ["--name", "s3", "--resume"], ["--resume"]):
        r = run_cli(["--dataset", "digits", "--space", str(space), "--storage", "s3://bucket/sweeps", *args],
                    cwd=tmp_path, timeout=300, **env)
        line = one_error(r)
        assert r.returncode == 2 and "--storage s3://bucket/sweeps cannot be read" in line, line
        assert "nothing to resume" not in line
    assert not (tmp_path / "mlflow.db").exists()
