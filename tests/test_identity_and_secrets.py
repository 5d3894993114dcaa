"""Issue 30, findings 1-3: the data a result was trained on is part of its identity; no credential of
`--storage` (or of the MLflow URI, or of the environment) reaches an output, a log, a pickle or a
file; `--skip-bad-images` never trains on (mostly) blank data.

In-process tests first; one end-to-end test per finding (marked slow and service) runs the issue's
command: two sweeps on sets with other labels, a sweep with credentials in its storage and in its
environment, the trainer on a wrong image root.
"""
from __future__ import annotations

import base64
import http.server
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from orchestration import common as T
from tests.fixtures_official import make_prepared, write_jpeg
from tests.helpers import clean_env, mlflow_runs, ray_trials, run_cli, write_grid_space, write_space
from wsml.config import TrainConfig


def small_cfg(data: Path, tmp_path: Path, **kw) -> TrainConfig:
    return TrainConfig(dataset="pascal", data_root=str(data), cache_dir=str(tmp_path / "cache"), weights="none",
                       arch="smallcnn", image_size=16, batch_size=4, device="cpu", num_workers=0, epochs=1,
                       **kw).resolve()


def relabel(src: Path, dest: Path, **arrays) -> Path:
    """The prepared set `src` written again to `dest`, with `arrays` (write_formatted's names) replaced."""
    from wsml.data.formats import read_formatted, write_formatted

    raw = read_formatted(src)
    values = dict(train_images=raw.train_paths, train_labels=np.asarray(raw.train_labels),
                  val_images=raw.val_paths, val_labels=np.asarray(raw.val_labels),
                  train_labels_obs=None if raw.train_labels_obs is None else np.asarray(raw.train_labels_obs))
    values.update(arrays)
    image_root = values.pop("image_root", raw.image_root)
    write_formatted(dest, dataset="pascal", class_names=raw.class_names, image_root=image_root, **values)
    return dest


def pascal_space(path: Path, *, num_samples: int = 1, epochs: int = 2, skip_bad: bool = False) -> Path:
    """A space of one configuration: every sweep of it proposes the same one first."""
    return write_grid_space(path, dataset="pascal", deltas="[2.0]", lrs="[1.0e-3]", start_with="none",
                            num_samples=num_samples, epochs=epochs, max_failures=0,
                            train="num_workers: 0, arch: smallcnn, weights: none, image_size: 16, batch_size: 4, "
                                  f"stop_drop: null, skip_bad_images: {str(skip_bad).lower()}")


# =================================================================== 1. the data is part of a result's identity
def test_data_id_names_labels_observed_labels_split_and_image_list_not_where_they_live(tmp_path):
    from wsml.data.loading import data_id, load_data

    data = make_prepared(tmp_path, 12, 6)
    cfg = small_cfg(data, tmp_path)
    first = data_id(cfg)
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    assert load_data(cfg).data_id == first                  # the driver's value is the trainer's
    labels = np.load(data / "formatted_train_labels.npy")

    # the same data written again, labels as float64, in another folder with a copy of the images elsewhere
    shutil.copytree(tmp_path / "images", tmp_path / "copy" / "images")
    moved = relabel(data, tmp_path / "copy" / "data", train_labels=labels.astype(np.float64),
                    image_root=tmp_path / "copy" / "images")
    assert data_id(small_cfg(moved, tmp_path)) == first

    others = {
        "other labels": data_id(small_cfg(relabel(data, tmp_path / "ones", train_labels=np.ones_like(labels)),
                                          tmp_path)),
        "other test labels": data_id(small_cfg(relabel(data, tmp_path / "test", val_labels=np.ones((6, 3))),
                                               tmp_path)),
        "another split": data_id(small_cfg(data, tmp_path, split_seed=7)),
        "another observed-label seed": data_id(small_cfg(data, tmp_path, obs_seed=7)),
        "fewer training images": data_id(small_cfg(data, tmp_path, max_train_images=5)),
        "another image list": data_id(small_cfg(relabel(
            data, tmp_path / "list", train_images=[p.replace("tr/", "tr/./") for p in
                                                   np.load(data / "formatted_train_images.npy").tolist()]),
            tmp_path)),
    }
    # observed labels given as a file: the first, or else the last, positive of each image
    first_pos = np.zeros_like(labels)
    first_pos[np.arange(12), (labels == 1).argmax(1)] = 1
    last_pos = np.zeros_like(labels)
    last_pos[np.arange(12), 2 - (labels[:, ::-1] == 1).argmax(1)] = 1
    assert (first_pos != last_pos).any()
    observed = [data_id(small_cfg(relabel(data, tmp_path / f"obs{i}", train_labels_obs=obs), tmp_path))
                for i, obs in enumerate((first_pos, last_pos))]
    others.update({"observed labels from a file": observed[0], "other observed labels": observed[1]})
    assert first not in others.values() and len(set(others.values())) == len(others), others

    digits = TrainConfig(dataset="digits", max_train_images=64, device="cpu", num_workers=0)
    assert data_id(digits) == load_data(digits.resolve()).data_id


