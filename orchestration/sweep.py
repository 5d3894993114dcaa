#!/usr/bin/env python
"""Sweep the large-loss trainer with Ray Tune, Optuna, ASHA and MLflow.

    python orchestration/sweep.py --dataset digits                # Ray in-process, MLflow in ./mlflow.db
    python orchestration/sweep.py --dataset cub --address auto    # join the running cluster (on its head)
    python orchestration/sweep.py --dataset digits --name N --resume   # continue an interrupted sweep

A sweep is one `tune.Tuner`: `OptunaSearch` (seeded TPE; the paper's default
configurations first) proposes scheme / mode / delta_rel / lr from
`search_spaces/<dataset>.yaml`, `ASHAScheduler` stops weak trials on
validation mAP with the epoch as time, and every trial (a `wsml.train.run`,
see `orchestration/trainable.py`) checkpoints each epoch, so failed trials and
`--resume` continue where they were. Each trial is a nested MLflow run of the
sweep's run (`orchestration/mlflow_log.py`). Then each scheme's best
configuration is rerun with `--final-seeds` seeds (`orchestration/final.py`),
the best configurations are printed, and `orchestration/aggregate.py` writes
the tables.

Every input is checked before anything is created: a bad option, space file,
data set, storage folder, MLflow URI or Ray address prints one line
`error: ...` on stderr and exits with status 2, leaving no sweep folder and no
MLflow run behind.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:       # run as a script: make `wsml` and `orchestration` importable
    sys.path.insert(0, str(ROOT))

from orchestration import tracking as T  # noqa: E402
from orchestration.final import FINAL_SUFFIX  # noqa: E402
from orchestration.mlflow_log import TrackingError  # noqa: E402
from orchestration.space import SpaceError, SweepSpace, load_space, with_overrides  # noqa: E402
from wsml.config import DATASETS, LL_SCHEMES, SCHEMES  # noqa: E402
from wsml.errors import WSMLError  # noqa: E402

RECORD = "wsml_sweep.json"      # the sweep's settings, beside Ray's experiment state
METRIC, MODE = "val_map", "max"


class SweepError(Exception):
    """Bad input to the sweep (one-line message)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + error
        raise SweepError(f"{message} (see --help)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="orchestration/sweep.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--space", help="search-space YAML (default search_spaces/<dataset>.yaml)")
    p.add_argument("--address", help="Ray cluster to join: auto or host:port (default: start Ray in-process; "
                                     "$RAY_ADDRESS is honoured)")
    p.add_argument("--num-samples", type=int, help="trials to run (default: the space file's num_samples)")
    p.add_argument("--epochs", type=int, help="epochs per trial, ASHA's max_t (default: the space file's)")
    p.add_argument("--name", help="sweep name: Ray experiment folder and MLflow experiment "
                                  "(default <dataset>-<YYYYmmdd-HHMMSS>; with --resume: the latest sweep of the data set)")
    p.add_argument("--storage", default="ray_results",
                   help="where Ray keeps results and checkpoints: a folder (default ./ray_results) or a "
                        "bucket URI; on a multi-node cluster a path every node shares")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: MLflow's default, sqlite mlflow.db "
                                        "in the working directory, or $MLFLOW_TRACKING_URI)")
    p.add_argument("--resume", action="store_true", help="continue the sweep --name (or the latest one)")
    p.add_argument("--max-failures", type=int, help="retries of a failed trial from its last checkpoint")
    p.add_argument("--cpus-per-trial", type=float)
    p.add_argument("--gpus-per-trial", type=float, help="a fraction (0.5) packs trials on a GPU; "
                                                        "ignored where the cluster has no GPU")
    p.add_argument("--final-seeds", type=int, help="seeds of the final reruns of each scheme's best "
                                                   "configuration (0 skips the final stage)")
    p.add_argument("--schemes", help=f"comma list replacing the space's schemes, from {','.join(SCHEMES)}")
    p.add_argument("--search-seed", type=int, help="seed of Optuna's TPE sampler")
    p.add_argument("--data-root", help="data set folder (default data/<dataset>; unused for digits)")
    p.add_argument("--results-dir", default="results", help="where the aggregated tables go (default results)")
    return p.parse_args(argv)


# ------------------------------------------------------------------ checks
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


def is_uri(path: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path))


def resolve_storage(storage: str) -> str:
    if is_uri(storage):
        return storage.rstrip("/")
    p = Path(storage).expanduser().resolve()
    base = p
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise SweepError(f"--storage {storage}: {base} is not a writable folder: pass a folder you can write to")
    return str(p)


