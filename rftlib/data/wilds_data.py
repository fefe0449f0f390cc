"""iWildCam and FMoW from the WILDS benchmark, through the official ``wilds`` package.

The ``wilds`` package decides which image belongs to which split, so the splits here are exactly
the official ones: ``train`` (role ``train``), ``id_val`` and ``id_test`` (role ``id``: same
cameras / same years as training) and ``val`` and ``test`` (role ``ood``: new cameras / later
years). rftlib then turns a WILDS dataset into an :class:`~rftlib.data.base.RFTDataset`:

* images become :class:`~rftlib.data.base.FileImages` with absolute paths (decoded later, once,
  by :mod:`rftlib.data.pipeline`), labels come from WILDS' ``y_array``;
* metadata becomes a readable table (iWildCam: ``location``, ``sequence``, ``datetime``, ``y``;
  FMoW: ``region`` as a name such as ``"Africa"``, ``year`` as a calendar year, ``y``);
* metrics are rftlib's re-implementations of WILDS' ``dataset.eval`` (iWildCam: macro-F1 over the
  classes present in the split; FMoW: worst-region accuracy without the region "Other"), so no
  ``torch_scatter`` is needed at evaluation time.

Class names
    *iWildCam*: WILDS labels are indices; the names used by WiSE-FT/FLYP are the lower-cased
    English common names of the file ``labels.csv`` that WiSE-FT ships (columns ``y``,
    ``category_id``, ``name``, ``english``; rows with ``y == 99999`` are categories absent from
    WILDS and are skipped). That file is not part of the WILDS download: pass it as
    ``classnames_file=...`` or put it next to ``metadata.csv``. Without it the scientific names
    of the WILDS ``categories.csv`` are used (lower-cased), and without that generic names.
    *FMoW*: WILDS' 62 category strings, **underscores kept** ("multi-unit_residential"), as in
    the original code; only the ``{a/an}`` templates replace them with spaces (see
    :mod:`rftlib.data.textfiles`).

Importing ``wilds`` normally starts a thread that asks PyPI for newer versions; this module
blocks it by registering the ``outdated`` module as missing before the import.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

from .base import DataNotFoundError, FileImages, RFTDataset, Split
from .textfiles import read_templates, resource_path

log = logging.getLogger(__name__)

SPLIT_ROLES = {"train": "train", "id_val": "id", "id_test": "id", "val": "ood", "test": "ood"}
"""The five official WILDS splits, in rftlib's order, and their roles."""

NON_WILDS_LABEL = 99999
"""``y`` value that WiSE-FT's ``labels.csv`` gives to categories that are not WILDS classes."""

SHIPPED_LABELS = resource_path("iwildcam_labels.csv")
"""iWildCam's 182 labels with their common English names, as the papers prompt with them
(WiSE-FT's table; origin in ``rftlib/data/files/SOURCES.md``)."""


@dataclass(frozen=True)
class WildsSpec:
    """What a WILDS dataset folder must contain (used by the loader and ``prepare_wilds.py``).

    Attributes:
        name: WILDS' dataset name (``"iwildcam"``).
        version: the data version rftlib expects (the folder is ``<name>_v<version>``).
        metadata_file: the main metadata table.
        required_files: files that must exist in the folder.
        required_columns: columns of ``metadata_file`` that WILDS reads.
        image_dir: sub-folder holding the images.
        size_gb: approximate download size, for messages.
    """

    name: str
    version: str
    metadata_file: str
    required_files: tuple[str, ...]
    required_columns: tuple[str, ...]
    image_dir: str
    size_gb: float

    @property
    def dir_name(self) -> str:
        return f"{self.name}_v{self.version}"

    @property
    def release_file(self) -> str:
        return f"RELEASE_v{self.version}.txt"

    def data_dir(self, root: Path) -> Path:
        """``<root>/<name>_v<version>``."""
        return Path(root) / self.dir_name

    def image_paths(self, data_dir: Path, metadata: pd.DataFrame, rows: np.ndarray) -> list[str]:
        """Absolute image paths of the given rows of the raw metadata table.

        iWildCam keeps every image in ``train/<filename>`` whatever its split; FMoW names images
        by their row in ``rgb_metadata.csv`` (``images/rgb_img_<row>.png``).
        """
        base = Path(data_dir).resolve() / self.image_dir
        if self.name == "iwildcam":
            names = metadata["filename"].to_numpy()[rows]
            return [str(base / str(n)) for n in names]
        return [str(base / f"rgb_img_{int(i)}.png") for i in rows]


