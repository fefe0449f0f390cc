"""Post-hoc knobs: the one-number settings a method's result is read at, declared once.

A knob is what a slider scrubs and what a results row is tagged with (``knobs={"alpha": 0.5}``):
WiSE-FT's mixing ``alpha``, DRM's ``beta``, R-Adapter's re-scaling ``scale``, DPS's
``mask_ratio``. Each is declared here once, with its range and the names of its special values;
method configs validate their fields with :func:`check`, notebooks validate their parameters
with it, and plots label end points with :attr:`Knob.ends`. The results store needs no
declaration at all: it stores any knob name (:mod:`rftlib.results.schema`).

Adding a knob: one :class:`Knob` line in :data:`KNOBS`, and the config field that uses it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .registry import Registry


@dataclass(frozen=True)
class Knob:
    """A knob's declaration.

    Attributes:
        name: the name in configs, results rows, notebooks and plots.
        low, high: the closed range of valid values.
        doc: what the knob does, in one line.
        ends: names of special values (WiSE-FT's 0 is the zero-shot model, 1 the fine-tuned one).
    """

    name: str
    low: float
    high: float
    doc: str
    ends: Mapping[float, str] = field(default_factory=dict)


KNOBS: Registry[Knob] = Registry("knob")
for _knob in (
    Knob("alpha", 0.0, 1.0, "WiSE-FT: weight of the fine-tuned model in the weight-space mix",
         {0.0: "zero-shot", 1.0: "fine-tuned"}),
    Knob("beta", 0.0, 1.0, "DRM: weight of the default-prompt head in the dual-head mix",
         {0.0: "concept descriptions", 1.0: "default prompts"}),
    Knob("scale", 0.0, 1.0, "R-Adapter: re-scaling of the merged adapters", {0.0: "zero-shot", 1.0: "adapted"}),
    Knob("mask_ratio", 0.0, 1.0, "DPS: fraction of eligible parameter rows frozen at their pretrained values",
         {0.0: "plain fine-tuning"}),
):
    KNOBS.register(_knob.name, _knob)


def check(name: str, value: object) -> float:
    """``value`` as a float if it is a valid value of knob ``name``.

    Raises:
        ValueError: naming the knob, its range and the bad value.
    """
    knob = KNOBS.get(name)
    valid = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not valid or not knob.low <= float(value) <= knob.high:
        raise ValueError(f"{name}={value!r} is out of range: {knob.doc}; it must be a number in "
                         f"[{knob.low:g}, {knob.high:g}]")
    return float(value)


def check_all(name: str, values: Iterable[object]) -> tuple[float, ...]:
    """A sweep list of knob ``name`` (the config field ``<name>s``), every value checked with
    :func:`check`; a non-list is an error too."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name}s must be a list of numbers, got {values!r}")
    return tuple(check(name, v) for v in values)
