"""The synthwild world: species, cameras and the WILDS-style splits drawn from them.

synthwild mimics the structure of iWildCam with procedurally drawn images:

* **Species** (classes) are defined by *core* features: body shape, coat pattern, coat colour and
  size. Any two species differ in at least ``min_attribute_diff`` of shape/pattern/colour. Each has
  an invented pronounceable name (``"zarvok"``) and a concept description of its core features
  only (used by DRM).
* **Cameras** (domains, ``location`` in the metadata) differ in *non-core* features: a fixed
  background scene rendered once per camera, brightness, tint, sensor noise, blur and the share
  of night (infrared, greyscale) shots.
* **The shortcut.** Every species lives near ``n_home`` home cameras; an in-distribution photo is
  taken at one of them with probability ``rho``. A model can therefore score well in ID by
  recognising the background, which fails at the held-out **OOD cameras** (novel scenes: snow,
  water, swamp, desert, plus extra night/blur/tint that grows with ``ood_severity``).
* **Long tail.** Species frequencies follow ``1 / (rank + 2) ** 0.8`` with a seeded rank order.
* **Open set.** Extra held-out species, never used for training and never named in pretraining
  captions, are photographed at ID and OOD cameras (``openset`` split, labels ``-1``).

Splits follow WILDS: ``train``, ``id_val``, ``id_test`` (ID cameras), ``val``, ``test`` (OOD
cameras) and ``openset``. Every piece of randomness comes from a stream keyed by
``(seed, purpose)``, so results are reproducible and changing one split's size leaves the others
untouched.

Example:
    >>> cfg = WorldConfig(size="tiny")
    >>> splits = generate_synthwild(cfg)
    >>> images, labels, meta = splits["train"]
    >>> images.shape[1:], images.dtype, labels.dtype
    ((32, 32, 3), dtype('uint8'), dtype('int64'))
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Union

import numpy as np
import pandas as pd

from .attributes import (
    COLOURS,
    ID_SCENES,
    OOD_SCENES,
    PATTERNS,
    SCENES,
    SHAPES,
    SIZE_WORDS,
    Colour,
    Pattern,
    Shape,
    size_radius_range,
)
from .render import RenderSpec, colour_table, render_images, render_scene

#: Role of each split, as in :class:`rftlib.data.base.Split`.
SPLIT_ROLES: dict[str, str] = {
    "train": "train",
    "id_val": "id",
    "id_test": "id",
    "val": "ood",
    "test": "ood",
    "openset": "openset",
}

#: Split sizes at ``size="default"``.
DEFAULT_SPLIT_SIZES: dict[str, int] = {
    "train": 10_000,
    "id_val": 1_000,
    "id_test": 2_000,
    "val": 1_000,
    "test": 2_000,
    "openset": 1_000,
}

#: Named size presets: a factor applied to :data:`DEFAULT_SPLIT_SIZES`.
SIZE_PRESETS: dict[str, float] = {"tiny": 0.02, "small": 0.25, "default": 1.0, "large": 4.0}

#: Smallest size of any split when sizes are scaled down.
MIN_SPLIT_SIZE = 10

#: The resolution the pixel-valued knobs (radius, blur, pattern period) are expressed at.
REFERENCE_SIZE = 32

# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldConfig:
    """Every knob of a synthwild world (pixel values are at 32 px and scale with ``image_size``).

    The defaults are the configuration that, in the prototype, gave a zero-shot model with similar
    ID and OOD scores, a fine-tuning gain in ID and a WiSE-FT gain in OOD: large objects, a strong
    background shortcut and mildly shifted OOD cameras.
    """

    seed: int = 0  # master seed; every random stream is derived from it and a purpose key
    image_size: int = 32  # side of the square images in pixels
    n_species: int = 20  # number of classes (training species)
    n_heldout_species: int = 5  # extra species only in the open-set split
    n_id_cameras: int = 8  # in-distribution cameras (train, id_val, id_test)
    n_ood_cameras: int = 4  # held-out cameras with novel scenes (val, test)
    n_home: int = 2  # home cameras per species
    rho: float = 0.95  # prob. an ID photo is taken at one of the species' home cameras
    ood_severity: float = 0.2  # 0..1: extra night, blur, darkness and tint at OOD cameras
    radius: tuple[float, float] = (6.5, 9.5)  # object radius range in pixels
    pattern_period: tuple[float, float] = (3.0, 6.0)  # coat pattern period range in pixels
    min_attribute_diff: int = 1  # any two species differ in >= this many of shape/pattern/colour
    size: Union[str, int] = "default"  # 'tiny' | 'small' | 'default' | 'large', or train size
    long_tail: bool = True  # Zipf-like species frequencies (else uniform)
    zipf_exponent: float = 0.8  # species weight is 1 / (rank + zipf_offset) ** zipf_exponent
    zipf_offset: float = 2.0  # flattens the head of the long tail
    id_night_cameras: int = 2  # ID cameras that sometimes shoot at night
    id_night_prob: float = 0.1  # share of night shots at those cameras
    id_blur_cameras: int = 2  # ID cameras with a slightly blurry lens (box blur radius 1)
    colour_jitter: float = 0.1  # +- relative jitter of the body colour per photo
    background_jitter: float = 0.1  # +- relative brightness jitter of a camera's scene per photo

    def __post_init__(self) -> None:
        lo, hi = self.radius
        if not 0 < lo <= hi:
            raise ValueError(f"radius must be 0 < low <= high, got {self.radius}")
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"rho must be in [0, 1], got {self.rho}")
        if not 1 <= self.n_home <= self.n_id_cameras:
            raise ValueError(f"n_home must be in [1, n_id_cameras={self.n_id_cameras}], got {self.n_home}")
        if self.n_species < 1 or self.n_id_cameras < 1 or self.n_ood_cameras < 1:
            raise ValueError("a world needs at least one species, one ID camera and one OOD camera")
        if self.ood_severity < 0:
            raise ValueError(f"ood_severity must be >= 0, got {self.ood_severity}")
        self.split_sizes()  # validates ``size``

    @property
    def scale(self) -> float:
        """Pixel scale relative to the 32 px reference."""
        return self.image_size / REFERENCE_SIZE

    def split_sizes(self) -> dict[str, int]:
        """Number of images per split.

        A named preset scales :data:`DEFAULT_SPLIT_SIZES` (``"small"`` is a quarter); an integer
        sets the train size and scales the other splits in proportion. No split gets fewer than
        :data:`MIN_SPLIT_SIZE` images.
        """
        if isinstance(self.size, str):
            if self.size not in SIZE_PRESETS:
                raise ValueError(f"unknown size {self.size!r}; valid: {', '.join(SIZE_PRESETS)} or an int")
            factor = SIZE_PRESETS[self.size]
        elif isinstance(self.size, (int, np.integer)) and self.size > 0:
            factor = self.size / DEFAULT_SPLIT_SIZES["train"]
        else:
            raise ValueError(f"size must be a preset name or a positive int, got {self.size!r}")
        return {k: max(MIN_SPLIT_SIZE, int(round(v * factor))) for k, v in DEFAULT_SPLIT_SIZES.items()}


def stream(seed: int, *keys: object) -> np.random.Generator:
    """An independent random generator for ``(seed, *keys)``.

    Keys are hashed with CRC32 (stable across Python runs, unlike ``hash``), so e.g.
    ``stream(0, "split", "test")`` always yields the same numbers and never the same as
    ``stream(0, "split", "train")``.
    """
    entropy = [int(seed)] + [zlib.crc32(str(k).encode()) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def split_rng(seed: int, name: str) -> np.random.Generator:
    """The random stream of the split called ``name`` in the world with master ``seed``."""
    return stream(seed, "split", name)


# --------------------------------------------------------------------------------------------------
# Species
# --------------------------------------------------------------------------------------------------


def _with_article(phrase: str) -> str:
    """``"an orange ..."`` or ``"a small ..."`` depending on the first letter."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


