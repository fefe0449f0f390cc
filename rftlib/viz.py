"""Plotly figures for robust fine-tuning: pure functions from tidy frames to ``go.Figure``.

Every function here takes a pandas frame produced by the library and returns a
:class:`plotly.graph_objects.Figure` (or a frame); nothing here needs a browser, a kernel or
ipywidgets, so it is all testable headless. :mod:`rftlib.widgets` binds these figures to sliders.

The frames:

* a **sweep table**: one row per (knob value, split, metric) with columns ``<knob>`` (a name
  of :data:`rftlib.knobs.KNOBS`), ``split``, ``role``, ``metric``, ``value`` -- e.g. a run's
  ``extra["sweep"]`` for WiSE-FT's ``alpha``. Duplicate rows (several seeds) are averaged.
* the **results store** (:func:`rftlib.results.load`): one row per logged metric, with a ``kind``
  and one column per knob (NaN where a row has none).
* **training events** (:class:`rftlib.train.Event`), turned into a tidy frame by
  :func:`events_frame`.
* **detection scores**: columns ``score`` (higher = more in-distribution, as in
  :mod:`rftlib.metrics`), ``is_ood`` (bool) and optionally ``kind`` (where the samples come from).

The ID-vs-OOD plane is the picture of the WiSE-FT paper (Wortsman et al., CVPR 2022): x is the
in-distribution metric, y the out-of-distribution one, each model is a point and a mixing knob
traces a curve between the zero-shot and the fine-tuned end points. Points above the straight
zero-shot -> fine-tuned segment are *effectively robust*: better OOD than the ID gain alone
predicts.

Displaying: in a live notebook just display the figure. For executed (papermill) notebooks use
:func:`show_static`, and :func:`save_html` for a standalone, offline HTML artifact.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import metrics as rmetrics
from .axes import Axes, preferred_metric
from .data.base import split_use
from .knobs import KNOBS

log = logging.getLogger(__name__)

__all__ = [
    "compare_methods", "detection_histogram", "detection_rates", "detection_title", "evaluate_grid",
    "eval_trace", "events_frame", "headline_metric", "id_ood_curve", "id_ood_figure", "id_ood_points", "knob_curves",
    "knob_title", "loss_trace", "marker_trace", "point_at", "save_html", "show_static", "static_bundle",
    "threshold_at_tpr", "training_curves",
]


EVENT_COLUMNS = ("kind", "step", "epoch", "split", "role", "metric", "value")
"""Columns of :func:`events_frame`."""

PLOTLY_MIMETYPE = "application/vnd.plotly.v1+json"

COLORS = {
    "curve": "#1f77b4", "selected": "#d62728", "exact": "#ff7f0e", "reference": "#9e9e9e",
    "id": "#1f77b4", "ood": "#ff7f0e", "line": "#555555",
}
TEMPLATE = "plotly_white"


# --------------------------------------------------------------------------- small helpers
def _require_columns(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    """Raise a ``ValueError`` naming the missing columns of ``frame``."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"the {what} lacks column(s) {missing}; it has {list(frame.columns)}")


def knob_title(knob: str, value: float, id_value: float, ood_value: float, *, digits: int = 2) -> str:
    """The one-line status shown above ID/OOD plots, e.g. ``"alpha=0.50 · ID 0.812 · OOD 0.701"``.

    Args:
        knob: Name of the knob (``alpha``, ``beta``, ...).
        value: Its current value.
        id_value: The ID metric at that value.
        ood_value: The OOD metric at that value.
        digits: Decimals of the knob value.

    Returns:
        The title text.
    """
    return f"{knob}={value:.{digits}f} · ID {id_value:.3f} · OOD {ood_value:.3f}"


def _endpoint_label(knob: str, value: float) -> str:
    """A declared end point's name (:attr:`rftlib.knobs.Knob.ends`: alpha 0 is ``"zero-shot"``),
    ``"<knob>=<value>"`` otherwise."""
    ends = KNOBS.get(knob).ends if knob in KNOBS else {}
    for special, label in ends.items():
        if math.isclose(value, special, abs_tol=1e-9):
            return label
    return f"{knob}={value:g}"


