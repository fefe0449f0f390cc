"""The on-disk evaluation cache (decode once, verify, rebuild) and the prepared training copy."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from rftlib.data import ImageReadError, disk_cache, get_dataset
from rftlib.data.augment import Augment
from rftlib.data.images import center_view, read_image
from rftlib.data.loading import LoaderSettings
from rftlib.data.pipeline import ImageSpec, decode_split, eval_batches
from rftlib.data.prepared import PreparedReader, PrepareSettings, open_prepared, prepare
from rftlib.data.train_input import StepLayout, TrainInput
from rftlib.evaluate import evaluate
from rftlib.models import build_image_classifier, build_zeroshot_head

from .fakes import write_image_folder
from .helpers import tiny_clip


@pytest.fixture
def files(data, tmp_path):
    return get_dataset("folder", root=write_image_folder(tmp_path / "data", data, per_split=30))


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


def _decodes(monkeypatch) -> list:
    calls = []
    real = disk_cache.decode_views
    monkeypatch.setattr(disk_cache, "decode_views", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_views_match_the_eval_transform_of_each_file(files, cache_dir):
    split = files.split("test")
    views = decode_split(split, 32, cache_dir=cache_dir, settings=LoaderSettings(workers=2))
    assert views.shape == (len(split), 3, 32, 32) and views.dtype == torch.uint8
    for i in (0, 7, len(split) - 1):
        assert torch.equal(views[i], center_view(read_image(split.images.paths[i]), 32))


def test_cache_is_built_once_and_reused(files, cache_dir, monkeypatch):
    calls = _decodes(monkeypatch)
    split = files.split("test")
    first = decode_split(split, 32, cache_dir=cache_dir).clone()
    second = decode_split(split, 32, cache_dir=cache_dir)
    assert len(calls) == 1 and torch.equal(first, second)
    assert len(list(cache_dir.glob("*.u8"))) == 1 and not list(cache_dir.glob("*tmp*"))


def test_changed_source_files_make_a_new_cache(files, cache_dir, monkeypatch):
    calls = _decodes(monkeypatch)
    split = files.split("test")
    decode_split(split, 32, cache_dir=cache_dir)
    path = split.images.paths[3]
    before = os.stat(path)
    shutil.copy(split.images.paths[4], path)  # a replaced image
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    views = decode_split(split, 32, cache_dir=cache_dir)
    assert len(calls) == 2 and torch.equal(views[3], views[4])


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "manifest", "no manifest"])
def test_a_damaged_cache_is_detected_and_rebuilt(files, cache_dir, monkeypatch, caplog, damage):
    split = files.split("test")
    good = decode_split(split, 32, cache_dir=cache_dir).clone()
    data_file, manifest = next(cache_dir.glob("*.u8")), next(cache_dir.glob("*.json"))
    disk_cache._VERIFIED.clear()  # a new process
    if damage == "flip a byte":
        with open(data_file, "r+b") as handle:
            handle.seek(5000)
            value = handle.read(1)[0]
            handle.seek(5000)
            handle.write(bytes([value ^ 0xFF]))
    elif damage == "truncate":
        os.truncate(data_file, data_file.stat().st_size // 2)
    elif damage == "manifest":
        manifest.write_text("{not json")
    else:
        manifest.unlink()
    calls = _decodes(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="rftlib.data.disk_cache"):
        views = decode_split(split, 32, cache_dir=cache_dir)
    assert len(calls) == 1 and torch.equal(views, good)
    assert "rebuilding" in caplog.text and data_file.name in caplog.text


def test_evaluation_from_the_cache_equals_streaming(files, cache_dir, monkeypatch):
    monkeypatch.setenv("RFT_CACHE_DIR", str(cache_dir))
    clip = tiny_clip()
    model = build_image_classifier(clip, build_zeroshot_head(clip, files.classnames, files.templates))
    spec = ImageSpec.of(clip)
    cached = evaluate(model, files, "test", spec, batch_size=7, settings=LoaderSettings(workers=1))
    streamed = evaluate(model, files, "test", spec, batch_size=7, settings=LoaderSettings(workers=2, eval_cache=False))
    assert torch.equal(cached.logits, streamed.logits) and cached.metrics == streamed.metrics
    assert list(cache_dir.glob("decoded/test-32px-*.u8"))
    batches = list(eval_batches(files.split("train"), 32, batch_size=8, settings=LoaderSettings(workers=2)))
    assert [len(b) for b in batches] == [8, 8, 8, 6]  # a training split streams (no cache file)
    assert not list(cache_dir.glob("decoded/train-*"))


def test_a_file_that_cannot_be_decoded_is_named(files, cache_dir):
    split = files.split("id_val")
    with open(split.images.paths[5], "wb") as handle:
        handle.write(b"not an image")
    with pytest.raises(ImageReadError, match=os.path.basename(split.images.paths[5])):
        decode_split(split, 32, cache_dir=cache_dir, settings=LoaderSettings(workers=2))
    assert not list(cache_dir.glob("*.u8*"))  # nothing half-written is left


@pytest.mark.parametrize("fmt", ["jpeg", "raw"])
def test_prepared_copy_is_resumable_and_feeds_training(files, tmp_path, fmt):
    split = files.split("train")
    settings = PrepareSettings(short_side=36, format=fmt, shard_size=8)
    folder = prepare(split, tmp_path / "prep", settings, workers=2)
    index_files = sorted(folder.glob("shard-*.idx.npy"))
    assert len(index_files) == 4 and (folder / "manifest.json").exists()
    index_files[2].unlink()  # an interrupted job: one shard missing
    stamp = {p: p.stat().st_mtime_ns for p in folder.glob("shard-*.bin")}
    prepare(split, folder, settings, workers=0)
    rewritten = [p.name for p in folder.glob("shard-*.bin") if p.stat().st_mtime_ns != stamp.get(p)]
    assert rewritten == ["shard-00002.bin"]
    reader = PreparedReader(folder, split.images.paths)
    image = reader.read(5)
    assert min(image.shape[-2:]) == 36
    if fmt == "raw":  # resized once from the original, nothing else
        from rftlib.data.images import BICUBIC, TF

        original = read_image(split.images.paths[5])
        assert torch.equal(image, TF.resize(original, list(image.shape[-2:]), interpolation=BICUBIC, antialias=True))
    source = TrainInput(split, 32, StepLayout(len(split), 8, seed=1), Augment("rrc"),
                        LoaderSettings(workers=2, prepared=str(folder)))
    assert source.plan.path == "stream" and "prepared" in source.plan.reason
    steps = list(source.steps(0, 3))
    assert len(steps) == 3 and steps[0][0].images.shape == (8, 3, 32, 32)
    with pytest.raises(ValueError, match="another job"):
        prepare(split, folder, PrepareSettings(short_side=48, format=fmt, shard_size=8))


def test_prepared_copy_refuses_the_wrong_split_size_or_damage(files, tmp_path):
    split = files.split("train")
    folder = prepare(split, tmp_path / "prep", PrepareSettings(short_side=36, shard_size=16), workers=0)
    with pytest.raises(ValueError, match="another file list"):
        open_prepared(folder, files.split("id_val"), 32)
    with pytest.raises(ValueError, match="smaller than the model"):
        open_prepared(folder, split, 40)
    index = np.load(folder / "shard-00000.idx.npy")
    with open(folder / "shard-00000.bin", "r+b") as handle:
        handle.seek(int(index[3, 0]) + 10)
        handle.write(b"\x00\x01\x02")
    with pytest.raises(ImageReadError, match="damaged at image 3"):
        PreparedReader(folder, split.images.paths).read(3)
    (folder / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="prepare_cache.py"):
        PreparedReader(folder, split.images.paths)
    assert json.loads((folder / "job.json").read_text())["short_side"] == 36


def test_prepare_cache_script_prepares_a_folder_dataset_and_refuses_arrays(files, tmp_path, capsys):
    from .test_data_adapters import load_script

    script = load_script("prepare_cache")
    root = files.root
    assert script.main(["folder", "--root", str(root), "--out", str(tmp_path / "prep"), "--workers", "0",
                        "--short-side", "40", "--shard-size", "16"]) == 0
    assert f"--prepared {tmp_path / 'prep'}" in capsys.readouterr().out
    assert PreparedReader(tmp_path / "prep", files.split("train").images.paths).short_side == 40
    assert script.main(["synthwild", "--data-option", "size=tiny", "cache=false"]) == 1
