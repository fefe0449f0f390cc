"""Portable checkpoints: a safetensors state dict plus a JSON sidecar.

A checkpoint is always "a CLIP, optionally with a classification head": the state dict holds the
open_clip CLIP's own keys (``visual.*``, ``transformer.*``, ``logit_scale``, ...) and, when there is
a head, ``head.weight`` / ``head.bias``. Dropping the ``head.*`` keys leaves a state dict that stock
``open_clip.create_model(architecture)`` loads with ``strict=True``
(:func:`export_open_clip_weights` writes exactly that file).

The sidecar (``<name>.json`` next to ``<name>.safetensors``) records what is needed to rebuild and
check the model: architecture, pretrained tag, QuickGELU, the open_clip config, class names,
method and method config, the keys of its non-floating-point tensors (usually none), and the
rftlib version (:mod:`.sidecar` locates, reads, writes and checks it). Pickles are never written or
read.

Loading refuses, with the file named: an empty or truncated weights file, sidecar, training state
or ``latest.json`` (:class:`~rftlib.models.sidecar.CorruptCheckpointError`, saying what to delete or
write to go on), and weights with integer/boolean tensors where floating-point ones belong or with
NaN/inf values (:class:`~rftlib.models.loading.WeightsRefusedError`; ``allow_dtype_cast=True`` /
``allow_nonfinite=True`` admit them on purpose).

A run folder (see :mod:`rftlib.train`) holds ``ckpt-<step>.safetensors`` + sidecar,
``state-<step>.pt`` (optimizer, step, RNG; plain tensors) and ``latest.json`` naming the newest
pair; :func:`read_latest` and :func:`load_train_state` read the last two.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..atomic import write_atomically, write_text_atomically
from .heads import ImageClassifier, ZeroShotHead
from .loading import PROJECT_MODELS, ClipModel, check_weights, load_clip, read_safetensors
from .sidecar import CorruptCheckpointError, check_sidecar, read_sidecar, write_sidecar

LEGACY_NON_FLOAT_SUFFIXES = ("num_batches_tracked", "position_ids")
"""Non-float keys admitted in checkpoints whose sidecar predates the ``non_float_keys`` record."""


def save_checkpoint(
    path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], *, clip: ClipModel,
    classnames: list[str] | None = None, method: str | None = None, method_config: Any = None,
    extra: dict | None = None,
) -> Path:
    """Write ``state_dict`` as ``path`` (.safetensors) and its JSON sidecar, atomically.

    Args:
        path: target file; the suffix is forced to ``.safetensors``.
        state_dict: CLIP keys plus optional ``head.*`` keys.
        clip: the model the weights belong to (architecture facts go into the sidecar).
        classnames: the head's classes, in order.
        method, method_config: how the weights were produced (a dataclass or dict).
        extra: any further JSON-serialisable facts (metrics, epoch, ...).
    """
    from dataclasses import asdict, is_dataclass

    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    cfg = asdict(method_config) if is_dataclass(method_config) else method_config
    write_atomically(path, lambda p: save_file(tensors, str(p)))
    non_float = sorted(k for k, v in tensors.items() if not v.is_floating_point())
    write_sidecar(path, {"rftlib_version": __version__, **clip.describe(), "classnames": classnames,
                         "method": method, "method_config": cfg, "non_float_keys": non_float,
                         "extra": extra or {}})
    return path


def load_checkpoint(
    path: str | os.PathLike, *, allow_dtype_cast: bool = False, allow_nonfinite: bool = False, **expected: Any,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint's tensors and sidecar, checking ``expected`` sidecar fields.

    Example: ``load_checkpoint(p, architecture="ViT-B-16", classnames=names)`` raises
    :class:`~rftlib.models.sidecar.CheckpointMismatchError` naming the first field that differs.

    Args:
        path: the ``.safetensors`` file (its sidecar sits next to it).
        allow_dtype_cast: admit integer/boolean tensors other than those the sidecar lists as
            non-floating (refused by default: the file is not what was saved).
        allow_nonfinite: admit NaN/inf values (refused by default).
        expected: sidecar fields and the values they must have.

    Raises:
        FileNotFoundError: the file or its sidecar is missing.
        CorruptCheckpointError: the file or its sidecar is empty or truncated.
        WeightsRefusedError: see ``allow_dtype_cast`` and ``allow_nonfinite``.
        CheckpointMismatchError: a field differs from ``expected``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: rftlib checkpoints are .safetensors files (pickles are never loaded)")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    sidecar = read_sidecar(path)
    check_sidecar(sidecar, path=path, **expected)
    state = read_safetensors(path)
    non_float = sidecar.get("non_float_keys")
    if non_float is None:  # written before the sidecar recorded them
        non_float = [k for k in state if k.endswith(LEGACY_NON_FLOAT_SUFFIXES)]
    check_weights(state, path, non_float_keys=non_float, allow_dtype_cast=allow_dtype_cast,
                  allow_nonfinite=allow_nonfinite)
    return state, sidecar


def classifier_state(clip: ClipModel, head: ZeroShotHead | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint state of a CLIP (its current weights) plus an optional head."""
    state = dict(clip.model.state_dict())
    if head is not None:
        state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    return state