WILDS_SPECS: dict[str, WildsSpec] = {
    "iwildcam": WildsSpec(
        name="iwildcam", version="2.0", metadata_file="metadata.csv",
        required_files=("metadata.csv",),
        required_columns=("split", "filename", "y", "location_remapped", "sequence_remapped", "datetime"),
        image_dir="train", size_gb=11.0,
    ),
    "fmow": WildsSpec(
        name="fmow", version="1.1", metadata_file="rgb_metadata.csv",
        required_files=("rgb_metadata.csv", "country_code_mapping.csv"),
        required_columns=("split", "category", "country_code", "timestamp"),
        image_dir="images", size_gb=50.0,
    ),
}


# --------------------------------------------------------------------------------------------------
# importing wilds and locating the data
# --------------------------------------------------------------------------------------------------
def import_wilds() -> ModuleType:
    """Import ``wilds`` without its network version check.

    Raises:
        ImportError: ``wilds`` is not installed; the message names the install command.
    """
    sys.modules.setdefault("outdated", None)  # wilds.version then skips its PyPI-polling thread
    try:
        import wilds
    except ImportError as err:
        raise ImportError(
            'the WILDS datasets need the "wilds" package: pip install -e ".[wilds]" '
            f"(import failed: {err})"
        ) from err
    return wilds


def prepare_command(name: str, root: Path) -> str:
    """The shell command that downloads or verifies a WILDS dataset under ``root``."""
    return f"python data_scripts/prepare_wilds.py {name} --root {root}"


def missing_data_message(name: str, root: Path, detail: str) -> str:
    """A multi-line explanation of how to obtain a missing WILDS dataset."""
    spec = WILDS_SPECS[name]
    cmd = prepare_command(name, root)
    return (
        f"{name} data not found: {detail}\n"
        f"Download it (about {spec.size_gb:g} GB) with:\n    {cmd} --download\n"
        f"or, if you downloaded the archive or folder yourself:\n"
        f"    {cmd} --adopt <folder-or-archive.tar.gz>\n"
        f"Running `{cmd}` without flags only checks what is there."
    )


def _resolve_root(root: Path | None) -> Path:
    from . import default_data_root

    return Path(root) if root is not None else default_data_root()


def _open_wilds(name: str, root: Path, download: bool, **dataset_kwargs: Any):
    """``wilds.get_dataset`` with rftlib's error messages for missing data.

    Raises:
        DataNotFoundError: the dataset folder or one of its files is missing (and ``download`` is
            False, or the download did not produce the files).
    """
    spec = WILDS_SPECS[name]
    release = spec.data_dir(root) / spec.release_file
    if not download and not release.is_file():
        raise DataNotFoundError(missing_data_message(name, root, f"{release} does not exist"))
    wilds = import_wilds()
    try:
        return wilds.get_dataset(name, root_dir=str(root), download=download, **dataset_kwargs)
    except FileNotFoundError as err:
        raise DataNotFoundError(missing_data_message(name, root, str(err))) from err


# --------------------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------------------
def split_rows(wilds_dataset, split: str) -> np.ndarray:
    """Indices (into WILDS' arrays) of the examples of one official split, in WILDS' order.

    These are exactly the indices that ``wilds_dataset.get_subset(split).indices`` holds (with
    ``frac=1``).

    Raises:
        KeyError: WILDS does not define ``split`` for this dataset (the message lists its splits).
    """
    split_dict = wilds_dataset.split_dict
    if split not in split_dict:
        name = wilds_dataset.dataset_name
        raise KeyError(f"WILDS {name} has no split {split!r}; it has {list(split_dict)}")
    return np.flatnonzero(np.asarray(wilds_dataset.split_array) == split_dict[split])


