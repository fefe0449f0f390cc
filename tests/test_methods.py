"""Methods: the spec's checklist (WiSE-FT end points, FLYP loss, probe head), the contract every registered
method module declares, and an end-to-end run of every registered method."""

import dataclasses
import inspect
import math
import re

import numpy as np
import pytest
import torch

from rftlib.data import list_datasets
from rftlib.methods import get_config, get_method, list_methods, run_method
from rftlib.methods.common import config_options
from rftlib.methods.flyp import contrastive_loss
from rftlib.methods.wiseft import merge_state_dicts, output_ensemble
from rftlib.registry import UnknownNameError
from rftlib.results import load

from .conftest import TINY_SCHEDULE, method_trains, tiny_overrides, trained_methods
from .helpers import tiny_clip

TINY = TINY_SCHEDULE


def test_merge_end_points_and_midpoint():
    zs = {"w": torch.randn(3, 4), "b": torch.zeros(3), "n": torch.tensor([7])}
    ft = {"w": torch.randn(3, 4), "b": torch.ones(3), "n": torch.tensor([7])}
    assert all(torch.equal(merge_state_dicts(zs, ft, 0.0)[k], zs[k]) for k in zs)
    assert all(torch.equal(merge_state_dicts(zs, ft, 1.0)[k], ft[k]) for k in zs)
    mid = merge_state_dicts(zs, ft, 0.5)
    assert torch.allclose(mid["w"], (zs["w"] + ft["w"]) / 2) and torch.allclose(mid["b"], torch.full((3,), 0.5))
    with pytest.raises(KeyError, match="different tensors"):
        merge_state_dicts(zs, {"w": ft["w"]}, 0.5)


def test_output_ensemble():
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    assert torch.equal(output_ensemble(a, b, 0.0), a)
    assert torch.allclose(output_ensemble(a, b, 0.25), 0.75 * a + 0.25 * b)
    probs = output_ensemble(a, b, 0.5, "probs").exp()
    assert torch.allclose(probs, 0.5 * a.softmax(-1) + 0.5 * b.softmax(-1), atol=1e-6)


def test_flyp_loss_on_a_hand_computed_example():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    scale = torch.tensor(2.0)
    u, v = img / img.norm(dim=1, keepdim=True), txt / txt.norm(dim=1, keepdim=True)
    sims = 2.0 * u @ v.T
    by_rows = -sum(math.log(math.exp(sims[i, i]) / sum(math.exp(sims[i, j]) for j in range(3))) for i in range(3)) / 3
    by_cols = -sum(math.log(math.exp(sims[i, i]) / sum(math.exp(sims[j, i]) for j in range(3))) for i in range(3)) / 3
    assert contrastive_loss(img, txt, scale).item() == pytest.approx(0.5 * (by_rows + by_cols), rel=1e-5)
    assert contrastive_loss(img, txt, scale).item() == pytest.approx(contrastive_loss(txt, img, scale).item())
    # masking same-label pairs removes them from the negatives
    labels = torch.tensor([0, 0, 1])
    assert contrastive_loss(img, txt, scale, labels) < contrastive_loss(img, txt, scale)


def test_registry_and_config_resolution():
    assert {"zeroshot", "finetune", "linear_probe", "lpft", "wiseft", "flyp"} <= set(list_methods())
    with pytest.raises(UnknownNameError, match="valid methods: .*finetune"):
        run_method("nope")
    cfg = get_config("finetune", "iwildcam", {"epochs": 2})
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.batch_size, cfg.train.weight_decay) == (2, 1e-5, 256, 0.2)
    assert get_config("finetune", "synthwild").train.lr == 3e-4
    with pytest.raises(UnknownNameError, match="valid options: .*label_smoothing"):
        get_config("finetune", "synthwild", {"learning_rate": 1})


def test_probe_head_equals_sklearn_on_normalised_features(data, tmp_path):
    from sklearn.linear_model import LogisticRegression

    from rftlib.methods.common import RunContext
    from rftlib.methods.linear_probe import image_features
    from rftlib.results import ResultsStore

    result = run_method("linear_probe", data=data, clip=tiny_clip(), out_dir=tmp_path, overrides={"C_grid": [1.0]})
    head = result.classifier.head
    assert head.normalize
    # refit sklearn with the chosen C and compare decision functions on normalised features
    ctx = RunContext(result.clip, data, torch.device("cpu"), ResultsStore(tmp_path / "r.db"), "r", "linear_probe")
    x_train, x_test = image_features(ctx, "train").numpy(), image_features(ctx, "test").numpy()
    ref = LogisticRegression(C=1.0, max_iter=300).fit(x_train, data.split("train").labels)
    with torch.no_grad():
        ours = head(torch.as_tensor(x_test))[:, torch.as_tensor(ref.classes_)].numpy()
    assert np.allclose(ours, ref.decision_function(x_test), atol=1e-3)


