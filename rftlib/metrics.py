"""Evaluation metrics for classification, distribution shift and OOD detection (numpy only).

Every function accepts numpy arrays, python lists or CPU/GPU torch tensors and returns plain python
floats (or dicts of them), so results can go straight into :mod:`rftlib.results`.

Conventions worth knowing:

* **Macro averages follow WILDS.** ``macro_f1`` and ``macro_recall`` average over the classes that
  are *present in* ``y_true`` only. A class that is never the true label but is sometimes predicted
  therefore does not drag the average down with a zero, though its false positives still lower the
  precision of the classes it was confused with. This is what WILDS' iWildCam leaderboard reports
  (it calls ``sklearn.metrics.f1_score(..., labels=unique(y_true))``).
* **Worst-group numbers only look at groups that occur.** An empty group has no accuracy.
* **OOD detection treats in-distribution (ID) as the positive class**: a higher score means "more
  in-distribution" (e.g. the maximum softmax probability). FPR@95 is the fraction of OOD samples
  accepted when the threshold keeps 95% of the ID samples.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    import pandas as pd

FMOW_REGIONS = ("Asia", "Europe", "Africa", "Americas", "Oceania", "Other")
"""The region names WILDS uses for FMoW; "Other" (unmapped countries) is excluded from worst-region."""


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _to_numpy(values: Any) -> np.ndarray:
    """Convert arrays, lists or torch tensors (any device) to a 1-D numpy array.

    Args:
        values: Anything array-like; tensors are detached and moved to the CPU first.

    Returns:
        A flattened numpy array.
    """
    if hasattr(values, "detach"):  # torch.Tensor without importing torch
        values = values.detach().cpu().numpy()
    return np.asarray(values).reshape(-1)


def _check_pair(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Convert labels and predictions to numpy and check they describe the same examples.

    Args:
        y_true: Ground-truth labels.
        y_pred: Predicted labels.

    Returns:
        ``(y_true, y_pred)`` as 1-D numpy arrays.

    Raises:
        ValueError: If the lengths differ or there are no examples.
    """
    true, pred = _to_numpy(y_true), _to_numpy(y_pred)
    if true.shape != pred.shape:
        raise ValueError(f"y_true has {true.size} entries but y_pred has {pred.size}")
    if true.size == 0:
        raise ValueError("cannot compute a metric on zero examples")
    return true, pred


