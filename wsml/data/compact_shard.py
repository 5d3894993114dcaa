"""One shard file of the compact image cache (`wsml.data.compact`): its layout and index, its checksum,
and the stamp that remembers a verified checksum.

A shard file: the JPEG bytes of its images back to back (nothing for an unreadable image), then
its index (offsets, count + 1 int64; file sizes and mtimes, int64; unreadable flags, uint8), then
a trailer (magic, count, index offset, checksum). The checksum is the SHA-256 of the shard's identity
(its entry's name, which holds the entry's digest, its number and its rows) followed by every byte of
the file before the checksum: a damaged byte anywhere, or the file of another shard or entry copied
or moved over this one, fails it.

Verifying reads the whole shard (SHA-256 runs at about 1 GB/s a core; a cache is up to hundreds of
GB), so a verified shard gets a stamp `<shard>.ok` beside it holding the file's size, mtime_ns,
ctime_ns and inode: while they are unchanged it is not read again. The stamp lives with the shard,
on the storage every node shares, so a shard is verified once per cluster, not per node or trial;
the builder stamps what it writes. Any rewrite, copy or rename of the shard changes its ctime (which
no user can set back) or its inode, so a swapped or rewritten shard is verified again; bytes that
rot with no change of metadata are caught where they fail to decode (`damaged`, which drops the stamp).
On file systems that number inodes per client (some FUSE mounts) each node's stamp replaces the
other's and shards are verified more often: slower, never wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsml.errors import DataError

MAGIC = b"WSMLJPG2"
HEAD = struct.Struct("<8sQQ")         # magic, image count, index offset; then the checksum
_SUM = 32                             # bytes of the checksum (SHA-256)
TRAILER_SIZE = HEAD.size + _SUM
_CHUNK = 8 << 20                      # bytes hashed per read

_logger = logging.getLogger(__name__)
_unstamped_warned = False


class DamagedShard(DataError):
    """A compact cache shard whose bytes fail its checksum or do not decode."""

    # torch's DataLoader re-raises a worker's exception as `cls(message=<its whole traceback>)` when
    # the class has a `message` attribute: taking our line back out keeps the error one line
    message = "a compact cache shard is damaged"

    def __init__(self, text: str = "", *, message: str | None = None):
        if message is not None:
            tail = f"{type(self).__module__}.{type(self).__qualname__}: "
            lines = [ln[len(tail):] for ln in message.splitlines() if ln.startswith(tail)]
            text = lines[-1] if lines else message.strip().splitlines()[-1]
        super().__init__(text)


@dataclass(frozen=True)
class ShardIndex:
    """Where each image's JPEG bytes lie in a shard file, what was recorded of its file, the checksum."""

    offsets: np.ndarray   # int64 (count + 1,)
    sizes: np.ndarray     # int64 (count,)
    mtimes: np.ndarray    # int64 (count,)
    bad: np.ndarray       # bool (count,)
    checksum: bytes       # SHA-256 of the identity and the file's bytes before it


def identity(entry: str | os.PathLike, index: int, start: int, stop: int) -> bytes:
    """What a shard's checksum is bound to besides its bytes: the entry (its name holds the digest of
    its paths and settings), the shard's number and rows."""
    return f"wsml compact shard\0{Path(entry).name}\0{index}\0{start}\0{stop}\0".encode()


def read_index(path: Path) -> ShardIndex | None:
    """The shard's index, or None when the file is absent, truncated or not a shard (of this format)."""
    try:
        with open(path, "rb") as f:
            length = f.seek(0, os.SEEK_END)
            if length < TRAILER_SIZE:
                return None
            f.seek(length - TRAILER_SIZE)
            trailer = f.read(TRAILER_SIZE)
            magic, count, at = HEAD.unpack(trailer[:HEAD.size])
            if magic != MAGIC or at + 8 * (3 * count + 1) + count + TRAILER_SIZE != length:
                return None
            f.seek(at)
            raw = f.read(8 * (3 * count + 1) + count)
    except OSError:
        return None
    ints = np.frombuffer(raw, dtype="<i8", count=3 * count + 1)
    index = ShardIndex(offsets=ints[:count + 1], sizes=ints[count + 1:2 * count + 1], mtimes=ints[2 * count + 1:],
                       bad=np.frombuffer(raw, dtype=np.uint8, offset=8 * (3 * count + 1)).astype(bool),
                       checksum=trailer[HEAD.size:])
    if index.offsets[0] != 0 or index.offsets[-1] != at or np.any(np.diff(index.offsets) < 0):
        return None
    return index


# ------------------------------------------------------------------ verification and its stamp
def stamp_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".ok")


def _stamp(st: os.stat_result, checksum: bytes, ident: bytes) -> dict:
    # not st_dev: a shared file system's device number differs from node to node; the identity, so
    # that a shard moved here with its stamp is not taken as verified
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "checksum": checksum.hex(), "shard": ident.hex()}


def hash_file(f, ident: bytes, length: int):
    """SHA-256 of `ident` and the first `length` bytes of the open file `f` (from its start)."""
    f.seek(0)
    digest = hashlib.sha256(ident)
    while length > 0:
        chunk = f.read(min(_CHUNK, length))
        if not chunk:
            break
        digest.update(chunk)       # large updates release the GIL: shards verify in parallel threads
        length -= len(chunk)
    return digest


def verified(shard: Path, ident: bytes, index: ShardIndex) -> bool:
    """Whether the shard's bytes match its checksum and identity: true at once when its stamp is for
    this very file, else read in full (and stamped when they match)."""
    try:
        stamp = json.loads(stamp_path(shard).read_text())
        if stamp == _stamp(os.stat(shard), index.checksum, ident):
            return True
    except (OSError, ValueError):
        pass
    try:
        with open(shard, "rb") as f:
            st = os.fstat(f.fileno())          # the stamp's key is that of the bytes hashed here
            digest = hash_file(f, ident, st.st_size - _SUM).digest()
            ok = digest == f.read(_SUM) == index.checksum
    except OSError:
        return False
    if ok:
        write_stamp(shard, st, digest, ident)
    return ok


def write_stamp(shard: Path, st: os.stat_result, checksum: bytes, ident: bytes) -> None:
    """Record that `shard` as `st` describes it holds bytes matching `checksum`; best effort (a read-only
    or full cache folder only costs a verification at the next open)."""
    global _unstamped_warned
    stamp = stamp_path(shard)
    tmp = stamp.with_name(f"{stamp.name}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.write_text(json.dumps(_stamp(st, checksum, ident)))
        os.replace(tmp, stamp)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if not _unstamped_warned:
            _unstamped_warned = True
            _logger.warning(f"warning: cannot record the verification of {shard} ({err}): compact cache shards "
                            "are verified again at each start")


def damaged(shard: str | os.PathLike, what: str) -> DamagedShard:
    """The error for a shard found damaged while reading it, its stamp dropped so that the next start
    verifies it (and rebuilds it)."""
    try:
        stamp_path(Path(shard)).unlink(missing_ok=True)
    except OSError:
        pass            # a read-only cache: the shard is named all the same
    return DamagedShard(f"compact cache shard {shard} is damaged ({what}): run again to verify and rebuild it, "
                        f"or delete {shard}")
