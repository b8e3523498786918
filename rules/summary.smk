# All eval tables → results/summary.{csv,parquet}; per (model, calibration set) figures for the report.


rule summary:
    """One row per (model, calib, run) plus an fp row per model, with stage wall times."""
    input:
        summary_inputs,
    output:
        csv=report(
            "results/summary.csv",
            caption="../workflow/report/summary.rst",
            category="Summary",
            labels={"table": "summary"},
        ),
        parquet="results/summary.parquet",
    params:
        rows=lambda w: layout.summary_rows(config),
    log:
        "results/logs/summary.log",
    script:
        "../scripts/summary.py"


rule plots:
    """Per-layer hidden error by modality, chosen α per layer and group, metrics by run."""
    input:
        unpack(plot_inputs),
    output:
        hidden_error=report(
            "results/plots/{model}/{calib}/hidden_error.png",
            caption="../workflow/report/hidden_error.rst",
            category="Plots",
            subcategory="{model} / {calib}",
            labels={"model": "{model}", "calib": "{calib}", "figure": "per-layer output error"},
        ),
        alpha=report(
            "results/plots/{model}/{calib}/alpha.png",
            caption="../workflow/report/alpha.rst",
            category="Plots",
            subcategory="{model} / {calib}",
            labels={"model": "{model}", "calib": "{calib}", "figure": "chosen alpha"},
        ),
        metrics=report(
            "results/plots/{model}/{calib}/metrics.png",
            caption="../workflow/report/metrics.rst",
            category="Plots",
            subcategory="{model} / {calib}",
            labels={"model": "{model}", "calib": "{calib}", "figure": "metrics by run"},
        ),
    params:
        runs=lambda w: list(layout.plot_runs(config)),
        methods=lambda w: layout.plot_runs(config),
        search_runs=lambda w: layout.search_runs(config),
    log:
        "results/logs/plots/{model}/{calib}.log",
    script:
        "../scripts/plots.py"
