"""Test doubles: tiny fabricated WILDS datasets and a pure-torch ``torch_scatter`` stand-in.

The fabricated trees have exactly the files, columns and invariants that the real ``wilds`` 2.0.0
loaders read, so ``wilds.get_dataset(name, root_dir=root, download=False)`` and every
``get_subset(split)`` work on them, with a handful of 16x16 images instead of many gigabytes.
Images are a per-class colour plus noise, so a model can actually learn something from them.

Usage::

    from tests.fakes import make_fake_iwildcam, import_wilds_quietly
    root = make_fake_iwildcam(tmp_path)          # writes tmp_path/iwildcam_v2.0/
    wilds = import_wilds_quietly()
    dataset = wilds.get_dataset("iwildcam", root_dir=tmp_path, download=False)
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

IWILDCAM_SPLITS = ("train", "val", "test", "id_val", "id_test")
FMOW_SPLITS = ("train", "id_val", "id_test", "val", "test")

# Invented species, so nobody mistakes the fake for the real label set.
_FAKE_SPECIES = (
    "striped_glimmerbuck", "lesser_puddle_ocelot", "tufted_dune_tapir", "crested_moss_hog",
    "spotted_fern_wallaby", "banded_cloud_pangolin", "pale_marsh_civet", "ringtailed_stone_hare",
)

# alpha-3 code -> WILDS region; "XKX" is deliberately left out of the mapping file, so WILDS
# assigns it the region "Other".
_FMOW_COUNTRIES = {"CHN": "Asia", "FRA": "Europe", "KEN": "Africa", "BRA": "Americas", "AUS": "Oceania"}
_FMOW_UNMAPPED_COUNTRY = "XKX"

# Raw ``split`` value and [first, last] year of each WILDS split under the official
# ``time_after_2016`` scheme: OOD test >= 2016, OOD val 2013-2015, in-distribution < 2013.
# WILDS only knows years 2002-2017 (anything else becomes year -1 and breaks its grouper).
_FMOW_LAYOUT = {
    "train": ("train", 2002, 2012),
    "id_val": ("val", 2002, 2012),
    "id_test": ("test", 2002, 2012),
    "val": ("val", 2013, 2015),
    "test": ("test", 2016, 2017),
    "seq": ("seq", 2002, 2017),
}


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------
def _split_sizes(requested: Mapping[str, int] | None, splits: tuple[str, ...], default: int) -> dict:
    """Fill in per-split sizes, rejecting unknown split names.

    Args:
        requested: Sizes the caller asked for (may be partial or None).
        splits: The valid split names.
        default: Size of any split not mentioned.

    Returns:
        ``{split: size}`` for every split.
    """
    requested = dict(requested or {})
    unknown = sorted(set(requested) - set(splits))
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; valid: {', '.join(splits)}")
    return {split: int(requested.get(split, default)) for split in splits}


def _class_colour(label: int) -> np.ndarray:
    """A distinct, deterministic RGB colour for a class index."""
    hue_rng = np.random.default_rng(1000 + label)
    return hue_rng.integers(30, 226, size=3)


def _write_image(path: Path, label: int, size: int, rng: np.random.Generator) -> None:
    """Write a small RGB image: the class colour plus a little noise (JPEG or PNG by suffix)."""
    noise = rng.integers(-25, 26, size=(size, size, 3))
    pixels = np.clip(_class_colour(label) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels, mode="RGB").save(path)


def _cycle(values: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` draws that use every value at least once when ``n >= len(values)``, in random order."""
    return rng.permutation(np.resize(values, n))


