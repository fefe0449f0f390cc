"""Dataset adapters on fabricated data: WILDS (iWildCam, FMoW), ImageNet folders, domain folders, CSVs.

Everything is offline and tiny: WILDS trees come from ``tests.fakes`` and are checked against the
real ``wilds`` package (same splits, labels and metrics), images are a few pixels written with PIL.
"""

from __future__ import annotations

import importlib.util
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from rftlib.data import DataNotFoundError, ImageReadError, get_dataset
from rftlib.registry import UnknownNameError
from tests.fakes import (
    import_wilds_quietly,
    install_torch_scatter_standin,
    make_fake_fmow,
    make_fake_iwildcam,
)

REPO = Path(__file__).resolve().parents[1]
WILDS_SPLITS = {"train": "train", "id_val": "id", "id_test": "id", "val": "ood", "test": "ood"}
SHARED_LABELS = Path("/work/shared/data/drm_concept_descriptions/iwildcam_metadata/labels.csv")


def load_script(name: str):
    """Import a file from data_scripts/ as a module (its ``main(argv)`` returns the exit status)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "data_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def write_image(path: Path, value: int = 0, size: int = 8, fmt: str | None = None) -> Path:
    """A tiny RGB image of one colour."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value % 256, (3 * value) % 256, 128)).save(path, format=fmt)
    return path


# --------------------------------------------------------------------------------------------------
# WILDS
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wilds_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wilds")
    make_fake_iwildcam(root, n_per_split={"train": 20, "test": 16}, num_classes=5)
    make_fake_fmow(root, n_per_split={"train": 20, "test": 18}, num_classes=6)
    return root


@pytest.fixture(scope="module")
def wilds():
    return import_wilds_quietly()


@pytest.mark.parametrize("name", ["iwildcam", "fmow"])
def test_wilds_splits_match_the_wilds_package(wilds_root, wilds, name):
    ds = get_dataset(name, root=wilds_root)
    wd = wilds.get_dataset(name, root_dir=str(wilds_root), download=False)
    assert list(ds.splits) == list(WILDS_SPLITS)
    for split_name, role in WILDS_SPLITS.items():
        split, subset = ds.split(split_name), wd.get_subset(split_name)
        assert split.role == role
        assert len(split) == len(subset) > 0
        np.testing.assert_array_equal(split.labels, subset.y_array.numpy())
        np.testing.assert_array_equal(split.metadata["y"], subset.y_array.numpy())
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in split.images.paths)


def test_iwildcam_paths_metadata_and_classnames(wilds_root, wilds):
    ds = get_dataset("iwildcam", root=wilds_root)
    wd = wilds.get_dataset("iwildcam", root_dir=str(wilds_root), download=False)
    subset = wd.get_subset("val")
    split = ds.split("val")
    image_dir = (wilds_root / "iwildcam_v2.0" / "train").resolve()
    expected = [str(image_dir / f) for f in wd._input_array[subset.indices]]
    assert list(split.images.paths) == expected
    assert {"location", "sequence", "datetime", "y"} <= set(split.metadata.columns)
    np.testing.assert_array_equal(split.metadata["location"], subset.metadata_array[:, 0].numpy())
    assert pd.api.types.is_datetime64_any_dtype(split.metadata["datetime"])
    categories = pd.read_csv(wilds_root / "iwildcam_v2.0" / "categories.csv")
    assert ds.classnames == [n.lower() for n in categories.sort_values("y")["name"]]
    assert ds.templates == ["a photo of {}.", "{} in the wild."]
    assert ds.primary_metric == {"id": "macro_f1", "ood": "macro_f1"}


def test_iwildcam_english_names_from_labels_csv(wilds_root, tmp_path):
    labels = tmp_path / "labels.csv"
    pd.DataFrame({
        "y": [0, 1, 2, 3, 4, 99999], "category_id": [0, 2, 3, 4, 5, 6],
        "name": ["empty", "a b", "c d", "e f", "g h", "i j"],
        "english": ["Empty", "White-lipped Peccary", "Agouti", "Paca", "Ocelot", "Not In Wilds"],
    }).to_csv(labels, index=False)
    ds = get_dataset("iwildcam", root=wilds_root, classnames_file=labels)
    assert ds.classnames == ["empty", "white-lipped peccary", "agouti", "paca", "ocelot"]
    assert ds.info["classnames_source"] == "labels.csv:english"
    if SHARED_LABELS.is_file():  # the real WiSE-FT file names more classes than the fake has
        real = get_dataset("iwildcam", root=wilds_root, classnames_file=SHARED_LABELS)
        assert real.classnames[0] == "empty"