def test_the_trainer_refuses_data_other_than_the_data_planned(tmp_path):
    from wsml.errors import DataChanged
    from wsml.train import run

    cfg = small_cfg(make_prepared(tmp_path, 12, 6), tmp_path)
    with pytest.raises(DataChanged, match="is not the data this run was planned on .*; give every node the same "
                                          "prepared data set, or start a new sweep"):
        run(cfg, data_id="0" * 16, log=None)


def _log_trained_trial(uri: str, sweep: str, config: dict, data: str | None) -> None:
    """A finished search trial of `sweep` as the sweep logs it; `data` None: logged before the data was."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from orchestration.tracking import store
    from orchestration import trial as trial_config

    c = MlflowClient(uri)
    experiment_id, parent = store.start_parent(c, sweep, "digits", {"command": "test"}, resume=False)
    tags = {T.TAG_PARENT: parent, T.TAG_ROLE: T.ROLE_TRIAL, T.TAG_SWEEP: sweep, T.TAG_DATASET: "digits",
            T.TAG_SCHEME: "LL-R", T.TAG_TRIAL_ID: f"{sweep}_1", T.TAG_STATUS_REASON: "completed"}
    params = trial_config.Trial.parse(config).params()
    if data is None:
        params.pop(T.PARAM_DATA)
    else:
        tags[T.TAG_DATA] = data
    run = c.create_run(experiment_id, tags=tags)
    c.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                metrics=[Metric(T.VAL_MAP, 40.0 + e, 0, e) for e in (1, 2)]
                + [Metric(T.EPOCHS_RUN, 2, 0, 2), Metric(T.TEST_MAP, 41.0, 0, 2)])
    c.set_terminated(run.info.run_id, "FINISHED")


def test_warm_start_reuses_only_results_trained_on_the_same_data(tmp_path):
    from orchestration.search import known
    from orchestration import trial as trial_config
    from orchestration.search.space import load_space

    space = load_space("digits", write_space(tmp_path / "space.yaml", num_samples=2, epochs=2, schemes="[LL-R]"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    on_a, on_b = "a" * 16, "b" * 16

    def base(data: str) -> dict:
        return trial_config.base_config(dataset="digits", epochs=2, train=space.train, sweep="now", data_root=None,
                                        cache_dir=str(tmp_path / ".cache"), data_id=data)

    point = {"scheme": "LL-R", "mode": "end-to-end", "delta_rel": 2.0, "lr": 1e-3}
    _log_trained_trial(uri, "on-a", {**base(on_a), **point}, on_a)
    _log_trained_trial(uri, "unrecorded", {**base(on_a), **point}, None)

    same = known.load(uri, "auto", space, base(on_a), "now")
    assert [r.sweep for r in same.records] == ["on-a"]
    assert same.skipped == {"trained on data not recorded": 1}
    other = known.load(uri, "auto", space, base(on_b), "now")
    assert other.records == [] and other.skipped == {"trained on other data": 1, "trained on data not recorded": 1}
    assert "left out: 1 trained on other data; 1 trained on data not recorded" in other.summary()
    assert trial_config.Trial.parse({**base(on_b), **point}).params()[T.PARAM_DATA] == on_b      # logged with every trial


def test_table1_never_averages_final_runs_of_different_data(tmp_path):
    from mlflow import MlflowClient

    from orchestration import aggregate as A
    from tests.synthetic_runs import final_specs, write_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    t0 = int(time.time() * 1000)
    # one experiment whose final runs were trained on two data (its data set prepared again in between)
    _, _, ids = write_sweep(c, "mixed", "digits", "end-to-end",
                            final_specs("LL-R", [50.0, 52.0]) + final_specs("LL-R", [30.0, 32.0]), t0=t0)
    for rid, data in zip(ids, ["a" * 16] * 2 + ["b" * 16] * 2):
        c.set_tag(rid, T.TAG_DATA, data)
    res = A.aggregate(uri, None, tmp_path / "results", figures=False)
    cell = res.table1.set_index(["method", "dataset", "mode"]).loc[("LL-R", "digits", "end-to-end")]
    assert cell["n"] == 2 and cell["mean"] == pytest.approx(31.0) and cell["data"] == "b" * 16
    [note] = [n for n in res.notes if n.startswith("LL-R")]
    assert f"trained on 2 different data ({'a' * 16}, {'b' * 16}) in 'mixed', never averaged together" in note
    text = (tmp_path / "results" / "table1.md").read_text()
    assert "never averaged together" in text
    csv = (tmp_path / "results" / "table1.csv").read_text().splitlines()
    assert csv[0].endswith(",data") and any(line.startswith("LL-R,digits,") and line.endswith("b" * 16)
                                            for line in csv)
    sweeps = res.sweeps.set_index("scheme")
    assert sweeps.loc["LL-R", "data"] == f"{'a' * 16}, {'b' * 16}"


@pytest.mark.slow
@pytest.mark.service
@pytest.mark.timeout(900)
def test_warm_start_on_a_set_with_other_labels_trains_again(tmp_path, ray_address):
    """The issue's commands: a sweep on --data-root A, then one on B (the same images and data set name,
    other labels) with --warm-start auto. B trains its trial instead of reporting A's as its best."""
    a = make_prepared(tmp_path, 12, 6)
    labels = np.load(a / "formatted_train_labels.npy")
    b = relabel(a, tmp_path / "b", train_labels=np.ones_like(labels))
    space = pascal_space(tmp_path / "space.yaml")
    args = ["--dataset", "pascal", "--space", str(space), "--address", ray_address]
    ra = run_cli([*args, "--data-root", str(a), "--name", "a"], cwd=tmp_path)
    assert ra.returncode == 0, ra.stdout[-3000:] + ra.stderr[-3000:]
    rb = run_cli([*args, "--data-root", str(b), "--name", "b", "--warm-start", "auto"], cwd=tmp_path)
    assert rb.returncode == 0, rb.stdout[-3000:] + rb.stderr[-3000:]
    assert "warm start: 0 configuration(s) from a told to the searchers before they propose (left out: 1 trained " \
           "on other data)" in rb.stdout, rb.stdout
    assert re.search(r"sweep b: 1 trials \(0 failed\), 2 epochs trained", rb.stdout), rb.stdout
    assert "proposal(s) were configurations already trained" not in rb.stdout

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = {name: mlflow_runs(uri, name) for name in ("a", "b")}
    data = {}
    for name, by_role in runs.items():
        [parent], [trial] = by_role["sweep"], by_role["trial"]
        data[name] = trial.data.tags[T.TAG_DATA]
        assert trial.data.params[T.PARAM_DATA] == parent.data.params[T.PARAM_DATA] == data[name]
        [ray_trial] = ray_trials(tmp_path / "ray_results" / name).values()
        assert ray_trial["config"]["wsml_data"] == data[name]
    assert data["a"] != data["b"]
    record = (tmp_path / "ray_results" / "b" / "wsml_sweep.json").read_text()
    assert f'"data_id": "{data["b"]}"' in record


