"""Zero-shot classification heads and the image classifier.

The zero-shot head follows the CLIP / WiSE-FT recipe exactly. For each class ``c`` with prompts
``t_1..t_K`` (templates filled with the class name, or free-form descriptions):

1. encode every prompt and L2-normalise each embedding;
2. average the K embeddings and L2-normalise the mean;
3. stack the class vectors and multiply by ``exp(logit_scale)``; the bias is zero.

The head L2-normalises image features before the linear map, so its logits are
``exp(logit_scale) * cos(image, class)``. Fine-tuning starts from this head, which is what makes
WiSE-FT interpolation work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

import torch
import torch.nn.functional as F
from torch import nn

from .loading import ClipModel

if TYPE_CHECKING:
    from ..data.base import RFTDataset

ClassPrompts = Union[str, Sequence[str]]


class ZeroShotHead(nn.Module):
    """A linear classifier over L2-normalised features (``normalize=False`` skips that step)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, normalize: bool = True):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        b = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if bias is None else bias
        self.bias = nn.Parameter(b.detach().clone())
        self.normalize = normalize

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            features = F.normalize(features, dim=-1)
        return F.linear(features, self.weight, self.bias)


class ImageClassifier(nn.Module):
    """Image tower + head: ``logits = head(visual(images))``.

    The ``visual`` submodule keeps open_clip's parameter names, so ``visual.*`` keys of its state
    dict load straight into an open_clip CLIP.
    """

    def __init__(self, visual: nn.Module, head: nn.Module):
        super().__init__()
        self.visual = visual
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(images))


def class_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """Fill every template with every class name: one list of prompts per class."""
    return [[t.format(name) for t in templates] for name in classnames]


def _as_prompt_lists(prompts: Sequence[ClassPrompts]) -> list[list[str]]:
    out = []
    for i, p in enumerate(prompts):
        items = [p] if isinstance(p, str) else list(p)
        if not items or not all(isinstance(s, str) and s for s in items):
            raise ValueError(f"class {i}: prompts must be a non-empty string or list of strings, got {p!r}")
        out.append(items)
    return out


def encode_class_prompts(
    clip: ClipModel, prompts: Sequence[ClassPrompts], *, batch_size: int = 256, grad: bool = False,
) -> torch.Tensor:
    """Unit-norm class embeddings (C, D): normalise each prompt, average per class, renormalise.

    Identical prompt strings are encoded once. With ``grad=True`` the result is differentiable
    with respect to the text tower (used by methods that train it, e.g. FLYP and DRM).
    """
    lists = _as_prompt_lists(prompts)
    unique = sorted({s for items in lists for s in items})
    position = {s: i for i, s in enumerate(unique)}
    device = clip.device
    with torch.set_grad_enabled(grad):
        chunks = []
        for start in range(0, len(unique), batch_size):
            tokens = clip.tokenizer(unique[start:start + batch_size]).to(device)
            chunks.append(F.normalize(clip.model.encode_text(tokens).float(), dim=-1))
        embeddings = torch.cat(chunks)
        index = torch.tensor([position[s] for items in lists for s in items], device=device)
        owner = torch.tensor([c for c, items in enumerate(lists) for _ in items], device=device)
        sums = torch.zeros(len(lists), embeddings.shape[1], device=device).index_add(0, owner, embeddings[index])
        return F.normalize(sums, dim=-1)


def build_zeroshot_head(
    clip: ClipModel, classnames: Sequence[str] | None = None, templates: Sequence[str] | None = None, *,
    prompts: Sequence[ClassPrompts] | None = None, batch_size: int = 256,
) -> ZeroShotHead:
    """The zero-shot head of ``clip`` for a set of classes.

    Args:
        clip: the model whose text tower and logit scale build the head.
        classnames, templates: fill each template (one ``{}``) with each class name.
        prompts: alternatively, per class one prompt string or a list of them (e.g. DRM concept
            descriptions). Exactly one of ``prompts`` or ``classnames``+``templates`` is given.

    Returns:
        A :class:`ZeroShotHead` whose rows have norm ``exp(logit_scale)`` and zero bias.
    """
    if (prompts is None) == (classnames is None or templates is None):
        raise ValueError("give either prompts=... or both classnames and templates")
    if prompts is None:
        prompts = class_prompts(classnames, templates)
    with torch.no_grad():
        weight = encode_class_prompts(clip, prompts, batch_size=batch_size) * clip.logit_scale().float()
    return ZeroShotHead(weight)


def build_image_classifier(clip: ClipModel, head: ZeroShotHead) -> ImageClassifier:
    """An :class:`ImageClassifier` sharing ``clip``'s image tower (not a copy)."""
    return ImageClassifier(clip.visual, head.to(clip.device))


class SplitAwareClassifier(nn.Module):
    """An evaluation model whose outputs depend on the split beyond its images.

    ImageNet-R/A label 200 of the 1000 classes and ObjectNet 113 groups of them
    (``dataset.info["logit_projection"]``); :func:`rftlib.evaluate.evaluate` masks the *final*
    logits to them. That is right for one head, not for a model that combines several outputs
    nonlinearly: DRM mixes two softmaxes, and its release restricts each head to the split's classes
    *before* the softmax. Such a model subclasses this and returns from :meth:`for_split` the module
    to evaluate on a split (a view sharing its weights); :func:`rftlib.evaluate.evaluate` always
    evaluates that view. Masking its outputs again afterwards changes nothing.
    """

    def for_split(self, dataset: RFTDataset, split: str) -> nn.Module:
        raise NotImplementedError


def for_split(model: nn.Module, dataset: RFTDataset, split: str) -> nn.Module:
    """The module that evaluates ``split``: a :class:`SplitAwareClassifier`'s view of it, else ``model``."""
    return model.for_split(dataset, split) if isinstance(model, SplitAwareClassifier) else model