# --------------------------------------------------------------------------------------------------
# iWildCam
# --------------------------------------------------------------------------------------------------
def make_fake_iwildcam(
    root: Path,
    n_per_split: Mapping[str, int] | None = None,
    num_classes: int = 4,
    num_locations: int = 6,
    image_size: int = 16,
    seed: int = 0,
) -> Path:
    """Write a miniature ``iwildcam_v2.0`` tree that WILDS' ``IWildCamDataset`` loads.

    Like the real data, camera locations are disjoint between the in-distribution splits
    (train, id_val, id_test), OOD val and OOD test; photos come in bursts of three
    (``sequence_remapped``); and every image lives under ``train/`` whatever its split.

    Args:
        root: The WILDS ``root_dir``; the tree goes to ``root/iwildcam_v2.0``.
        n_per_split: Images per split (``train``, ``val``, ``test``, ``id_val``, ``id_test``);
            12 for any split not given.
        num_classes: Number of species; every one appears somewhere (WILDS requires labels
            ``0..max`` to all occur).
        num_locations: Number of camera locations (at least 3: ID, OOD-val, OOD-test).
        image_size: Side of the square images in pixels.
        seed: Seed for labels, timestamps and pixels.

    Returns:
        The dataset directory ``root/iwildcam_v2.0``.
    """
    sizes = _split_sizes(n_per_split, IWILDCAM_SPLITS, default=12)
    if num_locations < 3:
        raise ValueError("num_locations must be >= 3 (ID, OOD val and OOD test locations are disjoint)")
    rng = np.random.default_rng(seed)
    frame = _iwildcam_metadata(sizes, num_classes, num_locations, rng)
    data_dir = Path(root) / "iwildcam_v2.0"
    (data_dir / "train").mkdir(parents=True, exist_ok=True)
    (data_dir / "RELEASE_v2.0.txt").write_text("fabricated miniature iWildCam for tests\n")
    frame.to_csv(data_dir / "metadata.csv", index=False)
    _iwildcam_categories(num_classes).to_csv(data_dir / "categories.csv", index=False)
    for filename, label in zip(frame["filename"], frame["y"], strict=True):
        _write_image(data_dir / "train" / filename, int(label), image_size, rng)
    return data_dir


def _iwildcam_metadata(
    sizes: Mapping[str, int], num_classes: int, num_locations: int, rng: np.random.Generator
) -> pd.DataFrame:
    """Build ``metadata.csv``, enforcing the contiguity asserts of ``IWildCamDataset.__init__``.

    Args:
        sizes: Images per split.
        num_classes: Number of labels.
        num_locations: Number of locations.
        rng: Random generator.

    Returns:
        The metadata frame (one row per image).
    """
    id_locs, val_locs, test_locs = np.array_split(np.arange(num_locations), 3)
    split_locations = {"train": id_locs, "id_val": id_locs, "id_test": id_locs, "val": val_locs, "test": test_locs}
    splits = np.concatenate([[split] * sizes[split] for split in IWILDCAM_SPLITS])
    locations = np.concatenate([_cycle(split_locations[s], sizes[s], rng) for s in IWILDCAM_SPLITS])
    n = len(splits)
    labels = _cycle(np.arange(num_classes), n, rng)
    start = datetime(2013, 1, 1)
    times = [start + timedelta(seconds=int(s)) for s in np.sort(rng.integers(0, 3 * 365 * 86400, n))]
    frame = pd.DataFrame({
        "split": splits,
        "location_remapped": locations,
        "location": locations + 100,  # the raw (non-contiguous) location id, as in the real file
        "sequence_remapped": np.arange(n) // 3,
        "datetime": [t.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] for t in times],
        "y": labels,
        "category_id": labels * 3 + 1,
        "filename": [f"{rng.bytes(16).hex()}.jpg" for _ in range(n)],
    })
    _check_contiguous(frame, ("y", "location_remapped", "sequence_remapped"))
    return frame


def _check_contiguous(frame: pd.DataFrame, columns: tuple[str, ...]) -> None:
    """Raise if a column's values are not exactly ``0..max`` (WILDS asserts this on load)."""
    for column in columns:
        present = np.unique(frame[column])
        if len(present) != present.max() + 1:
            raise ValueError(
                f"{column} covers {len(present)} of 0..{present.max()}: give more images per split "
                "(need at least num_classes images overall and one per location group)"
            )


def _iwildcam_categories(num_classes: int) -> pd.DataFrame:
    """``categories.csv``: the label index, the original category id and an invented species name."""
    names = [_FAKE_SPECIES[i % len(_FAKE_SPECIES)] + ("" if i < len(_FAKE_SPECIES) else f"_{i}")
             for i in range(num_classes)]
    labels = np.arange(num_classes)
    return pd.DataFrame({"y": labels, "category_id": labels * 3 + 1, "name": names})


