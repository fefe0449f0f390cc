"""Experiment tracking (rftlib.tracking): TensorBoard event files read back with TensorBoard's own
reader, W&B through a fake ``wandb`` module that records its calls, the errors for unknown and
uninstalled trackers, and the switches (run_method, the CLI flag, the notebooks' parameter)."""

import ast
import sys
import types
from pathlib import Path

import nbformat
import pytest

from rftlib import cli, notebook, tracking
from rftlib.dist import DistInfo
from rftlib.methods import run_method
from rftlib.registry import UnknownNameError
from rftlib.train import Event

from .conftest import method_trains, tiny_overrides
from .helpers import tiny_clip

ROOT = Path(__file__).resolve().parents[1]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a TensorBoard log folder, as ``tag -> [(step, value), ...]``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class FakeWandbRun:
    def __init__(self, calls: list, kwargs: dict):
        self.calls, self.kwargs, self.summary = calls, kwargs, {}

    def log(self, values, step=None):
        self.calls.append(("log", dict(values), step))

    def define_metric(self, name, step_metric=None):
        self.calls.append(("define_metric", name, step_metric))

    def finish(self, exit_code=0):
        self.calls.append(("finish", exit_code))


@pytest.fixture
def fake_wandb(monkeypatch):
    """A ``wandb`` module that records ``init`` (its keywords), ``log`` and ``finish`` calls."""
    module = types.ModuleType("wandb")
    module.calls, module.runs = [], []

    def init(**kwargs):
        module.calls.append(("init", kwargs))
        module.runs.append(FakeWandbRun(module.calls, kwargs))
        return module.runs[-1]

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


class Recorder:
    """A training callback keeping the loop's step events."""

    def __init__(self, fail_at: int | None = None):
        self.steps, self.fail_at = {}, fail_at

    def __call__(self, event):
        if event.kind == "step":
            self.steps[event.step] = event.data
            if event.step == self.fail_at:
                raise KeyboardInterrupt("stopped by the test")


def test_tensorboard_and_wandb_receive_steps_evaluations_and_final_metrics(data, tmp_path, fake_wandb):
    recorder = Recorder()
    result = run_method("finetune", data=data, clip=tiny_clip(), out_dir=tmp_path / "run",
                        overrides=tiny_overrides("finetune"), callbacks=[recorder], track=("tensorboard", "wandb"))
    last = result.extra["history"][-1]["step"]
    curves = scalars(tmp_path / "run" / "tb")
    assert [s for s, _ in curves["train/loss"]] == list(range(1, last + 1))
    for name in ("loss", "lr"):
        want = [(s, pytest.approx(values[name], rel=1e-6)) for s, values in recorder.steps.items()]
        assert curves[f"train/{name}"] == want
    for metric, value in result.extra["history"][-1]["metrics"]["id_val"].items():
        assert curves[f"eval/id_val/{metric}"] == [(last, pytest.approx(value, rel=1e-6))]
    final = scalars(tmp_path / "run" / "tb" / "final")
    expected = {f"final/{split}/{m}": v for split, metrics in result.metrics.items() for m, v in metrics.items()}
    assert final == {tag: [(last, pytest.approx(value, rel=1e-6))] for tag, value in expected.items()}

    (kind, init), *rest = fake_wandb.calls
    assert kind == "init" and init["name"] == result.run_id and init["resume"] == "allow"
    assert init["id"].startswith(result.run_id) and init["config"]["method"] == "finetune"
    logged = [c for c in rest if c[0] == "log"]
    assert [c[2] for c in logged] == sorted(c[2] for c in logged), "W&B steps never go back"
    assert {s for _, values, s in logged if "train/loss" in values} == set(recorder.steps)
    assert logged[-1] == ("log", pytest.approx(expected), last) and fake_wandb.runs[0].summary == expected
    assert rest[-1] == ("finish", 0)


