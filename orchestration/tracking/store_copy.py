"""A local MLflow store (`mlflow.db` and its artifacts) copied whole, so that it opens where it lands.

A local store keeps absolute artifact locations (`/home/ubuntu/wsml/mlruns/1/...`): copied as files to a
laptop, or left behind on a head that `ray down` deletes, the UI loses the tables and figures attached
to a sweep's run. `copy_store` copies the database with SQLite's online backup (consistent while a sweep
writes to it), copies every experiment's local artifacts into `<dest>/mlruns/<experiment id>/`, and
points the copy's artifact locations there. The driver keeps such a copy on shared storage
(`WSML_MLFLOW_BACKUP`, `Backup`) every few minutes and at the end of each sweep; a new head, or a laptop
after `ray rsync-down`, opens it directly or copies it once more:

    python -m orchestration.tracking.store_copy SRC DEST    # SRC: a folder with mlflow.db (or the .db); DEST: a folder
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sqlite3
import sys
import threading
import urllib.parse
from pathlib import Path

from orchestration.tracking import store
from orchestration.common import SweepError, first_line

log = logging.getLogger(__name__)

DB = "mlflow.db"
ARTIFACTS = "mlruns"
BACKUP_ENV = "WSML_MLFLOW_BACKUP"     # a folder on shared storage (cluster.yaml and cluster.slurm.sh set it)
BACKUP_EVERY_S = 300.0               # at most 5 minutes of a sweep's MLflow records lost with its head


def _local(location: str) -> Path | None:
    """The folder of a local artifact location (`/abs/path` or `file:///abs/path`), else None."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    if parsed.scheme == "" and location.startswith("/"):
        return Path(location)
    return None


def copy_store(src_db: Path, dest: Path) -> Path:
    """Copy the store `src_db` and its local artifacts into the folder `dest` (made if needed); returns the
    copy's database. The database is written beside and renamed into place, so `dest/mlflow.db` is always a
    whole store; artifacts are added (files already there are kept when their size matches)."""
    src_db, dest = Path(src_db).resolve(), Path(dest).resolve()
    if not src_db.is_file():
        raise SweepError(f"no MLflow store at {src_db}: give the folder that holds {DB}, or the .db file")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".{DB}.tmp-{os.getpid()}"
    try:
        with sqlite3.connect(src_db) as src, sqlite3.connect(tmp) as out:
            src.backup(out)
        with sqlite3.connect(tmp) as db:
            for exp_id, location in db.execute("SELECT experiment_id, artifact_location FROM experiments").fetchall():
                folder = _local(location or "")
                if folder is None:
                    continue               # a server's or bucket's artifacts: where they are
                target = dest / ARTIFACTS / str(exp_id)
                if folder.is_dir() and folder.resolve() != target:
                    _copy_tree(folder, target)
                db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                           (str(target), exp_id))
                for prefix in {str(folder), f"file://{folder}"}:
                    db.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                               "WHERE experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
                               (str(target), len(prefix) + 1, exp_id, len(prefix), prefix))
        os.replace(tmp, dest / DB)
    finally:
        tmp.unlink(missing_ok=True)
    return dest / DB


def relocate(db: Path, before: Path, now: Path) -> int:
    """Point the artifact locations of the store `db` that lie under the folder `before` to the same place
    under `now`: a store moved with the folder its artifacts are in (`--resume` from a moved working
    directory) keeps attaching them beside it, never at the old place. Returns the rows changed."""
    changed = 0
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = [(t, c) for t, c in (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                                       ("logged_models", "artifact_location")) if t in tables]
        for old, new in ((str(before), str(now)), (before.as_uri(), now.as_uri())):
            for table, column in columns:
                changed += conn.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                    f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                    (new, len(old) + 1, old, len(old) + 1, old.rstrip("/") + "/")).rowcount
    return changed


def _copy_tree(src: Path, dest: Path) -> None:
    for root, _dirs, files in os.walk(src):
        out = dest / Path(root).relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            a, b = Path(root) / name, out / name
            if not b.exists() or b.stat().st_size != a.stat().st_size:
                shutil.copy2(a, b)


class Backup:
    """Copies a sweep's local store into `folder` every `every_s` and when stopped (a daemon thread): what a
    lost head, or `ray down`, leaves of the sweep's MLflow records is at most that old."""

    def __init__(self, uri: str, folder: str | os.PathLike, every_s: float = BACKUP_EVERY_S):
        self.db, self.folder, self.every_s = store.local_path(uri), Path(folder), every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Backup:
        if self.db is not None:
            self._thread = threading.Thread(target=self._run, name="mlflow-backup", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.once()

    def once(self) -> None:
        if self.db is None:     # not a local SQLite store: nothing to copy
            return
        try:
            copy_store(self.db, self.folder)
        except Exception as err:  # noqa: BLE001 - a backup that fails must not stop the sweep
            log.warning("warning: MLflow backup to %s failed: %s", self.folder, first_line(err))

    def stop(self) -> None:
        """The last copy, after the sweep's final writes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.once()


def from_env(uri: str) -> Backup | None:
    """The backup `WSML_MLFLOW_BACKUP` asks for, of a local SQLite store; None otherwise."""
    folder = os.environ.get(BACKUP_ENV)
    if not folder or store.local_path(uri) is None or not uri.startswith("sqlite:"):
        return None
    return Backup(uri, folder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m orchestration.tracking.store_copy",
        description="Copy a local MLflow store (mlflow.db and its artifacts) so that it opens where it lands.",
        epilog="e.g.  python -m orchestration.tracking.store_copy mlflow-backup/ here/   then   "
               "mlflow ui --backend-store-uri sqlite:///here/mlflow.db")
    p.add_argument("src", help=f"a folder holding {DB}, or the .db file")
    p.add_argument("dest", help="the folder to copy into (made if needed)")
    args = p.parse_args(argv)
    src = Path(args.src)
    try:
        db = copy_store(src / DB if src.is_dir() else src, Path(args.dest))
    except (SweepError, sqlite3.Error, OSError) as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        return 2
    print(f"copied; open it with: mlflow ui --backend-store-uri sqlite:///{db}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
