from vlmquant.workflow.jobserver import forward

forward()  # in the run's job server when it has one

from vlmquant.data.inputs import build_inputs
from vlmquant.models.loading import open_model
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    build_inputs(snakemake.input.calib, open_model(snakemake.params.model, "cpu"), snakemake.output[0],
                 name=snakemake.wildcards.model, labels=snakemake.params.labels, workers=snakemake.threads)