@dataclass(frozen=True)
class Species:
    """A species (class) of the world, defined by its core attributes.

    Attributes:
        index: label of the species (position in ``World.species``, or in
            ``World.heldout_species`` for held-out ones).
        name: invented lowercase name, e.g. ``"zarvok"``.
        shape: index into :data:`~.attributes.SHAPES`.
        pattern: index into :data:`~.attributes.PATTERNS`.
        colour: index into :data:`~.attributes.COLOURS`.
        size: index into :data:`~.attributes.SIZE_WORDS` (0 small, 1 large).
        heldout: True for open-set species (never in train, never named in captions).
    """

    index: int
    name: str
    shape: int
    pattern: int
    colour: int
    size: int
    heldout: bool = False

    @property
    def shape_info(self) -> Shape:
        return SHAPES[self.shape]

    @property
    def pattern_info(self) -> Pattern:
        return PATTERNS[self.pattern]

    @property
    def colour_info(self) -> Colour:
        return COLOURS[self.colour]

    @property
    def size_word(self) -> str:
        return SIZE_WORDS[self.size]

    @property
    def attributes(self) -> tuple[int, int, int]:
        """The core attribute code ``(shape, pattern, colour)``."""
        return (self.shape, self.pattern, self.colour)

    @property
    def description(self) -> str:
        """Concept description of the core features only (no name, no background).

        Example: ``"a small animal with a round body, orange fur and dark horizontal stripes"``.
        """
        return (
            f"a {self.size_word} animal with a {self.shape_info.adjective} body, "
            f"{self.colour_info.word} fur and {self.pattern_info.phrase}"
        )

    @property
    def description_variants(self) -> tuple[str, ...]:
        """The description plus two paraphrases (same facts, different wording)."""
        size, colour = self.size_word, self.colour_info.word
        shape, pattern = self.shape_info, self.pattern_info
        return (
            self.description,
            _with_article(f"{size} {colour} {pattern.adjective} {shape.noun}"),
            _with_article(f"{shape.adjective} {colour} animal of {size} size with {pattern.phrase}"),
        )


