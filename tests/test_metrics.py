"""Tests for rftlib.metrics: hand-computed cases, sklearn parity, and parity with WILDS' own eval."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, recall_score, roc_auc_score

from rftlib import metrics
from tests.fakes import import_wilds_quietly, install_torch_scatter_standin, make_fake_fmow, make_fake_iwildcam


# --------------------------------------------------------------------------------------------------
# classification, by hand
# --------------------------------------------------------------------------------------------------
def test_accuracy_by_hand():
    assert metrics.accuracy([0, 1, 1, 2], [0, 1, 2, 2]) == pytest.approx(0.75)
    assert metrics.accuracy(torch.tensor([1, 2]), np.array([1, 2])) == 1.0


def test_accuracy_rejects_mismatched_or_empty_inputs():
    with pytest.raises(ValueError, match="entries"):
        metrics.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="zero examples"):
        metrics.accuracy([], [])


def test_macro_f1_and_recall_by_hand():
    # class 0: tp=1 fp=1 fn=1 -> F1 1/2, recall 1/2; class 1: tp=2 fp=1 fn=0 -> F1 4/5, recall 1;
    # class 2: tp=0 fp=0 fn=1 -> F1 0, recall 0
    y_true, y_pred = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    assert metrics.macro_f1(y_true, y_pred) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert metrics.macro_recall(y_true, y_pred) == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_macro_f1_ignores_classes_absent_from_y_true():
    # class 1 is only predicted, never true: it is not averaged in (WILDS semantics), so the
    # result is class 0's F1 = 2*1 / (2*1 + 0 + 1) = 2/3 rather than (2/3 + 0) / 2
    assert metrics.macro_f1([0, 0], [0, 1]) == pytest.approx(2 / 3)
    assert metrics.macro_f1([0, 0], [0, 1], labels=[0, 1]) == pytest.approx(1 / 3)


def test_macro_f1_matches_sklearn_on_random_predictions():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y_true = rng.integers(0, 12, size=200)
        y_pred = np.where(rng.random(200) < 0.4, y_true, rng.integers(0, 15, size=200))
        labels = np.unique(y_true)
        expected_f1 = f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)
        expected_recall = recall_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)
        assert metrics.macro_f1(y_true, y_pred) == pytest.approx(expected_f1)
        assert metrics.macro_recall(y_true, y_pred) == pytest.approx(expected_recall)


def test_group_accuracy_and_worst_group():
    y_true = [0, 1, 1, 0, 1, 1]
    y_pred = [0, 1, 0, 0, 0, 0]
    groups = ["a", "a", "b", "b", "c", "c"]
    assert metrics.group_accuracy(y_true, y_pred, groups) == {"a": 1.0, "b": 0.5, "c": 0.0}
    assert metrics.worst_group_accuracy(y_true, y_pred, groups) == 0.0
    assert metrics.worst_group_accuracy(y_true, y_pred, groups, exclude=("c",)) == 0.5
    with pytest.raises(ValueError, match="no group left"):
        metrics.worst_group_accuracy(y_true, y_pred, groups, exclude=("a", "b", "c"))


def test_group_accuracy_keys_are_python_scalars():
    result = metrics.group_accuracy([1, 1, 0], [1, 0, 0], np.array([2004, 2005, 2005]))
    assert result == {2004: 1.0, 2005: 0.5}
    assert all(type(key) is int for key in result)


def test_classification_and_iwildcam_metrics_keys():
    expected = {"accuracy", "macro_f1", "macro_recall"}
    assert set(metrics.classification_metrics([0, 1], [0, 0])) == expected
    assert metrics.wilds_iwildcam_metrics([0, 1], [0, 0], pd.DataFrame()) == metrics.classification_metrics(
        [0, 1], [0, 0]
    )


def test_fmow_metrics_by_hand():
    metadata = pd.DataFrame({
        "region": ["Asia", "Asia", "Europe", "Europe", "Other", "Other"],
        "year": [2016, 2016, 2016, 2017, 2017, 2017],
    })
    y_true = [0, 1, 2, 3, 4, 5]
    y_pred = [0, 1, 2, 0, 0, 0]
    result = metrics.fmow_metrics(y_true, y_pred, metadata)
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["acc_worst_region"] == pytest.approx(0.5)  # "Other" (0.0) is excluded
    assert result["acc_worst_year"] == pytest.approx(0.0)  # 2017: 0 of 3 right
    assert result["acc_region:Asia"] == 1.0
    assert result["acc_region:Other"] == 0.0
    assert "acc_region:Africa" not in result  # absent regions are not reported


# --------------------------------------------------------------------------------------------------
# probabilities and calibration
# --------------------------------------------------------------------------------------------------
def test_softmax_is_stable_and_normalised():
    probs = metrics.softmax(np.array([[0.0, np.log(3.0)], [1000.0, 1000.0 + np.log(3.0)]]))
    np.testing.assert_allclose(probs, [[0.25, 0.75], [0.25, 0.75]])
    np.testing.assert_allclose(metrics.softmax(np.zeros((2, 3)), axis=0).sum(axis=0), 1.0)


def test_expected_calibration_error_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    y_true = np.array([0, 1, 0, 1])
    # 5 bins: (0.8,1] {0.9 right}: |1-0.9|*1/4; (0.6,0.8] {0.8 wrong, 0.7 right}: |0.5-0.75|*2/4;
    # (0.4,0.6] {0.6 right}: |1-0.6|*1/4  ->  0.025 + 0.125 + 0.1
    assert metrics.expected_calibration_error(probs, y_true, n_bins=5) == pytest.approx(0.25)


def test_expected_calibration_error_is_zero_when_confident_and_right():
    probs = np.eye(3)[[0, 1, 2, 1]]
    assert metrics.expected_calibration_error(probs, [0, 1, 2, 1]) == pytest.approx(0.0)


# --------------------------------------------------------------------------------------------------
# OOD detection
# --------------------------------------------------------------------------------------------------
def test_auroc_by_hand_with_a_tie():
    # pairs (id, ood): (3,1) (3,2) (2,1) win, (2,2) tie counts one half -> 3.5 / 4
    assert metrics.auroc([3, 2], [1, 2]) == pytest.approx(0.875)
    assert metrics.auroc([5, 6], [1, 2]) == 1.0
    assert metrics.auroc([1, 2], [5, 6]) == 0.0


def test_fpr_at_tpr_by_hand():
    scores_id = np.arange(1, 21)  # keeping 95% of 20 = 19 scores puts the threshold at 2
    scores_ood = [0, 1.5, 2, 3, 25]
    assert metrics.fpr_at_tpr(scores_id, scores_ood) == pytest.approx(3 / 5)
    assert metrics.fpr_at_tpr(scores_id, scores_ood, tpr=1.0) == pytest.approx(4 / 5)  # threshold 1
    with pytest.raises(ValueError, match="tpr"):
        metrics.fpr_at_tpr(scores_id, scores_ood, tpr=0.0)


def test_aupr_by_hand():
    # ranked: 0.9 id, 0.6 ood, 0.4 id, 0.1 ood -> AP = 0.5 * 1 + 0.5 * 2/3
    assert metrics.aupr([0.9, 0.4], [0.6, 0.1]) == pytest.approx(0.5 + 1 / 3)
    with pytest.raises(ValueError, match="positive"):
        metrics.aupr([1.0], [0.0], positive="both")


def test_ood_metrics_match_sklearn_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(10):
        scores_id = np.round(rng.normal(0.5, 1.0, size=150), 1)  # rounding creates many ties
        scores_ood = np.round(rng.normal(0.0, 1.0, size=90), 1)
        labels = np.r_[np.ones(150), np.zeros(90)]
        scores = np.r_[scores_id, scores_ood]
        result = metrics.ood_detection_metrics(scores_id, scores_ood)
        assert set(result) == {"auroc", "fpr95", "aupr_in", "aupr_out"}
        assert result["auroc"] == pytest.approx(roc_auc_score(labels, scores))
        assert result["aupr_in"] == pytest.approx(average_precision_score(labels, scores))
        assert result["aupr_out"] == pytest.approx(average_precision_score(1 - labels, -scores))
        threshold = np.sort(scores_id)[150 - 143]  # ceil(0.95 * 150) = 143 ID scores kept
        assert result["fpr95"] == pytest.approx(np.mean(scores_ood >= threshold))


# --------------------------------------------------------------------------------------------------
# parity with WILDS' own evaluation, on fabricated datasets
# --------------------------------------------------------------------------------------------------
def test_torch_scatter_standin_matches_group_means():
    scatter = install_torch_scatter_standin().scatter
    src, index = torch.tensor([1.0, 3.0, 10.0, 4.0]), torch.tensor([0, 0, 2, 0])
    expected_mean = torch.tensor([8 / 3, 0.0, 10.0, 0.0])  # group 1 and 3 are empty: 0, as in torch_scatter
    torch.testing.assert_close(scatter(src, index, dim_size=4, reduce="mean"), expected_mean)
    torch.testing.assert_close(scatter(src, index, reduce="sum"), torch.tensor([8.0, 0.0, 10.0]))


@pytest.fixture(scope="module")
def wilds_root(tmp_path_factory):
    """A WILDS root_dir holding fabricated iWildCam and FMoW trees."""
    root = tmp_path_factory.mktemp("wilds")
    make_fake_iwildcam(root, n_per_split=dict.fromkeys(("train", "val", "test", "id_val", "id_test"), 30))
    make_fake_fmow(root, n_per_split=dict.fromkeys(("train", "id_val", "id_test", "val", "test"), 40))
    return root


@pytest.fixture(scope="module")
def wilds_module():
    """The ``wilds`` package, imported offline with the torch_scatter stand-in in place."""
    install_torch_scatter_standin()
    return import_wilds_quietly()


def _noisy_predictions(y_true: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """Predictions that are right about half the time, otherwise a random class."""
    generator = torch.Generator().manual_seed(seed)
    random_labels = torch.randint(0, num_classes, y_true.shape, generator=generator)
    keep = torch.rand(y_true.shape, generator=generator) < 0.5
    return torch.where(keep, y_true, random_labels)


@pytest.mark.parametrize("split", ["train", "val", "test", "id_val", "id_test"])
def test_iwildcam_metrics_match_wilds_eval(wilds_root, wilds_module, split):
    dataset = wilds_module.get_dataset("iwildcam", root_dir=str(wilds_root), download=False)
    subset = dataset.get_subset(split)
    y_true, metadata = subset.y_array, subset.metadata_array
    y_pred = _noisy_predictions(y_true, dataset.n_classes, seed=len(split))
    expected, _ = dataset.eval(y_pred, y_true, metadata)
    ours = metrics.wilds_iwildcam_metrics(y_true.numpy(), y_pred.numpy(), pd.DataFrame())
    assert ours["accuracy"] == pytest.approx(float(expected["acc_avg"]))
    assert ours["macro_f1"] == pytest.approx(float(expected["F1-macro_all"]))
    assert ours["macro_recall"] == pytest.approx(float(expected["recall-macro_all"]))


def _fmow_metadata_frame(dataset, metadata: torch.Tensor) -> pd.DataFrame:
    """Decode WILDS' FMoW metadata tensor into region names and calendar years.

    WILDS stores region as an index into ``metadata_map["region"]``, whose order is the order of
    first appearance in rgb_metadata.csv (not a fixed list), and year as an index into
    ``metadata_map["year"]`` (2002, 2003, ...).
    """
    fields = dataset.metadata_fields
    region_idx = metadata[:, fields.index("region")].numpy()
    year_idx = metadata[:, fields.index("year")].numpy()
    return pd.DataFrame({
        "region": np.asarray(dataset.metadata_map["region"])[region_idx],
        "year": np.asarray(dataset.metadata_map["year"])[year_idx],
    })


@pytest.mark.parametrize("split", ["train", "id_val", "id_test", "val", "test"])
def test_fmow_metrics_match_wilds_eval(wilds_root, wilds_module, split):
    dataset = wilds_module.get_dataset("fmow", root_dir=str(wilds_root), download=False)
    subset = dataset.get_subset(split)
    y_true, metadata = subset.y_array, subset.metadata_array
    y_pred = _noisy_predictions(y_true, 4, seed=len(split))  # the fake uses FMoW's first 4 classes
    expected, _ = dataset.eval(y_pred, y_true, metadata)
    frame = _fmow_metadata_frame(dataset, metadata)
    assert "Other" in set(frame["region"])  # the exclusion rule is actually exercised
    ours = metrics.fmow_metrics(y_true.numpy(), y_pred.numpy(), frame)
    assert ours["accuracy"] == pytest.approx(float(expected["acc_avg"]))
    assert ours["acc_worst_region"] == pytest.approx(float(expected["acc_worst_region"]))
    assert ours["acc_worst_year"] == pytest.approx(float(expected["acc_worst_year"]))
    for key in (k for k in ours if k.startswith("acc_region:")):
        assert ours[key] == pytest.approx(float(expected[key]))  # same key naming as WILDS


def test_fpr_conventions_on_a_hand_computed_case():
    """Ten ID scores 1..10 at TPR 0.9. ``exact``: the threshold is the 2nd lowest ID score, 2, and
    OOD scores >= 2 count; ``percentile`` (CRoFT): the interpolated 10th percentile, 1.9, and OOD
    scores strictly above it count."""
    scores_id = np.arange(1.0, 11.0)
    scores_ood = np.array([1.9, 1.95, 2.0, 0.0])
    assert metrics.fpr_at_tpr(scores_id, scores_ood, 0.9) == pytest.approx(1 / 4)  # only 2.0
    assert metrics.fpr_at_tpr(scores_id, scores_ood, 0.9, convention="percentile") == pytest.approx(2 / 4)
    assert metrics.ood_detection_metrics(scores_id, scores_ood, fpr_convention="percentile")["fpr95"] == \
        pytest.approx(np.mean(scores_ood > np.percentile(scores_id, 5)))
    with pytest.raises(ValueError, match="unknown FPR convention 'strict'; valid: exact, percentile"):
        metrics.fpr_at_tpr(scores_id, scores_ood, convention="strict")
