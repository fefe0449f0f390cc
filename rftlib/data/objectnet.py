"""ObjectNet as an ImageNet shift: its 113 ImageNet classes, read from the mapping files it ships.

ObjectNet (Barbu et al., NeurIPS 2019, https://objectnet.dev) photographs 313 kinds of household
objects at random rotations, viewpoints and backgrounds. The official release unpacks to::

    objectnet-1.0/images/<folder>/*.png      313 class folders (``alarm_clock``, ``chair``, ...)
    objectnet-1.0/mappings/folder_to_objectnet_label.json
                                             folder name -> ObjectNet label ("alarm_clock" -> "Alarm clock")
    objectnet-1.0/mappings/objectnet_to_imagenet_1k.json
                                             ObjectNet label -> the ImageNet classes it corresponds to,
                                             one string joined by "; " ("analog clock; digital clock")
    objectnet-1.0/mappings/pytorch_to_imagenet_2012_id.json
                                             PyTorch ImageNet index ("0".."999") -> ILSVRC2012 id (0..999)
    objectnet-1.0/mappings/imagenet_to_label_2012_v2
                                             text, line i (from 0) = the full name of ILSVRC2012 id i

Only the 113 ObjectNet classes that ``objectnet_to_imagenet_1k.json`` maps to ImageNet-1k are
evaluated; images of the other 200 classes are dropped. This module parses the four files into an
:class:`ObjectNetClasses` (nothing is hard-coded, so a corrected mapping file takes effect as is)
and reduces 1000-way logits to the 113 classes (:func:`group_logits`). Following WiSE-FT's
``src/datasets/objectnet.py`` (which FLYP and Model Soups copy):

* an ObjectNet class's **label** is its position among the mapped folder names in sorted order
  (``0..112`` on the full release), whichever folders are on disk;
* a PyTorch ImageNet index is rftlib's ImageNet index (both are the sorted-wnid order);
* a 1000-way model is scored by taking, for every ObjectNet class, the **maximum logit over the
  ImageNet classes mapped to it**, then the arg-max over the 113 classes;
* every image loses a **2-pixel border** before the usual resize and centre crop (the release
  frames each photo with a 1-px red line; :class:`rftlib.data.views.CroppedFileImages`).

Two deliberate differences from the reference, neither of which changes a number on the official
files: names are split on ``;`` and stripped (the reference splits on ``"; "`` exactly), and a
mapping the reference would silently mis-read is refused with the file to fix: an ImageNet name
that is missing or ambiguous in ``imagenet_to_label_2012_v2`` (``crane`` is there twice), or an
ImageNet class mapped to two ObjectNet classes (the reference's reverse map keeps the last one).

Because the 113 groups are disjoint, the arg-max of the 1000-way logits with every unmapped class
masked to ``-inf`` lies in the group of the best ObjectNet class, so "mask, arg-max, map the
ImageNet index to its ObjectNet class" gives the same predictions as "group max, arg-max over 113"
(up to exact ties). That is how :mod:`rftlib.data.imagenet` scores the ``objectnet`` split with the
same mask as ImageNet-R/A.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .base import DataNotFoundError

OBJECTNET_SPLIT = "objectnet"
"""The split name of ObjectNet in the ImageNet dataset."""
OBJECTNET_FOLDERS = ("objectnet-1.0", "objectnet")
"""Folder names accepted under the data root (the first is what the official zip unpacks to)."""
OBJECTNET_COLUMN = "objectnet_class"
"""The metadata column holding each image's ObjectNet label; it marks a split as ObjectNet."""
BORDER = 2
"""Pixels cut from every side of an ObjectNet image before its evaluation view (as WiSE-FT)."""
IMAGENET_CLASSES = 1000

FOLDER_TO_LABEL = "folder_to_objectnet_label.json"
LABEL_TO_IMAGENET = "objectnet_to_imagenet_1k.json"
PYTORCH_TO_2012 = "pytorch_to_imagenet_2012_id.json"
NAMES_2012 = "imagenet_to_label_2012_v2"
MAPPING_FILES = (FOLDER_TO_LABEL, LABEL_TO_IMAGENET, PYTORCH_TO_2012, NAMES_2012)


