"""ObjectNet as the fifth ImageNet shift, on a fabricated release next to a fabricated ImageNet.

The fake ``objectnet-1.0/`` has the official layout and mapping-file formats: four class folders
of tiny PNGs framed in red, of which ``squeegee`` maps to no ImageNet class (dropped), ``banana``
to one and ``alarm_clock`` (2) and ``chair`` (3) to several; the 1000 ImageNet names are listed
in a shuffled ILSVRC2012 order, as the real ``pytorch_to_imagenet_2012_id.json`` shuffles them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from rftlib.data import DataNotFoundError, get_dataset
from rftlib.data.disk_cache import source_key
from rftlib.data.imagenet import project_logits
from rftlib.data.objectnet import MAPPING_FILES, group_logits
from rftlib.data.views import reader_for
from rftlib.results import ResultsStore, compare

ANALOG_CLOCK, DIGITAL_CLOCK, BANANA = 409, 530, 954  # rftlib's (= PyTorch's) ImageNet indices
BARBER_CHAIR, FOLDING_CHAIR, ROCKING_CHAIR = 423, 559, 765
CRANES = (134, 517)  # the bird and the machine: one name, two classes (as in the real list)
FULL_NAMES = {ANALOG_CLOCK: "analog clock", DIGITAL_CLOCK: "digital clock", BANANA: "banana",
              BARBER_CHAIR: "barber chair", FOLDING_CHAIR: "folding chair", ROCKING_CHAIR: "rocking chair, rocker",
              CRANES[0]: "crane", CRANES[1]: "crane"}
OBJECTNET_TO_IMAGENET = {"Alarm clock": "analog clock; digital clock", "Banana": "banana",
                         "Chair": "barber chair; folding chair; rocking chair, rocker"}
FOLDERS = {"alarm_clock": "Alarm clock", "banana": "Banana", "chair": "Chair", "squeegee": "Squeegee"}
INTERIOR = {"alarm_clock": 40, "banana": 120, "chair": 200, "squeegee": 90}  # green level inside the frame
COUNTS = {"alarm_clock": 2, "banana": 1, "chair": 2, "squeegee": 1}
RED = (255, 0, 0)


def to_2012(index: int) -> int:
    """A fixed shuffle of the 1000 indices (7 is coprime with 1000)."""
    return (7 * index + 3) % 1000


def write_framed_png(path: Path, green: int, size: tuple[int, int] = (14, 12)) -> None:
    """A PNG with a 1-px red frame, like ObjectNet's, around a flat interior."""
    width, height = size
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[...] = RED
    pixels[1:-1, 1:-1] = (10, green, 30)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_mappings(folder: Path) -> Path:
    mappings = folder / "mappings"
    mappings.mkdir(parents=True, exist_ok=True)
    (mappings / "folder_to_objectnet_label.json").write_text(json.dumps(FOLDERS, indent=2))
    (mappings / "objectnet_to_imagenet_1k.json").write_text(json.dumps(OBJECTNET_TO_IMAGENET, indent=2))
    (mappings / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({str(i): to_2012(i) for i in range(1000)}))
    names = [""] * 1000
    for index in range(1000):
        names[to_2012(index)] = FULL_NAMES.get(index, f"imagenet class {index}")
    (mappings / "imagenet_to_label_2012_v2").write_text("\n".join(names) + "\n")
    return mappings


@pytest.fixture
def root(tmp_path) -> Path:
    for i, wnid in enumerate(("n01440764", "n01443537")):  # tench and goldfish, two images each
        for k in range(2):
            path = tmp_path / "imagenet" / "val" / wnid / f"v{k}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(path, format="JPEG")
    release = tmp_path / "objectnet-1.0"
    for folder, count in COUNTS.items():
        for k in range(count):
            write_framed_png(release / "images" / folder / f"{k:04d}.png", INTERIOR[folder])
    write_mappings(release)
    return tmp_path