@pytest.mark.parametrize("method", list_methods())
def test_every_method_runs_and_records_results(method, data, tmp_path):
    """Every registered method, end to end on tiny synthwild with a one-epoch schedule where its
    config takes one (see ``tiny_overrides``), reports and records every ID/OOD split."""
    result = run_method(method, data=data, clip=tiny_clip(), out_dir=tmp_path / "ckpt",
                        overrides=tiny_overrides(method))
    eval_splits = {name for name, split in data.splits.items() if split.role in ("id", "ood")}
    assert (result.method, result.dataset) == (method, "synthwild")
    assert eval_splits <= set(result.metrics) <= set(data.splits)  # CRoFT also reports its open-set split
    assert all(0.0 <= result.metrics[s]["macro_f1"] <= 1.0 for s in eval_splits)
    rows = load(run_id=result.run_id)
    assert eval_splits <= set(rows.split) and {"id", "ood"} <= set(rows.role)
    assert (rows.method == method).all() and (rows.dataset == "synthwild").all()
    if method_trains(method):
        assert result.checkpoint is not None and result.checkpoint.exists()
        assert rows.epoch.notna().any()  # per-epoch evaluations were recorded


# ---------------------------------------------------------------------------------------------
# The method contract (rftlib/methods/__init__.py): what every registered module declares
# ---------------------------------------------------------------------------------------------
def _accepts(config_cls, key: str) -> bool:
    """``key`` is a flat override (``epochs``) or a dotted one into a nested config (``train.epochs``)."""
    if key in config_options(config_cls):
        return True
    head, _, rest = key.partition(".")
    nested = getattr(config_cls(), head, None) if rest else None
    return dataclasses.is_dataclass(nested) and _accepts(type(nested), rest)


