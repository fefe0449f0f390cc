"""Camera-trap-like JPEGs for the input benchmarks (iWildCam v2.0 stores every image 448 px high).

Each image has what makes real JPEGs cost what they cost to decode and resample: a smooth, lit
background (low-frequency noise and a vertical gradient), mid-frequency texture, sensor noise and
an "animal" with a patterned coat; 600x448 (4:3) and 800x448 (16:9) alternate, quality 90
(about 90 KB each, close to the 120 KB average of the real release).

    python benchmarks/fabricate.py OUT_DIR 2000      # as a script
    image_folder(OUT_DIR, 2000)                      # from a benchmark: <OUT>/<class>/<i>.jpg

Files are written once and reused (a folder with the right count is left as it is); more images
than distinct ones are made of hard links to the distinct files (``distinct``), which is enough
for measuring memory and start-up, where the pixel content does not matter.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

SIZES = ((600, 448), (800, 448))
CLASSES = 10


def camera_trap_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """One synthetic camera-trap frame as uint8 (height, width, 3)."""
    import torch
    import torch.nn.functional as F

    def smooth(cells: int, scale: float) -> np.ndarray:
        low = torch.from_numpy(rng.normal(0, 1, (1, 3, height // cells + 2, width // cells + 2)).astype(np.float32))
        return scale * F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)[0].numpy()

    image = rng.uniform(60, 160, (3, 1, 1)) + smooth(32, 25) + smooth(4, 12)
    image += np.linspace(-30, 30, height)[None, :, None] + rng.normal(0, 6, (3, height, width))
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.2, 0.8) * width
    ry, rx = rng.uniform(0.08, 0.2) * height, rng.uniform(0.08, 0.25) * width
    yy, xx = np.mgrid[0:height, 0:width]
    body = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    coat = rng.uniform(30, 220, (3, 1, 1)) + 30 * np.sin(xx / rng.uniform(3, 9))[None]
    image = np.where(body[None], coat, image)
    return np.clip(image, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def _write(args: tuple[str, int, int]) -> None:
    from PIL import Image

    folder, start, stop = args
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        width, height = SIZES[i % len(SIZES)]
        path = Path(folder) / f"c{i % CLASSES:02d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(camera_trap_image(rng, width, height)).save(path, quality=90)


def image_folder(folder: str | Path, count: int, *, distinct: int | None = None, workers: int = 2) -> Path:
    """``<folder>/<class>/<i>.jpg`` with ``count`` images (the first ``distinct`` of them real
    files, the rest hard links to them); returns the folder."""
    folder = Path(folder)
    distinct = min(count, distinct or count)
    existing = sum(1 for _ in folder.glob("c*/*.jpg")) if folder.exists() else 0
    if existing == count:
        return folder
    chunks = [(str(folder), s, min(distinct, s + 100)) for s in range(0, distinct, 100)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_write, chunks))
    for i in range(distinct, count):
        source = folder / f"c{(i % distinct) % CLASSES:02d}" / f"{i % distinct:06d}.jpg"
        target = folder / f"c{i % CLASSES:02d}" / f"{i:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.link(source, target)
    return folder


if __name__ == "__main__":
    print(image_folder(sys.argv[1], int(sys.argv[2])))
