"""Tests for rftlib.viz (pure figures) and rftlib.widgets (headless explorers): offline, no browser."""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from rftlib import metrics, viz, widgets
from rftlib.knobs import KNOBS
from rftlib.results import ResultsStore
from rftlib.train import Event

ALPHAS = np.round(np.arange(0.0, 1.0 + 1e-9, 0.05), 2)


def id_metric(alpha: float) -> float:
    return 0.70 + 0.15 * alpha


def ood_metric(alpha: float) -> float:
    """Concave in alpha: WiSE-FT's OOD bump in the middle of the zero-shot -> fine-tuned path."""
    return 0.60 + 0.30 * alpha - 0.25 * alpha**2


def make_sweep(alphas=ALPHAS) -> pd.DataFrame:
    rows = []
    for a in alphas:
        for split, role, fn in (("id_test", "id", id_metric), ("test", "ood", ood_metric)):
            rows.append({"alpha": float(a), "split": split, "role": role, "metric": "macro_f1", "value": fn(a)})
            rows.append({"alpha": float(a), "split": split, "role": role, "metric": "accuracy", "value": fn(a) + 0.1})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def sweep() -> pd.DataFrame:
    return make_sweep()


def table_at(sweep: pd.DataFrame, alpha: float, split: str) -> float:
    rows = sweep[np.isclose(sweep.alpha, alpha) & (sweep.split == split) & (sweep.metric == "macro_f1")]
    return float(rows.value.iloc[0])


def names(fig: go.Figure) -> list[str]:
    return [t.name for t in fig.data]


# --------------------------------------------------------------------------- viz: ID/OOD
def test_id_ood_points_pivots_sorts_and_averages(sweep):
    shuffled = sweep.sample(frac=1.0, random_state=0)
    points = viz.id_ood_points(shuffled, "alpha")
    assert list(points.columns) == ["alpha", "id", "ood"]
    assert np.allclose(points.alpha, ALPHAS)
    row = points[np.isclose(points.alpha, 0.35)].iloc[0]
    assert row.id == pytest.approx(id_metric(0.35)) and row.ood == pytest.approx(ood_metric(0.35))
    doubled = pd.concat([sweep, sweep.assign(value=sweep.value + 0.02)])  # a second "seed"
    assert viz.id_ood_points(doubled, "alpha").id.iloc[0] == pytest.approx(id_metric(0.0) + 0.01)
    accuracy = viz.id_ood_points(sweep, "alpha", metric="accuracy")
    assert accuracy.id.iloc[-1] == pytest.approx(id_metric(1.0) + 0.1)
    with pytest.raises(ValueError, match="val"):
        viz.id_ood_points(sweep, "alpha", ood_split="val")
    with pytest.raises(ValueError, match="beta"):
        viz.id_ood_points(sweep, "beta")


def test_knob_title_format():
    assert viz.knob_title("alpha", 0.5, 0.8123, 0.7009) == "alpha=0.50 · ID 0.812 · OOD 0.701"


def test_id_ood_curve_traces_labels_and_highlight(sweep):
    fig = viz.id_ood_curve(sweep, "alpha")
    assert names(fig) == ["y = x", "alpha", "end points"]
    assert list(fig.data[2].text) == ["zero-shot", "fine-tuned"]
    assert fig.data[0].line.dash == "dash" and list(fig.data[0].x) == list(fig.data[0].y)
    assert list(fig.data[1].customdata) == pytest.approx(list(ALPHAS))
    assert "macro_f1" in fig.layout.xaxis.title.text and "id_test" in fig.layout.xaxis.title.text

    fig = viz.id_ood_curve(sweep, "alpha", highlight=0.33)  # snaps to the nearest grid value, 0.35
    selected = fig.data[names(fig).index("selected")]
    assert selected.x[0] == pytest.approx(id_metric(0.35)) and selected.y[0] == pytest.approx(ood_metric(0.35))
    assert fig.layout.title.text == viz.knob_title("alpha", 0.35, id_metric(0.35), ood_metric(0.35))

    beta = sweep.rename(columns={"alpha": "beta"})  # end points are named as rftlib.knobs declares them
    assert list(viz.id_ood_curve(beta, "beta").data[2].text) == [KNOBS.get("beta").ends[0.0],
                                                                 KNOBS.get("beta").ends[1.0]]
    assert list(viz.id_ood_curve(sweep.rename(columns={"alpha": "t"}), "t").data[2].text) == ["t=0", "t=1"]


