"""Image-caption pairs for pretraining synthclip, a tiny CLIP for the synthwild world.

The corpus is deliberately *broad*, so that the pretrained model is a fair zero-shot baseline
whose accuracy is similar in and out of distribution (as CLIP on iWildCam):

* 40 % of images show one of the world's training species, 60 % a uniformly random
  shape/pattern/colour combination (held-out species' combinations may appear, unnamed);
* backgrounds are drawn fresh from **all** scene types, including those only OOD cameras use;
* camera effects are broader than any camera's: 15 % night, blur 0/1/2 with probability
  0.7/0.2/0.1, noise 0-0.1, brightness 0.5-1.3, tint +-20 %; objects span a wider radius range.

Captions come from templates, e.g. ``"a camera trap image of a small orange spotted circle on
grass at night."`` or ``"a photo of a zarvok."``. Species names appear only in captions of species
images (with probability ``name_prob``); held-out species are never named.

:func:`corpus_words` lists every word the captions, the zero-shot templates and the concept
descriptions can contain, which is what a cut-down BPE vocabulary must cover.

Example:
    >>> import numpy as np
    >>> from rftlib.data.synthwild import WorldConfig, build_world
    >>> world = build_world(WorldConfig(size="tiny"))
    >>> images, captions = sample_pretraining_batch(np.random.default_rng(0), world, 4)
    >>> images.shape
    (4, 32, 32, 3)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .attributes import COLOURS, PATTERNS, SCENES, SHAPES, SIZE_WORDS
from .render import RenderSpec, render_images
from .world import World, jitter_colours, sample_centres, sample_patterns, sample_radii, species_arrays

#: Caption openings as (article, head), read "{article} {head} of a ..."; the bare opening
#: ``("", "")`` gives ``"a red circle."``.
PREFIXES: tuple[tuple[str, str], ...] = (
    ("a", "photo"),
    ("a", "camera trap image"),
    ("a", "picture"),
    ("an", "image"),
    ("a", "camera trap photo"),
    ("", ""),
)

#: Noun used instead of the shape noun in 10 % of attribute captions.
GENERIC_NOUN = "animal"


def default_templates() -> list[str]:
    """The zero-shot prompt templates (one ``{}`` for the class name), as used by synthclip."""
    return ["a photo of a {}.", "a camera trap image of a {}.", "a {}.", "a picture of a {}."]


@dataclass(frozen=True)
class PretrainingConfig:
    """Distribution of the pretraining corpus (pixel values at 32 px, scaled with image size).

    Attributes:
        radius: object radius range, wider than any world's so sizes are covered broadly.
        night_prob: share of night (infrared greyscale) shots.
        blur_probs: probabilities of box-blur radius 0, 1, 2.
        noise: range of the sensor-noise standard deviation.
        brightness: range of the global gain.
        tint: maximum relative per-channel tint.
        colour_jitter: relative jitter of the body colour.
    """

    radius: tuple[float, float] = (4.0, 10.0)
    night_prob: float = 0.15
    blur_probs: tuple[float, float, float] = (0.7, 0.2, 0.1)
    noise: tuple[float, float] = (0.0, 0.1)
    brightness: tuple[float, float] = (0.5, 1.3)
    tint: float = 0.2
    colour_jitter: float = 0.1


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Draw:
    """What was drawn for each image of a batch (needed to write its caption)."""

    species: np.ndarray  # (n,) index of the training species, -1 for a random combination
    attrs: dict[str, np.ndarray]  # per image shape, pattern, colour, size
    spec: RenderSpec


def _draw_attributes(
    rng: np.random.Generator, world: World, n: int, species_fraction: float
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per image: species index (or -1) and shape/pattern/colour/size indices."""
    is_species = rng.random(n) < species_fraction
    species = np.where(is_species, rng.integers(0, len(world.species), n), -1)
    table = species_arrays(world.species)
    limits = {"shape": len(SHAPES), "pattern": len(PATTERNS), "colour": len(COLOURS), "size": len(SIZE_WORDS)}
    attrs = {}
    for key, limit in limits.items():
        random_values = rng.integers(0, limit, n)
        attrs[key] = np.where(is_species, table[key][np.maximum(species, 0)], random_values)
    return species, attrs


def _draw_spec(
    rng: np.random.Generator, attrs: dict[str, np.ndarray], image_size: int, cfg: PretrainingConfig,
    period: tuple[float, float],
) -> RenderSpec:
    """A broad random render spec (fresh backgrounds of every scene type) for given attributes."""
    n = len(attrs["shape"])
    scale = image_size / 32
    radii = sample_radii(rng, attrs["size"], (cfg.radius[0] * scale, cfg.radius[1] * scale))
    periods, phases = sample_patterns(rng, n, period, scale)
    blur_steps = rng.choice(len(cfg.blur_probs), n, p=np.asarray(cfg.blur_probs) / sum(cfg.blur_probs))
    return RenderSpec(
        shapes=attrs["shape"],
        patterns=attrs["pattern"],
        colours=jitter_colours(rng, attrs["colour"], cfg.colour_jitter),
        radii=radii,
        centres=sample_centres(rng, radii, image_size),
        pattern_periods=periods,
        pattern_phases=phases,
        scenes=rng.integers(0, len(SCENES), n),
        brightness=rng.uniform(*cfg.brightness, n),
        tint=1 + rng.uniform(-cfg.tint, cfg.tint, (n, 3)),
        night=rng.random(n) < cfg.night_prob,
        blur=np.round(blur_steps * scale).astype(np.int64),
        noise=rng.uniform(*cfg.noise, n),
    )


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------