def subsample(indices: np.ndarray, frac: float | None, seed: int, stream: int) -> np.ndarray:
    """A seeded random fraction of ``indices``, kept in their original order.

    WILDS' own ``get_subset(frac=...)`` draws from numpy's global RNG; here every split has its own
    generator seeded by ``(seed, stream)``, so results do not depend on what ran before. The
    number kept is ``round(len * frac)``, as in WILDS.

    Args:
        indices: the split's indices.
        frac: fraction in (0, 1]; ``None`` or 1 keeps everything.
        seed: user seed.
        stream: a per-split number so different splits draw independently.
    """
    if frac is None:
        return indices
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    if frac == 1.0:
        return indices
    keep = int(np.round(len(indices) * frac))
    rng = np.random.default_rng([seed, stream])
    return np.sort(rng.permutation(indices)[:keep])


def _build_splits(
    wilds_dataset, make_split: Callable[[str, np.ndarray], Split], frac: float | None, seed: int
) -> dict[str, Split]:
    splits = {}
    for stream, name in enumerate(SPLIT_ROLES):
        rows = subsample(split_rows(wilds_dataset, name), frac, seed, stream)
        splits[name] = make_split(name, rows)
    return splits


def _labels(wilds_dataset, rows: np.ndarray) -> np.ndarray:
    return np.asarray(wilds_dataset.y_array)[rows].astype(np.int64)


# --------------------------------------------------------------------------------------------------
# metrics (imported lazily so that loading data does not import the metrics module's dependencies)
# --------------------------------------------------------------------------------------------------
def iwildcam_metric(y_true: np.ndarray, y_pred: np.ndarray, metadata: pd.DataFrame) -> dict:
    """iWildCam's official metrics: ``accuracy``, ``macro_recall`` and ``macro_f1`` (headline)."""
    from ..metrics import wilds_iwildcam_metrics

    return wilds_iwildcam_metrics(y_true, y_pred, metadata)


def fmow_metric(y_true: np.ndarray, y_pred: np.ndarray, metadata: pd.DataFrame) -> dict:
    """FMoW's official metrics: ``accuracy``, ``acc_worst_region`` (headline), ``acc_worst_year``."""
    from ..metrics import fmow_metrics

    return fmow_metrics(y_true, y_pred, metadata)


# --------------------------------------------------------------------------------------------------
# iWildCam
# --------------------------------------------------------------------------------------------------
def load_iwildcam(
    root: Path | None = None, *, download: bool = False, classnames_file: str | Path | None = None,
    frac: float | None = None, seed: int = 0,
) -> RFTDataset:
    """iWildCam 2020 (WILDS v2.0): camera-trap species classification, shift = new cameras.

    Args:
        root: the WILDS root (the folder that contains ``iwildcam_v2.0/``); default
            :func:`rftlib.data.default_data_root`.
        download: let WILDS download the data (about 11 GB) if it is missing.
        classnames_file: a WiSE-FT-style ``labels.csv`` with an ``english`` column; default
            ``<root>/iwildcam_v2.0/labels.csv`` if present (see the module docstring).
        frac: keep a seeded random fraction of every split (quick experiments).
        seed: seed for ``frac``.

    Returns:
        A dataset with splits ``train``, ``id_val``, ``id_test``, ``val``, ``test`` and headline
        metric macro-F1.

    Raises:
        DataNotFoundError: the data is missing (the message names ``prepare_wilds.py``).
        ImportError: ``wilds`` is not installed.
    """
    root = _resolve_root(root)
    spec = WILDS_SPECS["iwildcam"]
    wd = _open_wilds("iwildcam", root, download)
    data_dir = Path(wd.data_dir)
    raw = pd.read_csv(data_dir / spec.metadata_file, usecols=["filename", "datetime"])
    fields = list(wd.metadata_fields)
    meta_array = np.asarray(wd.metadata_array)

    def make_split(name: str, rows: np.ndarray) -> Split:
        meta = pd.DataFrame({
            "location": meta_array[rows, fields.index("location")].astype(np.int64),
            "sequence": meta_array[rows, fields.index("sequence")].astype(np.int64),
            "datetime": pd.to_datetime(raw["datetime"].to_numpy()[rows], format="%Y-%m-%d %H:%M:%S.%f"),
            "y": _labels(wd, rows),
        })
        paths = spec.image_paths(data_dir, raw, rows)
        return Split(name, SPLIT_ROLES[name], FileImages(tuple(paths)), _labels(wd, rows), meta)

    classnames, source = iwildcam_classnames(data_dir, int(wd.n_classes), classnames_file)
    splits = _build_splits(wd, make_split, frac, seed)
    return RFTDataset(
        name="iwildcam", classnames=classnames, templates=list(read_templates("iwildcam")),
        splits=splits, metric_fn=iwildcam_metric, primary_metric={"id": "macro_f1", "ood": "macro_f1"},
        root=root, info=_info(wd, data_dir, splits, frac, seed, classnames_source=source),
    )


