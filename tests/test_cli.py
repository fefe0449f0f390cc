"""The command line (``python -m rftlib.train``): help, one-line input errors, ``--force``.

Everything here stops before training (or trains through a stub), so it runs in seconds; the real
CLI run is in test_train.py."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rftlib import cli
from rftlib.data import list_datasets
from rftlib.methods import list_methods

from .helpers import python_path

ROOT = Path(__file__).resolve().parents[1]
PROG = "python -m rftlib.train"


def _exit_of(argv, capsys) -> tuple[int, str]:
    """Run the CLI on ``argv`` expecting it to exit; its exit status and stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_help_lists_every_registered_method_and_dataset(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    for name in list_methods() + list_datasets():
        assert name in text, name
    assert "--force" in text


def test_module_entry_point_keeps_working_and_the_loop_does_not_import_the_methods():
    """``python -m rftlib.train`` is the CLI (README, torchrun); importing the loop imports no method."""
    env = {**os.environ, "PYTHONPATH": python_path(ROOT)}
    out = subprocess.run([sys.executable, "-m", "rftlib.train", "--help"], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0 and "--method NAME" in out.stdout
    code = "import sys, rftlib.train; print([m for m in sys.modules if m.startswith(('rftlib.methods', 'rftlib.cli'))])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("argv", "expected"), [
    (["--set", "epochs"], "argument --set: 'epochs' is not KEY=VALUE"),
    (["--set", "=3"], "argument --set: '=3' is not KEY=VALUE"),
    (["--set", "epochs=1", "nope=1"], "--set: unknown option 'nope'"),
    (["--set", "augment=sideways"], "--set: unknown augment 'sideways'"),  # refused by the config itself
    (["--set", "epochs=ten"], "--set: epochs='ten' is invalid"),
    (["--data-option", "size"], "argument --data-option: 'size' is not KEY=VALUE"),
    (["--data-option", "colour=red"], "--data-option: "),  # synthwild's loader lists its valid options
    (["--memory-budget", "lots"], "--memory-budget"),
    (["--set", "batch_size=-8"], "--set: batch_size=-8 is invalid: it must be an integer >= 1"),
    (["--set", "accum_steps=0"], "--set: accum_steps=0 is invalid"),
    (["--set", "lr=abc"], "--set: lr='abc' is invalid"),
    (["--set", "epochs=1.5"], "--set: epochs=1.5 is invalid"),
    (["--method", "wiseft", "--set", "alpha=1.5"], "--set: alpha=1.5 is out of range"),
    (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device: device="),
    (["--device", "tpu"], "--device: device='tpu'"),
])
def test_bad_inputs_end_in_one_line(argv, expected, capsys):
    code, err = _exit_of(["--method", "finetune", *argv], capsys)
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{PROG}: error: ") and expected in last, err


def test_unknown_method_or_dataset_lists_the_valid_ones(capsys):
    code, err = _exit_of(["--method", "nope"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].endswith("valid methods: " + ", ".join(list_methods()))
    code, err = _exit_of(["--method", "finetune", "--dataset", "nope"], capsys)
    assert code == 2 and "valid datasets: " + ", ".join(list_datasets()) in err


def test_override_values_are_read_as_json_when_they_are_json():
    assert cli.parse_override("epochs=3") == ("epochs", 3)
    assert cli.parse_override("eval_splits=[]") == ("eval_splits", [])
    assert cli.parse_override("select_split=null") == ("select_split", None)
    assert cli.parse_override("augment=rrc") == ("augment", "rrc")
    assert cli.parse_override("templates=a=b") == ("templates", "a=b")
    with pytest.raises(argparse.ArgumentTypeError, match="not KEY=VALUE"):
        cli.parse_override("epochs")


class _Stub:
    """Stands in for ``run_method``: records its keywords, or raises ``error`` as a training failure would."""

    def __init__(self, error: Exception | None = None):
        self.error, self.kwargs = error, None

    def __call__(self, method, **kwargs):
        self.kwargs = {"method": method, **kwargs}
        if self.error is not None:
            raise self.error
        return self

    def summary(self) -> dict:
        return {"method": self.kwargs["method"]}


@pytest.fixture
def stub_run(monkeypatch, data):
    """The CLI with ``run_method`` stubbed and the tiny synthwild as its dataset."""
    def use(error=None) -> _Stub:
        stub = _Stub(error)
        monkeypatch.setattr(cli, "run_method", stub)
        monkeypatch.setattr(cli, "get_dataset", lambda name, root=None, **options: data)
        return stub
    return use


def test_force_is_parsed_and_handed_to_run_method(stub_run, capsys):
    stub = stub_run()
    cli.main(["--method", "finetune", "--set", "epochs=2", "--progress", "off"])
    assert stub.kwargs["force"] is False and stub.kwargs["overrides"] == {"epochs": 2}
    assert stub.kwargs["data"].name == "synthwild" and '"method": "finetune"' in capsys.readouterr().out
    cli.main(["--method", "finetune", "--force"])
    assert stub.kwargs["force"] is True


@pytest.mark.parametrize("error", [ValueError("bad value met while training"), RuntimeError("out of memory")])
def test_errors_raised_while_training_keep_their_traceback(stub_run, error):
    """Only refused inputs become one-line errors; the same exception types from the run propagate."""
    stub_run(error)
    with pytest.raises(type(error), match=str(error)):
        cli.main(["--method", "finetune"])