# --------------------------------------------------------------------------------------------------
# FMoW
# --------------------------------------------------------------------------------------------------
def make_fake_fmow(
    root: Path,
    n_per_split: Mapping[str, int] | None = None,
    image_size: int = 16,
    seed: int = 0,
    num_classes: int = 4,
) -> Path:
    """Write a miniature ``fmow_v1.1`` tree that WILDS' ``FMoWDataset`` loads (official split).

    Rows get raw ``split`` values and years so that each WILDS split of the ``time_after_2016``
    scheme is non-empty (see ``_FMOW_LAYOUT``), plus a few sequestered ``seq`` rows that WILDS
    drops but whose images must still exist. Countries cycle over one per region plus one
    unmapped code (region "Other"), and rows are shuffled so the region order WILDS derives
    (order of first appearance) is not the canonical one.

    Args:
        root: The WILDS ``root_dir``; the tree goes to ``root/fmow_v1.1``.
        n_per_split: Images per WILDS split (``train``, ``id_val``, ``id_test``, ``val``,
            ``test``) and optionally ``seq``; 12 (3 for ``seq``) when not given.
        image_size: Side of the square PNG images.
        seed: Seed for everything random.
        num_classes: How many of WILDS' 62 FMoW categories to use (the first ones).

    Returns:
        The dataset directory ``root/fmow_v1.1``.
    """
    requested = dict(n_per_split or {})
    n_seq = int(requested.pop("seq", 3))
    sizes = {**_split_sizes(requested, FMOW_SPLITS, default=12), "seq": n_seq}
    rng = np.random.default_rng(seed)
    frame = _fmow_metadata(sizes, num_classes, rng)
    data_dir = Path(root) / "fmow_v1.1"
    (data_dir / "images").mkdir(parents=True, exist_ok=True)
    (data_dir / "RELEASE_v1.1.txt").write_text("fabricated miniature FMoW for tests\n")
    frame.to_csv(data_dir / "rgb_metadata.csv", index=False)
    mapping = pd.DataFrame({"alpha-3": list(_FMOW_COUNTRIES), "region": list(_FMOW_COUNTRIES.values())})
    mapping.to_csv(data_dir / "country_code_mapping.csv", index=False)
    labels = frame["category"].map({name: i for i, name in enumerate(_fmow_categories())})
    for index, label in enumerate(labels):
        _write_image(data_dir / "images" / f"rgb_img_{index}.png", int(label), image_size, rng)
    return data_dir


def _fmow_categories() -> list[str]:
    """WILDS' 62 FMoW category names, in label order."""
    import_wilds_quietly()
    from wilds.datasets.fmow_dataset import categories

    return list(categories)


def _fmow_metadata(sizes: Mapping[str, int], num_classes: int, rng: np.random.Generator) -> pd.DataFrame:
    """Build ``rgb_metadata.csv`` rows for the requested WILDS split sizes, shuffled.

    Args:
        sizes: Rows per WILDS split, plus ``seq``.
        num_classes: Number of categories to use.
        rng: Random generator.

    Returns:
        The metadata frame with ``split``, ``category``, ``country_code`` and ``timestamp``.
    """
    categories = _fmow_categories()[:num_classes]
    countries = np.array([*_FMOW_COUNTRIES, _FMOW_UNMAPPED_COUNTRY])
    parts = []
    for wilds_split, n in sizes.items():
        raw_split, first_year, last_year = _FMOW_LAYOUT[wilds_split]
        years = _cycle(np.arange(first_year, last_year + 1), n, rng)
        parts.append(pd.DataFrame({
            "split": [raw_split] * n,
            "category": np.asarray(categories)[_cycle(np.arange(num_classes), n, rng)],
            "country_code": _cycle(countries, n, rng),
            "timestamp": [_fmow_timestamp(int(year), rng) for year in years],
        }))
    frame = pd.concat(parts, ignore_index=True)
    return frame.iloc[rng.permutation(len(frame))].reset_index(drop=True)


def _fmow_timestamp(year: int, rng: np.random.Generator) -> str:
    """An ISO-8601 UTC timestamp inside ``year``, formatted like the real file (``...T10:00:00Z``)."""
    moment = datetime(year, 1, 1) + timedelta(seconds=int(rng.integers(0, 364 * 86400)))
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------------
# import helpers
# --------------------------------------------------------------------------------------------------
def _standin_scatter(
    src: Any, index: Any, dim: int = 0, out: Any = None, dim_size: int | None = None, reduce: str = "sum"
) -> Any:
    """Pure-torch replacement for ``torch_scatter.scatter`` along ``dim=0``.

    Args:
        src: Values to scatter, shape ``(n, ...)``.
        index: Target group of each row of ``src``, shape ``(n,)``.
        dim: Must resolve to 0 (the only case WILDS uses).
        out: Unsupported; must be None.
        dim_size: Number of groups; defaults to ``index.max() + 1``.
        reduce: ``"sum"``/``"add"``, ``"mean"``, ``"max"``, ``"min"`` or ``"mul"``.

    Returns:
        A tensor of shape ``(dim_size, ...)``; groups that receive nothing are 0, as in
        torch_scatter.
    """
    import torch

    if dim < 0:
        dim += src.dim()  # the real default is dim=-1, which is 0 for the 1-D tensors WILDS passes
    if dim != 0 or out is not None:
        raise NotImplementedError("the torch_scatter stand-in supports only dim=0 and out=None")
    modes = {"sum": "sum", "add": "sum", "mean": "mean", "max": "amax", "min": "amin", "mul": "prod"}
    if reduce not in modes:
        raise ValueError(f"unsupported reduce {reduce!r}; valid: {', '.join(modes)}")
    if dim_size is None:
        dim_size = int(index.max()) + 1 if index.numel() else 0
    expanded = index.reshape(-1, *([1] * (src.dim() - 1))).expand_as(src)
    result = torch.zeros((dim_size, *src.shape[1:]), dtype=src.dtype, device=src.device)
    return result.scatter_reduce(0, expanded, src, reduce=modes[reduce], include_self=False)


