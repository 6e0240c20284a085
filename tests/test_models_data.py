"""models/: the data loaders on the shipped real data (MVTec AD hazelnut subset, MNIST IDX)."""
from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from models.data import MNIST_IDX_SPLIT, build_dataset, read_idx
from models_support import HAZELNUT, MNIST, needs_hazelnut, needs_mnist, single_thread  # noqa: F401  (autouse fixture)


def check_hazelnut(root, size=32):
    train = build_dataset("mvtec", str(root), "train", size=size)
    test = build_dataset("mvtec", str(root), "test", size=size)
    assert len(train) == 28 and set(train.labels) == {0}
    assert len(test) == 23 and sum(test.labels) == 17 and test.has_masks
    item = train[1]  # 01.jpg is 512x522: resized to a square as well
    assert item["image"].shape == (3, size, size)
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    masks = torch.stack([test[i]["mask"] for i in range(len(test))])
    labels = torch.tensor(test.labels)
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert (masks[labels == 1].flatten(1).sum(1) > 0).all() and masks[labels == 0].sum() == 0
    return test


@needs_hazelnut
def test_hazelnut_subset_with_stem_png_masks():
    check_hazelnut(HAZELNUT)


@needs_hazelnut
def test_hazelnut_subset_with_mvtec_mask_names(tmp_path):
    root = tmp_path / "hazelnut"
    shutil.copytree(HAZELNUT, root)
    for mask in (root / "ground_truth" / "colour").iterdir():
        mask.rename(mask.with_name(f"{mask.stem}_mask.png"))
    check_hazelnut(root)
    (root / "ground_truth" / "colour" / "03_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"03_mask.png or .*03.png"):
        build_dataset("mvtec", str(root), "test", size=32)


@needs_hazelnut
def test_training_flips(tmp_path):
    data = build_dataset("mvtec", str(HAZELNUT), "train", size=32, augment=True)
    plain = build_dataset("mvtec", str(HAZELNUT), "train", size=32)[0]["image"]
    flips = {plain.flip(-1).numpy().tobytes(), plain.flip(-2).numpy().tobytes(),
             plain.flip(-1).flip(-2).numpy().tobytes(), plain.numpy().tobytes()}
    torch.manual_seed(0)
    seen = {data[0]["image"].numpy().tobytes() for _ in range(30)}
    assert seen == flips


@needs_mnist
def test_mnist_idx_one_class_split():
    train = build_dataset("mnist", str(MNIST), "train", size=32, normal_class=3)
    test = build_dataset("mnist", str(MNIST), "test", size=32, normal_class=3)
    digits = read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")
    assert len(train) == int((digits[:MNIST_IDX_SPLIT] == 3).sum())
    assert len(test) == len(digits) - MNIST_IDX_SPLIT
    assert sum(test.labels) == int((digits[MNIST_IDX_SPLIT:] != 3).sum())
    item = test[0]
    assert item["image"].shape == (1, 32, 32) and item["label"] == int(digits[MNIST_IDX_SPLIT] != 3)
    assert test.names[0] == f"mnist-test-{MNIST_IDX_SPLIT}" and not test.has_masks
    assert item["image"].min() == -1  # MNIST's black background


@needs_mnist
def test_mnist_torchvision_layout(tmp_path):
    # torchvision's layout, built from the shipped t10k files (standing in for the train files too).
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for kind in ("images-idx3", "labels-idx1"):
        data = gzip.decompress((MNIST / f"t10k-{kind}-ubyte.gz").read_bytes())
        for split in ("train", "t10k"):
            (raw / f"{split}-{kind}-ubyte").write_bytes(data)
    train = build_dataset("mnist", str(tmp_path), "train", size=32, normal_class=7)
    test = build_dataset("mnist", str(tmp_path), "test", size=32, normal_class=7)
    digits = read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")
    assert len(train) == int((digits == 7).sum()) and len(test) == 10000
    assert sum(test.labels) == int((digits != 7).sum())
    assert train[0]["image"].shape == (1, 32, 32)


def test_idx_reader_rejects_bad_files(tmp_path):
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 10)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(bad)
    other = tmp_path / "x.gz"
    with gzip.open(other, "wb") as f:
        f.write(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(other)


def test_folder_dataset(tmp_path):
    for folder, count in (("train", 3), ("test/normal", 2), ("test/anomalous", 1)):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((20, 24), 40 * i, np.uint8)).save(tmp_path / folder / f"{i}.png")
    train = build_dataset("folder", str(tmp_path), "train", size=16)
    test = build_dataset("folder", str(tmp_path), "test", size=16)
    assert len(train) == 3 and test.labels == [0, 0, 1]
    assert train[0]["image"].shape == (3, 16, 16)  # grayscale files become 3-channel


def test_bad_paths_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset root not found"):
        build_dataset("mvtec", str(tmp_path / "nope"), "train", size=32)
    with pytest.raises(FileNotFoundError, match="not an MVTec AD category folder"):
        build_dataset("mvtec", str(tmp_path), "train", size=32)
    with pytest.raises(FileNotFoundError, match=r"mnist not found .*MNIST/raw.*nothing is downloaded"):
        build_dataset("mnist", str(tmp_path), "train", size=32)
    with pytest.raises(FileNotFoundError, match=r"cifar10 not found .*cifar-10-batches-py"):
        build_dataset("cifar10", str(tmp_path), "train", size=32)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        build_dataset("folder", str(tmp_path), "train", size=32)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("imagenet", str(tmp_path), "train", size=32)
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        build_dataset("folder", str(tmp_path), "train", size=32)
