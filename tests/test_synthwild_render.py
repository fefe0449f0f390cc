"""synthwild generator: determinism, split structure, the background shortcut, captions, vocabulary."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from rftlib.data.synthwild import (
    SPLIT_ROLES,
    RenderSpec,
    WorldConfig,
    box_blur,
    build_world,
    corpus_words,
    default_templates,
    generate_split,
    generate_synthwild,
    render_images,
    render_scene,
    sample_pretraining_batch,
    split_rng,
    words_of,
)
from rftlib.data.synthwild.attributes import SCENES

META_COLUMNS = {"location", "camera_role", "scene", "night", "time", "hour", "species_name"}


@pytest.fixture(scope="module")
def small():
    """A world with a quarter of the default split sizes (train 2,500) and its splits."""
    cfg = WorldConfig(size="small")
    world = build_world(cfg)
    return world, generate_synthwild(cfg, world=world)


def test_same_config_gives_identical_arrays():
    a = generate_synthwild(WorldConfig(size="tiny"))
    b = generate_synthwild(WorldConfig(size="tiny"))
    for name in a:
        np.testing.assert_array_equal(a[name][0], b[name][0])
        np.testing.assert_array_equal(a[name][1], b[name][1])
        pd.testing.assert_frame_equal(a[name][2], b[name][2])


def test_different_seed_gives_different_world():
    a = generate_synthwild(WorldConfig(size="tiny"))
    b = generate_synthwild(WorldConfig(size="tiny", seed=1))
    assert not np.array_equal(a["train"][0], b["train"][0])
    assert build_world(WorldConfig(seed=0)).classnames != build_world(WorldConfig(seed=1)).classnames


def test_each_split_has_its_own_stream(small):
    world, splits = small
    again = generate_split(world, "train", len(splits["train"][1]), split_rng(0, "train"))
    np.testing.assert_array_equal(again[0], splits["train"][0])
    assert split_rng(0, "train").random() != split_rng(0, "test").random()


def test_split_sizes_dtypes_and_metadata(small):
    world, splits = small
    assert set(splits) == set(SPLIT_ROLES)
    size = world.config.image_size
    for name, (images, labels, meta) in splits.items():
        assert len(images) == len(labels) == len(meta) == world.config.split_sizes()[name]
        assert images.dtype == np.uint8 and images.shape[1:] == (size, size, 3)
        assert labels.dtype == np.int64
        assert META_COLUMNS <= set(meta.columns)
    assert WorldConfig().split_sizes() == {
        "train": 10_000, "id_val": 1_000, "id_test": 2_000, "val": 1_000, "test": 2_000, "openset": 1_000,
    }
    assert WorldConfig(size=500).split_sizes()["train"] == 500


def test_labels_and_cameras_follow_split_roles(small):
    world, splits = small
    id_cams, ood_cams = set(world.id_cameras.tolist()), set(world.ood_cameras.tolist())
    assert not id_cams & ood_cams
    for name, (_, labels, meta) in splits.items():
        locations = set(meta["location"].tolist())
        if SPLIT_ROLES[name] in ("train", "id"):
            assert locations <= id_cams
            assert labels.min() >= 0 and labels.max() < len(world.species)
        elif SPLIT_ROLES[name] == "ood":
            assert locations <= ood_cams
            assert labels.min() >= 0 and labels.max() < len(world.species)
            assert set(meta["scene"]) <= {s.key for s in SCENES if s.ood_only}
    assert len(set(splits["train"][1].tolist())) == len(world.species)


def test_openset_holds_only_heldout_species(small):
    world, splits = small
    _, labels, meta = splits["openset"]
    assert (labels == -1).all()
    assert set(meta["species_name"]) <= {s.name for s in world.heldout_species}
    assert set(meta["camera_role"]) == {"id", "ood"}


def test_background_is_a_shortcut_in_train(small):
    world, splits = small
    _, labels, meta = splits["train"]
    rho = world.config.rho
    shares = []
    for s in range(len(world.species)):
        counts = np.sort(np.bincount(meta["location"][labels == s], minlength=len(world.cameras)))[::-1]
        shares.append(counts[: world.config.n_home].sum() / counts.sum())
    expected = rho + (1 - rho) * world.config.n_home / world.config.n_id_cameras
    assert abs(np.mean(shares) - expected) < 0.03
    assert min(shares) > rho - 0.15


def test_long_tail(small):
    world, splits = small
    counts = np.bincount(splits["train"][1], minlength=len(world.species))
    assert counts.max() >= 3 * counts.min()
    default = build_world(WorldConfig())
    assert default.species_weights.min() * WorldConfig().split_sizes()["train"] >= 15


def test_night_shots_happen_at_night_hours(small):
    _, splits = small
    meta = pd.concat([m for _, _, m in splits.values()])
    night_hours = meta.loc[meta["night"], "hour"]
    assert len(night_hours) > 0
    assert night_hours.isin([20, 21, 22, 23, 0, 1, 2, 3, 4]).all()
    assert meta.loc[~meta["night"], "hour"].between(6, 18).all()


@pytest.mark.parametrize("min_diff", [1, 2])
def test_species_respect_attribute_spacing_and_have_unique_names(min_diff):
    world = build_world(WorldConfig(min_attribute_diff=min_diff))
    everyone = world.species + world.heldout_species
    for a, b in itertools.combinations(everyone, 2):
        assert sum(x != y for x, y in zip(a.attributes, b.attributes)) >= min_diff
    names = [s.name for s in everyone]
    assert len(set(names)) == len(names)
    assert all(n.isalpha() and n.islower() and 5 <= len(n) <= 9 for n in names)
    assert all(len(s.description_variants) >= 2 for s in everyone)
    assert not any(s.name in s.description for s in everyone)


def test_impossible_attribute_spacing_fails_clearly():
    with pytest.raises(ValueError, match="min_attribute_diff"):
        build_world(WorldConfig(min_attribute_diff=3))


def test_unknown_split_lists_valid_ones():
    world = build_world(WorldConfig(size="tiny"))
    with pytest.raises(ValueError, match="id_test"):
        generate_split(world, "nope", 5, np.random.default_rng(0))


def test_pretraining_batch_shapes_and_captions():
    world = build_world(WorldConfig(size="tiny"))
    images, captions = sample_pretraining_batch(np.random.default_rng(0), world, 64)
    assert images.shape == (64, 32, 32, 3) and images.dtype == np.uint8
    assert len(captions) == 64 and all(c.strip() and c.endswith(".") for c in captions)
    again, same = sample_pretraining_batch(np.random.default_rng(0), world, 64)
    np.testing.assert_array_equal(images, again)
    assert captions == same


def test_heldout_species_are_never_named():
    world = build_world(WorldConfig(size="tiny"))
    _, captions = sample_pretraining_batch(
        np.random.default_rng(1), world, 400, name_prob=1.0, species_fraction=1.0
    )
    words = {w for c in captions for w in words_of(c)}
    assert words & set(world.classnames)
    assert not words & {s.name for s in world.heldout_species}
    assert not {s.name for s in world.heldout_species} & corpus_words(world)


def test_corpus_words_cover_captions_templates_and_descriptions():
    world = build_world(WorldConfig(size="tiny"))
    vocab = corpus_words(world)
    _, captions = sample_pretraining_batch(np.random.default_rng(2), world, 200)
    texts = captions + [t.format(n) for t in default_templates() for n in world.classnames]
    texts += [d for s in world.species + world.heldout_species for d in s.description_variants]
    missing = {w for t in texts for w in words_of(t)} - vocab
    assert not missing
    assert all(w == w.lower() and w.isalpha() for w in vocab)


def test_default_templates():
    templates = default_templates()
    assert len(templates) == 4 and all(t.count("{}") == 1 for t in templates)


def test_render_scene_and_box_blur():
    bg = render_scene(np.random.default_rng(0), "grass", 32)
    assert bg.shape == (32, 32, 3) and bg.dtype == np.float32
    assert 0 <= bg.min() and bg.max() <= 1
    flat = np.full((2, 8, 8, 3), 0.3, dtype=np.float32)
    np.testing.assert_allclose(box_blur(flat, 2), flat, atol=1e-6)
    spike = np.zeros((1, 9, 9, 1), dtype=np.float32)
    spike[0, 4, 4] = 9.0
    np.testing.assert_allclose(box_blur(spike, 1)[0, 3:6, 3:6, 0], 1.0, atol=1e-6)


def test_night_images_are_grey():
    n = 4
    spec = RenderSpec(
        shapes=np.arange(n), patterns=np.arange(n), colours=np.tile([[0.9, 0.1, 0.1]], (n, 1)),
        radii=np.full(n, 8.0), centres=np.full((n, 2), 16.0), pattern_periods=np.full(n, 4.0),
        pattern_phases=np.zeros((n, 2)), scenes=np.arange(n), brightness=np.ones(n),
        tint=np.ones((n, 3)), night=np.array([True, True, False, False]), blur=np.zeros(n, dtype=int),
        noise=np.zeros(n),
    )
    images = render_images(spec, np.random.default_rng(0), 32).astype(int)
    spread = images.max(axis=-1) - images.min(axis=-1)
    assert spread[:2].max() <= 1 and spread[2:].max() > 50
