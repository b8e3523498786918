"""Task accuracy of the trained organism (config/organism.yaml's model and calibration set) quantized at harsher
schemes than the shipped config's: which schemes make RTN lose accuracy, and do the methods separate there.

Snakemake builds pseudo checkpoints in --work (config.yaml and config/organism.yaml of this checkout, plus the
runs as a third --configfile; lmms-eval off); the fp model and each checkpoint then answer the first --limit
held-out questions in this process (vlmquant.organism.score.accuracy: greedy decoding, exact match; a
weight-activation checkpoint with its linear inputs fake-quantized). First RTN at every --schemes, then the
--methods at the schemes where RTN loses --separate-at points or more. accuracy_se = sqrt(p (1 - p) / n).
No NLL/KL eval, packing or lmms-eval. Rerunning with the same --work rebuilds only what changed.

    python benchmarks/organism_regimes.py --work /tmp/organism_regimes --out benchmarks/results/organism_regimes_cpu.json
"""
import argparse
import math
import sys
import time
from pathlib import Path

import yaml

from common import REPO, environment, run_workflow, write_json
from vlmquant import paths
from vlmquant.organism.score import accuracy

MODEL, CALIB = "organism-qwen2vl", "organism"
SCHEMES = {  # name: the run settings it adds to the method (w_group -1: one group per output channel)
    "w3g128": {"w_bit": 3, "w_group": 128},
    "w3ch": {"w_bit": 3, "w_group": -1},
    "w3g64": {"w_bit": 3, "w_group": 64},
    "w3g32": {"w_bit": 3, "w_group": 32},
    "w2g128": {"w_bit": 2, "w_group": 128},
    "w2g64": {"w_bit": 2, "w_group": 64},
    "w2g32": {"w_bit": 2, "w_group": 32},
    "w2g16": {"w_bit": 2, "w_group": 16},
    "w2ch": {"w_bit": 2, "w_group": -1},
    "w4a8": {"w_bit": 4, "a_bit": 8},
    "w4a6": {"w_bit": 4, "a_bit": 6},
    "w4a4": {"w_bit": 4, "a_bit": 4},
    "w4a3": {"w_bit": 4, "a_bit": 3},
    "w8a3": {"w_bit": 8, "a_bit": 3},
    "w3a8": {"w_bit": 3, "a_bit": 8},
    "w3a4": {"w_bit": 3, "a_bit": 4},
    "w2a8": {"w_bit": 2, "a_bit": 8},
}
METHODS = ("awq", "mbq", "gptq")  # next to RTN, on the schemes where RTN loses accuracy


def runs(methods, schemes):
    """{run name: settings} for every method x scheme (GPTQ rounds weight-only schemes only); pseudo checkpoints."""
    return {f"{m}-{s}": {"method": m, **SCHEMES[s], "formats": ["pseudo"]} for s in schemes for m in methods
            if not (m == "gptq" and "a_bit" in SCHEMES[s])}


def build(work, run_cfg, cores):
    """The pseudo checkpoints of `run_cfg` ({run: settings}) under `work`, by Snakemake; returns its seconds."""
    work.mkdir(parents=True, exist_ok=True)
    extra = work / "regimes.yaml"
    extra.write_text(yaml.safe_dump({"runs": run_cfg, "targets": {"runs": list(run_cfg)},
                                     "lmms_eval": {"enabled": False}}, sort_keys=False))
    targets = [paths.CHECKPOINT.format(model=MODEL, calib=CALIB, run=r) for r in run_cfg]
    targets += [paths.ORGANISM_MODEL, f"{paths.ORGANISM_DATA}/heldout.parquet"]
    return run_workflow(work, [REPO / "config" / "organism.yaml", extra], targets, cores, quiet=True)


def scored(folder, parquet, limit):
    start = time.perf_counter()
    got = accuracy(folder, parquet, limit=limit)
    p, n = got["overall"], got["n"]
    return {"accuracy": p, "accuracy_se": round(math.sqrt(p * (1 - p) / n), 4), "n": n, "per_kind": got["per_kind"],
            "score_seconds": round(time.perf_counter() - start, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="Snakemake's working folder (results/ goes there)")
    ap.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=["awq", "mbq"],
                    help="run next to RTN on the schemes where RTN loses --separate-at points or more")
    ap.add_argument("--separate-at", type=float, default=5.0, help="points of accuracy RTN loses vs fp")
    ap.add_argument("--limit", type=int, default=1000, help="held-out questions scored (1000 in all)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    parquet = args.work / paths.ORGANISM_DATA / "heldout.parquet"
    seconds, rows = {}, []

    def measure(run_cfg):
        seconds[f"build_{len(seconds)}"] = round(build(args.work, run_cfg, args.cores), 1)
        if not rows:
            rows.append({"run": "fp", "method": "fp", "scheme": "fp",
                         **scored(args.work / paths.ORGANISM_MODEL, parquet, args.limit)})
        for run, cfg in run_cfg.items():
            folder = args.work / paths.CHECKPOINT.format(model=MODEL, calib=CALIB, run=run)
            row = {"run": run, "method": cfg["method"], "scheme": run.split("-", 1)[1], "settings": cfg,
                   **scored(folder, parquet, args.limit)}
            row["loss_vs_fp_points"] = round(100 * (rows[0]["accuracy"] - row["accuracy"]), 1)
            rows.append(row)
            print(f"{run}: {row['accuracy']:.3f} ± {row['accuracy_se']:.3f}", file=sys.stderr)

    measure(runs(["rtn"], args.schemes))
    separating = [r["scheme"] for r in rows[1:] if r["loss_vs_fp_points"] >= args.separate_at]
    if separating:
        measure(runs(args.methods, separating))
    write_json(args.out, {"settings": {"model": MODEL, "calib": CALIB, "limit": args.limit, "cores": args.cores,
                                       "separate_at_points": args.separate_at, "methods": args.methods,
                                       "scorer": "vlmquant.organism.score.accuracy (greedy, exact match)"},
                          "separating_schemes": separating, "environment": environment(), "build_seconds": seconds,
                          "rows": rows})


if __name__ == "__main__":
    main()