def _attribute_codes(rng: np.random.Generator, n: int, min_diff: int, tries: int = 200) -> np.ndarray:
    """``n`` distinct (shape, pattern, colour) codes, pairwise differing in >= ``min_diff`` places.

    Randomised greedy packing: walk the codes in random order and keep each one that is far enough
    from all kept so far; restart with a new order if it runs out of codes before ``n``.

    Returns:
        int array (n, 3), in the order they were picked.
    """
    grids = np.meshgrid(np.arange(len(SHAPES)), np.arange(len(PATTERNS)), np.arange(len(COLOURS)))
    codes = np.stack([g.ravel() for g in grids], axis=1)
    for _ in range(tries):
        free = np.ones(len(codes), dtype=bool)
        picked: list[int] = []
        for i in rng.permutation(len(codes)):
            if free[i]:
                picked.append(int(i))
                free &= (codes != codes[i]).sum(axis=1) >= min_diff
                if len(picked) == n:
                    return codes[picked]
    raise ValueError(
        f"could not find {n} species that pairwise differ in {min_diff} of shape/pattern/colour; "
        "lower min_attribute_diff or the number of species"
    )


_ONSETS = "bdfgklmnprtvz"
_VOWELS = "aeiou"
_MIDDLE_CODAS = ("", "", "n", "r", "l")
_FINAL_CODAS = ("k", "b", "z")
# Words of the name grammar that exist in a general English/names vocabulary (the CLIP BPE
# vocabulary's whole words); the grammar (codas k/b/z at the end) keeps this list short.
_KNOWN_WORDS = frozenset(
    "barak benitez dataviz derek feliz fernandez gomez gonzalez govuk kebab kodak lopez malik "
    "martinez mendez mubarak nandez novak perez ramirez tarak topaz valdez vivek".split()
)
# Letter sequences that read as rude or loaded words; names containing them are skipped.
_AWKWARD = (
    "fuk", "fak", "fag", "nig", "neg", "dik", "kok", "tit", "kak", "pup", "poo", "porn", "nazi", "anal",
    "rape", "vulv", "dildo",
)


def _syllable(rng: np.random.Generator, codas: tuple[str, ...]) -> str:
    return str(rng.choice(list(_ONSETS)) + rng.choice(list(_VOWELS)) + rng.choice(codas))


