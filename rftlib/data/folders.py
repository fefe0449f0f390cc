"""Your own images as rftlib datasets: multi-domain folders (PACS/VLCS style) and generic folders/CSVs.

Two loaders:

:func:`load_domains` (registry name ``domains``) -- one folder per domain, one sub-folder per class::

    root/photo/dog/001.jpg   root/sketch/dog/001.png   root/cartoon/dog/...   ...

evaluated leave-one-domain-out: the held-out domain(s) become OOD test splits ``test_<domain>``,
and the other domains are pooled and split at random (per domain and class, with a seed) into
``train``, ``id_val`` and ``id_test``.

:func:`load_folder` (registry name ``folder``) -- data already divided into splits, either as
folders ``root/<split>/<class>/<image>`` or as a CSV with columns ``path``, ``label``, ``split``
(extra columns become metadata). Split roles follow WILDS naming: ``train`` -> train, ``id_*`` ->
id, ``val`` / ``test`` / ``ood*`` / ``test_*`` -> ood, ``openset`` -> openset (images of classes
the model must *not* know; their labels are -1); any other split name is treated as ID unless
``split_roles`` says otherwise.

Class names default to the class folder names with ``_`` replaced by spaces, the templates to
``["a photo of a {}."]``. Metrics: accuracy, macro-F1 and macro recall, plus per-domain and
worst-domain accuracy when the split's metadata has a ``domain`` column.

What is refused, with the folder or file named (never silently turned into data):

* a split, domain or class folder without images: a class is a sub-folder with at least one image
  file (a split may simply lack a class's folder; an empty folder is a mistake, e.g. a failed
  copy, and would add a class no image belongs to);
* a split, domain or class *folder* whose name is not valid UTF-8 (such names become split and
  class names in prompts and in the results store; rename the folder). Image *file* names may be
  any bytes: they are opened, decoded and cached as they are;
* a CSV that is empty, has a header but no rows, lacks one of the columns ``path,label,split``, or
  has ``label``/``split`` values that are not UTF-8 (paths may hold any bytes, as file names).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .base import ROLES, DataNotFoundError, FileImages, RFTDataset, Split
from .imagenet import class_folders, list_images

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.",)
OPENSET_LABEL = -1
CSV_COLUMNS = ("path", "label", "split")


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------
def folder_classname(folder_name: str) -> str:
    """A prompt-ready class name from a folder name: ``"golden_retriever"`` -> ``"golden retriever"``."""
    return folder_name.replace("_", " ").strip()


def _check_root(root: Path | None, kind: str, layout: str) -> Path:
    """The root as a readable directory, or a :class:`DataNotFoundError` explaining the layout."""
    if root is None:
        raise DataNotFoundError(f"the {kind!r} dataset needs root=<folder>; expected layout:\n{layout}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(f"{root} is not a directory; the {kind!r} dataset expects:\n{layout}")
    try:
        next(root.iterdir(), None)
    except OSError as err:
        raise DataNotFoundError(f"cannot read {root}: {err}") from err
    return root


def display_path(path: str | os.PathLike) -> str:
    """``path`` for a message: bytes that are not UTF-8 shown as ``\\xNN`` (printable anywhere)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_utf8(text: str) -> bool:
    """Whether ``text`` holds no undecodable bytes (the surrogates ``os.fsdecode`` uses for them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def named_subfolders(folder: Path, what: str) -> list[Path]:
    """The visible sub-folders of ``folder``, sorted, each to be a ``what`` (split, domain, class).

    Raises:
        ValueError: a sub-folder's name is not valid UTF-8 (it would become a split or class name);
            the message names the folder and shows the name's bytes.
    """
    subfolders = class_folders(folder)
    bad = [d.name for d in subfolders if not is_utf8(d.name)]
    if bad:
        shown = ", ".join(repr(os.fsencode(name)) for name in bad)
        raise ValueError(
            f"{what} folder name(s) {shown} in {display_path(folder)} are not valid UTF-8; {what} folder names "
            f"become {what} names (prompts, results, file names), so rename them to UTF-8 "
            "(image file names may be any bytes)"
        )
    return subfolders


def _templates(templates: Sequence[str] | str | None) -> list[str]:
    """Validate templates (one ``{}`` each); a single string is one template."""
    if templates is None:
        return list(DEFAULT_TEMPLATES)
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not templates:
        raise ValueError("templates must not be empty")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates need a '{{}}' for the class name: {bad}")
    return templates


def _display_names(folder_names: list[str], classnames: Sequence[str] | None) -> list[str]:
    """Class names in label order: the caller's, or derived from the folder names."""
    if classnames is None:
        return [folder_classname(n) for n in folder_names]
    classnames = list(classnames)
    if len(classnames) != len(folder_names):
        raise ValueError(
            f"classnames has {len(classnames)} entries but there are {len(folder_names)} classes "
            f"(sorted folder names: {folder_names})"
        )
    return classnames