def _pattern_words(pattern: int, as_suffix: bool) -> tuple[str, str]:
    """The pattern as (adjective before the noun, suffix after it); one of them is empty."""
    p = PATTERNS[pattern]
    return ("", f"with {p.phrase}") if as_suffix else (p.adjective, "")


def _body(draw: _Draw, i: int, u: np.ndarray, world: World, name_prob: float) -> str:
    """The noun phrase of image ``i`` (without article), e.g. ``"small red spotted circle"``.

    ``u`` holds this image's uniform random numbers, one per decision.
    """
    night = bool(draw.spec.night[i])
    colour = COLOURS[draw.attrs["colour"][i]].word
    size = SIZE_WORDS[draw.attrs["size"][i]] if u[0] < 0.3 else ""
    species = int(draw.species[i])
    if species >= 0 and u[1] < name_prob:
        noun = world.species[species].name
        colour = colour if u[2] < 0.25 else ""
        adjective, suffix = _pattern_words(draw.attrs["pattern"][i], u[4] < 0.5) if u[3] < 0.25 else ("", "")
    else:
        noun = GENERIC_NOUN if u[5] < 0.1 else SHAPES[draw.attrs["shape"][i]].noun
        colour = colour if u[2] < (0.375 if night else 0.75) else ""
        adjective, suffix = _pattern_words(draw.attrs["pattern"][i], u[4] < 0.3) if u[3] < 0.75 else ("", "")
    return " ".join(w for w in (size, colour, adjective, noun, suffix) if w)


def _article(phrase: str) -> str:
    return "an" if phrase[:1] in "aeiou" else "a"


def _caption(draw: _Draw, i: int, u: np.ndarray, world: World, name_prob: float) -> str:
    """The full caption of image ``i`` (prefix, body, optional scene, night and blur words)."""
    body = _body(draw, i, u, world, name_prob)
    blurry = draw.spec.blur[i] > 0 and u[6] < 0.5
    article, head = PREFIXES[int(u[7] * len(PREFIXES))]
    if blurry:
        opening = f"a blurry {head or PREFIXES[0][1]} of"
    else:
        opening = f"{article} {head} of" if head else ""
    words = [opening, _article(body), body]
    if u[8] < 0.5:
        phrases = SCENES[draw.spec.scenes[i]].phrases
        words.append(phrases[int(u[9] * len(phrases))])
    if draw.spec.night[i] and u[10] < 0.7:
        words.append("at night")
    return " ".join(w for w in words if w) + "."


def sample_pretraining_batch(
    rng: np.random.Generator,
    world: World,
    n: int,
    *,
    name_prob: float = 0.5,
    species_fraction: float = 0.4,
    config: PretrainingConfig | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Draw ``n`` fresh image-caption pairs for contrastive pretraining.

    Args:
        rng: random generator (consumed); pass a seeded one for a reproducible corpus.
        world: the world whose training species appear (and are sometimes named).
        n: batch size.
        name_prob: probability that a species image is captioned with the species' name
            (lower values make zero-shot on names weaker).
        species_fraction: share of images showing a training species' attribute combination.
        config: image distribution (default :class:`PretrainingConfig`).

    Returns:
        ``(images, captions)``: uint8 (n, S, S, 3) at the world's image size and ``n`` strings.
    """
    cfg = config or PretrainingConfig()
    species, attrs = _draw_attributes(rng, world, n, species_fraction)
    spec = _draw_spec(rng, attrs, world.config.image_size, cfg, world.config.pattern_period)
    images = render_images(spec, rng, world.config.image_size)
    draw = _Draw(species, attrs, spec)
    u = rng.random((n, 11))
    captions = [_caption(draw, i, u[i], world, name_prob) for i in range(n)]
    return images, captions


# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------


def words_of(text: str) -> list[str]:
    """Lowercase words of ``text`` with punctuation stripped (``"a red, round"`` -> 3 words)."""
    return re.findall(r"[a-z]+", text.lower())


def corpus_words(world: World) -> set[str]:
    """Every word that captions, zero-shot prompts or concept descriptions of ``world`` can use.

    Held-out species names are excluded: nothing ever emits them.
    """
    phrases = [f"{a} {h} of" for a, h in PREFIXES] + ["a", "an", "blurry", "at night", "with", GENERIC_NOUN]
    phrases += list(SIZE_WORDS) + [c.word for c in COLOURS] + [s.noun for s in SHAPES]
    phrases += [p.adjective for p in PATTERNS] + [p.phrase for p in PATTERNS]
    phrases += [phrase for s in SCENES for phrase in s.phrases]
    phrases += default_templates() + world.classnames
    phrases += [d for s in world.species + world.heldout_species for d in s.description_variants]
    return {w for phrase in phrases for w in words_of(phrase)}
