"""The command line: one run of one method, in a single process or under ``torchrun``.

    python -m rftlib.train --method finetune --set epochs=10 lr=1e-5
    torchrun --nproc_per_node 4 -m rftlib.train --method flyp --dataset iwildcam --data-root data \\
        --model ViT-B-16 --pretrained openai

``python -m rftlib.train`` runs :func:`main`, which hands the run to
:func:`rftlib.methods.run_method` and prints its summary as JSON. ``--help`` lists the registered
methods and datasets. ``--set KEY=VALUE`` overrides the method's config (``epochs``, ``lr`` or any
knob; values are read as JSON when they are JSON) and ``--data-option KEY=VALUE`` passes options to
the dataset's loader (``size=small`` for synthwild). ``--track tensorboard wandb`` sends the run's
curves and final metrics to experiment trackers (:mod:`rftlib.tracking`; off by default).

Every input is resolved before anything trains: an unknown method or dataset, an override that is
not ``KEY=VALUE``, that names no option or that gives an option a value its config refuses, a bad
loader setting and missing data each end the command with a one-line error (exit status 2) that
names the option. An error raised while training keeps its traceback.

Running the same command again reuses the run it started: an interrupted run resumes and a finished
one is not retrained; ``--force`` retrains.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from . import dist as rdist
from .data import DATASETS, DataNotFoundError, RFTDataset, get_dataset, list_datasets
from .data.loading import BAD_IMAGE_POLICIES, INPUT_PATHS, LoaderSettings
from .devices import resolve_device
from .methods import data_options_for, get_config, get_method, list_methods, run_method
from .registry import UnknownNameError
from .tracking import TRACKERS, resolve_track

#: What refusing an input raises: an unknown name, or a value of the wrong type or out of range.
INPUT_ERRORS = (UnknownNameError, TypeError, ValueError)


def parse_override(text: str) -> tuple[str, Any]:
    """``"KEY=VALUE"`` -> ``(KEY, VALUE)``, the value read as JSON when it is JSON (numbers, lists,
    true/false, null), else kept as text. Made for ``argparse``'s ``type=``.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not ``KEY=VALUE`` (argparse reports it in one line,
            naming the option).
    """
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``python -m rftlib.train``."""
    parser = argparse.ArgumentParser(prog="python -m rftlib.train",
                                     description="Train one rftlib method (single process or torchrun).")
    parser.add_argument("--method", required=True, metavar="NAME",
                        help=f"the method to run: {', '.join(list_methods())}")
    parser.add_argument("--dataset", default="synthwild", metavar="NAME",
                        help=f"the dataset: {', '.join(list_datasets())} (default: synthwild)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--model", default="synthclip")
    parser.add_argument("--pretrained", default="synthclip", help="weights tag or file; none: random init")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--results-db", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true",
                        help="retrain even if this run already finished; default: the same command resumes an "
                             "interrupted run and reuses a finished one")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", type=parse_override,
                        help="config overrides, e.g. --set epochs=10 lr=1e-5")
    parser.add_argument("--data-option", nargs="*", default=[], metavar="KEY=VALUE", type=parse_override,
                        help="dataset options, e.g. --data-option size=small")
    parser.add_argument("--progress", default="text", choices=["auto", "text", "off"])
    parser.add_argument("--track", nargs="*", default=[], metavar="NAME",
                        help=f"experiment trackers for this run: {', '.join(TRACKERS.names())} (default: none; "
                             "TensorBoard writes into the run folder's tb/)")
    parser.add_argument("--workers", type=int, default=None,
                        help="image decoding processes per rank (default: $RFT_WORKERS or the CPUs per rank - 1)")
    parser.add_argument("--memory-budget", default=None,
                        help="RAM a training split decoded once may take, e.g. 4G (default: $RFT_MEMORY_BUDGET)")
    parser.add_argument("--input-path", default="auto", choices=list(INPUT_PATHS),
                        help="training input: auto (the memory budget decides), memory or stream")
    parser.add_argument("--on-bad-image", default="raise", choices=list(BAD_IMAGE_POLICIES),
                        help="an unreadable training image stops the run (raise) or is dropped and counted (skip)")
    parser.add_argument("--prepared", default=None,
                        help="train from a copy written by data_scripts/prepare_cache.py (this folder)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """``python -m rftlib.train ...``: resolve every input (or exit 2 in one line), then run."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    loader, data = _resolve_inputs(parser, args)
    info = rdist.init_distributed(args.device)
    device = torch.device(args.device, info.local_rank) if args.device == "cuda" else torch.device(args.device)
    pretrained = None if args.pretrained.lower() == "none" else args.pretrained
    result = run_method(args.method, data=data, model=args.model, pretrained=pretrained, device=device,
                        out_dir=args.out_dir, seed=args.seed, results_db=args.results_db, overrides=dict(args.set),
                        progress=args.progress, loader=loader, force=args.force, track=tuple(args.track))
    if info.is_main:
        print(json.dumps(result.summary(), indent=1, default=str))


def _resolve_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[LoaderSettings, RFTDataset]:
    """Check the names, the config overrides and the loader settings (cheap, first), then load the data.

    Returns the loader settings and the dataset; an input they refuse ends the command through
    ``parser.error``, in one line naming the option.
    """
    with _one_line_error(parser, "--method"):
        get_method(args.method)
    with _one_line_error(parser, "--dataset"):
        DATASETS.get(args.dataset)
    with _one_line_error(parser, "--set"):
        get_config(args.method, args.dataset.lower(), dict(args.set))
    with _one_line_error(parser, "--device"):
        resolve_device(args.device)
    with _one_line_error(parser, "--track", (*INPUT_ERRORS, ImportError)):
        resolve_track(args.track)
    with _one_line_error(parser, "--workers/--memory-budget/--prepared"):
        loader = LoaderSettings(workers=args.workers, memory_budget=args.memory_budget, input_path=args.input_path,
                                on_bad_image=args.on_bad_image, prepared=args.prepared)
    with _one_line_error(parser, "--data-option"), _one_line_error(parser, "--data-root", (DataNotFoundError,)):
        options = data_options_for(args.method, args.dataset, dict(args.data_option), seed=args.seed)
        data = get_dataset(args.dataset, root=args.data_root, **options)
    return loader, data


@contextmanager
def _one_line_error(parser: argparse.ArgumentParser, option: str,
                    errors: tuple[type[Exception], ...] = INPUT_ERRORS) -> Iterator[None]:
    """Turn ``errors`` raised in the block into ``parser.error("<option>: <message>")`` (exit status 2)."""
    try:
        yield
    except errors as err:
        parser.error(f"{option}: {' '.join(str(err).split())}")  # one line even if the message had several
