"""Training and evaluation throughput, peak memory, and the WiSE-FT sweep speed-up.

    python benchmarks/train_throughput.py            # CPU here; uses CUDA when available
    python benchmarks/train_throughput.py --quick    # fewer steps

Workloads (each in its own subprocess, so peak memory is per workload):

* ``synthclip/synthwild`` -- CE fine-tuning step (image tower + head), FLYP step (both towers),
  and evaluation, on the real embedded data;
* ``ViT-B-16/random`` -- the same CE step and evaluation for a ViT-B/16-shaped CLIP (random
  weights, random 224 px images): the shape of the real workloads;
* ``wiseft-sweep`` -- an 11-alpha WiSE-FT sweep over four evaluation splits stored as JPEG files
  (synthwild images written at 224 px, 500 per split, read through the ``folder`` adapter) with
  rftlib's sweep (files decoded once into the on-disk cache, the first decode included) against a
  naive loop that, like the reference code, rebuilds the dataset and re-decodes every image for
  every alpha. Reported as a ratio from the same run,
  after a warm-up. (On synthwild itself the images are in-memory arrays, so there is nothing to
  save: a sweep there costs the forward passes alone.)

Peak memory is the process's max RSS on CPU and ``torch.cuda.max_memory_allocated`` on CUDA.
Numbers are printed as a table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time_steps(step, n: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def _train_step_fn(task, batch_fn):
    opt = torch.optim.AdamW(task.param_groups(0.1), lr=1e-5)

    def step():
        out = task.training_step(batch_fn())
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
    return step


def bench_synthclip(kind: str, quick: bool) -> dict:
    from rftlib.data import get_dataset
    from rftlib.data.pipeline import ImageSpec, decode_split, normalize
    from rftlib.evaluate import autocast_for, run_model
    from rftlib.methods.finetune import FinetuneTask
    from rftlib.methods.flyp import Config as FlypConfig
    from rftlib.methods.flyp import FlypTask
    from rftlib.models import build_image_classifier, build_zeroshot_head, load_clip
    from rftlib.task import Batch

    device = _device()
    clip = load_clip("synthclip", "synthclip", device=device)
    data = get_dataset("synthwild")
    spec, bs = ImageSpec.of(clip), 128
    images = decode_split(data.split("train"), spec.size)
    labels = torch.as_tensor(data.split("train").labels)
    if kind == "eval":
        model = build_image_classifier(clip, build_zeroshot_head(clip, data.classnames, data.templates))
        test = decode_split(data.split("test"), spec.size)
        seconds = _time_steps(lambda: run_model(model, test, spec, device=device, batch_size=512), 1 if quick else 3)
        return {"workload": "synthclip/synthwild eval", "batch": 512, "img_s": len(test) / seconds}
    head = build_zeroshot_head(clip, data.classnames, data.templates)
    task = (FinetuneTask(clip, head) if kind == "ce" else FlypTask(clip, data.classnames, data.templates, FlypConfig()))
    task.train()

    def batch():
        idx = torch.randint(len(labels), (bs,))
        return Batch(normalize(images[idx], spec, device), labels[idx].to(device), idx, 0, 0, torch.arange(bs), bs,
                     torch.Generator().manual_seed(0))
    step = _train_step_fn(task, batch)
    with autocast_for(device):
        seconds = _time_steps(step, 3 if quick else 10)
    return {"workload": f"synthclip/synthwild {'CE' if kind == 'ce' else 'FLYP'} train step", "batch": bs,
            "img_s": bs / seconds}


def bench_vitb16(kind: str, quick: bool) -> dict:
    from rftlib.data.pipeline import ImageSpec
    from rftlib.evaluate import autocast_for, run_model
    from rftlib.methods.finetune import FinetuneTask
    from rftlib.models import ZeroShotHead, build_image_classifier, load_clip
    from rftlib.task import Batch

    device = _device()
    torch.manual_seed(0)
    clip = load_clip("ViT-B-16", None, device=device)
    head = ZeroShotHead(torch.nn.functional.normalize(torch.randn(182, 512), dim=-1) * 100).to(device)
    cpu = device.type == "cpu"
    if kind == "eval":
        bs = 16 if cpu else 512
        images = torch.randint(0, 256, (bs * (1 if cpu else 8), 3, 224, 224), dtype=torch.uint8)
        model = build_image_classifier(clip, head)
        seconds = _time_steps(lambda: run_model(model, images, ImageSpec.of(clip), device=device, batch_size=bs), 1)
        return {"workload": "ViT-B-16/random eval", "batch": bs, "img_s": len(images) / seconds}
    bs = 4 if cpu else 256
    task = FinetuneTask(clip, head).train()
    x = torch.randn(bs, 3, 224, 224, device=device)
    y = torch.randint(0, 182, (bs,), device=device)
    step = _train_step_fn(task, lambda: Batch(x, y, torch.arange(bs), 0, 0, torch.arange(bs), bs,
                                              torch.Generator()))
    with autocast_for(device):
        seconds = _time_steps(step, 1 if (cpu or quick) else 10)
    return {"workload": "ViT-B-16/random CE train step", "batch": bs, "img_s": bs / seconds}


def _write_folder_dataset(root, data, splits, per_split: int, pixels: int) -> None:
    """Synthwild's evaluation splits as JPEG files (``root/<split>/<class>/<i>.jpg``), upscaled to
    ``pixels`` so that decoding and resizing cost what they cost on real photos."""
    from PIL import Image

    for split in splits:
        s = data.split(split)
        for i in range(min(per_split, len(s))):
            folder = root / split / data.classnames[int(s.labels[i])].replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(s.images.array[i]).resize((pixels, pixels), Image.BILINEAR)
            image.save(folder / f"{i:05d}.jpg", quality=90)


def bench_wiseft(quick: bool) -> dict:
    """rftlib's sweep (files decoded once) against the reference's loop (re-decoded per alpha)."""
    import tempfile
    from pathlib import Path

    from rftlib.data import get_dataset
    from rftlib.data.loading import LoaderSettings
    from rftlib.data.pipeline import ImageSpec
    from rftlib.evaluate import evaluate
    from rftlib.methods.common import RunContext
    from rftlib.methods.wiseft import WiseModel, sweep, zeroshot_state_for
    from rftlib.models import build_zeroshot_head, classifier_state, load_clip
    from rftlib.results import ResultsStore

    device = _device()
    clip = load_clip("synthclip", "synthclip", device=device)
    world = get_dataset("synthwild")
    splits = ["id_val", "id_test", "val", "test"]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["RFT_CACHE_DIR"] = tmp  # the decoded cache starts empty and goes away with the files
        _write_folder_dataset(Path(tmp) / "data", world, splits, 150 if quick else 500, 224)
        data = get_dataset("folder", root=Path(tmp) / "data", templates=world.templates)
        spec = ImageSpec.of(clip)
        head = build_zeroshot_head(clip, data.classnames, data.templates)
        ft_state = {k: v.detach().cpu().clone() for k, v in classifier_state(clip).items()}
        ft_state.update({f"head.{k}": v.detach().cpu() + 0.01 for k, v in head.state_dict().items()})
        wise = WiseModel(clip, zeroshot_state_for(clip, ft_state, data.classnames, data.templates), ft_state,
                         data.classnames, data.templates)
        alphas = [i / 10 for i in range(11)][: 4 if quick else 11]
        evaluate(wise.model_at(0.0), world, "id_val", spec, device=device)  # warm-up, on other data
        start = time.perf_counter()
        ctx = RunContext(clip=clip, dataset=data, device=torch.device(device), method="wiseft", run_id="bench",
                         store=ResultsStore(Path(tmp) / "results.db"))  # the sweep logs its rows as a run does
        sweep(ctx, wise, alphas)
        ours = time.perf_counter() - start
        start = time.perf_counter()
        decode_every_time = LoaderSettings(eval_cache=False)
        for alpha in alphas:  # the reference's way: a new dataset object and fresh decoding per alpha
            fresh = get_dataset("folder", root=Path(tmp) / "data", templates=world.templates)
            model = wise.model_at(alpha)
            for split in splits:
                evaluate(model, fresh, split, spec, device=device, settings=decode_every_time)
        naive = time.perf_counter() - start
    images = sum(len(data.split(s)) for s in splits)
    return {"workload": f"WiSE-FT {len(alphas)}-alpha sweep, {images} JPEGs in 4 splits", "batch": 256,
            "seconds": round(ours, 2), "naive_seconds": round(naive, 2), "speedup": round(naive / ours, 2)}


WORKLOADS = {
    "synthclip-ce": lambda q: bench_synthclip("ce", q),
    "synthclip-flyp": lambda q: bench_synthclip("flyp", q),
    "synthclip-eval": lambda q: bench_synthclip("eval", q),
    "vitb16-ce": lambda q: bench_vitb16("ce", q),
    "vitb16-eval": lambda q: bench_vitb16("eval", q),
    "wiseft-sweep": bench_wiseft,
}


def run_one(name: str, quick: bool) -> dict:
    row = WORKLOADS[name](quick)
    device = _device()
    row.update(device=str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
               threads=torch.get_num_threads(), peak_mb=round(_peak_mb(device)))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", choices=list(WORKLOADS))
    parser.add_argument("--one", choices=list(WORKLOADS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.quick)))
        return
    import pandas as pd

    rows = []
    for name in args.only or WORKLOADS:
        cmd = [sys.executable, __file__, "--one", name] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RFT_PROGRESS": "off"})
        if out.returncode != 0:
            rows.append({"workload": name, "error": out.stderr.strip().splitlines()[-1][:120]})
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    frame = pd.DataFrame(rows)
    for col in ("img_s",):
        if col in frame:
            frame[col] = frame[col].round(1)
    print(frame.to_string(index=False))


if __name__ == "__main__":
    main()
