"""The synthwild vocabulary: every visual attribute the world can draw, as data.

A species is a combination of *core* attributes (body shape, coat pattern, coat colour, size);
a camera is a *non-core* setting (background scene, lighting, night, blur, noise). This module
only holds the tables: what each attribute is called in captions and concept descriptions, and
the numbers the renderer needs to draw it. Nothing here draws or samples anything.

The words are chosen so that a caption, a zero-shot prompt and a concept description all use the
same small vocabulary; :func:`rftlib.data.synthwild.captions.corpus_words` collects them for a
cut-down BPE tokenizer.

Example:
    >>> from rftlib.data.synthwild.attributes import SHAPES, COLOURS
    >>> SHAPES[0].noun, SHAPES[0].adjective
    ('circle', 'round')
    >>> COLOURS[0].word
    'red'
"""

from __future__ import annotations

from dataclasses import dataclass

# --------------------------------------------------------------------------------------------------
# Body shapes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A body shape.

    Attributes:
        key: stable identifier used by the renderer (``"circle"``, ``"wide_oval"``, ...).
        noun: how captions name an object of this shape (``"a red striped circle"``).
        adjective: how concept descriptions describe the body (``"a round body"``).
    """

    key: str
    noun: str
    adjective: str


SHAPES: tuple[Shape, ...] = (
    Shape("circle", "circle", "round"),
    Shape("square", "square", "square"),
    Shape("triangle", "triangle", "triangular"),
    Shape("diamond", "diamond", "diamond shaped"),
    Shape("cross", "cross", "cross shaped"),
    Shape("ring", "ring", "ring shaped"),
    Shape("wide_oval", "wide oval", "wide oval"),
    Shape("tall_oval", "tall oval", "tall oval"),
)

# --------------------------------------------------------------------------------------------------
# Coat patterns (drawn as a darkening of the body colour, so they survive night greyscale)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    """A coat pattern.

    Attributes:
        key: stable identifier used by the renderer.
        adjective: caption form placed before the shape noun (``"a spotted circle"``).
        phrase: the pattern as a noun phrase, used after "with" in captions and in concept
            descriptions (``"a circle with dark spots"``).
    """

    key: str
    adjective: str
    phrase: str


PATTERNS: tuple[Pattern, ...] = (
    Pattern("plain", "plain", "no markings"),
    Pattern("hstripes", "horizontally striped", "dark horizontal stripes"),
    Pattern("vstripes", "vertically striped", "dark vertical stripes"),
    Pattern("spots", "spotted", "dark spots"),
    Pattern("checker", "checkered", "a dark checkered pattern"),
)

#: Pattern pixels are the body colour times this factor (a 60 % darkening).
PATTERN_DARKNESS = 0.4

# --------------------------------------------------------------------------------------------------
# Coat colours
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Colour:
    """A named coat colour.

    Attributes:
        word: the colour word used in captions and descriptions.
        rgb: linear RGB in [0, 1] before per-image jitter.
    """

    word: str
    rgb: tuple[float, float, float]


COLOURS: tuple[Colour, ...] = (
    Colour("red", (0.86, 0.12, 0.12)),
    Colour("orange", (0.98, 0.52, 0.08)),
    Colour("yellow", (0.96, 0.88, 0.16)),
    Colour("green", (0.20, 0.80, 0.20)),
    Colour("cyan", (0.15, 0.85, 0.90)),
    Colour("blue", (0.15, 0.30, 0.95)),
    Colour("purple", (0.58, 0.20, 0.82)),
    Colour("pink", (0.98, 0.50, 0.78)),
    Colour("white", (0.97, 0.97, 0.97)),
    Colour("brown", (0.50, 0.28, 0.10)),
)

# --------------------------------------------------------------------------------------------------
# Background scenes
# --------------------------------------------------------------------------------------------------

#: Texture kinds understood by the renderer.
TEXTURES = ("blades", "trunks", "blotches", "waves")


@dataclass(frozen=True)
class Scene:
    """A background scene type.

    A scene is a base colour with low-frequency variation, per-pixel grain and one texture that
    is blended towards ``texture_rgb``.

    Attributes:
        key: the scene's name (also its metadata value).
        base_rgb: average colour of the ground.
        texture: one of :data:`TEXTURES` (vertical grass blades, tree trunks, blotches, waves).
        texture_rgb: colour the texture blends towards.
        texture_strength: maximum blend weight of the texture (0..1).
        variation: amplitude of the smooth low-frequency brightness variation.
        grain: standard deviation of the per-pixel noise baked into the scene.
        phrases: ways a caption can place an object in this scene (``"on grass"``).
        ood_only: True for scenes that only out-of-distribution cameras use.
    """

    key: str
    base_rgb: tuple[float, float, float]
    texture: str
    texture_rgb: tuple[float, float, float]
    texture_strength: float
    variation: float
    grain: float
    phrases: tuple[str, ...]
    ood_only: bool = False


SCENES: tuple[Scene, ...] = (
    Scene("grass", (0.33, 0.52, 0.22), "blades", (0.55, 0.75, 0.30), 0.55, 0.10, 0.03,
          ("on grass", "in the grass")),
    Scene("forest", (0.16, 0.28, 0.13), "trunks", (0.30, 0.20, 0.12), 0.85, 0.08, 0.03,
          ("in a forest", "in the forest")),
    Scene("sand", (0.80, 0.72, 0.52), "waves", (0.66, 0.57, 0.40), 0.45, 0.06, 0.03,
          ("on sand", "on the sand")),
    Scene("rock", (0.50, 0.49, 0.47), "blotches", (0.30, 0.30, 0.30), 0.60, 0.10, 0.04,
          ("on rocks", "near rocks")),
    Scene("mud", (0.38, 0.28, 0.18), "blotches", (0.22, 0.15, 0.09), 0.60, 0.08, 0.03,
          ("in mud", "on mud")),
    Scene("savanna", (0.72, 0.62, 0.36), "blades", (0.52, 0.42, 0.20), 0.50, 0.08, 0.03,
          ("in the savanna", "on the savanna")),
    Scene("snow", (0.90, 0.92, 0.96), "waves", (0.76, 0.80, 0.88), 0.40, 0.05, 0.02,
          ("on snow", "in the snow"), ood_only=True),
    Scene("water", (0.18, 0.36, 0.55), "waves", (0.45, 0.62, 0.78), 0.55, 0.08, 0.03,
          ("near water", "by the water"), ood_only=True),
    Scene("swamp", (0.26, 0.30, 0.18), "trunks", (0.14, 0.16, 0.10), 0.60, 0.10, 0.03,
          ("in a swamp", "in the swamp"), ood_only=True),
    Scene("desert", (0.84, 0.60, 0.42), "waves", (0.72, 0.48, 0.34), 0.50, 0.06, 0.03,
          ("in the desert", "on desert sand"), ood_only=True),
)

#: Indices into :data:`SCENES` of the scenes used by in-distribution cameras.
ID_SCENES: tuple[int, ...] = tuple(i for i, s in enumerate(SCENES) if not s.ood_only)
#: Indices into :data:`SCENES` of the scenes seen only at out-of-distribution cameras.
OOD_SCENES: tuple[int, ...] = tuple(i for i, s in enumerate(SCENES) if s.ood_only)

# --------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------

#: Size words, smallest first; a species' size picks a sub-range of the object radius range.
SIZE_WORDS: tuple[str, ...] = ("small", "large")

#: Each size covers this fraction of the radius range (small: the bottom, large: the top), so the
#: two sub-ranges overlap in the middle and size alone is a soft cue.
SIZE_RANGE_FRACTION = 0.6


def size_radius_range(size: int, radius: tuple[float, float]) -> tuple[float, float]:
    """The radius sub-range of a size class.

    Args:
        size: index into :data:`SIZE_WORDS` (0 = small, 1 = large).
        radius: the full ``(low, high)`` radius range in pixels.

    Returns:
        ``(low, high)`` for that size; small takes the bottom :data:`SIZE_RANGE_FRACTION` of the
        range and large the top, so they overlap around the middle.

    Example:
        >>> size_radius_range(0, (4.0, 10.0))
        (4.0, 7.6)
    """
    lo, hi = radius
    span = (hi - lo) * SIZE_RANGE_FRACTION
    return (lo, round(lo + span, 6)) if size == 0 else (round(hi - span, 6), hi)


def scene_index(key: str) -> int:
    """Index of the scene called ``key`` in :data:`SCENES` (``ValueError`` lists valid keys)."""
    for i, scene in enumerate(SCENES):
        if scene.key == key:
            return i
    raise ValueError(f"unknown scene {key!r}; valid scenes: {', '.join(s.key for s in SCENES)}")
