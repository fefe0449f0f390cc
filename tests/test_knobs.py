"""Every declared knob is validated once, where it is defined: in each method config that has it
(as ``<knob>`` or the sweep list ``<knob>s``), and by the notebooks' setup, with one message."""

from __future__ import annotations

import dataclasses

import pytest

from rftlib import knobs, notebook
from rftlib.knobs import KNOBS
from rftlib.methods import get_config, get_method, list_methods


def _knob_fields() -> list[tuple[str, str, str]]:
    """(method, field, knob) for every config field named after a declared knob."""
    found = []
    for method in list_methods():
        for f in dataclasses.fields(get_method(method).Config):
            for knob in KNOBS:
                if f.name in (knob, f"{knob}s"):
                    found.append((method, f.name, knob))
    return found


def test_every_knob_is_used_by_some_method():
    assert {knob for _, _, knob in _knob_fields()} == set(KNOBS)


@pytest.mark.parametrize("method, field, knob", _knob_fields(), ids=lambda v: str(v))
def test_method_configs_refuse_out_of_range_knobs(method, field, knob):
    declared = KNOBS.get(knob)
    good = (declared.low + declared.high) / 2
    value = good if field == knob else [declared.low, good]
    assert getattr(get_config(method, "synthwild", {field: value}), field) == pytest.approx(
        value if field == knob else tuple(value))
    for bad in (declared.high + 0.5, float("nan"), "half", True):
        with pytest.raises(ValueError, match=knob):
            get_config(method, "synthwild", {field: bad if field == knob else [good, bad]})


@pytest.mark.parametrize("knob", list(KNOBS))
def test_notebook_setup_checks_knobs_with_the_same_rule(knob):
    high = KNOBS.get(knob).high
    assert notebook.setup(**{knob: high}).knobs == {knob: high}
    with pytest.raises(notebook.ParameterError, match=f"{knob}={high + 1}"):
        notebook.setup(**{knob: high + 1})
    with pytest.raises(ValueError, match="must be a number"):
        knobs.check(knob, None)
