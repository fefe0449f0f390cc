"""Notebooks: hygiene (stripped, python3 kernel, one literal parameters cell, thin code, a static
figure), every registered method run by some notebook, and papermill's parameter injection.

Each notebook is *executed* once per suite, by nbval (``--nbval-lax`` over ``notebooks/``, default
parameters as stored; see pyproject.toml). Here papermill only prepares every notebook with injected
parameters (``prepare_only``), and executes one: quickstart with injected values whose effect is
checked in the results store. The other executions below test failure paths (a bad parameter, no
data) and DRM on a fabricated iWildCam, which nbval's defaults do not reach.
"""

import ast
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
REQUIRED = {"quickstart", "compare"}  # the tour and the comparison; method notebooks follow the registry
HEAVY = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.For, ast.While, ast.With, ast.Try, ast.Lambda)


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _parameters(nb) -> dict:
    """The parameters cell's defaults (literals, checked by the hygiene test)."""
    return {s.target.id: ast.literal_eval(s.value) for s in ast.parse(_code_cells(nb)[0].source).body}


def _is_call(node, owner: str, attr: str) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr
            and isinstance(node.func.value, ast.Name) and node.func.value.id == owner)


def methods_run_by(nb) -> tuple[set[str], list[str]]:
    """The method names a notebook passes to ``session.run(<method>, ...)``, and the calls whose method
    cannot be read statically. The method is a string literal, a string parameter, or the variable of a
    comprehension over a list parameter (finetune.ipynb: ``methods: list = ["finetune", ...]``)."""
    params = _parameters(nb)
    names, unresolved = set(), []
    for cell in _code_cells(nb)[1:]:
        tree = ast.parse(cell.source)
        loops = {c.target.id: params.get(c.iter.id) for c in ast.walk(tree) if isinstance(c, ast.comprehension)
                 and isinstance(c.target, ast.Name) and isinstance(c.iter, ast.Name)}
        for node in ast.walk(tree):
            if not _is_call(node, "session", "run"):
                continue
            arg = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "method"), None)
            value = (arg.value if isinstance(arg, ast.Constant) else
                     loops.get(arg.id, params.get(arg.id)) if isinstance(arg, ast.Name) else None)
            if isinstance(value, str):
                names.add(value)
            elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
                names.update(value)
            else:
                unresolved.append(ast.unparse(node))
    return names, unresolved


def test_methods_run_by_reads_literals_parameters_and_comprehensions():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('main: str = "flyp"  # c\nfamily: list = ["a", "b"]  # c\nknob: float = 0.5  # c'),
        nbformat.v4.new_code_cell('x = session.run("zeroshot")\ny = session.run(main, alpha=knob)'),
        nbformat.v4.new_code_cell('runs = {n: session.run(n) for n in family}\nz = session.run(method="wiseft")'),
        nbformat.v4.new_code_cell('w = session.run(knob)\nother.run("not-a-method")'),
    ])
    assert methods_run_by(nb) == ({"zeroshot", "flyp", "a", "b", "wiseft"}, ["session.run(knob)"])


def test_quickstart_and_compare_exist():
    assert REQUIRED <= {p.stem for p in NOTEBOOKS}


def test_every_registered_method_is_run_by_a_notebook():
    """Rule: each name in ``list_methods()`` reaches ``session.run`` in some notebook (its own, or a
    notebook that shows a family, like finetune.ipynb), and notebooks run registered methods only."""
    from rftlib.methods import list_methods

    run_by = {}
    for path in NOTEBOOKS:
        names, unresolved = methods_run_by(nbformat.read(path, as_version=4))
        assert not unresolved, f"{path.name}: pass session.run a literal or a parameter: {unresolved}"
        run_by[path.stem] = names
    covered = set().union(*run_by.values())
    registered = set(list_methods())
    assert not registered - covered, f"registered methods no notebook runs: {sorted(registered - covered)}"
    assert not covered - registered, f"notebooks run unregistered methods: {sorted(covered - registered)}"


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
def test_notebook_leaves_a_static_figure(path):
    """A code cell calls ``viz.show_static(...)``, so the stored/exported notebook keeps a figure
    without a live kernel (nbval executes the cell; this checks that it is there)."""
    nb = nbformat.read(path, as_version=4)
    calls = [n for c in _code_cells(nb) for n in ast.walk(ast.parse(c.source)) if _is_call(n, "viz", "show_static")]
    assert calls, "every notebook leaves at least one static figure (viz.show_static)"


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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_injects_parameters_after_the_parameters_cell(path, tmp_path):
    """Every parameter, injected without executing: its value lands in an ``injected-parameters``
    cell right after the untouched parameters cell, and the rest of the notebook is unchanged."""
    import papermill

    nb = nbformat.read(path, as_version=4)
    injected = {**_parameters(nb), "seed": 7, "progress": "off"}  # all round-trip, two differ from the defaults
    out = tmp_path / f"{path.stem}-prepared.ipynb"
    papermill.execute_notebook(str(path), str(out), parameters=injected, prepare_only=True, kernel_name="python3",
                               progress_bar=False)
    cells, original = _code_cells(nbformat.read(out, as_version=4)), _code_cells(nb)
    assert "parameters" in cells[0].metadata.get("tags", []) and cells[0].source == original[0].source
    assert "injected-parameters" in cells[1].metadata.get("tags", [])
    values = {}
    for stmt in ast.parse(cells[1].source).body:
        assert isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name), ast.dump(stmt)
        values[stmt.targets[0].id] = ast.literal_eval(stmt.value)
    assert values == injected
    assert [c.source for c in cells[2:]] == [c.source for c in original[1:]]
    assert not [c for c in cells if c.outputs], "prepare_only must not execute anything"


def _execute(path: Path, tmp_path: Path, **parameters):
    import papermill

    out = tmp_path / f"{path.stem}-out.ipynb"
    papermill.execute_notebook(str(path), str(out), parameters=parameters, kernel_name="python3", cwd=str(tmp_path),
                               progress_bar=False, start_timeout=120)
    return nbformat.read(out, as_version=4)


def _failed_cells(nb):
    return [c for c in _code_cells(nb) if any(o.output_type == "error" for o in c.outputs)]


@pytest.mark.slow
def test_quickstart_runs_under_papermill_with_injected_parameters(tmp_path, monkeypatch):
    """The one full papermill execution (nbval runs every notebook on its defaults): injected
    ``seed`` and ``results_db`` reach the run, as the rows in the injected store show."""
    from rftlib.results import load

    monkeypatch.setenv("RFT_RESULTS_DB", str(tmp_path / "env.db"))
    db = tmp_path / "injected.db"
    nb = _execute(ROOT / "notebooks" / "quickstart.ipynb", tmp_path, seed=1, results_db=str(db), progress="off")
    assert not _failed_cells(nb)
    assert "injected-parameters" in _code_cells(nb)[1].metadata.get("tags", [])
    outputs = [o for c in _code_cells(nb) for o in c.outputs]
    assert [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})], "a static figure"
    rows = load(db)
    assert len(rows) and set(rows.method) == {"zeroshot"} and set(rows.seed) == {1}
    assert not (tmp_path / "env.db").exists(), "results_db overrides $RFT_RESULTS_DB"


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