# =================================================================== 2. no credential is written anywhere
def test_redact_masks_every_credential_form():
    from orchestration.common import has_secret, redact

    cases = {
        "http://user:p@ss@host/x": "http://***@host/x",                       # '@' in the password
        "s3://KEY:SEC/RET@127.0.0.1:1/bucket?scheme=http": "s3://***@127.0.0.1:1/bucket?scheme=http",  # '/'
        "Ray results and checkpoints: s3://AK:a/b/c@bucket/sw": "Ray results and checkpoints: s3://***@bucket/sw",
        "https://acct.blob.core.windows.net/c/b?sv=2022-11-02&sp=r&sig=abc%2Fdef%3D":
            "https://acct.blob.core.windows.net/c/b?sv=2022-11-02&sp=r&sig=***",
        "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F20240101&X-Amz-Date=1&X-Amz-Signature=beef":
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Date=1&X-Amz-Signature=***",
        "env AWS_SECRET_ACCESS_KEY=wJal/rXUt+nFEMI K=v": "env AWS_SECRET_ACCESS_KEY=*** K=v",
        "{'env_vars': {'AWS_SECRET_ACCESS_KEY': 'wJal/rXU', 'PL_DISABLE_FORK': '1'}}":
            "{'env_vars': {'AWS_SECRET_ACCESS_KEY': '***', 'PL_DISABLE_FORK': '1'}}",
        "MLFLOW_TRACKING_PASSWORD=pw": "MLFLOW_TRACKING_PASSWORD=***",
        # nothing to mask: left as it is
        "http://127.0.0.1:5000/#/experiments/1": "http://127.0.0.1:5000/#/experiments/1",
        "https://registry.example/@scope/pkg": "https://registry.example/@scope/pkg",
        "s3://bucket/sweeps?region=eu-west-1": "s3://bucket/sweeps?region=eu-west-1",
    }
    for text, masked in cases.items():
        assert redact(text) == masked, text
        assert has_secret(text) == (masked != text)
        assert redact(masked) == masked