# --------------------------------------------------------------------------- ID/OOD points
def sweep_axes(sweep: pd.DataFrame, metric: str | None = None, id_split: str | None = None,
               ood_split: str | None = None, *, axes: Axes | None = None) -> Axes:
    """The :class:`~rftlib.axes.Axes` a sweep table is drawn with (``axes`` itself when given).

    Each split is read in its headline metric: the metric of its rows marked ``headline`` (a
    run's sweep tables mark them), else the first of :data:`rftlib.axes.HEADLINE_PREFERENCE` it has. The ID
    axis is ``id_test`` (else the first ID test split), the OOD axis the mean over the OOD test
    splits (WILDS' ``test``; every ImageNet shift); ``metric``, ``id_split`` and ``ood_split``
    override those choices.
    """
    if axes is not None:
        return axes
    facts = {}
    for split, rows in sweep.groupby("split", sort=False):
        role = rows["role"].iloc[0] if "role" in rows else ("id" if str(split).startswith("id") else "ood")
        facts[str(split)] = {"role": role, "use": split_use(str(split)), "metric": _split_metric(rows)}
    return Axes.from_facts(facts, metric=metric, id_split=id_split, ood_split=ood_split)


def _split_metric(rows: pd.DataFrame) -> str:
    """One split's headline metric in a sweep table (marked rows first, then the preference)."""
    if "headline" in rows and rows["headline"].fillna(False).astype(bool).any():
        return str(rows.loc[rows["headline"].fillna(False).astype(bool), "metric"].iloc[0])
    return preferred_metric(rows["metric"].dropna()) or "accuracy"


def id_ood_points(
    sweep: pd.DataFrame, knob: str, *, metric: str | None = None, id_split: str | None = None,
    ood_split: str | None = None, axes: Axes | None = None,
) -> pd.DataFrame:
    """Pivot a tidy sweep table into one row per knob value with its ID and OOD number.

    Rows whose knob is missing are ignored, so a results-store frame of one method works too;
    duplicate rows for one knob value (several seeds) are averaged.

    Args:
        sweep: Tidy frame with columns ``<knob>``, ``split``, ``metric``, ``value`` (and ``role``,
            ``headline``).
        knob: The knob column, e.g. ``"alpha"``.
        metric, id_split, ood_split, axes: what the axes read (default: :func:`sweep_axes`).

    Returns:
        A frame with columns ``[knob, "id", "ood"]`` sorted by the knob; knob values lacking
        one of the axes' splits are dropped.

    Raises:
        ValueError: if a column, a metric or one of the splits is missing.
    """
    _require_columns(sweep, [knob, "split", "metric", "value"], "sweep table")
    axes = sweep_axes(sweep, metric, id_split, ood_split, axes=axes)
    rows = sweep[sweep[knob].notna()]
    mean = rows.groupby([knob, "split", "metric"])["value"].mean()
    columns = {}
    for axis, pairs in (("id", axes.id), ("ood", axes.ood)):
        parts = []
        for split, name in pairs:
            if (split, name) not in mean.index.droplevel(0):
                raise ValueError(f"no {name!r} rows for split {split!r} with {knob} set; the table has metrics "
                                 f"{sorted(sweep['metric'].dropna().unique())} and splits "
                                 f"{sorted(sweep['split'].dropna().unique())}")
            parts.append(mean.xs((split, name), level=("split", "metric")))
        columns[axis] = pd.concat(parts, axis=1).mean(axis=1, skipna=False)
    points = pd.DataFrame(columns).dropna().rename_axis(knob).reset_index()
    points[knob] = points[knob].astype(float)
    return points.sort_values(knob, ignore_index=True)


def evaluate_grid(values_fn: Any, knob: str, grid: Iterable[float]) -> pd.DataFrame:
    """Tabulate a live ``values_fn(value) -> (id, ood)`` on a grid, in the shape of :func:`id_ood_points`.

    Args:
        values_fn: Callable returning the ID and the OOD metric at a knob value (e.g. DRM's
            mixing of cached logits at ``beta``).
        knob: Name of the knob.
        grid: Knob values to evaluate.

    Returns:
        A frame with columns ``[knob, "id", "ood"]`` sorted by the knob.
    """
    values = sorted({float(v) for v in grid})
    pairs = [tuple(map(float, values_fn(v))) for v in values]
    return pd.DataFrame({knob: values, "id": [p[0] for p in pairs], "ood": [p[1] for p in pairs]})