def load_classifier(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", allow_dtype_cast: bool = False,
    allow_nonfinite: bool = False, **expected: Any,
) -> tuple[ClipModel, ImageClassifier | None, dict]:
    """Rebuild the CLIP (and the image classifier, if the checkpoint has a head) from a checkpoint.

    ``allow_dtype_cast`` / ``allow_nonfinite`` and the errors are those of :func:`load_checkpoint`;
    the tensors are also checked against the rebuilt model's own dtypes.
    """
    state, sidecar = load_checkpoint(path, allow_dtype_cast=allow_dtype_cast, allow_nonfinite=allow_nonfinite,
                                     **expected)
    clip = load_clip(sidecar["architecture"], None, device=device, force_quick_gelu=sidecar.get("quick_gelu"))
    clip.pretrained = sidecar.get("pretrained")
    clip_state = {k: v for k, v in state.items() if not k.startswith("head.")}
    check_weights(clip_state, path, reference=clip.model.state_dict(), allow_dtype_cast=allow_dtype_cast,
                  allow_nonfinite=True)  # finiteness was checked above
    clip.model.load_state_dict(clip_state, strict=True)
    classifier = None
    if "head.weight" in state:
        head = ZeroShotHead(state["head.weight"].float(), state["head.bias"].float()).to(device)
        classifier = ImageClassifier(clip.visual, head)
    return clip, classifier, sidecar


