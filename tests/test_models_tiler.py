"""models/networks/tiler.py: tiling and stitching, the tiled detector, random crops for training, the
options' errors, and a tiled run through train, evaluate, predict and export."""
from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np
import pytest
import torch

from models import evaluate, predict, train
from models.data import OneClassDataset
from models.inference.run_scoring import UntrainedWarning
from models.networks import AnomalyDetector, ModelConfig, TiledDetector, Tiling
from models.study.plan import BASELINE, SETTINGS, Run, Setting, plan
from models.study.run import execute, run_config
from models.training import TrainConfig, load_checkpoint, load_detector

pytestmark = pytest.mark.usefixtures("single_thread")


def stitched_by_loops(tiles: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """The reference of :meth:`Tiling.merge`: every tile added at its place, divided by the count."""
    per_image = tiles.reshape(-1, tiling.count, *tiles.shape[1:])
    total = torch.zeros(per_image.shape[0], tiles.shape[1], tiling.size, tiling.size, dtype=torch.float64)
    count = torch.zeros(tiling.size, tiling.size, dtype=torch.float64)
    starts = range(0, tiling.size - tiling.tile + 1, tiling.stride)
    for k, (top, left) in enumerate((t, l) for t in starts for l in starts):  # row by row
        window = (slice(top, top + tiling.tile), slice(left, left + tiling.tile))
        total[(..., *window)] += per_image[:, k].double()
        count[window] += 1
    return total / count


@pytest.mark.parametrize("size, tile, stride", [(64, 32, 16), (64, 32, 8), (48, 16, 16), (40, 16, 12), (32, 32, 32)])
def test_split_then_merge_gives_the_image_back_and_averages_overlaps(size, tile, stride):
    tiling = Tiling(size, tile, stride)
    gen = torch.Generator().manual_seed(size + tile + stride)
    # Multiples of 1/64: sums of up to 16 of them and their division by the count are exact in
    # float32, so stitching gives them back exactly; other values within float32 rounding (the sum
    # of k equal values rounds).
    dyadic = torch.randint(-64, 64, (2, 3, size, size), generator=gen).float() / 64
    tiles = tiling.split(dyadic)
    assert tiles.shape == (2 * tiling.count, 3, tile, tile)
    assert torch.equal(tiling.merge(tiles), dyadic)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # stitched in float32 under autocast too
        assert torch.equal(tiling.merge(tiles), dyadic)
    constant = torch.full((1, 1, size, size), 0.375)
    assert torch.equal(tiling.merge(tiling.split(constant)), constant)
    x = torch.randn(2, 3, size, size, generator=gen)
    torch.testing.assert_close(tiling.merge(tiling.split(x)), x, rtol=1e-6, atol=0)
    torch.testing.assert_close(tiling.merge(tiling.split(constant + 0.3)), constant + 0.3, rtol=1e-6, atol=0)
    # Tiles that differ (each its own values): every pixel is the mean of the tiles that cover it.
    different = torch.randn(2 * tiling.count, 3, tile, tile, generator=gen)
    torch.testing.assert_close(tiling.merge(different).double(), stitched_by_loops(different, tiling),
                               rtol=1e-6, atol=1e-7)


def test_tiles_are_the_image_windows_row_by_row():
    tiling = Tiling(6, 4, 2)
    x = torch.arange(2 * 36.0).reshape(2, 1, 6, 6)
    tiles = tiling.split(x)
    assert torch.equal(tiles[1], x[0, :, 0:4, 2:6]) and torch.equal(tiles[2], x[0, :, 2:6, 0:4])
    assert torch.equal(tiles[4 + 3], x[1, :, 2:6, 2:6])


def detector(model="daad+", size=32):
    torch.manual_seed(0)
    return AnomalyDetector(ModelConfig(model=model, size=size, width=4, division=(2, 2, 1), num_items=20)).eval()


def test_one_tile_is_the_detector_itself():
    net = detector()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    plain, tiled = net.score(x, "norm"), TiledDetector(net, 32, 32).eval().score(x, "norm")
    for name, a, b in zip(plain._fields, plain, tiled):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("anomaly_map", ["l2", "ssim"])
def test_each_tile_is_scored_as_the_detector_scores_that_window(anomaly_map):
    net = detector()
    tiled = TiledDetector(net, 64, 32).eval()
    assert tiled.config.size == 64 and tiled.tiling.count == 4 and tiled.memories() == net.memories()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    s = tiled.score(x, "norm", anomaly_map)
    assert s.error_map.shape == (2, 64, 64) and s.reconstruction.shape == x.shape
    feats = []
    for top in (0, 32):
        for left in (0, 32):
            window = (..., slice(top, top + 32), slice(left, left + 32))
            part = net.score(x[window], "norm", anomaly_map)
            torch.testing.assert_close(s.error_map[window], part.error_map, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(s.reconstruction[window], part.reconstruction, rtol=1e-5, atol=1e-6)
            feats.append(part.feat)
    torch.testing.assert_close(s.rec, s.error_map.flatten(1).mean(dim=1))
    # L(x) of an image is the largest of its tiles' (a defect lies in few of them).
    torch.testing.assert_close(s.feat, torch.stack(feats, dim=1).amax(dim=1), rtol=1e-5, atol=1e-6)


def test_a_tiled_detector_refuses_images_of_another_size():
    with pytest.raises(ValueError, match=r"scores images of 64 x 64, got \(32, 32\)"):
        TiledDetector(detector(), 64, 32).score(torch.zeros(1, 3, 32, 32))


def pattern_dataset(crop=None):
    """Two 16 x 16 one-channel images whose pixels all differ, so that a crop shows where it was cut."""
    arrays = torch.arange(2 * 256).reshape(2, 1, 16, 16).to(torch.uint8)
    return OneClassDataset(["a", "b"], [0, 0], 1, 16, arrays=arrays, augment=True, crop=crop)


def windows_of(image: torch.Tensor, crop: int) -> list[torch.Tensor]:
    """Every crop x crop window of every flip of ``image``."""
    flips = [image, image.flip(-1), image.flip(-2), image.flip(-1).flip(-2)]
    side = image.shape[-1]
    return [f[:, t:t + crop, l:l + crop] for f in flips for t in range(side - crop + 1) for l in range(side - crop + 1)]


def test_random_crops_are_windows_of_the_flipped_image_seeded_and_repeatable():
    data = pattern_dataset().with_crops(8)
    whole = data.without_augmentation()
    assert whole[0]["image"].shape == (1, 16, 16) and data.subset([1]).crop == 8

    def draw():
        torch.manual_seed(5)
        return [data[i % 2] for i in range(12)]

    first, again = draw(), draw()
    for a, b in zip(first, again):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    for item in first:
        assert item["image"].shape == (1, 8, 8) and item["mask"].shape == (1, 8, 8)
        assert any(torch.equal(item["image"], w) for w in windows_of(whole[item["index"]]["image"], 8))
    assert len({tuple(item["image"].flatten().tolist()) for item in first}) > 6  # the crops move


def test_a_crop_larger_than_the_image_is_refused():
    with pytest.raises(ValueError, match="crop size 17 must be between 1 and the image size 16"):
        pattern_dataset(crop=17)


def tiled_config(**tiling):
    model = ModelConfig(model="daad", size=tiling.pop("size", 64), width=4, division=(2, 2, 1))
    return TrainConfig(root="unused", model=model, **tiling)


def test_the_tiling_options_give_a_run_a_tiled_detector():
    config = tiled_config(tile_size=32)
    assert config.tile_stride == 32 and config.network.size == 32 and config.model.size == 64
    model = config.detector()
    assert isinstance(model, TiledDetector) and model.detector.config == config.network
    assert isinstance(tiled_config().detector(), AnomalyDetector)
    assert TrainConfig.from_dict(tiled_config(tile_size=32, tile_stride=16).to_dict()).tile_stride == 16


@pytest.mark.parametrize("options, message", [
    (dict(tile_size=128), "tile size 128 (--tile-size) must be between 1 and the image size 64 (--size)"),
    (dict(tile_size=32, tile_stride=0), "tile stride 0 (--tile-stride) must be between 1 and the tile size 32"),
    (dict(tile_size=32, tile_stride=48), "tile stride 48 (--tile-stride) must be between 1 and the tile size 32"),
    (dict(tile_size=32, tile_stride=24), "stride that divides 32; strides that fit: 1, 2, 4, 8, 16, 32"),
    (dict(tile_size=40, tile_stride=8), "tile size (--tile-size) is the network's input: input size 40"),
    (dict(tile_stride=16), "a tile stride (--tile-stride) needs a tile size (--tile-size)"),
])
def test_bad_tiling_options_are_named(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiled_config(**options)


def test_the_mean_image_takes_no_tiles():
    with pytest.raises(ValueError, match="mean-image model is fitted to whole images: it takes no --tile-size"):
        TrainConfig(root="unused", model=ModelConfig(model="mean-image", size=64), tile_size=32)


@pytest.fixture(scope="module")
def tiled_run(tmp_path_factory):
    """A daad+ run at 64 x 64 by tiles of 32 every 16 pixels, trained for 2 steps, and 4 test images."""
    from conftest import _real_data  # the hazelnut fixture's folder, for a fixture of this module's scope

    hazelnut, out = _real_data("mvtec_hazelnut_subset"), tmp_path_factory.mktemp("tiled") / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedWarning)  # 2 steps: it has learnt nothing yet
        trainer = train.main(["--dataset", "mvtec", "--root", str(hazelnut), "--model", "daad+", "--size", "64",
                              "--tile-size", "32", "--tile-stride", "16", "--width", "4", "--division", "2", "2",
                              "1", "--num-items", "20", "--batch", "8", "--steps", "2", "--device", "cpu",
                              "--out", str(out)])
    test_set = trainer.config.dataset_split("test")
    images = torch.stack([test_set[i]["image"] for i in (0, 1, 10, 20)])
    return trainer, out / "checkpoint.pt", images, hazelnut


def test_a_tiled_run_trains_on_crops_and_loads_as_a_tiled_detector(tiled_run):
    trainer, checkpoint, images, _ = tiled_run
    assert trainer.model.detector.config.size == 32
    assert trainer.config.dataset_split("train", augment=True)[0]["image"].shape == (3, 32, 32)
    model, config, _ = load_detector(checkpoint, torch.device("cpu"))
    assert isinstance(model, TiledDetector) and (config.model.size, config.tile_size, config.tile_stride) == (64, 32, 16)
    assert model.score(images).error_map.shape == (4, 64, 64)


def test_a_tiled_run_evaluates_and_predicts_at_the_working_size(tiled_run, tmp_path):
    _, checkpoint, _, hazelnut = tiled_run
    result = evaluate.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "eval"), "--num-heatmaps", "2",
                            "--device", "cpu"])
    assert result["size"] == 64 and 0 <= result["pixel_auroc"] <= 1  # 64 x 64 maps against 64 x 64 masks
    image = str(hazelnut / "test" / "colour" / "00.jpg")
    report = predict.main([str(checkpoint), image, "--out", str(tmp_path / "pred"), "--device", "cpu"])
    assert 0 <= report["predictions"][0]["score"] <= 1


