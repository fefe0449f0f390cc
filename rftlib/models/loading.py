"""Loading CLIP models: open_clip names and tags, local weight files, and the project's own models.

``load_clip(model, pretrained)`` resolves three kinds of sources:

* **project models** (``synthclip``, ``rft-tiny``): configs shipped in ``rftlib/models/configs``
  and registered with open_clip; ``pretrained="synthclip"`` loads the committed weights.
* **open_clip names and tags** (``load_clip("ViT-B-16", "openai")``): the real online path. With
  ``HF_HUB_OFFLINE=1`` a tag that is not in the local cache fails at once with a clear message
  instead of retrying for most of a minute.
* **local files**: a ``.safetensors`` or ``.pt``/``.bin`` state dict (DDP ``module.`` prefixes and
  ``{"state_dict": ...}`` wrappers are handled; ``torch.load`` runs with ``weights_only=True`` so
  pickled modules are refused), or an rftlib checkpoint (its JSON sidecar supplies the
  architecture and QuickGELU flag, and is checked against ``model``).
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..registry import Registry, UnknownNameError
from .sidecar import find_sidecar

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "configs"
WEIGHTS_DIR = PACKAGE_DIR / "weights"


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained (offline, unknown tag, or missing file)."""


@dataclass(frozen=True)
class ProjectModel:
    """A model architecture the project ships itself.

    Attributes:
        config: open_clip JSON config file name in ``rftlib/models/configs``.
        bpe: optional cut-down BPE merges file (gzip) in ``configs``; ``None`` = open_clip's.
        weights: pretrained tag -> safetensors file name in ``rftlib/models/weights``.
    """

    config: str
    bpe: str | None = None
    weights: dict[str, str] = field(default_factory=dict)


PROJECT_MODELS: Registry[ProjectModel] = Registry("project model")
PROJECT_MODELS.register(
    "synthclip",
    ProjectModel("synthclip.json", bpe="synthwild_bpe.txt.gz", weights={"synthclip": "synthclip.safetensors"}),
)
PROJECT_MODELS.register("rft-tiny", ProjectModel("rft-tiny.json", bpe="synthwild_bpe.txt.gz"))

_configs_registered = False


def _register_project_configs() -> None:
    global _configs_registered
    if not _configs_registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _configs_registered = True


@dataclass
class ClipModel:
    """A loaded CLIP with everything needed to use it.

    Attributes:
        model: the open_clip ``CLIP`` / ``CustomTextCLIP`` module.
        tokenizer: callable mapping a list of strings to a ``LongTensor`` of token ids.
        name: open_clip architecture name (e.g. ``ViT-B-16``, ``synthclip``).
        pretrained: the tag or file the weights came from (``None`` = random init).
        quick_gelu: whether the towers use QuickGELU (OpenAI weights need it).
        image_size: square input resolution.
        mean, std: per-channel normalisation of [0, 1] pixels.
        model_config: the open_clip config dict (architecture), stored in checkpoints.
    """

    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str
    pretrained: str | None
    quick_gelu: bool
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    model_config: dict

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    def describe(self) -> dict:
        """The facts a checkpoint sidecar records about the architecture."""
        return {
            "architecture": self.name,
            "pretrained": self.pretrained,
            "quick_gelu": self.quick_gelu,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "model_config": self.model_config,
        }


def list_models() -> list[str]:
    """Project model names followed by every open_clip architecture name."""
    import open_clip

    _register_project_configs()
    return PROJECT_MODELS.names() + [m for m in open_clip.list_models() if m not in PROJECT_MODELS]


def get_tokenizer(name: str) -> Callable[[list[str]], torch.Tensor]:
    """The tokenizer for an architecture (project models use their cut-down BPE vocabulary)."""
    import open_clip

    _register_project_configs()
    if name in PROJECT_MODELS and PROJECT_MODELS.get(name).bpe:
        from open_clip.tokenizer import SimpleTokenizer

        cfg = open_clip.get_model_config(name)
        bpe = CONFIG_DIR / PROJECT_MODELS.get(name).bpe
        return SimpleTokenizer(bpe_path=str(bpe), context_length=cfg["text_cfg"]["context_length"])
    return open_clip.get_tokenizer(name)