def invent_names(rng: np.random.Generator, n: int, forbidden: frozenset[str] = frozenset()) -> list[str]:
    """``n`` unique pronounceable pseudo-words of 5-9 lowercase letters, e.g. ``"zarvok"``.

    A name is 2-3 simple syllables (consonant + vowel, optional n/r/l) ending in k, b or z, which
    keeps names out of the English dictionary and splits them into 2-3 BPE tokens. Names also
    start with distinct syllables, so no two species share a first token.

    Args:
        rng: random generator (consumed).
        n: how many names.
        forbidden: words that must not be used (e.g. attribute words of the captions).
    """
    names: list[str] = []
    starts: set[str] = set()
    while len(names) < n:
        k = int(rng.integers(1, 3))
        first = _syllable(rng, _MIDDLE_CODAS)
        name = first + "".join(_syllable(rng, _MIDDLE_CODAS) for _ in range(k - 1))
        name += _syllable(rng, _FINAL_CODAS)
        if not 5 <= len(name) <= 9 or first in starts:
            continue
        if name in _KNOWN_WORDS or name in forbidden or any(a in name for a in _AWKWARD):
            continue
        names.append(name)
        starts.add(first)
    return names


def _species_weights(rng: np.random.Generator, n: int, cfg: WorldConfig) -> np.ndarray:
    """Class frequencies: a Zipf-like long tail over a random rank order (or uniform)."""
    if not cfg.long_tail:
        return np.full(n, 1.0 / n)
    ranks = rng.permutation(n)
    w = 1.0 / (ranks + cfg.zipf_offset) ** cfg.zipf_exponent
    return w / w.sum()


def _home_cameras(rng: np.random.Generator, n_species: int, cfg: WorldConfig) -> np.ndarray:
    """(n_species, n_home) ID camera indices; each camera is home to about as many species."""
    load = np.zeros(cfg.n_id_cameras)
    homes = np.empty((n_species, cfg.n_home), dtype=np.int64)
    for s in range(n_species):
        homes[s] = np.argsort(load + rng.uniform(0, 0.5, cfg.n_id_cameras), kind="stable")[: cfg.n_home]
        load[homes[s]] += 1
    return homes


# --------------------------------------------------------------------------------------------------
# Cameras
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Camera:
    """A camera trap: one fixed scene plus its photographic settings.

    Attributes:
        index: position in ``World.cameras``; also the ``location`` in the metadata, globally
            unique across ID and OOD cameras.
        scene: index into :data:`~.attributes.SCENES`.
        brightness: global gain of every shot.
        tint: per-channel RGB gain.
        noise: standard deviation of Gaussian sensor noise.
        blur: box-blur radius in pixels (0 = sharp).
        night_prob: share of shots taken at night (infrared greyscale).
        role: ``"id"`` or ``"ood"``.
    """

    index: int
    scene: int
    brightness: float
    tint: tuple[float, float, float]
    noise: float
    blur: int
    night_prob: float
    role: str

    @property
    def location(self) -> int:
        return self.index

    @property
    def scene_name(self) -> str:
        return SCENES[self.scene].key


def _mild_settings(rng: np.random.Generator) -> tuple[float, np.ndarray, float]:
    """Brightness, tint and noise of an ordinary camera."""
    brightness = float(rng.uniform(0.85, 1.15))
    tint = 1 + rng.uniform(-0.06, 0.06, 3)
    noise = float(rng.uniform(0.02, 0.04))
    return brightness, tint, noise


def _id_cameras(cfg: WorldConfig) -> list[Camera]:
    """ID cameras cycle through the six ID scenes; a few get night shots or a blurry lens."""
    picks = stream(cfg.seed, "camera", "id", "effects")
    night = set(picks.permutation(cfg.n_id_cameras)[: cfg.id_night_cameras].tolist())
    blurry = set(picks.permutation(cfg.n_id_cameras)[: cfg.id_blur_cameras].tolist())
    cams = []
    for j in range(cfg.n_id_cameras):
        brightness, tint, noise = _mild_settings(stream(cfg.seed, "camera", "id", j))
        cams.append(Camera(
            index=j,
            scene=ID_SCENES[j % len(ID_SCENES)],
            brightness=brightness,
            tint=tuple(float(t) for t in tint),
            noise=noise,
            blur=int(round(cfg.scale)) if j in blurry else 0,
            night_prob=cfg.id_night_prob if j in night else 0.0,
            role="id",
        ))
    return cams