def point_at(points: pd.DataFrame, knob: str, value: float, *, interpolate: bool = True) -> dict[str, float]:
    """The ID/OOD metrics at a knob value, read off a points frame.

    With ``interpolate=True`` the metrics are linearly interpolated between the two neighbouring
    grid values. That keeps the point on the drawn polyline of the ID/OOD curve, agrees exactly
    with the table at grid values, and is honest about what was measured (an interpolated value is
    not an evaluation). With ``interpolate=False`` the nearest grid point is returned. Values
    outside the grid are clamped to its ends.

    Args:
        points: Frame from :func:`id_ood_points` (sorted by the knob).
        knob: The knob column.
        value: Where to read.
        interpolate: Interpolate (default) or snap to the nearest grid value.

    Returns:
        ``{"value", "id", "ood"}``; ``value`` is the clamped (or snapped) knob value.
    """
    grid = points[knob].to_numpy(float)
    value = float(np.clip(value, grid[0], grid[-1]))
    if not interpolate:
        i = int(np.abs(grid - value).argmin())
        return {"value": float(grid[i]), "id": float(points["id"].iat[i]), "ood": float(points["ood"].iat[i])}
    return {"value": value, "id": float(np.interp(value, grid, points["id"].to_numpy(float))),
            "ood": float(np.interp(value, grid, points["ood"].to_numpy(float)))}


# --------------------------------------------------------------------------- ID/OOD figure
def _reference_trace(points: pd.DataFrame) -> go.Scatter:
    """The dashed ``y = x`` line (ID = OOD) spanning the data of both axes."""
    values = points[["id", "ood"]].to_numpy(float)
    lo, hi = float(values.min()), float(values.max())
    pad = 0.05 * (hi - lo) or 0.01
    return go.Scatter(x=[lo - pad, hi + pad], y=[lo - pad, hi + pad], mode="lines", name="y = x",
                      line={"dash": "dash", "color": COLORS["reference"], "width": 1}, hoverinfo="skip")


def _curve_trace(points: pd.DataFrame, knob: str) -> go.Scatter:
    """Line + markers through the knob grid; hovering shows the knob value."""
    return go.Scatter(x=points["id"], y=points["ood"], customdata=points[knob], mode="lines+markers", name=knob,
                      line={"color": COLORS["curve"]}, marker={"size": 6},
                      hovertemplate=f"{knob}=%{{customdata:.2f}}<br>ID %{{x:.3f}}<br>OOD %{{y:.3f}}<extra></extra>")


def _endpoint_trace(points: pd.DataFrame, knob: str) -> go.Scatter:
    """Text labels at the two ends of the curve (``zero-shot``/``fine-tuned`` for alpha)."""
    ends = points.iloc[[0, -1]]
    rightmost = int(np.argmax(ends["id"].to_numpy()))  # its label grows leftwards, so it stays inside the axes
    positions = ["bottom left" if i == rightmost else "bottom right" for i in range(2)]
    return go.Scatter(x=ends["id"], y=ends["ood"], mode="text", name="end points", showlegend=False,
                      text=[_endpoint_label(knob, v) for v in ends[knob]], textposition=positions,
                      hoverinfo="skip")


def marker_trace(name: str, xs: Iterable[float], ys: Iterable[float], values: Iterable[float], knob: str, *,
                 color: str, symbol: str = "circle", size: int = 16) -> go.Scatter:
    """A big marker (``selected`` or ``exact``) at given ID/OOD points, with the knob in the hover text.

    Args:
        name: Trace name; widgets find their traces by it.
        xs: ID values.
        ys: OOD values.
        values: The knob value of each point (hover text).
        knob: Name of the knob.
        color: Marker colour.
        symbol: Plotly marker symbol.
        size: Marker size in px.

    Returns:
        The scatter trace.
    """
    hover = f"{knob}=%{{customdata:.2f}}<br>ID %{{x:.3f}}<br>OOD %{{y:.3f}}<extra>{name}</extra>"
    return go.Scatter(x=list(xs), y=list(ys), customdata=list(values), mode="markers", name=name,
                      marker={"size": size, "color": color, "symbol": symbol, "line": {"width": 2, "color": "white"}},
                      hovertemplate=hover)


