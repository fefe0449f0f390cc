"""ImageNet (ID) with its standard distribution shifts (OOD), from ImageFolder-style directories.

Expected layout under the data root (only ``imagenet/val`` is required)::

    <root>/imagenet/val/<wnid>/*.JPEG        -> split "id_test"          (role id, 50,000 images)
    <root>/imagenet/train/<wnid>/*.JPEG      -> split "train"            (when present)
    <root>/imagenet-v2/<class>/*.jpeg        -> split "imagenet-v2"      (role ood; <class> is the
                                                class index 0..999 as ImageNetV2 ships it, or a wnid)
    <root>/imagenet-sketch/<wnid>/*.JPEG     -> split "imagenet-sketch"  (role ood)
    <root>/imagenet-r/<wnid>/*.jpg           -> split "imagenet-r"       (role ood, 200 classes)
    <root>/imagenet-a/<wnid>/*.jpg           -> split "imagenet-a"       (role ood, 200 classes)
    <root>/objectnet-1.0/images/<folder>/*.png
    <root>/objectnet-1.0/mappings/...        -> split "objectnet"        (role ood, 113 classes; the
                                                official zip's layout, or the same under objectnet/)

``wnid`` is the WordNet synset id of a class (``n01440764`` = tench). Labels are always ImageNet
indices 0..999 in the canonical order (the sorted wnids, which is also what torchvision's
``ImageFolder`` produces on the full train or val folder); ``rftlib/data/files/imagenet_wnids.txt``
lists them, so a folder holding only some classes still gets the right indices.

ImageNet-R and ImageNet-A cover 200 of the 1000 classes. The model keeps its 1000-way head, and,
as in WiSE-FT, the logits are restricted to those 200 classes before the arg-max. The 200 indices
per split are in ``dataset.info["logit_projection"]``, and :func:`project_logits` applies them; the
evaluation code must call it before taking predictions (labels stay ImageNet indices). The two
class lists (``imagenet_r_wnids.txt``, ``imagenet_a_wnids.txt``) are the official ones of the
ImageNet-R / ImageNet-A releases.

ObjectNet (:mod:`rftlib.data.objectnet`) keeps the 113 of its classes that its own mapping files
map to ImageNet (some to several ImageNet classes: ``Chair`` is barber, folding and rocking chair).
Its labels are ObjectNet labels ``0..112`` (sorted folder names), not ImageNet indices;
``info["objectnet"]`` holds the :class:`~rftlib.data.objectnet.ObjectNetClasses` (folders, names,
ImageNet groups). The same mask applies (``info["logit_projection"]["objectnet"]`` is the union of
the mapped classes), and the metric maps the masked arg-max, an ImageNet index, to its ObjectNet
class, which equals WiSE-FT's max over each class's ImageNet logits followed by the arg-max over
the 113 (``project_logits(..., mode="group")`` gives those (N, 113) logits). Every ObjectNet image
loses a 2-px border before its evaluation view, as in WiSE-FT.

Class names are OpenAI's cleaned ImageNet names and the templates OpenAI's 80 ImageNet prompts
(both as in WiSE-FT, FLYP and open_clip). The metric is top-1 accuracy.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .base import DataNotFoundError, FileImages, RFTDataset, Split
from .objectnet import (
    BORDER,
    OBJECTNET_COLUMN,
    OBJECTNET_FOLDERS,
    OBJECTNET_SPLIT,
    ObjectNetClasses,
    find_objectnet,
    group_logits,
    read_objectnet_classes,
)
from .textfiles import read_lines, read_templates
from .views import CroppedFileImages

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif")
WNID_PATTERN = re.compile(r"^n\d{8}$")

SHIFT_FOLDERS: dict[str, tuple[str, ...]] = {
    "imagenet-v2": ("imagenet-v2", "imagenetv2-matched-frequency-format-val"),
    "imagenet-sketch": ("imagenet-sketch", "sketch"),
    "imagenet-r": ("imagenet-r",),
    "imagenet-a": ("imagenet-a",),
}
"""Each shift's split name and the folder names accepted for it (the first is the documented one)."""

