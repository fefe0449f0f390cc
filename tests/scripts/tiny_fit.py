"""Train a tiny model on tiny synthwild with the shared loop (used by resume and DDP tests).

    python tests/scripts/tiny_fit.py --method finetune --out DIR [--epochs 3] [--slow 0.2]
        [--folder ROOT --workers 2 --augment rrc]

Under torchrun-style env vars (WORLD_SIZE > 1) it runs DDP with gloo. Rank 0 writes
``DIR/final.safetensors`` with the final (selected) weights. ``--folder`` trains on a ``folder``
dataset of image files (streamed by ``--workers`` processes) instead of synthwild's arrays.
"""

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from rftlib import dist as rdist  # noqa: E402
from rftlib.data import get_dataset  # noqa: E402
from rftlib.data.loading import LoaderSettings  # noqa: E402
from rftlib.data.pipeline import ImageSpec  # noqa: E402
from rftlib.methods import flyp  # noqa: E402
from rftlib.methods.finetune import FinetuneTask  # noqa: E402
from rftlib.models import build_zeroshot_head, load_clip  # noqa: E402
from rftlib.train import TrainConfig, fit  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="finetune", choices=["finetune", "flyp"])
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--checkpoint-every", type=int, default=3)
    p.add_argument("--slow", type=float, default=0.0, help="seconds to sleep after each step")
    p.add_argument("--folder", default=None, help="train on this folder dataset of image files")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--augment", default="none")
    p.add_argument("--on-bad-image", default="raise")
    args = p.parse_args()
    torch.set_num_threads(1)
    info = rdist.init_distributed("cpu")
    torch.manual_seed(0)
    clip = load_clip("rft-tiny", None)
    if args.folder:
        data = get_dataset("folder", root=args.folder)
    else:
        data = get_dataset("synthwild", size="tiny", cache=False)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, warmup_steps=3,
                      checkpoint_every=args.checkpoint_every, grad_clip=1.0, augment=args.augment,
                      eval_splits=("id_val",))
    loader = LoaderSettings(workers=args.workers, on_bad_image=args.on_bad_image)
    if args.method == "finetune":
        task = FinetuneTask(clip, build_zeroshot_head(clip, data.classnames, data.templates))
    else:
        task = flyp.FlypTask(clip, data.classnames, data.templates, flyp.Config())
    if info.is_main:
        os.makedirs(args.out, exist_ok=True)
        init = {k: v.contiguous().clone() for k, v in task.checkpoint_state().items()}
        save_file(init, f"{args.out}/init.safetensors")
    callbacks = [lambda e: time.sleep(args.slow) if e.kind == "step" else None]
    fit(task, data, cfg, spec=ImageSpec.of(clip), out_dir=args.out, callbacks=callbacks, progress_mode="off",
        loader=loader)
    if info.is_main:
        save_file({k: v.contiguous() for k, v in task.checkpoint_state().items()}, f"{args.out}/final.safetensors")


if __name__ == "__main__":
    main()