def test_each_split_is_read_in_its_headline_metric_and_shifts_are_averaged():
    """FMoW-like: accuracy in distribution, worst-region accuracy out of it, two OOD test splits."""
    rows = []
    for a in (0.0, 1.0):
        for split, role, value in (("id_test", "id", 0.5 + a), ("test", "ood", 0.2 + a), ("test2", "ood", 0.4 + a),
                                   ("val", "ood", 9.0)):
            headline = "accuracy" if role == "id" else "acc_worst_region"
            for metric in ("accuracy", "acc_worst_region"):
                rows.append({"alpha": a, "split": split, "role": role, "metric": metric, "headline": metric == headline,
                             "value": value if metric == headline else -1.0})
    table = pd.DataFrame(rows)
    axes = viz.sweep_axes(table)
    assert axes.id == (("id_test", "accuracy"),)
    assert axes.ood == (("test", "acc_worst_region"), ("test2", "acc_worst_region"))  # never the OOD val split
    points = viz.id_ood_points(table, "alpha")
    assert list(points.id) == pytest.approx([0.5, 1.5]) and list(points.ood) == pytest.approx([0.3, 1.3])
    fig = viz.id_ood_curve(table, "alpha")
    assert fig.layout.yaxis.title.text == "OOD acc_worst_region (mean of 2 splits)"


def test_point_at_interpolates_or_snaps(sweep):
    points = viz.id_ood_points(sweep, "alpha")
    mid = viz.point_at(points, "alpha", 0.375)
    assert mid["id"] == pytest.approx(id_metric(0.375))  # linear in alpha: interpolation is exact
    assert mid["ood"] == pytest.approx((ood_metric(0.35) + ood_metric(0.40)) / 2)
    assert viz.point_at(points, "alpha", 0.37, interpolate=False)["value"] == pytest.approx(0.35)
    assert viz.point_at(points, "alpha", 3.0)["value"] == 1.0


def test_knob_curves(sweep):
    fig = viz.knob_curves(sweep, "alpha", highlight=0.5)
    assert names(fig) == ["ID macro_f1 (id_test)", "OOD macro_f1 (test)"]
    assert list(fig.data[1].y) == pytest.approx([ood_metric(a) for a in ALPHAS])
    assert fig.layout.shapes[0].name == "selected" and fig.layout.shapes[0].x0 == pytest.approx(0.5)
    assert fig.layout.title.text.startswith("alpha=0.50")


# --------------------------------------------------------------------------- widgets: KnobExplorer
def test_knob_explorer_update_moves_marker_and_title(sweep):
    explorer = widgets.KnobExplorer(sweep, "alpha")
    s = explorer.slider
    assert (s.min, s.max, s.step, s.value, s.readout_format, s.continuous_update) == (0.0, 1.0, 0.05, 0.5, ".2f", True)
    assert explorer.fig.layout.title.text.startswith("alpha=0.50 · ID ")
    selected = widgets.trace_named(explorer.fig, "selected")

    state = explorer.update(0.35)
    assert state["id"] == pytest.approx(table_at(sweep, 0.35, "id_test"))
    assert state["ood"] == pytest.approx(table_at(sweep, 0.35, "test"))
    assert selected.x[0] == pytest.approx(state["id"]) and selected.y[0] == pytest.approx(state["ood"])
    assert "alpha=0.35" in explorer.fig.layout.title.text
    assert f"OOD {state['ood']:.3f}" in explorer.fig.layout.title.text
    assert explorer.slider.value == pytest.approx(0.35)
    assert "precomputed" in explorer.readout.value

    explorer.update(0.375)
    assert "interpolated" in explorer.readout.value
    assert selected.x[0] == pytest.approx(id_metric(0.375))

    n = 50
    start = time.perf_counter()
    for value in np.linspace(0.0, 1.0, n):
        explorer.update(float(value))
    print(f"\nKnobExplorer.update: {(time.perf_counter() - start) / n * 1e3:.2f} ms per call (headless)")


