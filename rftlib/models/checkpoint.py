"""Portable checkpoints: a safetensors state dict plus a JSON sidecar.

A checkpoint is always "a CLIP, optionally with a classification head": the state dict holds the
open_clip CLIP's own keys (``visual.*``, ``transformer.*``, ``logit_scale``, ...) and, when there is
a head, ``head.weight`` / ``head.bias``. Dropping the ``head.*`` keys leaves a state dict that stock
``open_clip.create_model(architecture)`` loads with ``strict=True``
(:func:`export_open_clip_weights` writes exactly that file).

The sidecar (``<name>.json`` next to ``<name>.safetensors``) records what is needed to rebuild and
check the model: architecture, pretrained tag, QuickGELU, the open_clip config, class names,
method and method config, and the rftlib version (:mod:`.sidecar` locates, reads, writes and checks
it). Pickles are never written or read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..atomic import write_atomically
from .heads import ImageClassifier, ZeroShotHead
from .loading import ClipModel, load_clip
from .sidecar import check_sidecar, read_sidecar, write_sidecar


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
    write_sidecar(path, {"rftlib_version": __version__, **clip.describe(), "classnames": classnames,
                         "method": method, "method_config": cfg, "extra": extra or {}})
    return path


def load_checkpoint(path: str | os.PathLike, **expected: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint's tensors and sidecar, checking ``expected`` sidecar fields.

    Example: ``load_checkpoint(p, architecture="ViT-B-16", classnames=names)`` raises
    :class:`~rftlib.models.sidecar.CheckpointMismatchError` naming the first field that differs.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: rftlib checkpoints are .safetensors files (pickles are never loaded)")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    sidecar = read_sidecar(path)
    check_sidecar(sidecar, path=path, **expected)
    return load_file(str(path)), sidecar


def classifier_state(clip: ClipModel, head: ZeroShotHead | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint state of a CLIP (its current weights) plus an optional head."""
    state = dict(clip.model.state_dict())
    if head is not None:
        state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    return state


def load_classifier(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", **expected: Any,
) -> tuple[ClipModel, ImageClassifier | None, dict]:
    """Rebuild the CLIP (and the image classifier, if the checkpoint has a head) from a checkpoint."""
    state, sidecar = load_checkpoint(path, **expected)
    clip = load_clip(sidecar["architecture"], None, device=device, force_quick_gelu=sidecar.get("quick_gelu"))
    clip.pretrained = sidecar.get("pretrained")
    clip_state = {k: v for k, v in state.items() if not k.startswith("head.")}
    clip.model.load_state_dict(clip_state, strict=True)
    classifier = None
    if "head.weight" in state:
        head = ZeroShotHead(state["head.weight"].float(), state["head.bias"].float()).to(device)
        classifier = ImageClassifier(clip.visual, head)
    return clip, classifier, sidecar


def export_open_clip_weights(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the CLIP part of a checkpoint as a plain safetensors file for stock open_clip.

    ``open_clip.create_model(architecture, pretrained=str(out))`` then loads it.
    """
    from safetensors.torch import save_file

    state, _ = load_checkpoint(path)
    out = Path(out)
    save_file({k: v for k, v in state.items() if not k.startswith("head.")}, str(out))
    return out
