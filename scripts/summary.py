from vlmquant.report.summary import summarize, write_summary
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    rows = list(snakemake.params.rows)
    bench = {(r["model"], r["calib"], r["run"]): r["bench"] for r in rows}
    write_summary(summarize(rows, bench), snakemake.output.csv, snakemake.output.parquet, snakemake.output.html)
