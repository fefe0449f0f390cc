"""CRoFT: identity start, the energy-gradient penalty (double backprop, finite differences), modes,
detection scores and metrics, export, and a tiny end-to-end run."""

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rftlib.data.pipeline import ImageSpec, decode_split, normalize
from rftlib.detection import detection_metrics, detection_scores, energy_score, knn_score, msp_score
from rftlib.methods import get_config, run_method
from rftlib.methods.croft import (
    CroftTask,
    FrozenTowerMemo,
    adapt,
    class_text_features,
    energy_gradient_penalty,
    energy_gradients,
    energy_potential,
    export_classifier,
    knn_bank,
    resolve_mode,
)
from rftlib.models import build_zeroshot_head, load_classifier
from rftlib.results import load
from rftlib.task import Batch

from .helpers import run_single_and_two_ranks, tiny_clip

TINY = {"epochs": 1, "batch_size": 32, "warmup_steps": 2, "knn_k": 3}


def make_task(clip, data, **overrides):
    cfg = dataclasses.replace(get_config("croft", "synthwild"), **overrides)
    text = class_text_features(clip, data.classnames, data.templates)
    return CroftTask(clip, text, cfg)


def images_of(data, clip, split="id_val", n=16):
    spec = ImageSpec.of(clip)
    return normalize(decode_split(data.split(split), spec.size)[:n], spec, "cpu"), spec


def test_adapters_start_as_identity(data):
    clip = tiny_clip()
    task = make_task(clip, data)
    assert task.ddp_kwargs() == {"find_unused_parameters": True}  # G has no main-loss gradient in some modes
    images, _ = images_of(data, clip)
    head = build_zeroshot_head(clip, data.classnames, data.templates)
    with torch.no_grad():
        zeroshot = head(clip.visual(images))
        assert torch.allclose(task.classifier()(images), zeroshot, atol=1e-4)
        assert torch.allclose(task.logits(clip.visual(images)), zeroshot, atol=1e-4)