def _ood_camera(cfg: WorldConfig, j: int) -> Camera:
    """The ``j``-th OOD camera: a novel scene plus shifts that grow with ``ood_severity``.

    At severity 0.5: the snow camera is bright and noisy, the water camera has 25 % night shots
    and blur 1, the swamp camera is dark with 55 % night shots, the desert camera is blurry and
    warm. At 0.2 only mild versions remain (no blur, 10 % / 28 % night).
    """
    sev = cfg.ood_severity
    scene = OOD_SCENES[j % len(OOD_SCENES)]
    brightness, tint, noise = _mild_settings(stream(cfg.seed, "camera", "ood", j))
    blur_steps, night = 0, 0.0
    key = SCENES[scene].key
    if key == "snow":
        brightness *= 1 + 0.3 * sev
        noise += 0.08 * sev
    elif key == "water":
        night, blur_steps = 0.5 * sev, int(round(2 * sev))
        tint = tint * np.array([1 - 0.2 * sev, 1.0, 1 + 0.2 * sev])
    elif key == "swamp":
        night, brightness = 0.1 + 0.9 * sev, brightness * max(0.2, 1 - 0.6 * sev)
    elif key == "desert":
        blur_steps = int(round(2 * sev))
        tint = tint * np.array([1 + 0.3 * sev, 1.0, 1 - 0.3 * sev])
    return Camera(
        index=cfg.n_id_cameras + j,
        scene=scene,
        brightness=float(brightness),
        tint=tuple(float(t) for t in tint),
        noise=float(noise),
        blur=int(round(min(blur_steps, 2) * cfg.scale)),
        night_prob=float(min(night, 0.9)),
        role="ood",
    )


# --------------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class World:
    """A built world: its species, cameras, fixed camera backgrounds and sampling weights.

    Attributes:
        config: the configuration it was built from.
        species: training species; ``species[i]`` is class ``i``.
        heldout_species: open-set species (never trained on, never named in captions).
        cameras: ID cameras first, then OOD cameras; ``cameras[i].index == i``.
        backgrounds: float32 (n_cameras, S, S, 3), each camera's fixed scene.
        species_weights: class frequencies of the training species (sum to 1).
        heldout_weights: frequencies of the held-out species in the open-set split.
        home_cameras: int (n_species, n_home), the home cameras of each species.
    """

    config: WorldConfig
    species: tuple[Species, ...]
    heldout_species: tuple[Species, ...]
    cameras: tuple[Camera, ...]
    backgrounds: np.ndarray
    species_weights: np.ndarray
    heldout_weights: np.ndarray
    home_cameras: np.ndarray

    @property
    def classnames(self) -> list[str]:
        """Species names in label order."""
        return [s.name for s in self.species]

    @property
    def descriptions(self) -> list[str]:
        """One concept description per class, in label order."""
        return [s.description for s in self.species]

    @property
    def description_variants(self) -> list[list[str]]:
        """Several concept descriptions per class, in label order."""
        return [list(s.description_variants) for s in self.species]

    @property
    def id_cameras(self) -> np.ndarray:
        """Indices of the ID cameras."""
        return np.array([c.index for c in self.cameras if c.role == "id"], dtype=np.int64)

    @property
    def ood_cameras(self) -> np.ndarray:
        """Indices of the OOD cameras."""
        return np.array([c.index for c in self.cameras if c.role == "ood"], dtype=np.int64)


def build_world(cfg: WorldConfig | None = None) -> World:
    """Build the species, cameras and camera backgrounds of a world (deterministic in ``cfg``).

    Each ingredient has its own random stream, so e.g. adding OOD cameras does not change the
    species or the ID cameras.
    """
    cfg = cfg or WorldConfig()
    n_total = cfg.n_species + cfg.n_heldout_species
    codes = _attribute_codes(stream(cfg.seed, "species"), n_total, cfg.min_attribute_diff)
    sizes = stream(cfg.seed, "sizes").integers(0, len(SIZE_WORDS), n_total)
    names = invent_names(stream(cfg.seed, "names"), n_total, forbidden=_caption_vocabulary())
    all_species = [
        Species(i if i < cfg.n_species else i - cfg.n_species, names[i], int(codes[i, 0]),
                int(codes[i, 1]), int(codes[i, 2]), int(sizes[i]), heldout=i >= cfg.n_species)
        for i in range(n_total)
    ]
    cameras = _id_cameras(cfg) + [_ood_camera(cfg, j) for j in range(cfg.n_ood_cameras)]
    backgrounds = np.stack([
        render_scene(stream(cfg.seed, "background", c.role, c.index), c.scene, cfg.image_size)
        for c in cameras
    ])
    weights = stream(cfg.seed, "frequencies")
    return World(
        config=cfg,
        species=tuple(all_species[: cfg.n_species]),
        heldout_species=tuple(all_species[cfg.n_species:]),
        cameras=tuple(cameras),
        backgrounds=backgrounds,
        species_weights=_species_weights(weights, cfg.n_species, cfg),
        heldout_weights=_species_weights(weights, cfg.n_heldout_species, cfg),
        home_cameras=_home_cameras(stream(cfg.seed, "homes"), cfg.n_species, cfg),
    )


