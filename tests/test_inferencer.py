"""models.Detector (models/inference/inferencer.py) and the predict command over it: every form of
input scores an image alike, maps come back at the input's resolution, unreadable files are
named while the others are scored, and --save-maps writes maps and masks that load."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from models import Detector, predict

pytestmark = pytest.mark.usefixtures("single_thread")

#: The (height, width) of the test images: not the model's square size, nor the data set's.
SHAPE = (48, 72)


@pytest.fixture(scope="module")
def checkpoint(tiny_run):
    return tiny_run[0]


@pytest.fixture
def shots(tmp_path):
    """A folder of three hazelnut test images (two defective, one good) resized to :data:`SHAPE`."""
    from models.data import data_root

    test = data_root() / "mvtec_hazelnut_subset" / "test"
    folder = tmp_path / "shots"
    folder.mkdir()
    for name, source in (("a", test / "colour" / "00.jpg"), ("b", test / "colour" / "07.jpg"),
                         ("c", test / "good" / "04.jpg")):
        Image.open(source).convert("RGB").resize(SHAPE[::-1]).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def detector(checkpoint):
    return Detector.load(checkpoint, device="cpu", fast=False)


def test_every_input_form_scores_an_image_alike(detector, shots):
    files = sorted(shots.iterdir())
    pixels = [np.asarray(Image.open(f)) for f in files]
    forms = {
        "paths": [str(f) for f in files],
        "folder": str(shots),
        "glob": str(shots / "*.png"),
        "PIL images": [Image.open(f) for f in files],
        "arrays": pixels,
        "float array batch": np.stack(pixels) / 255.0,
        "tensor batch": torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2),
    }
    reference = detector.predict(forms.pop("paths"))
    assert [r.name for r in reference] == [str(f) for f in files] and not reference.failures
    for form, images in forms.items():
        results = detector.predict(images)
        assert len(results) == len(files), form
        for got, want in zip(results, reference):
            assert got.pred_score == pytest.approx(want.pred_score, abs=1e-6), form
            assert got.pred_label == want.pred_label, form
            np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, rtol=0, atol=1e-6, err_msg=form)
    for r in reference:
        assert r.anomaly_map.shape == r.pred_mask.shape == r.image.shape[:2] == SHAPE
        assert r.raw_map.shape == (32, 32)
        assert 0 <= r.pred_score <= 1 and r.pred_label == (r.pred_score >= 0.5)
        assert r.label == ("anomalous" if r.pred_label else "normal")
        np.testing.assert_array_equal(r.pred_mask, r.anomaly_map >= 0.5)
        assert 0 <= r.anomaly_map.min() and r.anomaly_map.max() <= 1


def test_the_map_is_the_model_map_resized_and_normalised(detector, shots):
    """A map is normalised as the scorer normalises a map (0.5 at the pixel threshold)."""
    r = detector.predict(str(shots / "a.png"))[0]
    scorer = detector.scorer
    threshold, span = scorer.decision(pixels=True)
    raw = torch.nn.functional.interpolate(torch.from_numpy(r.raw_map)[None, None], size=SHAPE, mode="bilinear",
                                          align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(r.anomaly_map, np.clip((raw - threshold) / span + 0.5, 0, 1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(scorer.normalise_map_torch(torch.from_numpy(raw)).numpy(), r.anomaly_map,
                               rtol=0, atol=1e-6)


def test_a_corrupt_file_is_named_and_the_others_are_scored(checkpoint, detector, shots, tmp_path, capsys):
    (shots / "broken.png").write_bytes(b"not a png at all")
    results = detector.predict([str(shots), str(tmp_path / "missing.png")])
    assert [r.name for r in results] == [str(shots / n) for n in ("a.png", "b.png", "c.png")]
    reasons = dict(results.failures)
    assert set(reasons) == {str(shots / "broken.png"), str(tmp_path / "missing.png")}
    assert "UnidentifiedImageError" in reasons[str(shots / "broken.png")]
    assert reasons[str(tmp_path / "missing.png")] == "image not found"

    report = predict.main([str(checkpoint), str(shots), "--out", str(tmp_path / "pred"), "--device", "cpu"])
    captured = capsys.readouterr()
    assert f"cannot read {shots / 'broken.png'}" in captured.err
    assert captured.out.count("score=") == 3
    written = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert written == report and [f["image"] for f in written["failures"]] == [str(shots / "broken.png")]
    with pytest.raises(SystemExit) as exc:  # nothing could be scored: a non-zero exit
        predict.main([str(checkpoint), str(shots / "broken.png"), "--out", str(tmp_path / "none"), "--device", "cpu"])
    assert exc.value.code != 0 and "broken.png: UnidentifiedImageError" in capsys.readouterr().err


def test_save_maps_writes_maps_and_masks_that_load(checkpoint, detector, shots, tmp_path):
    report = predict.main([str(checkpoint), str(shots / "*.png"), "--out", str(tmp_path / "pred"),
                           "--device", "cpu", "--no-fast", "--save-maps"])
    results = detector.predict(str(shots))
    assert len(report["predictions"]) == 3
    for record, result in zip(report["predictions"], results):
        assert record["score"] == pytest.approx(result.pred_score, abs=1e-6) and record["label"] == result.label
        maps = np.load(record["map"])
        assert maps["anomaly_map"].shape == maps["pred_mask"].shape == SHAPE and maps["raw_map"].shape == (32, 32)
        np.testing.assert_allclose(maps["anomaly_map"], result.anomaly_map, rtol=0, atol=1e-6)
        mask = np.asarray(Image.open(record["mask"]))
        np.testing.assert_array_equal(mask, maps["pred_mask"].astype(np.uint8) * 255)
        assert Image.open(record["heatmap"]).size[0] > 0


def test_names_that_share_a_stem_get_distinct_files():
    from models.inference.prediction import output_stems

    assert output_stems(["x/a.png", "y/a.png", "y/b.png", "z/y/a.jpg"]) == ["x_a", "y_a_1", "b", "y_a_2"]


def test_bad_inputs_are_refused_clearly(detector):
    with pytest.raises(ValueError, match="no images given"):
        detector.predict([])
    with pytest.raises(TypeError, match="cannot read an image from a dict"):
        detector.predict({"a": 1})
    with pytest.raises(ValueError, match=r"\(H, W\), \(H, W, C\)"):
        detector.predict(np.zeros((2, 3, 4, 5, 6), np.uint8))
    with pytest.raises(TypeError, match="uint8 or floats"):
        detector.predict(np.zeros((8, 8, 3), np.int32))
    with pytest.raises(ValueError, match=r"must be in \[0, 1\].*\[-1, 1\]"):
        detector.predict(torch.full((1, 3, 8, 8), -0.5))


def test_a_16_bit_image_in_memory_reads_as_its_file(detector, tmp_path):
    """PIL's own conversion would clip 16-bit values at 255 (a white image): in memory as from a
    file, they are scaled to 8 bits."""
    path = tmp_path / "deep.png"
    values = np.linspace(0, 65535, 48 * 72).reshape(48, 72).astype(np.uint16)
    Image.fromarray(values).save(path)
    from_file = detector.predict(str(path))[0]
    in_memory = detector.predict(Image.open(path))[0]
    np.testing.assert_array_equal(in_memory.image, from_file.image)
    assert in_memory.pred_score == pytest.approx(from_file.pred_score, abs=1e-6)
    assert 0 < from_file.image.mean() < 255
