"""The task-accuracy table: results/accuracy.json, written by the summary job (the organism's table,
benchmarks/results/organism_table.json, is a copy of it).

A list of rows, one per summary row and lmms-eval score with per-question statistics (exact_match: a 0/1
score per question, so its mean is an accuracy):
  model, calib (null for fp), run, method (fp, rtn, awq, mbq, gptq, smoothquant; "+gptq" when GPTQ rounds the
  weights after the method's scales), scheme, calib_format (plain, few_shot, interleave, text; null for fp),
  score ("<task>.<metric>"), accuracy (the score, a fraction), accuracy_se, p_vs_rtn, p_vs_awq (summary.py)
"""
import json

import pandas as pd

from vlmquant.eval.lmms_results import COLUMN_PREFIX
from vlmquant.io.atomic import atomic_path

KEYS = ("model", "calib", "run", "method", "scheme", "calib_format")
FIELDS = {"accuracy": "", "accuracy_se": "_se", "p_vs_rtn": "_p_vs_rtn", "p_vs_awq": "_p_vs_awq"}  # column suffixes


def accuracy_rows(summary):
    """The rows above from a summary DataFrame (report.summary.summarize, or summary.parquet/.csv read back)."""
    scores = [c for c in summary.columns if c.startswith(COLUMN_PREFIX) and f"{c}_se" in summary.columns]
    rows = []
    for score in scores:
        for r in summary.to_dict("records"):
            if _null(r[score]):
                continue
            row = {k: None if _null(r[k]) else r[k] for k in KEYS}
            if r["gptq"] and r["method"] != "gptq":
                row["method"] += "+gptq"
            row["score"] = score.removeprefix(COLUMN_PREFIX)
            for name, suffix in FIELDS.items():
                row[name] = None if _null(r[score + suffix]) else float(r[score + suffix])
            rows.append(row)
    return rows


def write_accuracy(summary, path):
    """accuracy_rows of `summary` as JSON at `path` (atomically); `[]` when no score has per-question results."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(accuracy_rows(summary), indent=1) + "\n")


def _null(value):
    return value is None or pd.isna(value)