def _check_architecture(name: str) -> dict:
    import open_clip

    _register_project_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        close = difflib.get_close_matches(name, list_models(), n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownNameError(
            f"unknown model {name!r}.{hint} Valid names: the project models "
            f"({', '.join(PROJECT_MODELS.names())}) or any of the {len(open_clip.list_models())} "
            "open_clip architectures (see rftlib.models.list_models())."
        )
    return cfg


def load_clip(
    model: str = "synthclip", pretrained: str | os.PathLike | None = "synthclip", *,
    device: str | torch.device = "cpu", force_quick_gelu: bool | None = None,
) -> ClipModel:
    """Build a CLIP and load its weights.

    Args:
        model: architecture name: a project model (``synthclip``, ``rft-tiny``) or an open_clip
            name (``ViT-B-16``, ``ViT-B-16-quickgelu``, ...).
        pretrained: a project tag (``synthclip``), an open_clip tag (``openai``, ``laion2b_s34b_b88k``),
            a path to a ``.safetensors``/``.pt`` state dict or rftlib checkpoint, or ``None`` for
            random initialisation.
        device: where the model lives.
        force_quick_gelu: override the QuickGELU choice (defaults: the config's, the checkpoint
            sidecar's, or open_clip's rule for the tag).

    Returns:
        A :class:`ClipModel` in eval mode.
    """
    import open_clip

    cfg = _check_architecture(model)
    source = _resolve_weights(model, pretrained)
    quick_gelu = bool(force_quick_gelu) if force_quick_gelu is not None else bool(cfg.get("quick_gelu", False))
    if isinstance(source, Path):
        sidecar = find_sidecar(source)
        if sidecar is not None:
            _check_sidecar_architecture(sidecar, model, source)
            if force_quick_gelu is None:
                quick_gelu = bool(sidecar.get("quick_gelu", quick_gelu))
    tag = source if isinstance(source, str) else None
    try:
        with _quiet_random_init_warning(source is not None and tag is None):
            net = open_clip.create_model(model, pretrained=tag, device=device, force_quick_gelu=quick_gelu)
    except RuntimeError as err:
        raise _weights_error(model, tag, err) from err
    if tag == "openai":
        quick_gelu = True  # open_clip forces QuickGELU for OpenAI weights loaded by tag
    if isinstance(source, Path):
        net.load_state_dict(_read_clip_state(source), strict=True)
        net.to(device)
    net.eval()
    pp = getattr(net.visual, "preprocess_cfg", {}) or {}
    size = net.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return ClipModel(
        model=net, tokenizer=get_tokenizer(model), name=model,
        pretrained=None if pretrained is None else str(pretrained), quick_gelu=quick_gelu,
        image_size=size, mean=tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(pp.get("std", open_clip.OPENAI_DATASET_STD)), model_config=cfg,
    )


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextmanager
def _quiet_random_init_warning(active: bool):
    """open_clip warns "initialized randomly" before we load local weights ourselves: drop that line."""
    flt = _DropRandomInitWarning()
    if active:
        logging.getLogger().addFilter(flt)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(flt)


def _resolve_weights(model: str, pretrained) -> str | Path | None:
    """Turn ``pretrained`` into ``None``, an open_clip tag (str) or a local file (Path)."""
    import open_clip

    if pretrained is None or str(pretrained).lower() in ("", "none"):
        return None
    text = str(pretrained)
    if model in PROJECT_MODELS and text in PROJECT_MODELS.get(model).weights:
        path = WEIGHTS_DIR / PROJECT_MODELS.get(model).weights[text]
        if not path.exists():
            raise WeightsUnavailableError(
                f"the committed weights {path} are missing; rebuild them with "
                "`python data_scripts/pretrain_synthclip.py` or restore them from git"
            )
        return path
    path = Path(text).expanduser()
    if path.suffix in (".safetensors", ".pt", ".pth", ".bin") or path.exists():
        if not path.is_file():
            raise WeightsUnavailableError(f"weights file {path} does not exist")
        return path
    tags = open_clip.list_pretrained_tags_by_model(model)
    if model in PROJECT_MODELS:
        tags = list(PROJECT_MODELS.get(model).weights)
    if text not in tags:
        raise WeightsUnavailableError(
            f"unknown pretrained tag {text!r} for model {model!r}; valid tags: "
            f"{', '.join(tags) or '(none: pass a local weights file or None)'}"
        )
    return text


def _weights_error(model: str, tag: str | None, err: Exception) -> Exception:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    hint = (
        "HF_HUB_OFFLINE is set, so nothing can be downloaded" if offline
        else "the download failed (no network?)"
    )
    return WeightsUnavailableError(
        f"could not load pretrained weights {model}/{tag}: {hint}. Download them once on a machine "
        "with internet (they are cached by huggingface_hub), or pass a local weights file as "
        f"`pretrained=`. Original error: {str(err).splitlines()[0][:300]}"
    )


def _check_sidecar_architecture(sidecar: dict, model: str, path: Path) -> None:
    arch = sidecar.get("architecture")
    if arch is not None and arch != model:
        raise ValueError(
            f"checkpoint {path} was saved for architecture {arch!r} but model={model!r} was asked for; "
            f"load it with load_clip({arch!r}, {str(path)!r})"
        )


def _read_clip_state(path: Path) -> dict[str, torch.Tensor]:
    """A CLIP state dict from a local file, without ever unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises several unpickling error types
            raise WeightsUnavailableError(
                f"{path} is not a plain tensor state dict (rftlib never unpickles objects): {err}"
            ) from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path} does not hold a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items() if not k.startswith("head.")}