@pytest.mark.parametrize("name", list_methods())
def test_every_registered_method_declares_the_contract(name):
    module = get_method(name)
    assert module.NAME == name
    # a dataclass Config that builds with no arguments (every knob has a default)
    assert dataclasses.is_dataclass(module.Config) and isinstance(module.Config, type)
    missing = [f.name for f in dataclasses.fields(module.Config)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    assert not missing, f"{name}.Config fields without a default: {missing}"
    module.Config()
    # PRESETS: dataset name -> overrides the config accepts, and each preset resolves (validation runs)
    assert isinstance(module.PRESETS, dict)
    assert set(module.PRESETS) <= set(list_datasets()), f"unknown datasets in {name}.PRESETS"
    for dataset, preset in module.PRESETS.items():
        unknown = [key for key in preset if not _accepts(module.Config, key)]
        assert not unknown, f"{name}.PRESETS[{dataset!r}] sets unknown options {unknown}"
        get_config(name, dataset)
    # run(ctx, cfg)
    assert callable(module.run)
    assert list(inspect.signature(module.run).parameters) == ["ctx", "cfg"]
    # a module docstring citing the paper: a quoted title and a year
    doc = module.__doc__ or ""
    assert re.search(r'"[^"]{10,}"', doc) and re.search(r"\b(19|20)\d\d\b", doc), \
        f"rftlib/methods/{name}.py's docstring must cite its paper (\"Title\", venue year)"


def test_the_train_rule_sees_the_methods_that_train():
    """The rule the smoke and resume tests derive from the configs (``method_trains``), checked on
    two methods that exist today, so a renamed ``train`` field cannot silently empty the resume test."""
    assert "finetune" in trained_methods() and "zeroshot" not in trained_methods()
    assert tiny_overrides("finetune") == TINY_SCHEDULE and tiny_overrides("zeroshot") == {}


def test_wiseft_sweeps_any_checkpoint(data, tmp_path):
    ft = run_method("finetune", data=data, clip=tiny_clip(), out_dir=tmp_path / "ft", overrides=TINY)
    wise = run_method("wiseft", data=data, clip=tiny_clip(), overrides={"finetuned": str(ft.checkpoint),
                                                                          "alphas": [0.0, 0.5, 1.0]})
    table = wise.extra["sweep"]
    f1 = table[table.metric == "macro_f1"].set_index(["alpha", "split"]).value
    zs = run_method("zeroshot", data=data, clip=tiny_clip())
    for split in ("id_test", "test"):  # alpha 0 is zero-shot, alpha 1 is the fine-tuned model
        assert f1[(0.0, split)] == pytest.approx(zs.metrics[split]["macro_f1"])
        assert f1[(1.0, split)] == pytest.approx(ft.metrics[split]["macro_f1"])
    rows = load(run_id=wise.run_id)
    assert sorted(rows.alpha.dropna().unique()) == [0.0, 0.5, 1.0]


def test_wiseft_on_a_contrastive_checkpoint_rebuilds_the_head(data, tmp_path):
    fl = run_method("flyp", data=data, clip=tiny_clip(), out_dir=tmp_path / "fl", overrides=TINY)
    wise = run_method("wiseft", data=data, clip=tiny_clip(), overrides={"finetuned": str(fl.checkpoint),
                                                                          "alphas": [1.0], "alpha": 1.0})
    assert wise.metrics["test"]["macro_f1"] == pytest.approx(fl.metrics["test"]["macro_f1"])
    out = run_method("wiseft", data=data, clip=tiny_clip(), overrides={
        "finetuned": str(fl.checkpoint), "alphas": [0.0, 1.0], "ensemble": "outputs"})
    assert out.metrics["test"]["macro_f1"] >= 0.0


def test_wiseft_forwards_the_schedule_to_its_base_run(data, tmp_path):
    wise = run_method("wiseft", data=data, clip=tiny_clip(), out_dir=tmp_path / "w",
                      overrides={"base_overrides": {"epochs": 1, "batch_size": 32, "warmup_steps": 2},
                                 "alphas": [0.0, 1.0]})
    runs = load()
    base = runs[(runs.method == "finetune") & runs.epoch.notna()]
    assert sorted(base.epoch.unique()) == [0]  # one epoch (0-based); the preset has 4
    import json

    config = json.loads(base.config_json.iloc[0])
    assert config["train"]["batch_size"] == 32 and config["train"]["warmup_steps"] == 2
    assert wise.checkpoint is not None and wise.checkpoint.exists()
    with pytest.raises(ValueError, match="nothing is trained"):
        run_method("wiseft", data=data, clip=tiny_clip(), overrides={"finetuned": str(wise.checkpoint),
                                                                      "base_overrides": {"epochs": 1}})


@pytest.mark.parametrize("method", ["flyp", "drm", "radapter"])
def test_contrastive_methods_refuse_gradient_accumulation(method):
    """Each micro-step would see only batch/accum negatives, a different loss from the papers'."""
    with pytest.raises(ValueError, match=f"accum_steps=2 with {method}: its contrastive loss"):
        get_config(method, "synthwild", {"accum_steps": 2})
    assert get_config("finetune", "synthwild", {"accum_steps": 2}).train.accum_steps == 2  # CE is fine


@pytest.mark.parametrize("dataset", ["iwildcam", "fmow", "imagenet"])
def test_fine_tuning_clips_gradients_at_one_on_real_data_as_wise_ft_does(dataset):
    for method in ("finetune", "lpft"):
        assert get_config(method, dataset).train.grad_clip == 1.0


def test_the_linear_probe_chooses_c_on_held_out_training_data_without_an_id_validation_split(data):
    """ImageNet's preset: no ID validation split, so C is chosen on a seeded tenth of train and the
    probe is refit on all of it (never chosen on the data it is fit on, never on test)."""
    from rftlib.methods.linear_probe import holdout_rows

    fit_rows, held = holdout_rows(100, 0.1, seed=0)
    assert len(held) == 10 and not set(fit_rows) & set(held) and len(fit_rows) + len(held) == 100
    assert (holdout_rows(100, 0.1, seed=0)[1] == held).all() and not (holdout_rows(100, 0.1, seed=1)[1] == held).all()
    assert get_config("linear_probe", "imagenet").select_split is None
    result = run_method("linear_probe", data=data, clip=tiny_clip(), overrides={"select_split": None,
                                                                                 "C_grid": [0.1, 10.0]})
    assert [row["C"] for row in result.extra["sweep"]] == [0.1, 10.0] and result.extra["C"] in (0.1, 10.0)
    with pytest.raises(ValueError, match="holdout=1.5"):
        get_config("linear_probe", "synthwild", {"holdout": 1.5})
