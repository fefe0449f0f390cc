"""Methods: one module per method behind one small interface, and one registry.

Every method module defines ``NAME``, a config dataclass ``Config`` (with a docstring per knob),
``PRESETS`` (per-dataset overrides: ``synthwild`` is the CPU-minutes default; ``iwildcam``,
``fmow`` and ``imagenet`` follow the papers' recipes) and ``run(ctx, cfg) -> RunResult``.
Trainable methods also define a :class:`~rftlib.task.Task` that the shared loop
(:func:`rftlib.train.fit`) trains. :func:`run_method` is the single entry point used by the
notebooks, the CLI (``python -m rftlib.train``) and the reports.

One entry is optional: ``build_classifier(clip, state, dataset, cfg) -> nn.Module``
(:data:`~rftlib.methods.common.ClassifierBuilder`), how the method turns weights into the model it
evaluates. A method whose evaluation model is not one head over the image tower declares it (DRM:
two heads and a mix of their softmaxes), so that WiSE-FT, merging the method's checkpoint with
the zero-shot CLIP, evaluates the merge as the method would; :func:`classifier_builder` hands it out
and :func:`get_method` refuses a module whose declaration does not have that signature. Methods
without one are evaluated by :func:`~rftlib.methods.common.single_head_classifier`.

A second is optional too: ``DATA_PRESETS``, per-dataset *dataset* options a paper's setting implies
(CRoFT's Setup-I trains on 16 images per ImageNet class: ``{"imagenet": {"shots": 16}}``).
:func:`data_options_for` applies them wherever a run loads its data by name (:func:`run_method`,
the CLI, sweeps); options the user gives win.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..data.loading import LoaderSettings
from ..devices import resolve_device
from ..dist import broadcast_object, current
from ..registry import Registry, UnknownNameError
from ..tracking import resolve_track, track_run
from .common import ClassifierBuilder, RunContext, RunResult, resolve_config

log = logging.getLogger(__name__)

METHODS: Registry[str] = Registry("method")
for _name in ("zeroshot", "finetune", "linear_probe", "lpft", "wiseft", "flyp", "dps", "drm", "croft", "radapter"):
    METHODS.register(_name, f"rftlib.methods.{_name}")


def list_methods() -> list[str]:
    return METHODS.names()


CLASSIFIER_BUILDER_PARAMETERS = ("clip", "state", "dataset", "cfg")


class MethodContractError(TypeError):
    """A method module breaks the method interface; the message names the module and the rule."""


def get_method(name: str) -> ModuleType:
    """The method's module (``NAME``, ``Config``, ``PRESETS``, ``run``; optionally ``build_classifier``),
    its optional declarations checked (:func:`check_method_module`)."""
    return check_method_module(importlib.import_module(METHODS.get(name)))


def check_method_module(module: ModuleType) -> ModuleType:
    """Refuse a method module whose optional ``build_classifier`` is not a function of exactly
    ``(clip, state, dataset, cfg)`` (:data:`~rftlib.methods.common.ClassifierBuilder`), or whose
    optional ``DATA_PRESETS`` is not a mapping of dataset name to a mapping of options; return it.

    Raises:
        MethodContractError: naming the module and what is wrong.
    """
    presets = vars(module).get("DATA_PRESETS", {})
    if not isinstance(presets, Mapping) or not all(isinstance(k, str) and isinstance(v, Mapping)
                                                   for k, v in presets.items()):
        raise MethodContractError(f"{module.__name__}.DATA_PRESETS must map dataset names to option mappings "
                                  f"(e.g. {{'imagenet': {{'shots': 16}}}}), got {presets!r}")
    builder = vars(module).get("build_classifier")
    if builder is None:
        return module
    want = f"build_classifier({', '.join(CLASSIFIER_BUILDER_PARAMETERS)}) -> nn.Module"
    if not callable(builder):
        raise MethodContractError(f"{module.__name__}.build_classifier must be a function {want}, "
                                  f"got a {type(builder).__name__}")
    params = inspect.signature(builder).parameters.values()
    names = tuple(p.name for p in params)
    positional = all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    if names != CLASSIFIER_BUILDER_PARAMETERS or not positional:
        raise MethodContractError(f"{module.__name__}.build_classifier must be a function {want}; "
                                  f"it takes ({', '.join(names)})")
    return module


def classifier_builder(method: str) -> ClassifierBuilder | None:
    """The evaluation-model builder ``method`` declares, or ``None`` when it declares none (a one-head
    method: :func:`~rftlib.methods.common.single_head_classifier` builds its model, from no config)."""
    return vars(get_method(method)).get("build_classifier")


def applicable_overrides(method: str, dataset: str, overrides: Mapping[str, Any]) -> dict:
    """The ``overrides`` that ``method``'s config has a field for (each value checked by the config
    itself): one set of settings shared by several methods, e.g. a sweep's ``--set`` or a benchmark's.

    Raises:
        ValueError: a value the method's config refuses.
    """
    kept = {}
    for key, value in overrides.items():
        try:
            get_config(method, dataset.lower(), {key: value})
        except UnknownNameError:
            continue
        kept[key] = value
    return kept


def data_options_for(method: str, dataset: str, given: Mapping[str, Any] | None = None, *, seed: int = 0) -> dict:
    """The options a run of ``method`` loads ``dataset`` with: the method's ``DATA_PRESETS`` for it,
    then ``given`` (which win). A preset's few-shot draw follows the run ``seed`` (``shots_seed``),
    as the papers draw one few-shot set per seed; ``given`` holding ``shots`` (``None``: the whole
    train split) replaces the preset's few-shot setting altogether."""
    given = dict(given or {})
    preset = dict(vars(get_method(method)).get("DATA_PRESETS", {}).get(dataset.lower(), {}))
    if "shots" in given:
        preset = {k: v for k, v in preset.items() if k not in ("shots", "shots_seed")}
    elif "shots" in preset:
        preset.setdefault("shots_seed", seed)
    return {k: v for k, v in {**preset, **given}.items() if not (k == "shots" and v is None)}


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
    track: str | Sequence[str] | None = None,
) -> RunResult:
    """Run one method end to end and record its results.

    Args:
        method: a name from :func:`list_methods`.
        dataset, data_root, dataset_options: what :func:`rftlib.data.get_dataset` loads (or pass
            ``data=`` to reuse a loaded dataset).
        model, pretrained: what :func:`rftlib.models.load_clip` loads (or pass ``clip=``, which must
            hold those pretrained weights: the run is named after them; it is moved to ``device``).
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
        force: retrain from scratch even if this run already exists (its rows are removed; the default
            folder is emptied, an explicit ``out_dir`` moved to ``<out_dir>.replaced-<time>``).
        track: experiment trackers, e.g. ``("tensorboard", "wandb")`` (:mod:`rftlib.tracking`);
            ``None``: those of the enclosing run (a base run), none at top level.

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
    device = resolve_device(device)
    trackers = resolve_track(track)  # an unknown or uninstalled tracker fails before any work
    torch.manual_seed(seed)
    preset = data.name if data is not None else str(dataset).lower()  # settings are checked before data loads
    cfg = run_config(method, preset, seed, overrides)
    if data is None:
        options = data_options_for(method, preset, dataset_options, seed=seed)
        data = get_dataset(dataset, root=data_root, **options)
    clip = clip.to(device) if clip is not None else load_clip(model, pretrained, device=device)
    ctx = open_run(module.NAME, cfg, data=data, clip=clip, device=device, seed=seed,
                   results_db=results_db, out_dir=out_dir, force=force, progress=progress, callbacks=callbacks,
                   loader=loader)
    try:
        with track_run(ctx, trackers) as tracked:
            result = module.run(ctx, cfg)
            tracked.final(result.metrics)
    except BaseException:
        ctx.store.finish_run(ctx.run_id, status="failed")
        raise
    finally:
        ctx.folder.release()
    ctx.store.finish_run(ctx.run_id)
    result.config = cfg
    return result


def run_config(method: str, dataset: str, seed: int = 0, overrides: Mapping[str, Any] | None = None):
    """The resolved config of a run: ``method``'s defaults, its preset for ``dataset``, the seed
    routed into it, then ``overrides`` (what :func:`run_method` trains with)."""
    module = get_method(method)
    return resolve_config(module.Config, module.PRESETS, dataset, {**_seeded(module.Config, seed), **(overrides or {})})


def plan_identity(method: str, dataset: str, *, model: str, pretrained: str | None, seed: int = 0,
                  overrides: Mapping[str, Any] | None = None, dataset_options: Mapping[str, Any] | None = None):
    """The :class:`rftlib.runs.RunIdentity` that :func:`run_method` will give this run, found without
    loading data or weights (:mod:`rftlib.sweep` names its runs' folders with it)."""
    from ..data import DATASETS, identity_options
    from ..runs import identity_of

    DATASETS.get(dataset)
    name = dataset.lower()
    options = data_options_for(method, name, dataset_options, seed=seed)
    return identity_of(method, name, model, pretrained, seed, run_config(method, name, seed, overrides),
                       identity_options(**options))


def open_run(method: str, cfg, *, data, clip, device: torch.device, seed: int, results_db: str | None = None,
             out_dir: str | Path | None = None, force: bool = False, progress: str | None = None,
             callbacks: Sequence[Callable] = (), loader: LoaderSettings | None = None) -> RunContext:
    """Name a run by its content, hold its folder, register it, and return its context.

    The main rank takes the folder's lock (:class:`rftlib.runs.RunFolder`; a second process on the
    same folder is refused) and checks the identity recorded there: a folder holding another run
    is refused (possible only with an explicit ``out_dir``). An existing run is continued
    (``running`` or ``failed``: resumed from its last checkpoint) or re-entered (``done``: nothing
    left to train); ``force`` empties it first. The caller releases ``ctx.folder`` at the end.
    """
    from ..results import ResultsStore, runs_dir
    from ..results.journal import RunJournal, RunRecorder, resolve_sink
    from ..runs import RunFolder, identity_of

    for split in _selection_splits(cfg):  # before any work: choosing on a test split is refused
        data.check_selection_split(split)
    identity = identity_of(method, data.name, clip.name, clip.pretrained, seed, cfg, data.options)
    run_id = broadcast_object(identity.run_id())
    out = Path(out_dir) if out_dir is not None else runs_dir() / run_id
    folder = RunFolder(out)
    info = current()
    store = RunRecorder(ResultsStore(results_db), RunJournal(out, writer=info.is_main), resolve_sink())
    if info.is_main:
        folder.acquire()
        try:
            _prepare_folder(folder, store, run_id, identity, force=force, chosen=out_dir is not None,
                            world_size=info.world_size)
        except BaseException:
            folder.release()
            raise
    store.start_run(run_id, method=method, dataset=data.name, model=clip.name, pretrained=clip.pretrained, seed=seed,
                    config=cfg, splits=data.split_facts())
    return RunContext(clip=clip, dataset=data, device=device, store=store, run_id=run_id, method=method, seed=seed,
                      out_dir=out, callbacks=list(callbacks), progress=progress, config=cfg,
                      loader=loader or LoaderSettings(), folder=folder)


def _prepare_folder(folder, store, run_id: str, identity, *, force: bool, chosen: bool, world_size: int) -> None:
    """Forget the run first when forced (rows, checkpoints), then record or check its identity."""
    status = store.run_status(run_id)
    if force:
        deleted = store.delete_run(run_id)
        aside = folder.clear(move_aside=chosen)
        store.journal.append("delete_run", run_id=run_id)  # a store that gathered the old run forgets it
        log.info("force: retraining run %s from scratch (%d old rows removed%s)", run_id, deleted,
                 f"; the folder's old contents are in {aside}" if aside else "")
    elif status is not None:
        log.info("run %s exists (%s): %s", run_id, status, "re-evaluating its final weights" if status == "done"
                 else "resuming from its last checkpoint")
    folder.claim(identity, world_size=world_size)


def _selection_splits(cfg) -> list[str]:
    """The splits a config chooses on: its ``select_split`` fields, its own and its nested configs'."""
    import dataclasses

    found = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "select_split" and isinstance(value, str):
            found.append(value)
        elif dataclasses.is_dataclass(value):
            found += _selection_splits(value)
    return found


def _seeded(config_cls, seed: int) -> dict:
    """Route the run seed into the config's training seed when it has one."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    if "train" in fields:
        return {"train.seed": seed}
    return {"seed": seed} if "seed" in fields else {}


__all__ = ["METHODS", "MethodContractError", "RunContext", "RunResult", "applicable_overrides", "check_method_module",
           "classifier_builder", "data_options_for", "get_config", "get_method", "list_methods", "open_run",
           "plan_identity", "run_config", "run_method"]
