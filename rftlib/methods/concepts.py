"""Concept descriptions for DRM: load them from DRM's released JSON files, mapped to class indices.

DRM (Dual Risk Minimization) prompts CLIP with a short description of each class's *core* visual
features (a "concept description", written by an LLM) instead of a template filled with the class
name. Each class gets one description or a list of them; with a list, the text embeddings of the
descriptions are normalised, averaged and renormalised, exactly like template prompts
(:func:`rftlib.models.encode_class_prompts` accepts ``str | list[str]`` per class).

DRM's released files come in several layouts, all accepted here (from a path or already parsed):

* a JSON object keyed by **label index** (``"0"`` .. ``"K-1"``; iWildCam's ``prompts/iwildcam_cd.json``);
* a JSON object keyed by **class name** (FMoW's and ImageNet's files); names match
  case-insensitively and with ``_`` read as a space (``"airport_hangar"`` == ``"Airport hangar"``);
* a JSON list of ``[classname, description]`` pairs (the first upload of the ImageNet file);
* a plain list with one entry per class, in label order.

Values are a string or a non-empty list of strings per class.

Why not just read the entries in file order, as DRM's evaluation code does? Because that silently
assigns descriptions to the wrong classes as soon as a file is re-sorted (``"10"`` sorts before
``"2"``). Index keys are therefore always mapped by their value, and name keys by name. The one
concession to order: a name-keyed file may spell a few classes differently from the dataset (DRM's
ImageNet file says ``projectile`` and ``sunglass`` where OpenAI's class list says ``missile`` and
``sunglasses``). When the file has exactly one entry per class, every name that does match sits at
its own class's position, and at most 1 % of the classes are left over, the leftovers are paired by
position and a warning names each pair. Anything else is an error that names the classes without a
description.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

log = logging.getLogger(__name__)

ClassPrompts = Union[str, list[str]]
DescriptionSource = Union[str, os.PathLike, Mapping[str, Any], Sequence[Any]]


DESCRIPTIONS_DIR = "drm_concept_descriptions"
"""Folder under a data root holding ``<dataset>_cd.json`` (put there by ``prepare_drm_descriptions.py``)."""


class ConceptDescriptionError(ValueError):
    """A concept-description file does not describe the dataset's classes; the message says which."""


def description_file(root: str | os.PathLike, dataset: str) -> Path:
    """Where a dataset's concept descriptions live: ``<root>/drm_concept_descriptions/<dataset>_cd.json``."""
    return Path(root) / DESCRIPTIONS_DIR / f"{dataset}_cd.json"


def prepare_command(dataset: str, root: str | os.PathLike) -> str:
    """The shell command that puts DRM's released descriptions for ``dataset`` under ``root``."""
    return f"python data_scripts/prepare_drm_descriptions.py {dataset} --root {root} --download"


def normalise_name(name: str) -> str:
    """The form class names are compared in: lower case, ``_`` as a space, single spaces."""
    return " ".join(str(name).replace("_", " ").lower().split())


def load_concept_descriptions(
    source: DescriptionSource, classnames: Sequence[str], *, positional_fallback: bool = True,
) -> list[ClassPrompts]:
    """Concept descriptions for ``classnames``, one entry per class in label order.

    Args:
        source: a path to a JSON file, or the parsed object (dict keyed by label index or class
            name, list of ``[classname, description]`` pairs, or a list in label order).
        classnames: the dataset's class names in label order.
        positional_fallback: allow the few unmatched names of an otherwise name-matched, complete
            and order-consistent file to be paired by position (see the module docstring).

    Returns:
        For each class, its description (``str``) or descriptions (``list[str]``).

    Raises:
        ConceptDescriptionError: a class has no description, a key is not a class, a value is not a
            string / list of strings, or an index key is out of range.
        FileNotFoundError: ``source`` is a path that does not exist.

    Example:
        >>> load_concept_descriptions({"1": "a striped cat", "0": "a plain dog"}, ["dog", "cat"])
        ['a plain dog', 'a striped cat']
    """
    data = _read(source)
    classnames = [str(c) for c in classnames]
    if isinstance(data, Mapping):
        entries = [(str(k), v) for k, v in data.items()]
    elif _is_pair_list(data, classnames):
        entries = [(str(k), v) for k, v in data]
    elif isinstance(data, Sequence) and not isinstance(data, str):
        return _from_plain_list(list(data), classnames)
    else:
        raise ConceptDescriptionError(
            f"concept descriptions must be a JSON object or list, got {type(data).__name__}")
    if entries and all(_is_index(k) for k, _ in entries):
        by_class = _by_index(entries, classnames)
    else:
        by_class = _by_name(entries, classnames, positional_fallback)
    return [_clean_value(by_class[i], classnames[i]) for i in range(len(classnames))]


def _read(source: DescriptionSource) -> Any:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"concept-description file {path} does not exist; pass the path to a DRM "
                                    "JSON file (e.g. prompts/iwildcam_cd.json from vaynexie/DRM) or the parsed object")
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    return source


