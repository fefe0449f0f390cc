"""Every training method resumes: a run interrupted after its first epoch's checkpoint and started
again in the same folder ends exactly where an uninterrupted run ends (CPU, tiny model and data).

The methods are the registered ones whose config embeds a ``TrainConfig`` (``method_trains`` in
conftest.py), so a new trainable method is covered without editing this file. The shared loop's
resume is tested with a real SIGKILL in test_train.py; this test checks that each method's own
state (DPS masks, R-Adapter EMA shadow, CRoFT generator, DRM soft labels, the LP-FT probe head, ...)
survives the round trip through its checkpoint.
"""

import pytest
import torch
from safetensors.torch import load_file

from rftlib.methods import run_method

from .conftest import TINY_SCHEDULE, trained_methods
from .helpers import tiny_clip

SCHEDULE = {**TINY_SCHEDULE, "epochs": 2}  # every key is a TrainConfig field, so every trained method takes it


class Interrupted(Exception):
    """Stands in for a crash right after the first epoch's checkpoint was written."""


def interrupt_in_second_epoch(event):
    if event.kind == "step" and event.epoch == 1:
        raise Interrupted


def _run(method, data, out, callbacks=()):
    return run_method(method, data=data, clip=tiny_clip(), out_dir=out, overrides=SCHEDULE, callbacks=callbacks)


@pytest.mark.slow
@pytest.mark.parametrize("method", trained_methods())
def test_interrupted_run_resumes_to_the_same_result(method, data, tmp_path):
    clean_steps, resumed_steps = [], []
    clean = _run(method, data, tmp_path / "clean", callbacks=[lambda e: clean_steps.append(e.kind == "step")])
    with pytest.raises(Interrupted):
        _run(method, data, tmp_path / "resumed", callbacks=[interrupt_in_second_epoch])
    resumed = _run(method, data, tmp_path / "resumed", callbacks=[lambda e: resumed_steps.append(e.kind == "step")])
    assert 0 < sum(resumed_steps) < sum(clean_steps), "the second run must continue, not start over"
    assert resumed.metrics == clean.metrics
    if clean.checkpoint is not None:
        a, b = load_file(clean.checkpoint), load_file(resumed.checkpoint)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
