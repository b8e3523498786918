from vlmquant.data.inputs import build_inputs
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    build_inputs(snakemake.input.calib, dict(snakemake.params.model), snakemake.output[0], name=snakemake.wildcards.model)
