"""One row per (model, calib, run), plus one fp row per model: main metrics, bits and stage wall times.

Columns:
  model, calib (null for fp), run ("fp" for the fp model), method (fp / rtn / awq / mbq), scheme (how the
  weights/activations are stored: quant.scheme.Scheme.name, e.g. w3a16-asym-g128, w8a8-sym-ch (int8) or fp8; the
  fp row: the model dtype), w_bit (the fp row: bits of the model dtype), w_group (null per output channel),
  a_bit (null: weight-only), eval_calib, n_samples, n_caption_tokens,
  caption_nll, caption_ppl, kl, top1_agreement            caption positions of the eval set
  lmms.<task>.<metric>                                    lmms-eval scores (e.g. lmms.vlmquant_vqa.exact_match, the
                                                          organism's task accuracy), only with lmms_eval enabled
  lmms.<task>.<metric>_se                                 its standard error over the questions (significance.py)
  lmms.<task>.<metric>_p_vs_rtn, _p_vs_awq                exact McNemar p-value against the RTN run (any calib: RTN
                                                          reads none) / the plain AWQ run (same calib; no GPTQ, no
                                                          distort) of the same model, eval_calib and scheme; null
                                                          for that run itself, without one, or for scores not 0/1
  hidden_err_vision, hidden_err_text                      relative MSE of the decoder-layer outputs, mean over layers
  hidden_err_vision_last, hidden_err_text_last            the same at the last decoder layer
  weight_err, weight_err_scaled                           relative Frobenius weight error, mean over layers
  delta_nll_fp                                            caption_nll minus the fp row's (same model)
  delta_nll_rtn, kl_ratio_rtn                             caption_nll minus, and kl divided by, those of the RTN
                                                          run with the same model, calib, eval_calib and scheme
                                                          (null without one; 0 and 1 on that RTN row)
  calib_format                                            the calibration set's `format` (null for fp)
  gptq, distort                                           GPTQ rounding (bool) and the run's `distort` (null: none)
  time_<stage>_s                                          wall seconds from the stage's Snakemake benchmark file
                                                          (grads, acts, search = sum over chunk jobs, export, pack, eval;
                                                          grads and acts are shared by the runs of a model and
                                                          calibration set); time_total_s = their sum.
A stage a run does not need (RTN: grads, acts, search) or whose benchmark file is missing is null.
"""
import math
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from vlmquant import paths
from vlmquant.errors import VlmquantError
from vlmquant.eval.lmms_results import COLUMN_PREFIX, read_sample_scores, read_scores
from vlmquant.eval.table import read_table
from vlmquant.io.atomic import atomic_path
from vlmquant.io.provenance import dumps, package_versions
from vlmquant.quant.scheme import Scheme
from vlmquant.report.significance import is_binary, mcnemar_p, standard_error

STAGES = ("grads", "acts", "search", "export", "pack", "eval")
DTYPE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16, "float64": 64}
COLUMNS = ["model", "calib", "run", "method", "scheme", "w_bit", "w_group", "a_bit", "eval_calib", "n_samples",
           "n_caption_tokens", "caption_nll", "caption_ppl", "kl", "top1_agreement", "hidden_err_vision", "hidden_err_text",
           "hidden_err_vision_last", "hidden_err_text_last", "weight_err", "weight_err_scaled",
           "delta_nll_fp", "delta_nll_rtn", "kl_ratio_rtn", "calib_format", "gptq", "distort",
           *[f"time_{s}_s" for s in STAGES], "time_total_s"]
# the columns of the report's table (summary.html), with their headers
HTML_COLUMNS = {"model": "model", "calib": "calib", "run": "run", "method": "method", "scheme": "scheme",
                "w_bit": "w bits", "w_group": "group", "a_bit": "a bits", "caption_nll": "caption NLL", "delta_nll_fp": "ΔNLL vs fp",
                "delta_nll_rtn": "ΔNLL vs RTN", "kl": "KL vs fp", "kl_ratio_rtn": "KL / RTN's",
                "top1_agreement": "top-1 agreement", "hidden_err_vision": "hidden err. vision",
                "hidden_err_text": "hidden err. text", "weight_err": "weight err.", "time_total_s": "time (s)"}
