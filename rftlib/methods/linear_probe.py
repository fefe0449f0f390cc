"""Linear probe (LP): logistic regression on frozen, L2-normalised CLIP image features.

Idea: the encoder stays frozen; image features are computed once (eval transform, cached), L2
normalised, and a multinomial L2-regularised logistic regression is fit for each ``C`` in
``C_grid`` (warm-started from the previous C); the C with the best ID-val headline metric wins.
The resulting head is stored in the zero-shot head's parametrisation (a linear layer over
*normalised* features, bias included), so it loads into :class:`~rftlib.models.ZeroShotHead`,
can be interpolated with the zero-shot head and initialises LP-FT. It is the sklearn
logistic-regression probe of Kumar et al. (LP-FT) and of CLIP's linear-probe evaluation, not
WiSE-FT's "linear classifier" variant, which trains the head with AdamW and cross-entropy in
PyTorch. Classes absent from the training split get zero weight rows and zero bias. On ImageNet
the preset still chooses C on the training split (the references hold out part of train: not
done here yet).

Knobs: ``C_grid`` (inverse regularisation strengths), ``max_iter``, ``select_split`` (where C is
chosen: ID validation; ``None`` = a seeded ``holdout`` fraction of train, then a refit on all of
it -- ImageNet's preset, since its only ID split is the test set).

Paper: Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution", ICLR 2022 (their probe standardises raw features with one scalar; we probe
normalised features so the head matches CLIP's, see the spec's section 3.6).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..evaluate import encode_split
from ..models import ImageClassifier, ZeroShotHead, classifier_state, save_checkpoint
from .common import RunContext, RunResult, metrics_of

log = logging.getLogger(__name__)
NAME = "linear_probe"


@dataclass
class Config:
    C_grid: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)  # inverse L2 strengths
    max_iter: int = 300  # lbfgs iterations per C
    select_split: str | None = "id_val"  # C is chosen on this split (ID validation); None: on a held-out part of train
    holdout: float = 0.1  # with select_split=None: fraction of train (seeded) held out to choose C, then refit on all

    def __post_init__(self):
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout={self.holdout!r} is the fraction of train held out to choose C: it must lie "
                             "in (0, 1)")


# ImageNet has no ID validation split (its val set is the ID test set): hold out part of train, as
# the references do, instead of choosing C on the data the probe is fit on
PRESETS = {"imagenet": {"select_split": None}}


def image_features(ctx: RunContext, split: str) -> torch.Tensor:
    """L2-normalised image features of a split (evaluation views: the train split streams once,
    evaluation splits come from the decoded cache)."""
    feats = encode_split(ctx.clip.visual, ctx.dataset.split(split), ctx.spec, device=ctx.device, settings=ctx.loader,
                         progress_mode=ctx.progress, desc=f"features {split}")
    return torch.nn.functional.normalize(feats.float(), dim=-1)


def fit_probe(ctx: RunContext, cfg: Config) -> tuple[ZeroShotHead, dict]:
    """Sweep C, select it on ``select_split`` (or a held-out part of train), return the head
    (normalised-feature parametrisation) and a report."""
    from sklearn.linear_model import LogisticRegression

    ctx.dataset.check_selection_split(cfg.select_split)
    train = ctx.dataset.split("train")
    x_train = image_features(ctx, "train").numpy()
    if cfg.select_split is not None:
        select = ctx.dataset.split(cfg.select_split)
        x_val, fit_rows = image_features(ctx, cfg.select_split).numpy(), np.arange(len(train))
    else:
        fit_rows, val_rows = holdout_rows(len(train), cfg.holdout, ctx.seed)
        select, x_val = train.subset(val_rows, name="train_holdout"), x_train[val_rows]
    metric = ctx.dataset.headline_metric(select)
    clf = LogisticRegression(max_iter=cfg.max_iter, warm_start=True)  # each C starts from the previous one
    best, sweep = None, []
    for c in sorted(cfg.C_grid):
        _fit(clf.set_params(C=c), x_train[fit_rows], train.labels[fit_rows])
        score = ctx.dataset.compute_metrics(select, clf.predict(x_val))[metric]
        sweep.append({"C": c, metric: score})
        if best is None or score > best[0]:
            best = (score, c, clf.coef_.copy(), clf.intercept_.copy(), clf.classes_.copy())
    score, c, coef, intercept, classes = best
    if cfg.select_split is None:  # refit on the whole training split at the chosen C
        final = _fit(LogisticRegression(C=c, max_iter=cfg.max_iter), x_train, train.labels)
        coef, intercept, classes = final.coef_, final.intercept_, final.classes_
    weight = torch.zeros(ctx.dataset.num_classes, x_train.shape[1])
    bias = torch.zeros(ctx.dataset.num_classes)
    weight[torch.as_tensor(classes)] = torch.as_tensor(coef, dtype=torch.float32)
    bias[torch.as_tensor(classes)] = torch.as_tensor(intercept, dtype=torch.float32)
    log.info("linear probe: C=%g selected (%s %.4f on %s)", c, metric, score, select.name)
    return ZeroShotHead(weight, bias, normalize=True).to(ctx.device), {"C": c, "sweep": sweep}


def holdout_rows(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of ``range(n)`` into (fit rows, held-out rows), at least one of each."""
    order = np.random.default_rng(seed).permutation(n)
    held = min(max(1, round(fraction * n)), n - 1)
    return np.sort(order[held:]), np.sort(order[:held])


def _fit(clf, x: np.ndarray, y: np.ndarray):
    """``clf.fit(x, y)`` without lbfgs' convergence warnings (expected at tiny C)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return clf.fit(x, y)


def run(ctx: RunContext, cfg: Config) -> RunResult:
    head, report = fit_probe(ctx, cfg)
    model = ImageClassifier(ctx.clip.visual, head)
    results = ctx.evaluate_all(model)
    ckpt = None
    if ctx.out_dir is not None:
        ckpt = save_checkpoint(ctx.out_dir / "probe.safetensors", classifier_state(ctx.clip, head), clip=ctx.clip,
                               classnames=ctx.dataset.classnames, method=NAME, method_config=cfg, extra=report)
    return RunResult(ctx.run_id, NAME, ctx.dataset.name, metrics_of(results), classifier=model, checkpoint=ckpt,
                     clip=ctx.clip, extra=report)