def _is_pair_list(data: Any, classnames: list[str]) -> bool:
    """``[[classname, description], ...]``: 2-item entries whose first items are mostly class names.

    Checking the names tells this layout apart from a plain label-ordered list whose classes happen
    to have two descriptions each.
    """
    if not isinstance(data, Sequence) or isinstance(data, str) or not data:
        return False
    if not all(isinstance(x, Sequence) and not isinstance(x, str) and len(x) == 2 and isinstance(x[0], str)
               for x in data):
        return False
    known = {normalise_name(c) for c in classnames}
    return 2 * sum(normalise_name(x[0]) in known for x in data) >= len(data)


def _is_index(key: str) -> bool:
    return key.strip().isdigit()


def _from_plain_list(values: list, classnames: list[str]) -> list[ClassPrompts]:
    if len(values) != len(classnames):
        raise ConceptDescriptionError(
            f"a plain list of concept descriptions must have one entry per class in label order: got "
            f"{len(values)} entries for {len(classnames)} classes")
    return [_clean_value(v, c) for v, c in zip(values, classnames)]


def _by_index(entries: list[tuple[str, Any]], classnames: list[str]) -> dict[int, Any]:
    """Map ``"0"``.."K-1"`` keys by their integer value (never by their position in the file)."""
    num_classes = len(classnames)
    by_class: dict[int, Any] = {}
    for key, value in entries:
        index = int(key)
        if index >= num_classes:
            raise ConceptDescriptionError(
                f"concept-description key {key!r} is not a label index of this dataset (labels are "
                f"0..{num_classes - 1}); was the file written for another dataset?")
        if index in by_class:
            raise ConceptDescriptionError(f"label index {index} has two concept-description entries")
        by_class[index] = value
    _raise_if_missing([i for i in range(num_classes) if i not in by_class], classnames)
    return by_class


def _by_name(entries: list[tuple[str, Any]], classnames: list[str], positional_fallback: bool) -> dict[int, Any]:
    """Map name keys to class indices (case-insensitive, ``_`` == space), see the module docstring.

    Class lists can repeat a name (OpenAI's ImageNet names have two ``missile`` and two
    ``sunglasses``), so a key goes to the class of that name at its own position when there is one,
    else to the first class of that name that is still free.
    """
    wanted = [normalise_name(c) for c in classnames]
    by_class: dict[int, Any] = {}
    source: dict[int, int] = {}  # class index -> position of its entry in the file
    same_length = len(entries) == len(classnames)
    for pos, (key, value) in enumerate(entries):
        if same_length and normalise_name(key) == wanted[pos]:
            by_class[pos], source[pos] = value, pos
    free: dict[str, list[int]] = {}
    for i, name in enumerate(wanted):
        if i not in by_class:
            free.setdefault(name, []).append(i)
    unmatched: list[tuple[int, str, Any]] = []  # (position in file, key, value)
    for pos, (key, value) in enumerate(entries):
        if source.get(pos) == pos:
            continue
        candidates = free.get(normalise_name(key))
        if candidates:
            i = candidates.pop(0)
            by_class[i], source[i] = value, pos
        else:
            unmatched.append((pos, key, value))
    missing = [i for i in range(len(classnames)) if i not in by_class]
    if missing and positional_fallback and _order_consistent(len(entries), classnames, source):
        by_class.update(_pair_by_position(unmatched, classnames))
        missing, unmatched = [], []
    if unmatched and not missing:
        names = ", ".join(repr(k) for _, k, _ in unmatched[:10])
        raise ConceptDescriptionError(f"concept-description keys {names} match no class of this dataset (or name a "
                                      "class twice)")
    _raise_if_missing(missing, classnames, [k for _, k, _ in unmatched])
    return by_class


def _order_consistent(num_entries: int, classnames: list[str], source: dict[int, int]) -> bool:
    """One entry per class, every name-matched entry at its own position, at most 1 % of the classes left."""
    if num_entries != len(classnames) or 100 * (len(classnames) - len(source)) > len(classnames):
        return False
    return all(i == pos for i, pos in source.items())


def _pair_by_position(unmatched: list[tuple[int, str, Any]], classnames: list[str]) -> dict[int, Any]:
    pairs = {}
    for pos, key, value in unmatched:
        pairs[pos] = value
        log.warning("concept descriptions: class %d %r has no entry by name; using the entry at the same position, "
                    "keyed %r", pos, classnames[pos], key)
    return pairs


def _raise_if_missing(missing: list[int], classnames: list[str], spare_keys: Sequence[str] = ()) -> None:
    if not missing:
        return
    shown = ", ".join(f"{i} ({classnames[i]!r})" for i in missing[:10])
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    spare = f"; keys that matched no class: {', '.join(map(repr, spare_keys[:10]))}" if spare_keys else ""
    raise ConceptDescriptionError(
        f"no concept description for {len(missing)} class(es): {shown}{more}{spare}. Add them to the file "
        "(keyed by label index or class name), or check that the file belongs to this dataset.")


def _clean_value(value: Any, classname: str) -> ClassPrompts:
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value):
        return [v.strip() for v in value]
    raise ConceptDescriptionError(
        f"the concept description of class {classname!r} must be a non-empty string or list of strings, "
        f"got {value!r}")


__all__ = ["ConceptDescriptionError", "load_concept_descriptions", "normalise_name"]
