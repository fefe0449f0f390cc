"""The synthwild phenomenon report: zero-shot, fine-tuning and the WiSE-FT curve, ID vs OOD.

    python -m rftlib.reports.synthwild              # zero-shot + FT + WiSE-FT sweep (~2-3 min on CPU)
    python -m rftlib.reports.synthwild --zeroshot-only

It measures what the embedded world exists to show: a robust but mediocre zero-shot model; standard
fine-tuning that raises ID macro-F1 much more than OOD macro-F1; and WiSE-FT mixtures that beat
both end points out of distribution. Every number comes from :func:`rftlib.methods.run_method`
(the same code the notebooks call) and is also written to the results store. The targets
(issue "The embedded default") are checked and printed as PASS/FAIL.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import pandas as pd

from ..cli import parse_override

ID_SPLIT, OOD_SPLIT, METRIC = "id_test", "test", "macro_f1"
TARGETS = {
    "zeroshot_min": 0.25,      # zero-shot macro-F1 on both id_test and test
    "zeroshot_gap": 0.10,      # |ID - OOD| of zero-shot
    "ft_id_gain": 0.25,        # FT ID gain over zero-shot
    "ood_gain_ratio": 0.5,     # FT OOD gain <= this x ID gain
    "wise_margin": 0.03,       # best interior alpha beats both end points on OOD by this much
}


def measure(*, model: str = "synthclip", pretrained: str = "synthclip", seed: int = 0, device: str = "cpu",
            results_db: str | None = None, zeroshot_only: bool = False, overrides: dict | None = None,
            dataset_options: dict | None = None, alphas=None) -> dict:
    """Run zero-shot (and FT + WiSE-FT) on synthwild; returns the numbers as plain dicts."""
    from ..data import get_dataset
    from ..methods import run_method

    data = get_dataset("synthwild", **(dataset_options or {}))
    common = dict(data=data, model=model, pretrained=pretrained, seed=seed, device=device, results_db=results_db,
                  progress="off")
    out: dict = {}
    start = time.time()
    zs = run_method("zeroshot", **common)
    out["zeroshot"] = _pair(zs.metrics)
    out["minutes"] = {"zeroshot": (time.time() - start) / 60}
    if zeroshot_only:
        return out
    start = time.time()
    ft = run_method("finetune", overrides=overrides, **common)
    out["finetune"] = _pair(ft.metrics)
    out["minutes"]["finetune"] = (time.time() - start) / 60
    start = time.time()
    wise_cfg = {"finetuned": str(ft.checkpoint)}
    if alphas is not None:
        wise_cfg["alphas"] = list(alphas)
    wise = run_method("wiseft", overrides=wise_cfg, **common)
    table = wise.extra["sweep"]
    curve = table[(table.metric == METRIC) & table.split.isin([ID_SPLIT, OOD_SPLIT])]
    out["wiseft"] = {float(a): _pair({s: {METRIC: v} for s, v in zip(g.split, g.value)})
                     for a, g in curve.groupby("alpha")}
    out["minutes"]["wiseft"] = (time.time() - start) / 60
    return out


def _pair(metrics: dict) -> dict:
    return {"id": round(metrics[ID_SPLIT][METRIC], 4), "ood": round(metrics[OOD_SPLIT][METRIC], 4)}


def check_targets(numbers: dict) -> list[tuple[str, bool, str]]:
    """(name, passed, detail) for every target that the measured numbers allow checking."""
    zs = numbers["zeroshot"]
    checks = [
        ("zero-shot >= 0.25 on ID and OOD", min(zs["id"], zs["ood"]) >= TARGETS["zeroshot_min"],
         f"ID {zs['id']:.3f}, OOD {zs['ood']:.3f}"),
        ("zero-shot |ID - OOD| <= 0.10", abs(zs["id"] - zs["ood"]) <= TARGETS["zeroshot_gap"],
         f"gap {abs(zs['id'] - zs['ood']):.3f}"),
    ]
    if "finetune" in numbers:
        ft = numbers["finetune"]
        d_id, d_ood = ft["id"] - zs["id"], ft["ood"] - zs["ood"]
        checks += [
            ("FT raises ID by >= 0.25", d_id >= TARGETS["ft_id_gain"], f"ID gain {d_id:+.3f}"),
            ("FT OOD gain <= half the ID gain", d_ood <= TARGETS["ood_gain_ratio"] * d_id,
             f"OOD gain {d_ood:+.3f} vs {TARGETS['ood_gain_ratio'] * d_id:+.3f}"),
        ]
        curve = numbers["wiseft"]
        interior = {a: v["ood"] for a, v in curve.items() if 0 < a < 1}
        best = max(interior, key=interior.get)
        margin = interior[best] - max(curve[0.0]["ood"], curve[1.0]["ood"])
        checks.append(("best interior WiSE-FT alpha beats both ends on OOD by >= 0.03",
                       margin >= TARGETS["wise_margin"],
                       f"alpha {best}: OOD {interior[best]:.3f}, margin {margin:+.3f}"))
    return checks


def format_report(numbers: dict) -> str:
    rows = [("zero-shot", numbers["zeroshot"])]
    if "finetune" in numbers:
        rows.append(("fine-tuned (FT)", numbers["finetune"]))
        rows += [(f"WiSE-FT alpha={a:.2f}", v) for a, v in sorted(numbers["wiseft"].items())]
    frame = pd.DataFrame([{"model": n, "ID macro-F1 (id_test)": v["id"], "OOD macro-F1 (test)": v["ood"]}
                          for n, v in rows])
    lines = ["synthwild: synthclip zero-shot vs fine-tuning", frame.to_string(index=False, float_format="%.3f"), ""]
    lines += [f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}" for name, ok, detail in check_targets(numbers)]
    lines.append("minutes: " + ", ".join(f"{k} {v:.1f}" for k, v in numbers["minutes"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default="synthclip", help="synthclip weights (tag or file)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results-db", default=None)
    parser.add_argument("--zeroshot-only", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", type=parse_override,
                        help="fine-tuning overrides, e.g. --set augment=rrc epochs=6")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    overrides = dict(args.set)
    numbers = measure(pretrained=args.pretrained, seed=args.seed, device=args.device, results_db=args.results_db,
                      zeroshot_only=args.zeroshot_only, overrides=overrides)
    print(format_report(numbers))
    if args.json:
        print(json.dumps(numbers, indent=1))


if __name__ == "__main__":
    main()
