"""Pretrain synthclip, the project's tiny CLIP, on a broad synthetic image-caption corpus.

    python data_scripts/pretrain_synthclip.py            # ~15-20 min on 2 CPU cores
    python data_scripts/pretrain_synthclip.py --steps 50 --out /tmp/sc   # a quick smoke run

Every step draws a fresh batch from the synthwild generator (all shapes, patterns, colours, every
background including the ones only OOD cameras use, night, blur, noise; captions describe
attributes and only sometimes name a species), so synthclip becomes a real zero-shot model whose
accuracy is modest but similar in and out of distribution -- as CLIP on iWildCam. Training is the
CLIP recipe: symmetric InfoNCE with a learnable temperature (clamped at 100), AdamW, linear warmup
then cosine decay over a fixed number of steps. The run is deterministic for a given seed and
thread count: batch ``k`` comes from ``numpy.random.default_rng([seed, k])``.

The result is written in fp16 (a few MB) with a JSON sidecar recording this script's full config
and the zero-shot curve measured during training.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from rftlib.data.synthwild import WorldConfig, build_world, sample_pretraining_batch
from rftlib.models import load_clip, save_checkpoint
from rftlib.models.loading import WEIGHTS_DIR

log = logging.getLogger("pretrain_synthclip")


@dataclass
class PretrainConfig:
    seed: int = 0                 # torch init + batch stream seed
    world_seed: int = 0           # synthwild world whose species the corpus names
    steps: int = 1800             # optimiser steps (batch 128: ~230k image-caption pairs)
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.98)
    warmup: int = 200             # linear warmup steps, then cosine to 0
    name_prob: float = 0.4        # P(species image's caption names the species)
    species_fraction: float = 0.4 # share of corpus images showing a world species
    stop_at: int = 0              # stop after this many steps of the `steps`-long schedule (0: run it all)
    eval_every: int = 300         # zero-shot check on synthwild id_test / test (small)
    snapshot_every: int = 0       # also save <out>-step<k>.safetensors every k steps (0: never)
    threads: int = 0              # torch threads (0 = torch default)
    min_attribute_diff: int = 1   # world option (must match the default world)


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * cfg.lr


def zero_shot_check(clip, dataset) -> dict:
    from rftlib.data.pipeline import ImageSpec
    from rftlib.evaluate import evaluate
    from rftlib.models import build_image_classifier, build_zeroshot_head

    head = build_zeroshot_head(clip, dataset.classnames, dataset.templates)
    clf = build_image_classifier(clip, head)
    spec = ImageSpec.of(clip)
    return {s: round(evaluate(clf, dataset, s, spec).metrics["macro_f1"], 4) for s in ("id_test", "test")}


def pretrain(cfg: PretrainConfig, out: Path) -> Path:
    from open_clip import ClipLoss

    from rftlib.data import get_dataset

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    clip = load_clip("synthclip", None)
    model = clip.model.train()
    world = build_world(WorldConfig(seed=cfg.world_seed, min_attribute_diff=cfg.min_attribute_diff))
    check_data = get_dataset("synthwild", seed=cfg.world_seed, size="small",
                             min_attribute_diff=cfg.min_attribute_diff)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    loss_fn = ClipLoss()
    mean = torch.tensor(clip.mean).view(1, 3, 1, 1)
    std = torch.tensor(clip.std).view(1, 3, 1, 1)
    history, start = [], time.time()
    last = cfg.stop_at or cfg.steps
    for step in range(last):
        rng = np.random.default_rng([cfg.seed, step])
        images, captions = sample_pretraining_batch(
            rng, world, cfg.batch_size, name_prob=cfg.name_prob, species_fraction=cfg.species_fraction)
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        img_f, txt_f, scale = model(x, clip.tokenizer(captions))
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % 50 == 0:
            rate = (step + 1) * cfg.batch_size / (time.time() - start)
            log.info("step %d loss %.3f scale %.1f  %.0f pairs/s", step + 1, loss.item(), scale.item(), rate)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == last:
            model.eval()
            zs = zero_shot_check(clip, check_data)
            model.train()
            history.append({"step": step + 1, "minutes": round((time.time() - start) / 60, 2), **zs})
            log.info("zero-shot macro-F1 %s", history[-1])
        if cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0 and step + 1 < last:
            snap = out.with_name(f"{out.stem}-step{step + 1}.safetensors")
            _save(clip, snap, replace(cfg, stop_at=step + 1, snapshot_every=0), history, start)
    model.eval()
    return _save(clip, out, cfg, history, start)


def _save(clip, out: Path, cfg: PretrainConfig, history: list, start: float) -> Path:
    """fp16 weights + sidecar; the sidecar's config reproduces exactly these weights."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in clip.model.state_dict().items()}
    clip.pretrained = None
    return save_checkpoint(out, state, clip=clip, method="pretrain_synthclip", method_config=asdict(cfg),
                           extra={"history": list(history), "minutes": round((time.time() - start) / 60, 2)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = PretrainConfig()
    for name, value in asdict(defaults).items():
        if not isinstance(value, tuple):
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR / "synthclip.safetensors")
    args = vars(parser.parse_args())
    out = args.pop("out")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    path = pretrain(PretrainConfig(**args), out)
    print(json.dumps(json.loads(path.with_suffix(".json").read_text())["extra"], indent=1))


if __name__ == "__main__":
    main()
