"""The bad-input matrix: every damaged or surprising input rftlib reads gives a clear error naming the
file (or, where documented, works or is skipped and counted), and nothing is written or corrupted.

Each row of ``CASES``: an id, how to build the input in an empty folder, the call, the expected
exception type and a fragment of its message (``None``: the call must succeed, and ``check`` looks at
its result). After every call the input folder must hold exactly the bytes it held before.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from rftlib import atomic
from rftlib.atomic import DiskFullError, remove_stale_temporaries, write_atomically, write_text_atomically
from rftlib.data import DataNotFoundError, ImageReadError, get_dataset
from rftlib.data.images import read_image
from rftlib.data.loading import LoaderSettings
from rftlib.data.pipeline import decode_split
from rftlib.data.views import FileReader, Request, ViewDataset
from rftlib.models import load_checkpoint, load_classifier, load_clip, save_checkpoint
from rftlib.models.checkpoint import load_train_state, read_latest
from rftlib.models.loading import WeightsRefusedError
from rftlib.models.sidecar import CorruptCheckpointError

from .helpers import tiny_clip

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # each bomb warns, then fails

# PIL's limit is global state that libraries change on import (WILDS' FMoW module lifts it), so the
# bomb messages say "W x H = N pixels" (rftlib's check) or "N pixels" (PIL's own, in its open)
BAD = b"caf\xe9-\xff"  # not UTF-8 (Latin-1 "cafe" with an accent, then a stray byte)


# --------------------------------------------------------------------------------------------------
# builders: tiny files in the case's folder
# --------------------------------------------------------------------------------------------------
def png(path: str | bytes | Path, value: int = 0) -> None:
    """An 8 x 8 PNG at ``path`` (bytes paths may hold any file name)."""
    folder = os.path.dirname(os.fsencode(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "wb") as handle:
        Image.new("RGB", (8, 8), (value, 40, 200)).save(handle, format="PNG")


def write_bytes(path: bytes, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def bytes_path(folder: Path, *parts: bytes) -> bytes:
    return os.path.join(os.fsencode(folder), *parts)


def folder_tree(src: Path, classes=("cat", "dog"), splits=("train", "test")) -> Path:
    for split in splits:
        for k, name in enumerate(classes):
            for i in range(2):
                png(src / split / name / f"{i}.png", 60 * k + i)
    return src


def domains_tree(src: Path, domains=("photo", "sketch")) -> Path:
    return folder_tree(src, splits=domains)


def csv_file(src: Path, data: bytes) -> Path:
    (src / "data.csv").write_bytes(data)
    return src / "data.csv"


def png_bomb(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header declares ``width x height`` (its pixel data is truncated)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


def jpeg_bomb(width: int, height: int) -> bytes:
    """A small JPEG whose frame header is patched to declare ``width x height``."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bomb_and_good_image(src: Path) -> list[str]:
    """A good image and a 10k x 10k bomb, as the paths of one batch."""
    (src / "bomb.png").write_bytes(png_bomb(10_000, 10_000))
    png(src / "ok.png")
    return [str(src / "ok.png"), str(src / "bomb.png")]


@functools.cache
def tiny_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_clip().model.state_dict().items()}


def weights_file(src: Path, change: Callable[[dict], None] = lambda s: None, suffix: str = ".safetensors") -> Path:
    """The tiny CLIP's state dict, changed by ``change``, as a plain weights file."""
    state = dict(tiny_state())
    change(state)
    path = src / f"weights{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    return path


def checkpoint(src: Path, change: Callable[[dict], None] | None = None, name: str = "ckpt-00000004") -> Path:
    """An rftlib checkpoint (weights + sidecar) of the tiny CLIP; ``change`` rewrites its tensors."""
    path = save_checkpoint(src / name, tiny_state(), clip=tiny_clip(), classnames=["a", "b"])
    if change is not None:
        state = dict(tiny_state())
        change(state)
        save_file(state, str(path))
    return path