SCHEME = ["model", "calib", "eval_calib", "scheme"]  # the rows that share an RTN reference
STATS = ("_se", "_p_vs_rtn", "_p_vs_awq")  # suffixes of the per-question statistics of an lmms-eval score


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
           "scheme": meta.get("dtype") if fp else scheme_name(meta),
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
    run_config = (meta.get("quantization") or {}).get("run_config") or {}
    row["gptq"] = meta.get("method") == "gptq" or bool(run_config.get("gptq"))
    row["distort"] = run_config.get("distort")
    return row


def scheme_name(meta):
    """Scheme.name of an eval table's checkpoint (its quantization.json `scheme`); None for tables of an older
    vlmquant, which did not record it."""
    scheme = (meta.get("quantization") or {}).get("scheme")
    return Scheme(**scheme).name if scheme else None


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
    """tables: [{"model", "calib", "run", "path", "calib_format" (optional), "lmms" (optional: lmms-eval results
    folder)}] (fp: run "fp", calib None); benchmarks: {(model, calib, run): {stage: [benchmark tsv paths]}} →
    DataFrame of COLUMNS, with the lmms-eval scores of any row and their STATS columns inserted after
    top1_agreement (null where a row has none)."""
    rows, scores, per_question = [], [], []
    for t in tables:
        row = table_row(t["path"])
        row["calib_format"] = t.get("calib_format")
        per_question.append({})
        if t.get("lmms"):
            row.update(read_scores(t["lmms"]))
            per_question[-1] = read_sample_scores(t["lmms"])
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
    with_stats = {k for q in per_question for k in q}
    scores = [c for k in scores for c in ([k, *[k + s for s in STATS]] if k in with_stats else [k])]
    at = COLUMNS.index("top1_agreement") + 1
    df = relative_columns(pd.DataFrame(rows, columns=[*COLUMNS[:at], *scores, *COLUMNS[at:]]))
    significance_columns(df, per_question)
    df["w_bit"] = df["w_bit"].astype("Int64")
    df["w_group"] = df["w_group"].astype("Int64")
    df["a_bit"] = df["a_bit"].astype("Int64")
    for col in ("n_samples", "n_caption_tokens"):
        df[col] = df[col].astype("Int64")
    df.attrs["random_demo"] = random_demo_models(tables)  # for summary_html's warning
    return df


def random_demo_models(tables):
    """The models whose fp table was measured on a random-init demo model (paths.DEMO_MODEL, not the trained
    organism): their metrics differ between methods by noise."""
    demo = re.compile(re.escape(paths.DEMO_MODEL).replace(r"\{family\}", "[a-z0-9_]+"))
    return [t["model"] for t in tables if t["run"] == "fp"
            and demo.fullmatch(Path(read_table(t["path"])[1].get("model_path", "")).as_posix())]


def relative_columns(df):
    """Fill delta_nll_fp, delta_nll_rtn and kl_ratio_rtn (see the module docstring)."""
    fp = df[df.run == "fp"].drop_duplicates(["model", "eval_calib"])[["model", "eval_calib", "caption_nll"]]
    ref_fp = df[["model", "eval_calib"]].merge(fp, on=["model", "eval_calib"], how="left")  # row order kept
    df["delta_nll_fp"] = df.caption_nll - ref_fp.caption_nll.to_numpy()
    rtn = df[df.method == "rtn"].drop_duplicates(SCHEME)
    ref = df[SCHEME].merge(rtn[[*SCHEME, "caption_nll", "kl"]], on=SCHEME, how="left")  # row order kept
    df["delta_nll_rtn"] = (df.caption_nll - ref.caption_nll.to_numpy()).where(df.run != "fp")
    df["kl_ratio_rtn"] = (df.kl / ref.kl.to_numpy()).where(df.run != "fp")
    return df


