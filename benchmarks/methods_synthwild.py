"""Every method's default synthwild run: ID/OOD macro-F1, open-set detection and wall time.

    python benchmarks/methods_synthwild.py                    # all methods, seed 0
    python benchmarks/methods_synthwild.py --methods finetune wiseft --seeds 0 1
    python benchmarks/methods_synthwild.py --set augment=rrc  # an override, for every method that has it

Each method runs through :func:`rftlib.methods.run_method` with its synthwild preset, exactly what
``python -m rftlib.train --method NAME`` and the notebooks run, into a throw-away results store and
checkpoint folder. ``wiseft`` merges with the ``finetune`` run of the same seed (its time is the
sweep alone); ``dps`` includes its reference run (mask ratio 0) in its time.

Columns: ID = ``id_test`` macro-F1, OOD = ``test`` macro-F1 (the unseen cameras), ``openset``
= energy-score AUROC / FPR@95 of held-out species against ``id_test`` (CRoFT only). Nothing is
asserted: this prints what the defaults give on this machine so a change can be compared.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from rftlib.cli import parse_override
from rftlib.data import get_dataset
from rftlib.methods import applicable_overrides, list_methods, run_method
from rftlib.models import load_clip


def run_one(method: str, seed: int, data, work: Path, finetuned: dict[int, Path], extra: dict,
            results_db: str | None = None, device: str = "cpu") -> dict:
    """Run ``method`` once on its preset (plus the ``extra`` overrides it has) and return one table row."""
    overrides = applicable_overrides(method, "synthwild", extra)
    if method == "wiseft" and seed in finetuned:
        overrides["finetuned"] = str(finetuned[seed])
    clip = load_clip("synthclip", "synthclip")
    start = time.perf_counter()
    result = run_method(method, data=data, clip=clip, seed=seed, device=device,
                        results_db=results_db or str(work / "results.db"),
                        out_dir=work / f"{method}-{seed}", progress="off", overrides=overrides)
    seconds = time.perf_counter() - start
    if method == "finetune" and result.checkpoint is not None:
        finetuned[seed] = result.checkpoint
    m = result.metrics
    row = {"method": method, "seed": seed, "ID": m["id_test"]["macro_f1"], "OOD": m["test"]["macro_f1"],
           "seconds": round(seconds, 1)}
    detection = m.get("openset", {})
    if "energy_auroc" in detection:
        row["openset AUROC"] = detection["energy_auroc"]
        row["openset FPR95"] = detection["energy_fpr95"]
    return row


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list_methods(), choices=list_methods(),
                        help="default: every registered method (alphabetical, so finetune runs before wiseft)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--device", default="cpu", help="cpu (the numbers in the notes) or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", type=parse_override,
                        help="config overrides for every method whose config has the field, e.g. augment=rrc")
    parser.add_argument("--results-db", default=None,
                        help="keep the runs' rows in this results store (e.g. to open compare.ipynb on it; "
                             "default: a throw-away one)")
    args = parser.parse_args(argv)
    extra = dict(args.set)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = get_dataset("synthwild")
    rows, finetuned = [], {}
    with tempfile.TemporaryDirectory(prefix="rft-bench-") as tmp:
        for seed in args.seeds:
            for method in args.methods:
                row = run_one(method, seed, data, Path(tmp), finetuned, extra, args.results_db, args.device)
                rows.append(row)
                print(f"  {method:<13} seed {seed}: ID {row['ID']:.3f}  OOD {row['OOD']:.3f}  {row['seconds']:.0f} s",
                      flush=True)
    table = pd.DataFrame(rows)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU thread(s)"
    print(f"\nsynthwild defaults on {where} (torch {torch.__version__})")
    print(table.round(3).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
