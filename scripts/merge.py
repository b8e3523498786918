from vlmquant.io.scales import chunk_layer_files, merge
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    merge(chunk_layer_files(snakemake.input), snakemake.output.cache, snakemake.output.table,
          dict(snakemake.params.expect))