def install_torch_scatter_standin() -> types.ModuleType:
    """Make ``import torch_scatter`` work without the compiled package (WILDS' ``avg_over_groups``).

    A real ``torch_scatter`` (installed or already imported) is left alone.

    Returns:
        The module that ``import torch_scatter`` now yields.
    """
    if "torch_scatter" in sys.modules and sys.modules["torch_scatter"] is not None:
        return sys.modules["torch_scatter"]
    if importlib.util.find_spec("torch_scatter") is not None:
        import torch_scatter

        return torch_scatter
    module = types.ModuleType("torch_scatter", "Pure-torch test stand-in for torch_scatter (scatter only).")
    module.scatter = _standin_scatter
    sys.modules["torch_scatter"] = module
    return module


def import_wilds_quietly() -> types.ModuleType:
    """Import ``wilds`` without its PyPI version check.

    ``wilds.version`` starts a thread that asks PyPI whether a newer release exists (through the
    ``outdated`` package), which hangs or warns offline. Registering ``outdated`` as None makes
    that import fail, and WILDS then skips the check.

    Returns:
        The ``wilds`` module.
    """
    sys.modules.setdefault("outdated", None)
    import wilds

    return wilds


# --------------------------------------------------------------------------------------------------
# synthwild written out as image files (the ``folder`` dataset)
# --------------------------------------------------------------------------------------------------
def write_image_folder(root: Path, data, *, size: tuple[int, int] = (48, 40), per_split: int | None = None,
                       splits: tuple[str, ...] = ("train", "id_val", "id_test", "test")) -> Path:
    """Write synthwild ``data``'s images as JPEG files ``root/<split>/<class name>/<i>.jpg``.

    Images are resized to ``size`` (width, height), so evaluation and training views resample for
    real. ``per_split`` keeps the first images of each split. Returns ``root`` (load it with
    ``get_dataset("folder", root=root)``).
    """
    for split in splits:
        s = data.split(split)
        count = len(s) if per_split is None else min(per_split, len(s))
        for i in range(count):
            folder = Path(root) / split / data.classnames[int(s.labels[i])]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(s.images.array[i]).resize(size, Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    return Path(root)


def write_jpeg_tree(folder: Path, counts: Mapping[str, int], *, size: tuple[int, int] = (48, 40),
                    seed: int = 0) -> Path:
    """``folder/<class>/<i>.JPEG`` with ``counts[class]`` images each: a per-class colour plus noise."""
    rng = np.random.default_rng(seed)
    for label, (name, count) in enumerate(sorted(counts.items())):
        (Path(folder) / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            noise = rng.integers(-25, 26, size=(size[1], size[0], 3))
            pixels = np.clip(_class_colour(label) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="RGB").save(Path(folder) / name / f"{i:04d}.JPEG", quality=90)
    return Path(folder)


def make_fake_imagenet(root: Path, train_per_class: int = 8) -> Path:
    """An ImageNet-layout tree: 3 classes in train and val, 2 of them in ImageNet-R, V2 by index."""
    wnids = {"n01440764": 0, "n01443537": 1, "n01484850": 2}  # tench, goldfish, great white shark (R has 1, 2)
    write_jpeg_tree(root / "imagenet" / "train", {w: train_per_class for w in wnids})
    write_jpeg_tree(root / "imagenet" / "val", {w: 4 for w in wnids})
    write_jpeg_tree(root / "imagenet-r", {"n01443537": 3, "n01484850": 3})
    write_jpeg_tree(root / "imagenet-v2", {str(i): 3 for i in wnids.values()})
    return root