def _fs(storage: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(storage)


def _exists(storage: str, rel: str) -> bool:
    import pyarrow.fs

    fs, base = _fs(storage)
    return fs.get_file_info(f"{base}/{rel}").type != pyarrow.fs.FileType.NotFound


def read_record(storage: str, name: str) -> dict | None:
    fs, base = _fs(storage)
    try:
        with fs.open_input_stream(f"{base}/{name}/{RECORD}") as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError, ValueError):
        return None


def write_record(storage: str, name: str, record: dict) -> None:
    fs, base = _fs(storage)
    fs.create_dir(f"{base}/{name}", recursive=True)
    with fs.open_output_stream(f"{base}/{name}/{RECORD}") as f:
        f.write(json.dumps(record, indent=2).encode())


def find_resumable(storage: str, dataset: str, name: str | None) -> tuple[str, dict]:
    from ray import tune

    if name is None:
        import pyarrow.fs

        fs, base = _fs(storage)
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
        except OSError:
            infos = []
        candidates = []
        for info in infos:
            n = info.base_name
            if info.type == pyarrow.fs.FileType.Directory and not n.endswith(FINAL_SUFFIX):
                rec = read_record(storage, n)
                if rec is not None and rec.get("dataset") == dataset:
                    candidates.append((rec.get("created", ""), n, rec))
        if not candidates:
            raise SweepError(f"nothing to resume: no sweep of {dataset} in {storage}: start one without --resume")
        _, name, record = max(candidates)
    else:
        record = read_record(storage, name)
        if record is None or not tune.Tuner.can_restore(f"{storage}/{name}"):
            raise SweepError(f"nothing to resume: no sweep {name!r} in {storage}: check --name and --storage, "
                             "or start it without --resume")
    if record.get("dataset") != dataset:
        raise SweepError(f"sweep {name!r} is a sweep of {record.get('dataset')!r}, not {dataset!r}: "
                         f"pass --dataset {record.get('dataset')}")
    return name, record


def check_data_root(dataset: str, data_root: str | None, remote: bool) -> str | None:
    if dataset == "digits":
        return None
    path = Path(data_root or f"data/{dataset}").expanduser().resolve()
    if not path.is_dir():
        if remote:
            print(f"note: data set folder {path} is not on this machine; the trials look for it on their nodes")
        else:
            raise SweepError(f"data set {dataset} not found at {path}: prepare it (see DESIGN section 4) "
                             "or pass --data-root")
    return str(path)


def resolve_address(address: str | None) -> str | None:
    """None = start Ray in-process; else a reachable host:port (checked with a short TCP connect)."""
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or None
        if address is None:
            return None
    if address == "local":
        return None
    if address.startswith("ray://"):
        raise SweepError(f"--address {address}: Ray Client addresses are not supported; run the sweep on the "
                         "cluster's head (--address auto) or give the GCS host:port")
    if address == "auto":
        from ray._private import services

        try:
            found = services.canonicalize_bootstrap_address_or_die("auto")
        except Exception:  # noqa: BLE001 - ConnectionError and friends
            raise SweepError("--address auto: no running Ray cluster found on this machine: start one "
                             "(ray start --head / ray up) or give host:port") from None
        address = found
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


def _check_ray_gcs(host: str, port: int, timeout: float = 5.0) -> None:
    """Ask the address for its Ray cluster id, as `ray.init` does first.

    `ray.init` retries an address that is not a Ray head (a web server, an
    SSH port) for minutes; one gRPC call with a deadline tells in a second.
    """
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout)
    except grpc.RpcError as err:
        detail = (err.details() or err.code().name).split(" (")[0].strip()
        raise SweepError(f"{host}:{port} is not a Ray cluster's head (GCS) port ({err.code().name}: "
                         f"{detail[:120]}): give the address `ray start --head` printed (port 6379 by "
                         "default) or --address auto on the head") from None
    finally:
        channel.close()


# --------------------------------------------------------------------- Ray
def connect_ray(address: str | None) -> bool:
    """Connect to (or start) Ray; returns True when this process started it (and must shut it down)."""
    import ray

    if ray.is_initialized():        # an embedding program (a test) already connected
        return False
    if address is None:
        # Workers inherit this environment: make the project importable there.
        paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        ray.init(address="local", include_dashboard=False)
    else:
        # Ship the two packages to every node (they need not be installed there).
        runtime_env = {"py_modules": [str(ROOT / "wsml"), str(ROOT / "orchestration")],
                       "excludes": ["__pycache__", "*.pyc"]}
        try:
            ray.init(address=address, runtime_env=runtime_env)
        except Exception as err:  # noqa: BLE001
            msg = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise SweepError(f"cannot join the Ray cluster at {address}: {msg}") from None
    return True


