"""Few-shot sampling as a dataset option: k training images per class, seeded, recorded, any dataset."""

import logging

import numpy as np
import pytest

from rftlib.data import get_dataset
from rftlib.data.fewshot import FewShot, apply_few_shot, few_shot_indices
from rftlib.runs import identity_of

from .fakes import write_jpeg_tree


def _counts(split, num_classes):
    return np.bincount(split.labels, minlength=num_classes)


def _train_keys(dataset):
    """What identifies the kept training images: the pixels of in-memory ones, else the file paths."""
    images = dataset.split("train").images
    return images.array.tobytes() if hasattr(images, "array") else images.paths


def test_synthwild_keeps_k_per_class_and_records_it(data):
    full = _counts(data.split("train"), data.num_classes)
    few = get_dataset("synthwild", size="tiny", cache=False, shots=4, shots_seed=1)
    assert (_counts(few.split("train"), few.num_classes) == np.minimum(full, 4)).all()
    for name in set(data.splits) - {"train"}:  # only the train split is subsampled
        assert np.array_equal(few.split(name).labels, data.split(name).labels)
        assert np.array_equal(few.split(name).images.array, data.split(name).images.array)
    assert few.options == {"size": "tiny", "shots": 4, "shots_seed": 1}  # "cache" is I/O: not the data
    facts = few.info["few_shot"]
    assert facts["train_before"] == len(data.split("train")) and facts["train_after"] == len(few.split("train"))
    assert facts["short_classes"] == {data.classnames[c]: int(n) for c, n in enumerate(full) if n < 4}
    # the images, labels and metadata stay aligned: each kept image is one of the full split's, same label
    train, kept = data.split("train"), few.split("train")
    rows = {train.images.array[i].tobytes(): int(train.labels[i]) for i in range(len(train))}
    assert all(rows[kept.images.array[i].tobytes()] == kept.labels[i] for i in range(len(kept)))
    assert len(kept.metadata) == len(kept)


def test_sampling_is_deterministic_per_seed_and_differs_across_seeds(data):
    def sample(seed):
        dataset = get_dataset("synthwild", size="tiny", cache=False, shots=3, shots_seed=seed)
        return _train_keys(dataset)

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    # shots_seed defaults to 0 and is recorded either way
    assert get_dataset("synthwild", size="tiny", cache=False, shots=3).options["shots_seed"] == 0


def test_indices_are_nested_and_per_class_independent():
    labels = np.repeat(np.arange(4), [10, 3, 7, 20])
    one, many = few_shot_indices(labels, 1, seed=5), few_shot_indices(labels, 16, seed=5)
    assert set(one) <= set(many)  # the 1-shot set is inside the 16-shot set of the same seed
    assert np.all(np.diff(many) > 0)  # kept in their original order
    # a class's draw does not depend on the other classes
    both = few_shot_indices(labels, 5, seed=5)
    assert np.array_equal(both[labels[both] == 3], few_shot_indices(labels[20:], 5, seed=5) + 20)


def test_folder_dataset_short_classes_keep_all_and_are_logged(tmp_path, caplog):
    root = tmp_path / "data"
    write_jpeg_tree(root / "train", {"ant": 6, "bee": 2, "cat": 9})
    write_jpeg_tree(root / "id_test", {"ant": 2, "bee": 2, "cat": 2}, seed=1)
    with caplog.at_level(logging.WARNING, logger="rftlib.data.fewshot"):
        few = get_dataset("folder", root=root, shots=4, shots_seed=3)
    assert few.classnames == ["ant", "bee", "cat"]
    assert _counts(few.split("train"), 3).tolist() == [4, 2, 4]
    assert len(few.split("id_test")) == 6
    assert few.options == {"shots": 4, "shots_seed": 3} and few.info["few_shot"]["short_classes"] == {"bee": 2}
    assert few.info["sizes"]["train"] == 10
    assert "1 of 3 classes have fewer than 4 training images" in caplog.text and "bee (2)" in caplog.text
    again = get_dataset("folder", root=root, shots=4, shots_seed=3)
    other = get_dataset("folder", root=root, shots=4, shots_seed=4)
    assert _train_keys(again) == _train_keys(few) != _train_keys(other)
    # every kept file is in the folder of its label
    train = few.split("train")
    assert all(f"/{few.classnames[label]}/" in path for path, label in zip(train.images.paths, train.labels))