@dataclass(frozen=True)
class ObjectNetClasses:
    """The ObjectNet classes that map to ImageNet-1k, in label order.

    Attributes:
        folders: the class folder names, sorted; label ``i`` is ``folders[i]``.
        names: the ObjectNet label of each class (``"Alarm clock"``).
        imagenet: the ImageNet indices (ascending) mapped to each class; disjoint across classes.
    """

    folders: tuple[str, ...]
    names: tuple[str, ...]
    imagenet: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        if not len(self.folders) == len(self.names) == len(self.imagenet):
            raise ValueError("ObjectNetClasses needs one name and one ImageNet group per folder")
        if list(self.folders) != sorted(self.folders):
            raise ValueError("ObjectNetClasses.folders must be sorted (they define the label order)")

    def __len__(self) -> int:
        return len(self.folders)

    @cached_property
    def label_of(self) -> dict[str, int]:
        """Folder name -> label."""
        return {folder: i for i, folder in enumerate(self.folders)}

    def covered(self) -> list[int]:
        """Every ImageNet index mapped to some ObjectNet class, ascending (the mask of the split)."""
        return sorted(i for group in self.imagenet for i in group)

    def to_objectnet(self, num_classes: int = IMAGENET_CLASSES) -> np.ndarray:
        """An array ``a`` of length ``num_classes`` with ``a[imagenet index]`` = its ObjectNet label,
        or ``-1`` for ImageNet classes that no ObjectNet class maps to."""
        table = np.full(num_classes, -1, dtype=np.int64)
        for label, group in enumerate(self.imagenet):
            table[list(group)] = label
        return table


# --------------------------------------------------------------------------------------------------
# finding the release and reading its mapping files
# --------------------------------------------------------------------------------------------------
def find_objectnet(root: Path) -> Path | None:
    """The ObjectNet folder under the data root (``objectnet-1.0/`` or ``objectnet/``), or None."""
    for name in OBJECTNET_FOLDERS:
        if (Path(root) / name).is_dir():
            return Path(root) / name
    return None


def read_objectnet_classes(folder: Path, prepare: str) -> ObjectNetClasses:
    """Parse ``<folder>/mappings/`` into the ObjectNet classes that map to ImageNet-1k.

    Args:
        folder: the unpacked release (``<root>/objectnet-1.0``).
        prepare: the command that checks the layout, named in every error.

    Raises:
        DataNotFoundError: a mapping file is missing.
        ValueError: a mapping file is malformed or inconsistent with another (the message names
            the file and what is wrong).
    """
    mappings = Path(folder) / "mappings"
    folder_to_label = _read_string_map(mappings / FOLDER_TO_LABEL, prepare)
    label_to_names = _read_string_map(mappings / LABEL_TO_IMAGENET, prepare)
    index_of_name = _imagenet_index_of_name(mappings, prepare)
    folder_of_label = _invert_unique(folder_to_label, mappings / FOLDER_TO_LABEL, prepare)
    groups: dict[str, tuple[str, tuple[int, ...]]] = {}
    for label, joined in label_to_names.items():
        if label not in folder_of_label:
            raise _malformed(mappings / LABEL_TO_IMAGENET, f"ObjectNet label {label!r} has no folder in "
                             f"{FOLDER_TO_LABEL}", prepare)
        names = [name.strip() for name in joined.split(";") if name.strip()]
        if not names:
            raise _malformed(mappings / LABEL_TO_IMAGENET, f"ObjectNet label {label!r} maps to no ImageNet class",
                             prepare)
        indices = tuple(sorted(_lookup(index_of_name, name, label, mappings, prepare) for name in names))
        groups[folder_of_label[label]] = (label, indices)
    _check_disjoint(groups, mappings / LABEL_TO_IMAGENET, prepare)
    folders = tuple(sorted(groups))
    return ObjectNetClasses(folders, tuple(groups[f][0] for f in folders), tuple(groups[f][1] for f in folders))


def _read_string_map(path: Path, prepare: str) -> dict[str, str]:
    """A JSON object of strings to strings."""
    data = _read_json(path, prepare)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise _malformed(path, "expected a JSON object of strings to strings", prepare)
    return data


def _read_json(path: Path, prepare: str) -> dict:
    if not path.is_file():
        raise DataNotFoundError(_missing(path, prepare))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _malformed(path, f"not valid JSON ({err})", prepare) from err
    if not isinstance(data, dict) or not data:
        raise _malformed(path, "expected a non-empty JSON object", prepare)
    return data