def trial_resources(space: SweepSpace, remote: bool) -> dict[str, float]:
    import ray

    cpu, gpu = space.resources.cpus_per_trial, space.resources.gpus_per_trial
    total_gpus = ray.cluster_resources().get("GPU", 0)
    if gpu > 0 and total_gpus == 0:
        if not remote:
            print(f"note: this machine has no GPU for Ray: trials run on CPUs (gpus_per_trial {gpu:g} -> 0)")
            gpu = 0.0
        else:
            # A cluster's GPU workers may not be up yet (the autoscaler starts them on demand).
            print(f"note: the Ray cluster has no GPU node yet: trials ask for {gpu:g} GPU each and wait for the "
                  "autoscaler (pass --gpus-per-trial 0 to train on CPUs)")
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(n.get("CPU", 0) >= cpu and n.get("GPU", 0) >= gpu for n in nodes):
        largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        msg = (f"no node of the Ray cluster has {cpu:g} CPUs and {gpu:g} GPUs free for one trial (largest node: "
               f"{largest.get('CPU', 0):g} CPUs, {largest.get('GPU', 0):g} GPUs): lower --cpus-per-trial / "
               "--gpus-per-trial")
        if not remote:
            raise SweepError(msg)
        print(f"note: {msg}; waiting for the autoscaler")
    return {"cpu": cpu, "gpu": gpu}


def progress_reporter(final: bool = False, with_delta_rel: bool = True):
    """Ray's CLIReporter with the columns a person follows.

    Baseline trials have no delta_rel, and Ray's "current best trial" line
    looks every parameter column up without a default, so the column is only
    shown when every searched scheme has one.
    """
    from ray.tune import CLIReporter

    prefix = "point/" if final else ""
    names = ["scheme"] + (["delta_rel"] if with_delta_rel else []) + ["lr"] + (["seed"] if final else [])
    params = {prefix + n: n for n in names}
    return CLIReporter(parameter_columns=params,
                       metric_columns={"epoch": "epoch", "val_map": "val_map", "best_val_map": "best"},
                       max_report_frequency=15, sort_by_metric=True)


# -------------------------------------------------------------------- misc
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip() if out.returncode == 0 else "none"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               timeout=5).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def space_from_record(record: dict) -> SweepSpace:
    from orchestration.space import _build

    d = dict(record["space"])
    source = d.pop("source", "<record>")
    s = _build(SweepSpace, d, "", source)
    s.source = source
    return s.validate()


def param_space(space: SweepSpace, name: str, data_root: str | None, cache_dir: str) -> dict[str, Any]:
    train = dict(space.train)
    train.setdefault("cache_dir", cache_dir)
    return {"dataset": space.dataset, "epochs": space.epochs, "seed": 0, "device": "auto",
            "data_root": data_root, "train": train, "wsml_sweep": name}


def sweep_params(space: SweepSpace, argv: list[str], path: str, address: str | None,
                 resources: dict) -> dict[str, str]:
    """The sweep run's MLflow params; credentials in the command line or URIs are masked."""
    from orchestration.mlflow_log import redact

    return {**space.summary(), "command": redact(" ".join(shlex.quote(a) for a in argv)),
            "git_commit": git_commit(), "storage": redact(path), "ray_address": address or "local",
            "resources": json.dumps(resources)}


def _first_line(err: BaseException) -> str:
    from orchestration.mlflow_log import redact

    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return redact(lines[0] if lines else type(err).__name__)


