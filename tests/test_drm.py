"""DRM: concept-description loading, soft labels, dual inference, the one-pass beta sweep, end to end."""

import json
import logging
import random
from pathlib import Path

import pytest
import torch

from rftlib.data import get_dataset
from rftlib.data.pipeline import ImageSpec
from rftlib.evaluate import evaluate
from rftlib.methods import run_method
from rftlib.methods.concepts import ConceptDescriptionError, load_concept_descriptions
from rftlib.methods.drm import (
    Config,
    DRMTask,
    DualHeadClassifier,
    beta_sweep,
    build_dual_classifier,
    dual_logits,
    soft_labels,
)
from rftlib.models import build_zeroshot_head
from rftlib.results import load
from rftlib.task import Batch

from .helpers import tiny_clip

DRM_DATA = Path("/work/shared/data/drm_concept_descriptions")
TINY = {"epochs": 1, "batch_size": 32, "warmup_steps": 2}


def drm_file(relative: str) -> Path:
    path = DRM_DATA / relative
    if not path.is_file():
        pytest.skip(f"DRM's concept-description files are not available ({path})")
    return path


def iwildcam_names(column: str = "english") -> list[str]:
    import pandas as pd

    table = pd.read_csv(drm_file("iwildcam_metadata/labels.csv"))
    table = table[table.y < 99999].sort_values("y")
    return [str(n).lower() for n in table[column]]


# ------------------------------------------------------------------------------------------------
# Loader
# ------------------------------------------------------------------------------------------------
def test_iwildcam_file_keyed_by_label_index_ignores_key_order():
    path = drm_file("prompts/iwildcam_cd.json")
    names = iwildcam_names()
    out = load_concept_descriptions(path, names)
    assert len(out) == 182 and all(isinstance(d, str) for d in out)
    assert out[0] == "Empty wild environment without animal"
    assert out[1].startswith("White-lipped peccary is")
    items = list(json.loads(path.read_text()).items())
    random.Random(0).shuffle(items)  # "10" before "2", any order: mapped by value, not position
    assert load_concept_descriptions(dict(items), names) == out


def test_fmow_file_with_six_descriptions_per_class():
    categories = list(json.loads(drm_file("prompts/fmow_cd.json").read_text()))  # WILDS' categories, label order
    out = load_concept_descriptions(drm_file("prompts/fmow_cd.json"), list(categories))
    assert len(out) == 62 and all(isinstance(d, list) and len(d) == 6 for d in out)
    # names match case-insensitively and with "_" read as a space
    spaced = [c.replace("_", " ").title() for c in categories]
    assert load_concept_descriptions(drm_file("prompts/fmow_cd.json"), spaced) == out


def test_imagenet_file_keyed_by_class_name(caplog):
    from rftlib.data.imagenet import imagenet_classnames

    path = drm_file("prompts/imagenet_cd.json")
    names = imagenet_classnames()
    with caplog.at_level(logging.WARNING, logger="rftlib.methods.concepts"):
        out = load_concept_descriptions(path, names)
    assert len(out) == 1000 and out[0].startswith("olive-green skin")
    # DRM spells two classes differently ("projectile", "sunglass"); they are paired by position, loudly
    assert "'projectile'" in caplog.text and "'sunglass'" in caplog.text
    # re-sorted, the same file cannot be paired safely: the error names the classes
    items = sorted(json.loads(path.read_text()).items())
    with pytest.raises(ConceptDescriptionError, match=r"744 \('missile'\)"):
        load_concept_descriptions(dict(items), names)


def test_scientific_name_file_needs_scientific_class_names():
    path = drm_file("concept_description/result_cd_iwildcam.json")
    with pytest.raises(ConceptDescriptionError, match="no concept description for 1[0-9]{2} class"):
        load_concept_descriptions(path, iwildcam_names("english"))
    out = load_concept_descriptions(path, iwildcam_names("name"))
    assert len(out) == 182 and out[0].startswith("An image taken by wild camera trap")


