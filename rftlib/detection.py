"""Open-set (OOD) detection: per-example scores and the metrics computed from them.

A detector accepts an image as in-distribution (ID) when its score is at least a threshold, so
every score here is oriented "larger = more in-distribution" and ID is the positive class, as in
:mod:`rftlib.metrics` (AUROC, FPR at 95 % TPR, AUPR-In/Out; :func:`rftlib.metrics.threshold_at_tpr`
is the threshold that keeps 95 % of ID images). The scores:

* ``msp`` -- the maximum softmax probability (Hendrycks & Gimpel, ICLR 2017);
* ``energy`` -- ``T * logsumexp(logits / T)``, minus the free energy of the logits (Liu, Wang,
  Owens & Li, NeurIPS 2020); unlike the MSP it keeps the logits' scale;
* ``knn`` -- minus the squared distance from the normalised feature to its k-th nearest
  normalised ID training feature (Sun, Ming, Zhu & Li, ICML 2022); it needs that feature bank.

:func:`detection_scores` computes them for a classifier whose logits are a function of a feature
(:class:`FeatureClassifier`; CRoFT's is one) on an ID reference split and any number of open-set
splits, as a tidy frame (``score, is_ood, kind, split``) that :func:`rftlib.viz.detection_histogram`
plots; :func:`detection_metrics` turns that frame into ``<kind>_<metric>`` numbers per open-set
split. Nothing here knows a method: :mod:`rftlib.methods.croft` builds on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .data.base import Split
from .data.pipeline import ImageSpec
from .evaluate import encode_split
from .metrics import ood_detection_metrics

SCORES = ("energy", "knn", "msp")
ID_REFERENCES = ("all", "correct")


# --------------------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------------------
def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T * logsumexp(logits / T)`` per row (minus the free energy; larger = more in-distribution)."""
    return temperature * torch.logsumexp(logits.float() / temperature, dim=1)