# -------------------------------------------------------------------- main
def run_sweep(args: argparse.Namespace, argv: list[str]) -> int:
    from orchestration import mlflow_log as M

    if args.dataset not in DATASETS:
        raise SweepError(f"unknown data set {args.dataset!r}: choose one of {', '.join(DATASETS)}")
    storage = resolve_storage(args.storage)
    remote_hint = args.address is not None or bool(os.environ.get("RAY_ADDRESS"))

    # 1. Everything is validated before anything is created.
    if args.resume:
        name, record = find_resumable(storage, args.dataset, args.name)
        space = space_from_record(record)
        if args.final_seeds is not None:
            space = with_overrides(space, final_seeds=args.final_seeds)
        uri = record["mlflow_uri"]
        if args.mlflow_uri and M.absolute_uri(args.mlflow_uri) != uri:
            print(f"note: --resume keeps the sweep's MLflow store {M.redact(uri)} (--mlflow-uri ignored)")
        data_root = record.get("data_root")
        resources = record["resources"]
    else:
        schemes = parse_schemes(args.schemes)
        space = load_space(args.dataset, args.space)
        space = with_overrides(space, num_samples=args.num_samples, epochs=args.epochs,
                               cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                               final_seeds=args.final_seeds, max_failures=args.max_failures, schemes=schemes)
        if args.search_seed is not None:
            if args.search_seed < 0:
                raise SweepError(f"--search-seed {args.search_seed}: use an integer >= 0")
            space.search_seed = args.search_seed
        name = args.name or f"{args.dataset}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name.endswith(FINAL_SUFFIX):
            raise SweepError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (not ending in "
                             f"{FINAL_SUFFIX})")
        for n in (name, name + FINAL_SUFFIX):
            if _exists(storage, n):
                raise SweepError(f"sweep {n!r} already exists in {storage}: pass --resume to continue it or "
                                 "choose another --name")
        uri = M.absolute_uri(args.mlflow_uri) if args.mlflow_uri else M.default_tracking_uri()
        data_root = check_data_root(args.dataset, args.data_root, remote_hint)
        resources = None
    M.check_tracking_uri(uri)
    if not args.resume:
        _check_no_parent(uri, name)
    address = resolve_address(args.address)
    remote = address is not None
    # decoded images / features, once per node (same path on every node of a `ray up` cluster)
    cache_dir = str(Path(".cache").resolve())

    # 2. Ray, MLflow, the sweep folder.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")       # use the CLIReporter below
    # Tune snapshots the experiment state whenever a trial has made num_to_keep
    # checkpoints; with epochs of seconds (digits) it warns about that: quiet.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray

    started = connect_ray(address)
    try:
        if resources is None:
            resources = trial_resources(space, remote)
        c = M.client(uri)
        params = sweep_params(space, argv, f"{storage}/{name}", address, resources)
        experiment_id, parent_id = M.start_parent(c, name, space.dataset, params, resume=args.resume)
        status = "FAILED"
        try:
            if not args.resume:
                record = {"dataset": space.dataset, "name": name, "space": space.to_dict(), "mlflow_uri": uri,
                          "experiment_id": experiment_id, "parent_run_id": parent_id, "resources": resources,
                          "data_root": data_root, "cache_dir": cache_dir, "command": params["command"],
                          "created": _dt.datetime.now().isoformat(timespec="seconds")}
            interrupted = _search_and_final(args, space, name, storage, record, resources, uri,
                                            experiment_id, parent_id)
            status = "KILLED" if interrupted else "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            try:
                M.end_parent(c, parent_id, status)
            except Exception as err:  # noqa: BLE001
                print(f"warning: could not end the sweep's MLflow run: {_first_line(err)}", file=sys.stderr)
    finally:
        if started:
            ray.shutdown()
    if interrupted:
        print(f"\ninterrupted: continue with  python orchestration/sweep.py --dataset {space.dataset} "
              f"--name {name} --storage {M.redact(storage)} --resume")
        return 130
    _aggregate(uri, name, args.results_dir)
    return 0


def _check_no_parent(uri: str, name: str) -> None:
    """Refuse a name whose MLflow experiment already holds a sweep run (without creating a store)."""
    from orchestration import mlflow_log as M

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return          # no store yet, so no such run
    try:
        c = M.client(uri)
        eid = M.find_experiment_id(c, name)
        if eid is not None and M.find_parent(c, eid, name) is not None:
            raise SweepError(f"MLflow experiment {name!r} in {M.redact(uri)} already holds a sweep: pass --resume "
                             "to continue it or choose another --name")
    except (SweepError, TrackingError):
        raise
    except Exception as err:  # noqa: BLE001
        raise TrackingError(f"cannot read MLflow store {M.redact(uri)}: {_first_line(err)}") from None