def significance_columns(df, per_question):
    """Fill the STATS columns of every lmms-eval score from `per_question` ([{score column: {doc_id: score}}], one
    per row of `df`; see the module docstring)."""
    same = ["model", "eval_calib", "scheme"]
    plain_awq = (df.method == "awq") & ~df.gptq.astype(bool) & df.distort.isna()
    refs = {"rtn": reference_rows(df, df.method == "rtn", same),  # any calib: RTN reads none
            "awq": reference_rows(df, plain_awq, ["calib", *same])}
    for col in [c for c in df.columns if c + "_se" in df.columns]:
        df[col + "_se"] = [standard_error(q[col]) if col in q else math.nan for q in per_question]
        for name, ref in refs.items():
            p = [math.nan] * len(df)
            for i, j in enumerate(ref):
                a, b = per_question[i].get(col), None if j is None else per_question[j].get(col)
                if a is not None and b is not None and is_binary(a) and is_binary(b):
                    where = f"{col} of {df.calib.iat[i]}/{df.run.iat[i]} vs {df.calib.iat[j]}/{df.run.iat[j]}"
                    p[i] = mcnemar_p(a, b, where)
            df[f"{col}_p_vs_{name}"] = p


def reference_rows(df, candidates, keys):
    """Per row of `df`, the index of the first `candidates` row (bool Series) equal to it on `keys`; None for fp
    rows, rows without one, and that row itself."""
    pool = [j for j in range(len(df)) if candidates.iat[j]]
    out = []
    for i in range(len(df)):
        j = next((j for j in pool if all(df[k].iat[j] == df[k].iat[i] for k in keys)), None)
        out.append(None if j == i or df.run.iat[i] == "fp" else j)
    return out


def summary_html(df):
    """The summary as an HTML page holding one table (HTML_COLUMNS and the lmms-eval scores after top-1
    agreement), for `snakemake --report`."""
    def cell(v):
        return "" if pd.isna(v) else f"{v:.4g}" if isinstance(v, float) else str(v)

    scores = [c for c in df.columns if c.startswith(COLUMN_PREFIX)]
    at = list(HTML_COLUMNS).index("top1_agreement") + 1
    columns = [*list(HTML_COLUMNS)[:at], *scores, *list(HTML_COLUMNS)[at:]]
    headers = {**HTML_COLUMNS, **{c: c.removeprefix(COLUMN_PREFIX) for c in scores}}
    table = df[columns].rename(columns=headers).astype(object).map(cell)
    body = table.to_html(index=False, border=0, classes="summary")
    if df.attrs.get("random_demo"):
        body = (f"<p><b>{', '.join(df.attrs['random_demo'])}: the random-init demo model. Its differences between "
                "methods are noise; config/organism.yaml quantizes a trained model.</b></p>" + body)
    style = ("body{font-family:sans-serif;font-size:13px;margin:8px}table{border-collapse:collapse}"
             "th,td{padding:3px 8px;text-align:right;border-bottom:1px solid #ddd;white-space:nowrap}"
             "th{background:#f0f0f0;position:sticky;top:0}td:nth-child(-n+4),th:nth-child(-n+4){text-align:left}")
    note = ("<p>ΔNLL: caption NLL minus that of fp, or of the RTN run with the same bits and group (negative: "
            "better). KL / RTN's: below 1 when the run is closer to fp than RTN. Every column is in summary.csv.</p>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>vlmquant summary</title><style>{style}"
            f"</style></head><body>{body}{note}</body></html>\n")


def write_summary(df, csv_path, parquet_path, html_path=None):
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    if html_path is not None:
        with atomic_path(html_path) as tmp:
            tmp.write_text(summary_html(df), encoding="utf-8")
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"vlmquant": dumps({"packages": package_versions()}).encode()})
    with atomic_path(parquet_path) as tmp:
        pq.write_table(table, tmp)