def _caption_vocabulary() -> frozenset[str]:
    """Attribute words that a species name must not collide with."""
    words = [s.noun for s in SHAPES] + [p.adjective for p in PATTERNS] + [c.word for c in COLOURS]
    words += [s.key for s in SCENES] + list(SIZE_WORDS)
    return frozenset(w for phrase in words for w in phrase.split())


# --------------------------------------------------------------------------------------------------
# Drawing photos
# --------------------------------------------------------------------------------------------------


def species_arrays(species: tuple[Species, ...] | list[Species]) -> dict[str, np.ndarray]:
    """Per-species attribute arrays (``shape``, ``pattern``, ``colour``, ``size``) for indexing."""
    return {
        key: np.array([getattr(s, key) for s in species], dtype=np.int64)
        for key in ("shape", "pattern", "colour", "size")
    }


def sample_radii(rng: np.random.Generator, sizes: np.ndarray, radius: tuple[float, float]) -> np.ndarray:
    """Object radii: each size class draws uniformly from its sub-range of ``radius``."""
    bounds = np.array([size_radius_range(s, radius) for s in range(len(SIZE_WORDS))])
    lo, hi = bounds[sizes, 0], bounds[sizes, 1]
    return lo + (hi - lo) * rng.random(len(sizes))


def sample_centres(rng: np.random.Generator, radii: np.ndarray, image_size: int) -> np.ndarray:
    """Object centres ``(x, y)`` that keep the whole object inside the frame."""
    margin = np.minimum(1.15 * radii + 0.5, image_size / 2)
    span = image_size - 2 * margin
    return margin[:, None] + span[:, None] * rng.random((len(radii), 2))


def jitter_colours(rng: np.random.Generator, colours: np.ndarray, amount: float) -> np.ndarray:
    """Body colours (N, 3) from colour indices: +-``amount`` brightness and half that per channel."""
    base = colour_table()[colours]
    gain = 1 + amount * rng.uniform(-1, 1, (len(colours), 1))
    hue = 1 + 0.5 * amount * rng.uniform(-1, 1, (len(colours), 3))
    return np.clip(base * gain * hue, 0, 1).astype(np.float32)