def test_only_the_classes_mapped_to_imagenet_are_kept_with_objectnet_labels(root):
    ds = get_dataset("imagenet", root=root)
    assert list(ds.splits) == ["id_test", "objectnet"]
    split = ds.split("objectnet")
    assert split.role == "ood" and len(split) == 5  # squeegee's image is left out
    classes = ds.info["objectnet"]
    assert classes.folders == ("alarm_clock", "banana", "chair") and len(classes) == 3
    assert classes.names == ("Alarm clock", "Banana", "Chair")
    assert classes.imagenet == ((ANALOG_CLOCK, DIGITAL_CLOCK), (BANANA,), (BARBER_CHAIR, FOLDING_CHAIR, ROCKING_CHAIR))
    assert split.labels.tolist() == [0, 0, 1, 2, 2]
    assert split.metadata["objectnet_class"].tolist() == ["Alarm clock"] * 2 + ["Banana"] + ["Chair"] * 2
    assert ds.info["logit_projection"]["objectnet"] == sorted(i for g in classes.imagenet for i in g)
    assert ds.split_facts()["objectnet"] == {"role": "ood", "metric": "accuracy", "use": "test"}


def test_the_grouped_projection_takes_each_classes_best_imagenet_logit(root):
    ds = get_dataset("imagenet", root=root, shifts=["objectnet"])
    logits = np.zeros((2, 1000), dtype=np.float32)
    logits[:, 0] = 9.0  # tench: the favourite, but no ObjectNet class maps to it
    mapped = [ANALOG_CLOCK, DIGITAL_CLOCK, BANANA, BARBER_CHAIR, FOLDING_CHAIR, ROCKING_CHAIR]
    logits[0, mapped] = [1, 3, 2, -1, 0.5, 2.5]
    logits[1, mapped] = [1, -2, 0, 4, 0, 1]
    grouped = project_logits(ds, "objectnet", logits, mode="group")
    np.testing.assert_array_equal(grouped, [[3, 2, 2.5], [1, 0, 4]])  # max over {409, 530}, {954}, {423, 559, 765}
    assert grouped.argmax(1).tolist() == [0, 2]  # alarm clock, chair
    as_torch = project_logits(ds, "objectnet", torch.from_numpy(logits), mode="group")
    assert isinstance(as_torch, torch.Tensor) and as_torch.tolist() == grouped.tolist()
    selected = project_logits(ds, "objectnet", logits, mode="select")
    assert selected.shape == (2, 6)
    with pytest.raises(ValueError, match="mode='group'"):
        project_logits(ds, "id_test", logits, mode="group")


def test_mask_mode_keeps_1000_columns_and_the_grouping_still_works_on_them(root):
    ds = get_dataset("imagenet", root=root, shifts=["objectnet"])
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    logits[:, 0] = 50.0
    masked = project_logits(ds, "objectnet", logits)  # the contract DRM relies on: (N, 1000), -inf elsewhere
    covered = ds.info["logit_projection"]["objectnet"]
    assert masked.shape == (4, 1000)
    assert torch.isinf(masked).sum().item() == 4 * (1000 - len(covered))
    assert torch.equal(masked[:, covered], logits[:, covered])
    mixed = 0.5 * masked.softmax(-1) + 0.5 * project_logits(ds, "objectnet", logits * 2).softmax(-1)  # DRM-style
    assert torch.equal(project_logits(ds, "objectnet", masked, mode="group"),
                       project_logits(ds, "objectnet", logits, mode="group"))
    classes = ds.info["objectnet"]
    via_imagenet = torch.as_tensor(classes.to_objectnet()[mixed.argmax(1).numpy()])
    assert torch.equal(group_logits(mixed, classes.imagenet).argmax(1), via_imagenet)  # probabilities too
    # the metric maps the masked arg-max (an ImageNet index) to its ObjectNet class
    grouped_pred = project_logits(ds, "objectnet", logits, mode="group").argmax(1).numpy()
    split = ds.split("objectnet").subset([0, 1, 2, 3])
    expected = float(np.mean(grouped_pred == split.labels))
    assert ds.compute_metrics(split, masked.argmax(1).numpy())["accuracy"] == pytest.approx(expected)


def test_the_metric_scores_imagenet_predictions_against_objectnet_labels(root):
    ds = get_dataset("imagenet", root=root)
    preds = np.array([DIGITAL_CLOCK, ANALOG_CLOCK, ROCKING_CHAIR, FOLDING_CHAIR, 0])  # labels 0, 0, 1, 2, 2
    assert ds.compute_metrics("objectnet", preds)["accuracy"] == pytest.approx(3 / 5)
    assert ds.compute_metrics("id_test", np.array([0, 0, 1, 5]))["accuracy"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="ImageNet indices"):
        ds.compute_metrics("objectnet", np.array([0, 1, 2, 1000, 3]))


