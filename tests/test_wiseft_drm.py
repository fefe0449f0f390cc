"""WiSE-FT over a DRM checkpoint evaluates DRM's own classifier (both heads, the beta mix), found
through the method registry's ``build_classifier`` declaration; one-head bases keep their numbers."""

import dataclasses
import json
import sys
import types

import pytest
import torch

from rftlib import methods
from rftlib.data.pipeline import ImageSpec
from rftlib.evaluate import evaluate
from rftlib.methods import MethodContractError, check_method_module, classifier_builder, get_method, run_method
from rftlib.methods.common import config_from_record, single_head_classifier
from rftlib.methods.drm import Config as DRMConfig
from rftlib.methods.drm import DualHeadClassifier, beta_sweep, build_dual_classifier
from rftlib.methods.wiseft import WiseModel, merge_state_dicts, zeroshot_state_for
from rftlib.models import ImageClassifier, ZeroShotHead, build_zeroshot_head, classifier_state
from rftlib.registry import Registry, UnknownNameError

from .helpers import tiny_clip

TINY = {"epochs": 1, "batch_size": 32, "warmup_steps": 2}
BETA = 0.7  # not DRM's default 0.5: WiSE-FT must use the beta the checkpoint was trained with


@pytest.fixture
def drm_run(data, tmp_path):
    return run_method("drm", data=data, clip=tiny_clip(), out_dir=tmp_path / "drm",
                      overrides={**TINY, "beta": BETA, "betas": [BETA]})


def wiseft_over(checkpoint, data, **overrides):
    return run_method("wiseft", data=data, clip=tiny_clip(), overrides={"finetuned": str(checkpoint), **overrides})


# ------------------------------------------------------------------------------------------------
# The declared contract
# ------------------------------------------------------------------------------------------------
def test_the_registry_hands_out_declared_builders_and_refuses_malformed_ones(monkeypatch):
    from rftlib.methods import drm

    assert classifier_builder("drm") is drm.build_classifier
    assert classifier_builder("finetune") is None and classifier_builder("flyp") is None  # one head: the default

    def module_with(builder):
        module = types.ModuleType("fake_method")
        module.build_classifier = builder
        return module

    def good(clip, state, dataset, cfg):
        return None

    assert check_method_module(module_with(good)).build_classifier is good
    want = r"fake_method.build_classifier must be a function build_classifier\(clip, state, dataset, cfg\)"
    with pytest.raises(MethodContractError, match=want + r".*takes \(clip, dataset\)"):
        check_method_module(module_with(lambda clip, dataset: None))
    with pytest.raises(MethodContractError, match="got a str"):
        check_method_module(module_with("drm"))
    with pytest.raises(MethodContractError, match=r"takes \(clip, state, dataset, cfg\)"):  # keyword-only cfg
        check_method_module(module_with(lambda clip, state, dataset, *, cfg: None))
    # get_method checks every module it hands out
    registry = Registry("method")
    registry.register("fake", "fake_method")
    monkeypatch.setattr(methods, "METHODS", registry)
    monkeypatch.setitem(sys.modules, "fake_method", module_with(lambda clip, state: None))
    with pytest.raises(MethodContractError, match="takes \\(clip, state\\)"):
        get_method("fake")


def test_a_recorded_config_comes_back_as_the_same_config():
    cfg = DRMConfig(beta=0.3, head_templates=("a {}.",), lam=2.0)
    record = json.loads(json.dumps(dataclasses.asdict(cfg)))  # what a sidecar holds: lists, nested dicts
    assert config_from_record(DRMConfig, record) == cfg
    with pytest.raises(UnknownNameError, match="'gamma'.*valid fields: .*beta"):
        config_from_record(DRMConfig, {**record, "gamma": 1})
    with pytest.raises(ValueError, match="beta"):  # the config's own checks run
        config_from_record(DRMConfig, {**record, "beta": 2.0})


