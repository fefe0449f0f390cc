"""The JSON sidecar next to every rftlib checkpoint: where it lives, how it is read, written and checked.

``<name>.json`` sits next to ``<name>.safetensors`` and records what is needed to rebuild and check
the weights (architecture, pretrained tag, QuickGELU, class names, method and its config; see
:func:`rftlib.models.save_checkpoint` for the fields). Two modules need it: :mod:`.checkpoint`
writes one with every checkpoint and reads it back, and :mod:`.loading` reads it to refuse a local
weights file saved for another architecture. This module imports neither of them, so neither
imports the other to reach the sidecar.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomically

FORMAT = "rftlib-checkpoint/1"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not match what the caller expected; the message names the field."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file (weights, sidecar, training state, ``latest.json``) is empty, truncated or
    not what its name says; the message names the file and what to do about it."""


def sidecar_path(path: str | os.PathLike) -> Path:
    """The sidecar of the weights file ``path``: the same name with a ``.json`` suffix."""
    return Path(path).with_suffix(".json")


def read_sidecar(path: str | os.PathLike) -> dict:
    """The sidecar of the weights file ``path``.

    Raises:
        FileNotFoundError: there is none (every rftlib checkpoint has one).
        CorruptCheckpointError: it is empty, truncated or not a JSON object (the message names it).
    """
    side = sidecar_path(path)
    if not side.exists():
        raise FileNotFoundError(f"checkpoint sidecar {side} is missing (every rftlib checkpoint has one)")
    try:
        fields = json.loads(side.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        what = "empty" if side.stat().st_size == 0 else f"not valid JSON ({err})"
        raise CorruptCheckpointError(f"checkpoint sidecar {side} is {what}; {damaged_checkpoint_hint(path)}") from err
    if not isinstance(fields, dict):
        raise CorruptCheckpointError(f"checkpoint sidecar {side} holds a JSON {type(fields).__name__}, not an "
                                     f"object; {damaged_checkpoint_hint(path)}")
    return fields


def damaged_checkpoint_hint(path: str | os.PathLike) -> str:
    """What to do about a damaged checkpoint ``path`` (weights or sidecar): the end of the error
    messages that name it."""
    weights = Path(path).with_suffix(".safetensors")
    return (f"restore {weights.name} from a copy or write it again; in a run folder, delete {weights.name} "
            f"and {sidecar_path(weights).name} (a resume then names the previous checkpoint to continue "
            f"from), or delete the folder {weights.parent} to start over")


def find_sidecar(path: str | os.PathLike) -> dict | None:
    """The sidecar of ``path`` if it has one (an rftlib checkpoint), else ``None`` (plain weights)."""
    return read_sidecar(path) if sidecar_path(path).exists() else None


def write_sidecar(path: str | os.PathLike, fields: dict[str, Any]) -> Path:
    """Write ``fields`` (plus the ``format`` tag) as the sidecar of ``path``, atomically.

    Values JSON cannot hold are written as their ``str``. Returns the sidecar's path.
    """
    text = json.dumps({"format": FORMAT, **fields}, indent=2, default=str)
    return write_text_atomically(sidecar_path(path), text)


def check_sidecar(sidecar: dict, *, path: str | os.PathLike = "checkpoint", **expected: Any) -> None:
    """Compare sidecar fields with ``expected`` values.

    Raises:
        CheckpointMismatchError: naming the first field that differs (and, for lists such as the
            class names, the first entry that differs).
    """
    for key, want in expected.items():
        have = sidecar.get(key)
        if have != want:
            detail = _list_difference(have, want) if isinstance(want, list) else f"{have!r} != {want!r}"
            raise CheckpointMismatchError(f"{path}: field {key!r} differs: checkpoint has {detail}")


def _list_difference(have, want: list) -> str:
    if not isinstance(have, list):
        return f"{have!r}, expected a list of {len(want)}"
    if len(have) != len(want):
        return f"{len(have)} entries, expected {len(want)}"
    i = next(i for i, (a, b) in enumerate(zip(have, want)) if a != b)
    return f"entry {i} = {have[i]!r}, expected {want[i]!r}"
