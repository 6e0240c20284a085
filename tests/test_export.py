"""Export: the fused op's decomposition (daad_ext/export.py) and ``python -m models.export`` on the
hazelnut subset, against PyTorch: pt2 through torch.export, onnx through ONNX Runtime, openvino
through OpenVINO (models/inference/runtimes.py), each fed the decoded images at their own size;
the extras a format needs, and a failed export that leaves nothing behind."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from daad_ext import BlockMemory, available_backends, block_memory_ref
from daad_ext.export import decompose, forward_decomposition
from daad_ext.spec import check_options

from helpers import tie_free_inputs

fused = pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="the C++ extension is not built")


def op_targets(graph: torch.fx.Graph) -> set[str]:
    return {str(node.target) for node in graph.nodes if node.op == "call_function"}


@fused
@pytest.mark.parametrize("similarity,shrink", [("cosine", "hard"), ("dot", "memae"), ("cosine", "none")])
def test_decomposition_matches_the_fused_op(similarity, shrink):
    division, n = (2, 2, 1), 16
    threshold = 0.03 if shrink == "memae" else None
    x, memory = tie_free_inputs((2, 4, 8, 8), n, division, similarity, shrink, threshold)
    threshold = check_options(similarity, shrink, threshold, 1.0, n)
    args = (x, memory, *division, similarity, shrink, threshold, 1.0)
    expected = torch.ops.daad_ext.block_memory_forward(*args)
    got = forward_decomposition(*args)
    for name, e, g in zip(("y", "w", "probs", "row_stats", "item_norms"), expected, got):
        assert e.shape == g.shape and e.dtype == g.dtype, name
        torch.testing.assert_close(g, e, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_decomposition_computes_half_inputs_as_the_reference_does(dtype):
    """float16/bfloat16 through the reference's own upcast: computed in float32 and rounded once,
    the same bits as the reference (an all-zero block included, which in half precision would
    turn the norm floors into 0 and the weights into NaN)."""
    division, n = (2, 2, 1), 16
    x, memory = tie_free_inputs((2, 4, 8, 8), n, division, "cosine", "memae", dtype=dtype)
    x[1, :, :4, :4] = 0
    y, w, probs, row_stats, item_norms = forward_decomposition(
        x, memory, *division, "cosine", "memae", 1 / n, 1.0)
    y_ref, w_ref = block_memory_ref(x, memory, division, "cosine", "memae")
    assert torch.equal(y, y_ref) and torch.equal(w, w_ref)
    assert y.dtype == w.dtype == probs.dtype == dtype and torch.isfinite(w).all()
    assert row_stats.dtype == item_norms.dtype == torch.float32


@fused
def test_exported_layer_uses_standard_operators_eager_and_compiled_the_fused_kernel():
    layer = BlockMemory(4, 8, 8, num_items=16, division=(2, 2, 1)).eval()
    x = tie_free_inputs((2, 4, 8, 8), 16, (2, 2, 1))[0]
    program = torch.export.export(layer, (x,))
    assert "daad_ext.block_memory_forward.default" in op_targets(program.graph)
    decomposed = decompose(program)
    assert not any("daad_ext" in t for t in op_targets(decomposed.graph))
    torch.testing.assert_close(decomposed.module()(x), layer(x))

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.graph)
        return gm

    torch.compile(layer, backend=capture)(x)
    assert any("daad_ext.block_memory_forward" in t for g in graphs for t in op_targets(g))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A daad+ checkpoint trained for one epoch on the hazelnut subset, its test images as decoded
    (uint8 (N, 512, 512, 3)) and as the data set prepares them ((N, 3, 32, 32) in [-1, 1]), and
    their labels."""
    from models import train
    from models.data import data_root
    from models.data.images import read_pixels

    hazelnut = data_root() / "mvtec_hazelnut_subset"
    if not hazelnut.is_dir():
        pytest.skip(f"real data absent: {hazelnut}")
    out = tmp_path_factory.mktemp("export") / "run"
    trainer = train.main(["--dataset", "mvtec", "--root", str(hazelnut), "--size", "32", "--width", "4",
                          "--division", "2", "2", "1", "--num-items", "20", "--batch", "8",
                          "--device", "cpu", "--model", "daad+", "--epochs", "1", "--out", str(out)])
    test_set = trainer.config.dataset_split("test")
    pixels = np.stack([read_pixels(name, 3) for name in test_set.names])
    images = torch.stack([test_set[i]["image"] for i in range(len(test_set))])
    return out / "checkpoint.pt", pixels, images, np.array(test_set.labels)


