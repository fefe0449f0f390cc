"""One comparison of every method in a results store: headline ID/OOD numbers, knobs chosen on ID
validation, seeds aggregated with a confidence interval.

The rules, in the order they are applied to a frame from :func:`rftlib.results.load`:

0. **Which runs.** Only finished ones: rows of a run whose ``status`` is ``running`` (still going,
   or killed and never resumed) or ``failed`` are left out, so an interrupted run is never
   averaged with finished ones. Rows logged ad hoc, without a registered run (no status), count.
1. **Which numbers.** Each split is read in its own headline metric (iWildCam macro-F1, FMoW
   worst-region accuracy on its OOD test, ImageNet top-1), as the run recorded it
   (``splits_json``); stores from the first release fall back to ``macro_f1``, else ``accuracy``.
   The ID axis is the ID test split; the OOD axis is the mean over the OOD test splits (one for
   WILDS, every shift for ImageNet). Validation splits (``id_val``, ``val``) are never plotted.
   **ObjectNet**: when any run has an ``objectnet`` OOD test row, the table also reports the mean
   over the OOD test splits *other than* ObjectNet (``ood_without_objectnet_mean`` / ``_ci``),
   next to ``ood_mean``. With all of ImageNet's shifts these are the papers' 5-shift average
   (WiSE-FT, FLYP, DRM: V2, R, Sketch, A, ObjectNet) and the 4-shift average some later papers
   report; it also puts runs evaluated without ObjectNet on a common footing with those evaluated
   with it (a run without ObjectNet has the same value in both). Other datasets are unchanged.
2. **Which rows.** Only a run's ``final`` and ``sweep`` rows; per-epoch rows are training curves.
3. **Which knob value.** A method evaluated at several knob values (WiSE-FT's alpha, DRM's beta,
   R-Adapter's scale, a DPS mask-ratio sweep) is reported at the value with the best ID validation
   number (``id_val``), per seed: never chosen on a test split. Without an ID validation split
   the run's own ``final`` rows (its configured value) are used.
4. **Which groups.** One entry per dataset, backbone (model + pretrained) and method, where a
   method that builds on another run is told apart by its base: ``wiseft (flyp)`` and
   ``wiseft (finetune)`` are two entries.
5. **Seeds.** Values are averaged per seed first; then the mean over seeds and a Student-t
   confidence interval (95 % by default; NaN for a single seed).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..axes import Axes, preferred_metric
from ..data.base import split_use
from ..data.objectnet import OBJECTNET_SPLIT

log = logging.getLogger(__name__)

GROUP = ["dataset", "model", "pretrained", "method"]
"""What one comparison entry is: a method (with its base) on a dataset with a backbone."""
TABLE_COLUMNS = ["dataset", "model", "pretrained", "method", "n_seeds", "id_mean", "id_ci", "ood_mean", "ood_ci",
                 "knobs", "selected_on"]
WITHOUT_OBJECTNET = "ood_without_objectnet"
"""The OOD mean over every OOD test split but ObjectNet: a column of the points (and, with
``_mean``/``_ci``, of the table, after ``ood_ci``) only when some run was evaluated on ObjectNet."""


@dataclass
class Comparison:
    """What :func:`compare` returns.

    Attributes:
        table: one row per dataset, backbone and method (columns :data:`TABLE_COLUMNS`): seeds,
            mean and confidence half-width of the ID and OOD headline numbers, the knob values
            chosen (``"alpha=0.6"``, or a range over seeds) and how (``id_val`` or ``reported``);
            with ObjectNet results also ``ood_without_objectnet_mean`` and ``_ci`` after ``ood_ci``.
        curves: method -> a frame of its knob sweep (``knob``, ``value``, ``id``, ``ood``,
            ``n_seeds``), mean over seeds: WiSE-FT's alpha curve, DRM's beta curve, ...
        axes: what the two axes hold, e.g. ``{"id": "macro_f1 (id_test)", "ood": "macro_f1 (test)"}``;
            with ObjectNet results also ``"ood_without_objectnet"``.
    """

    table: pd.DataFrame
    curves: dict[str, pd.DataFrame] = field(default_factory=dict)
    axes: dict[str, str] = field(default_factory=dict)


def compare(results: pd.DataFrame, *, dataset: str | None = None, metric: str | None = None,
            confidence: float = 0.95) -> Comparison:
    """Compare every method present in ``results`` (see the module docstring for the rules).

    Args:
        results: a frame from :func:`rftlib.results.load`.
        dataset: keep only this dataset (required when the frame holds several).
        metric: read every split in this metric instead of its headline one.
        confidence: the confidence level of the interval over seeds.
    """
    rows = single_dataset(finished_runs(results), dataset)
    points = headline_points(rows, metric=metric)
    chosen = choose_knobs(points)
    table = summarise(chosen, confidence)
    return Comparison(table=table, curves=knob_curves(points), axes=axis_names(rows, metric))


def finished_runs(results: pd.DataFrame) -> pd.DataFrame:
    """The rows of runs whose status is ``done``, and of unregistered runs (no status); a frame
    without a ``status`` column (not from :func:`rftlib.results.load`) is kept whole."""
    if "status" not in results:
        return results
    status = results["status"]
    keep = (status.isna() | (status == "done")).to_numpy()
    left_out = sorted(set(results.loc[~keep, "run_id"].astype(str)))
    if left_out:
        log.info("left out %d unfinished run(s) (status running or failed): %s", len(left_out),
                 ", ".join(left_out[:5]) + (", ..." if len(left_out) > 5 else ""))
    return results[keep]


def single_dataset(results: pd.DataFrame, dataset: str | None) -> pd.DataFrame:
    """The rows of one dataset; a frame holding several needs ``dataset`` to say which."""
    if dataset is not None:
        return results[results["dataset"] == dataset]
    found = results["dataset"].dropna().unique()
    if len(found) > 1:
        raise ValueError(f"the results hold several datasets ({', '.join(map(str, found))}); pass dataset=")
    return results


def split_facts(rows: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Each row's split headline metric (``split_metric``) and use (``split_use``: val or test).

    From the run's recorded ``splits_json``; for runs that have none, :func:`rftlib.data.base.split_use`
    and :func:`rftlib.axes.preferred_metric` of what the run logged on that split.
    """
    recorded = {text: json.loads(text) for text in rows["splits_json"].dropna().unique() if text not in ("", "nan")}
    metric_of, use_of = [], []
    for text, split in zip(rows["splits_json"], rows["split"], strict=True):
        facts = recorded.get(text, {}).get(split, {})
        metric_of.append(metric or facts.get("metric"))
        use_of.append(facts.get("use", split_use(str(split))))
    out = rows.assign(split_metric=metric_of, split_use=use_of)
    missing = out["split_metric"].isna()
    if missing.any():
        out.loc[missing, "split_metric"] = _fallback_metrics(out[missing])
    return out