def id_ood_figure(
    points: pd.DataFrame, knob: str, *, axes: Axes | None = None, highlight: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """The ID-vs-OOD curve of a knob from a points frame (see :func:`id_ood_curve`).

    Traces, in order and by name: ``"y = x"``, ``<knob>`` (the curve), ``"end points"`` (labels)
    and, if ``highlight`` is given, ``"selected"``.

    Args:
        points: Frame with columns ``[knob, "id", "ood"]``.
        knob: The knob column.
        axes: what the points were read from, for the axis titles.
        highlight: Knob value to mark with a big ``selected`` marker (snapped to the nearest grid
            value); the default title then reads like :func:`knob_title`.
        title: Title text (overrides the default).

    Returns:
        The figure.
    """
    fig = go.Figure([_reference_trace(points), _curve_trace(points, knob), _endpoint_trace(points, knob)])
    default_title = f"ID vs OOD {axes.metrics} across {knob}" if axes else f"ID vs OOD across {knob}"
    if highlight is not None:
        p = point_at(points, knob, highlight, interpolate=False)
        fig.add_trace(marker_trace("selected", [p["id"]], [p["ood"]], [p["value"]], knob, color=COLORS["selected"]))
        default_title = knob_title(knob, p["value"], p["id"], p["ood"])
    fig.update_layout(title={"text": title or default_title}, template=TEMPLATE, hovermode="closest",
                      xaxis_title=axes.title("id") if axes else "ID", yaxis_title=axes.title("ood") if axes else "OOD",
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1.0})
    return fig


def id_ood_curve(
    sweep: pd.DataFrame, knob: str, *, metric: str | None = None, id_split: str | None = None,
    ood_split: str | None = None, axes: Axes | None = None, highlight: float | None = None, title: str | None = None,
) -> go.Figure:
    """ID metric (x) against OOD metric (y) along a knob sweep, the WiSE-FT picture.

    The curve runs through the precomputed knob grid (hover shows the knob value), its ends are
    labelled (``zero-shot``/``fine-tuned`` for alpha 0/1), a dashed ``y = x`` line marks equal ID
    and OOD performance, and ``highlight`` adds a big ``selected`` marker.

    Args:
        sweep: Tidy sweep table (see the module docstring).
        knob: The knob column, e.g. ``"alpha"``.
        metric, id_split, ood_split, axes: what the axes read (default: :func:`sweep_axes`).
        highlight: Knob value to mark (nearest grid value); the title then shows it, e.g.
            ``"alpha=0.50 · ID 0.812 · OOD 0.701"``.
        title: Title text (overrides the default).

    Returns:
        The figure.
    """
    axes = sweep_axes(sweep, metric, id_split, ood_split, axes=axes)
    return id_ood_figure(id_ood_points(sweep, knob, axes=axes), knob, axes=axes, highlight=highlight, title=title)


def knob_curves(
    sweep: pd.DataFrame, knob: str, *, metric: str | None = None, id_split: str | None = None,
    ood_split: str | None = None, axes: Axes | None = None, highlight: float | None = None, title: str | None = None,
) -> go.Figure:
    """The ID and the OOD metric against the knob: two lines, and a dotted vertical line at ``highlight``.

    Args:
        sweep: Tidy sweep table.
        knob: The knob column (x axis).
        metric, id_split, ood_split, axes: what the two lines read (default: :func:`sweep_axes`).
        highlight: Knob value marked by a vertical line (shape named ``"selected"``).
        title: Title text (overrides the default).

    Returns:
        The figure, with traces named after the axes (``"ID macro_f1 (id_test)"``, ...).
    """
    axes = sweep_axes(sweep, metric, id_split, ood_split, axes=axes)
    points = id_ood_points(sweep, knob, axes=axes)
    fig = go.Figure()
    for column in ("id", "ood"):
        fig.add_scatter(x=points[knob], y=points[column], mode="lines+markers", name=axes.title(column),
                        line={"color": COLORS[column]},
                        hovertemplate=f"{knob}=%{{x:.2f}}<br>{column.upper()} %{{y:.3f}}<extra></extra>")
    default_title = f"{axes.metrics} across {knob}"
    if highlight is not None:
        p = point_at(points, knob, highlight, interpolate=False)
        fig.add_vline(x=p["value"], line={"dash": "dot", "color": COLORS["selected"]}, name="selected")
        default_title = knob_title(knob, p["value"], p["id"], p["ood"])
    fig.update_layout(title={"text": title or default_title}, template=TEMPLATE, xaxis_title=knob,
                      yaxis_title=axes.metrics, hovermode="x unified")
    return fig


