"""Reading the compact image cache (`wsml.data.compact`): its images decoded on this CPU or, batched,
on a GPU, and `load_compact_cache`, which builds what is missing first and opens the result.

Decoding uses libjpeg-turbo through `torchvision.io.decode_jpeg` in the trial's DataLoader workers,
or nvJPEG on the GPU (`GpuDecoder`). An image that does not decode is a `DamagedShard` naming its
shard, whose verification stamp is dropped: the next start verifies the shard and rebuilds it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from wsml.data.cache import ImageCache, check_bad
from wsml.data.compact import QUALITY, SHARD_IMAGES, CompactPlan, build_missing, plan, spec_paths
from wsml.data.compact_shard import damaged, read_index
from wsml.errors import DataError


class CompactImages:
    """The cached images as a read-only array-like of shape (N, size, size, 3), uint8 HWC RGB.

    `images[index]` decodes the rows asked for (int, slice or index array) on this CPU;
    `images.encoded(index)` returns their JPEG bytes for decoding elsewhere (the GPU). Shards are
    memory-mapped lazily in each process (and never pickled: DataLoader workers reopen them).
    Unreadable images decode as zeros.
    """

    def __init__(self, plan: CompactPlan):
        self.entry, self.size = plan.entry, plan.size
        self.shape = (plan.count, plan.size, plan.size, 3)
        self.dtype = np.dtype(np.uint8)
        self._paths = [s.path for s in plan.shards]
        self._shard_images = plan.shards[0].stop - plan.shards[0].start
        offsets, bad, sizes = [], [], []
        for s in plan.shards:
            index = read_index(s.path)
            if index is None or len(index.bad) != s.stop - s.start:
                raise DataError(f"compact cache shard {s.path} is missing or damaged; build the cache again "
                                f"(or delete {plan.entry})")
            offsets.append(index.offsets)
            bad.append(index.bad)
            sizes.append(index.sizes)
        self._offsets = offsets
        self.file_sizes = np.concatenate(sizes)     # bytes of each image file when cached (the data fingerprint)
        self.bad = np.flatnonzero(np.concatenate(bad)).astype(np.int64)
        self.disk_bytes = sum(int(o[-1]) for o in offsets)  # the JPEG bytes (indexes excluded)
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}

    def _rows(self, index) -> np.ndarray:
        if isinstance(index, slice):
            return np.arange(len(self))[index]
        rows = np.asarray(index, dtype=np.int64)
        return np.where(rows < 0, rows + len(self), rows)

    def _bytes(self, row: int) -> np.ndarray:
        if not 0 <= row < len(self):
            raise IndexError(f"image {row} out of range for {len(self)} images")
        shard, local = divmod(int(row), self._shard_images)
        data = self._maps.get(shard)
        if data is None:
            data = self._maps[shard] = np.memmap(self._paths[shard], dtype=np.uint8, mode="r")
        offsets = self._offsets[shard]
        return data[offsets[local]:offsets[local + 1]]

    def encoded(self, index) -> tuple:
        """(all the rows' JPEG bytes back to back as one uint8 tensor, int64 tensor of their lengths,
        the shard file of each row), for `GpuDecoder(*encoded)`.

        One tensor rather than a list: a DataLoader worker hands each tensor over in its own
        shared-memory segment. An unreadable image has length 0.
        """
        import torch

        rows = self._rows(index).reshape(-1)
        parts = [self._bytes(r) for r in rows]
        lengths = torch.tensor([len(p) for p in parts], dtype=torch.int64)
        data = torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.uint8))
        return data, lengths, tuple(str(self._paths[int(r) // self._shard_images]) for r in rows)

    def __getitem__(self, index) -> np.ndarray:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        rows = self._rows(index)
        flat = rows.reshape(-1)
        out = torch.zeros((len(flat), self.size, self.size, 3), dtype=torch.uint8)
        for k, r in enumerate(flat):
            jpeg = self._bytes(r)
            if not len(jpeg):
                continue
            try:
                # a writable copy of the bytes (torch warns on read-only buffers); decode gives a CHW
                # view of HWC memory, so the permute back is a plain copy
                out[k] = decode_jpeg(torch.from_numpy(np.array(jpeg)), mode=ImageReadMode.RGB).permute(1, 2, 0)
            except RuntimeError as err:
                shard, local = divmod(int(r), self._shard_images)
                raise damaged(self._paths[shard], f"its image {local} does not decode: {_why(err)}") from None
        return out.numpy().reshape(rows.shape + self.shape[1:])


class GpuDecoder:
    """Batched nvJPEG decoding of `CompactImages.encoded` batches onto a CUDA device.

    nvJPEG writes its outputs from a stream of its own that does not wait for the caller's
    (pytorch/vision#9606): a block the caching allocator recycles may still be read by kernels
    queued on the caller's stream when the decoder overwrites it. So decoding runs on a side
    stream that holds nothing else, drained before each call, and the result is handed to the
    current stream with `record_stream`, so its block is not recycled before that stream is done.
    """

    def __init__(self, device, size: int):
        import torch

        self.device, self.size = torch.device(device), size
        self.stream = torch.cuda.Stream(self.device)

    def __call__(self, data, lengths, shards: Sequence[str] | None = None):
        """uint8 (n, 3, size, size) on the device, ready for work queued next on the current stream.
        `shards`: the shard file of each image (`CompactImages.encoded`'s third), named if one does not decode."""
        import torch

        sizes = lengths.tolist()
        parts = torch.split(data, sizes)
        try:
            return self._decode(parts, sizes)
        except RuntimeError as err:
            if shards is None:
                raise
            from torchvision.io import decode_jpeg

            for part, shard in zip(parts, shards):     # which one: the CPU's decoder tells (only on failure)
                try:
                    if len(part):
                        decode_jpeg(part.cpu())
                except RuntimeError as cpu_err:
                    raise damaged(shard, f"an image of it does not decode: {_why(cpu_err)}") from None
            raise err from None      # every image decodes on the CPU: not a damaged shard

    def _decode(self, parts, sizes: list[int]):
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        current = torch.cuda.current_stream(self.device)
        present = [i for i, n in enumerate(sizes) if n]     # unreadable images stay zeros
        with torch.cuda.stream(self.stream):
            self.stream.synchronize()
            if len(present) == len(sizes):
                out = torch.stack(decode_jpeg(list(parts), mode=ImageReadMode.RGB, device=self.device))
            else:
                out = torch.zeros((len(sizes), 3, self.size, self.size), dtype=torch.uint8, device=self.device)
                if present:
                    decoded = decode_jpeg([parts[i] for i in present], mode=ImageReadMode.RGB, device=self.device)
                    out[present] = torch.stack(decoded)
        current.wait_stream(self.stream)
        out.record_stream(current)
        return out


def _why(err: Exception) -> str:
    """torchvision's decode error, less its source location (`decode_jpeg, <file.cpp>:171, <why>`)."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return first.rsplit(", ", 1)[-1][:200]


def load_compact_cache(paths: Sequence[str] | np.ndarray, size: int, cache_root: str | os.PathLike, *,
                       image_root: str | None = None, skip_bad: bool = False, workers: int | None = None,
                       quality: int = QUALITY, shard_images: int = SHARD_IMAGES) -> ImageCache:
    """The compact cache of `paths` at `size`, built first where shards are missing or stale.

    The counterpart of `wsml.data.cache.load_image_cache` (same pixels before encoding, same
    handling of unreadable images), with `array` a `CompactImages`. Missing shards are built by
    `workers` local processes (default: the CPUs this process may use); on a cluster the sweep
    builds them beforehand as Ray tasks, so trials find them.
    """
    p = plan(paths, size, cache_root, image_root=image_root, quality=quality, shard_images=shard_images)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    build_missing(p, workers=workers)
    images = CompactImages(p)

    def path_of(i: int) -> str:
        return spec_paths(p.shards[i // shard_images])[i % shard_images]

    check_bad(images.bad, len(images), path_of, skip_bad)
    return ImageCache(array=images, bad=images.bad, file_sizes=images.file_sizes)
