"""``get_dataset("synthwild")``: the embedded world as an :class:`~rftlib.data.base.RFTDataset`.

The world is generated on first use and cached on disk under ``$RFT_CACHE_DIR/synthwild``
(default ``~/.cache/rftlib/synthwild``; or ``<root>/synthwild`` when ``root`` is given), keyed by
a hash of the full :class:`WorldConfig` and the generator version, as plain ``.npz`` arrays (no
pickles). Within a process the same configuration returns the same arrays, so decoded-image caches
are shared across calls.

Splits follow WILDS: ``train``, ``id_val``, ``id_test`` (ID cameras), ``val``, ``test`` (OOD
cameras), plus ``openset`` (held-out species, label -1) for open-set detection. The official
metric is iWildCam's macro-F1 over the classes present in the split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from ..base import ArrayImages, RFTDataset, Split
from .captions import default_templates
from .world import SPLIT_ROLES, WorldConfig, build_world, generate_synthwild

log = logging.getLogger(__name__)
GENERATOR_VERSION = 2  # bump when the generator's output changes, to invalidate caches


def cache_root(root: Path | None = None) -> Path:
    if root is not None:
        return Path(root) / "synthwild"
    base = os.environ.get("RFT_CACHE_DIR") or Path.home() / ".cache" / "rftlib"
    return Path(base) / "synthwild"


def config_key(cfg: WorldConfig) -> str:
    text = json.dumps({"v": GENERATOR_VERSION, **asdict(cfg)}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _frame_to_arrays(meta: pd.DataFrame) -> dict[str, np.ndarray]:
    out = {}
    for col in meta.columns:
        values = meta[col]
        if pd.api.types.is_datetime64_any_dtype(values):
            out[f"meta_dt:{col}"] = values.to_numpy(dtype="datetime64[ns]").astype(np.int64)
        elif pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
            out[f"meta:{col}"] = values.to_numpy()
        else:
            out[f"meta_str:{col}"] = values.astype(str).to_numpy(dtype=str)
    return out


def _arrays_to_frame(arrays: dict[str, np.ndarray]) -> pd.DataFrame:
    cols = {}
    for key, arr in arrays.items():
        kind, _, col = key.partition(":")
        if kind == "meta_dt":
            cols[col] = pd.to_datetime(arr.astype("datetime64[ns]"))
        elif kind in ("meta", "meta_str"):
            cols[col] = arr
    return pd.DataFrame(cols)


def _save(folder: Path, splits: dict) -> None:
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, (images, labels, meta) in splits.items():
        np.savez(tmp / f"{name}.npz", images=images, labels=labels, **_frame_to_arrays(meta))
    try:
        tmp.rename(folder)
    except OSError:  # another process cached it first
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()


def _load(folder: Path, names) -> dict:
    out = {}
    for name in names:
        with np.load(folder / f"{name}.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        out[name] = (arrays.pop("images"), arrays.pop("labels"), _arrays_to_frame(arrays))
    return out


@lru_cache(maxsize=4)
def _splits_for(cfg: WorldConfig, folder: Path | None) -> dict:
    names = list(cfg.split_sizes())
    if folder is not None and folder.exists():
        return _load(folder, names)
    start = time.time()
    splits = generate_synthwild(cfg)
    log.info("generated synthwild %s in %.1f s", config_key(cfg), time.time() - start)
    if folder is not None:
        _save(folder, splits)
    return splits


def load_synthwild(root: Path | None = None, *, seed: int = 0, size: str | int = "default", cache: bool = True,
                   **world_options) -> RFTDataset:
    """The synthwild dataset.

    Args:
        root: cache folder parent (default: ``$RFT_CACHE_DIR`` or ``~/.cache/rftlib``).
        seed: world seed (species, cameras and every split derive from it).
        size: ``"tiny"``, ``"small"``, ``"default"``, ``"large"`` or a train-set size.
        cache: keep generated arrays on disk.
        **world_options: any other :class:`WorldConfig` field (``rho``, ``ood_severity``, ...).
    """
    from ...metrics import wilds_iwildcam_metrics

    try:
        cfg = WorldConfig(seed=seed, size=size, **world_options)
    except TypeError as err:
        valid = ", ".join(f for f in WorldConfig.__dataclass_fields__ if f not in ("seed", "size"))
        raise TypeError(f"{err}; valid synthwild options: {valid}") from None
    world = build_world(cfg)
    folder = cache_root(root) / config_key(cfg) if cache else None
    splits = {
        name: Split(name, SPLIT_ROLES[name], ArrayImages(images), labels, meta)
        for name, (images, labels, meta) in _splits_for(cfg, folder).items()
    }
    return RFTDataset(
        name="synthwild", classnames=world.classnames, templates=default_templates(), splits=splits,
        metric_fn=wilds_iwildcam_metrics, primary_metric={"id": "macro_f1", "ood": "macro_f1"},
        descriptions=world.descriptions, root=folder,
        info={"config": asdict(cfg), "heldout_species": [s.name for s in world.heldout_species],
              "description_variants": world.description_variants},
    )