def msp_score(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability per row."""
    return logits.float().softmax(dim=1).max(dim=1).values


def knn_score(features: torch.Tensor, bank: torch.Tensor, k: int = 10, chunk: int = 2048) -> torch.Tensor:
    """Minus the squared L2 distance from each normalised feature to its k-th nearest bank feature.

    Both sides are L2-normalised, so the squared distance is ``2 - 2 cos``. A query that is in the
    bank has distance 0 to itself (its k = 1 score is 0).

    Raises:
        ValueError: the bank has fewer than ``k`` features.
    """
    if len(bank) < k:
        raise ValueError(f"the KNN bank has {len(bank)} features, fewer than k={k}; lower knn_k")
    q, b = F.normalize(features.float(), dim=-1), F.normalize(bank.float(), dim=-1)
    out = []
    for start in range(0, len(q), chunk):
        d2 = (2.0 - 2.0 * q[start:start + chunk] @ b.T).clamp_min(0.0)
        out.append(-d2.topk(k, dim=1, largest=False).values[:, -1])
    return torch.cat(out) if out else torch.empty(0)


def scores_from(kind: str, logits: torch.Tensor, features: torch.Tensor, *, bank: torch.Tensor | None = None,
                k: int = 10, temperature: float = 1.0) -> torch.Tensor:
    """One detection score of ``kind`` (one of :data:`SCORES`) per example, from logits and features."""
    if kind == "energy":
        return energy_score(logits, temperature)
    if kind == "msp":
        return msp_score(logits)
    if kind == "knn":
        if bank is None:
            raise ValueError("the knn score needs a feature bank (normalised ID training features): "
                             "pass bank=... or use a classifier from a run whose scores include knn")
        return knn_score(features, bank, k)
    raise ValueError(f"unknown score {kind!r}; valid: {', '.join(SCORES)}")


# --------------------------------------------------------------------------------------------------
# a classifier's scores on whole splits
# --------------------------------------------------------------------------------------------------
class FeatureClassifier(Protocol):
    """What :func:`detection_scores` needs of a classifier (an ``nn.Module``).

    Attributes:
        bank: normalised ID training features for the ``knn`` score (``None``: not computed).
        knn_k: the k of the ``knn`` score.
    """

    bank: torch.Tensor | None
    knn_k: int

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images -> the (normalised) features the logits are computed from."""

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Features -> class logits."""


class _Features(nn.Module):
    """``images -> features`` of a :class:`FeatureClassifier`, as a module for ``encode_split``."""

    def __init__(self, classifier: FeatureClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


def split_outputs(classifier: FeatureClassifier, split: Split, spec: ImageSpec, *,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, features)`` of a split, on the CPU, from one pass over its images.

    ``device``: where ``classifier`` lives (default: where its parameters are).
    """
    module = _Features(classifier)
    feats = encode_split(module, split, spec, device=device)
    where = torch.device(device) if device is not None else next(module.parameters()).device
    with torch.no_grad():
        return classifier.logits_from_features(feats.to(where)).cpu(), feats


def detection_scores(
    classifier: FeatureClassifier, id_split: Split, ood_splits: Mapping[str, Split], spec: ImageSpec, *,
    kinds: Sequence[str] = ("energy",), bank: torch.Tensor | None = None, k: int | None = None,
    temperature: float = 1.0, id_reference: str = "all", device: torch.device | str | None = None,
) -> pd.DataFrame:
    """Per-example detection scores, e.g. for a threshold widget.

    Args:
        classifier: a :class:`FeatureClassifier` (e.g. a CRoFT run's ``RunResult.classifier``).
        id_split: the in-distribution reference split (e.g. ``dataset.split("id_test")``).
        ood_splits: name -> open-set split (e.g. synthwild's ``openset``).
        spec: the model's :class:`~rftlib.data.pipeline.ImageSpec`.
        kinds: scores to compute (of :data:`SCORES`); larger = more in-distribution.
        bank: normalised ID training features for ``knn``; default: the classifier's ``bank``.
        k: k of the KNN score (default: the classifier's ``knn_k``).
        temperature: energy temperature.
        id_reference: ``all`` ID examples or only the ``correct``ly classified ones (as CRoFT's paper).
        device: where ``classifier`` lives (default: where its parameters are).

    Returns:
        A frame with columns ``score, is_ood, kind, split`` (one row per example and kind).
    """
    if id_reference not in ID_REFERENCES:
        raise ValueError(f"unknown id_reference {id_reference!r}; valid: {', '.join(ID_REFERENCES)}")
    bank = classifier.bank if bank is None else bank
    k = classifier.knn_k if k is None else k
    frames = []
    for name, split, is_ood in [(id_split.name, id_split, False), *[(n, s, True) for n, s in ood_splits.items()]]:
        logits, feats = split_outputs(classifier, split, spec, device=device)
        keep = np.ones(len(split), bool)
        if not is_ood and id_reference == "correct":
            keep = logits.argmax(1).numpy() == split.labels
        for kind in kinds:
            values = scores_from(kind, logits, feats, bank=bank, k=k, temperature=temperature).numpy()[keep]
            frames.append(pd.DataFrame({"score": values, "is_ood": is_ood, "kind": kind, "split": name}))
    return pd.concat(frames, ignore_index=True)


def detection_metrics(scores: pd.DataFrame, *, fpr_convention: str = "exact") -> dict[str, dict[str, float]]:
    """``{ood split: {"<kind>_auroc": ..., "<kind>_fpr95": ..., ...}}`` from :func:`detection_scores`'s frame.

    Each open-set split is measured against the ID rows of the same kind
    (:func:`rftlib.metrics.ood_detection_metrics`; ``fpr_convention`` as there).
    """
    out: dict[str, dict[str, float]] = {}
    ident = scores[~scores.is_ood]
    for (split, kind), ood in scores[scores.is_ood].groupby(["split", "kind"], sort=False):
        ref = ident[ident.kind == kind].score.to_numpy()
        metrics = ood_detection_metrics(ref, ood.score.to_numpy(), fpr_convention=fpr_convention)
        out.setdefault(split, {}).update({f"{kind}_{m}": v for m, v in metrics.items()})
    return out
