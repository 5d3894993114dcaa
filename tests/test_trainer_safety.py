"""The trainer's own safety rules: what `--out` may hold, the data fingerprint in checkpoints,
checkpoints without their checksum, SIGTERM/SIGHUP/Ctrl-C, and image paths that leave the data set."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_official import make_prepared, write_jpeg
from wsml.checkpoint import load_checkpoint, save_checkpoint
from wsml.config import TrainConfig
from wsml.errors import CheckpointError, DataError
from wsml.train import run

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ["--dataset", "digits", "--max-train-images", "128", "--device", "cpu", "--num-workers", "0"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsml.train", *args], cwd=cwd, capture_output=True, text=True,
                          env=env(), timeout=300)


def only_error_line(r: subprocess.CompletedProcess) -> str:
    """The one `error:` line, the last of stderr (the image cache may say it built itself before)."""
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in r.stderr, r.stderr
    return errors[0]


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() if p.is_file() else b"<folder>" for p in sorted(folder.iterdir())}


@pytest.fixture
def dataset(tmp_path) -> Path:
    return make_prepared(tmp_path, 12, 6)


def small(data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--dataset", "pascal", "--data-root", str(data), "--arch", "smallcnn", "--weights", "none",
            "--image-size", "16", "--batch-size", "4", "--device", "cpu", "--num-workers", "0",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), *extra]


# ------------------------------------------------------------------ --out
@pytest.mark.slow
def test_out_refuses_another_runs_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"accuracy": 0.93}\n')          # some other program's result
    before = listing(out)
    line = only_error_line(cli(*DIGITS, "--epochs", "1", "--out", str(out), cwd=tmp_path))
    assert f"--out {out} holds a metrics.json that python -m wsml.train did not write" in line
    assert "pass another --out" in line and listing(out) == before

    (out / "metrics.json").unlink()
    (out / "notes.txt").write_text("mine\n")
    (out / "plots").mkdir()
    before = listing(out)
    line = only_error_line(cli(*DIGITS, "--epochs", "1", "--out", str(out), cwd=tmp_path))
    assert "holds files this trainer did not write (notes.txt, plots/)" in line and "pass a new or empty folder" in line
    assert listing(out) == before


@pytest.mark.slow
def test_out_rerun_finished_other_settings_and_unverified(tmp_path):
    out = tmp_path / "out"
    args = [*DIGITS, "--scheme", "AN", "--epochs", "1", "--out", str(out)]
    first = cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "checkpoint.pt.sha256", "metrics.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    before = listing(out)

    # the same command again: the recorded result, nothing trained, nothing rewritten
    again = cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"already finished: test mAP {metrics['test_map']:.2f}")
    assert "epoch 1/1" not in again.stdout and listing(out) == before

    # another scheme: refused, naming the setting
    line = only_error_line(cli(*[a if a != "AN" else "LL-R" for a in args], cwd=tmp_path))
    assert "holds the results of another run" in line and "scheme='AN' but this run has scheme='LL-R'" in line
    assert listing(out) == before

    # the checksum gone: refused naming the file and the flag; with the flag it resumes and writes one
    (out / "checkpoint.pt.sha256").unlink()
    more = [*args[:-4], "--epochs", "2", "--out", str(out)]
    line = only_error_line(cli(*more, cwd=tmp_path))
    assert f"checkpoint {out / 'checkpoint.pt'} has no checkpoint.pt.sha256 beside it" in line
    assert "--accept-unverified-checkpoint" in line
    for leftover in (".checkpoint.pt.a1b2c3d4.tmp", ".metrics.json.x_y9z8w7.tmp"):   # of a write cut short by SIGKILL
        (out / leftover).write_bytes(b"half")
    accepted = cli(*more, "--accept-unverified-checkpoint", cwd=tmp_path)
    assert accepted.returncode == 0, accepted.stderr
    assert "unverified" in accepted.stderr and "resumed after epoch 1" in accepted.stdout
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "checkpoint.pt.sha256", "metrics.json"]
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 2
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2        # verified again


@pytest.mark.slow
def test_out_trained_beyond_epochs_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cfg = TrainConfig(dataset="digits", scheme="AN", max_train_images=128, device="cpu", num_workers=0,
                      epochs=3).resolve()
    save_checkpoint(out / "checkpoint.pt", {"config": cfg.to_dict(), "epoch": 3})
    line = only_error_line(cli(*DIGITS, "--scheme", "AN", "--epochs", "2", "--out", str(out), cwd=tmp_path))
    assert "already trained for 3 epochs, more than --epochs 2: pass --epochs 3 or more" in line


def test_unverified_checkpoint_api(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"epoch": 4})
    (tmp_path / "c.pt.sha256").unlink()
    with pytest.raises(CheckpointError, match=r"has no c\.pt\.sha256 beside it.*--accept-unverified-checkpoint"):
        load_checkpoint(path)
    assert load_checkpoint(path, accept_unverified=True)["epoch"] == 4


# ------------------------------------------------------------------ data fingerprint
@pytest.mark.slow
def test_resume_state_on_other_data_is_refused():
    """The path a sweep takes: `run(resume_state=...)`."""
    cfg = TrainConfig(dataset="digits", scheme="AN", max_train_images=64, epochs=2, device="cpu", num_workers=0)
    states = []
    run(cfg, lambda report, get_state: states.append(get_state()) or True, log=None)
    state = states[0]
    original = dict(state["data"])
    assert set(state["data"]) == {"images", "training labels", "observed labels", "validation labels", "test labels"}
    assert len(run(cfg, resume_state=state, log=None).history) == 2             # same data: resumes
    state["data"]["observed labels"] = "64:0000000000000000"
    with pytest.raises(CheckpointError, match="the training data changed since the checkpoint was made: "
                                              "observed labels differ"):
        run(cfg, resume_state=state, log=None)
    # a shorter training set (another --max-train-images is another config) is named with its row counts
    state["data"] = {**original, "training labels": "65:0000000000000000"}
    with pytest.raises(CheckpointError, match=r"training labels \(65 rows then, 64 now\) differ"):
        run(cfg, resume_state=state, log=None)


@pytest.mark.slow
def test_cli_resume_after_the_data_changed_is_refused(dataset, tmp_path):
    first = cli(*small(dataset, tmp_path, "--epochs", "1"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    saved = listing(tmp_path / "out")
    labels_file = dataset / "formatted_train_labels.npy"
    np.save(labels_file, np.ones_like(np.load(labels_file)))     # every class present in every image
    line = only_error_line(cli(*small(dataset, tmp_path, "--epochs", "2"), cwd=tmp_path))
    assert "the training data changed since the checkpoint was made: training labels" in line
    assert f"(data root {dataset})" in line and listing(tmp_path / "out") == saved


def test_fingerprint_names_changed_images_not_moved_ones(dataset, tmp_path):
    import shutil

    from wsml.data.formats import write_formatted
    from wsml.data.loading import fingerprint_changes, load_data

    cfg = TrainConfig(dataset="pascal", data_root=str(dataset), cache_dir=str(tmp_path / "cache"), weights="none",
                      arch="smallcnn", image_size=16)
    before = load_data(cfg.resolve()).fingerprint
    # the same data set copied elsewhere (new mtimes, another image root): the same data
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "images", copy / "images")
    arrays = {f.stem.removeprefix("formatted_"): np.load(f) for f in dataset.glob("formatted_*.npy")}
    write_formatted(copy / "data", dataset="pascal", class_names=["a", "b", "c"], image_root=copy / "images",
                    **arrays)
    moved = load_data(TrainConfig(**{**cfg.to_dict(), "data_root": str(copy / "data")}).resolve()).fingerprint
    assert moved == before
    # one image replaced by a file of another size
    image = tmp_path / "images" / "tr" / "005.jpg"
    image.write_bytes(image.read_bytes() + b"\0" * 7)
    assert fingerprint_changes(before, load_data(cfg.resolve()).fingerprint) == ["images"]


# ------------------------------------------------------------------ signals
def test_a_signal_waits_for_the_write_or_the_next_batch():
    from wsml.interrupt import Interrupted, StopOnSignal

    done = []
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        with pytest.raises(Interrupted):
            with stop.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGHUP)          # a second one is ignored: already stopping
                time.sleep(0.05)
                done.append("written")
    assert done == ["written"] and stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before             # handlers restored

    # once training calls check() between batches, a signal waits for the next check()
    with StopOnSignal() as stop:
        stop.check()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        done.append("batch finished")
        with pytest.raises(Interrupted):
            stop.check()
    assert done[-1] == "batch finished"


def _start_and_signal(args: list[str], out: Path, signum: int, cwd: Path, group: bool = False):
    """Start the trainer, wait for its first checkpoint, send `signum` to it (or to its whole
    process group, as Ctrl-C in a terminal and SLURM do), wait for it to end."""
    p = subprocess.Popen([sys.executable, "-m", "wsml.train", *args], cwd=cwd, env=env(), start_new_session=group,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint.pt.sha256").exists():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.02)
    os.killpg(p.pid, signum) if group else p.send_signal(signum)
    stdout, stderr = p.communicate(timeout=120)
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


def _assert_stopped_after_epoch_1(r: subprocess.CompletedProcess, args: list[str], out: Path, signum: int):
    assert r.returncode == 128 + signum, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"interrupted by {signal.Signals(signum).name}: {out / 'checkpoint.pt'} keeps epoch 1, the epoch in "
        f"progress is dropped; continue with the same command: python -m wsml.train {shlex.join(args)}")
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr and "epoch 2/" not in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "checkpoint.pt.sha256"]   # nothing partial
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signal_stops_at_the_checkpoint_and_the_same_command_resumes(tmp_path, signum, status):
    out = tmp_path / "out"
    # 512 training images: an epoch takes long enough that the signal arrives within epoch 2
    args = ["--dataset", "digits", "--max-train-images", "512", "--device", "cpu", "--num-workers", "0",
            "--scheme", "AN", "--epochs", "3", "--out", str(out)]
    r = _start_and_signal(args, out, signum, tmp_path)
    assert r.returncode == status
    _assert_stopped_after_epoch_1(r, args, out, signum)
    if signum != signal.SIGTERM:
        return
    again = cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resumed after epoch 1" in again.stdout and "epoch 1/3" not in again.stdout
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert history[0]["epoch"] == 1 and history[-1]["epoch"] >= 2


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_with_dataloader_workers(tmp_path):
    """Ctrl-C reaches the DataLoader workers too (the same for SLURM's SIGTERM): still one clean stop, 130."""
    data = make_prepared(tmp_path, 120, 10)
    out = tmp_path / "out"
    args = small(data, tmp_path, "--epochs", "3")
    args[args.index("--num-workers") + 1] = "2"     # a memmapped data set: read by worker processes
    r = _start_and_signal(args, out, signal.SIGINT, tmp_path, group=True)
    assert r.returncode == 130
    _assert_stopped_after_epoch_1(r, args, out, signal.SIGINT)


# ------------------------------------------------------------------ image paths
def _list(dataset: Path, split: str, paths: list[str]) -> None:
    np.save(dataset / f"formatted_{split}_images.npy", np.asarray(paths, dtype=str))


@pytest.mark.slow
def test_image_path_outside_the_root_is_refused_before_decoding(dataset, tmp_path):
    write_jpeg(tmp_path / "outside.jpg", seed=7)
    paths = [f"tr/{i:03d}.jpg" for i in range(12)]
    _list(dataset, "train", paths[:3] + ["../outside.jpg"] + paths[4:])
    line = only_error_line(cli(*small(dataset, tmp_path, "--epochs", "1"), cwd=tmp_path))
    assert line == (f"error: {dataset / 'formatted_train_images.npy'} lists image '../outside.jpg', which is "
                    f"outside the image root {tmp_path / 'images'} (a '..' component): list paths relative to "
                    "the image root that stay inside it, or move the images there and run `python -m "
                    "wsml.data.prepare <dataset> --source RAW_DIR --dest OUT_DIR`")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()   # nothing decoded or written


def test_image_paths_absolute_and_symlinks(dataset, tmp_path):
    from wsml.data.formats import read_formatted

    images = (tmp_path / "images").resolve()      # as meta.json records it
    elsewhere = tmp_path.resolve() / "elsewhere"
    paths = [f"tr/{i:03d}.jpg" for i in range(12)]
    write_jpeg(elsewhere / "x.jpg", seed=8)

    _list(dataset, "val", ["/etc/passwd"] + [f"va/{i:03d}.jpg" for i in range(1, 6)])
    with pytest.raises(DataError, match=r"formatted_val_images\.npy lists image '/etc/passwd', .*an absolute path"):
        read_formatted(dataset)
    _list(dataset, "val", [f"va/{i:03d}.jpg" for i in range(6)])

    # a link inside the root is followed; the root itself may be a link
    (images / "tr" / "link.jpg").symlink_to(images / "va" / "000.jpg")
    _list(dataset, "train", paths[:11] + ["tr/link.jpg"])
    assert read_formatted(dataset).train_images[-1] == f"{images}/tr/link.jpg"
    (tmp_path / "root-link").symlink_to(images)
    assert len(read_formatted(dataset, image_root=tmp_path / "root-link").train_images) == 12

    # a file link pointing out of the root
    (images / "tr" / "out.jpg").symlink_to(elsewhere / "x.jpg")
    _list(dataset, "train", paths[:11] + ["tr/out.jpg"])
    with pytest.raises(DataError) as err:
        read_formatted(dataset)
    assert (f"lists image 'tr/out.jpg', which is outside the image root {images} ({images / 'tr' / 'out.jpg'} "
            f"is a symlink to {elsewhere / 'x.jpg'})") in str(err.value)

    # a folder link pointing out of the root
    (images / "more").symlink_to(elsewhere)
    _list(dataset, "train", paths[:11] + ["more/x.jpg"])
    with pytest.raises(DataError, match=r"'more/x\.jpg', .*its folder .*more resolves to .*elsewhere"):
        read_formatted(dataset)

    # and the writer refuses the same, so `wsml.data.prepare` never writes such a list
    from wsml.data.formats import write_formatted
    with pytest.raises(DataError, match=r"train_images lists image 'more/x\.jpg'"):
        write_formatted(tmp_path / "again", dataset="toy", class_names=["a"], image_root=images,
                        train_images=["more/x.jpg"], train_labels=[[1]], val_images=["va/000.jpg"], val_labels=[[1]])
    assert not (tmp_path / "again").exists()
