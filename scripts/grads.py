from vlmquant.search.pipeline import run_grads
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    run_grads(dict(snakemake.params.model), snakemake.input.inputs, snakemake.output[0],
              device=snakemake.params.device, batch_size=snakemake.params.batch_size)
