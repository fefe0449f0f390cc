"""LP-FT: fit a linear probe first, then fine-tune the image tower and that head end to end.

Idea: fine-tuning from a poor head distorts the pretrained features along the ID data's span,
which hurts OOD; starting from a good (probed) head keeps the early gradients small and the
features closer to the pretrained ones. Stage 1 is :mod:`rftlib.methods.linear_probe` (normalised
features, C chosen on ID val); stage 2 is :mod:`rftlib.methods.finetune` from that head, usually
with a smaller learning rate.

Knobs: ``C_grid``/``max_iter`` (stage 1), ``train`` and ``label_smoothing`` (stage 2).

Paper: Kumar, Raghunathan, Jones, Ma, Liang, "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution", ICLR 2022. Real-data presets reuse the FT recipes (the FLYP
paper's LP-FT baseline on iWildCam/FMoW); the synthwild preset halves FT's learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..train import TrainConfig
from . import finetune, linear_probe
from .common import RunContext, RunResult

NAME = "lpft"


@dataclass
class Config:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=1e-5, weight_decay=0.1))
    label_smoothing: float = 0.0
    C_grid: tuple[float, ...] = linear_probe.Config.C_grid
    max_iter: int = linear_probe.Config.max_iter


PRESETS = {
    **{k: dict(v) for k, v in finetune.PRESETS.items()},
    "synthwild": {**finetune.PRESETS["synthwild"], "lr": 1.5e-4},
}


def run(ctx: RunContext, cfg: Config) -> RunResult:
    probe_cfg = linear_probe.Config(C_grid=cfg.C_grid, max_iter=cfg.max_iter, select_split=cfg.train.select_split)
    head, report = linear_probe.fit_probe(ctx, probe_cfg)
    ft_cfg = finetune.Config(train=cfg.train, label_smoothing=cfg.label_smoothing)
    result = finetune.train_classifier(ctx, head, ft_cfg)
    result.extra["probe"] = report
    return result
