"""README.md stays true: its two commands exist, CI runs the test command verbatim, and the
library pieces it shows are importable."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    commands = _commands()
    assert len(commands) == 2, commands
    setup_and_run, setup_and_test = commands
    assert "pip install" in setup_and_run and "pip install" in setup_and_test
    assert "pytest" in setup_and_test
    assert setup_and_test in (ROOT / ".ci" / "run").read_text()


def test_readme_library_example_names_exist():
    import rftlib.data
    import rftlib.data.pipeline
    import rftlib.evaluate
    import rftlib.models

    for name in ("load_clip", "build_zeroshot_head", "build_image_classifier"):
        assert hasattr(rftlib.models, name)
    assert hasattr(rftlib.data, "get_dataset") and hasattr(rftlib.data.pipeline, "ImageSpec")
    assert hasattr(rftlib.evaluate, "evaluate")


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The "Using rftlib from Python" block runs as written (tiny synthwild; a temporary runs folder)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using rftlib from Python", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)\n```", section, flags=re.S)
    monkeypatch.setenv("RFT_RUNS_DIR", str(tmp_path))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert set(result.metrics) == {"id_val", "id_test", "val", "test"}
    assert sorted(result.extra["sweep"].alpha.unique()) == [0, 0.25, 0.5, 0.75, 1]
