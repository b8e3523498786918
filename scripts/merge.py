from vlmquant.io.scales import merge
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    merge(list(snakemake.input), snakemake.output.cache, snakemake.output.table, dict(snakemake.params.expect))
