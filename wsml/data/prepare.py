"""Build the formatted layout (see wsml.data.formats) from the official downloads.

    python -m wsml.data.prepare <pascal|coco|cub|nuswide> --source RAW_DIR --dest OUT_DIR

What --source must hold, per data set ("train"/"val" below are official splits):

* pascal - the extracted VOCtrainval_11-May-2012.tar: `VOCdevkit/VOC2012/`
  with `ImageSets/Main/<class>_{train,val}.txt` and `JPEGImages/<id>.jpg`.
  --source may also be `VOCdevkit/` or `VOC2012/` itself.  Only label 1 is
  positive (0 "difficult" and -1 are not).  As in the published code, images
  with no positive are left out and rows are sorted by file name.
* coco - `annotations/instances_{train,val}2014.json`, `train2014/`, `val2014/`.
  Category ids are mapped in sorted order to columns 0..79.  Images without an
  annotation are left out; rows follow the published code's order (image ids
  sorted as strings), so its train/validation split is reproduced.
* cub - the extracted CUB_200_2011.tgz: `attributes.txt` beside
  `CUB_200_2011/`, which holds `images.txt`, `train_test_split.txt`,
  `attributes/image_attribute_labels.txt` and `images/`.  --source may also be
  `CUB_200_2011/` itself.  Label = is_present of each image's 312 attributes;
  official train (is_training_image 1) becomes formatted_train, test
  becomes formatted_val.
* nuswide - the re-crawled subset the published code's authors distribute:
  `formatted_{train,val}_{images,labels}.npy` (image paths relative to
  `Flickr/`, labels (N, 81)), optionally `formatted_train_labels_obs.npy`,
  and the images unpacked from Flickr.zip into `Flickr/`.  Column names come
  from `Concepts81.txt` (one name a line) where the folder has one, else the
  81 NUS-WIDE concepts in their official (alphabetical) order.

The output holds relative image paths plus a meta.json with the absolute
image folder, so OUT_DIR may live elsewhere (shared storage) while the images
stay in RAW_DIR.  Counts that differ from the official ones are warnings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from wsml.data import formats
from wsml.errors import DataError, WSMLError
from wsml.logs import show_on_stderr

_logger = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

NUSWIDE_CONCEPTS = (
    "airport", "animal", "beach", "bear", "birds", "boats", "book", "bridge", "buildings", "cars",
    "castle", "cat", "cityscape", "clouds", "computer", "coral", "cow", "dancing", "dog", "earthquake",
    "elk", "fire", "fish", "flags", "flowers", "food", "fox", "frost", "garden", "glacier",
    "grass", "harbor", "horses", "house", "lake", "leaf", "map", "military", "moon", "mountain",
    "nighttime", "ocean", "person", "plane", "plants", "police", "protest", "railroad", "rainbow", "reflection",
    "road", "rocks", "running", "sand", "sign", "sky", "snow", "soccer", "sports", "statue",
    "street", "sun", "sunset", "surf", "swimmers", "tattoo", "temple", "tiger", "tower", "town",
    "toy", "train", "tree", "valley", "vehicle", "water", "waterfall", "wedding", "whales", "window",
    "zebra",
)  # fmt: skip

# (classes, official train images, official val images); None: no official count.
OFFICIAL_COUNTS = {
    "pascal": (20, 5717, 5823),
    "coco": (80, 82081, 40137),
    "cub": (312, 5994, 5794),
    "nuswide": (81, None, None),
}
DATASETS = tuple(OFFICIAL_COUNTS)


@dataclass
class Built:
    """One data set read from its official files; image paths relative to image_root."""

    class_names: list[str]
    image_root: Path
    train_images: list[str]
    train_labels: np.ndarray
    val_images: list[str]
    val_labels: np.ndarray
    train_labels_obs: np.ndarray | None = None


def _pick(source: Path, candidates: list[Path], probe: Path, shown: Path, hint: str) -> Path:
    """The first candidate folder holding `probe`; the error names the path the first candidate implies."""
    for folder in candidates:
        if (folder / probe).exists():
            return folder
    raise DataError(f"missing {shown} under {source}; {hint}")


def _require(path: Path, hint: str) -> Path:
    if not path.exists():
        raise DataError(f"missing {path}; {hint}")
    return path


def _check_images_exist(image_root: Path, rel_paths: list[str], hint: str) -> None:
    """Every listed image must exist: one directory listing per folder, not one stat per file (fast on NFS)."""
    listings: dict[str, set[str]] = {}
    missing = []
    for rel in rel_paths:
        folder, _, name = rel.rpartition("/")
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(image_root / folder))
            except (FileNotFoundError, NotADirectoryError):
                listings[folder] = set()
        if name not in listings[folder]:
            missing.append(rel)
    if missing:
        raise DataError(
            f"{len(missing)} of {len(rel_paths)} listed images are missing under {image_root}, e.g. {missing[0]}; {hint}"
        )


def build_pascal(source: Path) -> Built:
    hint = "--source should point at the folder holding VOCdevkit/ (extracted from VOCtrainval_11-May-2012.tar)"
    main = Path("ImageSets") / "Main"
    candidates = [source / "VOCdevkit" / "VOC2012", source / "VOC2012", source]
    voc = _pick(source, candidates, main, Path("VOCdevkit/VOC2012") / main, hint)
    splits = {}
    for split in ("train", "val"):
        positives: dict[str, set[int]] = {}
        for column, cls in enumerate(VOC_CLASSES):
            path = _require(voc / main / f"{cls}_{split}.txt", hint)
            for number, line in enumerate(path.read_text().splitlines(), 1):
                tokens = line.split()
                if not tokens:
                    continue
                if len(tokens) != 2 or tokens[1] not in ("1", "0", "-1"):
                    raise DataError(
                        f"{path} line {number} reads {line!r}, expected '<image id> <1|0|-1>'; "
                        "re-extract VOCtrainval_11-May-2012.tar"
                    )
                if tokens[1] == "1":
                    positives.setdefault(tokens[0] + ".jpg", set()).add(column)
        images = sorted(positives)
        labels = np.zeros((len(images), len(VOC_CLASSES)), dtype=np.int8)
        for row, image in enumerate(images):
            labels[row, sorted(positives[image])] = 1
        splits[split] = (images, labels)
    image_root = voc / "JPEGImages"
    all_images = splits["train"][0] + splits["val"][0]
    _check_images_exist(image_root, all_images, f"extract the complete VOCtrainval_11-May-2012.tar; {hint}")
    return Built(list(VOC_CLASSES), image_root, *splits["train"], *splits["val"])


def build_coco(source: Path) -> Built:
    hint = "--source should point at the folder holding annotations/, train2014/ and val2014/ (COCO 2014)"
    again = "download annotations_trainval2014.zip again"
    root = _pick(source, [source, source.parent], Path("annotations"), Path("annotations"), hint)
    class_ids: list[int] | None = None
    class_names: list[str] = []
    splits = {}
    for split in ("train", "val"):
        path = _require(root / "annotations" / f"instances_{split}2014.json", hint)
        try:
            data = json.loads(path.read_text())
            categories = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
            files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
            pair_list = [(int(a["image_id"]), int(a["category_id"])) for a in data["annotations"]]
            pairs = np.array(pair_list, dtype=np.int64).reshape(-1, 2)
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{path} is not a COCO instances file ({err!r}); {again}") from None
        if class_ids is None:
            class_ids = [c for c, _ in categories]
            class_names = [n for _, n in categories]
        elif [c for c, _ in categories] != class_ids:
            raise DataError(f"{path} lists other categories than instances_train2014.json; {again}")
        column_of = np.full(max(class_ids) + 1, -1)
        column_of[class_ids] = np.arange(len(class_ids))
        categories_used = pairs[:, 1]
        listed = (categories_used >= 0) & (categories_used < len(column_of))
        listed[listed] = column_of[categories_used[listed]] >= 0
        if not listed.all():
            raise DataError(f"{path} annotates category id {categories_used[~listed][0]}, which its categories lack; {again}")
        # The published code sorts image ids as strings; its split seed relies on that order.
        image_ids = sorted({str(i) for i in pairs[:, 0].tolist()})
        unlisted = [i for i in image_ids if int(i) not in files]
        if unlisted:
            raise DataError(f"{path} annotates image id {unlisted[0]}, which its images do not list; {again}")
        row_of = {int(i): row for row, i in enumerate(image_ids)}
        labels = np.zeros((len(image_ids), len(class_ids)), dtype=np.int8)
        labels[[row_of[i] for i in pairs[:, 0].tolist()], column_of[pairs[:, 1]]] = 1
        splits[split] = ([f"{split}2014/{files[int(i)]}" for i in image_ids], labels)
    _check_images_exist(root, splits["train"][0] + splits["val"][0], f"unzip train2014.zip and val2014.zip into {root}")
    return Built(class_names, root, *splits["train"], *splits["val"])


def _read_columns(path: Path, columns: int, hint: str) -> pd.DataFrame:
    """The first `columns` whitespace-separated integer fields of every line; extra fields are ignored."""
    try:
        return pd.read_csv(
            path, sep=r"\s+", header=None, names=range(columns), usecols=range(columns), index_col=False, dtype=np.int64
        )
    except (ValueError, pd.errors.ParserError) as err:
        raise DataError(f"{path} is malformed ({str(err).splitlines()[0]}); {hint}") from None


def build_cub(source: Path) -> Built:
    hint = "--source should point at the folder holding attributes.txt and CUB_200_2011/ (extracted from CUB_200_2011.tgz)"
    # the published code's folder nests CUB_200_2011/CUB_200_2011
    candidates = [source / "CUB_200_2011", source / "CUB_200_2011" / "CUB_200_2011", source]
    cub = _pick(source, candidates, Path("images.txt"), Path("CUB_200_2011/images.txt"), hint)
    places = (cub.parent / "attributes.txt", cub / "attributes.txt", cub / "attributes" / "attributes.txt")
    attributes_txt = next((p for p in places if p.is_file()), None)
    if attributes_txt is None:
        raise DataError(f"missing attributes.txt beside {cub}; {hint}")
    class_names = []
    for line in attributes_txt.read_text().splitlines():
        if line.strip():
            number, _, name = line.strip().partition(" ")
            class_names.append(name.strip() or number)

    images_txt = cub / "images.txt"
    entries = [line.split(maxsplit=1) for line in images_txt.read_text().splitlines() if line.strip()]
    if any(len(e) != 2 or not e[0].isdigit() for e in entries):
        raise DataError(f"{images_txt} has a line that is not '<image id> <path>'; {hint}")
    image_ids = np.array([int(e[0]) for e in entries])
    paths = [e[1].strip() for e in entries]
    row_of = np.full(image_ids.max(initial=0) + 1, -1)
    row_of[image_ids] = np.arange(len(image_ids))

    split_path = _require(cub / "train_test_split.txt", hint)
    split = _read_columns(split_path, 2, hint).to_numpy()
    if not np.isin(split[:, 1], (0, 1)).all():
        raise DataError(f"{split_path} has is_training_image {split[~np.isin(split[:, 1], (0, 1)), 1][0]}, expected 0 or 1; {hint}")
    is_train = np.full(len(image_ids), -1)
    known = (split[:, 0] >= 0) & (split[:, 0] < len(row_of))
    known[known] = row_of[split[known, 0]] >= 0
    is_train[row_of[split[known, 0]]] = split[known, 1]
    if (is_train < 0).any():
        missing = image_ids[is_train < 0][0]
        raise DataError(f"{split_path} gives no split for image {missing} of images.txt; {hint}")

    labels_path = _require(cub / "attributes" / "image_attribute_labels.txt", hint)
    table = _read_columns(labels_path, 3, hint).to_numpy()
    image, attribute, present = table[:, 0], table[:, 1], table[:, 2]
    bad_image = (image < 0) | (image >= len(row_of))
    bad_image[~bad_image] = row_of[image[~bad_image]] < 0
    if bad_image.any():
        raise DataError(f"{labels_path} names image {image[bad_image][0]}, which images.txt does not list; {hint}")
    bad_attribute = (attribute < 1) | (attribute > len(class_names))
    if bad_attribute.any():
        raise DataError(
            f"{labels_path} names attribute {attribute[bad_attribute][0]}, but attributes.txt lists {len(class_names)}; {hint}"
        )
    if not np.isin(present, (0, 1)).all():
        raise DataError(f"{labels_path} has is_present {present[~np.isin(present, (0, 1))][0]}, expected 0 or 1; {hint}")
    if len(table) != len(image_ids) * len(class_names):
        expected = f"{len(image_ids)} x {len(class_names)}"
        _logger.warning(f"warning: {labels_path} has {len(table)} lines, expected {expected}; missing entries count as absent")
    labels = np.zeros((len(image_ids), len(class_names)), dtype=np.int8)
    labels[row_of[image], attribute - 1] = present

    image_root = cub / "images"
    _check_images_exist(image_root, paths, f"extract the complete CUB_200_2011.tgz; {hint}")
    train = is_train == 1
    return Built(
        class_names,
        image_root,
        [p for p, t in zip(paths, train) if t],
        labels[train],
        [p for p, t in zip(paths, train) if not t],
        labels[~train],
    )


def build_nuswide(source: Path) -> Built:
    hint = (
        "--source should point at the folder holding the formatted_{train,val}_{images,labels}.npy files of the "
        "published code's authors and Flickr/ unpacked from Flickr.zip"
    )
    for split in formats.SPLITS:
        for name in (formats.images_file(split), formats.labels_file(split)):
            _require(source / name, hint)
    arrays = formats.read_arrays(source)
    image_root = _require(source / "Flickr", hint)
    concepts = source / "Concepts81.txt"
    num_classes = arrays[formats.labels_file("train")].shape[1]
    if concepts.is_file():
        class_names = [line.strip() for line in concepts.read_text().splitlines() if line.strip()]
    elif num_classes == len(NUSWIDE_CONCEPTS):
        class_names = list(NUSWIDE_CONCEPTS)
    else:
        raise DataError(
            f"{source} has {num_classes} label columns, not NUS-WIDE's 81; "
            "put a Concepts81.txt naming each column (one a line) beside the .npy files"
        )
    train_images = arrays[formats.images_file("train")].tolist()
    val_images = arrays[formats.images_file("val")].tolist()
    _check_images_exist(image_root, train_images + val_images, f"unzip Flickr.zip into {source}")
    return Built(
        class_names,
        image_root,
        train_images,
        arrays[formats.labels_file("train")],
        val_images,
        arrays[formats.labels_file("val")],
        arrays.get(formats.OBS_FILE),
    )


BUILDERS = {"pascal": build_pascal, "coco": build_coco, "cub": build_cub, "nuswide": build_nuswide}


def prepare(dataset: str, source, dest) -> Path:
    """Read the official files of `dataset` under `source`, write the formatted layout to `dest`; returns dest."""
    if dataset not in BUILDERS:
        raise DataError(f"unknown data set {dataset!r}; choose one of {', '.join(DATASETS)}")
    source = Path(source).absolute()
    if not source.is_dir():
        raise DataError(f"--source {source} is not a folder; point it at the extracted {dataset} download")
    built = BUILDERS[dataset](source)
    classes, n_train, n_val = OFFICIAL_COUNTS[dataset]
    for what, got, want in (
        ("classes", len(built.class_names), classes),
        ("official train images", len(built.train_images), n_train),
        ("official val images", len(built.val_images), n_val),
    ):
        if want is not None and got != want:
            _logger.warning(f"warning: {dataset}: {got} {what}, the official data set has {want}")
    dest = Path(dest).absolute()
    formats.write_formatted(
        dest,
        dataset=dataset,
        class_names=built.class_names,
        image_root=built.image_root,
        train_images=built.train_images,
        train_labels=built.train_labels,
        val_images=built.val_images,
        val_labels=built.val_labels,
        train_labels_obs=built.train_labels_obs,
    )
    return dest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsml.data.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--source", required=True, help="folder of the official download (see the module docstring)")
    parser.add_argument("--dest", required=True, help="output folder for formatted_*.npy and meta.json")
    args = parser.parse_args(argv)
    show_on_stderr()
    try:
        dest = prepare(args.dataset, args.source, args.dest)
        data = formats.read_formatted(dest)
    except WSMLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = f"{len(data.train_images)} train / {len(data.val_images)} val images, {data.num_classes} classes"
    print(f"{args.dataset}: {counts} -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