# ------------------------------------------------------------------------------------------------
# WiSE-FT over DRM
# ------------------------------------------------------------------------------------------------
def test_wiseft_end_points_on_a_drm_checkpoint_are_drm_classifiers(data, drm_run):
    wise = wiseft_over(drm_run.checkpoint, data, alphas=[0.0, 1.0], alpha=1.0)
    assert wise.extra["base"].method == "drm" and wise.extra["base"].config.beta == BETA
    merged, spec = wise.extra["wise"], ImageSpec.of(drm_run.clip)
    # alpha = 1: the trained DRM classifier (both heads, mixed at the recorded beta), logit for logit
    at_one = merged.model_at(1.0)
    assert isinstance(at_one, DualHeadClassifier) and at_one.beta == BETA
    trained = evaluate(drm_run.classifier, data, "test", spec)
    torch.testing.assert_close(evaluate(at_one, data, "test", spec).logits, trained.logits)
    assert wise.metrics["test"] == pytest.approx(drm_run.metrics["test"])
    # alpha = 0: the zero-shot DRM classifier, both zero-shot heads mixed at the same beta
    zeroshot = build_dual_classifier(tiny_clip(), data.classnames, data.templates, data.descriptions, BETA)
    torch.testing.assert_close(evaluate(merged.model_at(0.0), data, "test", spec).logits,
                               evaluate(zeroshot, data, "test", spec).logits)
    table = wise.extra["sweep"]
    f1 = table[table.metric == "macro_f1"].set_index(["alpha", "split"]).value
    assert f1[(0.0, "test")] == pytest.approx(evaluate(zeroshot, data, "test", spec).metrics["macro_f1"])


def test_a_midpoint_rebuilds_both_heads_from_the_merged_text_tower(data, drm_run):
    wise = wiseft_over(drm_run.checkpoint, data, alphas=[0.5])
    merged = wise.extra["wise"]
    model = merged.model_at(0.5)
    clip = tiny_clip()  # the same merge by hand: every CLIP tensor halfway, then both heads from it
    clip.model.load_state_dict(merge_state_dicts(clip.model.state_dict(), merged.ft, 0.5))
    torch.testing.assert_close(model.df_head.weight, build_zeroshot_head(clip, data.classnames, data.templates).weight)
    torch.testing.assert_close(model.cd_head.weight, build_zeroshot_head(clip, prompts=data.descriptions).weight)


def test_classifier_knobs_change_the_beta_and_are_refused_where_nothing_reads_them(data, drm_run):
    wise = wiseft_over(drm_run.checkpoint, data, alphas=[1.0], alpha=1.0, classifier_knobs={"beta": 1.0})
    at_one, spec = wise.extra["wise"].model_at(1.0), ImageSpec.of(drm_run.clip)
    df_only = DualHeadClassifier(drm_run.classifier.visual, drm_run.classifier.df_head, drm_run.classifier.cd_head,
                                 beta=1.0)  # the trained df head alone
    torch.testing.assert_close(evaluate(at_one, data, "test", spec).logits,
                               evaluate(df_only, data, "test", spec).logits)
    with pytest.raises(UnknownNameError, match="unknown option 'gamma'"):
        wiseft_over(drm_run.checkpoint, data, alphas=[1.0], classifier_knobs={"gamma": 1.0})
    with pytest.raises(ValueError, match="beta"):
        wiseft_over(drm_run.checkpoint, data, alphas=[1.0], classifier_knobs={"beta": 1.5})
    with pytest.raises(ValueError, match="finetune declares none"):  # refused before the base run trains
        run_method("wiseft", data=data, clip=tiny_clip(), overrides={"classifier_knobs": {"beta": 0.5},
                                                                      "base_overrides": TINY})