def test_a_resumed_run_continues_its_steps_without_duplicates(data, tmp_path, fake_wandb):
    """Stopped two steps into epoch 2 (the first one logged: trackers are the last callbacks), then
    resumed from the epoch-1 checkpoint: the interrupted attempt's step is purged, every step appears
    once, and both attempts log to one W&B run."""
    overrides = {**tiny_overrides("finetune"), "epochs": 2}
    run = dict(data=data, out_dir=tmp_path / "run", overrides=overrides, track="tensorboard,wandb")
    per_epoch = len(data.split("train")) // overrides["batch_size"]
    with pytest.raises(KeyboardInterrupt):
        run_method("finetune", clip=tiny_clip(), callbacks=[Recorder(fail_at=per_epoch + 2)], **run)
    assert fake_wandb.calls[-1] == ("finish", 1), "an interrupted run is closed as failed"
    assert (tmp_path / "run" / "wandb_id").exists()
    again = Recorder()
    run_method("finetune", clip=tiny_clip(), callbacks=[again], **run)
    assert min(again.steps) == per_epoch + 1, "resumed from the epoch-1 checkpoint"
    losses = scalars(tmp_path / "run" / "tb")["train/loss"]
    assert [s for s, _ in losses] == list(range(1, 2 * per_epoch + 1))
    assert losses[per_epoch:] == [(s, pytest.approx(again.steps[s]["loss"], rel=1e-6)) for s in sorted(again.steps)]
    assert len(fake_wandb.runs) == 2 and fake_wandb.runs[0].kwargs["id"] == fake_wandb.runs[1].kwargs["id"]


def test_a_base_run_is_tracked_in_its_own_folder(data, tmp_path):
    """WiSE-FT trains its fine-tuned end point as a base run: those steps go to the base run's
    folder, never to WiSE-FT's curves (which has no training steps of its own)."""
    run_method("wiseft", data=data, clip=tiny_clip(), out_dir=tmp_path / "wise", track=["tensorboard"],
               overrides={**tiny_overrides("wiseft"), "alphas": [0.0, 1.0]})
    assert "train/loss" in scalars(tmp_path / "wise" / "finetune" / "tb")
    assert not [t for t in scalars(tmp_path / "wise" / "tb") if t.startswith("train/")]
    assert {s for series in scalars(tmp_path / "wise" / "tb" / "final").values() for s, _ in series} == {0}


class ListTracker(tracking.Tracker):
    def __init__(self):
        super().__init__(None)
        self.logged, self.finals, self.closed = [], [], None

    def scalars(self, values, step):
        self.logged.append((step, dict(values)))

    def final(self, metrics, step):
        self.finals.append((step, dict(metrics)))

    def close(self, failed=False):
        self.closed = failed


def test_run_tracking_chains_fits_and_ignores_other_runs(monkeypatch):
    sink = ListTracker()
    feed = tracking.RunTracking("me", [sink])
    events = [Event("step", 1, 0, {"loss": 2.0, "lr": 0.1, "skipped": True}), Event("end", 1, 0),
              Event("step", 1, 0, {"loss": 1.0}), Event("eval", 1, 0, {"split": "id_val", "metrics": {"acc": 0.5}})]
    monkeypatch.setattr(tracking, "_SCOPE", tracking.ContextVar("scope", default=("other-run", ())))
    feed(events[0])
    assert sink.logged == [], "events of another run (a base run) are not this run's"
    tracking._SCOPE.set(("me", ()))
    for event in events:
        feed(event)
    feed.final({"test": {"acc": 0.25}})
    assert sink.logged == [(1, {"train/loss": 2.0, "train/lr": 0.1}), (2, {"train/loss": 1.0}),
                           (2, {"eval/id_val/acc": 0.5})]
    assert sink.finals == [(2, {"final/test/acc": 0.25})]


def test_only_the_main_rank_tracks(monkeypatch, tmp_path):
    run = tracking.TrackedRun("r", "finetune", "synthwild", "m", None, 0, tmp_path, {})
    monkeypatch.setattr(tracking, "current", lambda: DistInfo(rank=1, world_size=2))
    assert tracking.make_trackers(["tensorboard"], run) == []


def test_track_names_are_parsed_and_checked(fake_wandb):
    assert tracking.resolve_track("TensorBoard, wandb tensorboard") == ("tensorboard", "wandb")
    assert tracking.resolve_track("") == tracking.resolve_track([]) == tracking.resolve_track(None) == ()
    with pytest.raises(UnknownNameError, match="unknown tracker 'tensorbored'; valid trackers: tensorboard, wandb"):
        tracking.resolve_track(["tensorbored"])


