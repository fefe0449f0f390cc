"""synthwild: a procedurally generated camera-trap world with iWildCam's structure.

Species (classes) differ in core features (shape, pattern, colour, size); cameras (domains)
differ in non-core features (fixed background scene, lighting, night, blur, noise). In-
distribution cameras carry a background shortcut, held-out cameras test robustness and held-out
species test open-set detection. The same generator also feeds a broad caption corpus for
pretraining the tiny zero-shot model synthclip.

Modules:
    * :mod:`.attributes`: the vocabulary tables (shapes, patterns, colours, scenes, sizes).
    * :mod:`.render`: the vectorised numpy renderer.
    * :mod:`.world`: :class:`WorldConfig`, :func:`build_world`, :func:`generate_synthwild`.
    * :mod:`.captions`: :func:`sample_pretraining_batch`, :func:`corpus_words`,
      :func:`default_templates`.

Example:
    >>> from rftlib.data.synthwild import WorldConfig, build_world, generate_synthwild
    >>> splits = generate_synthwild(WorldConfig(size="tiny"))
    >>> sorted(splits)
    ['id_test', 'id_val', 'openset', 'test', 'train', 'val']
"""

from .attributes import COLOURS, PATTERNS, SCENES, SHAPES, SIZE_WORDS, Colour, Pattern, Scene, Shape
from .captions import PretrainingConfig, corpus_words, default_templates, sample_pretraining_batch, words_of
from .render import RenderSpec, apply_camera_effects, box_blur, render_images, render_scene, render_scenes
from .world import (
    DEFAULT_SPLIT_SIZES,
    SPLIT_ROLES,
    Camera,
    Species,
    World,
    WorldConfig,
    build_world,
    generate_split,
    generate_synthwild,
    invent_names,
    split_rng,
    stream,
)

__all__ = [
    "COLOURS",
    "DEFAULT_SPLIT_SIZES",
    "PATTERNS",
    "SCENES",
    "SHAPES",
    "SIZE_WORDS",
    "SPLIT_ROLES",
    "Camera",
    "Colour",
    "Pattern",
    "PretrainingConfig",
    "RenderSpec",
    "Scene",
    "Shape",
    "Species",
    "World",
    "WorldConfig",
    "apply_camera_effects",
    "box_blur",
    "build_world",
    "corpus_words",
    "default_templates",
    "generate_split",
    "generate_synthwild",
    "invent_names",
    "render_images",
    "render_scene",
    "render_scenes",
    "sample_pretraining_batch",
    "split_rng",
    "stream",
    "words_of",
]
