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

from wsml.files import atomic_write
from wsml.errors import CheckpointError

FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **state}, buffer)
    data = buffer.getvalue()
    atomic_write(path, data)
    atomic_write(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest())


def load_checkpoint(path: str | os.PathLike, *, accept_unverified: bool = False) -> dict[str, Any]:
    """The state saved at `path`, verified against `<path>.sha256`.

    A checkpoint without its `.sha256` is refused unless `accept_unverified`:
    every checkpoint written here has one, so a missing one means the file was
    copied without it or put there by hand, and damage that still loads (a
    flipped bit in a tensor) would resume silently.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: start without resuming or pass the right folder")
    data = path.read_bytes()
    digest_file = path.with_name(path.name + ".sha256")
    if not digest_file.is_file():
        if not accept_unverified:
            raise CheckpointError(f"checkpoint {path} has no {digest_file.name} beside it, so it cannot be verified: "
                                  f"restore {digest_file}, delete the checkpoint to start over, or resume from it "
                                  f"unverified with --accept-unverified-checkpoint")
    elif digest_file.read_text().strip() != hashlib.sha256(data).hexdigest():
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated (checksum mismatch): "
                              "resume from an earlier checkpoint or delete it to start over")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}): "
                              "resume from an earlier checkpoint or delete it to start over") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a wsml checkpoint of format {FORMAT_VERSION}: "
                              "start the run afresh")
    return state
