from vlmquant.workflow.jobserver import forward

forward()  # in the run's job server when it has one

from vlmquant.models.loading import open_model
from vlmquant.search.pipeline import run_acts
from vlmquant.workflow import script_logging

with script_logging(snakemake):
    run_acts(open_model(snakemake.params.model, snakemake.params.device, snakemake.config["memory"]), snakemake.input.inputs,
             list(snakemake.params.starts), snakemake.output[0])