def test_iwildcam_prompts_with_the_shipped_common_names_when_the_label_space_matches(wilds_root, tmp_path):
    """The papers prompt iWildCam with common names; rftlib ships WiSE-FT's table and uses it by
    default, but only for a dataset whose categories are that table's (a fake or another release
    keeps its own names)."""
    import shutil

    from rftlib.data.wilds_data import SHIPPED_LABELS

    root = tmp_path / "wilds"
    shutil.copytree(wilds_root, root)
    categories = root / "iwildcam_v2.0" / "categories.csv"
    fake = pd.read_csv(categories)
    shipped = pd.read_csv(SHIPPED_LABELS).set_index("y")
    real = fake.assign(name=[shipped.loc[y, "name"] for y in fake["y"]])  # this tree's labels are WILDS' labels
    real.to_csv(categories, index=False)
    ds = get_dataset("iwildcam", root=root)
    assert ds.classnames == [shipped.loc[y, "english"].lower() for y in sorted(fake["y"])]
    assert ds.classnames[1] == "white-lipped peccary"
    assert ds.info["classnames_source"] == "iwildcam_labels.csv:english (shipped with rftlib)"
    fake.to_csv(categories, index=False)  # another label space: its own (Latin) names, never misnamed
    assert get_dataset("iwildcam", root=root).info["classnames_source"] == "categories.csv:name"


def test_iwildcam_metrics_equal_wilds_eval(wilds_root, wilds):
    ds = get_dataset("iwildcam", root=wilds_root)
    wd = wilds.get_dataset("iwildcam", root_dir=str(wilds_root), download=False)
    rng = np.random.default_rng(0)
    for split_name in ("id_test", "test"):
        subset = wd.get_subset(split_name)
        y_pred = rng.integers(0, ds.num_classes, len(subset))
        ours = ds.compute_metrics(split_name, y_pred)
        theirs, _ = wd.eval(torch.as_tensor(y_pred), subset.y_array, subset.metadata_array)
        assert ours["macro_f1"] == pytest.approx(theirs["F1-macro_all"])
        assert ours["accuracy"] == pytest.approx(theirs["acc_avg"])
        assert ours["macro_recall"] == pytest.approx(theirs["recall-macro_all"])


def test_fmow_metadata_classnames_and_metrics(wilds_root, wilds):
    install_torch_scatter_standin()
    ds = get_dataset("fmow", root=wilds_root)
    wd = wilds.get_dataset("fmow", root_dir=str(wilds_root), download=False)
    from wilds.datasets.fmow_dataset import categories

    assert ds.classnames == list(categories) and "multi-unit_residential" in ds.classnames
    assert len(ds.templates) == 16
    assert ds.templates[2].format("airport_hangar") == "satellite photo of an airport hangar."
    assert ds.templates[0].format("airport_hangar") == "satellite photo of a airport_hangar."
    assert ds.primary_metric == {"id": "accuracy", "ood": "acc_worst_region"}
    rng = np.random.default_rng(1)
    for split_name in ("id_val", "test"):
        subset, split = wd.get_subset(split_name), ds.split(split_name)
        meta = subset.metadata_array.numpy()
        np.testing.assert_array_equal(split.metadata["year"], meta[:, 1] + 2002)
        assert list(split.metadata["region"]) == [wd.metadata_map["region"][r] for r in meta[:, 0]]
        paths = [str((wilds_root / "fmow_v1.1" / "images" / f"rgb_img_{i}.png").resolve())
                 for i in wd.full_idxs[subset.indices]]
        assert list(split.images.paths) == paths
        y_pred = np.where(rng.random(len(split)) < 0.5, split.labels, rng.integers(0, 6, len(split)))
        ours = ds.compute_metrics(split_name, y_pred)
        theirs, _ = wd.eval(torch.as_tensor(y_pred), subset.y_array, subset.metadata_array)
        assert ours["acc_worst_region"] == pytest.approx(theirs["acc_worst_region"])
        assert ours["acc_worst_year"] == pytest.approx(theirs["acc_worst_year"])
        assert ours["accuracy"] == pytest.approx(theirs["acc_avg"])


