"""Zero-shot CLIP: classify with a head built from class-name prompts; nothing is trained.

Knobs: ``templates`` (default: the dataset's prompt templates). The head follows the CLIP recipe
(:func:`rftlib.models.build_zeroshot_head`): every fine-tuning method starts from it, and WiSE-FT's
``alpha = 0`` end point is exactly this model.

Paper: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
ICML 2021. Sanity target: OpenAI ViT-B/16 with the 80 ImageNet templates scores 68.3 % top-1.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models import build_image_classifier, build_zeroshot_head
from .common import RunContext, RunResult, metrics_of

NAME = "zeroshot"


@dataclass
class Config:
    templates: tuple[str, ...] | None = None  # prompt templates with one {}; None = the dataset's


PRESETS: dict = {}


def run(ctx: RunContext, cfg: Config) -> RunResult:
    head = build_zeroshot_head(ctx.clip, ctx.dataset.classnames, list(cfg.templates or ctx.dataset.templates))
    model = build_image_classifier(ctx.clip, head)
    results = ctx.evaluate_all(model)
    return RunResult(ctx.run_id, NAME, ctx.dataset.name, metrics_of(results), classifier=model, clip=ctx.clip)
