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
    dataset_options: Mapping[str, Any] | None = None, loader: LoaderSettings | None = None, force: bool = False,
) -> RunResult:
    """Run one method end to end and record its results.

    Args:
        method: a name from :func:`list_methods`.
        dataset, data_root, dataset_options: what :func:`rftlib.data.get_dataset` loads (or pass
            ``data=`` to reuse a loaded dataset).
        model, pretrained: what :func:`rftlib.models.load_clip` loads (or pass ``clip=``, which must
            hold those pretrained weights: the run is named after them).
        device: where to compute.
        seed: seeds data order and initialisation (also stored with every result row).
        results_db: SQLite results file (default ``$RFT_RESULTS_DB`` or ``rft_runs/results.db``).
        out_dir: checkpoint folder (default ``<runs_dir>/<run_id>``, where :func:`rftlib.results.runs_dir`
            is ``$RFT_RUNS_DIR`` or ``./rft_runs``).
        overrides: config overrides, e.g. ``{"epochs": 2, "lr": 1e-5}`` (see :func:`get_config`).
        progress: ``auto`` | ``text`` | ``off``.
        callbacks: receive training events (live curves).
        loader: how images are read (workers, memory budget, bad images, prepared copy); default:
            the environment's (:class:`rftlib.data.loading.LoaderSettings`).
        force: retrain from scratch even if this run already exists (its rows are replaced and its
            folder cleared).

    The run id is content-addressed (:mod:`rftlib.runs`): the same method, data, model, config and
    seed give the same id and folder, so running the same command again resumes an interrupted
    run from its last checkpoint, and for a finished one loads its final weights instead of
    training (the evaluation runs again and replaces the run's rows: the store keeps one run).

    Under ``torchrun`` every rank calls this; the main rank's run id names the run on every rank,
    and only the main rank writes to the results store.
    """
    from ..data import get_dataset
    from ..models import load_clip

    module = get_method(method)
    torch.manual_seed(seed)
    data = data if data is not None else get_dataset(dataset, root=data_root, **(dataset_options or {}))
    cfg = resolve_config(module.Config, module.PRESETS, data.name, {**_seeded(module.Config, seed),
                                                                      **(overrides or {})})
    clip = clip if clip is not None else load_clip(model, pretrained, device=device)
    ctx = open_run(module.NAME, cfg, data=data, clip=clip, device=torch.device(device), seed=seed,
                   results_db=results_db, out_dir=out_dir, force=force, progress=progress, callbacks=callbacks,
                   loader=loader)
    try:
        result = module.run(ctx, cfg)
    except BaseException:
        ctx.store.finish_run(ctx.run_id, status="failed")
        raise
    ctx.store.finish_run(ctx.run_id)
    return result


def open_run(method: str, cfg, *, data, clip, device: torch.device, seed: int, results_db: str | None = None,
             out_dir: str | Path | None = None, force: bool = False, progress: str | None = None,
             callbacks: Sequence[Callable] = (), loader: LoaderSettings | None = None) -> RunContext:
    """Name a run by its content, find or prepare its folder, register it, and return its context.

    A run that exists already is continued (``running`` or ``failed``: resumed from its last
    checkpoint) or re-entered (``done``: nothing left to train); ``force`` clears it first.
    """
    from ..results import ResultsStore, runs_dir
    from ..runs import identity_of

    identity = identity_of(method, data.name, clip.name, clip.pretrained, seed, cfg, data.options)
    store = ResultsStore(results_db)
    run_id = broadcast_object(identity.run_id())
    out = Path(out_dir) if out_dir is not None else runs_dir() / run_id
    status = store.run_status(run_id)
    if force and store.writer:
        _clear_run(store, run_id, out, default_folder=out_dir is None)
    elif status is not None:
        log.info("run %s exists (%s): %s", run_id, status, "re-evaluating its final weights" if status == "done"
                 else "resuming from its last checkpoint")
    store.start_run(run_id, method=method, dataset=data.name, model=clip.name, pretrained=clip.pretrained, seed=seed,
                    config=cfg, splits=data.split_facts())
    return RunContext(clip=clip, dataset=data, device=device, store=store, run_id=run_id, method=method, seed=seed,
                      out_dir=out, callbacks=list(callbacks), progress=progress, config=cfg,
                      loader=loader or LoaderSettings())


def _clear_run(store, run_id: str, out: Path, *, default_folder: bool) -> None:
    """Forget a run's rows and its checkpoints: the default folder is deleted, an explicit one is
    moved aside (``<out>.replaced-<UTC time>``) so that nothing a user pointed at is lost."""
    import shutil
    from datetime import UTC, datetime

    deleted = store.delete_run(run_id)
    if out.exists():
        if default_folder:
            shutil.rmtree(out)
        else:
            aside = out.with_name(f"{out.name}.replaced-{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
            out.rename(aside)
            log.warning("force: moved the previous contents of %s to %s", out, aside)
    log.info("force: retraining run %s from scratch (%d old rows removed)", run_id, deleted)


def _seeded(config_cls, seed: int) -> dict:
    """Route the run seed into the config's training seed when it has one."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    if "train" in fields:
        return {"train.seed": seed}
    return {"seed": seed} if "seed" in fields else {}


__all__ = ["METHODS", "RunContext", "RunResult", "get_config", "get_method", "list_methods", "open_run",
           "run_method"]
