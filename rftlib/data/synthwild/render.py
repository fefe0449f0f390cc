"""Vectorised numpy renderer for synthwild images.

An image is drawn in three layers, all as float32 in [0, 1] and whole batches at a time:

1. **Background** (:func:`render_scenes`): a scene's base colour, modulated by low-frequency noise
   (a 4x4 Gaussian grid upsampled bilinearly), blended with a texture (vertical grass blades, tree
   trunks, blotches or horizontal waves) and sprinkled with per-pixel grain. Cameras render their
   scene once and reuse it; the pretraining corpus renders a fresh one per image.
2. **Object**: an anti-aliased shape mask (from a signed distance in pixels, so edges are soft),
   filled with the body colour and darkened by a pattern field (stripes, spots, checker) that is
   periodic in object-centred pixel coordinates.
3. **Camera effects** (:func:`apply_camera_effects`): brightness, RGB tint, night/infrared
   (greyscale x 0.6 + 0.05), separable box blur via cumulative sums, Gaussian sensor noise.

Everything is described by a :class:`RenderSpec` (one array entry per image) and drawn by
:func:`render_images` in chunks, so memory stays bounded and the cost is a few dozen full-array
numpy passes per chunk (thousands of 32 px images per second on one core).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> bg = render_scene(rng, "grass", 32)
    >>> bg.shape, bg.dtype
    ((32, 32, 3), dtype('float32'))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np

from .attributes import COLOURS, PATTERN_DARKNESS, PATTERNS, SCENES, SHAPES, scene_index

#: Luma weights used to turn a colour image into a night (infrared) greyscale one.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# --------------------------------------------------------------------------------------------------
# The render specification
# --------------------------------------------------------------------------------------------------


@dataclass
class RenderSpec:
    """Everything needed to draw ``N`` images, one array entry per image.

    Attributes:
        shapes: (N,) int, index into :data:`~.attributes.SHAPES`.
        patterns: (N,) int, index into :data:`~.attributes.PATTERNS`.
        colours: (N, 3) float, body RGB in [0, 1] (jitter already applied).
        radii: (N,) float, object radius in pixels.
        centres: (N, 2) float, object centre ``(x, y)`` in pixels (0 = left/top edge).
        pattern_periods: (N,) float, pattern period in pixels.
        pattern_phases: (N, 2) float, pattern offset ``(x, y)`` in pixels.
        scenes: (N,) int, index into :data:`~.attributes.SCENES` (used when backgrounds are fresh).
        brightness: (N,) float, global gain of the camera.
        tint: (N, 3) float, per-channel gain of the camera.
        night: (N,) bool, infrared night shot (colour removed).
        blur: (N,) int, box-blur radius in pixels (0 = sharp).
        noise: (N,) float, standard deviation of Gaussian sensor noise.
        background_index: (N,) int or None; row of a fixed background bank per image.
        background_gain: (N,) float, brightness jitter of the background (1 = none).
    """

    shapes: np.ndarray
    patterns: np.ndarray
    colours: np.ndarray
    radii: np.ndarray
    centres: np.ndarray
    pattern_periods: np.ndarray
    pattern_phases: np.ndarray
    scenes: np.ndarray
    brightness: np.ndarray
    tint: np.ndarray
    night: np.ndarray
    blur: np.ndarray
    noise: np.ndarray
    background_index: np.ndarray | None = None
    background_gain: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.shapes)
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and len(value) != n:
                raise ValueError(f"RenderSpec.{f.name} has {len(value)} entries, expected {n}")

    def __len__(self) -> int:
        return len(self.shapes)

    def take(self, index: slice | np.ndarray) -> RenderSpec:
        """The spec of a subset of images (``index`` is a slice or an index array)."""
        parts = {
            f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[index])
            for f in fields(self)
        }
        return RenderSpec(**parts)


def colour_table() -> np.ndarray:
    """The named colours as a (10, 3) float32 RGB array, in :data:`~.attributes.COLOURS` order."""
    return np.array([c.rgb for c in COLOURS], dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# Backgrounds
# --------------------------------------------------------------------------------------------------


def _upsample_matrix(size: int, k: int) -> np.ndarray:
    """A (size, k) matrix that bilinearly upsamples ``k`` grid values to ``size`` pixels.

    ``M @ g @ M.T`` upsamples a (k, k) grid ``g`` to (size, size) with edge clamping.
    """
    pos = np.clip((np.arange(size) + 0.5) * k / size - 0.5, 0, k - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, k - 1)
    frac = (pos - lo).astype(np.float32)
    m = np.zeros((size, k), dtype=np.float32)
    m[np.arange(size), lo] += 1 - frac
    m[np.arange(size), hi] += frac
    return m


def _pixel_centres(size: int) -> np.ndarray:
    """Pixel-centre coordinates ``0.5, 1.5, ...`` as float32."""
    return np.arange(size, dtype=np.float32) + 0.5


def _outer_sum(cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Sum over k of separable stamps: ``out[m, y, x] = sum_k rows[m, k, y] * cols[m, k, x]``.

    A batched matrix product, much faster than drawing each stamp on the full image.
    """
    return np.matmul(np.swapaxes(rows, 1, 2), cols)


