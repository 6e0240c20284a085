"""Score images one by one: ``python -m models.predict CHECKPOINT IMAGE... [--out DIR]``.

Prints each image's anomaly score and writes its heat map to ``--out``. A single image has no set
to min-max scale over, so R and L are scaled by their range on the training images (measured when
training ended, stored in the checkpoint): normal images score about 0..1, anomalies above. The raw
R(x) and L(x) are printed too. Heat maps share the colour scale of the training images' errors.

Example:
    python -m models.predict runs/hazelnut/checkpoint.pt \\
        ../shared/data/mvtec_hazelnut_subset/test/colour/00.jpg --out runs/hazelnut/predict
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional, Sequence


from .data import load_image
from .distributed import resolve_device
from .inference import load_detector
from .plots import save_heatmap
from .scoring import IMAGE_SCORES, default_sigma, fuse_scores, image_scores


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.predict", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint.pt written by models.train")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to score")
    p.add_argument("--out", default="predictions", help="folder for the heat maps (default: predictions)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K (default: auto)")
    p.add_argument("--image-score", choices=IMAGE_SCORES, default="mean",
                   help="R: mean of the anomaly map (the paper) or max of the smoothed map (anomalib) (default: mean)")
    return p


def predict(checkpoint: str, images: Sequence[str], out: str, device: str = "auto",
            image_score: str = "mean") -> list[dict]:
    """Scores of ``images``; writes ``<out>/<stem>_heatmap.png`` for each. With ``image_score``
    "max", R is the maximum of the map smoothed by the default sigma (scaled by its range on
    the training images too)."""
    dev = resolve_device(device)
    model, config, state = load_detector(checkpoint, dev)
    calib = state.get("calibration")
    if calib is None:
        raise ValueError(f"{checkpoint} has no calibration (its training did not finish): "
                         "resume it to the end, or use models.evaluate on a test set")
    os.makedirs(out, exist_ok=True)
    gamma = config.fusion_gamma
    results = []
    for path in images:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image not found: {path}")
        x = load_image(path, config.model.in_channels, config.model.size)
        s = model.score(x[None].to(dev), config.ali_loss)
        rec = s.rec.cpu().numpy()
        feat = s.feat.cpu().numpy() if s.feat is not None else None
        r, r_range = rec, (calib["rec_min"], calib["rec_max"])
        if image_score == "max":
            if "max_min" not in calib:
                raise ValueError(f"{checkpoint} has no calibration of the max score (trained before it existed): "
                                 "use --image-score mean")
            r = image_scores(s.error_map.cpu().numpy(), "max", default_sigma(config.model.size))
            r_range = (calib["max_min"], calib["max_max"])
        score = fuse_scores(r, feat, gamma, r_range,
                            (calib["feat_min"], calib["feat_max"]) if feat is not None else None)
        heatmap = os.path.join(out, f"{Path(path).stem}_heatmap.png")
        save_heatmap(x, s.reconstruction[0], s.error_map[0].cpu().numpy(), calib["map_max"], heatmap,
                     f"{Path(path).name}: score {score[0]:.3f}")
        results.append({"image": path, "score": float(score[0]), "rec": float(rec[0]),
                        "feat": None if feat is None else float(feat[0]), "heatmap": heatmap})
    return results


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        results = predict(args.checkpoint, args.images, args.out, args.device, args.image_score)
    except (ValueError, OSError) as e:  # OSError: missing or unreadable images
        parser.error(str(e))
    for r in results:
        extra = "" if r["feat"] is None else f"  L={r['feat']:.6g}"
        print(f"{r['image']}  score={r['score']:.4f}  R={r['rec']:.6g}{extra}  heatmap={r['heatmap']}")
    return results


if __name__ == "__main__":
    main()