# --------------------------------------------------------------------------- training curves
def events_frame(events: Iterable[Any]) -> pd.DataFrame:
    """Flatten training events into a tidy frame (columns :data:`EVENT_COLUMNS`).

    ``step`` events give one row per numeric scalar (``loss``, ``lr``, ...; ``split`` empty);
    ``eval`` events give one row per metric of their split. ``epoch`` events repeat the eval
    metrics and ``end`` events carry no curve, so both are skipped.

    Args:
        events: :class:`rftlib.train.Event` objects (anything with ``kind``, ``step``, ``epoch``,
            ``data``).

    Returns:
        The tidy frame, in arrival order.
    """
    rows: list[dict[str, Any]] = []
    for event in events:
        base = {"kind": event.kind, "step": int(event.step), "epoch": int(event.epoch)}
        if event.kind == "step":
            rows += [{**base, "split": None, "role": None, "metric": k, "value": float(v)}
                     for k, v in event.data.items() if isinstance(v, numbers.Real) and not isinstance(v, bool)]
        elif event.kind == "eval":
            shared = {**base, "split": event.data.get("split"), "role": event.data.get("role")}
            rows += [{**shared, "metric": k, "value": float(v)} for k, v in event.data.get("metrics", {}).items()]
    return pd.DataFrame(rows, columns=list(EVENT_COLUMNS))


def headline_metric(frame: pd.DataFrame) -> str | None:
    """The metric a training plot shows per epoch: the first of :data:`rftlib.axes.HEADLINE_PREFERENCE` present.

    Args:
        frame: An :func:`events_frame`.

    Returns:
        A metric name, the first evaluated metric if none of the preferred ones is there, or None
        when nothing was evaluated.
    """
    return preferred_metric(frame.loc[frame["kind"] == "eval", "metric"])


def loss_trace(steps: Iterable[float], losses: Iterable[float]) -> go.Scatter:
    """The training-loss line (left panel of :func:`training_curves`)."""
    return go.Scatter(x=list(steps), y=list(losses), mode="lines", name="loss", line={"color": COLORS["line"]},
                      hovertemplate="step %{x}<br>loss %{y:.4f}<extra></extra>")


def eval_trace(split: str, epochs: Iterable[float], values: Iterable[float], metric: str) -> go.Scatter:
    """One split's metric per epoch (right panel of :func:`training_curves`)."""
    return go.Scatter(x=list(epochs), y=list(values), mode="lines+markers", name=split,
                      hovertemplate=f"epoch %{{x}}<br>{split} {metric} %{{y:.3f}}<extra></extra>")


def training_curves(events_or_frame: Iterable[Any] | pd.DataFrame, *, metric: str | None = None,
                    title: str | None = None) -> go.Figure:
    """Loss against step (left) and each evaluated split's headline metric against epoch (right).

    Epochs are plotted as "epochs completed" (``Event.epoch + 1``), so the first evaluation sits at 1.

    Args:
        events_or_frame: A list of :class:`rftlib.train.Event` or an :func:`events_frame`.
        metric: The per-epoch metric (default: :func:`headline_metric`).
        title: Figure title.

    Returns:
        A two-panel figure: trace ``"loss"`` on ``x``/``y``, one trace per split on ``x2``/``y2``.
    """
    frame = events_or_frame if isinstance(events_or_frame, pd.DataFrame) else events_frame(events_or_frame)
    _require_columns(frame, EVENT_COLUMNS, "events frame")
    metric = metric or headline_metric(frame)
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12)
    loss = frame[(frame["kind"] == "step") & (frame["metric"] == "loss")]
    fig.add_trace(loss_trace(loss["step"], loss["value"]), row=1, col=1)
    evals = frame[(frame["kind"] == "eval") & (frame["metric"] == metric)]
    for split, rows in evals.groupby("split", sort=False):
        fig.add_trace(eval_trace(str(split), rows["epoch"] + 1, rows["value"], metric), row=1, col=2)
    fig.update_layout(title={"text": title or "training"}, template=TEMPLATE, legend={"title": {"text": ""}})
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_xaxes(title_text="epochs completed", row=1, col=2)
    fig.update_yaxes(title_text="loss", row=1, col=1)
    fig.update_yaxes(title_text=metric or "metric", row=1, col=2)
    return fig


