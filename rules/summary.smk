# All eval tables → results/summary.{csv,parquet}; per (model, calibration set) figures for the report.
# The summary job also writes the running comparison (all_runs.csv): every eval table present, targets or not.
# Those of other runs are not inputs (Snakemake would rebuild them) but params with their sha256, so the job reruns
# when one appears, changes or goes (vlmquant/report/all_runs.py).
rule summary:
    """One row per (model, calib, run) plus an fp row per model, with stage wall times; the lmms-eval accuracies with
    standard errors and paired tests (accuracy.json); and every eval table present."""
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
        accuracy=paths.ACCURACY,
        all_runs=paths.ALL_RUNS,
    log:
        paths.LOGS["summary"],
    conda:
        "../workflow/envs/vlmquant.yaml"
    params:
        rows=lambda w: W.summary_rows(config),
        other_tables=lambda w: W.other_tables(
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
