"""The training input: keyed augmentation, rank shards, the memory-or-stream plan, bad files."""

import numpy as np
import pandas as pd
import pytest
import torch

from rftlib.data import DataNotFoundError, ImageReadError, get_dataset
from rftlib.data.augment import Augment, random_resized_crop_box
from rftlib.data.loading import LoaderSettings, parse_bytes
from rftlib.data.pipeline import ImageSpec
from rftlib.data.train_input import StepLayout, TrainInput, plan_train_input
from rftlib.data.views import Request, ViewDataset, reader_for, view_loader
from rftlib.methods.finetune import FinetuneTask
from rftlib.models import build_zeroshot_head
from rftlib.train import TrainConfig, fit

from .fakes import write_image_folder
from .helpers import tiny_clip


@pytest.fixture(scope="module")
def folder(data, tmp_path_factory):
    """tiny synthwild as 48x40 JPEG files (40 per split)."""
    return write_image_folder(tmp_path_factory.mktemp("folder"), data, per_split=40)


@pytest.fixture(scope="module")
def files(folder):
    return get_dataset("folder", root=folder)


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (2, 2), (4, 1)])
def test_rank_shards_of_a_global_batch_are_disjoint_and_complete(world, accum):
    single = list(StepLayout(100, 16, seed=3).requests(0, 12))
    parts = [list(StepLayout(100, 16, world, rank, accum, seed=3).requests(0, 12)) for rank in range(world)]
    for step in range(12):
        mine = [r for part in parts for r in part if r.step == step]
        assert len(mine) == world * accum
        positions = np.concatenate([r.positions for r in mine])
        indices = np.concatenate([r.indices for r in mine])
        assert sorted(positions) == list(range(16))  # complete and disjoint
        order = np.argsort(positions)
        assert indices[order].tolist() == single[step].indices.tolist()  # the same examples at the same places


def test_steps_of_an_epoch_visit_a_permutation_and_epochs_differ():
    layout = StepLayout(64, 16, seed=1)
    first = np.concatenate([r.indices for r in layout.requests(0, 4)])
    second = np.concatenate([r.indices for r in layout.requests(4, 8)])
    assert sorted(first) == sorted(second) == list(range(64)) and first.tolist() != second.tolist()
    assert [r.indices.tolist() for r in layout.requests(5, 7)] == [r.indices.tolist() for r in
                                                                   list(layout.requests(0, 8))[5:7]]


