"""models/data/preprocess.py: the one resize of the loader and the exported graph is PyTorch's
antialiased bilinear resize, written as matrix products (tests/test_export.py runs it exported)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.data.preprocess import resize_weights, to_model_input


def interpolated(images: torch.Tensor, size: int) -> torch.Tensor:
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x / 127.5 - 1.0).clamp(-1.0, 1.0)


@pytest.mark.parametrize("height,width,size", [(512, 512, 32), (50, 60, 32), (257, 301, 64), (20, 17, 32),
                                               (33, 31, 32), (32, 32, 32), (1000, 7, 16)],
                         ids=lambda v: str(v))
def test_the_resize_is_torchs_antialiased_bilinear(height, width, size):
    """Shrinking, enlarging, both at once and the identity: float32 rounding apart (weights summed
    in another order; a pixel step is 1/127.5 ~ 8e-3)."""
    torch.manual_seed(height * width)
    images = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8)
    got = to_model_input(images, size)
    assert got.shape == (2, 3, size, size) and got.dtype == torch.float32
    torch.testing.assert_close(got, interpolated(images, size), rtol=0, atol=1e-6)


def test_weights_rows_sum_to_one_and_the_same_size_is_the_identity():
    torch.testing.assert_close(resize_weights(700, 64, torch.device("cpu")).sum(1), torch.ones(64))
    assert torch.equal(resize_weights(32, 32, torch.device("cpu")), torch.eye(32))
    images = torch.randint(0, 256, (1, 1, 32, 32), dtype=torch.uint8)
    assert torch.equal(to_model_input(images, 32), images.float() / 127.5 - 1.0)


def test_the_loader_uses_it(tmp_path):
    import numpy as np
    from PIL import Image

    from models.data import load_image

    pixels = np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    expected = to_model_input(torch.from_numpy(pixels).permute(2, 0, 1)[None], 32)[0]
    assert torch.equal(load_image(str(tmp_path / "image.png"), 3, 32), expected)