SUBSET_FILES = {"imagenet-r": "imagenet_r_wnids.txt", "imagenet-a": "imagenet_a_wnids.txt"}
"""Shifts that cover only some classes, and the file listing their wnids."""

DEFAULT_SHIFTS = ("imagenet-v2", "imagenet-sketch", "imagenet-r", "imagenet-a", OBJECTNET_SPLIT)
KNOWN_SHIFTS = (*SHIFT_FOLDERS, OBJECTNET_SPLIT)
"""Every shift :func:`load_imagenet` can look for (ObjectNet has its own layout, not a class folder)."""


# --------------------------------------------------------------------------------------------------
# class lists
# --------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _wnid_index() -> dict[str, int]:
    return {wnid: i for i, wnid in enumerate(read_lines("imagenet_wnids.txt"))}


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids in label order."""
    return read_lines("imagenet_wnids.txt")


def imagenet_classnames() -> list[str]:
    """OpenAI's 1000 cleaned ImageNet class names in label order."""
    return read_lines("imagenet_classnames.txt")


def subset_indices(shift: str) -> list[int]:
    """The ImageNet indices (ascending) of the classes a partial shift covers (R or A: 200)."""
    if shift not in SUBSET_FILES:
        raise KeyError(f"{shift!r} covers all 1000 classes; partial shifts: {', '.join(SUBSET_FILES)}")
    index = _wnid_index()
    return sorted(index[w] for w in read_lines(SUBSET_FILES[shift]))


def folder_label(name: str) -> int:
    """The ImageNet index that a class folder name stands for.

    Args:
        name: a wnid (``n01440764``) or a class index (``"0"`` .. ``"999"``, ImageNetV2's naming).

    Raises:
        ValueError: the name is neither.
    """
    if WNID_PATTERN.match(name):
        index = _wnid_index()
        if name not in index:
            raise ValueError(f"class folder {name!r} is a wnid but not one of the 1000 ImageNet-1k classes")
        return index[name]
    if name.isdigit() and 0 <= int(name) < 1000:
        return int(name)
    raise ValueError(f"class folder {name!r} is neither an ImageNet wnid (n########) nor an index 0..999")


# --------------------------------------------------------------------------------------------------
# scanning folders
# --------------------------------------------------------------------------------------------------
def is_image_file(name: str) -> bool:
    """Whether a file name has an image extension (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(folder: Path) -> list[str]:
    """All image files below ``folder`` (recursively), as sorted absolute paths."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames if is_image_file(f)]
    return sorted(found)


