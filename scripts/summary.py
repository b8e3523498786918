from vlmquant.report.accuracy import write_accuracy
from vlmquant.report.all_runs import all_runs, write_all_runs
from vlmquant.report.summary import summarize, write_summary
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    rows = list(snakemake.params.rows)
    bench = {(r["model"], r["calib"], r["run"]): r["bench"] for r in rows}
    summary = summarize(rows, bench)
    write_summary(summary, snakemake.output.csv, snakemake.output.parquet, snakemake.output.html)
    write_accuracy(summary, snakemake.output.accuracy)
    write_all_runs(all_runs([r["path"] for r in rows], list(snakemake.params.other_tables)), snakemake.output.all_runs)