class ColourClassifier(nn.Module):
    """1000-way logits from the mean green level: tench (unmapped) always scores highest."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # run_model reads the device from a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        green = x[:, 1].mean(dim=(1, 2)) * 255
        logits = torch.zeros(len(x), 1000) + self.anchor
        logits[:, 0] = 100.0
        logits[green < 80, DIGITAL_CLOCK] = 10.0   # alarm clocks: right
        logits[(green >= 80) & (green < 160), ANALOG_CLOCK] = 10.0  # bananas: wrong (an alarm clock)
        logits[green >= 160, ROCKING_CHAIR] = 10.0  # chairs: right
        return logits


def test_evaluate_scores_a_1000_way_classifier_on_objectnet(root):
    from rftlib.data.loading import LoaderSettings
    from rftlib.data.pipeline import ImageSpec
    from rftlib.evaluate import evaluate

    ds = get_dataset("imagenet", root=root)
    spec = ImageSpec(size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    result = evaluate(ColourClassifier(), ds, "objectnet", spec, device="cpu",
                      settings=LoaderSettings(workers=0, eval_cache=False))
    assert result.logits.shape == (5, 1000) and torch.isinf(result.logits[:, 0]).all()  # masked, not reduced
    assert result.metrics["accuracy"] == pytest.approx(4 / 5)


def test_every_objectnet_image_loses_a_two_pixel_border(root):
    split = get_dataset("imagenet", root=root).split("objectnet")
    assert split.images.border == 2
    image = reader_for(split.images).read(0)
    assert tuple(image.shape) == (3, 12 - 4, 14 - 4)
    assert (image[0] == 10).all() and (image[1] == INTERIOR["alarm_clock"]).all()  # no red frame left
    with Image.open(split.images.paths[0]) as raw:
        assert raw.size == (14, 12) and raw.getpixel((0, 0)) == RED
    subset = split.subset([2])  # a subset keeps the image files, their border, labels and metadata
    assert subset.labels.tolist() == [1] and subset.metadata["objectnet_class"].tolist() == ["Banana"]
    assert subset.images.border == 2 and tuple(reader_for(subset.images).read(0).shape) == (3, 8, 10)
    paths = split.images.paths
    assert source_key(paths, 224, 2) != source_key(paths, 224) == source_key(paths, 224, 0)  # cached apart


@pytest.mark.parametrize("name", MAPPING_FILES)
def test_a_missing_mapping_file_names_itself_and_the_prepare_command(root, name):
    (root / "objectnet-1.0" / "mappings" / name).unlink()
    with pytest.raises(DataNotFoundError, match=rf"(?s){name}.*prepare_imagenet.py --root"):
        get_dataset("imagenet", root=root)


@pytest.mark.parametrize("name, text, problem", [
    ("objectnet_to_imagenet_1k.json", "{not json", "not valid JSON"),
    ("objectnet_to_imagenet_1k.json", json.dumps({"Banana": "plantain"}), "'plantain' .* is not a line of"),
    ("objectnet_to_imagenet_1k.json", json.dumps({"Banana": "crane"}), "'crane' .* names 2 classes"),
    ("objectnet_to_imagenet_1k.json", json.dumps({"Kettle": "banana"}), "'Kettle' has no folder"),
    ("objectnet_to_imagenet_1k.json", json.dumps({"Banana": "banana", "Chair": "banana"}), "mapped to both"),
    ("folder_to_objectnet_label.json", json.dumps(["banana"]), "non-empty JSON object"),
    ("pytorch_to_imagenet_2012_id.json", json.dumps({"0": 1}), "one-to-one"),
    ("imagenet_to_label_2012_v2", "banana\n", "expected 1000 class names"),
])
def test_a_malformed_mapping_file_is_refused_with_what_to_fix(root, name, text, problem):
    (root / "objectnet-1.0" / "mappings" / name).write_text(text)
    with pytest.raises(ValueError, match=rf"(?s){name} is malformed: .*{problem}.*prepare_imagenet.py"):
        get_dataset("imagenet", root=root)


def test_objectnet_without_images_and_the_other_accepted_folder_name(root):
    (root / "objectnet-1.0").rename(root / "objectnet")
    assert len(get_dataset("imagenet", root=root).split("objectnet")) == 5
    for folder in (root / "objectnet" / "images").iterdir():
        for image in folder.iterdir():
            image.unlink()
    with pytest.raises(DataNotFoundError, match="no image of the 3 ObjectNet classes"):
        get_dataset("imagenet", root=root)
    assert "objectnet" not in get_dataset("imagenet", root=root, shifts=["imagenet-r"]).splits


def test_the_prepare_script_reports_objectnet(root, caplog):
    from tests.test_data_adapters import load_script

    prepare = load_script("prepare_imagenet")
    caplog.set_level("INFO")
    assert prepare.main(["--root", str(root)]) == 0
    assert "ObjectNet" in caplog.text and "3/113 mapped classes" in caplog.text and "5/18,574 images" in caplog.text
    caplog.clear()
    (root / "objectnet-1.0" / "mappings" / "objectnet_to_imagenet_1k.json").unlink()
    assert prepare.main(["--root", str(root)]) == 0  # ObjectNet is optional: reported, not fatal
    assert "PROBLEM" in caplog.text and "objectnet_to_imagenet_1k.json" in caplog.text
    caplog.clear()
    assert prepare.main(["--root", str(root / "nothing")]) == 1
    assert "objectnet.dev" in caplog.text


# --------------------------------------------------------------------------------------------------
# the comparison: the papers' 5-shift average next to the 4-shift one
# --------------------------------------------------------------------------------------------------
SHIFTS = {"imagenet-v2": 0.6, "imagenet-sketch": 0.4, "imagenet-r": 0.7, "imagenet-a": 0.3, "objectnet": 0.25}


def _imagenet_run(store: ResultsStore, run: str, method: str, values: dict[str, float], seed: int = 0) -> None:
    splits = {"id_test": {"role": "id", "metric": "accuracy", "use": "test"},
              **{s: {"role": "ood", "metric": "accuracy", "use": "test"} for s in values if s != "id_test"}}
    store.start_run(run, method=method, dataset="imagenet", model="m", pretrained="p", seed=seed, splits=splits)
    for split, value in values.items():
        store.log_metrics(run, {"accuracy": value}, split=split, role=splits[split]["role"])
    store.finish_run(run)


def test_compare_reports_the_5_and_the_4_shift_averages(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    for seed, shift in enumerate((0.0, 0.1)):
        _imagenet_run(store, f"ft-{seed}", "finetune", {"id_test": 0.8, **{s: v + shift for s, v in SHIFTS.items()}},
                      seed=seed)
    without = {s: v for s, v in SHIFTS.items() if s != "objectnet"}
    _imagenet_run(store, "zs", "zeroshot", {"id_test": 0.7, **without})  # evaluated before ObjectNet was there
    found = compare(store.load())
    table = found.table.set_index("method")
    assert list(found.table.columns[7:11]) == ["ood_mean", "ood_ci", "ood_without_objectnet_mean",
                                               "ood_without_objectnet_ci"]
    assert table.loc["finetune", "ood_mean"] == pytest.approx(0.45 + 0.05)  # 2.25/5, then +0.1 for seed 1
    assert table.loc["finetune", "ood_without_objectnet_mean"] == pytest.approx(0.5 + 0.05)  # 2.0/4
    assert table.loc["finetune", "ood_without_objectnet_ci"] == pytest.approx(table.loc["finetune", "ood_ci"])
    assert table.loc["zeroshot", "ood_mean"] == table.loc["zeroshot", "ood_without_objectnet_mean"] == 0.5
    assert found.axes["ood"] == "OOD accuracy (mean of 5 splits)"
    assert found.axes["ood_without_objectnet"] == "OOD accuracy (mean of 4 splits) without objectnet"


def test_objectnet_moves_the_5_shift_average_only(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    _imagenet_run(store, "ft", "finetune", {"id_test": 0.8, **SHIFTS, "objectnet": 1.0})
    row = compare(store.load()).table.iloc[0]
    assert row["ood_mean"] == pytest.approx(3.0 / 5) and row["ood_without_objectnet_mean"] == pytest.approx(2.0 / 4)


def test_datasets_without_objectnet_keep_their_columns(tmp_path):
    from rftlib.results.compare import TABLE_COLUMNS

    store = ResultsStore(tmp_path / "r.db")
    _imagenet_run(store, "ft", "finetune", {"id_test": 0.8, "imagenet-v2": 0.6, "imagenet-r": 0.7})
    found = compare(store.load())
    assert list(found.table.columns) == TABLE_COLUMNS and set(found.axes) == {"id", "ood"}
    assert isinstance(found.table, pd.DataFrame) and found.table["ood_mean"].item() == pytest.approx(0.65)