def test_knob_explorer_slider_observer(sweep):
    explorer = widgets.KnobExplorer(sweep, "alpha", start=0.2)
    before = explorer.fig.layout.title.text
    explorer.slider.value = 0.7  # what the browser's keyboard/mouse does
    selected = widgets.trace_named(explorer.fig, "selected")
    assert explorer.fig.layout.title.text != before and "alpha=0.70" in explorer.fig.layout.title.text
    assert selected.x[0] == pytest.approx(id_metric(0.7)) and selected.y[0] == pytest.approx(ood_metric(0.7))
    assert explorer.state["value"] == pytest.approx(0.7)
    static = explorer.static_figure()
    assert type(static) is go.Figure and static.layout.title.text == explorer.fig.layout.title.text
    assert static.data[names(static).index("selected")].x[0] == pytest.approx(id_metric(0.7))
    assert isinstance(explorer.widget, widgets.W.VBox) and explorer.fig in explorer.widget.children


def test_knob_explorer_exact_button(sweep):
    calls = []

    def exact(alpha):
        calls.append(alpha)
        return id_metric(alpha) - 0.01, ood_metric(alpha) + 0.01

    explorer = widgets.KnobExplorer(sweep, "alpha", exact=exact, start=0.45)
    trace = widgets.trace_named(explorer.fig, "exact")
    assert trace.visible is False
    explorer.button.click()
    assert calls == [pytest.approx(0.45)]
    assert trace.visible is True
    assert trace.x[0] == pytest.approx(id_metric(0.45) - 0.01) and trace.y[0] == pytest.approx(ood_metric(0.45) + 0.01)
    assert "exact: ID" in explorer.readout.value
    explorer.button.click()  # cached
    assert len(calls) == 1
    explorer.update(0.6)
    result = explorer.evaluate_exact()
    assert result["value"] == pytest.approx(0.6) and len(trace.x) == 2 and len(calls) == 2
    assert explorer.button.description == "Evaluate exactly" and not explorer.button.disabled

    def broken(alpha):
        raise RuntimeError("out of memory")

    failing = widgets.KnobExplorer(sweep, "alpha", exact=broken)
    failing.button.click()
    assert "out of memory" in failing.readout.value and not failing.button.disabled
    with pytest.raises(RuntimeError, match="no exact"):
        widgets.KnobExplorer(sweep, "alpha").evaluate_exact()


def test_live_value_explorer_computes_live():
    calls = []

    def truth(beta):
        return 0.8 - 0.1 * beta**2, 0.5 + 0.2 * math.sin(math.pi * beta)

    def values_fn(beta):
        calls.append(beta)
        return truth(beta)

    grid = np.linspace(0.0, 1.0, 11)
    explorer = widgets.LiveValueExplorer(values_fn, "beta", grid)
    curve = widgets.trace_named(explorer.fig, "beta")
    assert list(curve.x) == pytest.approx([truth(b)[0] for b in grid])
    assert explorer.slider.step == pytest.approx(0.1) and explorer.slider.value == pytest.approx(0.5)
    assert len(calls) == len(grid)  # the start value 0.5 is a grid value: memoised

    state = explorer.update(0.33)  # off-grid: computed, not interpolated
    assert (state["id"], state["ood"]) == pytest.approx(truth(0.33))
    selected = widgets.trace_named(explorer.fig, "selected")
    assert (selected.x[0], selected.y[0]) == pytest.approx(truth(0.33))
    assert "beta=0.33" in explorer.fig.layout.title.text and "computed live" in explorer.readout.value
    explorer.slider.value = 0.9
    assert explorer.state["ood"] == pytest.approx(truth(0.9)[1])
    explorer.update(0.33)
    assert calls[len(grid):] == pytest.approx([0.33])  # 0.9 is on the grid, 0.33 was memoised

    n = 50
    start = time.perf_counter()
    for value in np.linspace(0.0, 1.0, n) + 0.001:
        explorer.update(float(value))
    print(f"\nLiveValueExplorer.update: {(time.perf_counter() - start) / n * 1e3:.2f} ms per call (headless)")


