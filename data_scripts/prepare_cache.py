#!/usr/bin/env python
"""Resize a dataset's training images once, into shards that stream faster than the original JPEGs.

Optional: training reads the original files by default. A prepared copy stores every image with
its shorter side at ``--short-side`` (256 for 224-px models), re-encoded as JPEG (small) or as raw
``uint8`` (no decoding at all, about 10x larger), in shards of ``--shard-size`` images, written by
``--workers`` processes. Run it again after an interruption and it keeps every complete shard.

    python data_scripts/prepare_cache.py iwildcam --root data
    python data_scripts/prepare_cache.py imagenet --root data --short-side 256 --workers 16
    python data_scripts/prepare_cache.py folder --root my_data --format raw --out /fast/disk/my_data-256

then train from it (the command prints the flag):

    python -m rftlib.train --method flyp --dataset iwildcam --data-root data --prepared <folder> ...

What changes (see ``rftlib/data/prepared.py``): crops are cut from the 256-px copy, not from the
original (the same fraction of the picture, resampled from fewer pixels), and JPEG adds one more
lossy encode. Evaluation always reads the original files (decoded once into the evaluation cache).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    import rftlib  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rftlib.cli import parse_override
from rftlib.data import FileImages, get_dataset, list_datasets
from rftlib.data.loading import available_cpus
from rftlib.data.prepared import FORMATS, PrepareSettings, paths_digest, prepare


def default_folder(dataset: str, split: str, paths: tuple[str, ...], settings: PrepareSettings) -> Path:
    """``$RFT_CACHE_DIR/prepared/<dataset>-<split>-<side>-<format>-<digest>``."""
    from rftlib.data.disk_cache import decoded_cache_dir

    name = f"{dataset}-{split}-{settings.short_side}-{settings.format}-{paths_digest(paths)[:12]}"
    return decoded_cache_dir().parent / "prepared" / name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=list_datasets())
    parser.add_argument("--root", default=None, help="data root (default: $RFT_DATA_ROOT or ./data)")
    parser.add_argument("--data-option", nargs="*", default=[], metavar="KEY=VALUE", type=parse_override,
                        help="dataset options")
    parser.add_argument("--split", default="train")
    parser.add_argument("--short-side", type=int, default=256)
    parser.add_argument("--format", choices=FORMATS, default="jpeg")
    parser.add_argument("--quality", type=int, default=95)
    parser.add_argument("--shard-size", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=max(1, available_cpus() - 1))
    parser.add_argument("--out", default=None, help="output folder (default: under $RFT_CACHE_DIR/prepared)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = dict(args.data_option)
    split = get_dataset(args.dataset, root=args.root, **options).split(args.split)
    if not isinstance(split.images, FileImages):
        print(f"{args.dataset}'s {args.split} split is held in memory already; there is nothing to prepare")
        return 1
    settings = PrepareSettings(args.short_side, args.format, args.quality, args.shard_size)
    folder = Path(args.out) if args.out else default_folder(args.dataset, args.split, split.images.paths, settings)
    prepare(split, folder, settings, workers=args.workers, progress_mode="text")
    print(f"prepared {len(split)} images in {folder}\ntrain from it with: --prepared {folder}  "
          f"(Python: LoaderSettings(prepared={str(folder)!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