def test_shots_enter_the_run_identity(data):
    full = get_dataset("synthwild", size="tiny", cache=False)
    few = get_dataset("synthwild", size="tiny", cache=False, shots=2)
    ids = {identity_of("croft", d.name, "rft-tiny", None, 0, {}, d.options).run_id() for d in (full, few)}
    assert len(ids) == 2


@pytest.mark.parametrize(("options", "message"), [
    ({"shots": 0}, "shots=0 is invalid"),
    ({"shots": "16"}, "shots='16' is invalid"),
    ({"shots": True}, "shots=True is invalid"),
    ({"shots": 4, "shots_seed": -1}, "shots_seed=-1 is invalid"),
    ({"shots_seed": 2}, "shots_seed=2 needs shots"),
])
def test_bad_shot_options_fail_before_loading(options, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        get_dataset("folder", root=tmp_path / "missing", **options)  # no DataNotFoundError: checked first


def test_a_dataset_without_a_train_split_records_the_option(data):
    without = get_dataset("synthwild", size="tiny", cache=False)
    del without.splits["train"]
    apply_few_shot(without, FewShot(2))
    assert without.options["shots"] == 2 and "few_shot" not in without.info


@pytest.mark.parametrize("given, seed, expected", [
    ({}, 2, {"shots": 16, "shots_seed": 2}),  # Setup-I: 16 shots, drawn with the run's seed
    ({"shots_seed": 5}, 2, {"shots": 16, "shots_seed": 5}),
    ({"shots": 4}, 2, {"shots": 4}),
    ({"shots": None}, 2, {}),  # the whole train split
])
def test_croft_loads_imagenet_few_shot_by_its_data_preset(given, seed, expected):
    from rftlib.methods import data_options_for

    assert data_options_for("croft", "imagenet", given, seed=seed) == expected
    assert data_options_for("finetune", "imagenet", given, seed=seed) == {k: v for k, v in given.items()
                                                                          if v is not None}


def test_the_cli_and_planned_runs_apply_the_data_preset(tmp_path):
    from rftlib import cli
    from rftlib.methods import plan_identity

    from .fakes import make_fake_imagenet

    root = make_fake_imagenet(tmp_path / "data", train_per_class=20)
    parser = cli.build_parser()
    args = parser.parse_args(["--method", "croft", "--dataset", "imagenet", "--data-root", str(root), "--seed", "3"])
    _, data = cli._resolve_inputs(parser, args)
    assert data.options == {"shots": 16, "shots_seed": 3} and len(data.split("train")) == 3 * 16
    planned = plan_identity("croft", "imagenet", model="rft-tiny", pretrained=None, seed=3)
    assert planned.dataset_options == data.options


def test_a_malformed_data_preset_is_refused():
    import types

    from rftlib.methods import MethodContractError, check_method_module

    module = types.ModuleType("rftlib.methods.broken")
    module.DATA_PRESETS = {"imagenet": 16}
    with pytest.raises(MethodContractError, match="broken.DATA_PRESETS must map dataset names"):
        check_method_module(module)


def test_a_notebook_session_gives_croft_its_few_shot_data(tmp_path):
    from rftlib import notebook

    from .fakes import make_fake_imagenet

    root = make_fake_imagenet(tmp_path / "data", train_per_class=20)
    session = notebook.setup(dataset="imagenet", data_root=str(root), seed=1, results_db=str(tmp_path / "r.db"))
    assert session.data_for("finetune") is session.load_data() and len(session.load_data().split("train")) == 60
    few = session.data_for("croft")
    assert few.options == {"shots": 16, "shots_seed": 1} and len(few.split("train")) == 48
    assert session.data_for("croft") is few  # loaded once