def test_wilds_frac_is_seeded_and_sized_like_wilds(wilds_root):
    full = get_dataset("iwildcam", root=wilds_root)
    half = get_dataset("iwildcam", root=wilds_root, frac=0.5, seed=3)
    again = get_dataset("iwildcam", root=wilds_root, frac=0.5, seed=3)
    for name, split in half.splits.items():
        assert len(split) == int(np.round(len(full.split(name)) * 0.5))
        assert set(split.images.paths) <= set(full.split(name).images.paths)
        assert split.images.paths == again.split(name).images.paths
    with pytest.raises(ValueError, match="frac"):
        get_dataset("iwildcam", root=wilds_root, frac=1.5)


@pytest.mark.parametrize("name", ["iwildcam", "fmow"])
def test_missing_wilds_data_names_the_prepare_command(tmp_path, name):
    with pytest.raises(DataNotFoundError, match="prepare_wilds.py") as info:
        get_dataset(name, root=tmp_path / "nowhere")
    assert f"prepare_wilds.py {name} --root" in str(info.value) and "--adopt" in str(info.value)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UnknownNameError, match="iwildcam") as info:
        get_dataset("imagenette")
    assert "fmow" in str(info.value) and "domains" in str(info.value)


# --------------------------------------------------------------------------------------------------
# prepare_wilds.py
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepare_wilds():
    return load_script("prepare_wilds")


def _fake_download(tmp_path: Path) -> Path:
    """A manually 'downloaded' iWildCam folder without the RELEASE marker."""
    data_dir = make_fake_iwildcam(tmp_path / "download", num_classes=3)
    (data_dir / "RELEASE_v2.0.txt").unlink()
    return data_dir


def test_prepare_wilds_adopts_a_folder(tmp_path, prepare_wilds):
    source = _fake_download(tmp_path)
    root = tmp_path / "root"
    assert prepare_wilds.main(["iwildcam", "--root", str(root)]) == 1  # nothing there yet
    assert prepare_wilds.main(["iwildcam", "--root", str(root), "--adopt", str(source.parent)]) == 0
    target = root / "iwildcam_v2.0"
    assert target.is_symlink() and (target / "RELEASE_v2.0.txt").is_file()
    assert len(get_dataset("iwildcam", root=root).split("train")) == 12
    assert prepare_wilds.main(["iwildcam", "--root", str(root)]) == 0  # verify only


def test_prepare_wilds_adopts_an_archive_and_detects_missing_images(tmp_path, prepare_wilds):
    source = _fake_download(tmp_path)
    archive = tmp_path / "iwildcam.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="iwildcam_v2.0")
    root = tmp_path / "root"
    assert prepare_wilds.main(["iwildcam", "--root", str(root), "--adopt", str(archive)]) == 0
    target = root / "iwildcam_v2.0"
    assert target.is_dir() and not target.is_symlink() and (target / "RELEASE_v2.0.txt").is_file()
    assert not list(root.glob(".*extracting"))
    for image in (target / "train").iterdir():
        image.unlink()
    assert prepare_wilds.main(["iwildcam", "--root", str(root), "--sample", "3"]) == 1


def test_prepare_wilds_download_failure_suggests_adopt(tmp_path, prepare_wilds, monkeypatch, caplog):
    class OfflineWilds:
        @staticmethod
        def get_dataset(*args, **kwargs):
            raise OSError("network unreachable")

    monkeypatch.setattr(prepare_wilds, "import_wilds", lambda: OfflineWilds)
    assert prepare_wilds.main(["fmow", "--root", str(tmp_path), "--download"]) == 1
    assert "--adopt" in caplog.text and "outage" in caplog.text


# --------------------------------------------------------------------------------------------------
# ImageNet
# --------------------------------------------------------------------------------------------------
TENCH, GOLDFISH, SHARK = "n01440764", "n01443537", "n01484850"  # indices 0, 1, 2; 1 and 2 are in ImageNet-R


@pytest.fixture
def imagenet_root(tmp_path) -> Path:
    for i, wnid in enumerate((TENCH, GOLDFISH, SHARK)):
        for k in range(2):
            write_image(tmp_path / "imagenet" / "val" / wnid / f"v{k}.JPEG", i, fmt="JPEG")
    for wnid in (GOLDFISH, SHARK):
        write_image(tmp_path / "imagenet-r" / wnid / "art.jpg", 7, fmt="JPEG")
    write_image(tmp_path / "imagenet-v2" / "2" / "x.jpeg", 9, fmt="JPEG")
    (tmp_path / "imagenet-r" / "README.txt").write_text("not a class")
    return tmp_path