def _texture_blades(rng: np.random.Generator, m: int, size: int) -> np.ndarray:
    """Thin vertical blades growing from the bottom edge (grass, savanna); alpha (m, S, S)."""
    k = max(4, size // 2)
    scale = size / 32
    x = _pixel_centres(size)
    pos = rng.uniform(0, size, (m, k, 1)).astype(np.float32)
    top = size * (1 - rng.uniform(0.2, 0.85, (m, k, 1))).astype(np.float32)
    strength = rng.uniform(0.3, 1.0, (m, k, 1)).astype(np.float32)
    cols = np.clip(1 - np.abs(x - pos) / scale, 0, 1) * strength
    rows = np.clip((x - top) / (2 * scale), 0, 1)
    return np.clip(_outer_sum(cols, rows), 0, 1)


def _texture_trunks(rng: np.random.Generator, m: int, size: int) -> np.ndarray:
    """A few wide full-height vertical bars (tree trunks, reeds); alpha (m, S, S)."""
    k = 4
    scale = size / 32
    x = _pixel_centres(size)
    pos = rng.uniform(0, size, (m, k, 1)).astype(np.float32)
    half = rng.uniform(0.8, 2.2, (m, k, 1)).astype(np.float32) * scale
    strength = rng.uniform(0.0, 1.0, (m, k, 1)).astype(np.float32)
    cols = np.clip(half + 0.5 - np.abs(x - pos), 0, 1) * strength
    # Trunks fade slightly towards the top, like trees receding into the canopy.
    rows = np.broadcast_to(0.7 + 0.3 * x / size, (m, k, size))
    return np.clip(_outer_sum(cols, rows), 0, 1)


def _texture_blotches(rng: np.random.Generator, m: int, size: int) -> np.ndarray:
    """Soft round blotches (stones, puddles); alpha (m, S, S)."""
    k = 6
    scale = size / 32
    x = _pixel_centres(size)
    cx = rng.uniform(0, size, (m, k, 1)).astype(np.float32)
    cy = rng.uniform(0, size, (m, k, 1)).astype(np.float32)
    sigma = rng.uniform(1.5, 4.0, (m, k, 1)).astype(np.float32) * scale
    strength = rng.uniform(0.4, 1.0, (m, k, 1)).astype(np.float32)
    gx = np.exp(-0.5 * ((x - cx) / sigma) ** 2) * strength
    gy = np.exp(-0.5 * ((x - cy) / sigma) ** 2)
    return np.clip(_outer_sum(gx, gy) * 1.5, 0, 1)


def _texture_waves(rng: np.random.Generator, m: int, size: int) -> np.ndarray:
    """Horizontal wavy bands (dunes, ripples, drifts); alpha (m, S, S)."""
    scale = size / 32
    x = _pixel_centres(size)
    period = rng.uniform(4.0, 8.0, (m, 1, 1)).astype(np.float32) * scale
    amp = rng.uniform(0.5, 2.5, (m, 1, 1)).astype(np.float32) * scale
    wavelength = rng.uniform(10.0, 30.0, (m, 1, 1)).astype(np.float32) * scale
    phase = rng.uniform(0, 2 * np.pi, (m, 2, 1, 1)).astype(np.float32)
    offset = amp * np.sin(2 * np.pi * x[None, None, :] / wavelength + phase[:, 0])
    wave = np.sin(2 * np.pi * (x[None, :, None] + offset) / period + phase[:, 1])
    return (0.5 + 0.5 * wave) ** 2


_TEXTURES: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "blades": _texture_blades,
    "trunks": _texture_trunks,
    "blotches": _texture_blotches,
    "waves": _texture_waves,
}


