"""The training input at real-image scale: loader throughput, memory against dataset size, start-up.

    python benchmarks/input_pipeline.py                 # everything (about 10 minutes on 2 cores)
    python benchmarks/input_pipeline.py --only loader   # loader throughput only (or decoders, memory)
    python benchmarks/input_pipeline.py --workers 1 2   # worker counts to compare

Inputs are fabricated camera-trap-like JPEGs, 600x448 and 800x448 (``benchmarks/fabricate.py``),
written once under ``$RFT_CACHE_DIR/bench-jpegs`` and reused.

* **loader** -- images/s of the training input, RandomResizedCrop(224, scale 0.9-1, bicubic):
  rftlib's stream (worker processes decode with libjpeg-turbo through torchvision, crop and resize
  ``uint8``, send ``uint8`` batches) against the reference pipeline (``ImageFolder`` + PIL
  ``RandomResizedCrop`` + ``ToTensor`` + ``Normalize`` in a ``DataLoader``) with the same workers and
  batch, in the same process, after a warm-up batch; plus rftlib reading a prepared copy
  (``prepare_cache.py``: shorter side 256, JPEG q95 or raw ``uint8``). "per core" divides by the
  cores the workers can use.
* **decoders** -- one core, one image at a time, the candidates for turning a 600x448 / 800x448
  JPEG into a 224-px crop: PIL as the reference runs it (RandomResizedCrop + ToTensor + Normalize),
  PIL decode + one resize of the crop box, PIL with reduce-on-decode (``draft``, 1/2 scale: the
  DCT skips half the pixels, but at 448 px high it leaves fewer rows than a 0.9-1 crop needs, so
  rftlib does not use it), and libjpeg-turbo through torchvision + torch's uint8 bicubic (rftlib).
* **memory** -- one epoch of a tiny CLIP with a 224-px input (fine-tuning, 1 loader worker) on a
  split of 5,000 and of 40,000 images (the same 2,000 distinct files, hard-linked): peak RSS of the
  training process and of its largest worker, and the time from the start of ``fit`` to the first
  step; plus the old way for reference (the whole split decoded into RAM first), on 5,000.

Nothing is asserted: the numbers are printed as tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BATCH = 64


def _jpeg_folder(count: int, distinct: int = 2000) -> Path:
    sys.path.insert(0, str(HERE))
    from fabricate import image_folder

    base = Path(os.environ.get("RFT_CACHE_DIR") or Path.home() / ".cache" / "rftlib") / "bench-jpegs"
    return image_folder(base / f"n{count}", count, distinct=distinct)


def _file_split(folder: Path):
    from rftlib.data.base import FileImages, Split
    from rftlib.data.imagenet import list_images

    paths = list_images(folder)
    labels = [int(Path(p).parent.name[1:]) for p in paths]
    return Split("train", "train", FileImages(tuple(paths)), labels)


def _rate(batches, images: int) -> float:
    iterator = iter(batches)
    next(iterator)  # warm-up: worker start and first batch
    start, seen = time.perf_counter(), 0
    for batch in iterator:
        seen += len(batch[0]) if isinstance(batch, (list, tuple)) else batch
    return seen / (time.perf_counter() - start)


def reference_rate(folder: Path, workers: int) -> float:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    transform = T.Compose([T.RandomResizedCrop(224, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                           T.ToTensor(), T.Normalize((0.481, 0.458, 0.408), (0.269, 0.261, 0.276))])
    loader = torch.utils.data.DataLoader(ImageFolder(str(folder), transform=transform), batch_size=BATCH,
                                         shuffle=True, num_workers=workers, drop_last=True)
    return _rate(loader, len(loader.dataset))


def rftlib_rate(split, workers: int, prepared: str | None = None) -> float:
    from rftlib.data.augment import Augment
    from rftlib.data.loading import LoaderSettings
    from rftlib.data.train_input import StepLayout, TrainInput

    layout = StepLayout(len(split), BATCH, seed=0)
    source = TrainInput(split, 224, layout, Augment("rrc"), LoaderSettings(workers=workers, prepared=prepared))
    steps = source.steps(0, layout.steps_per_epoch)
    return _rate((sum(len(mb.images) for mb in step) for step in steps), len(split))


def bench_loader(worker_counts: list[int]) -> list[dict]:
    from rftlib.data.loading import available_cpus
    from rftlib.data.prepared import PrepareSettings, prepare

    folder = _jpeg_folder(2000)
    split = _file_split(folder)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prepared = {fmt: str(prepare(split, Path(tmp) / fmt, PrepareSettings(256, fmt), workers=available_cpus()))
                    for fmt in ("jpeg", "raw")}
        for workers in worker_counts:
            cores = max(1, min(workers, available_cpus()))
            reference = reference_rate(folder, workers)
            for name, rate in (("reference (ImageFolder + PIL, float)", reference),
                               ("rftlib stream, raw JPEGs", rftlib_rate(split, workers)),
                               ("rftlib stream, prepared JPEG 256", rftlib_rate(split, workers, prepared["jpeg"])),
                               ("rftlib stream, prepared raw 256", rftlib_rate(split, workers, prepared["raw"]))):
                rows.append({"workers": workers, "pipeline": name, "img_s": round(rate),
                             "per_core": round(rate / cores), "vs_reference": round(rate / reference, 2)})
    return rows


def bench_decoders(count: int = 200) -> list[dict]:
    import numpy as np
    import torchvision.transforms as T
    from PIL import Image

    from rftlib.data.images import read_image, training_view

    torch.set_num_threads(1)
    paths = _file_split(_jpeg_folder(2000)).images.paths[:count]
    reference = T.Compose([T.RandomResizedCrop(224, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                           T.ToTensor(), T.Normalize((0.481, 0.458, 0.408), (0.269, 0.261, 0.276))])

    def box(w: int, h: int) -> tuple[int, int, int, int]:  # a 0.95-area crop, as RandomResizedCrop draws
        return int(0.02 * w), int(0.02 * h), int(0.97 * w), int(0.97 * h)

    def pil_box(path: str, reduce: bool = False):
        with Image.open(path) as im:
            if reduce:
                im.draft("RGB", (im.size[0] // 2, im.size[1] // 2))
            im = im.convert("RGB")
            return np.asarray(im.resize((224, 224), Image.BICUBIC, box=box(*im.size)))

    def ours(path: str):
        image = read_image(path)
        left, top, right, bottom = box(image.shape[2], image.shape[1])
        return training_view(image, (top, left, bottom - top, right - left), False, 224)

    candidates = {"PIL, as the reference (RRC + ToTensor + Normalize)":
                  lambda p: reference(Image.open(p).convert("RGB")),
                  "PIL decode + resize of the crop box": pil_box,
                  "PIL reduce-on-decode (draft 1/2) + resize": lambda p: pil_box(p, reduce=True),
                  "rftlib: torchvision libjpeg-turbo + uint8 bicubic": ours}
    rows = []
    for name, fn in candidates.items():
        fn(paths[0])
        start = time.perf_counter()
        for path in paths:
            fn(path)
        ms = 1000 * (time.perf_counter() - start) / len(paths)
        rows.append({"decoder": name, "ms_per_image": round(ms, 2), "img_s_per_core": round(1000 / ms)})
    return rows


def memory_run(count: int, path: str) -> dict:
    """One epoch of the tiny 224-px model in this process (run in a subprocess per setting)."""
    import open_clip

    from rftlib.data.base import RFTDataset
    from rftlib.data.loading import LoaderSettings
    from rftlib.data.pipeline import ImageSpec
    from rftlib.methods.finetune import FinetuneTask
    from rftlib.models import ZeroShotHead, load_clip
    from rftlib.train import TrainConfig, fit

    torch.set_num_threads(1)
    open_clip.add_model_config(HERE / "configs")
    folder = _jpeg_folder(count)
    started = time.perf_counter()
    split = _file_split(folder)
    data = RFTDataset("bench", [f"c{i}" for i in range(10)], ["{}"], {"train": split}, lambda *a: {},
                      {"id": "accuracy"})
    clip = load_clip("bench-tiny-224", None)
    task = FinetuneTask(clip, ZeroShotHead(torch.nn.functional.normalize(torch.randn(10, 64), dim=-1)))
    first = []
    cfg = TrainConfig(epochs=1, batch_size=BATCH, warmup_steps=10, select_split=None, eval_splits=(),
                      augment="rrc" if path == "stream" else "none")
    loader = LoaderSettings(workers=1, input_path=path, memory_budget="64G", eval_cache=False)
    fit(task, data, cfg, spec=ImageSpec.of(clip), loader=loader, progress_mode="off",
        callbacks=[lambda e: first.append(time.perf_counter() - started) if e.kind == "step" and not first else None])
    return {"images": count, "path": path, "first_step_s": round(first[0], 1),
            "epoch_s": round(time.perf_counter() - started, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def bench_memory() -> list[dict]:
    rows = []
    for count, path in ((5000, "stream"), (40000, "stream"), (5000, "memory")):
        _jpeg_folder(count)  # fabricated outside the measured process
        out = subprocess.run([sys.executable, __file__, "--memory-run", str(count), path], capture_output=True,
                             text=True, env={**os.environ, "RFT_PROGRESS": "off"})
        if out.returncode != 0:
            rows.append({"images": count, "path": path, "error": out.stderr.strip().splitlines()[-1][:150]})
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    import pandas as pd

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["decoders", "loader", "memory"])
    parser.add_argument("--workers", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--memory-run", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_run:
        print(json.dumps(memory_run(int(args.memory_run[0]), args.memory_run[1])))
        return
    if args.only in (None, "decoders"):
        print("one core, one 600x448 / 800x448 JPEG at a time, to a 224-px crop")
        print(pd.DataFrame(bench_decoders()).to_string(index=False), flush=True)
    if args.only in (None, "loader"):
        print("training input throughput (RandomResizedCrop 224, scale 0.9-1, bicubic; batch 64; 2,000 JPEGs)")
        print(pd.DataFrame(bench_loader(args.workers)).to_string(index=False), flush=True)
    if args.only in (None, "memory"):
        print("\none epoch of a tiny 224-px CLIP, 1 loader worker: memory and start-up against dataset size")
        print(pd.DataFrame(bench_memory()).to_string(index=False))


if __name__ == "__main__":
    main()