# --------------------------------------------------------------------------- detection
@pytest.fixture(scope="module")
def scores() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    s_id, s_ood = rng.normal(2.0, 1.0, 400), rng.normal(0.0, 1.0, 300)
    return pd.DataFrame({"score": np.r_[s_id, s_ood], "is_ood": np.r_[np.zeros(400, bool), np.ones(300, bool)],
                         "kind": ["id_test"] * 400 + ["openset"] * 300})


def test_detection_histogram_and_threshold(scores):
    s_id, s_ood = scores.score[~scores.is_ood], scores.score[scores.is_ood]
    t95 = viz.threshold_at_tpr(scores, 0.95)
    assert np.mean(s_ood >= t95) == pytest.approx(metrics.fpr_at_tpr(s_id, s_ood, 0.95))
    fig = viz.detection_histogram(scores)
    assert names(fig) == ["ID (id_test)", "OOD (openset)"]
    assert fig.layout.barmode == "overlay" and fig.layout.shapes[0].x0 == pytest.approx(t95)
    assert fig.layout.title.text == viz.detection_title(t95, *viz.detection_rates(scores, t95))
    assert "TPR 0.950" in fig.layout.title.text


def test_threshold_explorer_rates_match_direct_computation(scores):
    explorer = widgets.ThresholdExplorer(scores)
    s_id, s_ood = scores.score[~scores.is_ood].to_numpy(), scores.score[scores.is_ood].to_numpy()
    assert explorer.state["tpr"] == pytest.approx(0.95)

    state = explorer.update(1.0)
    assert state["tpr"] == pytest.approx(np.mean(s_id >= 1.0)) and state["fpr"] == pytest.approx(np.mean(s_ood >= 1.0))
    line = next(s for s in explorer.fig.layout.shapes if s.name == "threshold")
    assert line.x0 == line.x1 == pytest.approx(1.0)
    assert f"FPR {state['fpr']:.3f}" in explorer.fig.layout.title.text
    assert explorer.slider.value == pytest.approx(np.mean(scores.score < 1.0))

    n = 50
    start = time.perf_counter()
    for value in np.linspace(-2.0, 4.0, n):
        explorer.update(float(value))
    print(f"\nThresholdExplorer.update: {(time.perf_counter() - start) / n * 1e3:.2f} ms per call (headless)")

    explorer.slider.value = 0.5  # quantile of all scores
    median = float(np.quantile(scores.score, 0.5))
    assert explorer.state["threshold"] == pytest.approx(median) and line.x0 == pytest.approx(median)
    assert explorer.state["fpr"] == pytest.approx(np.mean(s_ood >= median))


# --------------------------------------------------------------------------- training
def fake_events(epochs: int = 2, steps_per_epoch: int = 5) -> list[Event]:
    events, step = [], 0
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            step += 1
            events.append(Event("step", step, epoch, {"loss": 2.0 / step, "lr": 1e-5, "grad_norm": np.float32(1.0)}))
        for split, role in (("id_val", "id"), ("val", "ood")):
            metrics_ = {"accuracy": 0.5 + 0.1 * epoch, "macro_f1": 0.4 + 0.1 * epoch + (role == "ood") * 0.05}
            events.append(Event("eval", step, epoch, {"split": split, "role": role, "metrics": metrics_}))
        events.append(Event("epoch", step, epoch, {"metrics": {}, "best_epoch": epoch}))
    events.append(Event("end", step, epochs - 1, {"best_epoch": epochs - 1, "best_metric": 0.5}))
    return events