def iwildcam_classnames(
    data_dir: Path, n_classes: int, classnames_file: str | Path | None = None
) -> tuple[list[str], str]:
    """Class names for iWildCam label indices ``0..n_classes-1`` and where they came from.

    Order of preference: ``classnames_file`` (must exist), ``<data_dir>/labels.csv`` (both need
    the ``english`` column), the common names shipped with rftlib (``rftlib/data/files/
    iwildcam_labels.csv``, WiSE-FT's table: what the papers prompt with) when the dataset's
    ``categories.csv`` has the same label space, ``<data_dir>/categories.csv`` (the Latin
    ``name`` column), generic ``"class <i>"`` names. The choice is logged.

    Raises:
        FileNotFoundError: ``classnames_file`` was given but does not exist.
        ValueError: the names file lacks a needed column or does not name every label.
    """
    if classnames_file is not None and not Path(classnames_file).is_file():
        raise FileNotFoundError(f"classnames_file {classnames_file} does not exist")
    categories = data_dir / "categories.csv"
    candidates = [(Path(classnames_file), "english")] if classnames_file is not None else []
    candidates.append((data_dir / "labels.csv", "english"))
    if categories.is_file() and _same_label_space(categories, SHIPPED_LABELS, n_classes):
        candidates.append((SHIPPED_LABELS, "english"))
    candidates.append((categories, "name"))
    for path, column in candidates:
        if path.is_file():
            source = f"{path.name}:{column}" + (" (shipped with rftlib)" if path == SHIPPED_LABELS else "")
            log.info("iwildcam: class names from %s", source)
            return _names_from_table(path, column, n_classes), source
    log.warning("iwildcam: no labels.csv or categories.csv in %s; using generic class names", data_dir)
    return [f"class {i}" for i in range(n_classes)], "generic"


def _same_label_space(categories: Path, labels: Path, n_classes: int) -> bool:
    """Whether two tables give the same scientific ``name`` to every label ``y < n_classes``."""
    def names(path: Path) -> dict[int, str]:
        table = pd.read_csv(path)
        if not {"y", "name"} <= set(table.columns):
            return {}
        return {int(y): str(n).lower() for y, n in zip(table["y"], table["name"], strict=True) if y < n_classes}

    ours = names(categories)
    return len(ours) == n_classes and ours == {y: n for y, n in names(labels).items() if y in ours}