def test_a_tiled_run_is_calibrated_at_the_working_size(tiled_run, tmp_path):
    """``daad-calibrate`` reads the images at the working size (64), which the tiled detector
    scores, and the stored thresholds are what the API's scores are judged by."""
    from models import Detector, calibrate
    from models.inference.calibration import decision_counts
    from models.inference.metrics import best_f1

    _, checkpoint, _, hazelnut = tiled_run
    copy = tmp_path / "checkpoint.pt"
    copy.write_bytes(checkpoint.read_bytes())
    good, colour = str(hazelnut / "test" / "good"), str(hazelnut / "test" / "colour")
    new = calibrate.main(["--checkpoint", str(copy), "--normal-dir", good, "--abnormal-dir", colour,
                          "--device", "cpu", "--no-fast"])
    results = Detector.load(copy, "cpu", fast=False).predict([good, colour])
    labels = np.array(["colour" in r.name for r in results])
    scores = np.array([r.pred_score for r in results])
    assert new == load_checkpoint(copy)["calibration"] and len(results) == len(os.listdir(good) + os.listdir(colour))
    assert decision_counts(labels, scores >= 0.5)["f1"] == pytest.approx(best_f1(labels, scores)[0])


@pytest.mark.parametrize("fmt", ["pt2", "onnx", "openvino"])
def test_a_tiled_run_exports(tiled_run, tmp_path, fmt):
    """The exported graph (decoded uint8 images of another size in, resized inside) stitches the
    tiles and scores as the eager tiled detector and the API on the checkpoint do, and the API on
    the export folder gives the same scores."""
    from models import Detector, export
    from models.data.preprocess import to_model_input
    from models.inference.runtimes import load_runtime

    _, checkpoint, images, _ = tiled_run
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, 70, 90), dtype=torch.uint8, generator=gen)  # not 64 x 64
    export.main(["--checkpoint", str(checkpoint), "--format", fmt, "--out", str(tmp_path)])
    nhwc = pixels.permute(0, 2, 3, 1).numpy()
    maps, scores = load_runtime(str(tmp_path)).run(nhwc)
    model, config, _ = load_detector(checkpoint, torch.device("cpu"))
    eager = model.score(to_model_input(pixels, 64), config.ali_loss).error_map.numpy()
    np.testing.assert_allclose(maps, eager, rtol=0, atol=1e-5)
    api = Detector.load(checkpoint, "cpu", fast=False).predict(list(nhwc))
    np.testing.assert_allclose(scores, [r.pred_score for r in api], rtol=0, atol=1e-5)
    deployed = Detector.load(tmp_path, fast=False).predict(list(nhwc))
    np.testing.assert_allclose([r.pred_score for r in deployed], scores, rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "detector.json").read_text())["size"] == 64