def class_folders(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_image_folder(folder: Path) -> tuple[list[str], np.ndarray]:
    """Image paths and ImageNet labels of an ImageFolder-style directory (``<class>/<image>``).

    Raises:
        ValueError: a class folder has an unrecognised name, or no images were found.
    """
    folder = Path(folder).resolve()
    paths: list[str] = []
    labels: list[int] = []
    for class_dir in class_folders(folder):
        images = list_images(class_dir)
        paths += images
        labels += [folder_label(class_dir.name)] * len(images)
    if not paths:
        raise ValueError(f"no images found in {folder} (expected <class folder>/<image> files)")
    return paths, np.asarray(labels, dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# the loader
# --------------------------------------------------------------------------------------------------
def prepare_command(root: Path) -> str:
    """The command that checks the ImageNet layout and explains how to obtain each part."""
    return f"python data_scripts/prepare_imagenet.py --root {root}"


def find_shift_folder(root: Path, shift: str) -> Path | None:
    """The folder holding ``shift`` under ``root`` (any accepted name), or None."""
    for name in SHIFT_FOLDERS[shift]:
        if (root / name).is_dir():
            return root / name
    return None


def _folder_split(name: str, role: str, folder: Path) -> Split:
    paths, labels = scan_image_folder(folder)
    log.info("imagenet: %s has %d images in %d classes", name, len(paths), len(np.unique(labels)))
    return Split(name, role, FileImages(tuple(paths)), labels, pd.DataFrame())


def _check_subset(split: Split, shift: str) -> None:
    """Refuse a partial shift whose classes fall outside its official 200-class list."""
    outside = sorted(set(np.unique(split.labels).tolist()) - set(subset_indices(shift)))
    if outside:
        wnids = imagenet_wnids()
        raise ValueError(
            f"{shift} holds classes outside its official 200-class list: {[wnids[i] for i in outside[:10]]}"
        )


def load_imagenet(
    root: Path | None = None, *, shifts: Iterable[str] = DEFAULT_SHIFTS, train: bool | None = None,
) -> RFTDataset:
    """ImageNet val (ID) plus whichever of the requested shifts are present (OOD).

    Args:
        root: the data root holding ``imagenet/`` and the shift folders (see the module docstring);
            default :func:`rftlib.data.default_data_root`.
        shifts: which shifts to look for (of :data:`KNOWN_SHIFTS`); missing ones are skipped with
            a log message.
        train: load ``imagenet/train`` as the ``train`` split (1.28M file paths); ``None`` (default):
            when it is there. Without it, asking for the train split (any training method) fails
            with the command that prepares it.

    Returns:
        A dataset whose ``info["logit_projection"]`` maps each partial split (ImageNet-R/A,
        ObjectNet) to the ImageNet indices it covers, and, with ObjectNet, whose
        ``info["objectnet"]`` is its :class:`~rftlib.data.objectnet.ObjectNetClasses`.

    Raises:
        DataNotFoundError: ``imagenet/val`` (or ``imagenet/train`` with ``train=True``) is missing,
            or ObjectNet is there without its images or a mapping file.
        ValueError: an unknown shift name, a folder with unrecognised class names, or a malformed
            ObjectNet mapping file.
    """
    from . import default_data_root

    root = Path(root) if root is not None else default_data_root()
    shifts = [shifts] if isinstance(shifts, str) else list(shifts)
    unknown = [s for s in shifts if s not in KNOWN_SHIFTS]
    if unknown:
        raise ValueError(f"unknown ImageNet shift(s) {unknown}; valid: {', '.join(KNOWN_SHIFTS)}")
    splits, missing = {}, {}
    if train or (train is None and (root / "imagenet" / "train").is_dir()):
        splits["train"] = _folder_split("train", "train", _required(root, "train"))
    else:
        missing["train"] = _missing_message(root, "train")
    splits["id_test"] = _folder_split("id_test", "id", _required(root, "val"))
    projection, info = {}, {}
    for shift in shifts:
        if shift == OBJECTNET_SPLIT:
            found = _objectnet(root)
            if found is not None:
                splits[shift], info["objectnet"] = found
                projection[shift] = info["objectnet"].covered()
                info["logit_groups"] = {shift: info["objectnet"].imagenet}
            continue
        folder = find_shift_folder(root, shift)
        if folder is None:
            log.info("imagenet: shift %s not found under %s (looked for %s); skipping",
                     shift, root, " or ".join(SHIFT_FOLDERS[shift]))
            continue
        splits[shift] = _folder_split(shift, "ood", folder)
        if shift in SUBSET_FILES:
            _check_subset(splits[shift], shift)
            projection[shift] = subset_indices(shift)
    metric = imagenet_metric
    if "objectnet" in info:  # ObjectNet's labels are its own: the metric maps ImageNet predictions to them
        metric = functools.partial(imagenet_metric, objectnet=info["objectnet"])
    return RFTDataset(
        name="imagenet", classnames=imagenet_classnames(), templates=list(read_templates("imagenet")),
        splits=splits, metric_fn=metric, primary_metric={"id": "accuracy", "ood": "accuracy"},
        root=root, info={"logit_projection": projection, "sizes": {n: len(s) for n, s in splits.items()},
                         "missing_splits": missing, **info},
    )


def _objectnet(root: Path) -> tuple[Split, ObjectNetClasses] | None:
    """The ``objectnet`` split and its classes, or None (logged) when ObjectNet is not under ``root``."""
    folder = find_objectnet(root)
    if folder is None:
        log.info("imagenet: shift objectnet not found under %s (looked for %s); skipping",
                 root, " or ".join(OBJECTNET_FOLDERS))
        return None
    classes = read_objectnet_classes(folder, prepare_command(root))
    return objectnet_split(folder, classes, prepare_command(root)), classes


def objectnet_split(folder: Path, classes: ObjectNetClasses, prepare: str) -> Split:
    """The ``objectnet`` split: images of the mapped classes under ``<folder>/images/<folder name>/``.

    Labels are ObjectNet labels (``classes.label_of``); the metadata column ``objectnet_class``
    names each image's ObjectNet class; images of unmapped classes are left out (counted in the
    log), and every image loses a :data:`~rftlib.data.objectnet.BORDER`-pixel border when decoded.

    Args:
        folder: the unpacked release (``<root>/objectnet-1.0``).
        classes: its classes (:func:`~rftlib.data.objectnet.read_objectnet_classes`).
        prepare: the command that checks the layout, named in errors.

    Raises:
        DataNotFoundError: no ``images/`` folder, or no image of a mapped class in it.
    """
    images_dir = Path(folder).resolve() / "images"
    if not images_dir.is_dir():
        raise DataNotFoundError(f"ObjectNet images not found: expected {images_dir}/<class folder>/<image>, as "
                                f"objectnet-1.0.zip unpacks; run\n    {prepare}\nto see how to obtain it.")
    paths: list[str] = []
    labels: list[int] = []
    dropped = 0
    for class_dir in class_folders(images_dir):
        images = list_images(class_dir)
        label = classes.label_of.get(class_dir.name)
        if label is None:
            dropped += len(images)
            continue
        paths += images
        labels += [label] * len(images)
    if not paths:
        raise DataNotFoundError(f"no image of the {len(classes)} ObjectNet classes that map to ImageNet found in "
                                f"{images_dir}; run\n    {prepare}\nto check the layout.")
    log.info("imagenet: objectnet has %d images in %d of its %d ImageNet classes (%d images of other classes left "
             "out)", len(paths), len(set(labels)), len(classes), dropped)
    names = np.asarray(classes.names, dtype=object)[labels]
    return Split(OBJECTNET_SPLIT, "ood", CroppedFileImages(tuple(paths), border=BORDER), np.asarray(labels),
                 pd.DataFrame({OBJECTNET_COLUMN: names}))


def _required(root: Path, part: str) -> Path:
    folder = root / "imagenet" / part
    if not folder.is_dir():
        raise DataNotFoundError(_missing_message(root, part))
    return folder


def _missing_message(root: Path, part: str) -> str:
    return (f"ImageNet {part} not found: expected {root / 'imagenet' / part}/<wnid>/<image> folders.\n"
            f"ImageNet cannot be downloaded automatically; run\n    {prepare_command(root)}\n"
            "to see what is present and how to obtain each part.")


def imagenet_metric(y_true: np.ndarray, y_pred: np.ndarray, metadata: pd.DataFrame, *,
                    objectnet: ObjectNetClasses | None = None) -> dict:
    """Top-1 accuracy. Predictions are ImageNet indices on every split; so are the labels, except
    on ObjectNet (its metadata has an ``objectnet_class`` column), whose labels are ObjectNet labels:
    there each prediction is first mapped to the ObjectNet class it belongs to (``-1``, wrong, for
    an ImageNet class outside the 113; the mask of :func:`project_logits` rules those out).

    Args:
        objectnet: the ObjectNet classes (the dataset's ``info["objectnet"]``); required on ObjectNet.
    """
    from ..metrics import accuracy

    if OBJECTNET_COLUMN in metadata.columns:
        y_pred = objectnet_predictions(y_pred, objectnet)
    return {"accuracy": accuracy(y_true, y_pred)}


def objectnet_predictions(y_pred: np.ndarray, objectnet: ObjectNetClasses | None) -> np.ndarray:
    """ImageNet-index predictions -> ObjectNet labels (``-1`` for classes outside ObjectNet's 113).

    Raises:
        ValueError: no ObjectNet classes given, or a prediction is not an ImageNet index.
    """
    if objectnet is None:
        raise ValueError("these are ObjectNet rows (metadata column 'objectnet_class') but the metric was not given "
                         "the ObjectNet classes; use the metric of a dataset from load_imagenet, which binds them")
    y_pred = np.asarray(y_pred, dtype=np.int64)
    table = objectnet.to_objectnet()
    if y_pred.size and (y_pred.min() < 0 or y_pred.max() >= len(table)):
        raise ValueError(f"ObjectNet predictions must be ImageNet indices 0..{len(table) - 1} (the arg-max of "
                         "1000-way logits), not ObjectNet labels")
    return table[y_pred]


# --------------------------------------------------------------------------------------------------
# logit projection for the 200-class shifts
# --------------------------------------------------------------------------------------------------
PROJECTION_MODES = ("mask", "select", "group")


def project_logits(dataset: RFTDataset, split_name: str, logits: Any, *, mode: str = "mask") -> Any:
    """Restrict 1000-way logits to the classes that ``split_name`` covers (no-op for other splits).

    Args:
        dataset: a dataset from :func:`load_imagenet` (any dataset without
            ``info["logit_projection"]`` entries is returned unchanged).
        split_name: the split the logits were computed on.
        logits: (N, 1000) numpy array or torch tensor.
        mode: ``"mask"`` (default) keeps the shape and sets every other class to ``-inf``, so
            ``argmax`` directly gives an ImageNet index (which the dataset's metric scores) and a
            softmax is a softmax over the covered classes; ObjectNet's covered classes are every
            ImageNet class mapped to one of its 113. ``"select"`` returns only the covered columns,
            (N, 200) for ImageNet-R/A, column ``j`` being ImageNet class
            ``info["logit_projection"][split][j]``. ``"group"`` (ObjectNet only) returns one column
            per ObjectNet class, the maximum over its ImageNet classes, (N, 113): its arg-max is an
            ObjectNet label, as the split's labels are; masked logits give the same result.

    Returns:
        Logits of the same kind (numpy or torch) as the input.

    Raises:
        ValueError: an unknown mode, ``"group"`` on a split without ObjectNet-style groups, or
            logits that are not 1000-way.
    """
    if mode not in PROJECTION_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, PROJECTION_MODES))}, got {mode!r}")
    indices: Sequence[int] | None = dataset.info.get("logit_projection", {}).get(split_name)
    if mode == "group" and split_name not in dataset.info.get("logit_groups", {}):
        raise ValueError(f"mode='group' is for splits whose labels are groups of ImageNet classes (objectnet); "
                         f"{split_name!r} has none: use mode='mask' or 'select'")
    if indices is None:
        return logits
    if logits.shape[-1] != len(dataset.classnames):
        raise ValueError(f"expected {len(dataset.classnames)} logit columns, got {logits.shape[-1]}")
    if mode == "group":
        return group_logits(logits, dataset.info["logit_groups"][split_name])
    import torch

    if isinstance(logits, torch.Tensor):
        idx = torch.as_tensor(indices, device=logits.device)
        if mode == "select":
            return logits.index_select(-1, idx)
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[idx] = True
        return logits.masked_fill(~keep, float("-inf"))
    array = np.asarray(logits)
    idx = np.asarray(indices)
    if mode == "select":
        return array[..., idx]
    out = np.full_like(array, -np.inf, dtype=np.result_type(array.dtype, np.float32))
    out[..., idx] = array[..., idx]
    return out