def folder_metric(y_true: np.ndarray, y_pred: np.ndarray, metadata: pd.DataFrame) -> dict:
    """Accuracy, macro-F1, macro recall; with a ``domain`` column also per-domain and worst-domain accuracy.

    Args:
        y_true: labels.
        y_pred: predictions.
        metadata: the split's metadata (``domain`` column optional).
    """
    from ..metrics import classification_metrics, group_accuracy

    results = classification_metrics(y_true, y_pred)
    if len(metadata) and "domain" in metadata.columns:
        per_domain = group_accuracy(y_true, y_pred, metadata["domain"].astype(str).to_numpy())
        results.update({f"acc_domain:{d}": acc for d, acc in per_domain.items()})
        results["acc_worst_domain"] = min(per_domain.values())
    return results


# --------------------------------------------------------------------------------------------------
# multi-domain folders, leave-one-domain-out
# --------------------------------------------------------------------------------------------------
DOMAINS_LAYOUT = "    root/<domain>/<class>/<image>   (at least two domains with the same class folders)"


def scan_domains(root: Path) -> dict[str, dict[str, list[str]]]:
    """``{domain: {class folder: sorted image paths}}`` for ``root/<domain>/<class>/<image>``.

    Raises:
        ValueError: fewer than two domains, domains with different class folders (the message
            names the classes each domain lacks), a domain/class without images, or a domain or
            class folder whose name is not valid UTF-8.
    """
    domains = {d.name: {c.name: list_images(c) for c in named_subfolders(d, "class")}
               for d in named_subfolders(root, "domain")}
    if len(domains) < 2:
        raise ValueError(f"{root} has {len(domains)} domain folder(s); leave-one-domain-out needs at least 2")
    all_classes = sorted(set().union(*domains.values()))
    lacking = {d: sorted(set(all_classes) - set(c)) for d, c in domains.items()}
    lacking = {d: missing for d, missing in lacking.items() if missing}
    if lacking:
        detail = "; ".join(f"{d} lacks {m}" for d, m in lacking.items())
        raise ValueError(f"domains under {root} disagree on the class folders: {detail}")
    empty = [f"{d}/{c}" for d, classes in domains.items() for c, paths in classes.items() if not paths]
    if empty:
        raise ValueError(f"class folders without images under {root}: {empty}; a class is a sub-folder with at "
                         "least one image file: add images or delete the empty folders")
    return domains


def _held_out(domains: Sequence[str], test_domains: Sequence[str] | str | None) -> list[str]:
    """The held-out domains: the given ones (validated) or, by default, the last alphabetically."""
    if test_domains is None:
        return [sorted(domains)[-1]]
    held = [test_domains] if isinstance(test_domains, str) else list(test_domains)
    unknown = [d for d in held if d not in domains]
    if unknown:
        raise ValueError(f"unknown test domain(s) {unknown}; domains: {', '.join(sorted(domains))}")
    if len(set(held)) >= len(domains):
        raise ValueError("every domain is held out; at least one must remain for training")
    return held


def split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """How many of ``n`` images go to (train, id_val, id_test); train keeps at least one.

    Each held-out count is ``round(n * fraction)``; when that would leave no training image, the
    held-out counts shrink (test first).
    """
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    while n_val + n_test >= n and n_val + n_test > 0:
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    return n - n_val - n_test, n_val, n_test


