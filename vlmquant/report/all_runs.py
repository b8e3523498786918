"""The running comparison: every eval table present under results/, targets or not, in one table
(results/all_runs.csv), so that experiments accumulate when `targets` change.

Columns: `target` (true for the rows of the current summary), then the summary's columns (report.summary) up to
kl_ratio_rtn, without the lmms-eval scores and the stage times (those belong to the current targets' jobs). The
relative columns compare rows of the same model and eval set: delta_nll_fp against that eval set's fp table,
delta_nll_rtn / kl_ratio_rtn against the RTN run of the same model, calib, eval set and scheme. Rows are sorted
by model, eval set, fp first, calib and run.

How the summary job reads the tables it does not declare (rules/summary.smk): the tables of the targets are its
inputs; every other table present is listed with its sha256 in the job's params (`workflow.inputs.other_tables`),
read when Snakemake builds the DAG. Declaring those as inputs would make Snakemake rebuild them (a run dropped from
the targets whose settings changed since would be searched again); as params, the job reruns exactly when such a
table appears, changes or is deleted, and never otherwise.
"""
import logging

import pandas as pd

from vlmquant.errors import VlmquantError
from vlmquant.io.atomic import atomic_path
from vlmquant.report.summary import COLUMNS, relative_columns, table_row

log = logging.getLogger(__name__)
ALL_RUNS_COLUMNS = ["target", *COLUMNS[:COLUMNS.index("kl_ratio_rtn") + 1]]


def all_runs(target_paths, others):
    """DataFrame of ALL_RUNS_COLUMNS over the tables `target_paths` and `others` (paths).
    A table that cannot be read (e.g. written by an older vlmquant) is left out with a warning naming it."""
    rows = []
    for path in [*target_paths, *others]:
        try:
            rows.append({"target": path in target_paths, **table_row(path)})
        except (OSError, KeyError, ValueError, VlmquantError) as e:
            log.warning("%s: left out of the running comparison (%s)", path, e)
    df = pd.DataFrame(rows, columns=[c for c in ALL_RUNS_COLUMNS if c not in ("delta_nll_fp", "delta_nll_rtn",
                                                                              "kl_ratio_rtn")])
    df = relative_columns(df)[ALL_RUNS_COLUMNS]
    df["fp_first"] = df.run != "fp"
    df = df.sort_values(["model", "eval_calib", "fp_first", "calib", "run"], na_position="first", kind="stable")
    df = df.drop(columns="fp_first").reset_index(drop=True)
    for col in ("w_bit", "w_group", "a_bit", "n_samples", "n_caption_tokens"):
        df[col] = df[col].astype("Int64")
    return df


def write_all_runs(df, csv_path):
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