def _names_from_table(path: Path, column: str, n_classes: int) -> list[str]:
    """Lower-cased names from ``column`` of a CSV, indexed by its ``y`` column (``y < 99999``)."""
    table = pd.read_csv(path)
    missing = [c for c in ("y", column) if c not in table.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; it has {list(table.columns)}")
    table = table[table["y"] < NON_WILDS_LABEL]
    by_label = {int(y): str(name).lower() for y, name in zip(table["y"], table[column])}
    absent = [i for i in range(n_classes) if i not in by_label]
    if absent:
        raise ValueError(
            f"{path} names no class for label(s) {absent[:10]}{' ...' if len(absent) > 10 else ''} "
            f"(the dataset has {n_classes} classes)"
        )
    extra = sorted(set(by_label) - set(range(n_classes)))
    if extra:
        log.warning("%s names %d labels beyond the dataset's %d classes; ignoring them",
                    path, len(extra), n_classes)
    return [by_label[i] for i in range(n_classes)]


# --------------------------------------------------------------------------------------------------
# FMoW
# --------------------------------------------------------------------------------------------------
def load_fmow(
    root: Path | None = None, *, download: bool = False, frac: float | None = None, seed: int = 0,
) -> RFTDataset:
    """Functional Map of the World (WILDS, data v1.1): land use from satellite images, shift = time.

    WILDS' official ``time_after_2016`` scheme with ``use_ood_val=True`` (pinned): ``train``,
    ``id_val`` and ``id_test`` are before 2013, OOD ``val`` is 2013-2015 and OOD ``test`` is 2016
    onwards. The headline OOD number is the worst accuracy over regions, ignoring "Other".

    Args:
        root: the WILDS root (the folder that contains ``fmow_v1.1/``); default
            :func:`rftlib.data.default_data_root`.
        download: let WILDS download the data (about 50 GB) if it is missing.
        frac: keep a seeded random fraction of every split.
        seed: seed for ``frac``.

    Raises:
        DataNotFoundError: the data is missing (the message names ``prepare_wilds.py``).
        ImportError: ``wilds`` is not installed.
    """
    root = _resolve_root(root)
    spec = WILDS_SPECS["fmow"]
    wd = _open_wilds("fmow", root, download, use_ood_val=True)
    data_dir = Path(wd.data_dir)
    regions, years = fmow_region_and_year(wd)
    full_idxs = np.asarray(wd.full_idxs)

    def make_split(name: str, rows: np.ndarray) -> Split:
        meta = pd.DataFrame({"region": regions[rows], "year": years[rows], "y": _labels(wd, rows)})
        paths = spec.image_paths(data_dir, wd.metadata, full_idxs[rows])
        return Split(name, SPLIT_ROLES[name], FileImages(tuple(paths)), _labels(wd, rows), meta)

    from wilds.datasets.fmow_dataset import categories

    splits = _build_splits(wd, make_split, frac, seed)
    return RFTDataset(
        name="fmow", classnames=list(categories), templates=list(read_templates("fmow")),
        splits=splits, metric_fn=fmow_metric, primary_metric={"id": "accuracy", "ood": "acc_worst_region"},
        root=root, info=_info(wd, data_dir, splits, frac, seed),
    )


def fmow_region_and_year(wilds_dataset) -> tuple[np.ndarray, np.ndarray]:
    """Region names and calendar years of every example, aligned with WILDS' arrays.

    WILDS stores both as codes: region as an index into ``metadata_map["region"]`` (names in order
    of first appearance) and year as ``year - 2002``, with -1 for timestamps outside 2002-2017.
    Codes are turned back into names and years; for the rare -1 the year is read from the
    timestamp, so out-of-range years stay distinct (WILDS would pool them into one group).
    """
    fields = list(wilds_dataset.metadata_fields)
    meta = np.asarray(wilds_dataset.metadata_array)
    region_names = np.asarray(wilds_dataset.metadata_map["region"], dtype=object)
    regions = region_names[meta[:, fields.index("region")]]
    year_codes = meta[:, fields.index("year")].astype(np.int64)
    years = np.asarray(wilds_dataset.metadata_map["year"])[np.clip(year_codes, 0, None)].astype(np.int64)
    unknown = year_codes < 0
    if unknown.any():
        stamps = wilds_dataset.metadata["timestamp"].to_numpy()[np.asarray(wilds_dataset.full_idxs)[unknown]]
        years[unknown] = pd.to_datetime(stamps, utc=True).year.to_numpy()
    return regions, years


def _info(wd, data_dir: Path, splits: dict[str, Split], frac: float | None, seed: int, **extra) -> dict:
    wilds = import_wilds()
    return {
        "source": "wilds", "wilds_version": getattr(wilds, "__version__", "unknown"),
        "dataset_version": str(wd.version), "data_dir": str(data_dir.resolve()),
        "n_classes": int(wd.n_classes), "sizes": {n: len(s) for n, s in splits.items()},
        "frac": frac, "seed": seed, **extra,
    }
