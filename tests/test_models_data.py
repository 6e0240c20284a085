"""models/: the data loaders on the shipped real data (MVTec AD hazelnut subset, MNIST IDX), and
on small synthetic folders of what real folders hold: broken files, odd formats, stray files."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.data import BadImageError, DataWarning, build_dataset, data_root, load_image, load_mask
from models.data.mnist import MNIST_IDX_SPLIT, read_idx

pytestmark = pytest.mark.usefixtures("single_thread")


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


def test_hazelnut_subset_with_stem_png_masks(hazelnut):
    check_hazelnut(hazelnut)


def test_hazelnut_subset_with_mvtec_mask_names(hazelnut, tmp_path):
    root = tmp_path / "hazelnut"
    shutil.copytree(hazelnut, root)
    for mask in (root / "ground_truth" / "colour").iterdir():
        mask.rename(mask.with_name(f"{mask.stem}_mask.png"))
    check_hazelnut(root)


def test_training_flips(hazelnut):
    data = build_dataset("mvtec", str(hazelnut), "train", size=32, augment=True)
    plain = data.without_augmentation()[0]["image"]
    assert torch.equal(plain, build_dataset("mvtec", str(hazelnut), "train", size=32)[0]["image"])
    flips = {plain.flip(-1).numpy().tobytes(), plain.flip(-2).numpy().tobytes(),
             plain.flip(-1).flip(-2).numpy().tobytes(), plain.numpy().tobytes()}
    torch.manual_seed(0)
    seen = {data[0]["image"].numpy().tobytes() for _ in range(30)}
    assert seen == flips


def test_mnist_idx_one_class_split(mnist):
    train = build_dataset("mnist", str(mnist), "train", size=32, normal_class=3)
    test = build_dataset("mnist", str(mnist), "test", size=32, normal_class=3)
    digits = read_idx(mnist / "t10k-labels-idx1-ubyte.gz")
    assert len(train) == int((digits[:MNIST_IDX_SPLIT] == 3).sum())
    assert len(test) == len(digits) - MNIST_IDX_SPLIT
    assert sum(test.labels) == int((digits[MNIST_IDX_SPLIT:] != 3).sum())
    item = test[0]
    assert item["image"].shape == (1, 32, 32) and item["label"] == int(digits[MNIST_IDX_SPLIT] != 3)
    assert test.names[0] == f"mnist-test-{MNIST_IDX_SPLIT}" and not test.has_masks
    assert item["image"].min() == -1  # MNIST's black background


def test_mnist_torchvision_layout(mnist, tmp_path):
    # torchvision's layout, built from the shipped t10k files (standing in for the train files too).
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for kind in ("images-idx3", "labels-idx1"):
        data = gzip.decompress((mnist / f"t10k-{kind}-ubyte.gz").read_bytes())
        for split in ("train", "t10k"):
            (raw / f"{split}-{kind}-ubyte").write_bytes(data)
    train = build_dataset("mnist", str(tmp_path), "train", size=32, normal_class=7)
    test = build_dataset("mnist", str(tmp_path), "test", size=32, normal_class=7)
    digits = read_idx(mnist / "t10k-labels-idx1-ubyte.gz")
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


# ----------------------------------------------------------------------------- what real folders hold


def write_image(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def write_truncated_jpeg(path):
    write_image(path, np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def grey(value, shape=(12, 12)):
    return np.full(shape, value, np.uint8)


def test_unreadable_images_are_all_listed_before_training(tmp_path):
    for i in range(2):
        write_image(tmp_path / "train" / f"{i}.png", grey(100))
    truncated = write_truncated_jpeg(tmp_path / "train" / "cut.jpg")
    text = tmp_path / "train" / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(BadImageError) as error:
        build_dataset("folder", str(tmp_path), "train", size=16)
    assert [path for path, _ in error.value.problems] == [str(truncated), str(text)]
    message = str(error.value)
    assert f"{truncated}: OSError: image file is truncated" in message
    assert f"{text}: UnidentifiedImageError: cannot identify image file" in message
    assert "--skip-bad-images" in message
    with pytest.warns(DataWarning, match="2 unreadable image files") as caught:
        data = build_dataset("folder", str(tmp_path), "train", size=16, skip_bad_images=True)
    assert str(truncated) in str(caught[0].message) and str(text) in str(caught[0].message)
    assert [Path(n).name for n in data.names] == ["0.png", "1.png"]
    for i in range(2):
        (tmp_path / "train" / f"{i}.png").unlink()
    with pytest.raises(BadImageError, match="no readable image is left"):
        build_dataset("folder", str(tmp_path), "train", size=16, skip_bad_images=True)


def test_every_pixel_format_reads_as_8_bit(tmp_path):
    colour = np.array([200, 100, 50], np.uint8)
    rgba = np.concatenate([np.broadcast_to(colour, (12, 12, 3)), grey(0)[..., None]], axis=2)
    palette = Image.fromarray(np.broadcast_to(colour, (12, 12, 3)).copy()).quantize(colors=2)
    (tmp_path / "train").mkdir()
    palette.save(tmp_path / "train" / "palette.png")
    write_image(tmp_path / "train" / "gray.png", grey(77))
    write_image(tmp_path / "train" / "rgba.png", rgba)  # fully transparent: the colour still counts
    write_image(tmp_path / "train" / "deep.png", np.full((12, 12), 0x8080, np.uint16))  # 16 bit: 128
    assert Image.open(tmp_path / "train" / "deep.png").mode.startswith("I")
    data = build_dataset("folder", str(tmp_path), "train", size=8)
    expected = {"deep.png": [128] * 3, "gray.png": [77] * 3, "palette.png": colour, "rgba.png": colour}
    assert sorted(expected) == sorted(Path(n).name for n in data.names)
    for i, name in enumerate(data.names):
        image = data[i]["image"]
        want = torch.tensor(np.asarray(expected[Path(name).name], np.float32) / 127.5 - 1)
        torch.testing.assert_close(image, want[:, None, None].expand(3, 8, 8), rtol=0, atol=1e-6, msg=name)


def test_hidden_and_other_files_are_ignored_and_empty_folders_named(tmp_path):
    write_image(tmp_path / "train" / "0.png", grey(10))
    (tmp_path / "train" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS companion
    (tmp_path / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "train" / "labels.csv").write_text("name,label\n")
    (tmp_path / "train" / "more.png").mkdir()
    assert [Path(n).name for n in build_dataset("folder", str(tmp_path), "train", size=8).names] == ["0.png"]
    (tmp_path / "train" / "0.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"no images .* in .*train \(4 other entries ignored\)"):
        build_dataset("folder", str(tmp_path), "train", size=8)
    empty = tmp_path / "other"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no images .* \(it is empty\)"):
        build_dataset("folder", str(empty), "train", size=8)


def mvtec_with_masks(root):
    """A tiny MVTec category: crack 0 has a half-scale mask, crack 1 one of another aspect ratio,
    crack 2 none."""
    write_image(root / "train" / "good" / "0.png", grey(50, (20, 20)))
    write_image(root / "test" / "good" / "0.png", grey(50, (20, 20)))
    for i in range(3):
        write_image(root / "test" / "crack" / f"{i}.png", grey(90, (20, 20)))
    half = grey(0, (10, 10))
    half[:5] = 255  # the top half of the image is the defect
    write_image(root / "ground_truth" / "crack" / "0_mask.png", half)
    write_image(root / "ground_truth" / "crack" / "1_mask.png", grey(255, (10, 14)))
    return root


def test_masks_at_another_scale_mismatched_or_missing(tmp_path):
    root = mvtec_with_masks(tmp_path)
    mismatched = root / "ground_truth" / "crack" / "1_mask.png"
    with pytest.raises(BadImageError, match=r"1_mask.png: mask of 14x10 does not fit its image 1.png of 20x20"):
        build_dataset("mvtec", str(root), "test", size=8)
    with pytest.warns(DataWarning) as caught:
        test = build_dataset("mvtec", str(root), "test", size=8, skip_bad_images=True)
    first, second = (str(w.message) for w in caught)
    assert str(mismatched) in first
    assert "2 defective image(s) without a readable ground-truth mask" in second
    assert str(root / "test" / "crack" / "1.png") in second and str(root / "test" / "crack" / "2.png") in second
    assert [Path(n).name for n in test.names] == ["0.png", "1.png", "2.png", "0.png"]  # crack, then good
    assert test.labels == [1, 1, 1, 0] and test.mask_known == [True, False, False, True]
    mask = test[0]["mask"][0]
    assert mask[:4].eq(1).all() and mask[4:].eq(0).all()  # the half-scale mask, resized with the image
    (root / "ground_truth" / "crack" / "1_mask.png").unlink()  # a missing mask alone: a warning only
    with pytest.warns(DataWarning, match="2 defective image"):
        assert len(build_dataset("mvtec", str(root), "test", size=8)) == 4


def test_predict_style_reads_name_the_file(tmp_path):
    truncated = write_truncated_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(BadImageError, match=f"{truncated}: OSError: image file is truncated"):
        load_image(str(truncated), 3, 16)


def _gray(path: Path, value: int, size=(20, 24)) -> None:
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)


def test_folder_data_set_given_by_its_folders(tmp_path):
    """Normal, abnormal and mask folders; masks beside the images (NAME.png by NAME.jpg, or
    NAME_mask.png) or in their own folder; a seeded split of the normal images."""
    for folder in ("good", "bad_a", "bad_b", "masks"):
        (tmp_path / folder).mkdir()
    for i in range(10):
        _gray(tmp_path / "good" / f"n{i}.jpg", 100)
        _gray(tmp_path / "good" / f"n{i}.png", 0)  # all-zero mask beside a normal image: not an image
    _gray(tmp_path / "bad_a" / "a0.jpg", 200)
    _gray(tmp_path / "bad_a" / "a0.png", 255)      # mask beside, same stem
    _gray(tmp_path / "bad_b" / "b0.png", 200)
    _gray(tmp_path / "bad_b" / "b0_mask.png", 255)  # mask beside, MVTec's suffix
    _gray(tmp_path / "bad_b" / "b1.png", 200)        # no mask: a warning, left out of pixel AUROC
    spec = dict(normal_dir="good", abnormal_dirs=("bad_a", "bad_b"), train_ratio=0.7)
    train = build_dataset("folder", str(tmp_path), "train", 16, **spec)
    with pytest.warns(DataWarning, match="b1.png"):
        test = build_dataset("folder", str(tmp_path), "test", 16, **spec)
    names = lambda data: [Path(n).name for n in data.names]
    assert len(train) == 7 and set(names(train)) | set(names(test)[:3]) == {f"n{i}.jpg" for i in range(10)}
    assert names(test)[3:] == ["a0.jpg", "b0.png", "b1.png"] and test.labels == [0, 0, 0, 1, 1, 1]
    assert test.mask_known == [True, True, True, True, True, False]
    assert test[3]["mask"].min() == 1 and test[0]["mask"].max() == 0
    # The split is fixed: the same every time, whatever the run's seed.
    torch.manual_seed(123)
    assert names(build_dataset("folder", str(tmp_path), "train", 16, **spec)) == names(train)
    # Masks in their own folder, matched by stem.
    _gray(tmp_path / "masks" / "a0_mask.png", 255)
    _gray(tmp_path / "masks" / "b1.png", 255)
    with pytest.warns(DataWarning, match="b0.png"):
        own = build_dataset("folder", str(tmp_path), "test", 16,
                            **spec, mask_dir="masks")
    assert own.mask_known == [True, True, True, True, False, True]
    with pytest.raises(ValueError, match="leaves no normal image"):
        build_dataset("folder", str(tmp_path), "train", 16, normal_dir="good", train_ratio=0.01)


def test_magnetic_tile_as_a_folder_data_set():
    root = data_root() / "magnetic_tile"
    if not root.is_dir():
        pytest.skip(f"real data absent: {root}")
    defects = tuple(f"MT_{k}/Imgs" for k in ("Blowhole", "Break", "Crack", "Fray", "Uneven"))
    spec = dict(normal_dir="MT_Free/Imgs", abnormal_dirs=defects, train_ratio=0.5)
    train = build_dataset("folder", str(root), "train", 64, **spec)
    test = build_dataset("folder", str(root), "test", 64, **spec)
    assert len(train) == 476 and len(test) == 476 + 392 and sum(test.labels) == 392
    assert all(test.mask_known) and not set(train.names) & set(test.names)
    assert all(n.endswith(".jpg") for n in train.names + test.names)
    item = test[len(test) - 1]
    assert item["label"] == 1 and item["mask"].sum() > 0 and item["image"].shape == (3, 64, 64)


#: A whole new data layout: this text is all that adding one takes (as models/data/<name>.py,
#: imported by models/data/__init__.py); the test imports it from a file of its own.
STRIPES_LAYOUT = '''
from dataclasses import dataclass

import torch

from models.data import Layout, OneClassDataset, option, register


@dataclass(frozen=True)
class StripesOptions:
    period: int = option(4, "stripe period in pixels of the normal images")


def stripes(root, split, size, options, augment, skip_bad_images):
    """Normal: vertical stripes; anomalous (test only): the same with a white square."""
    x = torch.arange(28) % options.period < options.period // 2
    images = (x.expand(8, 1, 28, 28) * 255).to(torch.uint8).clone()
    labels = [0] * 8
    if split == "test":
        images[4:, :, 10:18, 10:18] = 255
        labels = [0] * 4 + [1] * 4
    return OneClassDataset([f"stripes-{split}-{i}" for i in range(8)], labels, 1, size,
                           arrays=images, augment=augment)


register(Layout("stripes", channels=1, options=StripesOptions, build=stripes, summary="synthetic stripes"))
'''


def test_a_new_layout_is_one_module(tmp_path, capsys):
    import importlib.util

    from models import train
    from models.data import LAYOUTS
    from models.training import load_checkpoint

    path = tmp_path / "stripes.py"
    path.write_text(STRIPES_LAYOUT)
    spec = importlib.util.spec_from_file_location("stripes_layout", path)
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        out = tmp_path / "run"
        train.main(["--dataset", "stripes", "--period", "6", "--root", str(tmp_path), "--model", "ae",
                    "--size", "32", "--width", "4", "--batch", "4", "--epochs", "1", "--eval-every", "1",
                    "--device", "cpu", "--out", str(out)])
        config = load_checkpoint(out / "checkpoint.pt")["config"]
        assert config["dataset"] == "stripes" and config["data"] == {"period": 6}
        assert config["model"]["in_channels"] == 1
        with pytest.raises(SystemExit):  # another layout's option is refused, by name
            train.main(["--dataset", "stripes", "--normal-class", "3", "--root", str(tmp_path),
                        "--out", str(tmp_path / "bad")])
        assert "--normal-class does not apply to the stripes data layout (its options: --period)" in \
            capsys.readouterr().err
    finally:
        LAYOUTS.pop("stripes", None)


def test_images_over_the_pixel_limit_are_refused_by_name(tmp_path, monkeypatch):
    from models.data import images

    big = tmp_path / "train" / "huge.png"
    big.parent.mkdir()
    Image.new("L", (12000, 12000)).save(big)  # a few kilobytes of PNG, 144 megapixels
    _gray(tmp_path / "train" / "small.png", 10)
    with pytest.raises(BadImageError, match=r"huge.png: 12000x12000 is 144.0 megapixels, over the limit of 64 "
                                            r"\(--max-pixels\)"):
        build_dataset("folder", str(tmp_path), "train", 16)
    monkeypatch.setattr(images, "PIXEL_LIMIT", images.PIXEL_LIMIT)  # restored after the test
    images.set_pixel_limit(200_000_000)
    assert len(build_dataset("folder", str(tmp_path), "train", 16)) == 2  # raised: read (PIL's own limit too)
    with pytest.raises(ValueError, match="pixel limit must be >= 1"):
        images.set_pixel_limit(0)


def _region() -> np.ndarray:
    region = np.zeros((24, 24), dtype=bool)
    region[5:12, 8:15] = True
    return region


@pytest.mark.parametrize("encoding", ["0-255", "0-1", "16-bit", "red-on-black", "rgba-alpha", "palette-alpha",
                                      "bilevel"])
def test_masks_read_by_their_region_in_every_encoding(tmp_path, encoding):
    from models.data.images import read_mask

    region, path = _region(), tmp_path / "mask.png"
    if encoding == "0-255":
        Image.fromarray(region.astype(np.uint8) * 255).save(path)
    elif encoding == "0-1":
        Image.fromarray(region.astype(np.uint8)).save(path)  # read as empty under a grey-level cut
    elif encoding == "16-bit":
        Image.fromarray(region.astype(np.uint16) * 65535).save(path)
    elif encoding == "red-on-black":  # grey 76 after conversion: under a cut at 128
        rgb = np.zeros((*region.shape, 3), np.uint8)
        rgb[region] = (255, 0, 0)
        Image.fromarray(rgb).save(path)
    elif encoding == "rgba-alpha":  # the defect colour everywhere, the region by alpha alone
        rgba = np.zeros((*region.shape, 4), np.uint8)
        rgba[..., 1] = 255
        rgba[..., 3] = region * 255
        Image.fromarray(rgba).save(path)
    elif encoding == "palette-alpha":  # every palette entry green; the region by its transparency
        palette = Image.fromarray(region.astype(np.uint8), mode="L").convert("P")
        palette.putpalette([0, 200, 0] * 256)
        palette.info["transparency"] = 0
        palette.save(path, transparency=0)
    else:
        Image.fromarray(region).convert("1").save(path)
    np.testing.assert_array_equal(read_mask(path), region)
    np.testing.assert_array_equal(load_mask(str(path), 24)[0].numpy(), region)


def test_an_empty_mask_reads_as_no_defect_and_evaluation_says_why_a_pixel_metric_is_null(tmp_path):
    from models.data.images import read_mask
    from models.inference import ScoreSet
    from models.inference.evaluation import why_no_pixel_metric

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "empty.png")
    assert not read_mask(tmp_path / "empty.png").any()
    scores = ScoreSet(np.array([0, 1]), None, np.zeros((2, 4, 4)), np.zeros((2, 4, 4)),
                      np.array([True, True]), np.arange(2))
    assert "the 1 masks of anomalous test images mark no defect pixel" in why_no_pixel_metric(scores)
    assert "has no ground-truth masks" in why_no_pixel_metric(scores._replace(mask_known=np.array([True, False])))


def test_a_folder_of_normal_test_images(tmp_path):
    for folder in ("good", "good_test", "bad"):
        (tmp_path / folder).mkdir()
    for i in range(4):
        _gray(tmp_path / "good" / f"n{i}.png", 100)
    for i in range(2):
        _gray(tmp_path / "good_test" / f"t{i}.png", 100)
    _gray(tmp_path / "bad" / "b0.png", 200)
    spec = dict(normal_dir="good", abnormal_dirs=("bad",), normal_test_dir="good_test")
    train = build_dataset("folder", str(tmp_path), "train", 16, **spec)
    test = build_dataset("folder", str(tmp_path), "test", 16, **spec)
    assert sorted(Path(n).name for n in train.names) == [f"n{i}.png" for i in range(4)]  # all of them train
    assert [Path(n).name for n in test.names] == ["t0.png", "t1.png", "b0.png"] and test.labels == [0, 0, 1]
    with pytest.raises(ValueError, match="give --normal-dir too"):
        build_dataset("folder", str(tmp_path), "train", 16, normal_test_dir="good_test")


def test_cifar10_as_a_class_folder_tree(tmp_path):
    for split, count in (("train", 3), ("test", 2)):
        for k, name in enumerate(("airplane", "automobile", "bird")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                _gray(tmp_path / split / name / f"{i}.jpg", 40 * k, size=(32, 32))
    train = build_dataset("cifar10", str(tmp_path), "train", 32, normal_class=1)
    test = build_dataset("cifar10", str(tmp_path), "test", 32, normal_class=1)
    assert len(train) == 3 and all("/automobile/" in n for n in train.names) and train[0]["image"].shape == (3, 32, 32)
    assert len(test) == 6 and test.labels == [1, 1, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="normal_class 5 is not a class of .*: it has 3 class folders"):
        build_dataset("cifar10", str(tmp_path), "train", 32, normal_class=5)
    with pytest.raises(FileNotFoundError, match=r"or a class-folder tree .*nothing is downloaded"):
        build_dataset("cifar10", str(tmp_path / "train" / "bird"), "train", 32)