def sample_patterns(
    rng: np.random.Generator, n: int, period: tuple[float, float], scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pattern periods (n,) and phases (n, 2), in pixels."""
    periods = rng.uniform(period[0], period[1], n) * scale
    return periods, rng.random((n, 2)) * periods[:, None]


def _camera_spec(
    world: World, attrs: dict[str, np.ndarray], cams: np.ndarray, rng: np.random.Generator
) -> RenderSpec:
    """The render spec of photos of species ``attrs`` (per photo) taken at cameras ``cams``."""
    cfg = world.config
    n = len(cams)
    cam_list = world.cameras
    radii = sample_radii(rng, attrs["size"], tuple(r * cfg.scale for r in cfg.radius))
    periods, phases = sample_patterns(rng, n, cfg.pattern_period, cfg.scale)
    return RenderSpec(
        shapes=attrs["shape"],
        patterns=attrs["pattern"],
        colours=jitter_colours(rng, attrs["colour"], cfg.colour_jitter),
        radii=radii,
        centres=sample_centres(rng, radii, cfg.image_size),
        pattern_periods=periods,
        pattern_phases=phases,
        scenes=np.array([cam_list[c].scene for c in cams], dtype=np.int64),
        brightness=np.array([cam_list[c].brightness for c in cams]),
        tint=np.array([cam_list[c].tint for c in cams]).reshape(n, 3),
        night=rng.random(n) < np.array([cam_list[c].night_prob for c in cams]),
        blur=np.array([cam_list[c].blur for c in cams], dtype=np.int64),
        noise=np.array([cam_list[c].noise for c in cams]),
        background_index=cams,
        background_gain=1 + cfg.background_jitter * rng.uniform(-1, 1, n),
    )


_NIGHT_HOURS = np.array([20, 21, 22, 23, 0, 1, 2, 3, 4])
_DAY_HOURS = np.arange(6, 19)


def sample_times(rng: np.random.Generator, night: np.ndarray) -> pd.DatetimeIndex:
    """Capture times over two years; night shots fall between 20:00 and 04:59."""
    n = len(night)
    days = rng.integers(0, 730, n)
    hours = np.where(night, rng.choice(_NIGHT_HOURS, n), rng.choice(_DAY_HOURS, n))
    minutes = rng.integers(0, 60, n)
    offsets = days * 1440 + hours * 60 + minutes
    return pd.Timestamp("2020-01-01") + pd.to_timedelta(offsets, unit="m")


def _draw_labels_and_cameras(
    world: World, role: str, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Species indices and camera indices of ``n`` photos of a split with ``role``.

    ID splits: a species' home camera with probability ``rho``, else a uniform ID camera.
    OOD splits: a uniform OOD camera. Open set: held-out species at a uniform camera of any role.
    """
    cfg = world.config
    if role == "openset":
        species = rng.choice(len(world.heldout_species), n, p=world.heldout_weights)
        return species, rng.integers(0, len(world.cameras), n)
    species = rng.choice(len(world.species), n, p=world.species_weights)
    if role == "ood":
        return species, world.ood_cameras[rng.integers(0, len(world.ood_cameras), n)]
    home = world.home_cameras[species, rng.integers(0, cfg.n_home, n)]
    anywhere = world.id_cameras[rng.integers(0, len(world.id_cameras), n)]
    return species, np.where(rng.random(n) < cfg.rho, home, anywhere)


def generate_split(
    world: World, name: str, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Draw ``n`` photos of the split called ``name``.

    Args:
        world: the world to photograph.
        name: one of :data:`SPLIT_ROLES` (its role decides species and cameras).
        n: number of images.
        rng: the split's random stream (see :func:`split_rng`).

    Returns:
        ``(images, labels, metadata)``: uint8 (n, S, S, 3); int64 labels (``-1`` for the open
        set); a DataFrame with ``location``, ``camera_role``, ``scene``, ``night``, ``time``,
        ``hour`` and ``species_name``.
    """
    if name not in SPLIT_ROLES:
        raise ValueError(f"unknown synthwild split {name!r}; valid splits: {', '.join(SPLIT_ROLES)}")
    role = SPLIT_ROLES[name]
    species_idx, cams = _draw_labels_and_cameras(world, role, n, rng)
    pool = world.heldout_species if role == "openset" else world.species
    attrs = {k: v[species_idx] for k, v in species_arrays(pool).items()}
    spec = _camera_spec(world, attrs, cams, rng)
    images = render_images(spec, rng, world.config.image_size, backgrounds=world.backgrounds)
    labels = np.full(n, -1, dtype=np.int64) if role == "openset" else species_idx.astype(np.int64)
    times = sample_times(rng, spec.night)
    metadata = pd.DataFrame({
        "location": cams.astype(np.int64),
        "camera_role": np.array([world.cameras[c].role for c in cams], dtype=object),
        "scene": np.array([SCENES[s].key for s in spec.scenes], dtype=object),
        "night": spec.night.astype(bool),
        "time": times,
        "hour": times.hour.to_numpy().astype(np.int64),
        "species_name": np.array([pool[s].name for s in species_idx], dtype=object),
    })
    return images, labels, metadata


def generate_synthwild(
    cfg: WorldConfig | None = None, world: World | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray, pd.DataFrame]]:
    """Generate every split of a world: ``{name: (images, labels, metadata)}``.

    Args:
        cfg: the world's configuration (default :class:`WorldConfig`).
        world: an already built world for ``cfg`` (saves rebuilding it).
    """
    cfg = cfg or (world.config if world is not None else WorldConfig())
    world = world or build_world(cfg)
    return {
        name: generate_split(world, name, n, split_rng(cfg.seed, name))
        for name, n in cfg.split_sizes().items()
    }
