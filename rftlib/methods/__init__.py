"""Methods: one module per method behind one small interface, and one registry.

Every method module defines ``NAME``, a config dataclass ``Config`` (with a docstring per knob),
``PRESETS`` (per-dataset overrides: ``synthwild`` is the CPU-minutes default; ``iwildcam``,
``fmow`` and ``imagenet`` follow the papers' recipes) and ``run(ctx, cfg) -> RunResult``.
Trainable methods also define a :class:`~rftlib.task.Task` that the shared loop
(:func:`rftlib.train.fit`) trains. :func:`run_method` is the single entry point used by the
notebooks, the CLI (``python -m rftlib.train``) and the reports.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..data.loading import LoaderSettings
from ..dist import broadcast_object
from ..registry import Registry
from .common import RunContext, RunResult, resolve_config

log = logging.getLogger(__name__)

METHODS: Registry[str] = Registry("method")
for _name in ("zeroshot", "finetune", "linear_probe", "lpft", "wiseft", "flyp", "dps", "drm", "croft", "radapter"):
    METHODS.register(_name, f"rftlib.methods.{_name}")


def list_methods() -> list[str]:
    return METHODS.names()


def get_method(name: str) -> ModuleType:
    """The method's module (``NAME``, ``Config``, ``PRESETS``, ``run``)."""
    return importlib.import_module(METHODS.get(name))


def get_config(method: str, dataset: str = "synthwild", overrides: Mapping[str, Any] | None = None):
    """The method's config for a dataset: defaults, then the dataset preset, then ``overrides``."""
    module = get_method(method)
    return resolve_config(module.Config, module.PRESETS, dataset, overrides)


def run_method(
    method: str, *, dataset: str = "synthwild", data_root: str | None = None, model: str = "synthclip",
    pretrained: str | None = "synthclip", device: str | torch.device = "cpu", seed: int = 0,
    results_db: str | None = None, out_dir: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
    progress: str | None = None, callbacks: Sequence[Callable] = (), clip=None, data=None,
    dataset_options: Mapping[str, Any] | None = None, loader: LoaderSettings | None = None,
) -> RunResult:
    """Run one method end to end and record its results.

    Args:
        method: a name from :func:`list_methods`.
        dataset, data_root, dataset_options: what :func:`rftlib.data.get_dataset` loads (or pass
            ``data=`` to reuse a loaded dataset).
        model, pretrained: what :func:`rftlib.models.load_clip` loads (or pass ``clip=``).
        device: where to compute.
        seed: seeds data order and initialisation (also stored with every result row).
        results_db: SQLite results file (default ``$RFT_RESULTS_DB`` or ``rft_runs/results.db``).
        out_dir: checkpoint folder (default ``<runs_dir>/<run_id>``, where :func:`rftlib.results.runs_dir`
            is ``$RFT_RUNS_DIR`` or ``./rft_runs``); an existing run resumes.
        overrides: config overrides, e.g. ``{"epochs": 2, "lr": 1e-5}``.
        progress: ``auto`` | ``text`` | ``off``.
        callbacks: receive training events (live curves).
        loader: how images are read (workers, memory budget, bad images, prepared copy); default:
            the environment's (:class:`rftlib.data.loading.LoaderSettings`).

    Under ``torchrun`` every rank calls this; the main rank's run id names the run on every rank,
    and only the main rank writes to the results store.
    """
    from ..data import get_dataset
    from ..models import load_clip
    from ..results import ResultsStore, runs_dir

    module = get_method(method)
    torch.manual_seed(seed)
    data = data if data is not None else get_dataset(dataset, root=data_root, **(dataset_options or {}))
    cfg = resolve_config(module.Config, module.PRESETS, data.name, {**_seeded(module.Config, seed),
                                                                      **(overrides or {})})
    clip = clip if clip is not None else load_clip(model, pretrained, device=device)
    store = ResultsStore(results_db)
    run_id = broadcast_object(store.new_run_id(module.NAME, data.name))
    out = Path(out_dir) if out_dir is not None else runs_dir() / run_id
    store.start_run(run_id, method=module.NAME, dataset=data.name, model=clip.name, pretrained=clip.pretrained,
                    seed=seed, config=cfg)
    ctx = RunContext(clip=clip, dataset=data, device=torch.device(device), store=store, run_id=run_id,
                     method=module.NAME, seed=seed, out_dir=out, callbacks=list(callbacks), progress=progress,
                     config=cfg, loader=loader or LoaderSettings())
    try:
        result = module.run(ctx, cfg)
    except BaseException:
        store.finish_run(run_id, status="failed")
        raise
    store.finish_run(run_id)
    return result


def _seeded(config_cls, seed: int) -> dict:
    """Route the run seed into the config's training seed when it has one."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    if "train" in fields:
        return {"train.seed": seed}
    return {"seed": seed} if "seed" in fields else {}


__all__ = ["METHODS", "RunContext", "RunResult", "get_config", "get_method", "list_methods", "run_method"]