def _tiny_problem(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    points = F.normalize(torch.randn(4, 3, generator=g, dtype=dtype), dim=-1)
    classes = F.normalize(torch.randn(2, 3, generator=g, dtype=dtype), dim=-1)
    w_i = torch.eye(3, dtype=dtype) + 0.1 * torch.randn(3, 3, generator=g, dtype=dtype)
    w_t = torch.eye(3, dtype=dtype) + 0.1 * torch.randn(3, 3, generator=g, dtype=dtype)
    return points, classes, w_i, w_t


@pytest.mark.parametrize("transpose", [True, False])
def test_energy_gradient_matches_finite_differences(transpose):
    points, classes, w_i, w_t = _tiny_problem()

    def image_fn(delta, w=w_i):
        return adapt(points, w + delta, 0.2, transpose)

    def text_fn(delta, w=w_t):
        return adapt(classes, w + delta, 0.5, transpose)

    def phi(delta):
        return energy_potential(image_fn(delta) @ text_fn(delta).T)

    (g,) = energy_gradients(image_fn, text_fn, w_i, delta_init=1e-4, create_graph=False)
    base, h = torch.full((3, 3), 1e-4, dtype=torch.float64), 1e-6
    fd = torch.zeros(3, 3, dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            step = torch.zeros(3, 3, dtype=torch.float64)
            step[i, j] = h
            fd[i, j] = (phi(base + step) - phi(base - step)) / (2 * h)
    assert torch.allclose(g, fd, atol=1e-7)
    # the penalty is twice differentiable: gradcheck of W_I -> mean(g^2) through the double backprop
    assert torch.autograd.gradcheck(
        lambda w: energy_gradient_penalty(lambda d: image_fn(d, w), text_fn, w_i), (w_i.clone().requires_grad_(),))
    # separate perturbations penalise both gradients; the shared one penalises their sum
    g_i, g_t = energy_gradients(image_fn, text_fn, w_i, shared_delta=False, create_graph=False)
    assert torch.allclose(g_i + g_t, g)


def test_energy_penalty_gives_adapter_gradients(data):
    clip = tiny_clip()
    task = make_task(clip, data)
    images, _ = images_of(data, clip)
    with torch.no_grad():
        v = F.normalize(clip.visual(images), dim=-1)
    for mode in ("faithful", "consistent"):
        task.cfg = resolve_mode(dataclasses.replace(task.cfg, mode=mode))
        penalty = task.energy_penalty(v, v.clone(), task.generator)
        grads = torch.autograd.grad(penalty, [task.image_adapter, task.text_adapter])
        assert penalty > 0 and all(g.abs().sum() > 0 for g in grads)


def _one_step(task, v, labels, lr=0.05):
    out = task.objective(v, labels, step=0)
    params = [task.image_adapter, task.text_adapter, task.generator]
    grads = torch.autograd.grad(out["loss"], params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.sub_(lr * g)
    return out


def test_modes_agree_at_init_and_differ_after_a_step(data):
    clip = tiny_clip()
    images, _ = images_of(data, clip, "train", 24)
    with torch.no_grad():
        v = clip.visual(images)
    labels = torch.as_tensor(data.split("train").labels[:24])
    faithful = make_task(clip, data, mode="faithful", gen_lr=0.0)
    consistent = make_task(clip, data, mode="consistent", gen_lr=0.0)
    a, b = faithful.objective(v, labels), consistent.objective(v, labels)
    for key in ("loss", "ce", "l1", "energy_penalty"):
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
    faithful = make_task(clip, data, mode="faithful", gen_lr=0.5)
    consistent = make_task(clip, data, mode="consistent", gen_lr=0.5)
    _one_step(faithful, v, labels)
    _one_step(consistent, v, labels)
    assert not torch.allclose(faithful.image_adapter, consistent.image_adapter)
    assert not torch.allclose(faithful.generator, consistent.generator)
    # only the faithful inner step moves the adapters; in consistent mode G gets no main-loss gradient
    moved = make_task(clip, data, mode="consistent", gen_lr=0.5)
    moved.generator_steps(*moved.forward_features(v), labels, step=0)
    assert torch.equal(moved.image_adapter, torch.eye(len(moved.image_adapter)))
    assert not torch.equal(moved.generator, torch.eye(len(moved.generator)))


def test_energy_msp_and_knn_scores():
    logits = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    assert torch.allclose(energy_score(logits), torch.logsumexp(logits, 1))
    assert torch.allclose(energy_score(logits, 2.0), 2.0 * torch.logsumexp(logits / 2.0, 1))
    assert torch.allclose(msp_score(logits), torch.tensor([1 / (1 + math.exp(-1.0)), 0.5]))
    bank = F.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    queries = torch.cat([bank[3:4], -bank[3:4]])
    at1 = knn_score(queries, bank, k=1)
    assert at1[0].abs() < 1e-5 and at1[1] < at1[0]  # a bank member is at distance 0 from itself
    assert knn_score(queries, bank, k=2)[0] < 0
    assert torch.all(knn_score(queries, bank, k=5) <= knn_score(queries, bank, k=1))
    with pytest.raises(ValueError, match="fewer than k"):
        knn_score(queries, bank[:2], k=3)


def test_detection_module_stays_below_the_methods_layer():
    """rftlib.detection is generic: importing it (in a fresh interpreter) imports no method."""
    code = "import sys, rftlib.detection; print(sorted(m for m in sys.modules if m.startswith('rftlib.methods')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_cached_features_and_eval_memo_are_exact(data):
    clip = tiny_clip()
    images, _ = images_of(data, clip, "train", 8)
    with torch.no_grad():
        features = clip.visual(normalize(decode_split(data.split("train"), clip.image_size), ImageSpec.of(clip), "cpu"))
    batch = Batch(images, torch.as_tensor(data.split("train").labels[:8]), torch.arange(8), 0, 0, torch.arange(8), 8,
                  torch.Generator())
    cached = make_task(clip, data)
    cached.train_features = features
    fresh = make_task(clip, data, cache_features=False)
    assert torch.allclose(cached.batch_features(batch)[0], fresh.batch_features(batch)[0], atol=1e-5)
    memo = FrozenTowerMemo(clip.visual)
    with torch.no_grad():
        first, second = memo(images), memo(images)
    assert torch.equal(first, second) and len(memo._memo) == 1


def test_detection_scores_and_export(data, tmp_path):
    clip = tiny_clip()
    task = make_task(clip, data)
    classifier = task.classifier()
    spec = ImageSpec.of(clip)
    train = data.split("train")
    with torch.no_grad():
        feats = clip.visual(normalize(decode_split(train, spec.size), spec, "cpu"))
    bank = knn_bank(classifier, feats, train.labels, per_class=2)
    assert len(bank) <= 2 * len(np.unique(train.labels))
    frame = detection_scores(classifier, data.split("id_test"), {"openset": data.split("openset")}, spec,
                             kinds=("energy", "knn", "msp"), bank=bank, k=2)
    assert list(frame.columns) == ["score", "is_ood", "kind", "split"]
    assert frame.is_ood.sum() == 3 * len(data.split("openset"))
    metrics = detection_metrics(frame)["openset"]
    assert {"energy_auroc", "knn_fpr95", "msp_aupr_in", "energy_aupr_out"} <= set(metrics)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    correct = detection_scores(classifier, data.split("id_test"), {}, spec, id_reference="correct")
    assert len(correct) <= len(data.split("id_test"))
    # the exported checkpoint is a plain CLIP + head computing the same logits
    path = export_classifier(clip, classifier, tmp_path / "croft", classnames=data.classnames)
    _, loaded, _ = load_classifier(path)
    images, _ = images_of(data, clip)
    with torch.no_grad():
        assert torch.allclose(loaded(images), classifier(images), atol=1e-4)


def _write_folder_dataset(root):
    rng = np.random.default_rng(0)
    for cls in ("rock", "leaf"):
        folder = root / "train" / cls
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_run_end_to_end_logs_detection_rows(data, tmp_path):
    _write_folder_dataset(tmp_path / "textures")
    overrides = {**TINY, "open_set": f"folder:{tmp_path / 'textures'}", "mode": "consistent"}
    result = run_method("croft", data=data, clip=tiny_clip(), out_dir=tmp_path / "cr", overrides=overrides)
    assert {"id_val", "id_test", "val", "test", "openset", "folder:train"} <= set(result.metrics)
    assert 0.0 <= result.metrics["openset"]["energy_auroc"] <= 1.0
    rows = load(run_id=result.run_id)
    det = rows[rows.role == "openset"]
    assert set(det.split) == {"openset", "folder:train"}
    assert {"energy_auroc", "energy_fpr95", "knn_auroc", "knn_aupr_out"} <= set(det.metric)
    assert rows.epoch.notna().any() and (rows.method == "croft").all()
    assert result.checkpoint is not None and load_classifier(result.checkpoint)[1] is not None
    assert result.extra["training_checkpoint"].exists()
    # the classifier carries its KNN bank: knn scores need nothing else (the notebook's call)
    classifier, spec = result.classifier, ImageSpec.of(result.clip)
    frame = detection_scores(classifier, data.split("id_test"), {"openset": data.split("openset")}, spec,
                             kinds=("knn",))
    assert set(frame.kind) == {"knn"} and np.isfinite(frame.score).all()
    # a training image is in the bank: its k=1 distance is 0
    own = classifier.adapt_features(result.extra["train_features"][:5])
    assert knn_score(own, classifier.bank, k=1).abs().max() < 1e-5


def test_config_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="valid: faithful, consistent"):
        resolve_mode(get_config("croft", "synthwild", {"mode": "exact"}))
    with pytest.raises(ValueError, match="valid: energy, knn, msp"):
        resolve_mode(get_config("croft", "synthwild", {"scores": ["mahalanobis"]}))


DDP_SCRIPT = '''
import os, sys
import torch
from safetensors.torch import save_file
from rftlib import dist as rdist
from rftlib.data import get_dataset
from rftlib.data.pipeline import ImageSpec, decode_split
from rftlib.evaluate import run_model
from rftlib.methods import get_config
from rftlib.methods.croft import CroftTask, class_text_features
from rftlib.models import load_clip
from rftlib.train import fit

torch.set_num_threads(1)
info = rdist.init_distributed("cpu")
torch.manual_seed(0)
clip, data = load_clip("rft-tiny", None), get_dataset("synthwild", size="tiny", cache=False)
spec = ImageSpec.of(clip)
cfg = get_config("croft", "synthwild", {"epochs": 2, "batch_size": 16, "warmup_steps": 3, "mode": sys.argv[2],
                                        "eval_splits": [], "select_split": None})
features = run_model(clip.visual, decode_split(data.split("train"), spec.size), spec)
task = CroftTask(clip, class_text_features(clip, data.classnames, data.templates), cfg, features)
fit(task, data, cfg.train, spec=spec, progress_mode="off")
if info.is_main:
    save_file({k: v.contiguous() for k, v in task.checkpoint_state().items()}, sys.argv[1])
'''


@pytest.mark.slow
def test_ddp_two_processes_train_exactly_like_one(tmp_path):
    """Every rank computes the loss of the gathered global batch, so DDP changes nothing."""
    single, ddp = run_single_and_two_ranks(DDP_SCRIPT, tmp_path, "faithful")
    assert not torch.equal(single["croft.image_adapter"], torch.eye(len(single["croft.image_adapter"])))
    assert all(torch.allclose(single[k], ddp[k], atol=1e-6) for k in single)


def test_real_data_presets_train_with_the_released_recipe():
    """SGD (momentum 0.9, coupled decay 0.1) at lr 0.002, batch 32, 30 epochs, cosine per epoch after
    one warm-up epoch at 1e-5; synthwild keeps its AdamW CPU recipe."""
    for dataset in ("imagenet", "domains", "iwildcam", "fmow", "folder"):
        t = get_config("croft", dataset).train
        assert (t.optimizer, t.momentum, t.lr, t.weight_decay) == ("sgd", 0.9, 2e-3, 0.1)
        assert (t.batch_size, t.epochs) == (32, 30)
        assert (t.schedule, t.warmup_epochs, t.warmup_lr) == ("epoch_cosine", 1, 1e-5)
        assert get_config("croft", dataset).gen_lr == t.lr
    t = get_config("croft", "synthwild").train
    assert (t.optimizer, t.schedule) == ("adamw", "cosine")


def test_inner_generator_steps_follow_the_loops_schedule():
    """With gen_lr = lr the inner steps run at the loop's learning rates, warm-up epoch included."""
    from rftlib.methods.croft import _gen_schedule

    gen = _gen_schedule(get_config("croft", "imagenet"), steps_per_epoch=10)
    assert [gen(step) for step in (0, 9, 10, 19)] == pytest.approx([1e-5, 1e-5, 2e-3, 2e-3])
    assert gen(20) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 30)))


