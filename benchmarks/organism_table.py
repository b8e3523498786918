"""The organism's task-accuracy table (issue 31): every run of config/organism.yaml, then AWQ and MBQ calibrated
without images (config/organism-text.yaml), each row with its standard error and McNemar p-values vs RTN and AWQ
of the same scheme (the summary's results/accuracy.json). Snakemake builds everything in --work from this
checkout (lmms-eval must be installed: README, "The model organism"); rerunning with the same --work rebuilds
only what changed.

    python benchmarks/organism_table.py --work /tmp/organism_table --out benchmarks/results/organism_table.json

Writes --out: the list of accuracy.json rows (run, method, scheme, calib_format, accuracy, accuracy_se,
p_vs_rtn, p_vs_awq, model, calib, score), the organism config's rows first, then the text-calibrated ones with
`p_vs_image`: the exact McNemar p-value against the same run calibrated with images; and next to it
<stem>_summary.csv and <stem>_text_summary.csv, the two summaries (NLL, KL, hidden errors).
"""
import argparse
import json
import shutil
from pathlib import Path

from common import REPO, run_workflow
from vlmquant import paths
from vlmquant.eval.lmms_results import COLUMN_PREFIX, read_sample_scores
from vlmquant.report.significance import mcnemar_p

IMAGE_CALIB, TEXT_CALIB = "organism", "organism-text"


def p_vs_image(work, row):
    """McNemar p-value of a text-calibrated row against the same run calibrated with images (same questions)."""
    def scores(calib):
        folder = work / paths.LMMS.format(model=row["model"], calib=calib, run=row["run"])
        return read_sample_scores(folder)[COLUMN_PREFIX + row["score"]]
    return mcnemar_p(scores(IMAGE_CALIB), scores(TEXT_CALIB), f"{row['run']} image vs text")


def build(work, configs, cores):
    """Snakemake's default target under `work` with config.yaml and `configs`; returns (accuracy rows, seconds)."""
    seconds = run_workflow(work, configs, cores=cores)
    return json.loads((work / paths.ACCURACY).read_text()), seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/organism_table"))
    ap.add_argument("--cores", default="all")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    organism = REPO / "config" / "organism.yaml"
    rows, s1 = build(args.work, [organism], args.cores)
    summary = args.out.with_name(f"{args.out.stem}_summary.csv")
    shutil.copy(args.work / paths.SUMMARY_CSV, summary)
    text_rows, s2 = build(args.work, [organism, REPO / "config" / "organism-text.yaml"], args.cores)
    shutil.copy(args.work / paths.SUMMARY_CSV, args.out.with_name(f"{args.out.stem}_text_summary.csv"))
    rows += [{**r, "p_vs_image": p_vs_image(args.work, r)} for r in text_rows if r["calib"] == TEXT_CALIB]
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"{len(rows)} rows in {args.out}, {summary}; {s1:.0f} s + {s2:.0f} s")


if __name__ == "__main__":
    main()
