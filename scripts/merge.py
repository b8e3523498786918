from vlmquant.workflow.jobserver import forward

forward()  # in the run's job server when it has one

from vlmquant.io.provenance import with_weights
from vlmquant.io.scales import chunk_layer_files, merge
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    merge(chunk_layer_files(snakemake.input.chunks), snakemake.output.cache, snakemake.output.table,
          with_weights(dict(snakemake.params.expect), snakemake.params.model["path"]))
