"""The sweep record: `<storage>/<sweep>/wsml_sweep.json`, what `--resume` needs besides Ray's state.

It holds the data set, the validated search space, the MLflow store and the
ids of the sweep's experiment and run, the trial resources, the data and
cache folders, the identity of the data, the command line and where the storage
was. It is written once, when the sweep starts, beside Tune's own `tuner.pkl`;
storage is a local folder or a bucket URI (through pyarrow's file systems, as
Tune's own storage).

A sweep folder that moved since (a working directory moved whole, with the
local MLflow store and cache beside its storage) is continued from where it is
now: `moved` tells where the record's local paths went (`Moved`).

A storage that cannot be read (a bucket whose endpoint does not answer) is a
`SweepError` naming it, never taken for a storage without the sweep.
"""
from __future__ import annotations

import logging
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestration.common import FINAL_SUFFIX, RECORD, SweepError, first_line, redact

log = logging.getLogger(__name__)


@dataclass
class SweepRecord:
    dataset: str
    name: str
    space: dict[str, Any]
    mlflow_uri: str
    experiment_id: str
    parent_run_id: str
    resources: dict[str, float]
    data_root: str | None
    cache_dir: str
    command: str
    created: str
    data_id: str = ""               # the identity of the data the sweep was planned on ("": not known then)
    storage: str = ""               # where the storage was when the sweep started ("": a record of before)

    @classmethod
    def from_json(cls, text: str, where: str) -> SweepRecord:
        try:
            data = json.loads(text)
        except ValueError as err:
            raise SweepError(f"{where} is not valid JSON ({err}): the sweep folder is damaged; start a new "
                             "sweep with another --name") from None
        fields = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        if not isinstance(data, dict) or not required <= set(data):
            missing = sorted(required - set(data)) if isinstance(data, dict) else ["all"]
            raise SweepError(f"{where} is not a sweep record (missing {', '.join(missing)}): the sweep folder is "
                             "damaged; start a new sweep with another --name")
        return cls(**{k: data[k] for k in fields if k in data})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def _fs(storage: str):
    import pyarrow
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(storage)
    except (pyarrow.ArrowException, ValueError, OSError) as err:   # its message quotes the URI: redacted
        raise SweepError(f"--storage {storage}: cannot open it ({first_line(err)}): pass a folder or a bucket "
                         "URI such as s3://bucket/path") from None


def _unreachable(storage: str, err: BaseException) -> SweepError:
    """A storage that did not answer (a bucket's endpoint down or wrong, no network, no permission)."""
    return SweepError(f"--storage {redact(storage)} cannot be read ({first_line(err)}): check that it is reachable "
                      "(for a bucket: its endpoint, e.g. AWS_ENDPOINT_URL, the network and the credentials) or "
                      "pass another --storage")


def check_reachable(storage: str) -> None:
    """SweepError when the storage (a bucket URI) does not answer: before anything is created."""
    fs, base = _fs(storage)
    try:
        fs.get_file_info(base)
    except OSError as err:
        raise _unreachable(storage, err) from None


def exists(storage: str, rel: str) -> bool:
    import pyarrow.fs

    fs, base = _fs(storage)
    try:
        return fs.get_file_info(f"{base}/{rel}").type != pyarrow.fs.FileType.NotFound
    except OSError as err:
        raise _unreachable(storage, err) from None


def read(storage: str, name: str) -> SweepRecord | None:
    """The record of sweep `name`, None when there is none; SweepError when it is damaged or the storage
    cannot be read."""
    fs, base = _fs(storage)
    path = f"{base}/{name}/{RECORD}"
    try:
        with fs.open_input_stream(path) as f:
            text = f.read().decode(errors="replace")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except OSError as err:
        raise _unreachable(storage, err) from None
    return SweepRecord.from_json(text, f"{storage}/{name}/{RECORD}")


def write(storage: str, record: SweepRecord) -> None:
    """Write the record (with `storage` as where the sweep started); readers never see a part of it (a local
    file is renamed into place, an object store's put is whole)."""
    from wsml.files import atomic_write

    record = dataclasses.replace(record, storage=storage)
    fs, base = _fs(storage)
    if type(fs).__name__ == "LocalFileSystem":
        atomic_write(Path(base) / record.name / RECORD, record.to_json())
        return
    fs.create_dir(f"{base}/{record.name}", recursive=True)
    with fs.open_output_stream(f"{base}/{record.name}/{RECORD}") as f:
        f.write(record.to_json().encode())


