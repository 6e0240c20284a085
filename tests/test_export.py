"""Export: the fused op's decomposition (daad_ext/export.py) and ``python -m models.export``
(pt2 through torch.export, onnx through ONNX Runtime) on the hazelnut subset, against PyTorch."""
from __future__ import annotations

import json

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
    """A daad+ checkpoint trained for one epoch on the hazelnut subset, and its test images."""
    from models import train
    from models.data import data_root

    hazelnut = data_root() / "mvtec_hazelnut_subset"
    if not hazelnut.is_dir():
        pytest.skip(f"real data absent: {hazelnut}")
    out = tmp_path_factory.mktemp("export") / "run"
    trainer = train.main(["--dataset", "mvtec", "--root", str(hazelnut), "--size", "32", "--width", "4",
                          "--division", "2", "2", "1", "--num-items", "20", "--batch", "8",
                          "--device", "cpu", "--model", "daad+", "--epochs", "1", "--out", str(out)])
    test_set = trainer.config.dataset_split("test")
    images = torch.stack([test_set[i]["image"] for i in range(len(test_set))])
    return out / "checkpoint.pt", images, np.array(test_set.labels)


def pytorch_scores(checkpoint, images, image_score="max"):  # export's default image score
    """Maps and scores as models.predict computes them, in eager PyTorch with the fused kernels."""
    from models.inference import Scorer
    from models.training import load_detector

    model, config, state = load_detector(str(checkpoint), torch.device("cpu"))
    scorer = Scorer.calibrated(config, state, str(checkpoint), image_score)
    s = model.score(images, config.ali_loss)
    return s.error_map.numpy(), scorer.score(s.error_map.numpy(), s.feat.numpy())


def check_against_pytorch(maps, scores, checkpoint, images, labels):
    from models.inference.metrics import image_auroc

    ref_maps, ref_scores = pytorch_scores(checkpoint, images)
    np.testing.assert_allclose(maps, ref_maps, rtol=0, atol=1e-4)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-4)
    assert image_auroc(labels, scores) == image_auroc(labels, ref_scores)


@pytest.mark.usefixtures("single_thread")
def test_export_pt2(trained, tmp_path):
    from models import export

    checkpoint, images, labels = trained
    path = export.main(["--checkpoint", str(checkpoint), "--format", "pt2", "--out", str(tmp_path)])
    program = torch.export.load(path)
    assert not any("daad_ext" in t for t in op_targets(program.graph))
    maps, scores = program.module()(images)  # the whole test set in one batch: a dynamic batch
    check_against_pytorch(maps.detach().numpy(), scores.detach().numpy(), checkpoint, images, labels)
    info = json.loads((tmp_path / "detector.json").read_text())
    assert info["size"] == 32 and info["outputs"] == ["anomaly_map", "score"] and info["format"] == "pt2"


@pytest.mark.usefixtures("single_thread")
def test_export_onnx_runs_in_onnx_runtime(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from models import export

    checkpoint, images, labels = trained
    path = export.main(["--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(tmp_path)])
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["anomaly_map", "score"]
    maps, scores = session.run(None, {"image": images.numpy()})
    check_against_pytorch(maps, scores, checkpoint, images, labels)
    one_map, one_score = session.run(None, {"image": images[:1].numpy()})  # another batch size
    np.testing.assert_allclose(one_score, scores[:1], rtol=0, atol=1e-5)


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
    API's (NumPy, float64) and the exported graphs' (torch, float32; pt2 and ONNX) are the same
    ``pred_score`` and give the same label; evaluate's AUROC is that of the raw fused scores."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from models import Detector, evaluate, export, predict
    from models.data import data_root, load_image
    from models.inference.metrics import image_auroc

    checkpoint, _, _ = trained
    root = data_root() / "mvtec_hazelnut_subset"
    # Images with both labels and scores between 0 and 1 by either image score (this seeded run's).
    files = [str(root / "test" / kind / name) for kind, name in (("colour", "00.jpg"), ("colour", "03.jpg"),
             ("colour", "07.jpg"), ("colour", "13.jpg"), ("good", "05.jpg"), ("good", "28.jpg"))]
    # The plain float32 model everywhere, as the graph computes it (the default adds bfloat16 autocast).
    report = predict.predict(str(checkpoint), files, str(tmp_path / "pred"), "cpu", image_score, fast=False)
    predicted = np.array([r["score"] for r in report["predictions"]])
    api = Detector.load(checkpoint, "cpu", image_score, fast=False).predict(files)
    batch = torch.stack([load_image(f, 3, 32) for f in files])
    graphs = {}
    for fmt in ("pt2", "onnx"):
        path = export.main(["--checkpoint", str(checkpoint), "--format", fmt, "--out", str(tmp_path / fmt),
                            "--image-score", image_score])
        assert json.loads((tmp_path / fmt / "detector.json").read_text())["image_score"] == image_score
        if fmt == "pt2":
            graphs[fmt] = torch.export.load(path).module()(batch)[1].detach().numpy()
        else:
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            graphs[fmt] = session.run(None, {"image": batch.numpy()})[1]
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