# --------------------------------------------------------------------------- comparing methods
def _endpoints(table: pd.DataFrame, zero_shot: str, fine_tuned: str) -> tuple[tuple, tuple] | None:
    """The zero-shot and fine-tuned (ID, OOD) means of one backbone's table, when both are there."""
    found = {r.method: (r.id_mean, r.ood_mean) for r in table.itertuples() if r.method in (zero_shot, fine_tuned)}
    return (found[zero_shot], found[fine_tuned]) if len(found) == 2 else None


def _method_trace(row: Any, name: str) -> go.Scatter:
    """One method's mean point, with confidence-interval bars when there is more than one seed."""
    bars = row.n_seeds > 1 and not math.isnan(row.id_ci)
    knobs = f" at {row.knobs} ({row.selected_on})" if row.knobs else ""
    return go.Scatter(
        x=[row.id_mean], y=[row.ood_mean], mode="markers+text", name=name, text=[row.method],
        textposition="top center", marker={"size": 11},
        error_x={"type": "data", "array": [row.id_ci if bars else 0.0], "visible": bool(bars)},
        error_y={"type": "data", "array": [row.ood_ci if bars else 0.0], "visible": bool(bars)},
        hovertemplate=f"{name}{knobs} (n={row.n_seeds})<br>ID %{{x:.3f}}<br>OOD %{{y:.3f}}<extra></extra>")


def compare_methods(results: pd.DataFrame, *, dataset: str | None = None, metric: str | None = None,
                    confidence: float = 0.95, zero_shot: str = "zeroshot", fine_tuned: str = "finetune",
                    ) -> tuple[pd.DataFrame, go.Figure]:
    """Every method in a results frame as a table and an ID-vs-OOD scatter.

    The numbers are :func:`rftlib.results.compare`'s: each split's headline metric, knobs chosen
    on ID validation, the mean over seeds with a confidence interval, one entry per backbone and
    method (WiSE-FT per base method). Each backbone's zero-shot -> fine-tuned segment is drawn
    dashed: a method above it is more robust than fine-tuning at the same ID number. Knob sweeps
    (WiSE-FT alpha, DRM beta, ...) are drawn as curves.

    Args:
        results: a frame from :func:`rftlib.results.load`.
        dataset: keep only this dataset (required when the frame holds several).
        metric: read every split in this metric instead of its headline one.
        confidence: the interval's confidence level.
        zero_shot, fine_tuned: the methods whose points end the reference segment.

    Returns:
        ``(table, figure)``: :attr:`rftlib.results.Comparison.table` and the figure.
    """
    from .results import compare

    found = compare(results, dataset=dataset, metric=metric, confidence=confidence)
    return found.table, _comparison_figure(found, zero_shot, fine_tuned)


def _comparison_figure(found: Any, zero_shot: str, fine_tuned: str) -> go.Figure:
    """Draw a :class:`rftlib.results.Comparison`: per backbone its ZS->FT segment and its methods,
    then the knob curves."""
    fig = go.Figure()
    table = found.table
    backbones = table.groupby(["model", "pretrained"], sort=False, dropna=False)
    for (model, pretrained), rows in backbones:
        prefix = f"{model}/{pretrained}: " if backbones.ngroups > 1 else ""
        ends = _endpoints(rows, zero_shot, fine_tuned)
        if ends is not None:
            (x0, y0), (x1, y1) = ends
            fig.add_scatter(x=[x0, x1], y=[y0, y1], mode="lines", name=f"{prefix}zero-shot → fine-tuned",
                            line={"dash": "dash", "color": COLORS["reference"]}, hoverinfo="skip")
        for row in rows.itertuples():
            fig.add_trace(_method_trace(row, f"{prefix}{row.method}"))
    for method, curve in found.curves.items():
        knob = str(curve["knob"].iloc[0])
        fig.add_scatter(x=curve["id"], y=curve["ood"], customdata=curve["value"], mode="lines+markers",
                        name=f"{method} ({knob} sweep)", marker={"size": 5},
                        hovertemplate=f"{knob}=%{{customdata:.2f}}<br>ID %{{x:.3f}}<br>OOD %{{y:.3f}}<extra></extra>")
    fig.update_layout(title={"text": "ID vs OOD: methods compared"}, template=TEMPLATE,
                      xaxis_title=found.axes.get("id", "ID"), yaxis_title=found.axes.get("ood", "OOD"))
    return fig