@pytest.mark.parametrize("storage", [
    "s3://KEY:SEC/RET@127.0.0.1:1/bucket?scheme=http&endpoint_override=127.0.0.1:1",
    "s3://bucket/sweeps?access_key=KEY&secret_key=SEC/RET",
    "abfs://container@acct.dfs.core.windows.net/sweeps?sig=SEC/RET",
])
def test_storage_with_credentials_is_refused_before_anything_is_made(tmp_path, monkeypatch, capsys, storage):
    from orchestration import sweep

    monkeypatch.chdir(tmp_path)
    rc = sweep.main(["--dataset", "digits", "--storage", storage, "--mlflow-uri", f"sqlite:///{tmp_path}/m.db"])
    out = capsys.readouterr()
    assert rc == 2 and out.out == "" and "SEC/RET" not in out.err
    [line] = out.err.splitlines()
    assert line.startswith("error: --storage ") and "carries credentials" in line
    assert "instance profile" in line and "AWS_SECRET_ACCESS_KEY" in line
    assert list(tmp_path.iterdir()) == []


def test_mlflow_credentials_go_to_mlflows_environment_not_into_the_uri(tmp_path, monkeypatch):
    """The URI the sweep keeps (record, pickled callbacks and searcher) has no password; the health check and
    MLflow's client send it from MLflow's own basic-auth variables."""
    from orchestration.tracking import store
    from orchestration.search.known import ReuseMarker

    for name in (store.USERNAME_ENV, store.PASSWORD_ENV):
        monkeypatch.delenv(name, raising=False)
    seen = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        plain = store.credentials_to_env(f"http://alice:p%40ss/w@127.0.0.1:{port}")
        assert plain == f"http://127.0.0.1:{port}"
        assert (os.environ[store.USERNAME_ENV], os.environ[store.PASSWORD_ENV]) == ("alice", "p@ss/w")
        store.check_uri(plain)
    finally:
        server.shutdown()
    assert seen == ["Basic " + base64.b64encode(b"alice:p@ss/w").decode()]
    import pickle

    assert b"p@ss" not in pickle.dumps(ReuseMarker(plain, "sw", "1", "r"))
    assert store.credentials_to_env("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_tune_hands_no_cloud_secret_of_the_driver_to_the_trials(monkeypatch):
    """Ray Tune copies AWS_* of the driver's environment into each trainable's runtime env, which Ray logs."""
    from ray.tune.execution import class_cache

    from orchestration.run import private

    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", class_cache.ENV_VARS_TO_PROPAGATE)   # restored after
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SEC/RET")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAKEY")
    for name in ("AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    assert private.keep_cloud_secrets_from_trials() == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]

    class Trainable:
        pass

    remote = class_cache._ActorClassCache().get(Trainable)
    env_vars = remote._default_options["runtime_env"]["env_vars"]
    assert "PL_DISABLE_FORK" in env_vars and not set(private.CLOUD_SECRETS) & set(env_vars)


def _files_holding(folder: Path, secrets: list[bytes]) -> list[str]:
    found = []
    for p in folder.rglob("*"):
        try:
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
        except OSError:
            continue
        if any(s in data or s.hex().encode() in data for s in secrets):
            found.append(str(p))
    return found


@pytest.mark.slow
@pytest.mark.service
def test_storage_credentials_appear_in_no_output_or_file(tmp_path):
    """The issue's command, with a secret holding '/': refused in one line; the secret is in no output and in
    no file under the working folder or the folders Ray and Python would use for temporary files."""
    scratch = Path(tempfile.mkdtemp(prefix="wsml", dir="/tmp"))    # short: Ray's socket paths must fit
    try:
        r = run_cli(["--dataset", "digits", "--storage", "s3://KEY:SEC/RET@127.0.0.1:1/bucket?scheme=http",
                     "--name", "leak"], cwd=tmp_path, timeout=300, RAY_TMPDIR=str(scratch), TMPDIR=str(scratch))
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stdout == "" and r.stderr.splitlines() == [
            "error: --storage s3://***@127.0.0.1:1/bucket?scheme=http carries credentials, which Ray would write "
            "into the experiment's files and logs: remove them from the URI and give them as the cloud's own "
            "settings (an instance profile, ~/.aws/credentials, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "in the environment of every node)"]
        assert _files_holding(tmp_path, [b"SEC/RET"]) == [] and _files_holding(scratch, [b"SEC/RET"]) == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.service
@pytest.mark.timeout(900)
def test_a_sweep_writes_no_cloud_secret_of_its_environment_anywhere(tmp_path):
    """A whole sweep (Ray in-process, its session folder in a folder of the test's) with AWS credentials in its
    environment: the secret is in no output, no file of the sweep and no file of Ray's session folder."""
    scratch = Path(tempfile.mkdtemp(prefix="wsml", dir="/tmp"))
    secret, key_id = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRET", "AKIAWSMLTESTKEY00001"
    try:
        space = write_space(tmp_path / "space.yaml", num_samples=1, epochs=2, schemes="[LL-R]", train_images=100)
        r = run_cli(["--dataset", "digits", "--space", str(space), "--name", "env", "--final-seeds", "0"],
                    cwd=tmp_path, timeout=600, RAY_TMPDIR=str(scratch), AWS_SECRET_ACCESS_KEY=secret,
                    AWS_ACCESS_KEY_ID=key_id)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert (tmp_path / "ray_results" / "env" / "tuner.pkl").is_file()
        assert list(scratch.glob("ray/session_*/logs")), "Ray's session folder is not where the test looks"
        assert secret not in r.stdout + r.stderr
        assert _files_holding(tmp_path, [secret.encode()]) == []
        assert _files_holding(scratch, [secret.encode(), key_id.encode()]) == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# =================================================================== 3. --skip-bad-images never trains on blank data
def _many(tmp_path: Path, n_train: int = 150) -> Path:
    """A prepared set of `n_train` + 6 images in which class 'c' has one positive, training image 5."""
    from wsml.data.formats import write_formatted

    images = tmp_path / "images"
    names = {"train": [f"tr/{i:03d}.jpg" for i in range(n_train)], "val": [f"va/{i:03d}.jpg" for i in range(6)]}
    for split, files in names.items():
        for i, name in enumerate(files):
            write_jpeg(images / name, seed=i + (1000 if split == "val" else 0))
    train = np.zeros((n_train, 3), dtype=np.int8)
    train[:, 0] = 1
    train[1::2, 1] = 1
    train[5] = [0, 0, 1]
    val = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]] * 2, dtype=np.int8)
    write_formatted(tmp_path / "data", dataset="pascal", class_names=["a", "b", "c"], image_root=images,
                    train_images=names["train"], train_labels=train, val_images=names["val"], val_labels=val)
    return tmp_path / "data"