def test_wiseft_training_its_drm_base_uses_the_base_runs_config(data, tmp_path):
    wise = run_method("wiseft", data=data, clip=tiny_clip(), out_dir=tmp_path / "w", overrides={
        "base_method": "drm", "base_overrides": {**TINY, "beta": BETA, "betas": [BETA]}, "alphas": [1.0], "alpha": 1.0})
    assert wise.extra["base"].method == "drm" and wise.extra["base"].config.beta == BETA
    drm = run_method("drm", data=data, clip=tiny_clip(), out_dir=tmp_path / "drm",
                     overrides={**TINY, "beta": BETA, "betas": [BETA]})
    assert wise.metrics["test"] == pytest.approx(drm.metrics["test"])


def test_wiseft_over_drm_masks_each_head_before_the_mix_on_a_projected_split(data, drm_run):
    """On a split covering some classes (ImageNet-R/A), WiSE-FT's DRM model is evaluated as DRM's
    beta sweep evaluates it: each head masked to the split's classes before the two softmaxes mix."""
    covered = [1, 3, 4, 8, 9, 12, 17]
    projected = dataclasses.replace(data, info={**data.info, "logit_projection": {"test": covered}})
    wise = wiseft_over(drm_run.checkpoint, projected, alphas=[1.0], alpha=1.0)
    spec = ImageSpec.of(drm_run.clip)
    swept = beta_sweep(drm_run.classifier, projected, ["test"], [BETA], spec)
    assert wise.metrics["test"] == pytest.approx(dict(zip(swept.metric, swept.value)))
    view = wise.extra["wise"].model_at(1.0).for_split(projected, "test")
    probs = evaluate(view, projected, "test", spec).logits.exp()
    torch.testing.assert_close(probs.sum(1), torch.ones(len(probs)))  # a mixture of two softmaxes over 7 classes
    assert (probs[:, [c for c in range(data.num_classes) if c not in covered]] == 0).all()


# ------------------------------------------------------------------------------------------------
# One-head bases: the numbers of before
# ------------------------------------------------------------------------------------------------
def test_one_head_end_points_merge_as_before(data):
    """The default builder reproduces the computation WiSE-FT always did: the merged head's weight and
    bias with a head, a zero-shot head from the merged text tower without one."""
    head = build_zeroshot_head(tiny_clip(), data.classnames, data.templates)
    tuned = tiny_clip(seed=1)  # any other weights of the same architecture
    ft_state = {k: v.detach().clone() for k, v in classifier_state(tuned).items()}
    ft_state.update({f"head.{k}": v.detach() + 0.05 for k, v in head.state_dict().items()})
    spec = ImageSpec.of(tuned)
    for state in (ft_state, {k: v for k, v in ft_state.items() if not k.startswith("head.")}):
        clip = tiny_clip()  # zero-shot (model_at overwrites its weights)
        wise = WiseModel(clip, zeroshot_state_for(clip, state, data.classnames, data.templates), state,
                         data.classnames, data.templates)
        model = wise.model_at(0.3)
        by_hand = tiny_clip()
        merged = merge_state_dicts(zeroshot_state_for(by_hand, state, data.classnames, data.templates), state, 0.3)
        by_hand.model.load_state_dict({k: v for k, v in merged.items() if not k.startswith("head.")})
        hand_head = (ZeroShotHead(merged["head.weight"], merged["head.bias"]) if "head.weight" in merged
                     else build_zeroshot_head(by_hand, data.classnames, data.templates))
        assert isinstance(model, ImageClassifier)
        assert torch.equal(evaluate(model, data, "test", spec).logits,
                           evaluate(ImageClassifier(by_hand.visual, hand_head), data, "test", spec).logits)


def test_a_finetune_checkpoint_keeps_the_one_head_builder(data, tmp_path):
    ft = run_method("finetune", data=data, clip=tiny_clip(), out_dir=tmp_path / "ft", overrides=TINY)
    wise = wiseft_over(ft.checkpoint, data, alphas=[1.0], alpha=1.0)
    assert wise.extra["base"].method == "finetune" and wise.extra["base"].build is single_head_classifier
    assert wise.extra["base"].config is None  # the one-head model reads no config
    assert wise.metrics["test"] == pytest.approx(ft.metrics["test"])