def test_in_memory_formats_and_errors(data):
    names = ["red fox", "snow_owl", "Cat"]
    want = ["a fox", ["an owl", "white"], "a cat"]
    assert load_concept_descriptions({"2": "a cat", "0": "a fox", "1": ["an owl", "white"]}, names) == want
    assert load_concept_descriptions({"CAT": "a cat", "Red Fox": "a fox", "snow owl": ["an owl", "white"]},
                                     names) == want
    assert load_concept_descriptions([["cat", "a cat"], ["snow owl", ["an owl", "white"]], ["red_fox", "a fox"]],
                                     names) == want
    assert load_concept_descriptions(want, names) == want  # a plain list is in label order
    with pytest.raises(ConceptDescriptionError, match=r"2 \('Cat'\)"):
        load_concept_descriptions({"red fox": "a fox", "snow owl": "an owl", "dog": "a dog"}, names)
    with pytest.raises(ConceptDescriptionError, match=r"no concept description for 1 class\(es\): 1 \('snow_owl'\)"):
        load_concept_descriptions({"0": "a", "2": "c"}, names)
    with pytest.raises(ConceptDescriptionError, match="not a label index"):
        load_concept_descriptions({"0": "a", "1": "b", "2": "c", "3": "d"}, names)
    with pytest.raises(ConceptDescriptionError, match="non-empty string"):
        load_concept_descriptions({"0": "a", "1": "", "2": "c"}, names)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_concept_descriptions("/nonexistent/cd.json", names)
    # synthwild ships its own descriptions (one per class) and paraphrases (three per class)
    assert load_concept_descriptions(data.descriptions, data.classnames) == list(data.descriptions)
    variants = load_concept_descriptions(data.info["description_variants"], data.classnames)
    assert all(len(v) == 3 and v[0] == d for v, d in zip(variants, data.descriptions))


# ------------------------------------------------------------------------------------------------
# Soft labels and dual inference
# ------------------------------------------------------------------------------------------------
def test_soft_labels_sum_to_one_and_follow_the_axis():
    logits = 3 * torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    probs = logits.softmax(-1)
    for axis in ("class", "image", "none"):
        assert torch.allclose(soft_labels(logits, axis).sum(1), torch.ones(50), atol=1e-6)
    assert torch.allclose(soft_labels(logits, "none"), probs)
    by_class = soft_labels(logits, "class")  # min-max per class over images, then rows renormalised
    scaled = (probs - probs.min(0).values) / (probs.max(0).values - probs.min(0).values)
    assert torch.allclose(by_class, scaled / scaled.sum(1, keepdim=True), atol=1e-6)
    assert (by_class.min(0).values == 0).all()  # every class's least typical image gets 0
    by_image = soft_labels(logits, "image")  # min-max per image over classes
    scaled = (probs - probs.min(1, keepdim=True).values) / (probs.max(1, keepdim=True).values
                                                            - probs.min(1, keepdim=True).values)
    assert torch.allclose(by_image, scaled / scaled.sum(1, keepdim=True), atol=1e-6)
    assert (by_image.min(1).values == 0).all() and torch.equal(by_image.argmax(1), logits.argmax(1))
    with pytest.raises(ValueError, match="valid: class, image, none"):
        soft_labels(logits, "rows")


