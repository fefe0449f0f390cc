"""ViT-B/16-shaped throughput on one GPU: rftlib's loop against the reference code's way, same GPU.

    python benchmarks/gpu_throughput.py [--steps 30] [--batch 256]
    python benchmarks/gpu_throughput.py --device cpu --steps 3 --batch 2 --images 64   # a smoke run

Rows (random weights; the workload's shape is what matters):

* ``train, rftlib`` -- :func:`rftlib.train.fit` itself (the shared loop: bf16 autocast, fused AdamW,
  ``uint8`` batches normalised on the GPU) fine-tuning the image tower + a 182-class head, fed by
  the streamed training input (RandomResizedCrop 0.9-1 on 600x448 / 800x448 JPEGs, every core
  but one decoding) -- end to end, as a user runs it;
* ``train, rftlib (in-memory input)`` -- the same loop on decoded images held in memory: the GPU
  side alone;
* ``train, reference way`` -- the step as the reference code runs it: fp32 (no autocast), a PIL
  ``ImageFolder`` loader delivering float tensors, non-fused AdamW;
* ``eval`` -- :func:`rftlib.evaluate.run_model` (bf16) and the fp32 reference;
* ``loader only`` -- images/s of each input pipeline with no model, all cores;
* ``GPU JPEG decode`` -- torchvision's batched nvJPEG decode, to weigh against the CPU loader.

MFU is model FLOPs (ViT-B/16 image tower: 35.13 GFLOP forward, 3x for training) per second over
the device's dense bf16 peak (H100 SXM / H200: 989.4 TFLOP/s; A100: 312). Printed as a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FORWARD_GFLOP = 35.13
PEAKS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


DEVICE = torch.device("cuda")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _peak() -> float | None:
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    return next((v for k, v in PEAKS.items() if k in name), None)


def _row(name: str, images_per_s: float, train: bool) -> dict:
    peak = _peak()
    flops = images_per_s * FORWARD_GFLOP * (3 if train else 1) / 1000
    return {"workload": name, "img_s": round(images_per_s), "TFLOP_s": round(flops, 1),
            "MFU_%": round(100 * flops / peak, 1) if peak else None}


def _jpegs(count: int) -> Path:
    sys.path.insert(0, str(HERE))
    from fabricate import image_folder

    base = Path(os.environ.get("RFT_CACHE_DIR") or Path.home() / ".cache" / "rftlib") / "bench-jpegs"
    return image_folder(base / f"n{count}", count, workers=os.cpu_count() or 2)


def _dataset(split):
    from rftlib.data.base import RFTDataset

    return RFTDataset("bench", [f"c{i}" for i in range(182)], ["{}"], {"train": split}, lambda *a: {},
                      {"id": "accuracy"})


def _task():
    from rftlib.methods.finetune import FinetuneTask
    from rftlib.models import ZeroShotHead, load_clip

    torch.manual_seed(0)
    clip = load_clip("ViT-B-16", None, device=DEVICE)
    head = ZeroShotHead(torch.nn.functional.normalize(torch.randn(182, 512), dim=-1) * 100).to(DEVICE)
    return clip, FinetuneTask(clip, head)


def rftlib_train(split, steps: int, batch: int, workers: int) -> float:
    from rftlib.data.loading import LoaderSettings
    from rftlib.data.pipeline import ImageSpec
    from rftlib.train import TrainConfig, fit

    clip, task = _task()
    stamps = []
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=1e-5, warmup_steps=1, select_split=None, eval_splits=(),
                      augment="rrc" if workers else "none")
    loader = LoaderSettings(workers=workers, input_path="stream" if workers else "memory", memory_budget="100G")
    fit(task, _dataset(split), cfg, spec=ImageSpec.of(clip), device=DEVICE, loader=loader, progress_mode="off",
        callbacks=[lambda e: stamps.append(time.perf_counter()) if e.kind == "step" else None])
    _sync()
    skip = min(5, len(stamps) // 3)
    return batch * (len(stamps) - 1 - skip) / (stamps[-1] - stamps[skip])


def reference_train(folder: Path, steps: int, batch: int, workers: int) -> float:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    _, task = _task()
    task.train()
    transform = T.Compose([T.RandomResizedCrop(224, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                           T.ToTensor(), T.Normalize((0.481, 0.458, 0.408), (0.269, 0.261, 0.276))])
    loader = torch.utils.data.DataLoader(ImageFolder(str(folder), transform=transform), batch_size=batch,
                                         shuffle=True, num_workers=workers, drop_last=True)
    opt = torch.optim.AdamW(list(task.trainable_parameters()), lr=1e-5, foreach=False)
    done, start = 0, None
    for i, (x, y) in enumerate(loader):
        if i == 2:
            _sync()
            start = time.perf_counter()
        logits = task.logits(x.to(DEVICE))
        loss = torch.nn.functional.cross_entropy(logits, (y % 182).to(DEVICE))
        opt.zero_grad()
        loss.backward()
        opt.step()
        done += len(x) if i >= 2 else 0
        if i + 1 >= steps:
            break
    _sync()
    return done / (time.perf_counter() - start)


def eval_rate(amp: bool, batch: int) -> float:
    from rftlib.data.pipeline import ImageSpec
    from rftlib.evaluate import run_model
    from rftlib.models import build_image_classifier

    clip, task = _task()
    model = build_image_classifier(clip, task.head)
    images = torch.randint(0, 256, (batch * (12 if DEVICE.type == "cuda" else 2), 3, 224, 224), dtype=torch.uint8)
    run_model(model, images[:batch], ImageSpec.of(clip), device=DEVICE, batch_size=batch, amp=amp)
    _sync()
    start = time.perf_counter()
    run_model(model, images, ImageSpec.of(clip), device=DEVICE, batch_size=batch, amp=amp)
    _sync()
    return len(images) / (time.perf_counter() - start)


def loader_rates(folder: Path, split, workers: int) -> list[dict]:
    sys.path.insert(0, str(HERE))
    from input_pipeline import reference_rate, rftlib_rate

    return [{"workload": f"loader only, rftlib stream ({workers} workers)",
             "img_s": round(rftlib_rate(split, workers))},
            {"workload": f"loader only, reference PIL ({workers} workers)",
             "img_s": round(reference_rate(folder, workers))}]


def gpu_decode_rate(split, batch: int = 256) -> float | None:
    from torchvision.io import decode_jpeg

    if DEVICE.type != "cuda":
        return None
    data = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in split.images.paths[:batch]]
    decode_jpeg(data, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        decode_jpeg(data, device="cuda")
    torch.cuda.synchronize()
    return 5 * batch / (time.perf_counter() - start)


def main() -> None:
    import pandas as pd

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=int, default=4000, help="fabricated JPEGs for the streamed rows")
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    sys.path.insert(0, str(HERE))
    from input_pipeline import _file_split

    from rftlib.data.base import ArrayImages, Split
    from rftlib.data.loading import available_cpus

    workers = max(1, available_cpus() - 1)
    folder = _jpegs(args.images)
    files = _file_split(folder)
    n = args.batch * args.steps
    in_memory = Split("train", "train", ArrayImages(torch.randint(0, 256, (n, 224, 224, 3), dtype=torch.uint8).numpy()),
                      [i % 182 for i in range(n)])
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["RFT_CACHE_DIR"] = tmp
        rows = [_row("train, rftlib (in-memory input)", rftlib_train(in_memory, args.steps, args.batch, 0), True),
                _row(f"train, rftlib (JPEG stream, {workers} workers)",
                     rftlib_train(files.subset(range(min(len(files), n))), args.steps, args.batch, workers), True),
                _row(f"train, reference way (fp32, PIL floats, {workers} workers)",
                     reference_train(folder, min(args.steps, 12), args.batch, workers), True),
                _row("eval, rftlib bf16", eval_rate(True, args.batch * 2), False),
                _row("eval, reference fp32", eval_rate(False, args.batch * 2), False),
                *loader_rates(folder, files, workers),
                {"workload": "GPU JPEG decode (nvJPEG, batch 256)", "img_s": gpu_decode_rate(files)}]
    frame = pd.DataFrame(rows)
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {available_cpus()} CPUs")
    print(frame.to_string(index=False))
    train = frame.set_index("workload")["img_s"]
    ours = next(v for k, v in train.items() if k.startswith("train, rftlib (JPEG"))
    ref = next(v for k, v in train.items() if k.startswith("train, reference"))
    print(f"end-to-end training speed-up over the reference way: {ours / ref:.1f}x")


if __name__ == "__main__":
    main()
