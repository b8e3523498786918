from vlmquant.report.plots import make_plots
from vlmquant.workflow import FIGURES, script_logging

with script_logging(snakemake):
    w = snakemake.wildcards
    make_plots(w.model, w.calib, dict(zip(snakemake.params.runs, snakemake.input.evals)),
               dict(zip(snakemake.params.search_runs, snakemake.input.searches)), dict(snakemake.params.methods),
               snakemake.input.summary, {k: snakemake.output[k] for k in FIGURES})