def _imagenet_index_of_name(mappings: Path, prepare: str) -> dict[str, list[int]]:
    """Full ImageNet class name -> the PyTorch (= rftlib) indices of the classes with that name."""
    path = mappings / PYTORCH_TO_2012
    raw = _read_json(path, prepare)
    try:
        pytorch_to_2012 = {int(k): int(v) for k, v in raw.items()}
    except (TypeError, ValueError) as err:
        raise _malformed(path, f"expected integer keys and values ({err})", prepare) from err
    expected = set(range(IMAGENET_CLASSES))
    if set(pytorch_to_2012) != expected or set(pytorch_to_2012.values()) != expected:
        raise _malformed(path, f"expected a one-to-one map of the indices 0..{IMAGENET_CLASSES - 1}", prepare)
    names_path = mappings / NAMES_2012
    if not names_path.is_file():
        raise DataNotFoundError(_missing(names_path, prepare))
    names = [line.strip() for line in names_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != IMAGENET_CLASSES:
        raise _malformed(names_path, f"expected {IMAGENET_CLASSES} class names, one a line, found {len(names)}",
                         prepare)
    index_of_2012 = {v: k for k, v in pytorch_to_2012.items()}
    index_of_name: dict[str, list[int]] = {}
    for id_2012, name in enumerate(names):
        index_of_name.setdefault(name, []).append(index_of_2012[id_2012])
    return index_of_name


def _lookup(index_of_name: dict[str, list[int]], name: str, label: str, mappings: Path, prepare: str) -> int:
    found = index_of_name.get(name, [])
    if len(found) != 1:
        problem = "is not a line of" if not found else f"names {len(found)} classes in"
        raise _malformed(mappings / LABEL_TO_IMAGENET, f"ImageNet name {name!r} (of ObjectNet label {label!r}) "
                         f"{problem} {NAMES_2012}", prepare)
    return found[0]


def _invert_unique(mapping: dict[str, str], path: Path, prepare: str) -> dict[str, str]:
    inverse = {v: k for k, v in mapping.items()}
    if len(inverse) != len(mapping):
        raise _malformed(path, "two folders share an ObjectNet label", prepare)
    return inverse


def _check_disjoint(groups: dict[str, tuple[str, tuple[int, ...]]], path: Path, prepare: str) -> None:
    owner: dict[int, str] = {}
    for label, indices in groups.values():
        for index in indices:
            if index in owner:
                raise _malformed(path, f"ImageNet class {index} is mapped to both {owner[index]!r} and {label!r}; "
                                 "each ImageNet class may belong to one ObjectNet class", prepare)
            owner[index] = label


def _missing(path: Path, prepare: str) -> str:
    return (f"ObjectNet mapping file {path} is missing. The official release ships it in "
            f"objectnet-1.0/mappings/; unpack the whole objectnet-1.0.zip again, or run\n    {prepare}\n"
            "to see what is present and how to obtain ObjectNet.")


def _malformed(path: Path, problem: str, prepare: str) -> ValueError:
    return ValueError(f"ObjectNet mapping file {path} is malformed: {problem}. Replace it with the file of the "
                      f"official objectnet-1.0.zip; run\n    {prepare}\nto check the layout.")


# --------------------------------------------------------------------------------------------------
# logits
# --------------------------------------------------------------------------------------------------
def group_logits(logits: Any, groups: Sequence[Sequence[int]]) -> Any:
    """Reduce 1000-way logits to one column per group: the maximum over the group's ImageNet classes.

    Args:
        logits: (N, 1000) numpy array or torch tensor; columns outside every group may be anything
            (``-inf`` after :func:`rftlib.data.imagenet.project_logits`' mask).
        groups: the ImageNet indices of each output column (:attr:`ObjectNetClasses.imagenet`).

    Returns:
        (N, len(groups)) of the input's kind and dtype; its arg-max is an ObjectNet label.
    """
    import torch

    if isinstance(logits, torch.Tensor):
        return torch.stack([logits[..., list(group)].amax(dim=-1) for group in groups], dim=-1)
    array = np.asarray(logits)
    return np.stack([array[..., list(group)].max(axis=-1) for group in groups], axis=-1)