def _render_scene_group(rng: np.random.Generator, scene_id: int, m: int, size: int) -> np.ndarray:
    """``m`` fresh backgrounds of one scene type, float32 (m, S, S, 3)."""
    scene = SCENES[scene_id]
    up = _upsample_matrix(size, 4)
    grid = rng.standard_normal((m, 4, 4, 3), dtype=np.float32)
    grid = grid[..., :1] + 0.3 * grid  # mostly brightness variation, a little colour
    low = np.moveaxis(up @ np.moveaxis(grid, 3, 1) @ up.T, 1, 3)  # bilinear 4x4 -> S x S
    img = np.asarray(scene.base_rgb, dtype=np.float32) * (1 + scene.variation * low)
    alpha = (_TEXTURES[scene.texture](rng, m, size) * scene.texture_strength)[..., None]
    img = img * (1 - alpha) + np.asarray(scene.texture_rgb, dtype=np.float32) * alpha
    img += scene.grain * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0, 1, out=img)


def render_scenes(rng: np.random.Generator, scenes: np.ndarray, image_size: int) -> np.ndarray:
    """Fresh backgrounds, one per entry of ``scenes``.

    Args:
        rng: random generator (consumed).
        scenes: (N,) int indices into :data:`~.attributes.SCENES`.
        image_size: side ``S`` in pixels.

    Returns:
        float32 array (N, S, S, 3) in [0, 1].
    """
    scenes = np.asarray(scenes, dtype=np.int64)
    out = np.empty((len(scenes), image_size, image_size, 3), dtype=np.float32)
    for scene_id in np.unique(scenes):
        idx = np.flatnonzero(scenes == scene_id)
        out[idx] = _render_scene_group(rng, int(scene_id), len(idx), image_size)
    return out


def render_scene(rng: np.random.Generator, scene_type: str | int, image_size: int) -> np.ndarray:
    """One background of a scene type (by key such as ``"grass"`` or by index), float32 (S, S, 3)."""
    sid = scene_index(scene_type) if isinstance(scene_type, str) else int(scene_type)
    return render_scenes(rng, np.array([sid]), image_size)[0]


# --------------------------------------------------------------------------------------------------
# Objects: shape masks and patterns
# --------------------------------------------------------------------------------------------------