def test_skip_bad_images_within_the_threshold_trains(tmp_path):
    from wsml.data.loading import load_data
    from wsml.data.protocol import split_train_val

    data = _many(tmp_path)
    training = split_train_val(150, 0.2, 1200)[0]
    assert 5 in training and 8 in training
    (tmp_path / "images" / "tr" / "008.jpg").write_text("not an image\n")       # 1 of 120 training images
    loaded = load_data(small_cfg(data, tmp_path, skip_bad_images=True))
    assert loaded.bad_images == 1 and len(loaded.train.labels) == 120


def test_skip_bad_images_refuses_a_class_left_without_positives(tmp_path):
    from wsml.data.loading import load_data
    from wsml.errors import TooManySkipped

    data = _many(tmp_path)
    (tmp_path / "images" / "tr" / "005.jpg").write_text("not an image\n")       # the only image of class c
    with pytest.raises(TooManySkipped) as err:
        load_data(small_cfg(data, tmp_path, skip_bad_images=True))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("--skip-bad-images skipped every training image with an observed positive of "
                              f"class 'c', e.g. {tmp_path / 'images' / 'tr' / '005.jpg'}: check that the images "
                              f"are in {tmp_path / 'images'} (image_root in {data / 'meta.json'})")


def test_skip_bad_images_refuses_more_than_one_percent_of_a_split(tmp_path):
    from wsml.data.loading import load_data
    from wsml.errors import TooManySkipped

    data = make_prepared(tmp_path, 12, 6)
    (tmp_path / "images" / "va" / "002.jpg").write_text("not an image\n")       # 1 of 6 test images
    with pytest.raises(TooManySkipped, match=r"^--skip-bad-images skipped 1 of 6 test images as unreadable \(more "
                                             r"than 1 %\), e\.g\. .*va/002\.jpg: check that the images are in "):
        load_data(small_cfg(data, tmp_path, skip_bad_images=True))


