"""The published on-disk layout of a prepared data set, plus our `meta.json`.

A prepared folder holds, as the published code writes them:

    formatted_train_images.npy   (N_train,) unicode image paths
    formatted_train_labels.npy   (N_train, C) labels in {-1, 0, 1}
    formatted_val_images.npy     (N_val,)
    formatted_val_labels.npy     (N_val, C)
    formatted_train_labels_obs.npy   optional, (N_train, C) observed labels

and our `meta.json`: `dataset`, `class_names`, `num_classes` and `image_root`,
the folder the image paths are relative to, itself relative to the prepared
folder (so the two can be copied or moved together), with
`image_root_absolute` where it was when prepared.  "train" and "val" are the
OFFICIAL splits: the trainer carves 20 % of official train into validation and
uses official val as the test set.

Reading memory-maps the arrays and checks them in blocks of rows, so a data set
of millions of images (OpenImages: 5,000 classes) costs no more memory than a
block: int8 labels stay memory-mapped, paths stay relative until asked for.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsml.errors import DataError

META_FILE = "meta.json"
SPLITS = ("train", "val")
OBS_FILE = "formatted_train_labels_obs.npy"
PREPARE_HINT = "run `python -m wsml.data.prepare <dataset> --source RAW_DIR --dest OUT_DIR`"


def images_file(split: str) -> str:
    return f"formatted_{split}_images.npy"


def labels_file(split: str) -> str:
    return f"formatted_{split}_labels.npy"


# Every file this layout may hold: only a folder holding nothing else may be replaced.
OWN_FILES = frozenset([META_FILE, OBS_FILE] + [f(s) for s in SPLITS for f in (images_file, labels_file)])


@dataclass(frozen=True)
class Formatted:
    """One prepared data set, official splits, as read (arrays memory-mapped where they can be)."""

    dataset: str
    class_names: list[str]
    image_root: Path
    train_paths: np.ndarray       # image paths relative to image_root
    train_labels: np.ndarray      # int8
    val_paths: np.ndarray
    val_labels: np.ndarray
    train_labels_obs: np.ndarray | None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train_images(self) -> np.ndarray:
        """Absolute image paths, made on each call (millions of images: use train_paths + image_root)."""
        return np.char.add(f"{self.image_root}{os.sep}", self.train_paths)

    @property
    def val_images(self) -> np.ndarray:
        return np.char.add(f"{self.image_root}{os.sep}", self.val_paths)


# Rows checked at a time: the checks' temporaries stay near 16 M cells whatever the data set's size.
_BLOCK_CELLS = 1 << 24


def _check_labels(name: str, labels: np.ndarray) -> np.ndarray:
    """Validate one label matrix block by block and return it as int8; `name` is the file it comes from.

    An int8 matrix is returned as it is (memory-mapped when read from disk); others are
    converted, one byte per cell (the published code's scripts write float64).
    """
    if labels.ndim != 2:
        raise DataError(f"{name} has shape {labels.shape}, expected 2-D (images, classes); rebuild it ({PREPARE_HINT})")
    if labels.dtype.kind not in "biuf":
        raise DataError(f"{name} holds {labels.dtype} values, expected numbers -1, 0 or 1; rebuild it ({PREPARE_HINT})")
    rows = max(1, _BLOCK_CELLS // max(1, labels.shape[1]))
    value, count = None, 0
    for start in range(0, len(labels), rows):
        block = np.asarray(labels[start:start + rows])
        bad = ~np.isin(block, (-1, 0, 1))
        if bad.any():
            value = block[bad][0].item() if value is None else value
            count += int(bad.sum())
    if count:
        raise DataError(
            f"{name} holds value {value} in {count} cell(s); labels must be -1, 0 or 1; rebuild it ({PREPARE_HINT})"
        )
    if labels.dtype == np.int8:
        return labels
    out = np.empty(labels.shape, dtype=np.int8)
    for start in range(0, len(labels), rows):
        out[start:start + rows] = labels[start:start + rows]
    return out


def _check_images(name: str, images: np.ndarray, rows: int, labels_name: str) -> np.ndarray:
    if images.ndim != 1 or images.dtype.kind != "U":
        raise DataError(
            f"{name} must be a 1-D unicode string array, got {images.dtype} with shape {images.shape}; "
            f"save it with np.save(path, np.asarray(paths, dtype=str))"
        )
    if len(images) != rows:
        raise DataError(f"{name} lists {len(images)} images but {labels_name} has {rows} rows; rebuild both ({PREPARE_HINT})")
    return images


def _check_set(
    arrays: dict[str, np.ndarray], class_names: list[str] | None, folder: Path | None = None
) -> dict[str, np.ndarray]:
    """Validate all arrays of one data set together; keys are file names; None skips the names check.

    Errors name the file inside `folder` when the arrays were read from one.
    """

    def shown(name: str) -> str:
        return str(folder / name) if folder is not None else name

    out = {}
    for split in SPLITS:
        labels = _check_labels(shown(labels_file(split)), arrays[labels_file(split)])
        out[labels_file(split)] = labels
        images = arrays[images_file(split)]
        out[images_file(split)] = _check_images(shown(images_file(split)), images, len(labels), labels_file(split))
    obs = arrays.get(OBS_FILE)
    if obs is not None:
        out[OBS_FILE] = _check_labels(shown(OBS_FILE), obs)
        if out[OBS_FILE].shape != out[labels_file("train")].shape:
            raise DataError(
                f"{shown(OBS_FILE)} has shape {out[OBS_FILE].shape} but {labels_file('train')} has "
                f"{out[labels_file('train')].shape}; regenerate the observed labels from these labels"
            )
    num_classes = out[labels_file("train")].shape[1]
    if out[labels_file("val")].shape[1] != num_classes:
        raise DataError(
            f"{shown(labels_file('train'))} has {num_classes} classes but {labels_file('val')} has "
            f"{out[labels_file('val')].shape[1]}; rebuild both ({PREPARE_HINT})"
        )
    if class_names is not None and len(class_names) != num_classes:
        raise DataError(f"{len(class_names)} class names given for {num_classes} label columns; pass one name per column")
    return out


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_image_paths(image_root, paths: list[str], listed_in: str) -> None:
    """Refuse any image path that does not stay inside `image_root`, before an image is opened.

    Paths must be relative, without `..`, and resolve (symlinks followed) to a
    file under the resolved image root. A symlink inside the root is fine, the
    root itself may be one; a link that points out of it is refused like `..`:
    image folders come from archives, and an archive can carry links, so a
    link out of the data set is no more trustworthy than a `..` path. Cheap:
    a `realpath` per folder and one directory listing (`scandir`, whose
    entries say whether they are links) per folder, not a system call per file.
    `listed_in` names the list in the error.
    """
    root = Path(image_root)
    real_root = os.path.realpath(root)

    def refuse(path: str, why: str) -> None:
        raise DataError(f"{listed_in} lists image {path!r}, which is outside the image root {root} ({why}): "
                        f"list paths relative to the image root that stay inside it, or move the images there "
                        f"and {PREPARE_HINT}")

    folders: dict[str, list[tuple[str, str]]] = {}
    for path in paths:   # plain string tests: cheap over 100k+ paths
        if not path or "\0" in path:
            refuse(path, "an empty name or a NUL byte")
        if path.startswith("/"):
            refuse(path, "an absolute path")
        if ".." in path.split("/"):
            refuse(path, "a '..' component")
        folder, _, name = path.rpartition("/")
        folders.setdefault(folder, []).append((name, path))
    for folder, entries in folders.items():
        where = root / folder
        real = os.path.realpath(where)
        if not _inside(real, real_root):
            refuse(entries[0][1], f"its folder {where} resolves to {real}")
        try:
            links = {e.name for e in os.scandir(where) if e.is_symlink()}
        except OSError:
            continue  # a missing folder: its images are reported as unreadable when decoded
        for name, path in entries:
            if name in links:
                target = os.path.realpath(where / name)
                if not _inside(target, real_root):
                    refuse(path, f"{where / name} is a symlink to {target}")


def write_formatted(
    dest,
    *,
    dataset: str,
    class_names,
    image_root,
    train_images,
    train_labels,
    val_images,
    val_labels,
    train_labels_obs=None,
) -> None:
    """Validate and write one data set to `dest`, atomically.

    Image paths must be relative to `image_root`.  Everything is written into a
    temporary folder beside `dest` and renamed into place, so `dest` is either
    the old complete data set or the new complete one, never half of either.
    """
    dest = Path(dest).absolute()
    class_names = [str(c) for c in class_names]
    arrays = {
        images_file("train"): np.asarray(train_images, dtype=str),
        labels_file("train"): np.asarray(train_labels),
        images_file("val"): np.asarray(val_images, dtype=str),
        labels_file("val"): np.asarray(val_labels),
    }
    if train_labels_obs is not None:
        arrays[OBS_FILE] = np.asarray(train_labels_obs)
    arrays = _check_set(arrays, class_names)
    for split in SPLITS:
        check_image_paths(image_root, arrays[images_file(split)].tolist(), f"{split}_images")
    if dest.exists() and not dest.is_dir():
        raise DataError(f"{dest} exists and is not a folder; choose a new --dest")
    if dest.is_dir():
        foreign = sorted(p.name for p in dest.iterdir() if p.name not in OWN_FILES)
        if foreign:
            raise DataError(
                f"{dest} holds other files ({foreign[0]}, ...); choose an empty or new --dest, it is replaced as a whole"
            )
    root = Path(image_root).resolve()
    meta = {
        "dataset": dataset,
        "class_names": class_names,
        "num_classes": len(class_names),
        # relative to the prepared folder, so that the folder and its images copied or moved together (to
        # shared storage, another node) still find each other; the absolute path for the folder moved alone
        "image_root": os.path.relpath(root, dest.resolve()),
        "image_root_absolute": str(root),
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    # not mkdtemp: its 0700 mode would stay on dest and hide the data from other users of shared storage
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for name, array in arrays.items():
            np.save(tmp / name, array, allow_pickle=False)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / "data")
            try:
                os.replace(tmp, dest)
            except OSError:
                os.replace(old / "data", dest)  # put the old data set back
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


_NPY_MAGIC = b"\x93NUMPY"


def _load(root: Path, name: str) -> np.ndarray:
    path = root / name
    if not path.is_file():
        raise DataError(f"{path} is missing; {PREPARE_HINT}")
    # a file cut while written or copied (a full disk, a copy stopped half-way): told as such, not taken
    # for a pickle (numpy's guess for a file without the .npy magic) or left to numpy's EOFError
    with open(path, "rb") as f:
        head = f.read(len(_NPY_MAGIC))
    if not head:
        raise DataError(f"{path} is empty (0 bytes): it was cut while written or copied; copy it again or "
                        f"{PREPARE_HINT}")
    if head != _NPY_MAGIC:
        what = "cut short" if _NPY_MAGIC.startswith(head) else "not a readable .npy file (no .npy header)"
        raise DataError(f"{path} is {what}; copy it again or {PREPARE_HINT}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (EOFError, ValueError) as err:
        if "EOF" in str(err) or "mmap length" in str(err) or isinstance(err, EOFError):
            raise DataError(f"{path} is cut short ({err}); copy it again or {PREPARE_HINT}") from None
        if "allow_pickle" in str(err) or "Python objects" in str(err):
            raise DataError(
                f"{path} is an object array; re-save it as a unicode array: np.save(path, np.asarray(paths, dtype=str))"
            ) from None
        raise DataError(f"{path} is not a readable .npy file ({err}); {PREPARE_HINT}") from None
    except OSError as err:
        raise DataError(f"{path} is not a readable .npy file ({err}); {PREPARE_HINT}") from None


def read_arrays(root) -> dict[str, np.ndarray]:
    """Load and validate the .npy files of a prepared folder as stored, keyed by file name.

    Image paths stay relative and labels become int8; arrays are memory-mapped read-only where
    their type allows; meta.json is not read.
    """
    root = Path(root)
    arrays = {name: _load(root, name) for split in SPLITS for name in (images_file(split), labels_file(split))}
    if (root / OBS_FILE).exists():
        arrays[OBS_FILE] = _load(root, OBS_FILE)
    return _check_set(arrays, None, root)


def _meta_image_root(root: Path, meta: dict) -> Path:
    """Where meta.json says the images are: its `image_root` relative to the prepared folder (written so
    since the folder may move with its images), else where they were when prepared (the folder moved
    alone). meta.json files of earlier versions hold an absolute `image_root` only."""
    given = Path(meta["image_root"])
    if given.is_absolute():
        return given
    beside = root.absolute() / given
    before = meta.get("image_root_absolute")
    if not beside.is_dir() and before and Path(before).is_dir():
        return Path(before)
    return beside


def read_formatted(root, *, image_root=None, dataset: str | None = None) -> Formatted:
    """Load and validate a prepared folder.

    `image_root` overrides meta.json's (for data that moved) and is required
    where meta.json is missing, as in folders the published code wrote.
    `dataset` names such a folder; it defaults to the folder's name.
    """
    root = Path(root)
    meta_path = root / META_FILE
    meta = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            meta["class_names"] = [str(c) for c in meta["class_names"]]
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{meta_path} is unreadable or lacks class_names ({err}); {PREPARE_HINT}") from None
    if image_root is None:
        if "image_root" not in meta:
            raise DataError(
                f"{root} has no {META_FILE} saying where its images live; pass image_root= (the folder the paths "
                f"in {images_file('train')} are relative to), or {PREPARE_HINT}"
            )
        image_root = _meta_image_root(root, meta)
    image_root = Path(os.path.normpath(Path(image_root).absolute()))

    arrays = read_arrays(root)
    for split in SPLITS:
        check_image_paths(image_root, arrays[images_file(split)].tolist(), str(root / images_file(split)))
    num_classes = arrays[labels_file("train")].shape[1]
    class_names = meta.get("class_names") or [f"class_{i}" for i in range(num_classes)]
    if meta.get("num_classes", len(class_names)) != len(class_names) or len(class_names) != num_classes:
        raise DataError(
            f"{meta_path} lists {len(class_names)} class names (num_classes {meta.get('num_classes')}) for "
            f"{num_classes} label columns; {PREPARE_HINT}"
        )

    return Formatted(
        dataset=meta.get("dataset") or dataset or root.resolve().name,
        class_names=class_names,
        image_root=image_root,
        train_paths=arrays[images_file("train")],
        train_labels=arrays[labels_file("train")],
        val_paths=arrays[images_file("val")],
        val_labels=arrays[labels_file("val")],
        train_labels_obs=arrays.get(OBS_FILE),
    )
