"""Run identity: what makes two runs the same run, and the folder a run lives in.

A run is named by its content: the method, the dataset and the options it was loaded with, the
model and its pretrained weights, the fully resolved method config (presets and overrides
applied) and the seed. :func:`run_id_for` hashes exactly that, so

* running the same command again finds the same run id and the same folder
  (``<runs_dir>/<run_id>``): an interrupted run resumes from its last checkpoint (the exact-resume
  machinery of :func:`rftlib.train.fit`) and a finished one is not trained again;
* changing anything that changes the result (a learning rate, a dataset subset, a seed) gives a
  new run, never a resume of a different one.

What is *not* part of the identity: where the data lives, the device, the number of data-loading
workers, progress bars and callbacks. Those change how fast a run goes, not what it computes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ID_DIGITS = 12


@dataclass(frozen=True)
class RunIdentity:
    """Everything that decides a run's result (see the module docstring)."""

    method: str
    dataset: str
    model: str
    pretrained: str | None
    seed: int
    config: Mapping[str, Any]
    dataset_options: Mapping[str, Any] = field(default_factory=dict)

    def canonical(self) -> str:
        """The identity as canonical JSON (sorted keys; unknown objects as their ``str``)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)

    def run_id(self) -> str:
        """``<method>-<dataset>-<12 hex digits of the identity's SHA-256>``, e.g.
        ``finetune-synthwild-3f9a1c0b7d2e``."""
        digest = hashlib.sha256(self.canonical().encode()).hexdigest()[:ID_DIGITS]
        return f"{self.method}-{self.dataset}-{digest}"


def identity_of(method: str, dataset: str, model: str, pretrained: str | None, seed: int, config: Any,
                dataset_options: Mapping[str, Any] | None = None) -> RunIdentity:
    """A :class:`RunIdentity` from a method config dataclass (or mapping) and the rest."""
    as_dict = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return RunIdentity(method=method, dataset=dataset, model=model, pretrained=pretrained, seed=int(seed),
                       config=as_dict, dataset_options=dict(dataset_options or {}))