def pytorch_scores(checkpoint, images, image_score="max"):  # export's default image score
    """Maps and scores as models.predict computes them, in eager PyTorch with the fused kernels."""
    from models.inference import Scorer
    from models.training import load_detector

    model, config, state = load_detector(str(checkpoint), torch.device("cpu"))
    scorer = Scorer.calibrated(config, state, str(checkpoint), image_score)
    s = model.score(images, config.ali_loss)
    return s.error_map.numpy(), scorer.score(s.error_map.numpy(), s.feat.numpy())


def check_against_pytorch(maps, scores, trained):
    from models.inference.metrics import image_auroc

    checkpoint, _, images, labels = trained
    ref_maps, ref_scores = pytorch_scores(checkpoint, images)
    np.testing.assert_allclose(maps, ref_maps, rtol=0, atol=1e-4)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-4)
    assert image_auroc(labels, scores) == image_auroc(labels, ref_scores)


@pytest.mark.usefixtures("single_thread")
def test_export_pt2(trained, tmp_path):
    from models import export

    checkpoint, pixels = trained[:2]
    path = export.main(["--checkpoint", str(checkpoint), "--format", "pt2", "--out", str(tmp_path)])
    program = torch.export.load(path)
    assert not any("daad_ext" in t for t in op_targets(program.graph))
    maps, scores = program.module()(torch.from_numpy(pixels))  # the whole test set in one batch: a dynamic batch
    check_against_pytorch(maps.detach().numpy(), scores.detach().numpy(), trained)
    info = json.loads((tmp_path / "detector.json").read_text())
    assert info["size"] == 32 and info["outputs"] == ["anomaly_map", "score"] and info["format"] == "pt2"


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("fmt,files", [("onnx", ["detector.onnx"]), ("openvino", ["detector.bin", "detector.xml"])])
def test_export_runs_in_its_runtime(trained, tmp_path, fmt, files):
    """ONNX Runtime and OpenVINO (float32) on the exported graph: the maps and scores of PyTorch,
    the same AUROC; another batch size and another image size run too. Not skipped where a
    runtime is missing: requirements.txt installs both, and CI checks them."""
    from models import export
    from models.data.preprocess import to_model_input
    from models.inference.runtimes import load_runtime

    checkpoint, pixels = trained[:2]
    out = tmp_path / fmt
    path = export.main(["--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == sorted(files + ["detector.json"])
    runtime = load_runtime(path)
    assert runtime.info["format"] == fmt and runtime.info["input_layout"] == "NHWC"
    maps, scores = runtime.run(pixels)
    check_against_pytorch(maps, scores, trained)
    one_map, one_score = load_runtime(str(out)).run(pixels[:1])  # the folder; another batch size
    np.testing.assert_allclose(one_score, scores[:1], rtol=0, atol=1e-5)
    crop = pixels[:2, :200, :300]  # another size, not square: resized in the graph as the loader resizes
    small_maps, small_scores = runtime.run(crop)
    ref_maps, ref_scores = pytorch_scores(checkpoint, to_model_input(torch.from_numpy(crop).permute(0, 3, 1, 2), 32))
    np.testing.assert_allclose(small_maps, ref_maps, rtol=0, atol=1e-4)
    np.testing.assert_allclose(small_scores, ref_scores, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="uint8 images"):
        runtime.run(pixels.astype(np.float32))


@pytest.mark.usefixtures("single_thread")
def test_openvino_bf16_runs(trained, tmp_path):
    """bf16 (the benchmark's row) runs and stays near float32, and differs from it where the CPU has
    bfloat16 (elsewhere OpenVINO computes in float32)."""
    import openvino

    from models import export
    from models.inference.runtimes import load_runtime

    checkpoint, pixels = trained[:2]
    path = export.main(["--checkpoint", str(checkpoint), "--format", "openvino", "--out", str(tmp_path)])
    fp32 = load_runtime(path).run(pixels[:4])
    bf16 = load_runtime(path, precision="bf16").run(pixels[:4])
    for got, want in zip(bf16, fp32):
        np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05)
    if "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert not np.array_equal(bf16[0], fp32[0])  # the hint took effect (on the raw maps: scores clip at 0 and 1)
    with pytest.raises(ValueError, match="fp32"):
        load_runtime(path, precision="fp16")


@pytest.mark.parametrize("fmt,module,extra", [("onnx", "onnxscript", "onnx"), ("openvino", "openvino", "openvino")])
def test_a_missing_extra_is_named_and_nothing_is_written(trained, tmp_path, capsys, monkeypatch, fmt, module, extra):
    from models import export

    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    out = tmp_path / "graph"
    with pytest.raises(SystemExit):
        export.main(["--checkpoint", str(trained[0]), "--format", fmt, "--out", str(out)])
    err = capsys.readouterr().err
    assert f"pip install 'daad-ext[{extra}]'" in err and module in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_missing_runtime_is_named(tmp_path, monkeypatch):
    from models.inference.runtimes import INFO_KEYS, MissingExtraError, load_runtime

    info = {**dict.fromkeys(INFO_KEYS, 0), "format": "onnx", "input_dtype": "uint8", "file": "detector.onnx"}
    (tmp_path / "detector.json").write_text(json.dumps(info))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtraError, match=r"onnxruntime.*pip install 'daad-ext\[onnx\]'"):
        load_runtime(str(tmp_path))


