"""prepare builds the formatted layout from tiny copies of the official downloads; formats reads and writes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import fixtures_official as fx
from wsml.data import formats, prepare
from wsml.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def assert_matches(data: formats.Formatted, expected: dict, dataset: str) -> None:
    """Every row, path and cell as the fixture intended."""
    root = Path(expected["image_root"]).resolve()
    assert data.dataset == dataset
    assert data.class_names == expected["class_names"]
    assert data.image_root == root
    for split in ("train", "val"):
        paths, labels = expected[split]
        got_images = getattr(data, f"{split}_images")
        got_labels = getattr(data, f"{split}_labels")
        assert got_images.tolist() == [str(root / p) for p in paths]
        assert got_labels.dtype == np.int8
        np.testing.assert_array_equal(got_labels, labels)
        assert all(Path(p).is_file() for p in got_images)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_pascal_spacing_zero_entries_and_warnings(tmp_path, caplog):
    expected = fx.make_voc(tmp_path / "raw")
    dest = prepare.prepare("pascal", tmp_path / "raw", tmp_path / "out")
    data = formats.read_formatted(dest)
    assert_matches(data, expected, "pascal")
    # 0 ("difficult") is not a positive; the image with only a 0 is left out
    assert data.train_labels[0, prepare.VOC_CLASSES.index("cat")] == 0
    assert "2008_000004.jpg" not in " ".join(data.train_images)
    assert data.train_labels_obs is None
    meta = json.loads((dest / "meta.json").read_text())
    root = expected["image_root"].resolve()
    assert meta == {"dataset": "pascal", "class_names": list(prepare.VOC_CLASSES), "num_classes": 20,
                    "image_root": os.path.relpath(root, dest.resolve()), "image_root_absolute": str(root)}
    # the stored paths are relative, as the published code stores them
    assert np.load(dest / "formatted_val_images.npy").tolist() == expected["val"][0]
    warnings = [r.getMessage() for r in caplog.records if r.name == "wsml.data.prepare"]
    assert warnings == ["warning: pascal: 3 official train images, the official data set has 5717", "warning: pascal: 2 official val images, the official data set has 5823"]


@pytest.mark.parametrize("inner", ["VOCdevkit", "VOCdevkit/VOC2012"])
def test_pascal_source_may_point_inside(tmp_path, inner):
    expected = fx.make_voc(tmp_path / "raw")
    dest = prepare.prepare("pascal", tmp_path / "raw" / inner, tmp_path / "out")
    assert_matches(formats.read_formatted(dest), expected, "pascal")


def test_coco_noncontiguous_ids_and_unannotated_image(tmp_path):
    expected = fx.make_coco(tmp_path / "raw")
    data = formats.read_formatted(prepare.prepare("coco", tmp_path / "raw", tmp_path / "out"))
    assert_matches(data, expected, "coco")
    # columns follow sorted category ids 1, 3, 7, 90; rows the published string order 10, 100, 9
    assert data.class_names == ["person", "car", "train", "toothbrush"]
    assert [Path(p).name[-8:-4] for p in data.train_images] == ["0010", "0100", "0009"]
    np.testing.assert_array_equal(data.train_labels, [[0, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0]])
    assert not any("000000000055" in p for p in data.train_images)


@pytest.mark.parametrize("inner", ["", "CUB_200_2011"])
def test_cub_reads_first_three_fields(tmp_path, inner):
    expected = fx.make_cub(tmp_path / "raw")
    labels_file = tmp_path / "raw" / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt"
    assert max(len(line.split()) for line in labels_file.read_text().splitlines()) >= 7
    data = formats.read_formatted(prepare.prepare("cub", tmp_path / "raw" / inner, tmp_path / "out"))
    assert_matches(data, expected, "cub")
    np.testing.assert_array_equal(data.val_labels, [[0, 0, 0, 0, 1], [1, 1, 1, 1, 1]])


def test_nuswide_validates_and_writes_meta(tmp_path):
    expected = fx.make_nuswide(tmp_path / "raw")
    obs = np.zeros_like(expected["train"][1])
    obs[:, 5] = 1
    np.save(tmp_path / "raw" / "formatted_train_labels_obs.npy", obs)
    expected["class_names"] = list(prepare.NUSWIDE_CONCEPTS)
    data = formats.read_formatted(prepare.prepare("nuswide", tmp_path / "raw", tmp_path / "out"))
    assert_matches(data, expected, "nuswide")
    np.testing.assert_array_equal(data.train_labels_obs, obs)
    assert len(prepare.NUSWIDE_CONCEPTS) == len(set(prepare.NUSWIDE_CONCEPTS)) == 81


def test_cli_success_and_missing_file(tmp_path):
    fx.make_cub(tmp_path / "raw")
    run = [sys.executable, "-m", "wsml.data.prepare", "cub", "--source", str(tmp_path / "raw")]
    ok = subprocess.run(run + ["--dest", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"cub: 3 train / 2 val images, 5 classes -> {tmp_path / 'out'}"
    assert "warning: cub: 5 classes, the official data set has 312" in ok.stderr.splitlines()

    (tmp_path / "raw" / "CUB_200_2011" / "train_test_split.txt").unlink()
    bad = subprocess.run(run + ["--dest", str(tmp_path / "out2")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: missing ") and "train_test_split.txt" in lines[0]
    assert "--source should point at the folder holding attributes.txt" in lines[0]
    assert not (tmp_path / "out2").exists()


def test_missing_voc_class_file_names_it(tmp_path, capsys):
    fx.make_voc(tmp_path / "raw")
    (tmp_path / "raw" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main" / "sofa_val.txt").unlink()
    assert prepare.main(["pascal", "--source", str(tmp_path / "raw"), "--dest", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: missing ") and err.endswith("(extracted from VOCtrainval_11-May-2012.tar)")
    assert "sofa_val.txt" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_source_without_the_layout(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert prepare.main(["pascal", "--source", str(tmp_path / "empty"), "--dest", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: missing VOCdevkit/VOC2012/ImageSets/Main under {tmp_path / 'empty'}")
    assert not (tmp_path / "out").exists()


def test_missing_image_is_an_error(tmp_path):
    expected = fx.make_coco(tmp_path / "raw")
    (tmp_path / "raw" / expected["val"][0][1]).unlink()
    with pytest.raises(DataError) as excinfo:
        prepare.prepare("coco", tmp_path / "raw", tmp_path / "out")
    assert one_line_error(excinfo).startswith(f"1 of 5 listed images are missing under {tmp_path / 'raw'}, e.g. {expected['val'][0][1]}")
    assert not (tmp_path / "out").exists()


def test_label_value_two_is_rejected(tmp_path, capsys):
    expected = fx.make_nuswide(tmp_path / "raw")
    labels = expected["val"][1].copy()
    labels[0, :3] = 2
    np.save(tmp_path / "raw" / "formatted_val_labels.npy", labels)
    assert prepare.main(["nuswide", "--source", str(tmp_path / "raw"), "--dest", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'raw' / 'formatted_val_labels.npy'} holds value 2 in 3 cell(s); labels must be -1, 0 or 1")
    assert "\n" not in err and not (tmp_path / "out").exists()


def test_cub_is_present_two_is_rejected(tmp_path):
    fx.make_cub(tmp_path / "raw")
    path = tmp_path / "raw" / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt"
    path.write_text(path.read_text().replace("2 3 0 3", "2 3 2 3", 1))
    with pytest.raises(DataError) as excinfo:
        prepare.prepare("cub", tmp_path / "raw", tmp_path / "out")
    assert "has is_present 2, expected 0 or 1" in one_line_error(excinfo)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"formatted_train_labels.npy": np.zeros(4)}, "raw/formatted_train_labels.npy has shape (4,), expected 2-D"),
        ({"formatted_val_labels.npy": np.zeros((3, 80))}, "formatted_train_labels.npy has 81 classes but formatted_val_labels.npy has 80"),
        ({"formatted_train_images.npy": np.asarray(["a.jpg"])}, "formatted_train_images.npy lists 1 images but formatted_train_labels.npy has 4 rows"),
        ({"formatted_train_labels_obs.npy": np.zeros((4, 80))}, "formatted_train_labels_obs.npy has shape (4, 80) but formatted_train_labels.npy has (4, 81)"),
        ({"formatted_val_images.npy": np.asarray(["a", None], dtype=object)}, "is an object array; re-save it as a unicode array"),
    ],
)
def test_wrong_shapes_are_rejected(tmp_path, change, message):
    fx.make_nuswide(tmp_path / "raw")
    for name, array in change.items():
        np.save(tmp_path / "raw" / name, array, allow_pickle=True)
    with pytest.raises(DataError) as excinfo:
        prepare.prepare("nuswide", tmp_path / "raw", tmp_path / "out")
    assert message in one_line_error(excinfo)
    assert not (tmp_path / "out").exists()


def write_small(dest: Path, image_root: Path, val_labels) -> None:
    formats.write_formatted(
        dest,
        dataset="toy",
        class_names=["a", "b"],
        image_root=image_root,
        train_images=["x/1.jpg", "x/2.jpg"],
        train_labels=[[1, 0], [0, 1]],
        val_images=["y/3.jpg"],
        val_labels=val_labels,
    )


def test_write_replaces_only_complete_and_own_folders(tmp_path):
    dest = tmp_path / "out"
    write_small(dest, tmp_path / "imgs", [[1, 1]])
    with pytest.raises(DataError) as excinfo:
        write_small(dest, tmp_path / "imgs", [[1, 5]])
    assert "formatted_val_labels.npy holds value 5 in 1 cell(s)" in one_line_error(excinfo)
    # the failed write left the old data set and no temporary folders
    np.testing.assert_array_equal(formats.read_formatted(dest).val_labels, [[1, 1]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    write_small(dest, tmp_path / "imgs", [[-1, 0]])
    data = formats.read_formatted(dest)
    np.testing.assert_array_equal(data.val_labels, [[-1, 0]])
    assert data.val_images.tolist() == [str(tmp_path / "imgs" / "y" / "3.jpg")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(DataError) as excinfo:
        write_small(tmp_path / "mine", tmp_path / "imgs", [[1, 1]])
    assert "holds other files (notes.txt, ...); choose an empty or new --dest" in one_line_error(excinfo)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_write_rejects_paths_outside_image_root(tmp_path):
    with pytest.raises(DataError) as excinfo:
        formats.write_formatted(
            tmp_path / "out", dataset="toy", class_names=["a"], image_root=tmp_path,
            train_images=["../etc/x.jpg"], train_labels=[[1]], val_images=["/abs.jpg"], val_labels=[[0]],
        )  # fmt: skip
    assert "train_images lists image '../etc/x.jpg', which is outside the image root" in one_line_error(excinfo)
    assert not (tmp_path / "out").exists()


def test_read_published_folder_without_meta(tmp_path):
    expected = fx.make_nuswide(tmp_path / "raw")
    with pytest.raises(DataError) as excinfo:
        formats.read_formatted(tmp_path / "raw")
    assert "has no meta.json saying where its images live; pass image_root=" in one_line_error(excinfo)
    data = formats.read_formatted(tmp_path / "raw", image_root=tmp_path / "raw" / "Flickr", dataset="nuswide")
    expected["class_names"] = [f"class_{i}" for i in range(81)]
    assert_matches(data, expected, "nuswide")


def test_read_names_the_missing_file(tmp_path):
    fx.make_nuswide(tmp_path / "raw")
    (tmp_path / "raw" / "formatted_val_images.npy").unlink()
    with pytest.raises(DataError) as excinfo:
        formats.read_formatted(tmp_path / "raw", image_root=tmp_path)
    message = one_line_error(excinfo)
    assert message.startswith(f"{tmp_path / 'raw' / 'formatted_val_images.npy'} is missing; run `python -m wsml.data.prepare")