def test_training_curves_from_events_and_frame():
    events = fake_events()
    frame = viz.events_frame(events)
    assert list(frame.columns) == list(viz.EVENT_COLUMNS)
    assert len(frame) == 10 * 3 + 4 * 2  # 3 scalars per step, 2 metrics per eval
    assert viz.headline_metric(frame) == "macro_f1"
    for source in (events, frame):
        fig = viz.training_curves(source)
        assert names(fig) == ["loss", "id_val", "val"]
        assert list(fig.data[0].x) == list(range(1, 11))
        assert list(fig.data[1].x) == [1, 2] and list(fig.data[1].y) == pytest.approx([0.4, 0.5])
        assert fig.data[1].xaxis == "x2" and fig.layout.yaxis2.title.text == "macro_f1"
    assert viz.training_curves(events, metric="accuracy").layout.yaxis2.title.text == "accuracy"


def test_live_training_plot_receives_events():
    plot = widgets.LiveTrainingPlot("synthwild FT", interval=3600.0)
    loss = widgets.trace_named(plot.fig, "loss")
    events = fake_events()
    for event in events[:5]:  # steps only: the first one draws, the rest wait for the throttle
        plot(event)
    assert list(loss.x) == [1]
    plot(events[5])  # an eval event always redraws
    assert list(loss.x) == [1, 2, 3, 4, 5] and list(loss.y) == pytest.approx([2.0 / s for s in range(1, 6)])
    for event in events[6:]:
        plot(event)
    assert names(plot.fig) == ["loss", "id_val", "val"]
    assert list(widgets.trace_named(plot.fig, "val").y) == pytest.approx([0.45, 0.55])
    assert plot.fig.layout.title.text.startswith("synthwild FT · step 10 · epoch 2 · loss 0.2000")
    assert plot.frame.equals(viz.events_frame(events))
    assert names(plot.static_figure()) == ["loss", "id_val", "val"]

    every = widgets.LiveTrainingPlot(interval=3600.0, every=2)
    for event in events[:4]:
        every(event)
    assert list(widgets.trace_named(every.fig, "loss").x) == [1, 2, 3]  # drawn at steps 1 and 3


def test_live_training_plot_thins_long_histories():
    plot = widgets.LiveTrainingPlot(interval=0.0, max_points=100)
    for step in range(1, 1001):
        plot(Event("step", step, 0, {"loss": 1.0}))
    xs = list(widgets.trace_named(plot.fig, "loss").x)
    assert len(xs) == 100 and xs[0] == 1 and xs[-1] == 1000


# --------------------------------------------------------------------------- compare_methods
SPLIT_FACTS = {"id_val": {"role": "id", "metric": "macro_f1", "use": "val"},
               "id_test": {"role": "id", "metric": "macro_f1", "use": "test"},
               "test": {"role": "ood", "metric": "macro_f1", "use": "test"}}


def log_run(store: ResultsStore, method: str, seed: int, id_value: float, ood_value: float, *, val: float = 0.5,
            run: str | None = None, base: str | None = None, **logged) -> None:
    run = run or f"{method}-{seed}"  # per-epoch, final and per-alpha rows of one run share its id
    store.start_run(run, method=method, dataset="synthwild", model="m", pretrained="p", seed=seed,
                    base_method=base, splits=SPLIT_FACTS)
    for split, value in (("id_val", val), ("id_test", id_value), ("test", ood_value)):
        store.log_metrics(run, {"macro_f1": value, "accuracy": 0.99}, split=split,
                          role=SPLIT_FACTS[split]["role"], **logged)
    store.finish_run(run)  # only finished runs are compared