def run_folder(src: Path, steps=(2, 4)) -> Path:
    """A run folder: a checkpoint pair per step and ``latest.json`` naming the last."""
    for step in steps:
        checkpoint(src, name=f"ckpt-{step:08d}")
        torch.save({"step": step, "optimizer": {}, "history": []}, src / f"state-{step:08d}.pt")
    (src / "latest.json").write_text(json.dumps({"step": steps[-1], "weights": f"ckpt-{steps[-1]:08d}.safetensors",
                                                 "state": f"state-{steps[-1]:08d}.pt"}))
    return src


def truncate(path: Path, keep: float | int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)] if isinstance(keep, float) else data[:keep])
    return path


def nan_all(state: dict) -> None:
    for k, v in state.items():
        state[k] = torch.full_like(v, float("nan"))


def inf_one(state: dict) -> None:
    key = "visual.conv1.weight"
    state[key] = state[key].clone()
    state[key].view(-1)[3] = float("inf")


def as_int64(state: dict) -> None:
    state["logit_scale"] = state["logit_scale"].round().to(torch.int64)


def as_bool(state: dict) -> None:
    state["visual.conv1.weight"] = state["visual.conv1.weight"] > 0


# --------------------------------------------------------------------------------------------------
# calls
# --------------------------------------------------------------------------------------------------
def decode_all(dataset, cache: bool) -> dict[str, int]:
    """Decode every split (through the on-disk cache or straight into memory): {split: images}."""
    settings = LoaderSettings(eval_cache=cache, workers=0)
    return {n: len(decode_split(dataset.split(n), 8, settings=settings, progress_mode="off")) for n in dataset.splits}


def load_and_decode(**kwargs) -> dict[str, int]:
    dataset = get_dataset(kwargs.pop("name", "folder"), **kwargs)
    return {"cached": decode_all(dataset, cache=True), "in_memory": decode_all(dataset, cache=False),
            "paths": [p for n in dataset.splits for p in dataset.split(n).images.paths]}


def training_batch(paths: list, skip: bool) -> dict:
    """One training batch (step 0) of 8-px views of ``paths`` with the bad-image policy ``skip``."""
    data = ViewDataset(FileReader(tuple(paths)), 8, skip_bad=skip)
    n = len(paths)
    return data[Request(np.arange(n), step=0, positions=np.arange(n))]


def evaluation_batch(paths: list) -> dict:
    return ViewDataset(FileReader(tuple(paths)), 8, skip_bad=True)[Request(np.arange(len(paths)))]


def fail_with(exc: BaseException) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half of a new file")  # what a full disk leaves: a partial temporary
        raise exc
    return write


def torch_save_on_full_disk(folder: Path, monkeypatch) -> Path:
    """``torch.save`` failing as it does on a full disk (no errno, "unexpected pos"), with no space left."""
    def save(obj, tmp):
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: type("U", (), {"free": 4096})())
    return write_atomically(folder / "state-00000004.pt", lambda tmp: save({}, tmp))


# --------------------------------------------------------------------------------------------------
# the matrix
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path], Any]          # writes the input under the case's folder; returns what ``call`` needs
    call: Callable[[Any, Any], Any]       # (built, monkeypatch) -> result
    error: type[BaseException] | None     # None: must succeed
    fragment: str = ""                    # regex searched in the message; "{src}" = the case's folder
    check: Callable[[Any, Any], None] | None = None  # (result, built) for the cases that succeed


def _check_nonutf8_file(result, src: Path) -> None:
    assert result["cached"] == result["in_memory"] == {"test": 4, "train": 5}
    assert os.fsdecode(bytes_path(src, b"train", b"cat", BAD + b".png")) in result["paths"]


def _check_skipped(batch, built) -> None:
    assert len(batch["images"]) == 1 and len(batch["skipped"]) == 1
    assert "bomb.png" in batch["skipped"][0] and "decompression bomb" in batch["skipped"][0]