def test_a_failed_export_leaves_the_folder_as_it_was(trained, tmp_path, monkeypatch):
    """Into a new folder: nothing; into an existing one: its files untouched; no temporaries."""
    from models import export
    from models.inference import graph

    def fail(program, images, path):
        open(path, "wb").write(b"half a graph")
        raise OSError("disk full")

    monkeypatch.setitem(graph.WRITERS, "pt2", fail)
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "detector.json").write_text("{}")
    for out in (tmp_path / "new", kept):
        with pytest.raises(OSError, match="disk full"):
            export.export(str(trained[0]), "pt2", str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert [p.name for p in kept.iterdir()] == ["detector.json"] and (kept / "detector.json").read_text() == "{}"


def test_an_export_that_computes_otherwise_is_refused(trained, tmp_path, capsys, monkeypatch):
    """export runs what it wrote in its runtime before it keeps it: scores 1e-3 off are refused."""
    from models import export
    from models.inference.runtimes import TorchRuntime

    run = TorchRuntime.outputs
    monkeypatch.setattr(TorchRuntime, "outputs", lambda self, images: (run(self, images)[0], run(self, images)[1] + 1e-3))
    with pytest.raises(SystemExit):
        export.main(["--checkpoint", str(trained[0]), "--format", "pt2", "--out", str(tmp_path / "graph")])
    assert "the pt2 export computes score up to 0.001 away from PyTorch" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_an_unfinished_run(trained, tmp_path, capsys):
    from models import export
    from models.training import load_checkpoint, save_checkpoint

    state = load_checkpoint(trained[0])
    state["calibration"] = None
    save_checkpoint(state, tmp_path / "unfinished.pt")
    with pytest.raises(SystemExit):
        export.main(["--checkpoint", str(tmp_path / "unfinished.pt"), "--format", "pt2", "--out", str(tmp_path)])
    assert "no calibration" in capsys.readouterr().err


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("image_score", ["mean", "max"])
def test_every_path_scores_an_image_alike(trained, tmp_path, image_score):
    """One calibration behind every path: ``evaluate``'s per-image score, ``predict``'s, the Python
    API's (NumPy, float64) and the exported graphs' (float32; pt2, ONNX and OpenVINO, fed the
    decoded 512 x 512 pixels, resized in the graph, directly and through the API) are the same
    ``pred_score`` and give the same label; evaluate's AUROC is that of the raw fused scores."""
    from models import Detector, evaluate, export, predict
    from models.data import data_root, load_image
    from models.data.images import read_pixels
    from models.inference.metrics import image_auroc
    from models.inference.runtimes import load_runtime

    checkpoint = trained[0]
    root = data_root() / "mvtec_hazelnut_subset"
    # Images with both labels and scores between 0 and 1 by either image score (this seeded run's).
    files = [str(root / "test" / kind / name) for kind, name in (("colour", "00.jpg"), ("colour", "03.jpg"),
             ("colour", "07.jpg"), ("colour", "13.jpg"), ("good", "05.jpg"), ("good", "28.jpg"))]
    # The plain float32 model everywhere, as the graph computes it (the default adds bfloat16 autocast).
    report = predict.predict(str(checkpoint), files, str(tmp_path / "pred"), "cpu", image_score, fast=False)
    predicted = np.array([r["score"] for r in report["predictions"]])
    api = Detector.load(checkpoint, "cpu", image_score, fast=False).predict(files)
    batch = torch.stack([load_image(f, 3, 32) for f in files])
    pixels = np.stack([read_pixels(f, 3) for f in files])
    graphs = {}
    for fmt in ("pt2", "onnx", "openvino"):
        path = export.main(["--checkpoint", str(checkpoint), "--format", fmt, "--out", str(tmp_path / fmt),
                            "--image-score", image_score])
        assert json.loads((tmp_path / fmt / "detector.json").read_text())["image_score"] == image_score
        graphs[fmt] = load_runtime(path).run(pixels)[1]
        deployed = Detector.load(tmp_path / fmt, fast=False).predict(files)  # the API on the export folder
        graphs[f"api, {fmt}"] = np.array([r.pred_score for r in deployed])
        for mine, theirs in zip(api, deployed):  # the maps too, normalised at the images' own resolution
            np.testing.assert_allclose(theirs.anomaly_map, mine.anomaly_map, rtol=0, atol=1e-4, err_msg=fmt)
    result = evaluate.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "eval"), "--device", "cpu",
                            "--image-score", image_score, "--num-heatmaps", "0", "--no-fast"])
    by_name = {i["name"]: i for i in result["images"]}
    evaluated = np.array([by_name[f]["score"] for f in files])
    paths = {"predict": predicted, "api": np.array([r.pred_score for r in api]), "evaluate": evaluated, **graphs}
    _, reference = pytorch_scores(checkpoint, batch, image_score)
    for name, scores in paths.items():
        np.testing.assert_allclose(scores, reference, rtol=0, atol=1e-5, err_msg=name)
        clear = np.abs(reference - 0.5) > 1e-5  # a score within rounding of the boundary may go either way
        np.testing.assert_array_equal(scores[clear] >= 0.5, reference[clear] >= 0.5, err_msg=name)
    assert 0 < (reference >= 0.5).sum() < len(files)  # both labels among the images
    assert [r["label"] for r in report["predictions"]] == [r.label for r in api]
    assert [by_name[f]["pred_label"] for f in files] == [r.pred_label for r in api]
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["image_auroc"] == result["image_auroc"] == image_auroc(
        [i["label"] for i in written["images"]], [i["fused"] for i in written["images"]])
    counts = written["image_decision"]
    labels = np.array([i["label"] for i in written["images"]])
    decided = np.array([i["pred_label"] for i in written["images"]])
    assert (counts["tp"], counts["fp"]) == (int((decided & (labels == 1)).sum()), int((decided & (labels == 0)).sum()))
    assert counts["tp"] + counts["fp"] + counts["tn"] + counts["fn"] == len(labels)