def test_a_sweep_on_a_wrong_image_root_fails_before_anything_is_made(tmp_path, monkeypatch, capsys):
    from orchestration import sweep

    data = make_prepared(tmp_path / "set", 12, 6)
    (tmp_path / "set" / "images").rename(tmp_path / "set" / "moved")           # meta.json's image_root: gone
    monkeypatch.chdir(tmp_path)
    rc = sweep.main(["--dataset", "pascal", "--space", str(pascal_space(tmp_path / "space.yaml", skip_bad=True)),
                     "--data-root", str(data), "--storage", str(tmp_path / "ray_results"),
                     "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    out = capsys.readouterr()
    assert rc == 2, out
    [line] = out.err.splitlines()
    assert line.startswith("error: 12 of 12 images checked of formatted_train_images.npy do not exist (more than "
                           f"1 %), e.g. {tmp_path / 'set' / 'images' / 'tr' / '000.jpg'}: check that the images "
                           f"are in {tmp_path / 'set' / 'images'} (image_root in {data / 'meta.json'})"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set", "space.yaml"]


@pytest.mark.slow
@pytest.mark.service
def test_trainer_on_a_wrong_image_root_with_skip_bad_images_fails_in_one_line(tmp_path):
    """The issue's command: `python -m wsml.train --skip-bad-images` where the images are not: every image would
    be skipped. It fails with one `error:` line naming the problem and the fix, writes no --out."""
    import subprocess
    import sys

    data = make_prepared(tmp_path, 12, 6)
    (tmp_path / "images").rename(tmp_path / "elsewhere")
    r = subprocess.run([sys.executable, "-m", "wsml.train", "--dataset", "pascal", "--data-root", str(data),
                        "--arch", "smallcnn", "--weights", "none", "--image-size", "16", "--batch-size", "4",
                        "--epochs", "1", "--device", "cpu", "--num-workers", "0", "--max-train-images", "100",
                        "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--skip-bad-images"],
                       cwd=tmp_path, capture_output=True, text=True, env=clean_env(), timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == r.stderr.splitlines()[-1:] and "Traceback" not in r.stderr, r.stderr
    assert errors[0].startswith("error: --skip-bad-images skipped 10 of 10 training images as unreadable (more than "
                                "1 %)"), errors
    assert f"check that the images are in {tmp_path / 'images'} (image_root in {data / 'meta.json'})" in errors[0]
    assert "test mAP" not in r.stdout and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.service
def test_a_set_up_that_fails_leaves_the_sweeps_name_free(tmp_path):
    """Issue 30, finding 7: the image cache fails to build (here: too many undecodable images for
    --skip-bad-images, found while the driver builds the compact cache). Nothing of the sweep persists:
    no MLflow run under its name, no sweep folder, so the same command runs once the images are fixed
    (before, it said "already holds this sweep's run: pass --resume" and --resume "nothing to resume").
    A process of its own: its Ray starts and stops in the driver, never in the test's process (where the
    session's Ray cluster lives)."""
    data = make_prepared(tmp_path / "set", 12, 6)
    for name in ("000.jpg", "001.jpg"):                    # 2 of 12 training images: not JPEGs at all
        (tmp_path / "set" / "images" / "tr" / name).write_bytes(b"not an image")
    space = pascal_space(tmp_path / "space.yaml", skip_bad=True)
    space.write_text(space.read_text().replace("skip_bad_images: true", "skip_bad_images: true, image_cache: compact"))
    r = run_cli(["--dataset", "pascal", "--space", str(space), "--data-root", str(data), "--name", "s7",
                 "--storage", str(tmp_path / "ray_results"), "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                cwd=tmp_path)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "--skip-bad-images skipped 2 of 10 training images" in errors[0], \
        r.stdout[-2000:] + r.stderr[-2000:]
    assert not (tmp_path / "ray_results" / "s7").exists()
    if (tmp_path / "mlflow.db").exists():
        from mlflow import MlflowClient

        c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        exp = c.get_experiment_by_name("s7")
        assert exp is None or not c.search_runs([exp.experiment_id]), "the failed set-up left an MLflow run"
