#!/usr/bin/env python
"""Check the ImageNet layout rftlib expects and explain how to obtain each missing part.

ImageNet cannot be downloaded automatically (image-net.org requires an account and accepting its
terms), so this script downloads nothing. It reports, for each part, what it found under
``--root`` and, for missing parts, where to get them and how to arrange them:

    <root>/imagenet/val/<wnid>/*.JPEG        required (ID evaluation)
    <root>/imagenet/train/<wnid>/*.JPEG      optional (fine-tuning on ImageNet)
    <root>/imagenet-v2/<0..999>/*.jpeg       optional shift
    <root>/imagenet-sketch/<wnid>/*.JPEG     optional shift
    <root>/imagenet-r/<wnid>/*.jpg           optional shift (200 classes)
    <root>/imagenet-a/<wnid>/*.jpg           optional shift (200 classes)
    <root>/objectnet-1.0/images/<folder>/*.png and objectnet-1.0/mappings/
                                             optional shift (113 of its 313 classes map to ImageNet)

Usage: ``python data_scripts/prepare_imagenet.py --root data``. Exit status 0 when
``imagenet/val`` is usable, 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    import rftlib  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rftlib.data.base import DataNotFoundError
from rftlib.data.imagenet import (
    SHIFT_FOLDERS,
    class_folders,
    folder_label,
    is_image_file,
    list_images,
    prepare_command,
)
from rftlib.data.objectnet import OBJECTNET_FOLDERS, find_objectnet, read_objectnet_classes

log = logging.getLogger("prepare_imagenet")


@dataclass(frozen=True)
class Part:
    """One expected folder: where it goes, what a complete copy holds, how to get it."""

    name: str
    folders: tuple[str, ...]
    classes: int
    images: int
    how_to_get: str
    required: bool = False
    count_images: bool = True


PARTS = (
    Part("ImageNet val", ("imagenet/val",), 1000, 50_000, required=True, how_to_get=(
        "download ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz from https://image-net.org "
        "(account required) into <root>/imagenet, then run\n"
        "    python -c \"import torchvision as tv; tv.datasets.ImageNet('<root>/imagenet', split='val')\"\n"
        "which sorts the 50,000 images into val/<wnid>/ folders.")),
    Part("ImageNet train", ("imagenet/train",), 1000, 1_281_167, count_images=False, how_to_get=(
        "as for val, with ILSVRC2012_img_train.tar and split='train' (about 140 GB); only needed "
        "to fine-tune on ImageNet (training methods load it whenever it is present).")),
    Part("ImageNet-V2", SHIFT_FOLDERS["imagenet-v2"], 1000, 10_000, how_to_get=(
        "get imagenetv2-matched-frequency.tar.gz (the ImageNetV2 release, e.g. the Hugging Face "
        "dataset vaishaal/ImageNetV2), extract it and rename the folder to <root>/imagenet-v2.")),
    Part("ImageNet-Sketch", SHIFT_FOLDERS["imagenet-sketch"], 1000, 50_889, how_to_get=(
        "get ImageNet-Sketch (https://github.com/HaohanWang/ImageNet-Sketch), extract it and rename "
        "its sketch/ folder to <root>/imagenet-sketch.")),
    Part("ImageNet-R", SHIFT_FOLDERS["imagenet-r"], 200, 30_000, how_to_get=(
        "download https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar and extract it in <root>.")),
    Part("ImageNet-A", SHIFT_FOLDERS["imagenet-a"], 200, 7_500, how_to_get=(
        "download https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar and extract it in <root>.")),
)


OBJECTNET_CLASSES, OBJECTNET_IMAGES = 113, 18_574  # in the full release: mapped classes, their images
OBJECTNET_HOW_TO_GET = (
    "ObjectNet cannot be downloaded automatically: read and accept its licence at https://objectnet.dev "
    "(test use only: never train or tune on it), download objectnet-1.0.zip from its download page and "
    "unzip it in <root> (the download page gives the archive's password), which makes\n"
    "    <root>/objectnet-1.0/images/<folder>/*.png  and  <root>/objectnet-1.0/mappings/\n"
    "Keep the four files of mappings/: rftlib reads the 113 ImageNet classes from them.")


def inspect(part: Part, root: Path) -> tuple[bool, str]:
    """Whether ``part`` is usable under ``root``, and a one-paragraph report about it."""
    folder = next((root / f for f in part.folders if (root / f).is_dir()), None)
    if folder is None:
        where = " or ".join(str(root / f) for f in part.folders)
        return False, f"MISSING  {part.name}: no {where}\n    how to get it: {_indent(part.how_to_get)}"
    classes = class_folders(folder)
    bad = [c.name for c in classes if not _valid_class_name(c.name)]
    loose = [p.name for p in folder.iterdir() if p.is_file() and is_image_file(p.name)]
    problems = []
    if loose:
        problems.append(f"{len(loose)} images lie directly in {folder}; they must be in <wnid>/ sub-folders")
    if bad:
        problems.append(f"unrecognised class folders (not wnids or 0..999): {bad[:5]}")
    if not classes:
        problems.append("no class folders")
    summary = f"{len(classes)}/{part.classes} class folders"
    if part.count_images and classes and not bad:
        n_images = sum(len(list_images(c)) for c in classes)
        summary += f", {n_images:,}/{part.images:,} images"
        if n_images == 0:
            problems.append("no image files")
    status = "PROBLEM " if problems else ("OK      " if len(classes) == part.classes else "PARTIAL ")
    text = f"{status} {part.name}: {folder} ({summary})"
    for problem in problems:
        text += f"\n    {problem}\n    how to get it: {_indent(part.how_to_get)}"
    return not problems, text


def inspect_objectnet(root: Path) -> tuple[bool, str]:
    """Whether ObjectNet is usable under ``root`` (its mapping files parse, some mapped class has
    images), and a one-paragraph report about it."""
    folder = find_objectnet(root)
    if folder is None:
        where = " or ".join(str(root / f) for f in OBJECTNET_FOLDERS)
        return False, f"MISSING  ObjectNet: no {where}\n    how to get it: {_indent(OBJECTNET_HOW_TO_GET)}"
    try:
        classes = read_objectnet_classes(folder, prepare_command(root))
    except (DataNotFoundError, ValueError) as err:
        return False, (f"PROBLEM  ObjectNet: {folder}\n    {_indent(str(err))}\n"
                       f"    how to get it: {_indent(OBJECTNET_HOW_TO_GET)}")
    images = folder / "images"
    present = {c.name: c for c in class_folders(images)} if images.is_dir() else {}
    mapped = [present[f] for f in classes.folders if f in present]
    n_images = sum(len(list_images(c)) for c in mapped)
    summary = (f"{len(mapped)}/{OBJECTNET_CLASSES} mapped classes, {n_images:,}/{OBJECTNET_IMAGES:,} images of "
               f"them; {len(present) - len(mapped)} other class folders are left out")
    if n_images == 0:
        return False, (f"PROBLEM  ObjectNet: {folder} ({summary})\n    no image of a mapped class in {images}\n"
                       f"    how to get it: {_indent(OBJECTNET_HOW_TO_GET)}")
    status = "OK      " if len(mapped) == OBJECTNET_CLASSES and n_images == OBJECTNET_IMAGES else "PARTIAL "
    return True, f"{status} ObjectNet: {folder} ({summary})"


def _indent(text: str) -> str:
    """Indent the continuation lines of a multi-line hint under the report line."""
    return text.replace("\n", "\n      ")


def _valid_class_name(name: str) -> bool:
    try:
        folder_label(name)
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="data root holding imagenet/ and the shifts")
    args = parser.parse_args(argv)
    root = args.root.expanduser()
    ready = True
    for part in PARTS:
        ok, text = inspect(part, root)
        log.info("%s", text)
        ready &= ok or not part.required
    log.info("%s", inspect_objectnet(root)[1])  # optional, like the other shifts
    if not ready:
        log.error("ImageNet val is not usable yet; rftlib's 'imagenet' dataset needs it.")
        return 1
    log.info("ImageNet val is usable; missing shifts are simply skipped when loading.")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