# --------------------------------------------------------------------------- OOD detection
def _id_ood_scores(scores: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Split a scores frame into ID and OOD score arrays."""
    _require_columns(scores, ["score", "is_ood"], "scores frame")
    is_ood = scores["is_ood"].astype(bool).to_numpy()
    values = scores["score"].to_numpy(float)
    if is_ood.all() or not is_ood.any():
        raise ValueError("the scores frame needs both ID (is_ood=False) and OOD (is_ood=True) rows")
    return values[~is_ood], values[is_ood]


def detection_rates(scores: pd.DataFrame, threshold: float) -> tuple[float, float]:
    """TPR and FPR of the rule "accept as ID when ``score >= threshold``".

    Args:
        scores: Frame with ``score`` (higher = more ID) and ``is_ood``.
        threshold: The acceptance threshold.

    Returns:
        ``(tpr, fpr)``: the fraction of ID samples kept and of OOD samples (wrongly) accepted.
    """
    s_id, s_ood = _id_ood_scores(scores)
    return float(np.mean(s_id >= threshold)), float(np.mean(s_ood >= threshold))


def threshold_at_tpr(scores: pd.DataFrame, tpr: float = 0.95) -> float:
    """The threshold keeping a fraction ``tpr`` of ID samples, as in :func:`rftlib.metrics.fpr_at_tpr`.

    Args:
        scores: Frame with ``score`` and ``is_ood``.
        tpr: Target true-positive rate in ``(0, 1]``.

    Returns:
        The largest ID score such that at least ``ceil(tpr * n_id)`` ID scores are ``>=`` it.
    """
    s_id, _ = _id_ood_scores(scores)
    return rmetrics.threshold_at_tpr(s_id, tpr)


def detection_title(threshold: float, tpr: float, fpr: float) -> str:
    """E.g. ``"threshold 1.23 · TPR 0.950 (ID kept) · FPR 0.310 (OOD accepted)"``."""
    return f"threshold {threshold:.3g} · TPR {tpr:.3f} (ID kept) · FPR {fpr:.3f} (OOD accepted)"


def _group_name(scores: pd.DataFrame, ood: bool) -> str:
    """``"ID"``/``"OOD"``, followed by the sample kinds of that group when a ``kind`` column exists."""
    name = "OOD" if ood else "ID"
    if "kind" not in scores:
        return name
    kinds = scores.loc[scores["is_ood"].astype(bool) == ood, "kind"].dropna().astype(str).unique()
    return f"{name} ({', '.join(kinds)})" if len(kinds) else name


def detection_histogram(scores: pd.DataFrame, threshold: float | None = None, *, nbins: int = 40,
                        title: str | None = None) -> go.Figure:
    """Overlaid ID and OOD score histograms with the acceptance threshold as a vertical line.

    Both histograms share the same bins and are normalised to fractions of their group, so a small
    OOD set is as visible as a large ID one. The title reports TPR (ID kept) and FPR (OOD
    accepted) at the threshold.

    Args:
        scores: Frame with ``score`` (higher = more ID), ``is_ood`` and optionally ``kind``.
        threshold: Acceptance threshold (default: the one keeping 95% of ID, :func:`threshold_at_tpr`).
        nbins: Number of shared bins.
        title: Title text (overrides the default :func:`detection_title`).

    Returns:
        The figure: histogram traces ``ID...`` and ``OOD...`` and a line shape named ``"threshold"``.
    """
    threshold = threshold_at_tpr(scores) if threshold is None else float(threshold)
    s_id, s_ood = _id_ood_scores(scores)
    lo, hi = float(min(s_id.min(), s_ood.min())), float(max(s_id.max(), s_ood.max()))
    bins = {"start": lo, "end": hi + 1e-9 * max(1.0, abs(hi)), "size": (hi - lo) / nbins or 1.0}
    fig = go.Figure()
    for values, ood in ((s_id, False), (s_ood, True)):
        fig.add_histogram(x=values, name=_group_name(scores, ood), xbins=bins, histnorm="probability",
                          marker={"color": COLORS["ood" if ood else "id"]}, opacity=0.6)
    fig.add_vline(x=threshold, line={"color": COLORS["selected"], "width": 2}, name="threshold")
    tpr, fpr = detection_rates(scores, threshold)
    fig.update_layout(title={"text": title or detection_title(threshold, tpr, fpr)}, template=TEMPLATE,
                      barmode="overlay", xaxis_title="score (higher = more in-distribution)",
                      yaxis_title="fraction of group")
    return fig


# --------------------------------------------------------------------------- output
def save_html(fig: go.Figure, path: str | Path) -> Path:
    """Write a standalone HTML file with plotly.js inlined (about 5 MB; opens offline).

    Args:
        fig: The figure (a ``FigureWidget`` works too).
        path: Target file; parent folders are created.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(path, include_plotlyjs=True, include_mathjax=False, full_html=True)
    return path


def _summary_text(fig: go.Figure) -> str:
    """A one-line text stand-in for a figure (what plain-text viewers and diffs show)."""
    names = ", ".join(str(t.name) for t in fig.data if t.name)
    return f"<plotly figure {fig.layout.title.text or ''!r}; traces: {names}>"


def static_bundle(fig: go.Figure, *, html: bool = False) -> dict[str, Any]:
    """The display data :func:`show_static` emits.

    Args:
        fig: The figure (a ``FigureWidget`` is converted to a plain figure).
        html: Also include a self-contained ``text/html`` rendering (plotly.js inlined, ~5 MB).

    Returns:
        A mimebundle: the plotly JSON, a ``text/plain`` summary and optionally ``text/html``.
    """
    fig = go.Figure(fig)
    bundle: dict[str, Any] = {PLOTLY_MIMETYPE: fig.to_plotly_json(), "text/plain": _summary_text(fig)}
    if html:
        bundle["text/html"] = fig.to_html(full_html=False, include_plotlyjs=True, include_mathjax=False)
    return bundle


def show_static(fig: go.Figure, *, html: bool = False) -> None:
    """Display a figure as saved, static output that survives headless (papermill/nbclient) runs.

    A ``FigureWidget`` in an executed notebook is only a reference to widget state that was never
    saved, so it shows up blank later. This emits the figure itself instead, as the plotly
    mimetype (``application/vnd.plotly.v1+json``): JupyterLab renders it from the saved notebook
    with the bundled ``jupyterlab-plotly`` extension, offline and even for untrusted notebooks, and
    it costs only the figure's JSON. A ``text/plain`` summary keeps plain-text viewers readable. No
    CDN is referenced (plotly's ``notebook_connected``/``cdn`` renderers need internet).
    ``nbconvert --to html`` ignores the plotly mimetype (jupyter/nbconvert#2235); pass
    ``html=True`` for such reports, or write a file with :func:`save_html`.

    Args:
        fig: The figure.
        html: Also embed a self-contained HTML rendering (plotly.js inlined, ~5 MB per figure).
    """
    from IPython.display import display

    display(static_bundle(fig, html=html), raw=True)


def image_grid(dataset: Any, splits: Iterable[str], *, n: int = 12, scale: int = 3) -> go.Figure:
    """A mosaic of the first ``n`` images of each split (one row per split), for a first look."""
    from .data.pipeline import decode_split

    rows = []
    for split in splits:
        images = decode_split(dataset.split(split), _grid_size(dataset, split))[:n]
        rows.append(np.concatenate(list(images.permute(0, 2, 3, 1).numpy()), axis=1))
    width = max(r.shape[1] for r in rows)
    mosaic = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
    mosaic = np.kron(mosaic, np.ones((scale, scale, 1), dtype=np.uint8))
    fig = go.Figure(go.Image(z=mosaic))
    fig.update_layout(title=" / ".join(f"row {i + 1}: {s}" for i, s in enumerate(splits)),
                      xaxis_visible=False, yaxis_visible=False, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def _grid_size(dataset: Any, split: str) -> int:
    images = dataset.split(split).images
    return int(images.array.shape[1]) if hasattr(images, "array") else 96


def metrics_bar(result: Any, *, metric: str | None = None) -> go.Figure:
    """A bar per evaluation split of a run's headline metric, coloured by role (ID vs OOD)."""
    table = result.table()
    metric = metric or ("macro_f1" if "macro_f1" in table.columns else table.columns[0])
    fig = go.Figure(go.Bar(x=list(table.index), y=table[metric].tolist(), text=[f"{v:.3f}" for v in table[metric]]))
    fig.update_layout(title=f"{result.method} on {result.dataset}: {metric}", yaxis_range=[0, 1],
                      yaxis_title=metric, xaxis_title="split")
    return fig