def test_random_resized_crop_boxes_follow_torchvision_rules():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = random_resized_crop_box(rng, 448, 600, (0.9, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 448 and 0 <= left and left + w <= 600
        assert 0.89 <= h * w / (448 * 600) <= 1.0 and 3 / 4 - 0.01 <= w / h <= 4 / 3 + 0.01
    # an image too elongated for any crop of the ratio range falls back to the centre crop of the range
    assert random_resized_crop_box(rng, 10, 400, (0.9, 1.0), (3 / 4, 4 / 3)) == (0, 193, 10, 13)


def test_views_are_keyed_by_seed_step_and_position():
    aug = Augment("rrc_flip", (0.3, 1.0))
    assert aug.view(0, 5, 7, 100, 120) == aug.view(0, 5, 7, 100, 120)
    views = {aug.view(0, step, pos, 100, 120) for step in range(5) for pos in range(20)}
    assert len(views) > 90
    flips = [aug.view(1, 0, pos, 100, 120).flip for pos in range(400)]
    assert 150 < sum(flips) < 250
    assert not any(Augment("rrc").view(1, 0, pos, 100, 120).flip for pos in range(100))
    with pytest.raises(ValueError, match="valid: none, rrc, rrc_flip"):
        Augment("jitter")
    with pytest.raises(ValueError, match="crop_scale"):
        TrainConfig(crop_scale=(0.5, 1.5))


def test_views_do_not_depend_on_worker_processes(files):
    dataset = ViewDataset(reader_for(files.split("train").images), 32, Augment("rrc_flip", (0.5, 1.0)), seed=4)
    requests = [Request(np.arange(k, k + 8), step=k, positions=np.arange(8)) for k in range(0, 32, 8)]
    made = {w: [b["images"] for b in view_loader(dataset, lambda: iter(requests), 4, workers=w)] for w in (0, 2)}
    assert all(torch.equal(a, b) for a, b in zip(made[0], made[2]))
    assert made[0][0].dtype == torch.uint8 and made[0][0].shape == (8, 3, 32, 32)


def test_plan_follows_the_memory_budget(data, files):
    arrays, paths = data.split("train"), files.split("train")
    none, rrc = Augment("none"), Augment("rrc")
    need = len(paths) * 3 * 32 * 32
    under, over = LoaderSettings(memory_budget=need, workers=3), LoaderSettings(memory_budget=need - 1, workers=3)
    assert plan_train_input(paths, 32, none, under).path == "memory"
    assert (plan_train_input(paths, 32, none, over).path, plan_train_input(paths, 32, none, over).workers) == (
        "stream", 3)
    assert plan_train_input(paths, 32, rrc, under).path == "stream"  # crops come from the original files
    assert plan_train_input(arrays, 32, rrc, over).path == "memory"  # cut from the arrays already in RAM
    assert plan_train_input(paths, 32, none, under.replace(input_path="stream")).path == "stream"
    with pytest.raises(ValueError, match="does not fit"):
        plan_train_input(paths, 32, none, over.replace(input_path="memory"))
    with pytest.raises(ValueError, match="original images"):
        plan_train_input(paths, 32, rrc, under.replace(input_path="memory"))


def test_memory_and_stream_paths_give_the_same_batches(files):
    split = files.split("train")
    layout = StepLayout(len(split), 8, seed=2)

    def pixels(settings):
        source = TrainInput(split, 32, layout, Augment("none"), settings)
        return source.plan.path, [mb.images for step in source.steps(0, 4) for mb in step]

    memory = pixels(LoaderSettings(workers=2, eval_cache=False))
    stream = pixels(LoaderSettings(workers=2, input_path="stream"))
    assert memory[0] == "memory" and stream[0] == "stream"
    assert all(torch.equal(a, b) for a, b in zip(memory[1], stream[1]))


def test_loader_settings_validate_and_read_the_environment(monkeypatch):
    assert parse_bytes("4G") == 4 * 2**30 and parse_bytes("1.5M") == int(1.5 * 2**20) and parse_bytes(10) == 10
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")
    monkeypatch.setenv("RFT_WORKERS", "3")
    monkeypatch.setenv("RFT_MEMORY_BUDGET", "1M")
    assert (LoaderSettings().workers, LoaderSettings().memory_budget) == (3, 2**20)
    for bad in ({"workers": -1}, {"on_bad_image": "ignore"}, {"input_path": "disk"}, {"prefetch": 0}):
        with pytest.raises(ValueError, match="valid|>="):
            LoaderSettings(**bad)


def _corrupt(files, index: int) -> str:
    path = files.split("train").images.paths[index]
    with open(path, "r+b") as handle:
        handle.seek(20)
        handle.write(b"\xff\x00" * 64)
        handle.truncate(200)
    return path


def _fit_files(files, loader, **cfg):
    clip = tiny_clip()
    task = FinetuneTask(clip, build_zeroshot_head(clip, files.classnames, files.templates))
    events = []
    config = TrainConfig(**{"epochs": 1, "batch_size": 8, "warmup_steps": 1, "lr": 1e-3, "eval_splits": (),
                            "select_split": None, **cfg})
    fit(task, files, config, spec=ImageSpec.of(clip), loader=loader, callbacks=[events.append], progress_mode="off")
    return events


def test_a_corrupt_image_mid_epoch_names_the_file_or_is_skipped_and_counted(folder, tmp_path):
    import shutil

    shutil.copytree(folder, tmp_path / "data")
    files = get_dataset("folder", root=tmp_path / "data")
    bad = _corrupt(files, 21)
    with pytest.raises(ImageReadError, match=bad.split("/")[-1]):
        _fit_files(files, LoaderSettings(workers=2))
    events = _fit_files(files, LoaderSettings(workers=2, on_bad_image="skip"))
    steps = [e for e in events if e.kind == "step"]
    assert len(steps) == 40 // 8 and steps[-1].data["skipped_images"] == 1
    assert all(np.isfinite(e.data["loss"]) for e in steps)


def test_arrays_train_with_augmentation_in_process(data):
    clip = tiny_clip()
    task = FinetuneTask(clip, build_zeroshot_head(clip, data.classnames, data.templates))
    before = {k: v.clone() for k, v in task.checkpoint_state().items()}
    cfg = TrainConfig(epochs=1, batch_size=32, warmup_steps=1, lr=1e-3, augment="rrc_flip", crop_scale=(0.5, 1.0))
    fit(task, data, cfg, spec=ImageSpec.of(clip), progress_mode="off")
    assert any(not torch.equal(before[k], v) for k, v in task.checkpoint_state().items())



def test_imagenet_trains_end_to_end_on_a_fabricated_tree(tmp_path):
    """``dataset=imagenet``: the train split is found and trained on with the preset's augmentation,
    streamed from the JPEG files by a worker, then evaluated on ID and every shift; the notebook layer
    passes the session's epochs only where a method takes them and draws ImageNet's sweep axes."""
    from rftlib import notebook, viz
    from rftlib.data.imagenet import load_imagenet
    from rftlib.results import load

    from .fakes import make_fake_imagenet

    root = make_fake_imagenet(tmp_path / "data")
    data = load_imagenet(root)
    assert len(data.split("train")) == 24 and data.split("train").role == "train"
    data.templates = data.templates[:2]  # 2,000 prompts per head instead of 80,000: this test is about the input
    session = notebook.setup(dataset="imagenet", data_root=str(root), model="rft-tiny", pretrained="none", epochs=1,
                             batch_size=8, device="cpu", results_db=str(tmp_path / "r.db"), progress="off")
    session.data = data
    events = []
    result = session.run("finetune", callbacks=[events.append])
    assert sum(e.kind == "step" for e in events) == 3 and set(result.metrics) == {"id_test", "imagenet-r",
                                                                                 "imagenet-v2"}
    assert '"augment": "rrc"' in load(tmp_path / "r.db").config_json.iloc[0]
    zeroshot = session.run("zeroshot")  # takes no epochs: the session's are not passed to it
    table = pd.concat([pd.DataFrame([{"alpha": a, "split": s, "role": r.role, "metric": m, "value": v}
                                     for s, metrics in res.metrics.items() for m, v in metrics.items()
                                     for r in [data.split(s)]]) for a, res in ((0.0, zeroshot), (1.0, result))])
    axes = viz.sweep_axes(table)  # top-1 in and out of distribution; the OOD axis averages every shift
    assert axes.id == (("id_test", "accuracy"),)
    assert axes.ood == (("imagenet-v2", "accuracy"), ("imagenet-r", "accuracy"))
    assert session.axes() == axes
    assert len(viz.id_ood_points(table, "alpha")) == 2
    missing = load_imagenet(root, train=False)
    with pytest.raises(DataNotFoundError, match="prepare_imagenet.py"):
        missing.split("train")