def test_dual_logits_end_points_and_probability_mixture():
    g = torch.Generator().manual_seed(0)
    df, cd = 5 * torch.randn(6, 4, generator=g), 5 * torch.randn(6, 4, generator=g)
    assert torch.equal(dual_logits(df, cd, 1.0), df.log_softmax(-1))
    assert torch.equal(dual_logits(df, cd, 0.0), cd.log_softmax(-1))
    mixed = dual_logits(df, cd, 0.3).exp()
    assert torch.allclose(mixed, 0.3 * df.softmax(-1) + 0.7 * cd.softmax(-1), atol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dual_logits(df, cd, 1.5)


def test_beta_sweep_runs_the_image_encoder_once_per_split(data):
    clip = tiny_clip()
    model = build_dual_classifier(clip, data.classnames, data.templates, data.descriptions)
    calls = []
    handle = clip.visual.register_forward_hook(lambda *_: calls.append(1))
    spec = ImageSpec.of(clip)
    table = beta_sweep(model, data, ["id_test", "test"], [0.0, 0.25, 0.5, 1.0], spec)
    handle.remove()
    assert len(calls) == 2  # one batch per split (both smaller than the eval batch), whatever the betas
    assert list(table.columns) == ["beta", "split", "role", "metric", "value", "headline"]
    f1 = table[table.metric == "macro_f1"].set_index(["beta", "split"]).value
    for beta in (0.0, 0.5, 1.0):  # same numbers as evaluating the dual classifier at that beta
        model.beta = beta
        assert f1[(beta, "test")] == pytest.approx(evaluate(model, data, "test", spec).metrics["macro_f1"])


def test_each_head_is_masked_to_the_split_classes_before_the_softmaxes_mix():
    """ImageNet-R/A style: the split covers classes 0 and 2 of 4. DRM's release restricts each head to
    them, then mixes the two softmaxes; masking the 4-way mixture afterwards predicts another class."""
    import math
    from types import SimpleNamespace

    from rftlib.models import ZeroShotHead, for_split

    dataset = SimpleNamespace(classnames=["a", "b", "c", "d"], info={"logit_projection": {"imagenet-r": [0, 2]}})
    features = torch.ones(1, 1)  # one image; each head's weight is its logits as a (4 classes x 1) column
    df = torch.tensor([[5.0, 10.0, 0.0, 0.0]])  # the df head prefers an uncovered class, then class 0
    cd = torch.tensor([[0.0, 0.0, 1.0, 0.0]])   # the cd head mildly prefers class 2
    model = DualHeadClassifier(torch.nn.Identity(), ZeroShotHead(df.T, normalize=False),
                               ZeroShotHead(cd.T, normalize=False), beta=0.5)
    view = for_split(model, dataset, "imagenet-r")
    assert for_split(model, dataset, "val") is model  # a split without a projection: the model itself
    probs = view(features).exp()[0]
    e = math.e  # by hand: softmax over {0, 2} of each head, then the 0.5/0.5 mixture
    want0 = 0.5 * e ** 5 / (e ** 5 + 1) + 0.5 * 1 / (1 + e)
    want2 = 0.5 * 1 / (e ** 5 + 1) + 0.5 * e / (1 + e)
    assert probs[0].item() == pytest.approx(want0) and probs[2].item() == pytest.approx(want2)
    assert probs[1] == 0 and probs[3] == 0 and probs.argmax() == 0
    # the mixture of the 4-way softmaxes, masked afterwards, would have predicted class 2
    after = model(features)[0]
    assert after[[0, 2]].argmax() == 1 and not torch.allclose(after[[0, 2]].exp().sum(), torch.tensor(1.0))
    # masking the view's output again (what rftlib.evaluate does) changes nothing
    from rftlib.data.imagenet import project_logits

    assert torch.equal(project_logits(dataset, "imagenet-r", view(features)), view(features))


def test_training_step_uses_soft_labels_by_example_index(data):
    clip = tiny_clip()
    n, k = len(data.split("train")), data.num_classes
    targets = torch.rand(n, k, generator=torch.Generator().manual_seed(0))
    targets /= targets.sum(1, keepdim=True)
    task = DRMTask(clip, data.classnames, data.templates, data.descriptions, targets, Config(lam=1.0))
    idx = torch.tensor([5, 17, 3, 42])
    spec = ImageSpec.of(clip)
    from rftlib.data.pipeline import decode_split, normalize

    images = normalize(decode_split(data.split("train"), spec.size)[idx], spec)
    batch = Batch(images, torch.as_tensor(data.split("train").labels[idx.numpy()]), idx, 0, 0, torch.arange(4), 4,
                  torch.Generator().manual_seed(0))
    assert torch.allclose(task.soft_targets(batch), targets[idx])
    out = task.training_step(batch)
    assert torch.allclose(out["loss"], out["erm"] + out["wrm"])
    out["loss"].backward()  # the worst-case term reaches the text tower through the cd head
    assert clip.model.token_embedding.weight.grad is not None
    task.drm.cd_classes = "batch"
    assert torch.isfinite(task.training_step(batch)["wrm"])


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------
def test_end_to_end_rows_carry_beta(data, tmp_path):
    result = run_method("drm", data=data, clip=tiny_clip(), out_dir=tmp_path / "drm",
                        overrides={**TINY, "betas": [0.0, 1.0], "affinity_axis": "image"})
    assert set(result.metrics) == {"id_val", "id_test", "val", "test"}
    assert result.checkpoint is not None and result.checkpoint.exists()
    sweep = result.extra["sweep"]
    assert sorted(sweep.beta.unique()) == [0.0, 0.5, 1.0]  # the grid plus cfg.beta
    rows = load(run_id=result.run_id)
    assert rows.beta.notna().all() and sorted(rows.beta.unique()) == [0.0, 0.5, 1.0]
    # the returned classifier is the dual-inference model at beta = 0.5
    spec = ImageSpec.of(result.clip)
    assert evaluate(result.classifier, data, "test", spec).metrics["macro_f1"] == pytest.approx(
        result.metrics["test"]["macro_f1"])
    with pytest.raises(ValueError, match="no concept descriptions"):
        bare = get_dataset("synthwild", size="tiny", cache=False)
        bare.descriptions = None
        run_method("drm", data=bare, clip=tiny_clip(), overrides=TINY)


def _load_script(name: str):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "data_scripts" /
                                                  f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_descriptions_come_from_the_data_root_or_the_error_names_the_command(data, tmp_path):
    from dataclasses import replace

    from rftlib.methods.concepts import description_file
    from rftlib.methods.drm import resolve_descriptions

    bare = replace(data, name="iwildcam", descriptions=None, root=tmp_path)
    with pytest.raises(ConceptDescriptionError, match=r"prepare_drm_descriptions\.py iwildcam --root .* --download"):
        resolve_descriptions(Config(), bare)
    path = description_file(tmp_path, "iwildcam")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({name: f"the {name}" for name in reversed(data.classnames)}))  # keyed by name
    assert resolve_descriptions(Config(), bare) == [f"the {name}" for name in data.classnames]