def _fallback_metrics(rows: pd.DataFrame) -> pd.Series:
    """For each row, :func:`rftlib.axes.preferred_metric` of what its run logged on its split."""
    logged = rows.groupby(["run_id", "split"])["metric"].agg(list)
    pick = {key: preferred_metric(names) for key, names in logged.items()}
    return pd.Series([pick[(r, s)] for r, s in zip(rows["run_id"], rows["split"], strict=True)], index=rows.index)


def method_label(method: str, base_method: object) -> str:
    """``"wiseft (flyp)"`` for a run built on a base run, else the method name."""
    return f"{method} ({base_method})" if isinstance(base_method, str) and base_method else str(method)


def headline_points(rows: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """One (ID val, ID, OOD) point per run and knob setting, from its final and sweep rows.

    Returns:
        columns ``dataset, model, pretrained, method, seed_key, run_id, knobs_json, has_final,
        id_val, id, ood`` (then ``ood_without_objectnet`` when some run has ObjectNet results) plus
        one column per knob.
    """
    rows = rows[rows["kind"].isin(["final", "sweep"]) & rows["role"].isin(["id", "ood"])]
    if rows.empty:
        return pd.DataFrame(columns=[*GROUP, "seed_key", "run_id", "knobs_json", "has_final", "id_val", "id", "ood"])
    rows = split_facts(rows, metric)
    rows = rows[rows["metric"] == rows["split_metric"]]
    rows = rows.assign(method=[method_label(m, b) for m, b in zip(rows["method"], rows["base_method"], strict=True)],
                       seed_key=[str(s) if pd.notna(s) else f"run:{r}" for s, r in zip(rows["seed"], rows["run_id"],
                                                                                         strict=True)],
                       axis=_axis(rows))
    keys = [*GROUP, "seed_key", "run_id", "knobs_json"]
    per_split = rows.groupby([*keys, "axis", "split"], dropna=False)["value"].mean().reset_index()
    wide = per_split.groupby([*keys, "axis"], dropna=False)["value"].mean().unstack("axis")
    wide = wide.reindex(columns=["id_val", "id", "ood"]).reset_index().rename_axis(columns=None)
    without = ood_without_objectnet(per_split, keys)
    if without is not None:
        wide = wide.merge(without, on=keys, how="left")
    finals = rows[rows["kind"] == "final"].groupby(keys, dropna=False).size().rename("n_final").reset_index()
    wide = wide.merge(finals, on=keys, how="left").assign(has_final=lambda f: f["n_final"].fillna(0) > 0)
    knobs = [json.loads(text) for text in wide["knobs_json"]]
    for name in sorted({k for d in knobs for k in d}):
        wide[name] = [d.get(name, np.nan) for d in knobs]
    return wide.drop(columns="n_final")


def ood_without_objectnet(per_split: pd.DataFrame, keys: list[str]) -> pd.DataFrame | None:
    """Per point (``keys``), the mean over its OOD test splits other than ObjectNet (column
    :data:`WITHOUT_OBJECTNET`), or None when no point has an ObjectNet OOD test value."""
    ood = per_split[per_split["axis"] == "ood"]
    objectnet = ood["split"] == OBJECTNET_SPLIT
    if not objectnet.any():
        return None
    rest = ood[~objectnet].groupby(keys, dropna=False)["value"].mean()
    return rest.rename(WITHOUT_OBJECTNET).reset_index()


def _axis(rows: pd.DataFrame) -> list[str | None]:
    """Which comparison axis a row feeds: ``id_val``, ``id`` (ID test), ``ood`` (OOD test) or None."""
    table = {("id", "val"): "id_val", ("id", "test"): "id", ("ood", "test"): "ood"}
    return [table.get((role, use)) for role, use in zip(rows["role"], rows["split_use"], strict=True)]


def choose_knobs(points: pd.DataFrame) -> pd.DataFrame:
    """One point per dataset, backbone, method and seed: the knob setting with the best ID
    validation number, or the run's final rows when there is no ID validation to choose on."""
    chosen = []
    extra = [WITHOUT_OBJECTNET] if WITHOUT_OBJECTNET in points else []
    for _, group in points.groupby([*GROUP, "seed_key"], dropna=False, sort=False):
        settings = group.groupby("knobs_json", sort=False).agg(
            id_val=("id_val", "mean"), id=("id", "mean"), ood=("ood", "mean"), has_final=("has_final", "any"),
            **{name: (name, "mean") for name in extra})
        if len(settings) > 1 and settings["id_val"].notna().all():
            best = settings["id_val"].idxmax()
            pick, how = settings.loc[[best]], "id_val"
        elif settings["has_final"].any():
            pick, how = settings[settings["has_final"]], "reported"
        elif len(settings) == 1:
            pick, how = settings, "reported"
        else:
            log.warning("%s: several knob values, no ID validation split and no final rows: left out",
                        " / ".join(map(str, group.iloc[0][GROUP])))
            continue
        first = group.iloc[0]
        chosen.append({**{k: first[k] for k in [*GROUP, "seed_key"]}, "id": pick["id"].mean(),
                       "ood": pick["ood"].mean(), **{name: pick[name].mean() for name in extra},
                       "knobs": [_knob_text(k) for k in pick.index], "selected_on": how})
    return pd.DataFrame(chosen, columns=[*GROUP, "seed_key", "id", "ood", *extra, "knobs", "selected_on"])


def _knob_text(knobs: str) -> str:
    """``'{"alpha": 0.6}'`` -> ``"alpha=0.6"`` (empty for no knobs)."""
    return ", ".join(f"{name}={value:g}" for name, value in json.loads(knobs).items())


def summarise(chosen: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Mean and Student-t confidence half-width over seeds, per dataset, backbone and method."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    table = []
    extra = [WITHOUT_OBJECTNET] if WITHOUT_OBJECTNET in chosen else []
    for key, group in chosen.dropna(subset=["id", "ood"]).groupby(GROUP, dropna=False, sort=False):
        knobs = sorted({text for texts in group["knobs"] for text in texts if text})
        table.append({**dict(zip(GROUP, key, strict=True)), "n_seeds": len(group),
                      "id_mean": group["id"].mean(), "id_ci": half_width(group["id"], confidence),
                      "ood_mean": group["ood"].mean(), "ood_ci": half_width(group["ood"], confidence),
                      **{f"{name}_mean": group[name].mean() for name in extra},
                      **{f"{name}_ci": half_width(group[name], confidence) for name in extra},
                      "knobs": "; ".join(knobs), "selected_on": "/".join(sorted(set(group["selected_on"])))})
    after = TABLE_COLUMNS.index("ood_ci") + 1
    columns = [*TABLE_COLUMNS[:after], *(f"{name}_{stat}" for name in extra for stat in ("mean", "ci")),
               *TABLE_COLUMNS[after:]]
    frame = pd.DataFrame(table, columns=columns)
    return frame.sort_values(["model", "pretrained", "ood_mean"], ascending=[True, True, False], ignore_index=True)


def half_width(values: pd.Series, confidence: float = 0.95) -> float:
    """The half-width of the Student-t confidence interval of the mean (NaN for fewer than 2 values)."""
    from scipy import stats

    n = int(values.count())
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))


