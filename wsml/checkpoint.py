"""Atomic, verifiable checkpoints of the complete training state.

A checkpoint is written to a temporary file, fsync'd and renamed into place,
with its SHA-256 beside it (`<file>.sha256`), so a file cut short by a killed
process or a full disk is detected on load instead of resuming from garbage.
Loading uses `torch.load(weights_only=True)`: a checkpoint can hold tensors
and plain containers, never arbitrary objects.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from wsml.errors import CheckpointError

FORMAT_VERSION = 1


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **state}, buffer)
    data = buffer.getvalue()
    _write_atomic(path, data)
    _write_atomic(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest().encode())


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: start without resuming or pass the right folder")
    data = path.read_bytes()
    digest_file = path.with_name(path.name + ".sha256")
    if digest_file.is_file() and digest_file.read_text().strip() != hashlib.sha256(data).hexdigest():
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated (checksum mismatch): "
                              "resume from an earlier checkpoint or delete it to start over")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a torn zip raises many kinds of errors
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}): "
                              "resume from an earlier checkpoint or delete it to start over") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a wsml checkpoint of format {FORMAT_VERSION}: "
                              "start the run afresh")
    return state