def export_open_clip_weights(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the CLIP part of a checkpoint as a plain safetensors file for stock open_clip, with
    what stock open_clip needs to build the same network.

    The weights alone are not enough: a model built from OpenAI weights uses QuickGELU, but
    ``open_clip.create_model(arch, pretrained=file)`` builds plain GELU without a warning (image
    features off by ~0.05). So the export also writes, next to ``out``:

    * ``<out stem>-open_clip.json``: the model's open_clip config with its activation
      (``quick_gelu``), which ``open_clip.add_model_config(<that file>)`` registers under the name
      ``<out stem>-open_clip`` -- the one recipe that works for every architecture, project models
      (synthclip, rft-tiny) included;
    * ``out``'s sidecar (``<out>.json``): the architecture, ``quick_gelu``, the stock model name
      for open_clip's own architectures (``ViT-B-16-quickgelu`` for OpenAI-shaped weights) and the
      two lines that load it (``load_recipe``).

    Returns:
        ``out``.
    """
    from safetensors.torch import save_file

    state, sidecar = load_checkpoint(path)
    out = Path(out)
    save_file({k: v for k, v in state.items() if not k.startswith("head.")}, str(out))
    quick_gelu = bool(sidecar.get("quick_gelu"))
    name = f"{out.stem}-open_clip"
    config = out.with_name(f"{name}.json")
    write_text_atomically(config, json.dumps({**sidecar["model_config"], "quick_gelu": quick_gelu}, indent=1))
    recipe = [f"open_clip.add_model_config({str(config)!r})",
              f"model = open_clip.create_model({name!r}, pretrained={str(out)!r})"]
    write_sidecar(out, {"architecture": sidecar["architecture"], "quick_gelu": quick_gelu,
                        "open_clip_model_name": stock_model_name(sidecar["architecture"], quick_gelu),
                        "open_clip_config": config.name, "load_recipe": recipe})
    return out


def stock_model_name(architecture: str, quick_gelu: bool) -> str | None:
    """The name stock open_clip knows this network by (``ViT-B-16-quickgelu`` for OpenAI-shaped
    weights), or None for an architecture it does not ship (project models: use the exported config)."""
    import open_clip

    if architecture in PROJECT_MODELS:
        return None
    known = set(open_clip.list_models())
    base = architecture.removesuffix("-quickgelu")
    name = f"{base}-quickgelu" if quick_gelu else base
    return name if name in known else None


# --------------------------------------------------------------------------------------------------
# a run folder's latest.json and training state
# --------------------------------------------------------------------------------------------------
LATEST = "latest.json"
_STEP_FILE = re.compile(r"^ckpt-(\d+)\.safetensors$")


def read_latest(out_dir: str | os.PathLike) -> tuple[Path, Path] | None:
    """The (weights, training state) pair that ``out_dir/latest.json`` names; ``None`` without one.

    Raises:
        CorruptCheckpointError: ``latest.json`` is empty, truncated or malformed, or names a file
            that is missing; the message names it and gives the exact ``latest.json`` that resumes
            from the newest complete checkpoint still in the folder (or says there is none).
    """
    folder = Path(out_dir)
    latest = folder / LATEST
    if not latest.exists():
        return None
    try:
        info = json.loads(latest.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        what = "empty" if latest.stat().st_size == 0 else f"truncated or not JSON ({err})"
        raise CorruptCheckpointError(f"{latest} is {what}; {_resume_hint(folder)}") from err
    if not (isinstance(info, dict) and isinstance(info.get("weights"), str) and isinstance(info.get("state"), str)):
        raise CorruptCheckpointError(f"{latest} does not name a checkpoint (expected "
                                     f'{{"step": ..., "weights": ..., "state": ...}}); {_resume_hint(folder)}')
    weights, state = folder / info["weights"], folder / info["state"]
    missing = [p.name for p in (weights, state) if not p.is_file()]
    if missing:
        raise CorruptCheckpointError(f"{latest} names {' and '.join(missing)}, which {folder} lacks; "
                                     f"{_resume_hint(folder, exclude=weights)}")
    return weights, state


def load_train_state(path: str | os.PathLike) -> dict:
    """A run's training state (``state-<step>.pt``: plain tensors and numbers), read with
    ``torch.load(weights_only=True)``.

    Raises:
        CorruptCheckpointError: the file is empty, truncated or holds more than plain data; the
            message names it and says how to resume from the previous checkpoint.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - torch raises EOFError, RuntimeError, UnpicklingError...
        what = "empty" if path.exists() and path.stat().st_size == 0 else "truncated or damaged"
        first = (str(err).splitlines() or [""])[0][:200]
        detail = f"{type(err).__name__}: {first}" if first else type(err).__name__
        raise CorruptCheckpointError(
            f"training state {path} is {what} ({detail}); "
            f"{_resume_hint(path.parent, exclude=_weights_of(path))}"
        ) from err
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"training state {path} holds a {type(state).__name__}, not a dict; "
                                     f"{_resume_hint(path.parent, exclude=_weights_of(path))}")
    return state


def _looks_complete(weights: Path, state: Path) -> bool:
    """Whether a checkpoint pair is whole, judged from the files' headers (cheap: nothing is loaded)."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    if not (state.is_file() and zipfile.is_zipfile(state) and weights.with_suffix(".json").is_file()):
        return False
    try:
        with safe_open(str(weights), "pt"):
            return True
    except (SafetensorError, OSError):
        return False


def _weights_of(state_path: Path) -> Path:
    return state_path.with_name(state_path.name.replace("state-", "ckpt-", 1)).with_suffix(".safetensors")


def _resume_hint(folder: Path, exclude: Path | None = None) -> str:
    """How to go on from a run folder whose newest checkpoint cannot be used."""
    pairs = []
    for p in folder.glob("ckpt-*.safetensors"):
        match = _STEP_FILE.match(p.name)
        state = folder / f"state-{match[1]}.pt" if match else None
        if match and p != exclude and _looks_complete(p, state):
            pairs.append((int(match[1]), p, state))
    start_over = f"delete the folder {folder} to start over"
    if not pairs:
        return f"no complete checkpoint is left in {folder}: delete {folder / LATEST} or {start_over}"
    step, weights, state = max(pairs)
    text = json.dumps({"step": step, "weights": weights.name, "state": state.name})
    return (f"to resume from the newest complete checkpoint (step {step}), write {text} into "
            f"{folder / LATEST}; or {start_over}")