def search_and_scheduler(space: SweepSpace):
    """The sweep's searcher and scheduler: seeded Optuna TPE over the space (its start points
    first) and ASHA on validation mAP with the epoch as time (also used by bench/sweep.py)."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from orchestration.space import OptunaSpace

    searcher = OptunaSearch(space=OptunaSpace.of(space), metric=METRIC, mode=MODE,
                            points_to_evaluate=space.start_points() or None, seed=space.search_seed)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=space.epochs, grace_period=space.scheduler.grace_period,
                              reduction_factor=space.scheduler.reduction_factor)
    return searcher, scheduler


def _search_and_final(args, space: SweepSpace, name: str, storage: str, record: dict, resources: dict,
                      uri: str, experiment_id: str, parent_id: str) -> bool:
    """Run the search and the final stage; print the summary. Returns True when interrupted."""
    import pandas as pd
    from ray import tune

    from orchestration import final as F
    from orchestration import mlflow_log as M
    from orchestration.trainable import train_trial, trial_dirname

    trainable = tune.with_resources(train_trial, resources)
    path = f"{storage}/{name}"
    base_space = param_space(space, name, record.get("data_root"), record.get("cache_dir", ".cache"))
    only_ll = all(scheme in LL_SCHEMES for scheme in space.search.scheme)
    M.EXPERIMENT_INTERRUPTED.clear()
    if args.resume:
        print(f"resuming sweep {name} from {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        searcher, scheduler = search_and_scheduler(space)
        logger = M.MLflowTrialLogger(uri, experiment_id, parent_id, name, space.dataset, T.ROLE_TRIAL, space.epochs)
        tuner = tune.Tuner(
            trainable, param_space=base_space,
            tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
                                        num_samples=space.num_samples, reuse_actors=True,
                                        trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(
                name=name, storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=space.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=space.keep_checkpoints),
                callbacks=[logger], progress_reporter=progress_reporter(with_delta_rel=only_ll), verbose=1))
        # beside Ray's tuner.pkl (written just now): what --resume needs besides Ray's state
        write_record(storage, name, record)
    results = tuner.fit()
    # interrupted (Ctrl-C): trials left unfinished, or the searcher had more to propose
    if M.EXPERIMENT_INTERRUPTED.get((name, T.ROLE_TRIAL)) or len(results) < space.num_samples:
        return True

    rows = F.result_rows(results)
    best = F.best_per_scheme(rows)
    final_rows = None
    if space.final_seeds > 0 and not best.empty:
        points = F.final_points(best, space.final_seeds)
        print(f"\nfinal stage: {len(best)} configuration(s) x {space.final_seeds} seed(s), {space.epochs} epochs")
        logger = M.MLflowTrialLogger(uri, experiment_id, parent_id, name, space.dataset, T.ROLE_FINAL, space.epochs)
        final_results = F.run_final(name=name, storage=storage, trainable=trainable, param_space=base_space,
                                    points=points, callback=logger, reporter=progress_reporter(final=True, with_delta_rel=only_ll),
                                    max_failures=space.max_failures, keep_checkpoints=space.keep_checkpoints,
                                    resume=args.resume)
        if M.EXPERIMENT_INTERRUPTED.get((name, T.ROLE_FINAL)) or len(final_results) < len(points):
            return True
        final_rows = F.result_rows(final_results)

    with pd.option_context("display.width", 160, "display.max_columns", 20):
        failed = rows[rows["error"] != ""]
        print(f"\nsweep {name}: {len(rows)} trials ({len(failed)} failed)")
        if best.empty:
            print("no trial finished an epoch: nothing to report")
        else:
            shown = best[["scheme", "mode", "delta_rel", "lr", "best_val_map", "best_epoch", "test_map",
                          "epochs_run", "trial_id"]]
            print("best configuration per scheme (by validation mAP; test mAP at the best validation epoch):")
            print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        if final_rows is not None:
            summary = F.summarize_final(final_rows)
            print(f"\nfinal runs ({space.final_seeds} seeds each), test mAP:")
            print(summary.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"\nRay results and checkpoints: {path}")
    print(f"MLflow store: {M.redact(uri)} (experiment {name!r})")
    print(f"  open it with: {M.ui_command(uri)}")
    return False


def _aggregate(uri: str, name: str, out_dir: str) -> None:
    try:
        from orchestration.aggregate import aggregate
    except ModuleNotFoundError as err:
        if err.name == "orchestration.aggregate":
            print("note: orchestration/aggregate.py is not there yet: tables not written")
            return
        raise
    try:
        res = aggregate(uri, None, out_dir)   # every sweep in the store: one Table 1
    except Exception as err:  # noqa: BLE001 - the sweep itself succeeded; say why the tables did not
        print(f"warning: aggregation failed: {_first_line(err)}", file=sys.stderr)
        return
    files = [str(p) for p in list(getattr(res, "files", [])) + list(getattr(res, "figures", []))]
    print(f"tables: {out_dir}/ ({len(files)} files)" if files else f"tables: {out_dir}/")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        return run_sweep(args, ["orchestration/sweep.py", *argv])
    except (SweepError, SpaceError, TrackingError, WSMLError) as err:
        print(f"error: {_first_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: continue with the same command and --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