def test_imagenet_resource_files():
    from rftlib.data.imagenet import imagenet_classnames, imagenet_wnids, subset_indices
    from rftlib.data.textfiles import read_templates

    wnids = imagenet_wnids()
    assert len(wnids) == 1000 == len(set(wnids)) and wnids == sorted(wnids)
    assert imagenet_classnames()[:2] == ["tench", "goldfish"] and len(imagenet_classnames()) == 1000
    assert len(read_templates("imagenet")) == 80 and read_templates("imagenet")[0] == "a bad photo of a {}."
    for shift in ("imagenet-r", "imagenet-a"):
        idx = subset_indices(shift)
        assert len(idx) == 200 == len(set(idx)) and idx == sorted(idx)
    assert subset_indices("imagenet-r")[:2] == [1, 2] and 0 not in subset_indices("imagenet-r")


def test_imagenet_folders_load_with_shifts(imagenet_root):
    ds = get_dataset("imagenet", root=imagenet_root)
    assert list(ds.splits) == ["id_test", "imagenet-v2", "imagenet-r"]  # sketch and A are absent
    assert ds.split("id_test").role == "id" and ds.split("imagenet-r").role == "ood"
    assert ds.split("id_test").labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert ds.split("imagenet-r").labels.tolist() == [1, 2]
    assert ds.split("imagenet-v2").labels.tolist() == [2]
    assert ds.num_classes == 1000 and len(ds.templates) == 80
    assert set(ds.info["logit_projection"]) == {"imagenet-r"}
    assert ds.compute_metrics("id_test", np.array([0, 0, 1, 5, 2, 2]))["accuracy"] == pytest.approx(5 / 6)


def test_imagenet_logit_projection_selects_the_200_columns(imagenet_root):
    from rftlib.data.imagenet import project_logits, subset_indices

    ds = get_dataset("imagenet", root=imagenet_root, shifts=["imagenet-r"])
    idx = subset_indices("imagenet-r")
    logits = np.random.default_rng(0).normal(size=(2, 1000)).astype(np.float32)
    logits[:, 0] = 100.0  # tench is the favourite, but it is not an ImageNet-R class
    logits[0, 2], logits[1, 1] = 50.0, 50.0
    selected = project_logits(ds, "imagenet-r", logits, mode="select")
    assert selected.shape == (2, 200)
    np.testing.assert_array_equal(selected, logits[:, idx])
    masked = project_logits(ds, "imagenet-r", logits)
    assert masked.shape == (2, 1000) and masked.argmax(1).tolist() == [2, 1]
    labels_are_1_2 = ds.compute_metrics("imagenet-r", masked.argmax(1))
    assert labels_are_1_2["accuracy"] == pytest.approx(0.0)
    as_torch = project_logits(ds, "imagenet-r", torch.from_numpy(logits))
    assert as_torch.argmax(1).tolist() == [2, 1]
    assert project_logits(ds, "imagenet-r", torch.from_numpy(logits), mode="select").shape == (2, 200)
    assert project_logits(ds, "id_test", logits) is logits


def test_imagenet_missing_val_and_bad_arguments(tmp_path, imagenet_root):
    with pytest.raises(DataNotFoundError, match="prepare_imagenet.py"):
        get_dataset("imagenet", root=tmp_path / "empty")
    with pytest.raises(ValueError, match="imagenet-sketch"):
        get_dataset("imagenet", root=imagenet_root, shifts=["imagenet-c"])
    with pytest.raises(DataNotFoundError, match="train"):
        get_dataset("imagenet", root=imagenet_root, train=True)
    prepare = load_script("prepare_imagenet")
    assert prepare.main(["--root", str(imagenet_root)]) == 0
    assert prepare.main(["--root", str(tmp_path / "empty")]) == 1


# --------------------------------------------------------------------------------------------------
# domain folders and user folders / CSVs
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def domains_root(tmp_path) -> Path:
    root = tmp_path / "pacs"
    for d, domain in enumerate(("art", "cartoon", "photo")):
        for c, cls in enumerate(("dog", "guitar", "house_plant")):
            for k in range(4):
                write_image(root / domain / cls / f"{k}.png", 10 * d + c + k)
    return root


