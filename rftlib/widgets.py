"""Interactive explorers: :mod:`rftlib.viz` figures bound to ipywidgets sliders.

Each explorer is a thin skin: the figure comes from :mod:`rftlib.viz`, an ``ipywidgets``
slider drives it, and an ``update(...)`` method moves the plot's markers and title inside one
``fig.batch_update()`` (so the browser receives a single message per move). Display an explorer
as the last expression of a cell, or ``display(explorer)``.

* :class:`KnobExplorer` scrubs a **precomputed** sweep (WiSE-FT alpha, DPS mask ratio, ...):
  moving the slider only reads the table, so it is instant; an optional ``exact`` callable
  evaluates the current value for real on demand.
* :class:`LiveValueExplorer` computes each value **live** (DRM's beta mixing of cached logits
  takes milliseconds).
* :class:`ThresholdExplorer` moves an OOD-detection threshold over the score distribution.
* :class:`LiveTrainingPlot` is a training callback drawing loss and eval curves while
  :func:`rftlib.train.fit` runs.

Headless use: constructing an explorer and calling ``update`` needs no frontend, so they run under
papermill and in tests. Widgets in an executed notebook are not saved with their state, though, so
notebooks should also emit ``rftlib.viz.show_static(explorer.static_figure())``.

The plots are ``plotly.graph_objects.FigureWidget``; since plotly 6 that needs the ``anywidget``
package (``pip install 'rftlib[notebooks]'``).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import ipywidgets as W
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from . import viz
from .axes import Axes, preferred_metric

log = logging.getLogger(__name__)

__all__ = ["KnobExplorer", "LiveTrainingPlot", "LiveValueExplorer", "ThresholdExplorer"]

ValuesFn = Callable[[float], tuple[float, float]]
"""``values_fn(knob_value) -> (id_metric, ood_metric)``."""


# --------------------------------------------------------------------------- helpers
def figure_widget(fig: go.Figure) -> go.FigureWidget:
    """Wrap a figure in a ``go.FigureWidget``, with an install hint if ``anywidget`` is missing.

    Args:
        fig: The static figure.

    Returns:
        A live widget holding the same data and layout.
    """
    try:
        return go.FigureWidget(fig)
    except ImportError as err:  # plotly >= 6 builds FigureWidget on anywidget
        raise ImportError(f"{err}; live plots need anywidget: pip install 'rftlib[notebooks]'") from err


def trace_named(fig: go.Figure, name: str) -> Any:
    """The first trace of ``fig`` called ``name`` (a live handle when ``fig`` is a FigureWidget)."""
    for trace in fig.data:
        if trace.name == name:
            return trace
    raise KeyError(f"no trace named {name!r}; traces: {[t.name for t in fig.data]}")


def grid_step(grid: np.ndarray) -> float:
    """The slider step of a knob grid: its smallest spacing (the spacing itself when uniform)."""
    return float(round(np.diff(np.unique(grid)).min(), 12))


def decimals_for(step: float, at_least: int = 2) -> int:
    """How many decimals show every multiple of ``step`` exactly (at least ``at_least``, at most 6)."""
    for digits in range(at_least, 7):
        if abs(round(step, digits) - step) <= 1e-9 * max(1.0, abs(step)):
            return digits
    return 6


# --------------------------------------------------------------------------- base classes
class _Explorer:
    """A slider, a readout and a FigureWidget stacked in ``.widget``.

    The slider's observer renders the slider value; ``update`` (the public entry point) renders
    a value and then moves the slider there without re-triggering the observer.
    """

    slider: W.FloatSlider
    readout: W.HTML
    fig: go.FigureWidget
    widget: W.VBox

    def _wire(self, controls: list[W.Widget]) -> None:
        """Connect the slider and assemble ``.widget`` (call at the end of ``__init__``)."""
        self._quiet = False
        self.slider.observe(self._on_slider, names="value")
        self.widget = W.VBox([W.HBox(controls), self.readout, self.fig])

    def _on_slider(self, change: dict) -> None:
        if not self._quiet:
            self._render(change["new"])

    def _move_slider(self, value: float) -> None:
        """Set the slider to ``value`` quietly (the plot already shows it)."""
        if abs(self.slider.value - value) > 1e-12:
            self._quiet = True
            try:
                self.slider.value = value
            finally:
                self._quiet = False

    def _render(self, value: float) -> dict[str, float]:
        raise NotImplementedError

    def static_figure(self) -> go.Figure:
        """A plain ``go.Figure`` copy of the plot as it is now (for :func:`rftlib.viz.show_static`)."""
        return go.Figure(self.fig)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


class _IdOodExplorer(_Explorer):
    """Shared machinery of the two ID-vs-OOD explorers: slider over a grid, ``selected`` marker, readout."""

    def __init__(self, points: pd.DataFrame, knob: str, *, axes: Axes | None, start: float | None,
                 step: float | None, description: str | None,
                 extra_controls: Iterable[W.Widget] = ()):
        if len(points) < 2:
            raise ValueError(f"a {knob} explorer needs at least two grid values, got {len(points)}")
        self.points, self.knob, self.axes = points, knob, axes
        self.grid = points[knob].to_numpy(float)
        step = float(step) if step is not None else grid_step(self.grid)
        self.digits = decimals_for(step)
        if start is None:
            start = float(self.grid[np.abs(self.grid - (self.grid[0] + self.grid[-1]) / 2).argmin()])
        self.slider = W.FloatSlider(value=start, min=float(self.grid[0]), max=float(self.grid[-1]), step=step,
                                    description=description or knob, readout_format=f".{self.digits}f",
                                    continuous_update=True)
        self.readout = W.HTML()
        self.fig = figure_widget(viz.id_ood_figure(points, knob, axes=axes, highlight=start))
        self._selected = trace_named(self.fig, "selected")
        self.state: dict[str, float] = {}
        self._wire([self.slider, *extra_controls])
        self.update(start)

    def _values_at(self, value: float) -> tuple[float, float]:
        raise NotImplementedError

    def update(self, value: float) -> dict[str, float]:
        """Show the knob at ``value``: move the ``selected`` marker, the title, the readout and the slider.

        Args:
            value: Knob value (clamped to the grid's range).

        Returns:
            ``{"value", "id", "ood"}`` at that value.
        """
        state = self._render(value)
        self._move_slider(state["value"])
        return state

    def _render(self, value: float) -> dict[str, float]:
        value = float(np.clip(value, self.grid[0], self.grid[-1]))
        id_value, ood_value = self._values_at(value)
        with self.fig.batch_update():
            self._selected.x, self._selected.y, self._selected.customdata = [id_value], [ood_value], [value]
            self.fig.layout.title.text = viz.knob_title(self.knob, value, id_value, ood_value, digits=self.digits)
        self.state = {"value": value, "id": id_value, "ood": ood_value}
        self.readout.value = self._readout_html()
        return dict(self.state)

    def _readout_html(self) -> str:
        s = self.state
        id_name, ood_name = (self.axes.title("id"), self.axes.title("ood")) if self.axes else ("ID", "OOD")
        return (f"<b>{self.knob} = {s['value']:.{self.digits}f}</b> &nbsp; {id_name} <b>{s['id']:.3f}</b>"
                f" &nbsp; {ood_name} <b>{s['ood']:.3f}</b> &nbsp; <i>{self._provenance(s['value'])}</i>")

    def _provenance(self, value: float) -> str:
        return ""


# --------------------------------------------------------------------------- explorers
class KnobExplorer(_IdOodExplorer):
    """Scrub a precomputed knob sweep on the ID-vs-OOD plane.

    Between grid values the metrics are **linearly interpolated** (:func:`rftlib.viz.point_at`):
    the marker then slides along the drawn curve, matches the table exactly at grid values, and
    the readout says "interpolated" so nobody mistakes it for a measurement. Press "Evaluate
    exactly" (when ``exact`` is given) to measure the current value; every measured point stays
    on the plot as an ``exact`` marker and is cached.

    Example::

        table = wiseft_result.extra["sweep"]
        explorer = KnobExplorer(table, "alpha", exact=lambda a: evaluate_subset(wise.model_at(a)))
        explorer                      # display; or explorer.update(0.35) from code

    Args:
        sweep: Tidy sweep table (see :mod:`rftlib.viz`).
        knob: The knob column (``alpha``, ``mask_ratio``, ``beta``, ``scale``).
        metric, id_split, ood_split, axes: what the two axes read (default: each split's headline
            metric, ``id_test`` on x and the mean over the OOD test splits on y;
            :func:`rftlib.viz.sweep_axes`).
        start: Initial value (default: the grid value nearest the middle of the range).
        step: Slider step (default: the grid spacing).
        exact: Optional ``exact(value) -> (id, ood)``; e.g. for WiSE-FT merge the weights at that
            alpha and evaluate on a subset.
        description: Slider label (default: the knob name).

    Attributes:
        slider, readout, fig: The ``FloatSlider``, ``HTML`` readout and ``FigureWidget``.
        button: The "Evaluate exactly" button (None without ``exact``).
        widget: The ``VBox`` to display.
        state: ``{"value", "id", "ood"}`` currently shown.
        exact_results: ``{value: (id, ood)}`` measured so far.
    """

    def __init__(self, sweep: pd.DataFrame, knob: str, *, metric: str | None = None, id_split: str | None = None,
                 ood_split: str | None = None, axes: Axes | None = None, start: float | None = None,
                 step: float | None = None, exact: ValuesFn | None = None, description: str | None = None):
        axes = viz.sweep_axes(sweep, metric, id_split, ood_split, axes=axes)
        points = viz.id_ood_points(sweep, knob, axes=axes)
        self.exact = exact
        self.exact_results: dict[float, tuple[float, float]] = {}
        self.button = None
        if exact is not None:
            self.button = W.Button(description="Evaluate exactly", icon="calculator",
                                   tooltip=f"evaluate the model at the current {knob}")
            self.button.on_click(self._on_click)
        controls = [] if self.button is None else [self.button]
        super().__init__(points, knob, axes=axes, start=start, step=step, description=description,
                         extra_controls=controls)
        if exact is not None:
            self.fig.add_trace(viz.marker_trace("exact", [], [], [], knob, color=viz.COLORS["exact"],
                                                symbol="diamond", size=13))
            self._exact_trace = trace_named(self.fig, "exact")
            self._exact_trace.visible = False

    def _values_at(self, value: float) -> tuple[float, float]:
        p = viz.point_at(self.points, self.knob, value)
        return p["id"], p["ood"]

    def _provenance(self, value: float) -> str:
        on_grid = bool(np.isclose(self.grid, value, rtol=0, atol=1e-9).any())
        text = "precomputed" if on_grid else "interpolated between grid values"
        key = round(value, 12)
        if key in self.exact_results:
            id_value, ood_value = self.exact_results[key]
            text += f"; exact: ID {id_value:.3f}, OOD {ood_value:.3f}"
        return text

    def evaluate_exact(self, value: float | None = None) -> dict[str, float]:
        """Evaluate ``exact`` at ``value`` (default: the current value) and add an ``exact`` marker.

        Results are cached per value, so pressing the button twice costs one evaluation.

        Args:
            value: Knob value; None means the slider's current value.

        Returns:
            ``{"value", "id", "ood"}`` as measured.

        Raises:
            RuntimeError: if the explorer was built without ``exact``.
        """
        if self.exact is None:
            raise RuntimeError("this explorer has no exact= function to evaluate")
        value = float(self.state["value"] if value is None else value)
        key = round(value, 12)
        if key not in self.exact_results:
            id_value, ood_value = self.exact(value)
            self.exact_results[key] = (float(id_value), float(ood_value))
        self._draw_exact()
        self.readout.value = self._readout_html()
        id_value, ood_value = self.exact_results[key]
        return {"value": value, "id": id_value, "ood": ood_value}

    def _draw_exact(self) -> None:
        keys = sorted(self.exact_results)
        with self.fig.batch_update():
            self._exact_trace.x = [self.exact_results[k][0] for k in keys]
            self._exact_trace.y = [self.exact_results[k][1] for k in keys]
            self._exact_trace.customdata = keys
            self._exact_trace.visible = True

    def _on_click(self, _button: W.Button) -> None:
        """Button handler: evaluate while the button is disabled; errors go to the readout."""
        self.button.disabled, self.button.description = True, "Evaluating…"
        try:
            self.evaluate_exact()
        except Exception as err:  # shown to the user; a widget callback has nowhere else to report
            log.exception("exact evaluation failed")
            self.readout.value = f"<span style='color:#d62728'>exact evaluation failed: {err!r}</span>"
        finally:
            self.button.disabled, self.button.description = False, "Evaluate exactly"


class LiveValueExplorer(_IdOodExplorer):
    """Like :class:`KnobExplorer`, but every slider value is computed live by ``values_fn``.

    Use it when a new knob value costs milliseconds, e.g. DRM's mixing of two zero-shot heads
    by ``beta`` on cached logits. The grey curve is ``values_fn`` on ``grid`` (computed once);
    the marker is ``values_fn`` at the exact slider value. Results are memoised per value.

    Args:
        values_fn: ``values_fn(value) -> (id, ood)``.
        knob: Name of the knob.
        grid: Knob values drawn as the curve; also the slider's range.
        axes: what ``values_fn``'s two numbers are (for the axis titles), e.g.
            :meth:`rftlib.notebook.Session.axes`.
        start: Initial value (default: the grid value nearest the middle).
        step: Slider step (default: the grid spacing).
        description: Slider label.
        cache_size: How many computed values to memoise.
    """

    def __init__(self, values_fn: ValuesFn, knob: str, grid: Iterable[float], *, axes: Axes | None = None,
                 start: float | None = None, step: float | None = None, description: str | None = None,
                 cache_size: int = 1024):
        self.values_fn = values_fn
        self._cached = functools.lru_cache(maxsize=cache_size)(self._compute)
        points = viz.evaluate_grid(self._cached, knob, grid)
        super().__init__(points, knob, axes=axes, start=start, step=step, description=description)

    def _compute(self, value: float) -> tuple[float, float]:
        id_value, ood_value = self.values_fn(value)
        return float(id_value), float(ood_value)

    def _values_at(self, value: float) -> tuple[float, float]:
        return self._cached(round(float(value), 12))

    def _provenance(self, value: float) -> str:
        return "computed live"


class ThresholdExplorer(_Explorer):
    """Move an OOD-detection threshold over the score distribution and read TPR/FPR.

    The slider runs over **quantiles of all scores** (ID and OOD pooled), so equal slider steps
    move past equal numbers of samples whatever the score scale (MSP in [0, 1], energies in the
    tens); the readout and title give the threshold itself. Samples with ``score >= threshold``
    are accepted as ID: TPR is the fraction of ID kept, FPR the fraction of OOD accepted.

    Args:
        scores: Frame with ``score`` (higher = more ID), ``is_ood`` and optionally ``kind``.
        start: Initial threshold (default: the one keeping 95% of ID, the FPR@95 operating point).
        step: Slider step in quantile units.
        nbins: Histogram bins.
        description: Slider label.
    """

    def __init__(self, scores: pd.DataFrame, *, start: float | None = None, step: float = 0.01, nbins: int = 40,
                 description: str = "quantile"):
        self.scores = scores
        self._pooled = np.sort(scores["score"].to_numpy(float))
        threshold = viz.threshold_at_tpr(scores) if start is None else float(start)
        self.slider = W.FloatSlider(value=self.quantile_of(threshold), min=0.0, max=1.0, step=step,
                                    description=description, readout_format=f".{decimals_for(step)}f",
                                    continuous_update=True)
        self.readout = W.HTML()
        self.fig = figure_widget(viz.detection_histogram(scores, threshold, nbins=nbins))
        self._line = next(s for s in self.fig.layout.shapes if s.name == "threshold")
        self.state: dict[str, float] = {}
        self._wire([self.slider])
        self.update(threshold)

    def quantile_of(self, threshold: float) -> float:
        """The fraction of all scores below ``threshold`` (where the slider sits for it)."""
        return float(np.searchsorted(self._pooled, threshold, side="left") / self._pooled.size)

    def threshold_at(self, quantile: float) -> float:
        """The score at a quantile of all scores (linear interpolation, as ``numpy.quantile``)."""
        return float(np.quantile(self._pooled, float(np.clip(quantile, 0.0, 1.0))))

    def update(self, threshold: float) -> dict[str, float]:
        """Show ``threshold``: move the line, the title, the readout and the slider.

        Args:
            threshold: Acceptance threshold (score units).

        Returns:
            ``{"threshold", "tpr", "fpr"}``.
        """
        state = self._show(float(threshold))
        self._move_slider(self.quantile_of(state["threshold"]))
        return state

    def _render(self, quantile: float) -> dict[str, float]:
        return self._show(self.threshold_at(quantile))

    def _show(self, threshold: float) -> dict[str, float]:
        tpr, fpr = viz.detection_rates(self.scores, threshold)
        with self.fig.batch_update():
            self._line.x0 = self._line.x1 = threshold
            self.fig.layout.title.text = viz.detection_title(threshold, tpr, fpr)
        self.state = {"threshold": threshold, "tpr": tpr, "fpr": fpr}
        self.readout.value = (f"threshold <b>{threshold:.4g}</b> &nbsp; TPR (ID kept) <b>{tpr:.3f}</b>"
                              f" &nbsp; FPR (OOD accepted) <b>{fpr:.3f}</b>")
        return dict(self.state)


# --------------------------------------------------------------------------- training
class LiveTrainingPlot:
    """A training callback that draws loss and per-epoch eval curves while ``fit`` runs.

    Pass it in ``callbacks=[plot]`` and display ``plot`` in the same cell *before* training
    starts; widget messages are sent while the cell executes, so the curves move during the
    blocking call. Redraws are throttled: at most once per ``interval`` seconds (and every
    ``every`` steps, if given), plus always on ``eval`` and ``end`` events, each as one batched
    update. Long loss histories are thinned to ``max_points`` evenly spaced points for drawing
    (``.frame`` keeps everything).

    Args:
        title: Title prefix (default ``"training"``); the live title adds step, epoch and loss.
        metric: Per-epoch metric (default: :func:`rftlib.viz.headline_metric` of the first eval).
        interval: Minimum seconds between redraws.
        every: Also redraw every this many steps (None: time-based only).
        max_points: Most loss points sent to the browser per redraw.

    Attributes:
        fig: The ``FigureWidget``; ``widget`` is the same object.
        events: Every event received.
    """

    def __init__(self, title: str | None = None, *, metric: str | None = None, interval: float = 1.0,
                 every: int | None = None, max_points: int = 5000):
        self.title, self.metric = title or "training", metric
        self.interval, self.every, self.max_points = interval, every, max_points
        self.events: list[Any] = []
        self._steps: list[int] = []
        self._losses: list[float] = []
        self._evals: dict[str, tuple[list[float], list[float]]] = {}
        self._last_flush, self._pending = float("-inf"), 0  # the first event always draws
        self.fig = figure_widget(viz.training_curves(viz.events_frame([]), metric=metric, title=self.title))
        self._loss = trace_named(self.fig, "loss")
        self.widget = self.fig

    def __call__(self, event: Any) -> None:
        """Receive one :class:`rftlib.train.Event`; redraw if due."""
        self.events.append(event)
        if event.kind == "step":
            self._pending += 1
            if "loss" in event.data:
                self._steps.append(int(event.step))
                self._losses.append(float(event.data["loss"]))
        elif event.kind == "eval":
            self._add_eval(event)
        if self._due(event.kind):
            self.flush()

    def _add_eval(self, event: Any) -> None:
        metrics = event.data.get("metrics", {})
        if self.metric is None:
            self.metric = preferred_metric(metrics)
        if self.metric in metrics:
            epochs, values = self._evals.setdefault(str(event.data.get("split")), ([], []))
            epochs.append(event.epoch + 1)
            values.append(float(metrics[self.metric]))

    def _due(self, kind: str) -> bool:
        if kind in ("eval", "end"):
            return True
        if self.every and self._pending >= self.every:
            return True
        return time.monotonic() - self._last_flush >= self.interval

    def flush(self) -> None:
        """Redraw now with everything received (one batched message)."""
        missing = [s for s in self._evals if s not in {t.name for t in self.fig.data}]
        for split in missing:
            self.fig.add_trace(viz.eval_trace(split, [], [], self.metric or "metric"), row=1, col=2)
        steps, losses = _thin(self._steps, self._losses, self.max_points)
        with self.fig.batch_update():
            self._loss.x, self._loss.y = steps, losses
            for split, (epochs, values) in self._evals.items():
                trace = trace_named(self.fig, split)
                trace.x, trace.y = list(epochs), list(values)
            self.fig.layout.yaxis2.title.text = self.metric or "metric"
            self.fig.layout.title.text = self._status()
        self._last_flush, self._pending = time.monotonic(), 0

    def _status(self) -> str:
        if not self.events:
            return self.title
        last = self.events[-1]
        text = f"{self.title} · step {last.step} · epoch {last.epoch + 1}"
        return text + (f" · loss {self._losses[-1]:.4f}" if self._losses else "")

    @property
    def frame(self) -> pd.DataFrame:
        """Everything received, as :func:`rftlib.viz.events_frame`."""
        return viz.events_frame(self.events)

    def static_figure(self) -> go.Figure:
        """A plain figure of all received data (unthinned), e.g. for :func:`rftlib.viz.show_static`."""
        return viz.training_curves(self.frame, metric=self.metric, title=self._status())

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def _thin(xs: list, ys: list, max_points: int) -> tuple[list, list]:
    """At most ``max_points`` evenly spaced (x, y) pairs, always keeping the last one."""
    if len(xs) <= max_points:
        return list(xs), list(ys)
    keep = np.unique(np.linspace(0, len(xs) - 1, max_points).round().astype(int))
    return [xs[i] for i in keep], [ys[i] for i in keep]