def knob_curves(points: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per method whose points vary exactly one knob over three or more values: the mean over
    seeds of (ID, OOD) at each value (a WiSE-FT alpha curve, a DRM beta curve, ...)."""
    fixed = {*GROUP, "seed_key", "run_id", "knobs_json", "has_final", "id_val", "id", "ood", WITHOUT_OBJECTNET}
    curves = {}
    for method, group in points.groupby("method", sort=False):
        varying = [c for c in points.columns if c not in fixed and group[c].nunique() > 1]
        if len(varying) != 1 or group[varying[0]].nunique() < 3:
            continue
        knob = varying[0]
        per_seed = group.groupby([knob, "seed_key"])[["id", "ood"]].mean().reset_index()
        curve = per_seed.groupby(knob).agg(id=("id", "mean"), ood=("ood", "mean"), n_seeds=("seed_key", "nunique"))
        curves[str(method)] = curve.reset_index().rename(columns={knob: "value"}).assign(knob=knob)
    return curves


def axis_names(rows: pd.DataFrame, metric: str | None = None) -> dict[str, str]:
    """Readable axis titles (:meth:`rftlib.axes.Axes.title`): the metric and split(s) each axis reads."""
    rows = rows[rows["role"].isin(["id", "ood"])]
    if rows.empty:
        return {"id": "ID", "ood": "OOD"}
    facts = split_facts(rows, metric)
    tests = facts[facts["split_use"] == "test"]
    pairs = {}
    for role in ("id", "ood"):
        mine = tests[tests["role"] == role]
        pairs[role] = tuple(sorted(set(zip(mine["split"].astype(str), mine["split_metric"].astype(str), strict=True))))
    if not pairs["id"] or not pairs["ood"]:
        return {"id": "ID", "ood": "OOD"}
    axes = Axes(id=pairs["id"], ood=pairs["ood"])
    names = {"id": axes.title("id"), "ood": axes.title("ood")}
    others = tuple(pair for pair in pairs["ood"] if pair[0] != OBJECTNET_SPLIT)
    if others != pairs["ood"] and others:
        names[WITHOUT_OBJECTNET] = Axes(id=pairs["id"], ood=others).title("ood") + " without objectnet"
    return names