def find_resumable(storage: str, dataset: str, name: str | None) -> SweepRecord:
    """The record of the sweep to continue: `name`, or the newest sweep of `dataset` in `storage`."""
    import pyarrow.fs
    from ray import tune

    if name is None:
        fs, base = _fs(storage)
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
        except OSError as err:
            raise _unreachable(storage, err) from None
        found = []
        for info in infos:
            if info.type == pyarrow.fs.FileType.Directory and not info.base_name.endswith(FINAL_SUFFIX):
                rec = read(storage, info.base_name)
                if rec is not None and rec.dataset == dataset:
                    found.append(rec)
        if not found:
            raise SweepError(f"nothing to resume: no sweep of {dataset} in {storage}: start one without --resume")
        return max(found, key=lambda r: (r.created, r.name))
    record = read(storage, name)
    if record is None or not tune.Tuner.can_restore(f"{storage}/{name}"):
        raise SweepError(f"nothing to resume: no sweep {name!r} in {storage}: check --name and --storage, "
                         "or start it without --resume")
    if record.dataset != dataset:
        raise SweepError(f"sweep {name!r} is a sweep of {record.dataset!r}, not {dataset!r}: "
                         f"pass --dataset {record.dataset}")
    return record


@dataclass(frozen=True)
class Moved:
    """A sweep whose storage folder moved since it started: `before`, the folder that moved (the storage
    then, less the trailing folders it shares with the storage now), is `now`. Paths of the record
    under `before` (a local MLflow store, the cache, the data beside the storage) are looked for at the
    same place under `now`."""

    before: Path
    now: Path

    def place(self, path: str) -> Path | None:
        """`path` under `now`, or None when it was not under `before`."""
        p = Path(path)
        return self.now / p.relative_to(self.before) if p.is_relative_to(self.before) else None

    def find(self, path: str, *, made_if_missing: bool = False) -> str:
        """Where `path` is now: at its place under `now` when that exists (the moved copy wins), else where it
        was when that exists. `made_if_missing` (a cache, built again when missing): neither existing, its
        place under `now` when that place's folder exists."""
        moved = self.place(path)
        if moved is None or (not moved.exists() and os.path.exists(path)):
            return path
        if moved.exists() or (made_if_missing and moved.parent.is_dir()):
            return str(moved)
        return path


def moved(started: str, storage: str) -> Moved | None:
    """How a sweep's folders moved: its storage when it started (`started`, from its record) is `storage` now.
    None when it did not move, or either is a bucket (paths on this machine are not beside it)."""
    if not started or started == storage or "://" in started or "://" in storage:
        return None
    a, b = Path(started).parts, Path(storage).parts
    same = 0            # trailing folders both share (ray_results of a moved working directory)
    while same < min(len(a), len(b)) - 1 and a[-1 - same] == b[-1 - same]:
        same += 1
    return Moved(Path(*a[:len(a) - same]), Path(*b[:len(b) - same]))


class DriverLock:
    """One driver per sweep at a time: an exclusive lock on `<storage>/<sweep>/.driver.lock` held while a
    driver runs the sweep. The kernel releases it when the driver's process ends, however it ends (a crash,
    `kill -9`, a lost node), so a later `--resume` never waits for a dead driver. Local and network file
    systems (NFS locks through the server); storage in a bucket has no lock (one driver is the user's care)."""

    NAME = ".driver.lock"

    def __init__(self, storage: str, name: str):
        self.file = None
        fs, base = _fs(storage)
        if type(fs).__name__ != "LocalFileSystem":
            return
        import fcntl
        import os
        import socket
        import time
        from pathlib import Path

        folder = Path(base) / name
        if not folder.is_dir():
            return              # a sweep not started yet: the folder appears with its set-up
        path = folder / self.NAME
        f = open(path, "a+")    # held open for the driver's life, closed by release()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise SweepError(f"sweep {name!r} is being run by another driver ({holder}): two drivers would "
                             "train every trial twice into the same folders; wait for it to end, or stop it "
                             "(Ctrl-C) and resume then") from None
        except OSError as err:  # a file system without locks (Lustre mounted without flock)
            f.close()
            log.info(f"note: cannot lock {path} ({first_line(err)}): make sure no other driver runs sweep {name}")
            return
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self.file = f

    def release(self) -> None:
        if self.file is not None:
            self.file.close()       # closing the descriptor releases the lock
            self.file = None
