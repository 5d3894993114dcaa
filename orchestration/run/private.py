"""The private Ray APIs (and Ray's undocumented behaviour) this project relies on, each with the reason.

Private APIs change between releases without notice; keeping them here makes
an upgrade a one-file check (they were read against Ray 2.60's source).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def find_local_ray_address() -> str:
    """The address of the Ray cluster running on this machine (`--address auto`).

    `ray.init(address="auto")` finds it the same way but only after its own
    long retries; the sweep must say "no cluster here" within seconds, before
    anything is created. Raises ConnectionError (or another exception) when
    none runs.
    """
    from ray._private import services

    return services.canonicalize_bootstrap_address_or_die("auto")


def ask_gcs_cluster_id(target: str, timeout: float) -> None:
    """Ask a Ray head's GCS at `target` ("host:port") for its cluster id, as `ray.init` does first.

    `ray.init` retries an address that is not a Ray head (a web server, an SSH
    port) for minutes; one gRPC call with a deadline tells in a second. The
    GCS service stubs are generated code with no public wrapper, and the call
    carries Ray's token (`RAY_AUTH_MODE=token`, `RAY_AUTH_TOKEN`: Ray 2.60
    clusters ask for it by default) through Ray's own helper, as its clients
    do. Raises `grpc.RpcError` when the address does not answer as a GCS
    (UNAUTHENTICATED: a GCS that wants another token).
    """
    import grpc
    from ray._private.authentication.grpc_authentication_client_interceptor import (
        _get_authentication_metadata_tuple,
    )
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        # the generated module makes its message classes when imported: mypy cannot see them
        stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout,  # type: ignore[attr-defined]
                          metadata=_get_authentication_metadata_tuple())
    finally:
        channel.close()


def tuner_callbacks(tuner) -> list:
    """The callbacks of a Tuner made by `Tuner.restore`.

    Tune unpickles them from the experiment's folder and offers no public
    accessor; the driver needs the restored MLflow logger to end the runs of
    trials it interrupted and to deliver what the logger still holds.
    """
    return list(tuner._local_tuner.get_run_config().callbacks or [])


def drain_as_preempted_command(address: str, node_id: str | None, message: str, deadline_s: int) -> list[str]:
    """`ray drain-node` marking a node preempted (the spot watcher, orchestration/cluster/spot_watch.py).

    The command is hidden from `ray --help` and outside Ray's stability
    promise. What makes it worth it (Ray 2.60): an actor that dies on a node
    drained with DRAIN_NODE_REASON_PREEMPTION raises `RayActorError` with
    `preempted` set (`ray.exceptions.ActorDiedError`, from the node's death
    reason AUTOSCALER_DRAIN_PREEMPTED), and Tune does not count such an error
    against `max_failures` (`ray.tune.experiment.trial.Trial._handle_ray_actor_error`,
    unless RAY_TRAIN_COUNT_PREEMPTION_AS_FAILURE=1). Without `node_id` Ray
    drains the node the command runs on (it joins the cluster to ask).
    """
    import sys
    from pathlib import Path

    cmd = [str(Path(sys.executable).parent / "ray"), "drain-node", "--address", address,
           "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", message,
           "--deadline-remaining-seconds", str(deadline_s)]
    return cmd + (["--node-id", node_id] if node_id else [])


def set_tuner_output(tuner, reporter, callbacks: list) -> None:
    """Give a Tuner made by `Tuner.restore` another progress reporter and callbacks.

    Tune restores the RunConfig pickled when the sweep started, with the
    progress output of that driver (its clock, its --verbose); `fit` reads the
    reporter and callbacks from this same RunConfig object, and no public
    API replaces them.
    """
    run_config = tuner._local_tuner.get_run_config()
    run_config.progress_reporter = reporter
    run_config.callbacks = list(callbacks)


def tuner_searcher(tuner):
    """The Searcher a Tuner runs (for a restored Tuner: the one Tune unpickled and restored), unwrapped
    from Tune's ConcurrencyLimiter.

    Tune offers no public accessor. The driver asks the sweep's searcher, after `fit`, how many trials it
    meant to hand out (groups whose space ran out end early) and has it deliver its MLflow marks.
    """
    searcher = tuner._local_tuner._tune_config.search_alg
    return getattr(searcher, "searcher", searcher)


def searcher_state(searcher) -> dict:
    """The whole state of an `OptunaSearch` (its study, sampler, storage and the trials it asked), to pickle.

    `OptunaSearch.save` pickles its `__dict__` to a file of its own; the per-scheme searcher keeps one
    OptunaSearch per group and pickles them all in one file with the storages they share, so that the
    shared references survive a restore. Mirrors `save`/`restore` of Ray 2.60's optuna_search.py.
    """
    return searcher.__dict__.copy()


def restore_searcher_state(searcher, state: dict) -> None:
    """Put back what `searcher_state` took (as `OptunaSearch.restore` does)."""
    searcher.__dict__.update(state)


# Ray Train logs one "Checkpoint successfully created" line per reported checkpoint (one per
# epoch and trial) through this logger; the sweep quiets it by name.
RAY_STORAGE_LOGGER = "ray.train._internal.storage"


def ray_started_here() -> str | None:
    """The GCS address `ray start --head` recorded on this machine (Ray's temp folder,
    `ray_current_cluster`; `ray stop` removes it), as `ray.init()` reads it; None without one."""
    from ray._private import utils

    return utils.read_ray_address()


def ephemeral_ray_token() -> None:
    """Before an in-process `ray.init()`: token authentication with a token of this process alone.

    Ray 2.60 turns token authentication on for a new local Ray and, with no token given, writes a
    new one to ~/.ray/auth_token (ray/_private/authentication/authentication_token_setup.py,
    `generate_and_save_token`). A later `ray start --head` on the machine (`ray up` on a head
    where a sweep once ran in-process) finds that file and requires the token, which the cluster's
    worker nodes do not have: they cannot join. A token in the environment is used instead of the
    file and leaves nothing behind; the processes `ray.init` starts inherit it. A mode the user set
    (`RAY_AUTH_MODE`) is respected.
    """
    import secrets

    from ray._private.authentication import authentication_token_setup as setup

    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        setup._enable_token_auth()      # RAY_AUTH_MODE=token, and Ray's cached config of this process told


@contextmanager
def local_ray_on_loopback() -> Iterator[None]:
    """Around `ray.init(address="local")`: the Ray it starts listens on 127.0.0.1 alone.

    Ray 2.60's GCS, raylets and workers bind the node's address, and
    `ray._private.services.get_node_ip_address` picks the machine's interface
    address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is false, when it returns
    the loopback address (meant for single-machine Ray on macOS and Windows).
    Ray reads it into `ray._private.ray_constants.ENABLE_RAY_CLUSTER` when it
    is imported, so this process's copy is set too; the processes `ray.init`
    starts inherit the variable. Both are taken back afterwards, since the
    setting also makes Ray refuse multi-node clusters.
    """
    from ray._private import ray_constants

    key = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    before, before_constant = os.environ.get(key), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[key], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_constant
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


# The variables Ray Tune copies from the driver's environment into every trainable's runtime env.
CLOUD_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


def keep_cloud_secrets_from_trials() -> list[str]:
    """Stop Ray Tune from handing the driver's AWS credentials to the trials through their runtime env.

    Tune copies CLOUD_SECRETS from the driver's environment into the runtime env of every trainable
    (Ray 2.60: ray/tune/execution/class_cache.py, `ENV_VARS_TO_PROPAGATE`, read each time an actor
    class is made), and Ray writes runtime envs into the logs of its session folder, which other
    users of the machine can read. Trials on this machine inherit the environment anyway (the
    raylet the driver starts inherits the driver's); nodes of a cluster use their own credentials
    (instance profile, ~/.aws/credentials, the environment `ray start` ran in). Returns the
    variables set here that are no longer handed over.
    """
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = set(class_cache.ENV_VARS_TO_PROPAGATE) - set(CLOUD_SECRETS)
    return [k for k in CLOUD_SECRETS if k in os.environ]


def asked_trials(searcher) -> tuple[dict, set]:
    """What an `OptunaSearch` asked its study: its trial id -> the `optuna.Trial`, and the ids it has told.

    Ray 2.60's optuna_search.py keeps them in `_ot_trials` and `_completed_trials`, with no accessor; the
    per-scheme searcher matches them, on --resume, to the study in its journal (`study.settle`).
    """
    return searcher._ot_trials, searcher._completed_trials


def adopt_asked(searcher, trial_id: str, ot_trial) -> None:
    """Have an `OptunaSearch` hold `ot_trial` as the trial it asked for Tune's `trial_id` (in `_ot_trials`,
    as `asked_trials` reads it), so that the trial's results reach its study as its own proposals' do."""
    searcher._ot_trials[trial_id] = ot_trial


def saved_trials(experiment_dir: str) -> list:
    """The trials (Ray `Trial` objects: id, config, status, last result) in Tune's newest experiment state
    file in the local folder `experiment_dir`; none where there is no such file.

    Tune writes that file, then its searcher's state; a driver killed between the two leaves trials the
    searcher's checkpoint never saw. Read as Ray 2.60's `TuneController.resume` reads it (the newest file
    by name, `Trial.from_json_state`, `restore_run_metadata`).
    """
    import json

    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
    from ray.tune.experiment.trial import Trial

    path = _find_newest_experiment_checkpoint(experiment_dir)
    if path is None:
        return []
    with open(path) as f:
        state = json.load(f)
    out = []
    for trial_json, metadata in state["trial_data"]:
        trial = Trial.from_json_state(trial_json, stub=True)
        trial.restore_run_metadata(metadata)
        out.append(trial)
    return out


def reopen_journal(storage, path: str) -> bool:
    """Point an Optuna journal storage restored from a pickle at its file `path` as found now; returns
    whether `storage` is a journal storage (an in-memory one holds its studies in the pickle).

    A `JournalStorage` pickles its backend (which names the file) and replays the file when first used
    after the unpickling (Optuna 5: `__setstate__`); the sweep's folder may have moved since (--resume with
    another --storage). Optuna offers no way to change the file, and replacing the backend before that
    first use loses nothing. Where `path` is no file the backend is left as it was.
    """
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    if not isinstance(storage, JournalStorage):
        return False
    backend = storage._backend
    if isinstance(backend, JournalFileBackend) and backend._file_path != path and os.path.isfile(path):
        storage._backend = JournalFileBackend(path, lock_obj=JournalFileSymlinkLock(path))
    return True