def test_domains_leave_one_out(domains_root):
    ds = get_dataset("domains", root=domains_root)
    assert list(ds.splits) == ["train", "id_val", "id_test", "test_photo"]
    assert [ds.split(n).role for n in ds.splits] == ["train", "id", "id", "ood"]
    assert ds.classnames == ["dog", "guitar", "house plant"] and ds.templates == ["a photo of a {}."]
    parts = [set(ds.split(n).images.paths) for n in ("train", "id_val", "id_test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert sum(map(len, parts)) == 2 * 3 * 4 and [len(p) for p in parts] == [12, 6, 6]
    assert set(ds.split("test_photo").metadata["domain"]) == {"photo"}
    assert set(ds.split("train").metadata["domain"]) == {"art", "cartoon"}
    again = get_dataset("domains", root=domains_root)
    assert all(ds.split(n).images.paths == again.split(n).images.paths for n in ds.splits)
    other = get_dataset("domains", root=domains_root, seed=1)
    assert other.split("train").images.paths != ds.split("train").images.paths
    metrics = ds.compute_metrics("id_test", ds.split("id_test").labels)
    assert metrics["accuracy"] == 1.0 and metrics["acc_worst_domain"] == 1.0 and "acc_domain:art" in metrics


def test_domains_options_and_errors(domains_root, tmp_path):
    ds = get_dataset("domains", root=domains_root, test_domains=["art", "cartoon"])
    assert {"test_art", "test_cartoon"} <= set(ds.splits)
    assert set(ds.split("train").metadata["domain"]) == {"photo"}
    with pytest.raises(ValueError, match="sketch"):
        get_dataset("domains", root=domains_root, test_domains="sketch")
    write_image(domains_root / "photo" / "zebra" / "0.png")
    with pytest.raises(ValueError, match="zebra"):
        get_dataset("domains", root=domains_root)
    with pytest.raises(DataNotFoundError, match="<domain>/<class>"):
        get_dataset("domains", root=tmp_path / "missing")


def test_folder_splits_roles_and_openset(tmp_path):
    root = tmp_path / "mine"
    for split in ("train", "id_test", "test", "field"):
        for c, cls in enumerate(("red_fox", "wolf")):
            write_image(root / split / cls / "a.png", c)
    write_image(root / "openset" / "bear" / "a.png")
    ds = get_dataset("folder", root=root)
    roles = {n: s.role for n, s in ds.splits.items()}
    assert roles == {"field": "id", "id_test": "id", "openset": "openset", "test": "ood", "train": "train"}
    assert ds.classnames == ["red fox", "wolf"]
    assert ds.split("openset").labels.tolist() == [-1]
    assert ds.split("train").labels.tolist() == [0, 1]
    assert get_dataset("folder", root=root, split_roles={"field": "ood"}).split("field").role == "ood"
    with pytest.raises(ValueError, match="unknown role"):
        get_dataset("folder", root=root, split_roles={"field": "holdout"})
    with pytest.raises(DataNotFoundError, match="<split>/<class>"):
        get_dataset("folder", root=tmp_path / "nothing")


def test_folder_from_csv(tmp_path):
    for i in range(4):
        write_image(tmp_path / "imgs" / f"{i}.png", i)
    table = pd.DataFrame({
        "path": [f"imgs/{i}.png" for i in range(4)], "label": ["cat", "dog", "dog", "cat"],
        "split": ["train", "train", "test", "id_val"], "camera": ["a", "b", "a", "b"],
    })
    table.to_csv(tmp_path / "data.csv", index=False)
    ds = get_dataset("folder", csv=tmp_path / "data.csv")
    assert ds.classnames == ["cat", "dog"] and list(ds.splits) == ["train", "test", "id_val"]
    assert ds.split("train").labels.tolist() == [0, 1] and ds.split("test").role == "ood"
    assert ds.split("train").metadata["camera"].tolist() == ["a", "b"]
    assert all(Path(p).is_file() for p in ds.split("train").images.paths)
    numeric = table.assign(label=[0, 1, 1, 0])
    numeric.to_csv(tmp_path / "numeric.csv", index=False)
    ds = get_dataset("folder", root=tmp_path, csv="numeric.csv", classnames=["cat", "dog"])
    assert ds.split("test").labels.tolist() == [1]
    table.drop(columns="split").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match=r"\['split'\]"):
        get_dataset("folder", csv=tmp_path / "bad.csv")


def test_corrupt_image_is_named_when_decoded(tmp_path):
    from rftlib.data.pipeline import decode_split

    root = tmp_path / "mine"
    write_image(root / "train" / "cat" / "good.png")
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    ds = get_dataset("folder", root=root)
    with pytest.raises(ImageReadError, match="broken.jpg"):
        decode_split(ds.split("train"), 16)
