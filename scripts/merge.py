from vlmquant.search.pipeline import run_merge
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    run_merge(list(snakemake.input), snakemake.output.cache, snakemake.output.table, dict(snakemake.params.expect))