def _per_class_counts(
    y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count true positives, false positives and false negatives for each label.

    Args:
        y_true: Ground-truth labels.
        y_pred: Predicted labels.
        labels: The classes to count, shape ``(k,)``.

    Returns:
        ``(tp, fp, fn)``, each an integer array of shape ``(k,)``.
    """
    is_true = y_true[:, None] == labels[None, :]  # (n, k) one-hot of the truth
    is_pred = y_pred[:, None] == labels[None, :]
    tp = np.sum(is_true & is_pred, axis=0)
    fp = np.sum(~is_true & is_pred, axis=0)
    fn = np.sum(is_true & ~is_pred, axis=0)
    return tp, fp, fn


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise division that yields 0 where the denominator is 0 (sklearn's zero_division=0)."""
    out = np.zeros(numerator.shape, dtype=float)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


# --------------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------------
def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of examples whose prediction equals the label.

    Args:
        y_true: Ground-truth labels, one per example.
        y_pred: Predicted labels, same length.

    Returns:
        The accuracy in ``[0, 1]``.
    """
    true, pred = _check_pair(y_true, y_pred)
    return float(np.mean(true == pred))


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike, labels: ArrayLike | None = None) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``y_true`` (WILDS semantics).

    Per class, ``F1 = 2 tp / (2 tp + fp + fn)``, taken as 0 when the denominator is 0. This equals
    ``sklearn.metrics.f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true),
    zero_division=0)``.

    Args:
        y_true: Ground-truth labels.
        y_pred: Predicted labels.
        labels: Classes to average over; defaults to the distinct values of ``y_true``.

    Returns:
        The macro F1 in ``[0, 1]``.
    """
    true, pred = _check_pair(y_true, y_pred)
    classes = np.unique(true) if labels is None else _to_numpy(labels)
    tp, fp, fn = _per_class_counts(true, pred, classes)
    return float(np.mean(_safe_divide(2 * tp, 2 * tp + fp + fn)))


def macro_recall(y_true: ArrayLike, y_pred: ArrayLike, labels: ArrayLike | None = None) -> float:
    """Unweighted mean of per-class recall (balanced accuracy) over the classes present in ``y_true``.

    Args:
        y_true: Ground-truth labels.
        y_pred: Predicted labels.
        labels: Classes to average over; defaults to the distinct values of ``y_true``.

    Returns:
        The macro recall in ``[0, 1]``.
    """
    true, pred = _check_pair(y_true, y_pred)
    classes = np.unique(true) if labels is None else _to_numpy(labels)
    tp, _, fn = _per_class_counts(true, pred, classes)
    return float(np.mean(_safe_divide(tp, tp + fn)))


def group_accuracy(y_true: ArrayLike, y_pred: ArrayLike, groups: ArrayLike) -> dict[Hashable, float]:
    """Accuracy within each group that occurs in ``groups``.

    Args:
        y_true: Ground-truth labels.
        y_pred: Predicted labels.
        groups: One group value per example (e.g. a region name or a year).

    Returns:
        ``{group value: accuracy}`` for every present group, keys in sorted order and converted to
        python scalars (``np.int64(3)`` becomes ``3``).
    """
    true, pred = _check_pair(y_true, y_pred)
    group_arr = _to_numpy(groups)
    if group_arr.shape != true.shape:
        raise ValueError(f"groups has {group_arr.size} entries but y_true has {true.size}")
    correct = true == pred
    return {
        _python_scalar(value): float(np.mean(correct[group_arr == value]))
        for value in np.unique(group_arr)
    }


def _python_scalar(value: Any) -> Hashable:
    """Turn numpy scalars into their python equivalent so dict keys print and compare naturally."""
    return value.item() if isinstance(value, np.generic) else value


def worst_group_accuracy(
    y_true: ArrayLike, y_pred: ArrayLike, groups: ArrayLike, exclude: Iterable[Hashable] = ()
) -> float:
    """Lowest per-group accuracy over the present groups, ignoring those listed in ``exclude``.

    Args:
        y_true: Ground-truth labels.
        y_pred: Predicted labels.
        groups: One group value per example.
        exclude: Group values to leave out (FMoW leaves out the region "Other").

    Returns:
        The minimum group accuracy.

    Raises:
        ValueError: If no group is left after exclusion.
    """
    skipped = set(exclude)
    per_group = {g: acc for g, acc in group_accuracy(y_true, y_pred, groups).items() if g not in skipped}
    if not per_group:
        raise ValueError(f"no group left after excluding {sorted(map(str, skipped))}")
    return min(per_group.values())


def classification_metrics(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """The three headline classification numbers in one dict.

    Args:
        y_true: Ground-truth labels.
        y_pred: Predicted labels.

    Returns:
        ``{"accuracy", "macro_f1", "macro_recall"}``.
    """
    return {
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred),
        "macro_recall": macro_recall(y_true, y_pred),
    }


def wilds_iwildcam_metrics(y_true: ArrayLike, y_pred: ArrayLike, metadata: pd.DataFrame) -> dict[str, float]:
    """The metrics of ``IWildCamDataset.eval`` (``acc_avg``, ``recall-macro_all``, ``F1-macro_all``).

    Args:
        y_true: Ground-truth labels.
        y_pred: Predicted labels.
        metadata: Per-example metadata; accepted for a uniform dataset-metric signature but unused
            (iWildCam's official metrics do not group by location).

    Returns:
        ``{"accuracy", "macro_f1", "macro_recall"}``; macro F1 is the official leaderboard metric.
    """
    del metadata
    return classification_metrics(y_true, y_pred)


def fmow_metrics(y_true: ArrayLike, y_pred: ArrayLike, metadata: pd.DataFrame) -> dict[str, float]:
    """The metrics of ``FMoWDataset.eval``: average, worst-region and worst-year accuracy.

    Args:
        y_true: Ground-truth labels.
        y_pred: Predicted labels.
        metadata: One row per example with a ``region`` column holding names (see
            :data:`FMOW_REGIONS`) and a ``year`` column holding calendar years.

    Returns:
        ``accuracy``, ``acc_worst_region`` (over present regions except "Other"),
        ``acc_worst_year`` (over present years) and one ``acc_region:<name>`` per present region.
    """
    regions = metadata["region"].to_numpy()
    per_region = group_accuracy(y_true, y_pred, regions)
    results = {
        "accuracy": accuracy(y_true, y_pred),
        "acc_worst_region": worst_group_accuracy(y_true, y_pred, regions, exclude=("Other",)),
        "acc_worst_year": worst_group_accuracy(y_true, y_pred, metadata["year"].to_numpy()),
    }
    results.update({f"acc_region:{name}": acc for name, acc in per_region.items()})
    return results


def softmax(logits: ArrayLike, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (the maximum is subtracted before exponentiating).

    Args:
        logits: Unnormalised scores, any shape.
        axis: The axis that holds the classes.

    Returns:
        Probabilities of the same shape, summing to 1 along ``axis``.
    """
    if hasattr(logits, "detach"):
        logits = logits.detach().cpu().numpy()
    z = np.asarray(logits, dtype=float)
    z = z - np.max(z, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def expected_calibration_error(probs: ArrayLike, y_true: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error with equal-width bins over the confidence (max probability).

    ``ECE = sum_b (n_b / n) * |accuracy_b - mean confidence_b|`` with bins ``(0, 1/B], ...,
    ((B-1)/B, 1]``; empty bins contribute nothing.

    Args:
        probs: Class probabilities, shape ``(n, num_classes)``.
        y_true: Ground-truth labels, shape ``(n,)``.
        n_bins: Number of bins ``B``.

    Returns:
        The ECE in ``[0, 1]``.
    """
    if hasattr(probs, "detach"):
        probs = probs.detach().cpu().numpy()
    p = np.asarray(probs, dtype=float)
    labels = _to_numpy(y_true)
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin b holds confidences in (edges[b], edges[b + 1]]; a confidence of exactly 0 joins bin 0
    bin_index = np.digitize(confidence, edges[1:-1], right=True)
    ece = 0.0
    for b in np.unique(bin_index):
        in_bin = bin_index == b
        ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


# --------------------------------------------------------------------------------------------------
# OOD detection (higher score = more in-distribution)
# --------------------------------------------------------------------------------------------------
def _check_scores(scores_id: ArrayLike, scores_ood: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Convert the two score sets to float arrays, refusing empty ones."""
    s_id, s_ood = _to_numpy(scores_id).astype(float), _to_numpy(scores_ood).astype(float)
    if s_id.size == 0 or s_ood.size == 0:
        raise ValueError("need at least one ID score and one OOD score")
    return s_id, s_ood


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks where tied values share the mean of the ranks they span.

    Args:
        values: Scores to rank.

    Returns:
        A float array of ranks (e.g. ``[10, 20, 20, 30]`` -> ``[1, 2.5, 2.5, 4]``).
    """
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)  # rank of the last member of each tie block
    return (last_rank - (counts - 1) / 2.0)[inverse]


def auroc(scores_id: ArrayLike, scores_ood: ArrayLike) -> float:
    """Area under the ROC curve for separating ID (positive) from OOD samples.

    Computed as the Mann-Whitney U statistic: the probability that a random ID sample scores higher
    than a random OOD sample, counting ties as one half.

    Args:
        scores_id: Scores of in-distribution samples.
        scores_ood: Scores of out-of-distribution samples.

    Returns:
        AUROC in ``[0, 1]``; 0.5 is chance.
    """
    s_id, s_ood = _check_scores(scores_id, scores_ood)
    ranks = _average_ranks(np.concatenate([s_id, s_ood]))
    n_id, n_ood = s_id.size, s_ood.size
    u_statistic = ranks[:n_id].sum() - n_id * (n_id + 1) / 2.0
    return float(u_statistic / (n_id * n_ood))


def threshold_at_tpr(scores_id: ArrayLike, tpr: float = 0.95) -> float:
    """The acceptance threshold ("ID when ``score >= threshold``") that keeps a fraction ``tpr`` of ID data.

    It is the largest ID score such that at least ``ceil(tpr * n_id)`` ID scores are ``>=`` it,
    found exactly by sorting (no interpolation): with 20 ID scores and ``tpr=0.95`` it is the
    second lowest, which keeps 19 of them.

    Args:
        scores_id: Scores of in-distribution samples (at least one).
        tpr: Target true-positive rate in ``(0, 1]``.

    Returns:
        The threshold, one of the ID scores.
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    s_id = _to_numpy(scores_id).astype(float)
    if s_id.size == 0:
        raise ValueError("need at least one ID score")
    n_keep = math.ceil(tpr * s_id.size - 1e-9)  # tolerance: 0.95 * 20 must give 19, not 20
    return float(np.sort(s_id)[s_id.size - n_keep])


FPR_CONVENTIONS = ("exact", "percentile")
"""How FPR@TPR places its threshold: ``exact`` (rftlib's default) takes the ID order statistic
that keeps ``ceil(tpr * n)`` ID scores and counts OOD scores ``>=`` it (ties accepted, as the ID
ones are); ``percentile`` is CRoFT's released evaluator: the linearly interpolated
``100 * (1 - tpr)``-th percentile of the ID scores, counting OOD scores strictly above it. They
differ on small ID sets and on ties (0.575 vs 0.500 with 46 ID samples in CRoFT's setting)."""


def fpr_at_tpr(scores_id: ArrayLike, scores_ood: ArrayLike, tpr: float = 0.95, *,
               convention: str = "exact") -> float:
    """False-positive rate on OOD data at the threshold that accepts a fraction ``tpr`` of ID data.

    Args:
        scores_id: Scores of in-distribution samples.
        scores_ood: Scores of out-of-distribution samples.
        tpr: Target true-positive rate in ``(0, 1]``.
        convention: where the threshold goes and how ties count (:data:`FPR_CONVENTIONS`):
            ``exact`` = :func:`threshold_at_tpr` and OOD ``>=`` it; ``percentile`` = CRoFT's.

    Returns:
        The FPR in ``[0, 1]``; lower is better.
    """
    s_id, s_ood = _check_scores(scores_id, scores_ood)
    if convention == "exact":
        return float(np.mean(s_ood >= threshold_at_tpr(s_id, tpr)))
    if convention == "percentile":
        if not 0.0 < tpr <= 1.0:
            raise ValueError(f"tpr must be in (0, 1], got {tpr}")
        return float(np.mean(s_ood > np.percentile(s_id, 100.0 * (1.0 - tpr))))
    raise ValueError(f"unknown FPR convention {convention!r}; valid: {', '.join(FPR_CONVENTIONS)}")


def _average_precision(scores: np.ndarray, is_positive: np.ndarray) -> float:
    """Average precision ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds, as sklearn does.

    Args:
        scores: Scores, higher meaning "more positive".
        is_positive: Boolean mask of the positive samples.

    Returns:
        The average precision.
    """
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, hits = scores[order], is_positive[order].astype(float)
    # the last index of each block of equal scores: one operating point per distinct threshold
    block_end = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    true_pos = np.cumsum(hits)[block_end]
    precision = true_pos / (block_end + 1)
    recall = true_pos / true_pos[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr(scores_id: ArrayLike, scores_ood: ArrayLike, positive: str = "id") -> float:
    """Area under the precision-recall curve (average precision).

    Args:
        scores_id: Scores of in-distribution samples.
        scores_ood: Scores of out-of-distribution samples.
        positive: ``"id"`` for AUPR-In (ID positive, scores as given) or ``"ood"`` for AUPR-Out
            (OOD positive, scores negated so that higher means "more OOD").

    Returns:
        The average precision in ``[0, 1]``; chance level is the positive class' share.
    """
    s_id, s_ood = _check_scores(scores_id, scores_ood)
    scores = np.concatenate([s_id, s_ood])
    is_id = np.r_[np.ones(s_id.size, bool), np.zeros(s_ood.size, bool)]
    if positive == "id":
        return _average_precision(scores, is_id)
    if positive == "ood":
        return _average_precision(-scores, ~is_id)
    raise ValueError(f"positive must be 'id' or 'ood', got {positive!r}")


def ood_detection_metrics(scores_id: ArrayLike, scores_ood: ArrayLike, *,
                          fpr_convention: str = "exact") -> dict[str, float]:
    """The standard OOD-detection summary.

    Args:
        scores_id: Scores of in-distribution samples (higher = more ID).
        scores_ood: Scores of out-of-distribution samples.
        fpr_convention: :data:`FPR_CONVENTIONS` (``percentile`` reproduces CRoFT's evaluator).

    Returns:
        ``{"auroc", "fpr95", "aupr_in", "aupr_out"}``.
    """
    return {
        "auroc": auroc(scores_id, scores_ood),
        "fpr95": fpr_at_tpr(scores_id, scores_ood, tpr=0.95, convention=fpr_convention),
        "aupr_in": aupr(scores_id, scores_ood, positive="id"),
        "aupr_out": aupr(scores_id, scores_ood, positive="ood"),
    }
