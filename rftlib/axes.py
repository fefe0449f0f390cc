"""The two numbers of an ID-vs-OOD picture, and where each comes from.

Every robust fine-tuning plot puts an in-distribution number on x and an out-of-distribution
number on y. Which numbers those are is a property of the dataset, not of the plot: each split
is read in its own headline metric (iWildCam macro-F1; FMoW accuracy in distribution and
worst-region accuracy out of it; ImageNet top-1), the ID axis is the ID test split, and the OOD
axis is the mean over the OOD test splits (iWildCam's and FMoW's one ``test`` split, ImageNet's
shifts). Validation splits choose; they are never plotted.

:class:`Axes` holds that choice as (split, metric) pairs. :func:`Axes.from_facts` builds it from
a dataset's :meth:`~rftlib.data.base.RFTDataset.split_facts` (or the same facts a results store
keeps per run); plots, widgets, notebook helpers and :func:`rftlib.results.compare` all read
their numbers and axis titles from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

Pairs = tuple[tuple[str, str], ...]

HEADLINE_PREFERENCE = ("macro_f1", "accuracy")
"""Metrics tried, in order, where nothing recorded which metric is a split's headline one (a plain
sweep table, a first-release results store, a training curve)."""


def preferred_metric(present: Iterable[str]) -> str | None:
    """The first of :data:`HEADLINE_PREFERENCE` among ``present``, else the first metric present
    (None when there is none)."""
    names = [str(m) for m in dict.fromkeys(present)]
    return next((m for m in HEADLINE_PREFERENCE if m in names), names[0] if names else None)


@dataclass(frozen=True)
class Axes:
    """Each axis is the mean of its (split, metric) pairs.

    Attributes:
        id: the ID axis's pairs, e.g. ``(("id_test", "macro_f1"),)``.
        ood: the OOD axis's pairs, e.g. ``(("sketch", "accuracy"), ("imagenet-r", "accuracy"))``.
    """

    id: Pairs
    ood: Pairs

    @classmethod
    def from_facts(cls, facts: Mapping[str, Mapping[str, str]], *, metric: str | None = None,
                   id_split: str | None = None, ood_split: str | None = None) -> Axes:
        """The axes of a dataset from its split facts (``{split: {"role", "metric", "use"}}``).

        Args:
            facts: each split's role (``id``/``ood``), headline metric and use (``val``/``test``).
            metric: read every split in this metric instead of its headline one.
            id_split: the ID split (default: ``id_test`` if there is one, else the first ID test split).
            ood_split: a single OOD split (default: every OOD test split).
        """
        tests = {role: [s for s, f in facts.items() if f.get("role") == role and f.get("use", "test") == "test"]
                 for role in ("id", "ood")}
        ids = [id_split] if id_split else (["id_test"] if "id_test" in tests["id"] else tests["id"][:1])
        oods = [ood_split] if ood_split else tests["ood"]
        if not ids or not oods:
            raise ValueError(f"no {'ID' if not ids else 'OOD'} test split to plot among {sorted(facts)}")

        def pairs(splits: list[str]) -> Pairs:
            return tuple((s, metric or facts.get(s, {}).get("metric") or "accuracy") for s in splits)

        return cls(id=pairs(ids), ood=pairs(oods))

    def title(self, axis: str) -> str:
        """E.g. ``"ID macro_f1 (id_test)"`` or ``"OOD accuracy (mean of 4 splits)"``."""
        pairs = self.id if axis == "id" else self.ood
        metrics = "/".join(sorted({m for _, m in pairs}))
        where = pairs[0][0] if len(pairs) == 1 else f"mean of {len(pairs)} splits"
        return f"{axis.upper()} {metrics} ({where})"

    @property
    def metrics(self) -> str:
        """The metric names of both axes, for a title (``"macro_f1"``, ``"accuracy/acc_worst_region"``)."""
        return "/".join(sorted({m for _, m in (*self.id, *self.ood)}))

    def splits(self) -> list[str]:
        """Every split either axis reads, ID first."""
        return list(dict.fromkeys(s for s, _ in (*self.id, *self.ood)))

    def values(self, read: Mapping[str, Mapping[str, float]]) -> tuple[float, float]:
        """``(id, ood)`` from per-split metrics ``{split: {metric: value}}``."""
        def mean(pairs: Pairs) -> float:
            return sum(float(read[s][m]) for s, m in pairs) / len(pairs)

        return mean(self.id), mean(self.ood)
