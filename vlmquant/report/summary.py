"""One row per (model, calib, run), plus one fp row per model: main metrics, bits and stage wall times.

Columns:
  model, calib (null for fp), run ("fp" for the fp model), method (fp / rtn / awq / mbq), w_bit (the fp
  row: bits of the model dtype), w_group (null per output channel), a_bit (null: weight-only), eval_calib,
  n_samples, n_caption_tokens,
  caption_nll, caption_ppl, kl, top1_agreement            caption positions of the eval set
  lmms.<task>.<metric>                                    lmms-eval scores (e.g. lmms.vlmquant_vqa.exact_match, the
                                                          organism's task accuracy), only with lmms_eval enabled
  hidden_err_vision, hidden_err_text                      relative MSE of the decoder-layer outputs, mean over layers
  hidden_err_vision_last, hidden_err_text_last            the same at the last decoder layer
  weight_err, weight_err_scaled                           relative Frobenius weight error, mean over layers
  time_<stage>_s                                          wall seconds from the stage's Snakemake benchmark file
                                                          (grads, acts, search = sum over chunk jobs, export, eval;
                                                          grads and acts are shared by the runs of a model and
                                                          calibration set); time_total_s = their sum.
A stage a run does not need (RTN: grads, acts, search) or whose benchmark file is missing is null.
"""
import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from vlmquant.errors import VlmquantError
from vlmquant.eval.lmms_results import COLUMN_PREFIX, read_scores
from vlmquant.eval.table import read_table
from vlmquant.io.atomic import atomic_path
from vlmquant.io.provenance import dumps, package_versions

STAGES = ("grads", "acts", "search", "export", "pack", "eval")
DTYPE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16, "float64": 64}
COLUMNS = ["model", "calib", "run", "method", "w_bit", "w_group", "a_bit", "eval_calib", "n_samples", "n_caption_tokens",
           "caption_nll", "caption_ppl", "kl", "top1_agreement", "hidden_err_vision", "hidden_err_text",
           "hidden_err_vision_last", "hidden_err_text_last", "weight_err", "weight_err_scaled",
           *[f"time_{s}_s" for s in STAGES], "time_total_s"]


def metric(df, name, modality=None, layer="model"):
    rows = df[df.metric == name]
    if modality is not None:
        rows = rows[rows.modality == modality]
    if layer == "model":
        rows = rows[rows.layer.isna()]
        return float(rows.value.iloc[0]) if len(rows) else math.nan
    return rows


def layer_mean(df, name, modality=None):
    rows = metric(df, name, modality, layer="all")
    return float(rows.value.mean()) if len(rows) else math.nan


def layer_last(df, name, modality):
    rows = metric(df, name, modality, layer="all")
    return float(rows.sort_values("layer").value.iloc[-1]) if len(rows) else math.nan


def table_row(path):
    """The summary metrics of one eval or fp table."""
    df, meta = read_table(path)
    fp = meta.get("method") == "fp"
    row = {"model": meta.get("model"), "calib": meta.get("calib"), "run": "fp" if fp else meta.get("run"),
           "method": meta.get("method"), "eval_calib": meta.get("eval_calib"),
           "w_bit": DTYPE_BITS.get(meta.get("dtype"), math.nan) if fp else meta.get("w_bit"),
           "w_group": None if fp or meta.get("a_bit") else meta.get("w_group"),
           "a_bit": None if fp else meta.get("a_bit")}
    for name in ("n_samples", "n_caption_tokens", "caption_nll", "caption_ppl", "kl", "top1_agreement"):
        row[name] = metric(df, name)
    for mod in ("vision", "text"):
        row[f"hidden_err_{mod}"] = 0.0 if fp else layer_mean(df, "hidden_rel_mse", mod)
        row[f"hidden_err_{mod}_last"] = 0.0 if fp else layer_last(df, "hidden_rel_mse", mod)
    row["weight_err"] = 0.0 if fp else layer_mean(df, "weight_rel_err")
    row["weight_err_scaled"] = 0.0 if fp else layer_mean(df, "weight_rel_err_scaled")
    return row


def bench_seconds(paths):
    """Sum of the `s` column of Snakemake benchmark files; null when any is missing."""
    total = 0.0
    for p in paths:
        try:
            total += float(pd.read_csv(p, sep="\t")["s"].sum())
        except (OSError, KeyError, ValueError, pd.errors.EmptyDataError):
            return math.nan
    return total if paths else math.nan


def summarize(tables, benchmarks):
    """tables: [{"model", "calib", "run", "path", "lmms" (optional: lmms-eval results folder)}] (fp: run "fp",
    calib None); benchmarks: {(model, calib, run): {stage: [benchmark tsv paths]}} → DataFrame of COLUMNS,
    with the lmms-eval scores of any row inserted after top1_agreement (null where a row has none)."""
    rows, scores = [], []
    for t in tables:
        row = table_row(t["path"])
        if t.get("lmms"):
            row.update(read_scores(t["lmms"]))
            scores += [k for k in row if k.startswith(COLUMN_PREFIX) and k not in scores]
        for key in ("model", "calib", "run"):
            if row[key] != t[key]:
                raise VlmquantError(f"{t['path']}: table is for {key}={row[key]!r}, expected {t[key]!r}")
        bench = benchmarks.get((t["model"], t["calib"], t["run"]), {})
        for stage in STAGES:
            row[f"time_{stage}_s"] = bench_seconds(bench.get(stage, []))
        times = [row[f"time_{s}_s"] for s in STAGES if not math.isnan(row[f"time_{s}_s"])]
        row["time_total_s"] = sum(times) if times else math.nan
        rows.append(row)
    at = COLUMNS.index("top1_agreement") + 1
    df = pd.DataFrame(rows, columns=[*COLUMNS[:at], *scores, *COLUMNS[at:]])
    df["w_bit"] = df["w_bit"].astype("Int64")
    df["w_group"] = df["w_group"].astype("Int64")
    df["a_bit"] = df["a_bit"].astype("Int64")
    for col in ("n_samples", "n_caption_tokens"):
        df[col] = df[col].astype("Int64")
    return df


def write_summary(df, csv_path, parquet_path):
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"vlmquant": dumps({"packages": package_versions()}).encode()})
    with atomic_path(parquet_path) as tmp:
        pq.write_table(table, tmp)