@pytest.fixture
def results_frame(tmp_path) -> pd.DataFrame:
    store = ResultsStore(tmp_path / "results.db")
    log_run(store, "zeroshot", 0, 0.60, 0.50)
    for seed, (i, o) in enumerate([(0.80, 0.55), (0.84, 0.59)]):
        log_run(store, "finetune", seed, 0.1, 0.1, kind="epoch", epoch=0)  # a training curve, not a result
        log_run(store, "finetune", seed, i, o, epoch=1)
    for seed in (0, 1):
        for a in (0.0, 0.5, 1.0):  # alpha 0.5 is best on ID val; alpha 1 would be best on ID test
            log_run(store, "wiseft", seed, 0.6 + 0.2 * a + 0.02 * seed, 0.5 + 0.2 * a * (1 - a) + 0.02 * seed,
                    val=0.7 - abs(a - 0.5), base="finetune", kind="sweep", knobs={"alpha": a})
    store.start_run("other", method="finetune", dataset="iwildcam", seed=0)
    store.log_metrics("other", {"macro_f1": 0.1}, split="id_test", role="id")
    store.finish_run("other")
    return store.load()


def test_compare_methods_table_and_figure(results_frame):
    with pytest.raises(ValueError, match="several datasets"):
        viz.compare_methods(results_frame)
    table, fig = viz.compare_methods(results_frame, dataset="synthwild")
    rows = table.set_index("method")
    assert set(rows.index) == {"zeroshot", "finetune", "wiseft (finetune)"}
    ft = rows.loc["finetune"]
    assert ft.n_seeds == 2 and ft.id_mean == pytest.approx(0.82) and ft.ood_mean == pytest.approx(0.57)
    assert ft.id_ci == pytest.approx(12.7062047 * np.std([0.80, 0.84], ddof=1) / np.sqrt(2))
    assert rows.loc["zeroshot"].n_seeds == 1 and np.isnan(rows.loc["zeroshot"].id_ci)
    wise = rows.loc["wiseft (finetune)"]
    assert (wise.knobs, wise.selected_on) == ("alpha=0.5", "id_val")
    assert wise.id_mean == pytest.approx(0.71) and wise.ood_mean == pytest.approx(0.56)

    traces = {t.name: t for t in fig.data}
    line = traces["zero-shot → fine-tuned"]
    assert list(line.x) == pytest.approx([0.60, 0.82]) and list(line.y) == pytest.approx([0.50, 0.57])
    assert list(traces["wiseft (finetune) (alpha sweep)"].customdata) == [0.0, 0.5, 1.0]
    assert traces["finetune"].error_y.visible and not traces["zeroshot"].error_y.visible
    assert traces["finetune"].error_y.array[0] == pytest.approx(ft.ood_ci)
    assert fig.layout.xaxis.title.text == "ID macro_f1 (id_test)"


# --------------------------------------------------------------------------- output
def test_save_html_is_self_contained(sweep, tmp_path):
    path = viz.save_html(viz.id_ood_curve(sweep, "alpha", highlight=0.5), tmp_path / "out" / "curve.html")
    text = path.read_text(encoding="utf-8")
    assert text.lower().startswith("<!doctype html>") and len(text) > 1_000_000  # plotly.js inlined
    assert re.findall(r"<script[^>]*\bsrc=", text) == []  # nothing fetched from a CDN
    assert "alpha=0.50" in text  # the title (JSON-escaped inside the page)


def test_static_bundle_uses_plotly_mimetype_offline(sweep):
    explorer = widgets.KnobExplorer(sweep, "alpha")
    bundle = viz.static_bundle(explorer.fig)
    assert set(bundle) == {viz.PLOTLY_MIMETYPE, "text/plain"}
    assert bundle[viz.PLOTLY_MIMETYPE]["layout"]["title"]["text"].startswith("alpha=0.50")
    assert "selected" in bundle["text/plain"]
    html = viz.static_bundle(explorer.fig, html=True)["text/html"]
    assert re.findall(r"<script[^>]*\bsrc=", html) == [] and len(html) > 1_000_000