def test_predict_runs_an_export_folder_scored_as_exported(trained, tmp_path, capsys):
    """daad-predict and Detector.load take an export folder: it keeps the image score it was
    exported with, and another one is refused by name."""
    from models import Detector, export, predict
    from models.data import data_root

    folder = tmp_path / "graph"
    export.main(["--checkpoint", str(trained[0]), "--format", "pt2", "--out", str(folder), "--image-score", "mean"])
    image = str(data_root() / "mvtec_hazelnut_subset" / "test" / "colour" / "00.jpg")
    report = predict.main([str(folder), image, "--out", str(tmp_path / "pred")])
    assert report["image_score"] == "mean" and len(report["predictions"]) == 1
    assert "score=" in capsys.readouterr().out
    with pytest.raises(ValueError, match="exported with the image score 'mean'"):
        Detector.load(folder, image_score="max")
    # a damaged export folder: one clear error naming the file, never the runtime's traceback
    (folder / "detector.pt2").write_bytes(b"not a graph")
    with pytest.raises(SystemExit):
        predict.main([str(folder), image, "--out", str(tmp_path / "pred")])
    assert f"{folder / 'detector.pt2'} cannot be loaded" in capsys.readouterr().err
    (folder / "detector.json").write_text("{not json")
    with pytest.raises(ValueError, match="detector.json cannot be read"):
        Detector.load(folder)


@pytest.mark.usefixtures("single_thread")
def test_a_grayscale_detector_through_the_api_and_its_export(mnist, tmp_path):
    """One channel end to end: (H, W) pixels into the API on the checkpoint and on the ONNX
    export (whose graph takes (B, H, W, 1)), the same scores and maps."""
    import warnings

    from models import Detector, export, train
    from models.inference.run_scoring import UntrainedWarning
    from models.inference.runtimes import load_runtime

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedWarning)
        train.main(["--dataset", "mnist", "--root", str(mnist), "--normal-class", "1", "--size", "32",
                    "--width", "4", "--division", "2", "2", "1", "--num-items", "20", "--model", "ae",
                    "--steps", "2", "--no-fast", "--device", "cpu", "--out", str(tmp_path / "run")])
    export.main(["--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--format", "onnx",
                 "--out", str(tmp_path / "onnx")])
    digits = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)  # (B, H, W): grayscale
    local = Detector.load(tmp_path / "run" / "checkpoint.pt", "cpu", fast=False).predict(list(digits))
    deployed = Detector.load(tmp_path / "onnx").predict(list(digits))
    for mine, theirs in zip(local, deployed):
        assert theirs.image.shape == (28, 28) and theirs.anomaly_map.shape == (28, 28)
        assert theirs.pred_score == pytest.approx(mine.pred_score, abs=1e-5)
        np.testing.assert_allclose(theirs.anomaly_map, mine.anomaly_map, rtol=0, atol=1e-4)
    maps, _ = load_runtime(str(tmp_path / "onnx")).run(digits)  # (B, H, W) taken as one channel
    assert maps.shape == (3, 32, 32)