CASES = [
    # -- folder datasets -------------------------------------------------------------------------
    Case("folder: image file name not UTF-8 -> loads, decodes, caches",
         lambda s: (folder_tree(s), png(bytes_path(s, b"train", b"cat", BAD + b".png")), s)[-1],
         lambda s, mp: load_and_decode(root=s), None, check=_check_nonutf8_file),
    Case("folder: split folder name not UTF-8",
         lambda s: (folder_tree(s), png(bytes_path(s, b"test_" + BAD, b"cat", b"0.png")), s)[-1],
         lambda s, mp: get_dataset("folder", root=s), ValueError,
         r"split folder name\(s\) b'test_caf\\xe9-\\xff' in {src} are not valid UTF-8; .*rename"),
    Case("folder: class folder name not UTF-8",
         lambda s: (folder_tree(s), png(bytes_path(s, b"train", BAD, b"0.png")), s)[-1],
         lambda s, mp: get_dataset("folder", root=s), ValueError,
         r"class folder name\(s\) b'caf\\xe9-\\xff' in {src}/train"),
    Case("domains: domain folder name not UTF-8",
         lambda s: (domains_tree(s), folder_tree(s, splits=(os.fsdecode(BAD),)), s)[-1],
         lambda s, mp: get_dataset("domains", root=s), ValueError,
         r"domain folder name\(s\) b'caf\\xe9-\\xff' in {src} "),
    Case("folder: empty class folder",
         lambda s: (folder_tree(s), (s / "train" / "zebra").mkdir(), s)[-1],
         lambda s, mp: get_dataset("folder", root=s), ValueError,
         r"class folder\(s\) without image files under {src}: train/zebra\. Classes come from sub-folders with at "
         r"least one image"),
    Case("folder: class folder with no image files (only a .txt)",
         lambda s: (folder_tree(s), (s / "test" / "zebra").mkdir(),
                    (s / "test" / "zebra" / "notes.txt").write_text("x"), s)[-1],
         lambda s, mp: get_dataset("folder", root=s), ValueError, r"without image files under {src}: test/zebra"),
    Case("domains: empty class folder in every domain",
         lambda s: (domains_tree(s), (s / "photo" / "zebra").mkdir(), (s / "sketch" / "zebra").mkdir(), s)[-1],
         lambda s, mp: get_dataset("domains", root=s), ValueError,
         r"class folders without images under {src}: \['photo/zebra', 'sketch/zebra'\]; a class is a sub-folder"),
    Case("csv: empty file",
         lambda s: csv_file(s, b""), lambda p, mp: get_dataset("folder", csv=p), ValueError,
         r"CSV {src}/data.csv is empty; the first line must be the header path,label,split"),
    Case("csv: header but no rows",
         lambda s: csv_file(s, b"path,label,split\n"), lambda p, mp: get_dataset("folder", csv=p), ValueError,
         r"CSV {src}/data.csv has a header but no rows"),
    Case("csv: a column missing",
         lambda s: csv_file(s, b"path,label\na.png,0\n"), lambda p, mp: get_dataset("folder", csv=p), ValueError,
         r"CSV {src}/data.csv lacks column\(s\) \['split'\]; .*header path,label,split"),
    Case("csv: no header line (first row is data)",
         lambda s: csv_file(s, b"a.png,0,train\nb.png,1,train\n"), lambda p, mp: get_dataset("folder", csv=p),
         ValueError, r"lacks column\(s\) \['path', 'label', 'split'\]; it has \['a.png', '0', 'train'\]"),
    Case("csv: a label that is not UTF-8",
         lambda s: csv_file(s, b"path,label,split\na.png,cat,train\nb.png," + BAD + b",train\n"),
         lambda p, mp: get_dataset("folder", csv=p), ValueError,
         r"CSV {src}/data.csv: column 'label' is not valid UTF-8 in row\(s\) \[1\]"),
    Case("csv: a path that is not UTF-8 -> loads and decodes",
         lambda s: (png(bytes_path(s, BAD + b".png")), png(s / "b.png"),
                    csv_file(s, b"path,label,split\n" + BAD + b".png,cat,train\nb.png,dog,train\n"))[-1],
         lambda p, mp: load_and_decode(csv=p), None,
         check=lambda r, p: r["cached"] == r["in_memory"] == {"train": 2} or pytest.fail(str(r))),
    Case("csv: missing file", lambda s: s / "absent.csv", lambda p, mp: get_dataset("folder", csv=p),
         DataNotFoundError, r"CSV {src}/absent.csv does not exist"),
    Case("folder: an unreadable image whose name is not UTF-8 is named when decoded",
         lambda s: (folder_tree(s), write_bytes(bytes_path(s, b"test", b"cat", BAD + b".png"), b"not a png"), s)[-1],
         lambda s, mp: load_and_decode(root=s), ImageReadError,
         r"cannot read image '{src}/test/cat/caf\\udce9-\\udcff.png'"),
    # -- images ----------------------------------------------------------------------------------
    Case("image: PNG declaring 100k x 100k (PIL's bomb limit)",
         lambda s: (s / "bomb.png").write_bytes(png_bomb(100_000, 100_000)) and s / "bomb.png",
         lambda p, mp: read_image(str(p)), ImageReadError,
         r"cannot read image '{src}/bomb.png': it declares (100000 x 100000 = )?10,000,000,000 pixels, over the limit "
         r".*decompression bomb"),
    Case("image: PNG declaring 10k x 10k (over MAX_IMAGE_PIXELS; libpng would return garbage)",
         lambda s: (s / "bomb.png").write_bytes(png_bomb(10_000, 10_000)) and s / "bomb.png",
         lambda p, mp: read_image(str(p)), ImageReadError,
         r"'{src}/bomb.png': it declares 10000 x 10000 = 100,000,000"),
    Case("image: JPEG declaring 16k x 16k (libjpeg crashed the process)",
         lambda s: (s / "bomb.jpg").write_bytes(jpeg_bomb(16_000, 16_000)) and s / "bomb.jpg",
         lambda p, mp: read_image(str(p)), ImageReadError,
         r"'{src}/bomb.jpg': it declares (16000 x 16000 = )?256,000,000 pixels"),
    Case("image: PIL's global limit lifted by another library (WILDS' FMoW) -> still refused",
         lambda s: (s / "bomb.png").write_bytes(png_bomb(100_000, 100_000)) and s / "bomb.png",
         lambda p, mp: (mp.setattr(Image, "MAX_IMAGE_PIXELS", 10_000_000_000), read_image(str(p)))[-1],
         ImageReadError, r"'{src}/bomb.png': it declares 100000 x 100000 = 10,000,000,000 pixels, over the limit of "
         r"89,478,485"),
    Case("image: RFT_MAX_IMAGE_PIXELS=5000 refuses a real 100 x 100 image",
         lambda s: Image.new("RGB", (100, 100)).save(s / "big.png") or s / "big.png",
         lambda p, mp: (mp.setenv("RFT_MAX_IMAGE_PIXELS", "5000"), read_image(str(p)))[-1], ImageReadError,
         r"'{src}/big.png': it declares 100 x 100 = 10,000 pixels, over the limit of 5,000 pixels.*"
         r"RFT_MAX_IMAGE_PIXELS=<pixels> \(0: no limit\)"),
    Case("image: RFT_MAX_IMAGE_PIXELS=20000 admits it",
         lambda s: Image.new("RGB", (100, 100)).save(s / "big.png") or s / "big.png",
         lambda p, mp: (mp.setenv("RFT_MAX_IMAGE_PIXELS", "20000"), read_image(str(p)))[-1], None,
         check=lambda image, p: image.shape == (3, 100, 100) or pytest.fail(str(image.shape))),
    Case("image: bomb in a training batch, on_bad_image=skip -> skipped and counted",
         bomb_and_good_image,
         lambda paths, mp: training_batch(paths, skip=True), None, check=_check_skipped),
    Case("image: bomb in a training batch, on_bad_image=raise",
         bomb_and_good_image,
         lambda paths, mp: training_batch(paths, skip=False), ImageReadError, r"'{src}/bomb.png'.*decompression bomb"),
    Case("image: bomb in an evaluation batch (never skipped)",
         bomb_and_good_image,
         lambda paths, mp: evaluation_batch(paths), ImageReadError, r"'{src}/bomb.png'"),
    # -- weights ---------------------------------------------------------------------------------
    Case("weights: int64 tensor in a .safetensors file (load_clip)",
         lambda s: weights_file(s, as_int64), lambda p, mp: load_clip("rft-tiny", str(p)), WeightsRefusedError,
         r"{src}/weights.safetensors: tensor 'logit_scale' is int64 where the model has floating-point weights; .*"
         r"allow_dtype_cast=True"),
    Case("weights: int64 tensor, allow_dtype_cast=True -> loads (cast)",
         lambda s: weights_file(s, as_int64), lambda p, mp: load_clip("rft-tiny", str(p), allow_dtype_cast=True), None,
         check=lambda clip, p: clip.model.logit_scale.dtype == torch.float32 or pytest.fail("not cast")),
    Case("weights: bool tensor in a .pt file (load_clip)",
         lambda s: weights_file(s, as_bool, ".pt"), lambda p, mp: load_clip("rft-tiny", str(p)), WeightsRefusedError,
         r"{src}/weights.pt: tensor 'visual.conv1.weight' is bool"),
    Case("weights: all-NaN file (load_clip)",
         lambda s: weights_file(s, nan_all), lambda p, mp: load_clip("rft-tiny", str(p)), WeightsRefusedError,
         r"{src}/weights.safetensors: tensor '[\w.]+' has \d+ non-finite value\(s\) \(NaN/inf\) of \d+ \(and 61 more "
         r"tensor\(s\) like it\); .*allow_nonfinite=True"),
    Case("weights: all-NaN, allow_nonfinite=True -> loads",
         lambda s: weights_file(s, nan_all), lambda p, mp: load_clip("rft-tiny", str(p), allow_nonfinite=True), None,
         check=lambda clip, p: bool(clip.model.logit_scale.isnan()) or pytest.fail("not loaded")),
    Case("weights: one inf in a checkpoint (load_checkpoint)",
         lambda s: checkpoint(s, inf_one), lambda p, mp: load_checkpoint(p), WeightsRefusedError,
         r"{src}/ckpt-00000004.safetensors: tensor 'visual.conv1.weight' has 1 non-finite value\(s\)"),
    Case("weights: all-NaN checkpoint (load_classifier)",
         lambda s: checkpoint(s, nan_all), lambda p, mp: load_classifier(p), WeightsRefusedError,
         r"{src}/ckpt-00000004.safetensors: tensor .* non-finite"),
    Case("weights: bool tensor in a checkpoint (load_checkpoint)",
         lambda s: checkpoint(s, as_bool), lambda p, mp: load_checkpoint(p), WeightsRefusedError,
         r"ckpt-00000004.safetensors: tensor 'visual.conv1.weight' is bool"),
    # -- checkpoints, sidecars, latest.json, training state ---------------------------------------
    Case("checkpoint: truncated .safetensors",
         lambda s: truncate(checkpoint(s), 0.5), lambda p, mp: load_checkpoint(p), CorruptCheckpointError,
         r"weights file {src}/ckpt-00000004.safetensors is truncated or not a safetensors file .*delete "
         r"ckpt-00000004.safetensors and ckpt-00000004.json"),
    Case("checkpoint: empty .safetensors (load_clip)",
         lambda s: truncate(checkpoint(s), 0), lambda p, mp: load_clip("rft-tiny", str(p)), CorruptCheckpointError,
         r"weights file {src}/ckpt-00000004.safetensors is empty"),
    Case("checkpoint: plain weights file truncated (no sidecar)",
         lambda s: truncate(weights_file(s), 0.3), lambda p, mp: load_clip("rft-tiny", str(p)), CorruptCheckpointError,
         r"weights file {src}/weights.safetensors is truncated .*restore or download it again"),
    Case("sidecar: truncated JSON",
         lambda s: (truncate(checkpoint(s).with_suffix(".json"), 0.5), s / "ckpt-00000004.safetensors")[-1],
         lambda p, mp: load_checkpoint(p), CorruptCheckpointError,
         r"checkpoint sidecar {src}/ckpt-00000004.json is not valid JSON"),
    Case("sidecar: empty (load_classifier)",
         lambda s: (truncate(checkpoint(s).with_suffix(".json"), 0), s / "ckpt-00000004.safetensors")[-1],
         lambda p, mp: load_classifier(p), CorruptCheckpointError,
         r"checkpoint sidecar {src}/ckpt-00000004.json is empty"),
    Case("latest.json: empty",
         lambda s: (run_folder(s), (s / "latest.json").write_text(""), s)[-1], lambda s, mp: read_latest(s),
         CorruptCheckpointError,
         r'{src}/latest.json is empty; to resume from the newest complete checkpoint \(step 4\), write '
         r'\{"step": 4, "weights": "ckpt-00000004.safetensors", "state": "state-00000004.pt"\} into {src}/latest.json; '
         r"or delete the folder {src} to start over"),
    Case("latest.json: truncated",
         lambda s: (truncate(run_folder(s) / "latest.json", 0.5), s)[-1], lambda s, mp: read_latest(s),
         CorruptCheckpointError, r"{src}/latest.json is truncated or not JSON"),
    Case("latest.json: names a deleted checkpoint -> previous one",
         lambda s: (run_folder(s), (s / "ckpt-00000004.safetensors").unlink(), s)[-1], lambda s, mp: read_latest(s),
         CorruptCheckpointError, r"latest.json names ckpt-00000004.safetensors, which {src} lacks; .*\(step 2\)"),
    Case("latest.json: no checkpoint left",
         lambda s: (s / "latest.json").write_text("{}") and s, lambda s, mp: read_latest(s), CorruptCheckpointError,
         r"does not name a checkpoint .*no complete checkpoint is left in {src}: delete {src}/latest.json"),
    Case("latest.json: empty, and the newest checkpoint truncated -> the one before",
         lambda s: (run_folder(s), truncate(s / "ckpt-00000004.safetensors", 0.5), (s / "latest.json").write_text(""),
                    s)[-1],
         lambda s, mp: read_latest(s), CorruptCheckpointError,
         r'latest.json is empty; to resume from the newest complete checkpoint \(step 2\), write \{"step": 2, '),
    Case("training state: truncated .pt",
         lambda s: truncate(run_folder(s) / "state-00000004.pt", 0.5), lambda p, mp: load_train_state(p),
         CorruptCheckpointError,
         r"training state {src}/state-00000004.pt is truncated or damaged .*newest complete checkpoint \(step 2\)"),
    Case("training state: empty .pt",
         lambda s: truncate(run_folder(s) / "state-00000004.pt", 0), lambda p, mp: load_train_state(p),
         CorruptCheckpointError, r"training state {src}/state-00000004.pt is empty"),
    # -- writes ----------------------------------------------------------------------------------
    Case("disk full (ENOSPC) during an atomic write",
         lambda s: (s / "latest.json").write_text("previous") and s,
         lambda s, mp: write_atomically(s / "latest.json", fail_with(OSError(errno.ENOSPC, "No space left on device"))),
         DiskFullError,
         r"no space left in {src} while writing latest.json .*previous latest.json, if any, is unchanged"),
    Case("disk full (quota, EDQUOT) during a text write",
         lambda s: (s / "ckpt.json").write_text("previous") and s,
         lambda s, mp: (mp.setattr(Path, "write_text", lambda tmp, *a, **k: fail_with(
                            OSError(errno.EDQUOT, "Disk quota exceeded"))(tmp)),
                        write_text_atomically(s / "ckpt.json", "new"))[-1],
         DiskFullError, r"no space left in {src} while writing ckpt.json"),
    Case("disk full during torch.save (no errno; device has no space left)",
         lambda s: s, lambda s, mp: torch_save_on_full_disk(s, mp), DiskFullError,
         r"no space left in {src} while writing state-00000004.pt \(RuntimeError: .*unexpected pos"),
    Case("a write that fails for another reason is not called disk full",
         lambda s: s, lambda s, mp: write_atomically(s / "x.json", fail_with(PermissionError(errno.EACCES, "denied"))),
         PermissionError, r"denied"),
]