def _oval_distance(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance (in radius units) to an axis-aligned ellipse of semi-axes a, b."""
    return (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1) * min(a, b)


def _triangle_distance(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (radius units) to an upward-pointing isosceles triangle."""
    apex, base, half_width = -1.05, 0.85, 1.1
    slope = half_width / (base - apex)
    side = (np.abs(u) - slope * (v - apex)) / np.sqrt(1 + slope**2)
    return np.maximum(side, v - base)


def _cross_distance(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (radius units) to a plus-shaped cross."""
    au, av = np.abs(u), np.abs(v)
    arm, length = 0.36, 1.0
    return np.minimum(np.maximum(au - length, av - arm), np.maximum(au - arm, av - length))


#: Signed distance of each shape, in units of the radius, as a function of centred coordinates.
_SHAPE_DISTANCE: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: np.sqrt(u * u + v * v) - 1,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) - 0.85,
    "triangle": _triangle_distance,
    "diamond": lambda u, v: (np.abs(u) + np.abs(v) - 1.15) / np.sqrt(2),
    "cross": _cross_distance,
    "ring": lambda u, v: np.abs(np.sqrt(u * u + v * v) - 0.72) - 0.28,
    "wide_oval": lambda u, v: _oval_distance(u, v, 1.1, 0.62),
    "tall_oval": lambda u, v: _oval_distance(u, v, 0.62, 1.1),
}


def _soft_square(x: np.ndarray, sharpness: float = 2.0) -> np.ndarray:
    """Map a wave in [-1, 1] to a soft 0/1 square wave (anti-aliased pattern edges)."""
    return np.clip(0.5 + sharpness * x, 0, 1)


def _pattern_field(key: str, px: np.ndarray, py: np.ndarray, period: np.ndarray) -> np.ndarray | float:
    """How dark each pixel of the coat is (0 = body colour, 1 = fully patterned).

    Args:
        key: pattern key from :data:`~.attributes.PATTERNS`.
        px, py: object-centred pixel coordinates (shifted by the pattern phase), broadcastable.
        period: pattern period in pixels, broadcastable.
    """
    w = 2 * np.pi / period
    if key == "plain":
        return 0.0
    if key == "hstripes":
        return _soft_square(np.cos(w * py))
    if key == "vstripes":
        return _soft_square(np.cos(w * px))
    if key == "spots":
        ws = w / 1.3  # spots sit on a slightly coarser grid than stripes
        return _soft_square(np.cos(ws * px) + np.cos(ws * py) - 0.4, sharpness=1.5)
    if key == "checker":
        wc = w / 1.5  # cells of 0.75 period, readable at small periods
        return _soft_square(3 * np.cos(wc * px) * np.cos(wc * py), sharpness=1.0)
    raise ValueError(f"unknown pattern {key!r}")


def _draw_objects(canvas: np.ndarray, spec: RenderSpec) -> None:
    """Composite every object of ``spec`` onto ``canvas`` (N, S, S, 3) in place."""
    size = canvas.shape[1]
    grid = _pixel_centres(size)
    for shape_id in np.unique(spec.shapes):
        sel = np.flatnonzero(spec.shapes == shape_id)
        sub = spec.take(sel)
        r = sub.radii.astype(np.float32)[:, None, None]
        dx = grid[None, None, :] - sub.centres[:, 0].astype(np.float32)[:, None, None]
        dy = grid[None, :, None] - sub.centres[:, 1].astype(np.float32)[:, None, None]
        dist = _SHAPE_DISTANCE[SHAPES[int(shape_id)].key](dx / r, dy / r) * r
        alpha = np.clip(0.5 - dist, 0, 1)
        dark = np.zeros_like(alpha)
        for pattern_id in np.unique(sub.patterns):
            rows = sub.patterns == pattern_id
            period = sub.pattern_periods[rows].astype(np.float32)[:, None, None]
            px = dx[rows] + sub.pattern_phases[rows, 0].astype(np.float32)[:, None, None]
            py = dy[rows] + sub.pattern_phases[rows, 1].astype(np.float32)[:, None, None]
            dark[rows] = _pattern_field(PATTERNS[int(pattern_id)].key, px, py, period)
        body = sub.colours.astype(np.float32)[:, None, None, :] * (
            1 - (1 - PATTERN_DARKNESS) * dark
        )[..., None]
        a = alpha[..., None]
        canvas[sel] = canvas[sel] * (1 - a) + body * a


# --------------------------------------------------------------------------------------------------
# Camera effects
# --------------------------------------------------------------------------------------------------


def box_blur(images: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur of (N, S, S, C) images with edge padding, via cumulative sums.

    Each output pixel is the mean of the ``(2 * radius + 1)^2`` window around it; ``radius = 0``
    returns the input unchanged. Cost is independent of the radius.
    """
    if radius <= 0:
        return images
    width = 2 * radius + 1
    out = images
    for axis in (1, 2):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius + 1, radius)
        csum = np.cumsum(np.pad(out, pad, mode="edge"), axis=axis, dtype=np.float32)
        n = out.shape[axis]
        hi = np.take(csum, np.arange(width, width + n), axis=axis)
        lo = np.take(csum, np.arange(0, n), axis=axis)
        out = (hi - lo) / width
    return out.astype(np.float32, copy=False)


def apply_camera_effects(images: np.ndarray, spec: RenderSpec, rng: np.random.Generator) -> np.ndarray:
    """Apply brightness, tint, night, blur and sensor noise of ``spec`` to float images in place.

    Args:
        images: float32 (N, S, S, 3) in [0, 1]; modified and returned.
        spec: the per-image camera settings (``brightness``, ``tint``, ``night``, ``blur``,
            ``noise``).
        rng: random generator for the sensor noise.

    Returns:
        The same array, clipped to [0, 1].
    """
    gain = spec.brightness.astype(np.float32)[:, None] * spec.tint.astype(np.float32)
    images *= gain[:, None, None, :]
    night = np.asarray(spec.night, dtype=bool)
    if night.any():
        grey = images[night] @ _LUMA
        images[night] = (grey * 0.6 + 0.05)[..., None]
    blur = np.asarray(spec.blur, dtype=np.int64)
    for radius in np.unique(blur[blur > 0]):
        idx = np.flatnonzero(blur == radius)
        images[idx] = box_blur(images[idx], int(radius))
    sigma = spec.noise.astype(np.float32)[:, None, None, None]
    images += sigma * rng.standard_normal(images.shape, dtype=np.float32)
    return np.clip(images, 0, 1, out=images)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] to uint8 with rounding."""
    return (images * 255 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def render_images(
    spec: RenderSpec,
    rng: np.random.Generator,
    image_size: int,
    backgrounds: np.ndarray | None = None,
    chunk_size: int = 1000,
) -> np.ndarray:
    """Draw the images described by ``spec``.

    Args:
        spec: per-image description of objects, backgrounds and camera settings.
        rng: random generator for fresh backgrounds and sensor noise (consumed).
        image_size: side ``S`` in pixels.
        backgrounds: optional bank (B, S, S, 3) of fixed backgrounds (one per camera);
            ``spec.background_index`` picks a row per image and ``spec.background_gain`` jitters
            its brightness. Without a bank, a fresh background of ``spec.scenes`` is rendered for
            every image.
        chunk_size: images drawn per vectorised pass (bounds memory; ~1000 is fastest).

    Returns:
        uint8 array (N, S, S, 3).
    """
    if backgrounds is not None and spec.background_index is None:
        raise ValueError("a background bank needs spec.background_index")
    out = np.empty((len(spec), image_size, image_size, 3), dtype=np.uint8)
    for start in range(0, len(spec), chunk_size):
        part = spec.take(slice(start, start + chunk_size))
        if backgrounds is None:
            canvas = render_scenes(rng, part.scenes, image_size)
        else:
            canvas = backgrounds[part.background_index].astype(np.float32, copy=True)
        if part.background_gain is not None:
            canvas *= part.background_gain.astype(np.float32)[:, None, None, None]
        _draw_objects(canvas, part)
        out[start : start + len(part)] = to_uint8(apply_camera_effects(canvas, part, rng))
    return out
