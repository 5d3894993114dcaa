"""Checks a sweep makes before it creates anything: names, folders, the Ray address, the MLflow store.

Each raises `SweepError` (or `TrackingError`) with one line naming the input
and the fix; none of them writes a file, creates an MLflow store or starts Ray.
"""
from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path

from wsml.config import DATASETS, SCHEMES
from wsml.files import writable_folder

from orchestration.run import private, record
from orchestration.tracking import store
from orchestration.common import FINAL_SUFFIX, SweepError, TrackingError, carries_credentials, first_line, redact

log = logging.getLogger(__name__)


def check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise SweepError(f"unknown data set {dataset!r}: choose one of {', '.join(DATASETS)}")


def parse_schemes(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise SweepError(f"--schemes {text!r} lists no scheme: give a comma list from {','.join(SCHEMES)}")
    for n in names:
        if n not in SCHEMES:
            raise SweepError(f"--schemes: unknown scheme {n!r}: choose from {','.join(SCHEMES)}")
    return list(dict.fromkeys(names))


MAX_NAME = 100      # the sweep's name becomes folder names (with suffixes) and an MLflow experiment name


def check_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name.endswith(FINAL_SUFFIX):
        raise SweepError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (not ending in {FINAL_SUFFIX})")
    if len(name) > MAX_NAME:
        raise SweepError(f"--name is {len(name)} characters long: use at most {MAX_NAME}")


def check_working_directory() -> None:
    """The working directory is there and its path is UTF-8: Ray hands the driver's path to its workers as
    UTF-8 text and fails on any other (a folder unpacked from an old Latin-1 archive)."""
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        raise SweepError("the working directory was deleted: cd to a folder that exists") from None
    try:
        cwd.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(cwd).decode("utf-8", "backslashreplace")
        raise SweepError(f"the working directory {shown} is not a UTF-8 path, which Ray cannot hand to its "
                         "workers: run the sweep from a folder whose path is UTF-8 (rename this one, or cd "
                         "elsewhere and pass --storage, --mlflow-uri and --results-dir)") from None


def check_ray_temp_dir() -> None:
    """A Ray started in-process keeps its session (sockets, logs) under `ray/` of $RAY_TMPDIR, else $TMPDIR,
    else /tmp (Ray's own choice, `ray._common.utils.get_default_system_temp_dir`): it must be writable."""
    for name in ("RAY_TMPDIR", "TMPDIR"):
        if name in os.environ:
            base, given = os.environ[name], f"{name}={os.environ[name]}"
            break
    else:
        base, given = "/tmp", "the default /tmp"
    folder = Path(base) / "ray"
    if writable_folder(folder) is None:
        raise SweepError(f"Ray's temporary folder {folder} cannot be written ({given} is read-only or missing): set "
                         "TMPDIR (or RAY_TMPDIR) to a writable folder, e.g. TMPDIR=/var/tmp")


def check_weights_cache(cfg) -> None:
    """Trials on this machine download ResNet-50's ImageNet weights into torch's cache ($TORCH_HOME, else
    ~/.cache/torch) once: where they are not there yet, that folder must be writable (a read-only HOME)."""
    if cfg.arch != "resnet50" or cfg.weights != "imagenet":
        return
    from wsml.model import imagenet_weights_file

    cached = imagenet_weights_file()
    if not cached.is_file() and writable_folder(cached.parent) is None:
        raise SweepError(f"ResNet-50's ImageNet weights {cached} are not there and that folder cannot be written "
                         "(a read-only HOME?): set TORCH_HOME to a writable folder (where they are, or where they "
                         "can be downloaded), or train with weights: none")


def check_results_dir(results_dir: str) -> None:
    path = Path(results_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise SweepError(f"--results-dir {results_dir} is a file: pass a folder for the tables")
    if writable_folder(path.resolve()) is None:
        raise SweepError(f"--results-dir {results_dir}: no file can be written there: pass a folder you can write to")


def is_uri(path: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path))


def resolve_storage(storage: str) -> str:
    """An absolute storage folder whose nearest existing parent is writable, or a bucket URI without
    credentials.

    Credentials in the URI (`s3://KEY:SECRET@bucket`, `?secret_key=`, `?sig=`) are refused: Ray
    would keep the URI, or a file-system object made from it, in the experiment's own files
    (`tuner.pkl` and the experiment state pickle their storage) and hand it to every trial, so
    the secret would sit in the bucket and on every node. The cloud's own ways do not: an
    instance profile, ~/.aws/credentials, or its environment variables (which
    `private.keep_cloud_secrets_from_trials` keeps out of Ray's logs).
    """
    if is_uri(storage):
        if carries_credentials(storage):
            raise SweepError(f"--storage {redact(storage)} carries credentials, which Ray would write into the "
                             "experiment's files and logs: remove them from the URI and give them as the cloud's "
                             "own settings (an instance profile, ~/.aws/credentials, or AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY in the environment of every node)")
        record.check_reachable(storage.rstrip("/"))
        return storage.rstrip("/")
    p = Path(storage).expanduser().resolve()
    if p.exists() and not p.is_dir():
        raise SweepError(f"--storage {storage} is a file: pass a folder you can write to")
    if writable_folder(p) is None:
        raise SweepError(f"--storage {storage}: no file can be written there: pass a folder you can write to")
    return str(p)


def data_root_path(dataset: str, data_root: str | None) -> str | None:
    """The data set's folder, absolute (None for the built-in digits), whether it exists or not."""
    if dataset == "digits":
        return None
    return str(_data_folder(dataset, data_root))


def _data_folder(dataset: str, data_root: str | None) -> Path:
    return Path(data_root or f"data/{dataset}").expanduser().resolve()


def check_data_root(dataset: str, data_root: str | None, remote: bool) -> str | None:
    """The data set's folder (None for the built-in digits); on a cluster it may live on the nodes only."""
    if dataset == "digits":
        return None
    path = _data_folder(dataset, data_root)
    if not path.is_dir():
        if remote:
            log.info(f"note: data set folder {path} is not on this machine; the trials look for it on their nodes")
        else:
            raise SweepError(f"data set {dataset} not found at {path}: prepare it (python -m wsml.data.prepare "
                             f"{dataset} --source RAW_DIR --dest {path}, see docs/data.md) or pass "
                             "--data-root")
    return str(path)


def data_identity(cfg) -> str | None:
    """The identity of the data a sweep's trials train on (`wsml.data.loading.data_id`, a `TrainConfig`
    of the sweep), once its images are checked to be where its meta.json says
    (`wsml.data.loading.check_image_files`); None where the data set is not on this machine (the
    trials look for it on their nodes). Reads the prepared .npy files, decodes no image."""
    from wsml.data.loading import check_image_files, data_id

    if cfg.dataset != "digits" and not Path(cfg.data_root).is_dir():
        return None
    check_image_files(cfg)
    return data_id(cfg)


def resolve_cache_dir(cache_dir: str | None, dataset: str, data_root: str | None, train: dict) -> str:
    """The trials' cache folder (decoded images, LinearInit features), absolute: the same path on every node.

    --cache-dir when given. Else, where the cluster files set them: a compact image cache in
    $WSML_SHARED_CACHE (shared storage: built once as Ray tasks, read by every node; 8x smaller
    than raw), a raw one (and digits) in $WSML_CACHE (each node's own fast disk: raw pixels are read
    again every epoch, which shared storage cannot feed). Without them, ./.cache.
    """
    if cache_dir:
        return str(Path(cache_dir).expanduser().resolve())
    shared, local = os.environ.get("WSML_SHARED_CACHE"), os.environ.get("WSML_CACHE")
    compact = _reads_compact(dataset, data_root, train)
    chosen = (shared or local) if compact is None else shared if compact else local
    return str(Path(chosen or ".cache").expanduser().resolve())


def _reads_compact(dataset: str, data_root: str | None, train: dict) -> bool | None:
    """Whether the sweep's trials read a compact image cache; None when the data set is not visible here."""
    from wsml.config import TrainConfig
    from wsml.data.formats import images_file, read_arrays
    from wsml.data.loading import image_cache_format

    if dataset == "digits":
        return False
    cfg = TrainConfig.from_dict({"dataset": dataset, **train}).resolve()
    if cfg.image_cache != "auto":
        return cfg.image_cache == "compact"
    if data_root is None or not Path(data_root).is_dir():
        return None
    try:
        arrays = read_arrays(Path(data_root))
        images = len(arrays[images_file("train")]) + len(arrays[images_file("val")])
    except Exception:  # noqa: BLE001 - the trials report a broken data set; here it only picks a folder
        return None
    return image_cache_format(cfg, images) == "compact"


def resolve_address(address: str | None) -> str | None:
    """None = start Ray in-process; else a reachable host:port of a Ray head ($RAY_ADDRESS is honoured).

    Without --address or $RAY_ADDRESS, a Ray cluster that `ray start` (so `ray up`, on the head) runs on
    this machine is joined, as `ray.init()` would: a sweep started on the head by `ray exec`, `ray
    submit` or by hand must use the cluster's GPU nodes, not start a Ray of its own on the head's CPUs.
    `--address local` starts one of its own all the same.
    """
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or None
        if address is None:
            return _ray_started_here()
    if address == "local":
        return None
    if address.startswith("ray://"):
        raise SweepError(f"--address {address}: Ray Client addresses are not supported; run the sweep on the "
                         "cluster's head (--address auto) or give the GCS host:port")
    if address == "auto":
        try:
            address = private.find_local_ray_address()
        except Exception:  # noqa: BLE001 - ConnectionError and friends
            raise SweepError("--address auto: no running Ray cluster found on this machine: start one "
                             "(ray start --head / ray up) or give host:port") from None
    m = re.match(r"^\[?([^\]]+?)\]?:(\d+)$", address)
    if not m:
        raise SweepError(f"--address {address!r} is not host:port or auto: e.g. --address 10.0.0.5:6379")
    host, port = m.group(1), int(m.group(2))
    try:
        with socket.create_connection((host, port), timeout=3):
            pass
    except OSError as err:
        raise SweepError(f"Ray cluster at {address} is unreachable ({err.strerror or err}): start it "
                         "or fix --address") from None
    _check_ray_gcs(host, port)
    return f"{host}:{port}"


def _ray_started_here() -> str | None:
    """The address of the Ray cluster `ray start` runs on this machine, None where none answers there (none
    started, or a stale record of one that has stopped)."""
    recorded = private.ray_started_here()
    m = re.match(r"^\[?([^\]]+?)\]?:(\d+)$", recorded or "")
    if not m:
        return None
    try:
        with socket.create_connection((m.group(1), int(m.group(2))), timeout=3):
            pass
        _check_ray_gcs(m.group(1), int(m.group(2)))
    except (OSError, SweepError):
        return None
    log.info(f"note: joining the Ray cluster started on this machine (ray start / ray up) at {recorded}; "
          "--address local starts a Ray of this sweep's own instead")
    return recorded


def _check_ray_gcs(host: str, port: int, timeout: float = 5.0) -> None:
    import grpc

    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        private.ask_gcs_cluster_id(target, timeout)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise SweepError(f"the Ray cluster at {host}:{port} wants its authentication token: set "
                             "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the token it was started with") from None
        detail = (err.details() or err.code().name).split(" (")[0].strip()
        raise SweepError(f"{host}:{port} is not a Ray cluster's head (GCS) port ({err.code().name}: "
                         f"{detail[:120]}): give the address `ray start --head` printed (port 6379 by "
                         "default) or --address auto on the head") from None


def _restore_lost_store(uri: str) -> None:
    """--resume of a sweep whose local SQLite store is gone (a head lost or replaced, its disk with it): put
    the copy the driver kept on shared storage back (`orchestration.tracking.store_copy`), or refuse, rather than
    continue into an empty store."""
    from orchestration.tracking import store_copy

    path = store.local_path(uri)
    if path is None or not uri.startswith("sqlite:") or path.exists():
        return
    folder = os.environ.get(store_copy.BACKUP_ENV)
    kept = Path(folder) / store_copy.DB if folder else None
    if kept is None or not kept.is_file():
        raise SweepError(f"the sweep's MLflow store {path} is gone and no copy of it is at "
                         f"${store_copy.BACKUP_ENV} ({folder or 'not set'}): put the store back, pass "
                         "--mlflow-uri with where it is now, or copy one with  python -m "
                         f"orchestration.tracking.store_copy BACKUP_FOLDER {path.parent}")
    copied = store_copy.copy_store(kept, path.parent)
    if copied != path:
        os.replace(copied, path)
    log.info(f"note: the sweep's MLflow store {path} was gone: restored from the copy at {kept.parent}")


def _check_holds(uri: str, name: str, experiment_id: str, run_id: str) -> None:
    try:
        run = store.client(uri).get_run(run_id)
        found = run.info.experiment_id == experiment_id
    except Exception as err:  # noqa: BLE001 - a run that is not there, or a store that cannot be read
        if store.is_transient(err):
            raise TrackingError(f"cannot read MLflow store {redact(uri)}: {first_line(err)}") from None
        found = False
    if not found:
        raise SweepError(f"MLflow store {redact(uri)} does not hold sweep {name}'s run ({run_id}): pass --mlflow-uri "
                         "with the store the sweep started in (its runs would be split over two stores)")


def check_store(uri: str, name: str, resume: bool, holds: tuple[str, str] | None = None) -> None:
    """The store can be used, and (for a new sweep) holds no sweep of that name; creates no store. `holds`
    (experiment id, run id): a continued sweep's store that is not the one its record names (moved, or
    given with --mlflow-uri) must hold its run, or the sweep would go on in a store of its own."""
    if resume:
        _restore_lost_store(uri)        # before check_uri: a store that is gone is told so, not "create its folder"
        store.check_uri(uri)
        if holds is not None:
            _check_holds(uri, name, *holds)
        return
    store.check_uri(uri)
    path = store.local_path(uri)
    if path is not None and not path.exists():
        return          # no store yet, so no such run
    try:
        c = store.client(uri)
        eid = store.find_experiment_id(c, name)
        if eid is not None and store.find_parent(c, eid, name) is not None:
            raise SweepError(f"MLflow experiment {name!r} in {redact(uri)} already holds a sweep: pass --resume to "
                             "continue it or choose another --name")
    except (SweepError, TrackingError):
        raise
    except Exception as err:  # noqa: BLE001
        raise TrackingError(f"cannot read MLflow store {redact(uri)}: {first_line(err)}") from None