def _stratified_assignment(
    strata: list[tuple[str, int, list[str]]], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[tuple[str, int, str]]]:
    """Shuffle each (domain, class) stratum with a seeded generator and cut it into the three splits."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[tuple[str, int, str]]] = {"train": [], "id_val": [], "id_test": []}
    for domain, label, paths in strata:
        order = rng.permutation(len(paths))
        n_train, n_val, _ = split_counts(len(paths), val_fraction, test_fraction)
        for rank, i in enumerate(order):
            name = "train" if rank < n_train else "id_val" if rank < n_train + n_val else "id_test"
            parts[name].append((paths[i], label, domain))
    return parts


def _records_split(name: str, role: str, records: list[tuple[str, int, str]]) -> Split:
    records = sorted(records)
    paths = tuple(r[0] for r in records)
    meta = pd.DataFrame({"domain": [r[2] for r in records]})
    return Split(name, role, FileImages(paths), np.asarray([r[1] for r in records], dtype=np.int64), meta)


def load_domains(
    root: Path | None = None, *, test_domains: Sequence[str] | str | None = None, val_fraction: float = 0.2,
    test_fraction: float | None = None, seed: int = 0, classnames: Sequence[str] | None = None,
    templates: Sequence[str] | str | None = None,
) -> RFTDataset:
    """A multi-domain image collection, evaluated leave-one-domain-out.

    Args:
        root: folder with ``<domain>/<class>/<image>``.
        test_domains: domain(s) held out as OOD test splits ``test_<domain>``; default: the last
            domain in alphabetical order (e.g. ``sketch`` for PACS), so the default is stable.
        val_fraction: share of every (training domain, class) group that goes to ``id_val``.
        test_fraction: share that goes to ``id_test`` (default: ``val_fraction``).
        seed: seed of the random split; the same seed always gives the same splits.
        classnames: display names in the order of the sorted class folders (default: folder names
            with ``_`` as spaces).
        templates: prompt templates (default ``["a photo of a {}."]``).

    Returns:
        Splits ``train``, ``id_val``, ``id_test`` (pooled training domains) and one ``test_<d>``
        per held-out domain; metadata column ``domain``.

    Raises:
        DataNotFoundError: ``root`` is missing or unreadable.
        ValueError: inconsistent class folders, unknown test domains, bad fractions, empty splits.
    """
    test_fraction = val_fraction if test_fraction is None else test_fraction
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"need 0 <= val_fraction, test_fraction and their sum < 1; got {val_fraction}, {test_fraction}"
        )
    root = _check_root(root, "domains", DOMAINS_LAYOUT)
    domains = scan_domains(root)
    held = _held_out(list(domains), test_domains)
    class_names = sorted(next(iter(domains.values())))
    label_of = {c: i for i, c in enumerate(class_names)}
    strata = [(d, label_of[c], paths) for d, classes in sorted(domains.items()) if d not in held
              for c, paths in sorted(classes.items())]
    parts = _stratified_assignment(strata, val_fraction, test_fraction, seed)
    splits = {n: _records_split(n, "train" if n == "train" else "id", recs) for n, recs in parts.items()}
    for domain in held:
        recs = [(p, label_of[c], domain) for c, paths in domains[domain].items() for p in paths]
        splits[f"test_{domain}"] = _records_split(f"test_{domain}", "ood", recs)
    _refuse_empty(splits, hint="add images or raise val_fraction")
    return RFTDataset(
        name="domains", classnames=_display_names(class_names, classnames), templates=_templates(templates),
        splits=splits, metric_fn=folder_metric, primary_metric={"id": "accuracy", "ood": "accuracy"},
        root=root, info={"domains": sorted(domains), "test_domains": held, "seed": seed,
                         "val_fraction": val_fraction, "test_fraction": test_fraction,
                         "sizes": {n: len(s) for n, s in splits.items()}},
    )


def _refuse_empty(splits: Mapping[str, Split], hint: str) -> None:
    empty = [n for n, s in splits.items() if len(s) == 0]
    if empty:
        raise ValueError(f"split(s) {empty} would be empty; {hint}")


# --------------------------------------------------------------------------------------------------
# generic split folders or CSV
# --------------------------------------------------------------------------------------------------
FOLDER_LAYOUT = (
    "    root/<split>/<class>/<image>   (split names like train, id_val, id_test, val, test, openset)\n"
    "or a CSV passed as csv=... with columns path,label,split (+ optional metadata columns)"
)


def split_role(name: str, split_roles: Mapping[str, str] | None = None) -> str:
    """The role of a split name: the caller's mapping first, then WILDS-style naming, else ``id``.

    Raises:
        ValueError: ``split_roles`` maps to a role that does not exist.
    """
    if split_roles and name in split_roles:
        role = split_roles[name]
        if role not in ROLES:
            valid = ", ".join(ROLES)
            raise ValueError(f"split_roles maps {name!r} to unknown role {role!r}; valid roles: {valid}")
        return role
    if name == "train":
        return "train"
    if name == "openset":
        return "openset"
    if name.startswith("id_"):
        return "id"
    if name in ("val", "test") or name.startswith(("ood", "test_")):
        return "ood"
    log.info("split %r: no role from its name; treating it as in-distribution (role 'id')", name)
    return "id"


def _check_split_roles(split_roles: Mapping[str, str] | None, names: Sequence[str]) -> None:
    unknown = sorted(set(split_roles or {}) - set(names))
    if unknown:
        raise ValueError(f"split_roles names split(s) {unknown} that do not exist; splits: {list(names)}")


def load_folder(
    root: Path | None = None, *, csv: str | Path | None = None, classnames: Sequence[str] | None = None,
    templates: Sequence[str] | str | None = None, split_roles: Mapping[str, str] | None = None,
) -> RFTDataset:
    """A user's own split data, from ``root/<split>/<class>/<image>`` folders or from a CSV.

    Args:
        root: the folder with one sub-folder per split (folder mode), or, with ``csv``, an optional
            base for a relative ``csv`` path.
        csv: a CSV with columns ``path`` (relative paths are relative to the CSV's folder),
            ``label`` (class index, or class name) and ``split``; other columns become metadata.
        classnames: display names in label order. Folder mode: one per sorted class folder. CSV
            mode: required for integer labels (else generic names are used); for name labels it
            fixes the label order (default: sorted names).
        templates: prompt templates (default ``["a photo of a {}."]``).
        split_roles: ``{split name: role}`` overriding the name-based roles.

    Raises:
        DataNotFoundError: the root or CSV is missing or unreadable.
        ValueError: missing CSV columns, empty splits, bad roles, inconsistent class names.
    """
    if csv is not None:
        return _load_csv(_csv_path(csv, root), classnames, templates, split_roles)
    root = _check_root(root, "folder", FOLDER_LAYOUT)
    split_dirs = named_subfolders(root, "split")
    if not split_dirs:
        raise ValueError(f"{display_path(root)} has no split folders; expected:\n{FOLDER_LAYOUT}")
    names = [d.name for d in split_dirs]
    _check_split_roles(split_roles, names)
    roles = {n: split_role(n, split_roles) for n in names}
    tree = {d: {c: list_images(c) for c in named_subfolders(d, "class")} for d in split_dirs}
    _refuse_empty_class_folders(root, tree)
    known = [d for d in split_dirs if roles[d.name] != "openset"]
    folder_names = sorted({c.name for d in known for c in tree[d]})
    if not folder_names:
        raise ValueError(f"no class folders found in the splits under {display_path(root)}")
    label_of = {c: i for i, c in enumerate(folder_names)}
    splits = {d.name: _folder_split(d, roles[d.name], tree[d], label_of) for d in split_dirs}
    return _dataset("folder", root, _display_names(folder_names, classnames), templates, splits)


def _refuse_empty_class_folders(root: Path, tree: Mapping[Path, Mapping[Path, list[str]]]) -> None:
    """Refuse class folders without image files (they would silently become classes)."""
    empty = [f"{d.name}/{c.name}" for d, classes in tree.items() for c, images in classes.items() if not images]
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise ValueError(
            f"class folder(s) without image files under {display_path(root)}: {shown}. Classes come from "
            "sub-folders with at least one image (a split may simply lack a class's folder): add images or "
            "delete the empty folders"
        )


def _folder_split(split_dir: Path, role: str, classes: Mapping[Path, list[str]], label_of: Mapping[str, int]) -> Split:
    """One split folder; open-set splits get label -1 and keep their class folder in the metadata."""
    paths, labels, folders = [], [], []
    for class_dir, images in classes.items():
        label = OPENSET_LABEL if role == "openset" else label_of[class_dir.name]
        paths += images
        labels += [label] * len(images)
        folders += [class_dir.name] * len(images)
    if not paths:
        raise ValueError(f"split {split_dir.name!r} is empty: no images in {display_path(split_dir)}/<class>/")
    meta = pd.DataFrame({"class_folder": folders})
    return Split(split_dir.name, role, FileImages(tuple(paths)), np.asarray(labels, dtype=np.int64), meta)


def _csv_path(csv: str | Path, root: Path | None) -> Path:
    path = Path(csv).expanduser()
    if not path.is_absolute() and not path.exists() and root is not None:
        path = Path(root) / path
    if not path.is_file():
        raise DataNotFoundError(f"CSV {path} does not exist; expected:\n{FOLDER_LAYOUT}")
    return path


def _load_csv(
    path: Path, classnames: Sequence[str] | None, templates: Sequence[str] | str | None,
    split_roles: Mapping[str, str] | None,
) -> RFTDataset:
    table = _read_csv_table(path)
    if table[list(CSV_COLUMNS)].isna().any().any():
        bad_rows = table.index[table[list(CSV_COLUMNS)].isna().any(axis=1)].tolist()
        raise ValueError(f"CSV {path} has empty path/label/split values in row(s) {bad_rows[:10]}")
    table["split"] = table["split"].astype(str)
    names = list(dict.fromkeys(table["split"]))
    _check_split_roles(split_roles, names)
    roles = {n: split_role(n, split_roles) for n in names}
    labels, names_in_order = _csv_labels(table, roles, classnames, path)
    table["path"] = [str((path.parent / p).resolve()) for p in table["path"].astype(str)]
    extra = [c for c in table.columns if c not in CSV_COLUMNS]
    splits = {}
    for name in names:
        rows = np.flatnonzero(table["split"].to_numpy() == name)
        meta = table.iloc[rows][extra].reset_index(drop=True)
        images = FileImages(tuple(table["path"].to_numpy()[rows]))
        splits[name] = Split(name, roles[name], images, labels[rows], meta)
    return _dataset("folder", path.parent, names_in_order, templates, splits, csv=str(path))


CSV_HEADER_HINT = ("the first line must be the header path,label,split (+ optional metadata columns), "
                   "then one row per image")


def _read_csv_table(path: Path) -> pd.DataFrame:
    """The CSV's rows, checked for a header with the needed columns, at least one row, and UTF-8
    labels and split names (paths keep undecodable bytes as they are, like file names)."""
    shown = display_path(path)
    try:
        table = pd.read_csv(path, encoding_errors="surrogateescape")
    except pd.errors.EmptyDataError as err:
        raise ValueError(f"CSV {shown} is empty; {CSV_HEADER_HINT}") from err
    except (OSError, ValueError) as err:
        raise DataNotFoundError(f"cannot read CSV {shown}: {err}") from err
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in CSV_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"CSV {shown} lacks column(s) {missing}; it has {list(table.columns)[:10]}; "
                         f"{CSV_HEADER_HINT}")
    if table.empty:
        raise ValueError(f"CSV {shown} has a header but no rows; {CSV_HEADER_HINT}")
    for column in ("label", "split"):
        bad = [i for i, v in enumerate(table[column]) if isinstance(v, str) and not is_utf8(v)]
        if bad:
            raise ValueError(f"CSV {shown}: column {column!r} is not valid UTF-8 in row(s) {bad[:10]} "
                             "(0 = first row after the header); save the CSV as UTF-8")
    return table


def _csv_labels(
    table: pd.DataFrame, roles: Mapping[str, str], classnames: Sequence[str] | None, path: Path
) -> tuple[np.ndarray, list[str]]:
    """Integer labels for every row (-1 for open-set rows) and the class names in label order."""
    openset = table["split"].map(roles).eq("openset").to_numpy()
    raw = table["label"]
    numeric = pd.to_numeric(raw, errors="coerce")
    if numeric.notna().all() and (numeric == numeric.round()).all():
        labels = numeric.to_numpy().astype(np.int64)
        n_classes = int(labels[~openset].max()) + 1 if (~openset).any() else 0
        if labels[~openset].min(initial=0) < 0:
            raise ValueError(f"CSV {path}: negative labels outside the openset split")
        if classnames is None:
            log.warning("CSV %s has integer labels and no classnames were given; using 'class <i>'", path)
            names = [f"class {i}" for i in range(n_classes)]
        else:
            names = list(classnames)
            if n_classes > len(names):
                raise ValueError(f"CSV {path}: label {n_classes - 1} but only {len(names)} classnames")
    else:
        text = raw.astype(str).to_numpy()
        names = list(classnames) if classnames is not None else sorted(set(text[~openset]))
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(text[~openset]) - set(index))
        if unknown:
            raise ValueError(f"CSV {path}: labels {unknown[:10]} are not among the classnames {names[:10]}")
        labels = np.asarray([index.get(t, OPENSET_LABEL) for t in text], dtype=np.int64)
    labels[openset] = OPENSET_LABEL
    return labels, names


def _dataset(
    name: str, root: Path, classnames: list[str], templates: Sequence[str] | str | None,
    splits: dict[str, Split], **info,
) -> RFTDataset:
    _refuse_empty(splits, hint="every split needs at least one image")
    return RFTDataset(
        name=name, classnames=classnames, templates=_templates(templates), splits=splits,
        metric_fn=folder_metric, primary_metric={"id": "accuracy", "ood": "accuracy"}, root=root,
        info={"sizes": {n: len(s) for n, s in splits.items()}, **info},
    )
