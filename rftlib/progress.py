"""One progress helper for the whole library, with modes ``auto``, ``text`` and ``off``.

Library code never prints: it logs through :mod:`logging` and wraps long loops in
:func:`progress`. The mode comes from the ``mode`` argument, else from :func:`set_progress`, else
from the ``RFT_PROGRESS`` environment variable, else ``auto`` (a widget bar in Jupyter, a text bar
in a terminal). Headless runs (papermill, CI) pass ``progress="off"`` or ``"text"``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
MODES = ("auto", "text", "off")
_mode: str | None = None


def _check(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown progress mode {mode!r}; valid modes: {', '.join(MODES)}")
    return mode


def set_progress(mode: str | None) -> None:
    """Set the process-wide default progress mode (``None`` restores the environment default)."""
    global _mode
    _mode = None if mode is None else _check(mode)


def get_progress_mode(mode: str | None = None) -> str:
    if mode is not None:
        return _check(mode)
    if _mode is not None:
        return _mode
    return _check(os.environ.get("RFT_PROGRESS", "auto"))


def progress(
    iterable: Iterable[T], *, total: int | None = None, desc: str = "", mode: str | None = None,
    leave: bool = False,
) -> Iterator[T] | Iterable[T]:
    """Wrap ``iterable`` in a progress bar according to the mode (``off`` returns it unchanged)."""
    mode = get_progress_mode(mode)
    if mode == "off":
        return iterable
    if mode == "text":
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=leave, mininterval=5.0)
    from tqdm.auto import tqdm as auto_tqdm

    return auto_tqdm(iterable, total=total, desc=desc, leave=leave)