def test_missing_wandb_says_what_to_install(monkeypatch, data, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(tracking.TrackerUnavailableError, match=r"pip install 'rftlib\[wandb\]'"):
        run_method("zeroshot", data=data, clip=tiny_clip(), out_dir=tmp_path / "run", track=("wandb",))
    assert not (tmp_path / "run").exists(), "refused before the run started"


class StubRun:
    def __call__(self, method, **kwargs):
        self.kwargs = kwargs
        return self

    def summary(self):
        return {}


def test_cli_track_flag(monkeypatch, data, capsys):
    stub = StubRun()
    monkeypatch.setattr(cli, "run_method", stub)
    monkeypatch.setattr(cli, "get_dataset", lambda name, root=None, **options: data)
    cli.main(["--method", "finetune", "--progress", "off"])
    assert stub.kwargs["track"] == ()
    cli.main(["--method", "finetune", "--track", "tensorboard"])
    assert stub.kwargs["track"] == ("tensorboard",)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--method", "finetune", "--track", "nope"])
    assert exit_.value.code == 2 and "--track: unknown tracker 'nope'; valid trackers: tensorboard, wandb" in \
        capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(SystemExit):
        cli.main(["--method", "finetune", "--track", "wandb"])
    assert "pip install 'rftlib[wandb]'" in capsys.readouterr().err


def test_notebook_session_passes_track_to_every_run(monkeypatch):
    import rftlib.methods

    seen = {}
    monkeypatch.setattr(rftlib.methods, "run_method", lambda method, **kwargs: seen.update(kwargs))
    session = notebook.setup(track="tensorboard", device="cpu", progress="off")
    session.data, session.load_model = object(), lambda: None
    session.run("zeroshot")
    assert session.track == ("tensorboard",) and seen["track"] == ("tensorboard",)
    assert notebook.setup(device="cpu", progress="off").track == ()
    with pytest.raises(notebook.ParameterError, match="track='nope' is invalid: unknown tracker"):
        notebook.setup(track="nope", progress="off")


def _trains(method: str) -> bool:
    """The method trains with the shared loop, or trains a base run first (WiSE-FT)."""
    import dataclasses

    from rftlib.methods import get_method

    fields = dataclasses.fields(get_method(method).Config)
    return method_trains(method) or any(f.name.endswith("_overrides") for f in fields)


def test_every_training_notebook_has_a_track_parameter_passed_to_setup():
    from .test_notebooks import NOTEBOOKS, _code_cells, _parameters, methods_run_by

    training = [p for p in NOTEBOOKS if any(_trains(m) for m in methods_run_by(nbformat.read(p, as_version=4))[0])]
    assert {p.stem for p in training} >= {"finetune", "wiseft", "dps"}
    for path in training:
        nb = nbformat.read(path, as_version=4)
        assert _parameters(nb).get("track") == "", f"{path.name}: add track: str = \"\" to the parameters cell"
        calls = [n for c in _code_cells(nb) for n in ast.walk(ast.parse(c.source))
                 if isinstance(n, ast.Call) and ast.unparse(n.func) == "notebook.setup"]
        assert any(ast.unparse(k) == "track=track" for call in calls for k in call.keywords), path.name


def test_evaluating_a_finished_run_again_replaces_its_final_metrics(data, tmp_path):
    for _ in range(2):
        result = run_method("zeroshot", data=data, clip=tiny_clip(), out_dir=tmp_path / "run", track="tensorboard")
    final = scalars(tmp_path / "run" / "tb" / "final")
    assert final == {f"final/{split}/{m}": [(0, pytest.approx(v, rel=1e-6))]
                     for split, metrics in result.metrics.items() for m, v in metrics.items()}


def test_knob_sweep_points_are_tracked_on_their_own_axis(data, tmp_path, fake_wandb):
    from rftlib.results import load

    db = tmp_path / "r.db"
    result = run_method("wiseft", data=data, clip=tiny_clip(), out_dir=tmp_path / "run", results_db=str(db),
                        overrides=tiny_overrides("wiseft"), track=("tensorboard", "wandb"))
    rows = load(db, run_id=result.run_id, kind="sweep", split="test", metric="macro_f1")
    alphas = list(dict.fromkeys(rows.alpha))
    curves = scalars(tmp_path / "run" / "tb" / "sweep")
    assert curves["sweep/alpha"] == [(i, pytest.approx(a)) for i, a in enumerate(alphas)] and len(alphas) > 2
    assert curves["sweep/test/macro_f1"] == [(i, pytest.approx(v, rel=1e-6)) for i, v in enumerate(rows.value)]
    wise_calls = fake_wandb.runs[-1].calls  # every run shares the module's call list; the sweep's are the last run's
    assert ("define_metric", "sweep/*", "sweep/index") in wise_calls
    points = [c[1] for c in wise_calls if c[0] == "log" and "sweep/index" in c[1]]
    assert [p["sweep/index"] for p in points] == sorted(p["sweep/index"] for p in points)
    assert {p["sweep/alpha"] for p in points if "sweep/alpha" in p} == set(alphas)