def test_the_bad_options_stop_the_command_naming_them(hazelnut, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--root", str(hazelnut), "--size", "64", "--tile-size", "32", "--tile-stride", "40",
                    "--division", "2", "2", "1", "--out", str(tmp_path)])
    assert "tile stride 40 (--tile-stride)" in capsys.readouterr().err


def test_the_tiled_study_setting_builds_tiled_runs():
    setting = SETTINGS["tile256-tiled"]
    runs = plan(setting)
    assert {r.division for r in runs if r.model == "daad"} == {4}  # the paper's blocks, of the 128 network
    assert len(runs) == 6 and {r.seed for r in runs} == {0}  # the mean image and the ablation, one seed
    config = run_config(Run("tile", "daad+", 4, 0, reading="paper"), setting, {"tile": "unused"})
    assert (config.model.size, config.tile_size, config.tile_stride, config.network.size) == (256, 128, 64, 128)
    assert (config.steps, config.until_plateau, config.model.division) == (3000, True, (4, 4, 1))
    assert isinstance(config.detector(), TiledDetector) and config.detector().tiling.count == 9


def test_a_tiled_study_run_trains_scores_and_draws_at_the_working_size(hazelnut, tmp_path):
    setting = Setting(size=64, tile_size=32, tile_stride=16, width=4, epochs=1, mnist_size=32, mnist_width=4,
                      mnist_epochs=1, digits=(), seeds=1, num_items=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedWarning)
        record = execute(Run("mvtec", "daad+", 2, 0, reading="paper"), setting, {"mvtec": str(hazelnut)},
                         str(tmp_path))
    assert record["steps"] == 4 and 0 <= record["metrics"]["pixel_auroc"] <= 1
    assert np.load(tmp_path / record["arrays"])["figure_reconstructions"].shape == (4, 64, 64, 3)
    baseline = execute(Run("mvtec", BASELINE, 1, 0), setting, {"mvtec": str(hazelnut)}, str(tmp_path))
    assert baseline["epochs"] == 0 and 0 <= baseline["metrics"]["pixel_auroc"] <= 1  # whole images, untiled


def test_a_resumed_tiled_run_repeats_the_crops(hazelnut, tmp_path):
    args = ["--dataset", "mvtec", "--root", str(hazelnut), "--model", "daad", "--size", "32", "--tile-size", "16",
            "--width", "4", "--division", "1", "1", "1", "--num-items", "20", "--seed", "3", "--device", "cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedWarning)
        straight = train.main(args + ["--epochs", "2", "--out", str(tmp_path / "a")])
        train.main(args + ["--epochs", "1", "--out", str(tmp_path / "b")])
        resumed = train.main(["--resume", "--epochs", "2", "--out", str(tmp_path / "b"), "--device", "cpu"])
    assert resumed.epoch == 2 and resumed.config.tile_size == 16
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
