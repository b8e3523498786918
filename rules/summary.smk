# All eval tables → results/summary.{csv,parquet}; per (model, calibration set) figures for the report.
import sys

from vlmquant.report.all_runs import other_tables
from vlmquant.report.plan import final_table, plan_lines, planned_jobs


# The summary job also writes the running comparison (all_runs.csv): every eval table present, targets or not.
# Those of other runs are not inputs (Snakemake would rebuild them) but params with their sha256, so the job reruns
# when one appears, changes or goes (vlmquant/report/all_runs.py).
rule summary:
    """One row per (model, calib, run) plus an fp row per model, with stage wall times; and every eval table present."""
    input:
        unpack(summary_inputs),
    output:
        csv=report(
            paths.SUMMARY_CSV,
            caption="../workflow/report/summary.rst",
            category="Summary",
            labels={"table": "summary (csv download)"},
        ),
        parquet=paths.SUMMARY_PARQUET,
        html=report(
            paths.SUMMARY_HTML,
            caption="../workflow/report/summary.rst",
            category="Summary",
            labels={"table": "summary (table)"},
        ),
        all_runs=paths.ALL_RUNS,
    log:
        paths.LOGS["summary"],
    conda:
        "../workflow/envs/vlmquant.yaml"
    params:
        rows=lambda w: W.summary_rows(config),
        other_tables=lambda w: other_tables(
            row["path"] for row in W.summary_rows(config)
        ),
    script:
        "../scripts/summary.py"


rule plots:
    """Per-layer hidden error by modality, chosen α per layer and group, metrics by run."""
    input:
        unpack(plot_inputs),
    output:
        hidden_error=report(
            paths.PLOT.replace("{figure}", "hidden_error"),
            caption="../workflow/report/hidden_error.rst",
            category="Plots",
            subcategory="{model} / {calib}",
            labels={
                "model": "{model}",
                "calib": "{calib}",
                "figure": "per-layer output error",
            },
        ),
        alpha=report(
            paths.PLOT.replace("{figure}", "alpha"),
            caption="../workflow/report/alpha.rst",
            category="Plots",
            subcategory="{model} / {calib}",
            labels={"model": "{model}", "calib": "{calib}", "figure": "chosen alpha"},
        ),
        metrics=report(
            paths.PLOT.replace("{figure}", "metrics"),
            caption="../workflow/report/metrics.rst",
            category="Plots",
            subcategory="{model} / {calib}",
            labels={
                "model": "{model}",
                "calib": "{calib}",
                "figure": "metrics by run",
            },
        ),
    log:
        paths.LOGS["plots"],
    conda:
        "../workflow/envs/vlmquant.yaml"
    params:
        runs=lambda w: list(W.plot_runs(config)),
        methods=lambda w: W.plot_runs(config),
        search_runs=lambda w: W.search_runs(config),
    script:
        "../scripts/plots.py"


# Before running: per stage, the jobs with estimates of time and memory; after a run that made the summary: its
# main columns. On stderr, so both show with --quiet too (vlmquant/report/plan.py).
PLANNED = []


def print_plan():
    """In the Snakefile's `onstart:` (Snakemake keeps one handler)."""
    PLANNED.extend(planned_jobs(workflow))
    print("\n".join(plan_lines(PLANNED)), file=sys.stderr)


onsuccess:
    table = (
        final_table(paths.SUMMARY_CSV)
        if any(j.rule == "summary" for j in PLANNED)
        else None
    )
    if table:
        print(
            f"{paths.SUMMARY_CSV} (every column; all runs so far: {paths.ALL_RUNS}):\n{table}",
            file=sys.stderr,
        )