@pytest.mark.skipif(not DRM_DATA.exists(), reason="DRM's released files are not on this machine")
def test_prepare_script_adopts_a_checked_file_and_refuses_a_wrong_one(tmp_path):
    from rftlib.methods.concepts import description_file

    script = _load_script("prepare_drm_descriptions")
    root = tmp_path / "data"
    assert script.main(["iwildcam", "--root", str(root)]) == 1  # nothing there yet
    assert script.main(["iwildcam", "--root", str(root), "--adopt", str(DRM_DATA / "prompts" / "fmow_cd.json")]) == 1
    assert not description_file(root, "iwildcam").exists()  # a rejected file never reaches the target
    assert script.main(["iwildcam", "--root", str(root), "--adopt",
                        str(DRM_DATA / "prompts" / "iwildcam_cd.json")]) == 0
    assert len(json.loads(description_file(root, "iwildcam").read_text())) == 182
    assert script.main(["iwildcam", "--root", str(root)]) == 0  # verify only


def test_the_released_df_head_uses_one_template_per_dataset(data):
    """Training captions keep the dataset's templates; the evaluated df head uses ``head_templates``
    (the released evaluation's one template on iWildCam, FMoW and ImageNet)."""
    from rftlib.methods import get_config

    assert get_config("drm", "iwildcam").head_templates == ("a photo of {}.",)
    assert get_config("drm", "fmow").head_templates == ("satellite photo of a {}.",)
    assert get_config("drm", "imagenet").head_templates == ("a good photo of the {}.",)
    assert get_config("drm", "synthwild").head_templates is None
    clip = tiny_clip()
    cfg = get_config("drm", "synthwild", {"head_templates": ["a {} in the grass."]})
    targets = torch.full((len(data.split("train")), data.num_classes), 1.0 / data.num_classes)
    task = DRMTask(clip, data.classnames, data.templates, data.descriptions, targets, cfg)
    expected = build_zeroshot_head(clip, data.classnames, ["a {} in the grass."])
    assert torch.allclose(task.classifier().df_head.weight, expected.weight, atol=1e-6)