def test_setup_i_without_shots_is_flagged(caplog):
    from types import SimpleNamespace

    from rftlib.methods.croft import note_setup_data

    with caplog.at_level("WARNING", logger="rftlib.methods.croft"):
        assert note_setup_data(SimpleNamespace(name="imagenet", options={}))
    assert "shots=16" in caplog.text
    assert not note_setup_data(SimpleNamespace(name="imagenet", options={"shots": 16, "shots_seed": 1}))
    assert not note_setup_data(SimpleNamespace(name="synthwild", options={}))


def test_detection_reference_is_the_correctly_classified_id_samples_by_default(data):
    """As the release: the ID reference (threshold, AUROC positives) is the ID split's correctly
    classified samples; ``id_reference="all"`` keeps every one."""
    from types import SimpleNamespace

    from rftlib.methods.croft import Config, run_detection

    assert Config().id_reference == "correct"
    clip = tiny_clip()
    classifier = make_task(clip, data).classifier()
    spec = ImageSpec.of(clip)
    logged = []
    ctx = SimpleNamespace(dataset=data, spec=spec, device=torch.device("cpu"),
                          log=lambda split, role, values, epoch=None: logged.append((split, role)))
    cfg = dataclasses.replace(get_config("croft", "synthwild"), scores=(), score="energy")
    got = run_detection(ctx, cfg, classifier)
    assert logged == [("openset", "openset")]
    id_test, ood = data.split("id_test"), {"openset": data.split("openset")}
    frames = {ref: detection_scores(classifier, id_test, ood, spec, id_reference=ref) for ref in ("correct", "all")}
    with torch.no_grad():
        correct = int((classifier(images_of(data, clip, "id_test", n=len(id_test))[0]).argmax(1).numpy()
                       == id_test.labels).sum())
    assert (~frames["correct"].is_ood).sum() == correct < len(id_test)  # the comparison is not vacuous
    assert got == detection_metrics(frames["correct"])
    assert got != detection_metrics(frames["all"])
    everything = run_detection(ctx, dataclasses.replace(cfg, id_reference="all"), classifier)
    assert everything == detection_metrics(frames["all"])
