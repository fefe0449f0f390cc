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

Every weights file rftlib loads (here, and :func:`rftlib.models.load_checkpoint` /
:func:`~rftlib.models.load_classifier`) goes through :func:`check_weights` once: integer or boolean
tensors where the model has floating-point parameters, and NaN/inf values, are refused with the
file and the first offending tensor named (``allow_dtype_cast=True`` / ``allow_nonfinite=True`` admit
them on purpose). Half-precision files are fine: float to float is not a cast that loses meaning.
An empty or truncated file is a :class:`~rftlib.models.sidecar.CorruptCheckpointError` naming it.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable, Collection, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..registry import Registry, UnknownNameError
from .sidecar import CorruptCheckpointError, damaged_checkpoint_hint, find_sidecar, sidecar_path

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "configs"
WEIGHTS_DIR = PACKAGE_DIR / "weights"


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained (offline, unknown tag, or missing file)."""


class WeightsRefusedError(ValueError):
    """A weights file holds values rftlib does not load silently (integer/boolean tensors for
    floating-point parameters, NaN or inf); the message names the file, the first such tensor and
    the keyword that admits it."""


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

    def to(self, device: torch.device | str) -> ClipModel:
        """Move the model's weights to ``device`` in place (as ``nn.Module.to``); returns ``self``."""
        self.model.to(device)
        return self

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
    device: str | torch.device = "cpu", force_quick_gelu: bool | None = None, allow_dtype_cast: bool = False,
    allow_nonfinite: bool = False,
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
        allow_dtype_cast: load a local file whose tensors for floating-point parameters are integer
            or boolean (cast to float); by default that is refused.
        allow_nonfinite: load a local file with NaN/inf values; by default that is refused.

    Returns:
        A :class:`ClipModel` in eval mode.

    Raises:
        WeightsRefusedError: a local file with non-float tensors or non-finite values (see above).
        CorruptCheckpointError: a local file that is empty or truncated.
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
        state = _read_clip_state(source)
        check_weights(state, source, reference=net.state_dict(), allow_dtype_cast=allow_dtype_cast,
                      allow_nonfinite=allow_nonfinite)
        net.load_state_dict(state, strict=True)
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
        state = read_safetensors(path)
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises several unpickling error types
            raise WeightsUnavailableError(
                f"{path} is not a readable plain tensor state dict (truncated or damaged, or pickled "
                f"objects, which rftlib never unpickles): {err}"
            ) from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path} does not hold a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items() if not k.startswith("head.")}


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file.

    Raises:
        CorruptCheckpointError: the file is empty, truncated or not a safetensors file (the
            message names it and what to do).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path))
    except SafetensorError as err:
        what = "empty" if path.stat().st_size == 0 else f"truncated or not a safetensors file ({err})"
        hint = damaged_checkpoint_hint(path) if sidecar_path(path).exists() else "restore or download it again"
        raise CorruptCheckpointError(f"weights file {path} is {what}; {hint}") from err


def check_weights(
    state: Mapping[str, torch.Tensor], path: str | os.PathLike, *,
    reference: Mapping[str, torch.Tensor] | None = None, non_float_keys: Collection[str] = (),
    allow_dtype_cast: bool = False, allow_nonfinite: bool = False,
) -> None:
    """Refuse weights a model should not be given silently.

    Two rules, each with a keyword that lifts it:

    * a tensor that will fill a floating-point parameter must be floating point (any precision);
      integer or boolean values there mean a wrong or damaged file, not weights
      (``allow_dtype_cast=True``: they are cast, as ``load_state_dict`` does);
    * every floating-point value must be finite: NaN/inf weights evaluate to chance or worse and
      the run would be reported as if it were normal (``allow_nonfinite=True``).

    Args:
        state: the tensors read from ``path``.
        path: the file, for the messages.
        reference: the receiving model's state dict: the keys whose tensors there are floating must
            be floating here. ``None``: every key except ``non_float_keys`` must be.
        non_float_keys: keys allowed to hold integer/boolean tensors when there is no ``reference``
            (an rftlib checkpoint's sidecar lists them, e.g. BatchNorm's ``num_batches_tracked``).
        allow_dtype_cast, allow_nonfinite: lift the rules above.

    Raises:
        WeightsRefusedError: naming ``path``, the first offending tensor, how many there are, and
            the keyword that admits them.
    """
    if not allow_dtype_cast:
        if reference is not None:
            want_float = {k for k, v in reference.items() if v.is_floating_point()}
            cast = [k for k, v in state.items() if k in want_float and not v.is_floating_point()]
        else:
            allowed = set(non_float_keys)
            cast = [k for k, v in state.items() if not v.is_floating_point() and k not in allowed]
        if cast:
            first = state[cast[0]]
            raise WeightsRefusedError(
                f"{path}: tensor {cast[0]!r} is {str(first.dtype).removeprefix('torch.')} where the model has "
                f"floating-point weights{_and_more(cast)}; rftlib does not cast that silently (a wrong or "
                f"damaged file?). Pass allow_dtype_cast=True to load it anyway"
            )
    if not allow_nonfinite:
        for key, tensor in state.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
                count = int((~torch.isfinite(tensor)).sum())
                raise WeightsRefusedError(
                    f"{path}: tensor {key!r} has {count} non-finite value(s) (NaN/inf) of {tensor.numel()}"
                    f"{_and_more(bad)}; such weights cannot be evaluated meaningfully. Use an earlier "
                    f"checkpoint, or pass allow_nonfinite=True to load them anyway"
                )


def _and_more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more tensor(s) like it)" if len(keys) > 1 else ""