def snapshot(folder: Path) -> dict[bytes, str]:
    """Every file below ``folder`` (any name) and a digest of its bytes."""
    found = {}
    for dirpath, _, filenames in os.walk(os.fsencode(folder)):
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, os.fsencode(folder))] = hashlib.sha1(handle.read()).hexdigest()
    return found


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, monkeypatch):
    monkeypatch.setenv("RFT_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "input"
    src.mkdir()
    built = case.build(src)
    before = snapshot(src)
    if case.error is None:
        result = case.call(built, monkeypatch)
        if case.check is not None:
            case.check(result, built)
    else:
        fragment = case.fragment.replace("{src}", str(src).replace("\\", "\\\\"))
        with pytest.raises(case.error, match=fragment) as raised:
            case.call(built, monkeypatch)
        message = str(raised.value)
        message.encode("utf-8")  # printable anywhere: undecodable names are shown as escapes
    monkeypatch.undo()
    assert snapshot(src) == before, "the input folder changed"


def test_matrix_covers_every_case_of_the_issue():
    """Issue 13, item 8 (and the Deliver bullet): one row at least for each kind of input."""
    ids = " | ".join(c.id for c in CASES)
    for kind in ("image file name not UTF-8", "empty class folder", "csv: empty file", "csv: a column missing",
                 "bomb", "int64", "bool", "all-NaN", "truncated .safetensors", "sidecar: empty",
                 "sidecar: truncated", "latest.json: empty", "latest.json: truncated", "training state: truncated",
                 "disk full"):
        assert kind in ids, kind


# --------------------------------------------------------------------------------------------------
# temporaries of interrupted writes
# --------------------------------------------------------------------------------------------------
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    gone = dead_pid()
    stale = [tmp_path / f".ckpt-00000004.safetensors.tmp-{gone}", tmp_path / f".latest.json.tmp-{gone}"]
    live = [tmp_path / f".state-00000004.pt.tmp-{os.getpid()}", tmp_path / f".results.db.tmp-{os.getppid()}"]
    other = [tmp_path / "ckpt-00000004.safetensors", tmp_path / f"notes.tmp-{gone}", tmp_path / ".tmp-1"]
    for path in stale + live + other:
        path.write_bytes(b"x" * 10)
    (tmp_path / f".sub.tmp-{gone}").mkdir()  # a folder is never removed
    assert remove_stale_temporaries(tmp_path) == sorted(stale)
    assert all(p.exists() for p in live + other) and not any(p.exists() for p in stale)
    assert remove_stale_temporaries(tmp_path) == []
    assert remove_stale_temporaries(tmp_path / "absent") == []


def test_interrupted_atomic_write_leaves_a_temporary_that_cleanup_removes(tmp_path):
    """A writer killed mid-write (SIGKILL: no ``finally``) leaves ``.<name>.tmp-<pid>``; the next
    owner of the folder removes it, and the previous file is intact."""
    target = tmp_path / "latest.json"
    target.write_text("previous")
    script = ("import os, sys\nfrom rftlib.atomic import write_atomically\n"
              "def write(tmp):\n    tmp.write_bytes(b'half')\n    os.kill(os.getpid(), 9)\n"
              "write_atomically(sys.argv[1], write)\n")
    child = subprocess.run([sys.executable, "-c", script, str(target)], cwd=Path(__file__).resolve().parents[1])
    assert child.returncode == -9
    leftovers = list(tmp_path.glob(".latest.json.tmp-*"))
    assert len(leftovers) == 1 and target.read_text() == "previous"
    assert remove_stale_temporaries(tmp_path) == leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json"]
