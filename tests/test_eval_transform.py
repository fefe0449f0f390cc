"""rftlib's evaluation view against open_clip's eval transform (torchvision ``Resize(224, bicubic)``
+ ``CenterCrop(224)`` on a PIL image): the same geometry on awkward sizes (no one-pixel shift), and
a resampling difference far below a pixel shift's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from rftlib.data.images import center_crop_offsets, center_view, resize_geometry

SIZES = [(375, 500), (747, 1024), (1536, 2048), (501, 333), (224, 225), (225, 224), (299, 299), (1000, 1001)]


def _photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth gradients plus mild noise (resampling differences grow with high-frequency content)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200 + 20
    texture = 25 * np.sin(x / 7.0)[..., None] * np.cos(y / 11.0)[..., None]
    return np.clip(base + texture + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)


def _open_clip_eval(array: np.ndarray, size: int) -> np.ndarray:
    pipeline = T.Compose([T.Resize(size, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(size)])
    return np.asarray(pipeline(Image.fromarray(array)))


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_the_eval_view_has_open_clips_geometry(height, width):
    resized = T.Resize(224)(Image.new("RGB", (width, height)))
    assert resize_geometry(height, width, 224) == (resized.height, resized.width)
    index = torch.arange(height * width).reshape(1, height, width)  # no resampling: the offsets show exactly
    cropped = T.CenterCrop(224)(index)
    top, left = center_crop_offsets(height, width, 224)
    assert cropped[0, 0, 0].item() == top * width + left


def test_the_eval_view_matches_open_clips_pixels_to_well_under_a_level():
    """Mean |difference| over the sizes above: rftlib (torch uint8 bicubic, antialiased) vs PIL's
    bicubic. A one-pixel crop shift, the bug this replaced, costs 2-4.5 levels on the same images."""
    diffs, shifted = [], []
    for seed, (height, width) in enumerate(SIZES):
        array = _photo_like(height, width, seed)
        ours = center_view(torch.from_numpy(array).permute(2, 0, 1), 224).permute(1, 2, 0).numpy()
        reference = _open_clip_eval(array, 224).astype(np.int16)
        diffs.append(np.abs(ours.astype(np.int16) - reference).mean())
        shifted.append(np.abs(np.roll(reference, 1, axis=1)[:, 1:] - reference[:, 1:]).mean())
    assert max(diffs) < 0.5 < min(shifted), (diffs, shifted)
