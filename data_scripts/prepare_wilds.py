#!/usr/bin/env python
"""Download, adopt or verify a WILDS dataset (iWildCam v2.0, FMoW v1.1) for rftlib.

rftlib reads WILDS data through the ``wilds`` package, which expects ``<root>/iwildcam_v2.0/``
(or ``<root>/fmow_v1.1/``) holding the metadata tables, the images and a ``RELEASE_v*.txt`` marker.
This script gets such a folder in place and checks it:

    python data_scripts/prepare_wilds.py iwildcam --root data --download
        let WILDS download and extract the archive (about 11 GB for iWildCam, 50 GB for FMoW);
    python data_scripts/prepare_wilds.py iwildcam --root data --adopt ~/Downloads/iwildcam_v2.0
    python data_scripts/prepare_wilds.py iwildcam --root data --adopt ~/Downloads/archive.tar.gz
        use data you obtained yourself: an extracted folder is symlinked into place (``--move``
        moves it instead), an archive is extracted into place;
    python data_scripts/prepare_wilds.py iwildcam --root data
        only verify: required files, metadata columns, a sample of images; print split sizes.

The exit status is 0 when the data is ready and 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tarfile
from pathlib import Path

try:
    import rftlib  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd

from rftlib.data.wilds_data import WILDS_SPECS, WildsSpec, import_wilds

log = logging.getLogger("prepare_wilds")
OUTAGE_HINT = (
    "The WILDS hosting (CodaLab worksheets) has had outages. Download the archive by other means "
    "(a mirror, a colleague's copy) and run this script again with --adopt <folder-or-archive.tar.gz>."
)


class PrepareError(RuntimeError):
    """A step failed; the message says what to do."""


# --------------------------------------------------------------------------------------------------
# locating a dataset folder
# --------------------------------------------------------------------------------------------------
def find_dataset_dir(spec: WildsSpec, start: Path, max_depth: int = 3) -> Path | None:
    """The shallowest folder at or below ``start`` that contains the dataset's metadata table.

    Image folders are not descended into (they hold hundreds of thousands of files).
    """
    level = [start]
    for _ in range(max_depth + 1):
        for folder in level:
            if (folder / spec.metadata_file).is_file():
                return folder
        level = [
            child for folder in level for child in sorted(folder.iterdir())
            if child.is_dir() and child.name != spec.image_dir and not child.name.startswith(".")
        ]
    return None


# --------------------------------------------------------------------------------------------------
# adopting a manual download
# --------------------------------------------------------------------------------------------------
def adopt(spec: WildsSpec, root: Path, source: Path, move: bool = False) -> Path:
    """Put a manually obtained folder or ``.tar.gz`` archive at ``<root>/<name>_v<version>``.

    Args:
        spec: which dataset.
        root: the WILDS root.
        source: an extracted folder (the dataset folder itself or one that contains it) or an
            archive that ``tarfile`` can read.
        move: move a folder instead of symlinking it (archives are always extracted).

    Returns:
        The dataset folder.

    Raises:
        PrepareError: the source does not exist, holds no dataset, or the target is taken.
    """
    source = source.expanduser().resolve()
    target = spec.data_dir(root)
    if not source.exists():
        raise PrepareError(f"{source} does not exist")
    if target.exists() or target.is_symlink():
        if target.resolve() == source or target.resolve() == find_dataset_dir(spec, source):
            log.info("%s already points to %s", target, source)
            return _ensure_release(spec, target)
        raise PrepareError(f"{target} already exists; remove it or pick another --root")
    root.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        _adopt_folder(spec, source, target, move)
    elif tarfile.is_tarfile(source):
        _adopt_archive(spec, source, target)
    else:
        raise PrepareError(f"{source} is neither a folder nor a tar archive")
    return _ensure_release(spec, target)


def _adopt_folder(spec: WildsSpec, source: Path, target: Path, move: bool) -> None:
    found = find_dataset_dir(spec, source)
    if found is None:
        raise PrepareError(f"no {spec.metadata_file} found in {source} (searched 3 levels deep)")
    if move:
        log.info("moving %s -> %s", found, target)
        shutil.move(str(found), str(target))
    else:
        log.info("linking %s -> %s", target, found)
        target.symlink_to(found, target_is_directory=True)


def _adopt_archive(spec: WildsSpec, archive: Path, target: Path) -> None:
    staging = target.parent / f".{target.name}.extracting"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    log.info("extracting %s into %s (this can take a while)", archive, staging)
    try:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):  # refuses absolute paths and links out of the tree
                tar.extractall(staging, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tar.extractall(staging)
        found = find_dataset_dir(spec, staging)
        if found is None:
            raise PrepareError(f"the archive {archive} contains no {spec.metadata_file}")
        shutil.move(str(found), str(target))
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _ensure_release(spec: WildsSpec, data_dir: Path) -> Path:
    """Write the ``RELEASE_v*.txt`` marker WILDS checks for, if it is missing."""
    marker = data_dir / spec.release_file
    if not marker.exists():
        marker.write_text(f"{spec.dir_name} adopted by rftlib's prepare_wilds.py\n")
        log.info("created %s", marker)
    return data_dir


# --------------------------------------------------------------------------------------------------
# downloading
# --------------------------------------------------------------------------------------------------
def download(spec: WildsSpec, root: Path) -> None:
    """Let WILDS download and extract the dataset into ``root``.

    Raises:
        PrepareError: the download failed (the message suggests ``--adopt``).
    """
    wilds = import_wilds()
    root.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (about %g GB) into %s", spec.dir_name, spec.size_gb, root)
    try:
        wilds.get_dataset(spec.name, root_dir=str(root), download=True)
    except Exception as err:  # noqa: BLE001 - any failure gets the same advice
        raise PrepareError(f"downloading {spec.name} failed: {err}\n{OUTAGE_HINT}") from err


# --------------------------------------------------------------------------------------------------
# verifying
# --------------------------------------------------------------------------------------------------
def verify(spec: WildsSpec, root: Path, sample: int = 20) -> list[str]:
    """Check a dataset folder; returns a list of problems (empty when everything is in place).

    Checks: the folder and its ``RELEASE`` marker exist, the required files exist, the metadata
    table has the columns WILDS reads, and ``sample`` evenly spaced images exist.
    """
    data_dir = spec.data_dir(root)
    if not data_dir.is_dir():
        return [f"{data_dir} does not exist"]
    problems = [f"missing {data_dir / name}" for name in (spec.release_file, *spec.required_files)
                if not (data_dir / name).is_file()]
    if not (data_dir / spec.metadata_file).is_file():
        return problems
    metadata = pd.read_csv(data_dir / spec.metadata_file)
    absent = [c for c in spec.required_columns if c not in metadata.columns]
    if absent:
        return [*problems, f"{spec.metadata_file} lacks column(s) {absent}; it has {list(metadata.columns)}"]
    rows = np.unique(np.linspace(0, len(metadata) - 1, num=min(sample, len(metadata))).astype(int))
    missing = [p for p in spec.image_paths(data_dir, metadata, rows) if not Path(p).is_file()]
    if missing:
        problems.append(f"{len(missing)} of {len(rows)} sampled images are missing, e.g. {missing[0]}")
    return problems


def split_sizes(spec: WildsSpec, root: Path) -> dict[str, int]:
    """Sizes of the official splits (through ``wilds``); raw ``split`` counts if it is absent."""
    try:
        from rftlib.data import get_dataset

        return {name: len(s) for name, s in get_dataset(spec.name, root=root).splits.items()}
    except ImportError as err:
        log.warning("%s; showing the raw 'split' column instead of WILDS' splits", err)
        metadata = pd.read_csv(spec.data_dir(root) / spec.metadata_file, usecols=["split"])
        return {str(k): int(v) for k, v in metadata["split"].value_counts().items()}


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(WILDS_SPECS), help="which WILDS dataset")
    parser.add_argument("--root", type=Path, required=True, help="WILDS root (holds <name>_v<version>/)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--download", action="store_true", help="download through the wilds package")
    action.add_argument("--adopt", type=Path, metavar="PATH", help="an extracted folder or a .tar.gz")
    parser.add_argument("--move", action="store_true", help="with --adopt FOLDER: move it instead of linking")
    parser.add_argument("--sample", type=int, default=20, help="how many images to check exist")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = parse_args(argv)
    spec = WILDS_SPECS[args.dataset]
    root = args.root.expanduser()
    try:
        if args.download:
            download(spec, root)
        elif args.adopt is not None:
            adopt(spec, root, args.adopt, move=args.move)
    except PrepareError as err:
        log.error("%s", err)
        return 1
    problems = verify(spec, root, sample=args.sample)
    if problems:
        log.error("%s is not ready:\n  %s", spec.data_dir(root), "\n  ".join(problems))
        log.error("get it with --download, or --adopt <folder-or-archive.tar.gz> for a manual download")
        return 1
    sizes = split_sizes(spec, root)
    log.info("%s is ready. Split sizes: %s", spec.data_dir(root),
             ", ".join(f"{name} {n:,}" for name, n in sizes.items()))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
