"""Tiny copies of the official download layouts, with real JPEGs, for the prepare/download tests.

Each `make_*` writes one layout under `root` and returns what prepare must
produce from it: class names, image root, and per official split the relative
image paths and the label matrix, row by row.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from wsml.data.prepare import VOC_CLASSES


def write_jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def make_prepared(tmp_path: Path, n_train: int, n_val: int) -> Path:
    """A prepared data set (the published layout) of real JPEGs, 3 classes, images under tmp/images."""
    from wsml.data.formats import write_formatted

    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    names = {"train": [f"tr/{i:03d}.jpg" for i in range(n_train)], "val": [f"va/{i:03d}.jpg" for i in range(n_val)]}
    labels = {}
    for split, files in names.items():
        for i, name in enumerate(files):
            write_jpeg(images / name, seed=i + (1000 if split == "val" else 0))
        y = rng.integers(0, 2, size=(len(files), 3))
        y[np.arange(len(files)), np.arange(len(files)) % 3] = 1        # every image has a positive
        labels[split] = y
    write_formatted(tmp_path / "data", dataset="pascal", class_names=["a", "b", "c"], image_root=images,
                    train_images=names["train"], train_labels=labels["train"],
                    val_images=names["val"], val_labels=labels["val"])
    return tmp_path / "data"


def make_voc(root: Path) -> dict:
    """VOC2012 with variable spacing, 0 ("difficult") entries and an image with no positive."""
    voc = root / "VOCdevkit" / "VOC2012"
    # per split: image id -> {class: value}; absent classes are -1.
    plan = {
        "train": {
            "2008_000002": {"dog": 1, "person": 1},
            "2008_000001": {"aeroplane": 1, "cat": 0},
            "2008_000003": {"tvmonitor": 1, "person": 0},
            "2008_000004": {"chair": 0},  # no positive: left out
        },
        "val": {
            "2009_000010": {"bird": 1, "bicycle": 1, "train": 1},
            "2009_000011": {"sofa": 1},
        },
    }
    main = voc / "ImageSets" / "Main"
    main.mkdir(parents=True)
    for split, images in plan.items():
        for cls in VOC_CLASSES:
            lines = []
            for number, (image_id, marks) in enumerate(images.items()):
                value = marks.get(cls, -1)
                # the real files pad positives with two spaces; vary it further
                spacing = (" ", "  ", "\t ", "   ")[number % 4] if value >= 0 else " "
                lines.append(f"{image_id}{spacing}{value}")
            (main / f"{cls}_{split}.txt").write_text("\n".join(lines) + "\n")
        for seed, image_id in enumerate(images):
            write_jpeg(voc / "JPEGImages" / f"{image_id}.jpg", seed)
    expected = {"class_names": list(VOC_CLASSES), "image_root": voc / "JPEGImages"}
    for split, images in plan.items():
        kept = sorted(i for i, marks in images.items() if 1 in marks.values())
        labels = np.zeros((len(kept), 20), dtype=np.int8)
        for row, image_id in enumerate(kept):
            for cls, value in images[image_id].items():
                labels[row, VOC_CLASSES.index(cls)] = value == 1
        expected[split] = ([f"{i}.jpg" for i in kept], labels)
    return expected


COCO_CATEGORIES = [(90, "toothbrush"), (1, "person"), (7, "train"), (3, "car")]  # unsorted, not contiguous


def make_coco(root: Path) -> dict:
    """COCO 2014 with non-contiguous category ids, ids that sort differently as strings, and an unannotated image."""
    plan = {
        "train": {9: [1, 3, 1], 10: [90], 100: [7, 3], 55: []},  # 55 has no annotation
        "val": {2: [3], 30: [1, 90]},
    }
    columns = {cid: col for col, cid in enumerate(sorted(c for c, _ in COCO_CATEGORIES))}
    (root / "annotations").mkdir(parents=True)
    expected = {"class_names": ["person", "car", "train", "toothbrush"], "image_root": root}
    annotation_id = 0
    for split, images in plan.items():
        data = {"images": [], "annotations": [], "categories": [{"id": c, "name": n, "supercategory": "x"} for c, n in COCO_CATEGORIES]}
        for image_id, categories in images.items():
            file_name = f"COCO_{split}2014_{image_id:012d}.jpg"
            data["images"].append({"id": image_id, "file_name": file_name, "width": 8, "height": 6})
            write_jpeg(root / f"{split}2014" / file_name, image_id)
            for category in categories:
                annotation_id += 1
                data["annotations"].append({"id": annotation_id, "image_id": image_id, "category_id": category, "bbox": [0, 0, 1, 1]})
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))
        kept = sorted((i for i, c in images.items() if c), key=str)
        labels = np.zeros((len(kept), len(columns)), dtype=np.int8)
        for row, image_id in enumerate(kept):
            labels[row, [columns[c] for c in images[image_id]]] = 1
        expected[split] = ([f"{split}2014/COCO_{split}2014_{i:012d}.jpg" for i in kept], labels)
    return expected


CUB_ATTRIBUTES = ["has_bill_shape::curved_(up_or_down)", "has_bill_shape::dagger", "has_wing_color::blue", "has_size::small_(5_-_9_in)", "has_crown_color::red"]


def make_cub(root: Path) -> dict:
    """CUB_200_2011 with 5 attributes; some label lines carry extra fields, as in the real file."""
    cub = root / "CUB_200_2011"
    images = [  # (image id, path, is_train, present attributes 1-based)
        (1, "001.Black_footed_Albatross/Black_Footed_Albatross_0001_1.jpg", 1, {1, 3}),
        (2, "001.Black_footed_Albatross/Black_Footed_Albatross_0002_2.jpg", 0, {5}),
        (3, "002.Laysan_Albatross/Laysan_Albatross_0003_3.jpg", 1, set()),
        (4, "002.Laysan_Albatross/Laysan_Albatross_0004_4.jpg", 0, {1, 2, 3, 4, 5}),
        (5, "003.Sooty_Albatross/Sooty_Albatross_0005_5.jpg", 1, {4}),
    ]
    (cub / "attributes").mkdir(parents=True)
    (root / "attributes.txt").write_text("".join(f"{i} {name}\n" for i, name in enumerate(CUB_ATTRIBUTES, 1)))
    (cub / "images.txt").write_text("".join(f"{i} {p}\n" for i, p, _, _ in images))
    (cub / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, t, _ in images))
    lines = []
    for image_id, _, _, present in images:
        for attribute in range(1, len(CUB_ATTRIBUTES) + 1):
            line = f"{image_id} {attribute} {int(attribute in present)} 3 {image_id * 1.5 + attribute:.3f}"
            if (image_id + attribute) % 4 == 0:
                line += " 0 1"  # a line with 7 fields
            lines.append(line)
    (cub / "attributes" / "image_attribute_labels.txt").write_text("\n".join(lines) + "\n")
    for image_id, path, _, _ in images:
        write_jpeg(cub / "images" / path, image_id)
    expected = {"class_names": list(CUB_ATTRIBUTES), "image_root": cub / "images"}
    for split, flag in (("train", 1), ("val", 0)):
        chosen = [(p, present) for _, p, t, present in images if t == flag]
        labels = np.zeros((len(chosen), len(CUB_ATTRIBUTES)), dtype=np.int8)
        for row, (_, present) in enumerate(chosen):
            labels[row, [a - 1 for a in present]] = 1
        expected[split] = ([p for p, _ in chosen], labels)
    return expected


def make_cub_archive(path: Path, work: Path) -> dict:
    """CUB_200_2011.tgz as Caltech ships it: attributes.txt and CUB_200_2011/ at the top."""
    expected = make_cub(work)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(work / "attributes.txt", arcname="attributes.txt")
        tar.add(work / "CUB_200_2011", arcname="CUB_200_2011")
    return expected


def make_nuswide(root: Path) -> dict:
    """The authors' formatted arrays for 81 concepts, plus Flickr/ images."""
    rng = np.random.default_rng(3)
    expected = {"image_root": root / "Flickr"}
    for split, count in (("train", 4), ("val", 3)):
        paths = [f"{'actor' if i % 2 else 'airport'}/{split}_{i:04d}.jpg" for i in range(count)]
        labels = (rng.random((count, 81)) < 0.1).astype(np.float64)  # the published arrays are float
        for seed, p in enumerate(paths):
            write_jpeg(root / "Flickr" / p, seed)
        np.save(root / f"formatted_{split}_images.npy", np.asarray(paths))
        np.save(root / f"formatted_{split}_labels.npy", labels)
        expected[split] = (paths, labels.astype(np.int8))
    return expected
