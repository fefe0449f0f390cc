"""Notebooks: hygiene (stripped, python3 kernel, one literal parameters cell, thin code) and a
headless papermill run of every notebook on its default parameters."""

import ast
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = {"quickstart", "finetune", "wiseft", "flyp", "dps", "drm", "croft", "radapter", "compare"}
HEAVY = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.For, ast.While, ast.With, ast.Try, ast.Lambda)


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_every_expected_notebook_exists():
    assert EXPECTED <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_hygiene(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    cells = _code_cells(nb)
    assert all(not c.outputs and c.execution_count is None for c in cells), "outputs must be stripped"
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and cells[0] is tagged[0], "exactly one parameters cell, the first code cell"
    for stmt in ast.parse(tagged[0].source).body:  # annotated literals, each with a comment
        assert isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name), ast.dump(stmt)
        ast.literal_eval(stmt.value)
    assert all("#" in line for line in tagged[0].source.splitlines() if line.strip())
    for cell in cells[1:]:
        tree = ast.parse(cell.source)
        heavy = [type(n).__name__ for n in ast.walk(tree) if isinstance(n, HEAVY)]
        assert not heavy, f"logic belongs in rftlib, found {heavy} in:\n{cell.source}"
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert all(n.split(".")[0] in ("rftlib", "IPython") for n in names), names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_sees_every_parameter_with_its_help(path):
    import papermill

    nb = nbformat.read(path, as_version=4)
    declared = {s.target.id for s in ast.parse(_code_cells(nb)[0].source).body}
    params = papermill.inspect_notebook(str(path))
    assert set(params) == declared  # a comment containing "=" would hide a parameter from papermill
    assert all(p["help"] for p in params.values())
    assert {"dataset", "data_root", "model", "pretrained", "epochs", "batch_size", "seed", "device", "results_db",
            "progress"} <= declared


def _execute(path: Path, tmp_path: Path, **parameters):
    import papermill

    out = tmp_path / f"{path.stem}-out.ipynb"
    papermill.execute_notebook(str(path), str(out), parameters=parameters, kernel_name="python3", cwd=str(tmp_path),
                               progress_bar=False, start_timeout=120)
    return nbformat.read(out, as_version=4)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_headless_on_defaults(path, tmp_path, monkeypatch):
    monkeypatch.setenv("RFT_RESULTS_DB", str(tmp_path / "results.db"))
    nb = _execute(path, tmp_path)
    outputs = [o for c in _code_cells(nb) for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    static = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert static, "every notebook leaves at least one static figure"


@pytest.mark.parametrize("bad, message", [
    ({"alpha": 1.5}, "alpha=1.5 is out of range"),
    ({"epochs": 0}, "epochs=0 is invalid"),
    ({"device": "tpu"}, "device='tpu'"),
])
def test_bad_parameters_fail_in_the_setup_cell(bad, message, tmp_path):
    import papermill

    with pytest.raises(papermill.PapermillExecutionError, match=message):
        _execute(ROOT / "notebooks" / "wiseft.ipynb", tmp_path, **bad)
    out = nbformat.read(tmp_path / "wiseft-out.ipynb", as_version=4)
    failed = [c for c in _code_cells(out) if any(o.output_type == "error" for o in c.outputs)]
    assert len(failed) == 1 and "notebook.setup(" in failed[0].source


def _failed_cells(nb):
    return [c for c in _code_cells(nb) if any(o.output_type == "error" for o in c.outputs)]


def test_without_data_a_notebook_stops_in_its_first_data_cell(tmp_path):
    import papermill

    empty = tmp_path / "no-data"
    with pytest.raises(papermill.PapermillExecutionError, match=r"prepare_wilds\.py iwildcam --root"):
        _execute(ROOT / "notebooks" / "drm.ipynb", tmp_path, dataset="iwildcam", data_root=str(empty))
    failed = _failed_cells(nbformat.read(tmp_path / "drm-out.ipynb", as_version=4))
    assert len(failed) == 1 and "session.load_data()" in failed[0].source


@pytest.mark.slow
def test_drm_notebook_runs_on_a_fabricated_iwildcam(tmp_path, monkeypatch):
    """``papermill notebooks/drm.ipynb out.ipynb -p dataset iwildcam`` end to end, tiny model, fake tree."""
    import json

    from rftlib.data import get_dataset
    from rftlib.methods.concepts import description_file
    from rftlib.results import load

    from .fakes import make_fake_iwildcam

    root = tmp_path / "data"
    make_fake_iwildcam(root, n_per_split={"train": 32, "id_val": 12, "id_test": 12, "val": 12, "test": 12},
                       num_classes=4)
    names = get_dataset("iwildcam", root=root).classnames
    path = description_file(root, "iwildcam")  # where prepare_drm_descriptions.py puts DRM's file
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({str(i): f"{name}, an animal with a distinctive shape" for i, name in enumerate(names)}))
    db = tmp_path / "results.db"
    monkeypatch.setenv("RFT_RESULTS_DB", str(db))
    nb = _execute(ROOT / "notebooks" / "drm.ipynb", tmp_path, dataset="iwildcam", data_root=str(root),
                  model="rft-tiny", pretrained="none", epochs=1, batch_size=8, grid_points=3, progress="off")
    assert not _failed_cells(nb)
    rows = load(db, method="drm")
    assert set(rows.dataset) == {"iwildcam"} and sorted(rows.beta.dropna().unique())[:3] == [0.0, 0.1, 0.2]

